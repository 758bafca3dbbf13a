//! libtorch operators in forms tch does not bind, through a small C++ shim (`csrc/ops.cpp`):
//! each saves the forward a kernel where it runs. Without the shim (no libtorch headers at build
//! time) each falls back to tch's operators, with the same result.

#[cfg(mezo_ops)]
use std::ffi::{c_char, CStr};

use tch::Tensor;

#[cfg(mezo_ops)]
mod ffi {
    use super::*;
    use std::ffi::c_void;
    extern "C" {
        pub fn mezo_ops_free_error(e: *mut c_char);
        pub fn mezo_baddbmm_(
            s: *mut c_void,
            b1: *const c_void,
            b2: *const c_void,
            beta: f64,
            alpha: f64,
        ) -> *mut c_char;
        pub fn mezo_sdpa(
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            mask: *const c_void,
            causal: i32,
            efficient_first: i32,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn mezo_linear_relu(
            x: *const c_void,
            w: *const c_void,
            bias: *const c_void,
            out: *mut *mut c_void,
        ) -> *mut c_char;
    }
}

/// Panics with libtorch's message, as tch's own operators do on a shape or device error (those
/// are caller bugs, checked before the forward runs).
#[cfg(mezo_ops)]
fn check(e: *mut c_char, what: &str) {
    if e.is_null() {
        return;
    }
    // SAFETY: a non-null return is a NUL-terminated malloc'd string from the shim, freed once here.
    let msg = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
    unsafe { ffi::mezo_ops_free_error(e) };
    panic!("{what}: {}", msg.lines().next().unwrap_or(""));
}

/// `y <- beta y + alpha (b1 @ b2)` in place, batched (`[n, r, k] @ [n, k, c]` into `[n, r, c]`).
/// `y` may be a strided view (a column block of a wider output): cuBLAS writes it where it lies
/// when its last dimension is unit-stride, so a projection's adapter delta lands in the fused
/// q/k/v output without a copy.
pub fn baddbmm_(y: &mut Tensor, b1: &Tensor, b2: &Tensor, beta: f64, alpha: f64) {
    #[cfg(mezo_ops)]
    {
        // SAFETY: tch's handles are `at::Tensor*`, valid for the call; the shim catches every
        // C++ exception.
        let e = unsafe {
            ffi::mezo_baddbmm_(y.as_mut_ptr().cast(), b1.as_ptr().cast(), b2.as_ptr().cast(), beta, alpha)
        };
        check(e, "baddbmm_");
    }
    #[cfg(not(mezo_ops))]
    {
        let r = y.baddbmm(b1, b2, beta, alpha);
        y.copy_(&r);
    }
}

/// Keys at most this many: [`sdpa`] tries the memory-efficient kernel first. Measured on the H100
/// (`docs/performance.md`): at 64 keys it made 125m LoRA 4.8% faster and 1.3B 1-2%; at 128 keys
/// and more it was slower than libtorch's own choice (cuDNN's), by up to 30% at 2048.
pub const EFFICIENT_ATTENTION_MAX_KEYS: i64 = 64;

/// `scaled_dot_product_attention(q, k, v, mask, causal)` (no dropout, the default scale). On CUDA
/// with at most [`EFFICIENT_ATTENTION_MAX_KEYS`] keys the memory-efficient kernel is tried before
/// libtorch's usual order (libtorch still checks it applies, else takes the next); the
/// process-wide order is put back after the call.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
    #[cfg(mezo_ops)]
    if q.device().is_cuda() {
        let keys = k.size()[k.dim() - 2];
        let mut out = std::ptr::null_mut();
        // SAFETY: as in `baddbmm_`; a null mask is none; on success `out` is a new `at::Tensor*`
        // that the returned tch handle owns.
        let e = unsafe {
            ffi::mezo_sdpa(
                q.as_ptr().cast(),
                k.as_ptr().cast(),
                v.as_ptr().cast(),
                mask.map_or(std::ptr::null(), |m| m.as_ptr().cast()),
                causal as i32,
                (keys <= EFFICIENT_ATTENTION_MAX_KEYS) as i32,
                &mut out,
            )
        };
        check(e, "scaled_dot_product_attention");
        return unsafe { Tensor::from_ptr(out.cast()) };
    }
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None::<f64>, false)
}

/// `relu(x @ w^T + bias)` for a 2-D `x`: on CUDA one cuBLASLt GEMM with the bias and the ReLU in
/// its epilogue; elsewhere (and without the shim) the linear layer, then the ReLU.
pub fn linear_relu(x: &Tensor, w: &Tensor, bias: &Tensor) -> Tensor {
    #[cfg(mezo_ops)]
    if x.device().is_cuda() {
        let mut out = std::ptr::null_mut();
        // SAFETY: as in `baddbmm_`; on success `out` is a new `at::Tensor*` that the returned
        // tch handle owns (and frees).
        let e = unsafe {
            ffi::mezo_linear_relu(x.as_ptr().cast(), w.as_ptr().cast(), bias.as_ptr().cast(), &mut out)
        };
        check(e, "linear_relu");
        return unsafe { Tensor::from_ptr(out.cast()) };
    }
    x.linear(w, Some(bias)).relu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn baddbmm_in_place_writes_a_column_block_and_nothing_else() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let wide = Tensor::randn([2, 5, 12], opts);
        let (b1, b2) = (Tensor::randn([2, 5, 3], opts), Tensor::randn([2, 3, 4], opts));
        let before = wide.copy();
        let mut block = wide.narrow(2, 4, 4);
        baddbmm_(&mut block, &b1, &b2, 1.0, 0.5);
        let want = before.narrow(2, 4, 4) + b1.bmm(&b2) * 0.5;
        assert!(wide.narrow(2, 4, 4).allclose(&want, 1e-12, 1e-12, false));
        assert!(wide.narrow(2, 0, 4).equal(&before.narrow(2, 0, 4)));
        assert!(wide.narrow(2, 8, 4).equal(&before.narrow(2, 8, 4)));
    }

    #[test]
    fn linear_relu_is_the_linear_layer_then_relu() {
        tch::manual_seed(4);
        let opts = (Kind::Double, Device::Cpu);
        let (x, w, b) = (Tensor::randn([6, 5], opts), Tensor::randn([7, 5], opts), Tensor::randn([7], opts));
        assert!(linear_relu(&x, &w, &b).equal(&x.linear(&w, Some(&b)).relu()));
    }

    /// On the GPU, attention with the memory-efficient kernel tried first (64 keys) and with
    /// libtorch's own order (more keys) agrees with the CPU's within fp16 rounding, causal and
    /// with an explicit mask; short and long calls alternate.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn sdpa_on_cuda_matches_the_cpu() {
        assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
        tch::manual_seed(5);
        for keys in [64i64, 200, 64] {
            let shape = [3, 4, keys, 64];
            let (q, k, v) = (
                Tensor::randn(shape, (Kind::Float, Device::Cpu)),
                Tensor::randn(shape, (Kind::Float, Device::Cpu)),
                Tensor::randn(shape, (Kind::Float, Device::Cpu)),
            );
            let mask = Tensor::rand([3, 1, keys, keys], (Kind::Float, Device::Cpu))
                .gt(0.3)
                .logical_or(&Tensor::eye(keys, (Kind::Bool, Device::Cpu)));
            for m in [None, Some(&mask)] {
                let want = sdpa(&q, &k, &v, m, m.is_none());
                let g = |t: &Tensor| t.to_device(Device::Cuda(0)).to_kind(Kind::Half);
                let mg = m.map(|m| m.to_device(Device::Cuda(0)));
                let got = sdpa(&g(&q), &g(&k), &g(&v), mg.as_ref(), m.is_none());
                let diff =
                    (got.to_device(Device::Cpu).to_kind(Kind::Float) - &want).abs().max().double_value(&[]);
                assert!(diff < 1e-2, "{keys} keys, mask {}: CUDA differs by {diff}", m.is_some());
            }
        }
    }
}
