// What mezo's C++ shims share: every exported function returns nullptr on success or a malloc'd
// message (the caller frees it through the shim's free function), so no C++ exception crosses
// into Rust.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

namespace mezo_shim {

inline char* message(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace mezo_shim

#define MEZO_TRY(body)                                             \
  try {                                                            \
    body;                                                          \
    return nullptr;                                                \
  } catch (const std::exception& e) {                              \
    return mezo_shim::message(e.what());                           \
  } catch (...) {                                                  \
    return mezo_shim::message("unknown C++ exception in libtorch"); \
  }
