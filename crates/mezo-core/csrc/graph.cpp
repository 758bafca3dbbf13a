// CUDA graph capture and replay for mezo, over libtorch's at::cuda::CUDAGraph (tch has no binding
// for it). libtorch's own capture is used rather than the raw CUDA API because the caching
// allocator must know about the capture: tensors made while capturing come from a private pool
// that stays reserved for the graph, so replays write where the capture wrote and nothing else
// reuses that memory in between.
//
// Every function returns nullptr on success or a malloc'd message (free it with
// mezo_graph_free_error); no C++ exception crosses into Rust.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "try.h"

namespace {

// The stream and device that were current before mezo_side_stream_begin, per thread.
thread_local std::optional<c10::cuda::CUDAStream> previous_stream;
thread_local c10::DeviceIndex previous_device = 0;

}  // namespace

extern "C" {

void mezo_graph_free_error(char* e) { std::free(e); }

// The calling thread's current stream on `device` (what libtorch launches on), as cudaStream_t.
char* mezo_current_stream(int device, void** out) {
  MEZO_TRY(*out = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream())
}

// Waits for the device, then makes `device` and a side stream from libtorch's pool current:
// captures cannot run on the default stream, and warm-up runs go on the stream that will
// capture so that lazily made per-stream state (cuBLAS workspaces) exists before capture.
char* mezo_side_stream_begin(int device) {
  MEZO_TRY({
    auto d = static_cast<c10::DeviceIndex>(device);
    previous_device = c10::cuda::current_device();
    c10::cuda::set_device(d);
    c10::cuda::device_synchronize();
    previous_stream = c10::cuda::getCurrentCUDAStream(d);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, d));
  })
}

// Waits for the side stream's work, then restores the previous stream and device.
char* mezo_side_stream_end(int device) {
  MEZO_TRY({
    c10::cuda::device_synchronize();
    if (previous_stream) c10::cuda::setCurrentCUDAStream(*previous_stream);
    previous_stream.reset();
    c10::cuda::set_device(previous_device);
    (void)device;
  })
}

// A memory pool that several graphs may share (their intermediate tensors overlap; safe when
// each replay's outputs are read before the next replay of any graph of the pool).
char* mezo_graph_pool(unsigned long long* first, unsigned long long* second) {
  MEZO_TRY({
    auto id = at::cuda::graph_pool_handle();
    *first = id.first;
    *second = id.second;
  })
}

char* mezo_graph_new(void** out) { MEZO_TRY(*out = new at::cuda::CUDAGraph()) }

void mezo_graph_delete(void* g) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(g);
  } catch (...) {
  }
}

// Capture on the current (side) stream, thread-local mode: other threads' CUDA calls are not
// affected by this thread's capture.
char* mezo_graph_capture_begin(void* g, unsigned long long first, unsigned long long second) {
  MEZO_TRY(static_cast<at::cuda::CUDAGraph*>(g)->capture_begin({first, second},
                                                               cudaStreamCaptureModeThreadLocal))
}

char* mezo_graph_capture_end(void* g) { MEZO_TRY(static_cast<at::cuda::CUDAGraph*>(g)->capture_end()) }

// Replays on the current stream (libtorch's default one outside mezo_side_stream_begin), so it is
// ordered with every other kernel of the thread without a sync.
char* mezo_graph_replay(void* g) { MEZO_TRY(static_cast<at::cuda::CUDAGraph*>(g)->replay()) }

}  // extern "C"
