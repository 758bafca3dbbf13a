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
}
