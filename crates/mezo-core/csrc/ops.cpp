// libtorch operators mezo needs in a form tch does not bind: an in-place batched GEMM with a
// scale (tch's `baddbmm_` has no beta or alpha) and a GEMM with its bias and ReLU in cuBLASLt's
// epilogue (tch's `internal_addmm_activation` passes its `use_gelu` argument where libtorch
// expects `beta`). A tensor crosses as tch's handle, which is an `at::Tensor*`.
//
// Every function returns nullptr on success or a malloc'd message (free it with
// mezo_ops_free_error); no C++ exception crosses into Rust.

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "try.h"

extern "C" {

void mezo_ops_free_error(char* e) { std::free(e); }

// self <- beta self + alpha (b1 @ b2), batched, in place. A strided self (a column block of a
// wider output, say) is written where it lies when its rows are unit-stride, as cuBLAS allows.
char* mezo_baddbmm_(at::Tensor* self, const at::Tensor* b1, const at::Tensor* b2, double beta,
                    double alpha) {
  MEZO_TRY(self->baddbmm_(*b1, *b2, beta, alpha))
}

// relu(x @ w^T + bias) as one GEMM where libtorch has the epilogue (CUDA, cuBLASLt).
char* mezo_linear_relu(const at::Tensor* x, const at::Tensor* w, const at::Tensor* bias,
                       at::Tensor** out) {
  MEZO_TRY(*out = new at::Tensor(at::_addmm_activation(*bias, *x, w->t(), 1, 1, false)))
}

// scaled_dot_product_attention, with the memory-efficient kernel tried first when
// `efficient_first` (for short sequences, where it measured faster than cuDNN's on the H100).
// The process-wide priority order is restored before returning, on an exception too.
char* mezo_sdpa(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* mask,
                int causal, int efficient_first, at::Tensor** out) {
  MEZO_TRY({
    struct Restore {
      std::vector<int64_t> order;
      ~Restore() {
        if (!order.empty()) at::globalContext().setSDPPriorityOrder(order);
      }
    } restore;
    if (efficient_first) {
      std::vector<int64_t> first{static_cast<int64_t>(at::SDPBackend::efficient_attention)};
      for (auto b : at::globalContext().sDPPriorityOrder()) {
        restore.order.push_back(static_cast<int64_t>(b));
        if (b != at::SDPBackend::efficient_attention) first.push_back(static_cast<int64_t>(b));
      }
      at::globalContext().setSDPPriorityOrder(first);
    }
    std::optional<at::Tensor> m;
    if (mask != nullptr) m = *mask;
    *out = new at::Tensor(at::scaled_dot_product_attention(*q, *k, *v, m, 0.0, causal != 0));
  })
}

}  // extern "C"
