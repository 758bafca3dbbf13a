//! The fused kernels of [`crate::fused`] on CUDA: compiled at run time by NVRTC (no nvcc needed
//! where mezo is built) and launched through the driver API on the legacy default stream, the
//! stream libtorch's own kernels use here, so they are ordered with them without any sync.
//! libnvrtc and libcuda are opened with dlopen on first use, so a CPU-only machine never needs them.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::fused::SgdUpdate;
use crate::rng::{Distribution, StreamKey};
use crate::ztensor::GaussTable;

const SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;
__device__ __forceinline__ u32 mix32(u32 x) {
  x ^= x >> 16; x *= 0x21f0aaadu; x ^= x >> 15; x *= 0x735a2d97u; x ^= x >> 15; return x;
}
// The Gaussian table lives in shared memory: its lower half only, T[0..=32768] (131 KB). The upper
// half is its mirror image (t[65536 - j] = -t[j]) and each difference d[j] = t[j+1] - t[j] is one
// correctly rounded f32 subtraction of two knots, which equals the host's d[j] (rounded from the
// exact f64 difference; tested on the host for every j). So z keeps the host's bits while the
// gather stays on chip: reading a 512 KB table from L2 per element bounded these kernels.
#define HALF 32768u
__device__ __forceinline__ float zval(u32 i, u32 a, u32 b, const float* sT, int dist) {
  u32 k = mix32(mix32(i ^ b) ^ a);
  if (dist) return (k >> 31) ? -1.0f : 1.0f;
  u32 hi = k >> 16;
  float frac = __fmul_rn((float)(k & 0xffffu), 1.52587890625e-05f);
  float t, d;
  if (hi < HALF) { t = sT[hi]; d = __fsub_rn(sT[hi + 1], t); }
  else { u32 m = 2 * HALF - hi; float x = sT[m]; t = -x; d = __fsub_rn(x, sT[m - 1]); }
  return __fadd_rn(t, __fmul_rn(d, frac));
}
__device__ __forceinline__ void load_table(float* sT, const float* __restrict__ T) {
  for (u32 j = threadIdx.x; j <= HALF; j += blockDim.x) sT[j] = T[j];
  __syncthreads();
}
// 16-bit halves (f16 or bf16) to and from f32, round to nearest even.
__device__ __forceinline__ float h2f(u32 h, int dt) {
  if (dt == 1) { unsigned short s = (unsigned short)h; float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s)); return f; }
  return __uint_as_float(h << 16);
}
__device__ __forceinline__ u32 f2h(float v, int dt) {
  unsigned short h;
  if (dt == 1) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); }
  else { asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); }
  return (u32)h;
}
__device__ __forceinline__ float ld(const void* p, u64 i, int dt) {
  if (dt == 0) return ((const float*)p)[i];
  return h2f(((const unsigned short*)p)[i], dt);
}
// What storing v to a dt tensor and loading it back gives.
__device__ __forceinline__ float rnd(float v, int dt) {
  return dt == 0 ? v : h2f(f2h(v, dt), dt);
}
__device__ __forceinline__ void st(void* p, u64 i, int dt, float v) {
  if (dt == 0) { ((float*)p)[i] = v; return; }
  ((unsigned short*)p)[i] = (unsigned short)f2h(v, dt);
}
// Four consecutive elements with one vector load and one store (16 bytes of f32, 8 of f16/bf16):
// fewer, wider memory operations, and four independent table reads per thread in flight. The
// conversions are the scalar ones, so the bits are too. Used where the pointer is aligned for it.
__device__ __forceinline__ void ld4(const void* p, u64 q, int dt, float* v) {
  if (dt == 0) { float4 x = ((const float4*)p)[q]; v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w; return; }
  uint2 w = ((const uint2*)p)[q];
  v[0] = h2f(w.x & 0xffffu, dt); v[1] = h2f(w.x >> 16, dt); v[2] = h2f(w.y & 0xffffu, dt); v[3] = h2f(w.y >> 16, dt);
}
__device__ __forceinline__ void st4(void* p, u64 q, int dt, const float* v) {
  if (dt == 0) { ((float4*)p)[q] = make_float4(v[0], v[1], v[2], v[3]); return; }
  uint2 w;
  w.x = f2h(v[0], dt) | (f2h(v[1], dt) << 16);
  w.y = f2h(v[2], dt) | (f2h(v[3], dt) << 16);
  ((uint2*)p)[q] = w;
}
extern __shared__ float sT[];
// One sweep over p: th <- f(th, i) for every element, four consecutive elements per vector load
// and store where `vec` says the pointer is aligned for it, the scalar path for the rest.
template <class F>
__device__ __forceinline__ void sweep(void* p, int dt, u64 n, int vec, F f) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x;
  u64 tail = 0;
  if (vec) {
    u64 nq = n >> 2;
    for (u64 q = t; q < nq; q += stride) {
      u64 i = q << 2;
      float v[4];
      ld4(p, q, dt, v);
#pragma unroll
      for (int k = 0; k < 4; k++) v[k] = f(v[k], (u32)(i + k));
      st4(p, q, dt, v);
    }
    tail = nq << 2;
  }
  for (u64 i = tail + t; i < n; i += stride) st(p, i, dt, f(ld(p, i, dt), (u32)i));
}
extern "C" __global__ void __launch_bounds__(1024, 1)
mezo_perturb(void* p, int dt, u64 n, u32 a, u32 b, float scale, const float* __restrict__ T, int dist,
             int vec) {
  load_table(sT, T);
  sweep(p, dt, n, vec, [=](float th, u32 i) { return __fadd_rn(th, __fmul_rn(zval(i, a, b, sT, dist), scale)); });
}
extern "C" __global__ void __launch_bounds__(1024, 1)
mezo_sgd_update(void* p, int dt, u64 n, const u32* a, const u32* b, const float* g, int m, float inv_n,
                int use_inv, float wd, int use_wd, float lr, const float* __restrict__ T, int dist,
                u32 ra, u32 rb, float rscale, int use_r, int vec) {
  load_table(sT, T);
  sweep(p, dt, n, vec, [=](float th, u32 ii) {
    float acc = __fmul_rn(zval(ii, a[0], b[0], sT, dist), g[0]);
    for (int j = 1; j < m; j++) acc = __fadd_rn(acc, __fmul_rn(zval(ii, a[j], b[j], sT, dist), g[j]));
    if (use_inv) acc = __fmul_rn(acc, inv_n);
    // A pending restore (the last direction's -eps z undone) fused into this sweep, rounded as
    // the separate perturb kernel's store would round it: the same bits, one sweep fewer.
    if (use_r) th = rnd(__fadd_rn(th, __fmul_rn(zval(ii, ra, rb, sT, dist), rscale)), dt);
    if (use_wd) acc = __fadd_rn(acc, __fmul_rn(th, wd));
    return __fsub_rn(th, __fmul_rn(acc, lr));
  });
}
"#;

type CuResult = c_int;

struct Api {
    _nvrtc: libloading::Library,
    _cuda: libloading::Library,
    cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    cu_module_load_data: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    cu_module_get_function: unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    cu_launch_kernel: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    cu_ctx_get_current: unsafe extern "C" fn(*mut *mut c_void) -> CuResult,
    cu_ctx_get_device: unsafe extern "C" fn(*mut c_int) -> CuResult,
    cu_device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    cu_mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    cu_func_set_attribute: unsafe extern "C" fn(*mut c_void, c_int, c_int) -> CuResult,
    nvrtc_create_program: unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    nvrtc_compile_program: unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int,
    nvrtc_get_ptx_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    nvrtc_get_ptx: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    nvrtc_get_program_log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    nvrtc_get_program_log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
}

fn open_first(names: &[String]) -> Result<libloading::Library> {
    let mut errs = Vec::new();
    for n in names {
        // SAFETY: loading a vendor library whose initialisers are trusted (NVIDIA's).
        match unsafe { libloading::Library::new(n) } {
            Ok(l) => return Ok(l),
            Err(e) => errs.push(format!("{n}: {e}")),
        }
    }
    Err(CoreError::Cuda(format!("cannot load any of: {}", errs.join("; "))))
}

fn nvrtc_names() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("MEZO_NVRTC").into_iter().collect();
    names.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    // pip's torch keeps NVRTC in site-packages/nvidia/cu*/lib beside torch/lib.
    if let Ok(paths) = std::env::var("LD_LIBRARY_PATH") {
        for p in paths.split(':').filter(|p| p.ends_with("torch/lib")) {
            for cu in ["cu13", "cuda_nvrtc"] {
                for f in ["libnvrtc.so.13", "libnvrtc.so.12"] {
                    names.push(format!("{p}/../../nvidia/{cu}/lib/{f}"));
                }
            }
        }
    }
    names
}

impl Api {
    fn load() -> Result<Self> {
        let nvrtc = open_first(&nvrtc_names())?;
        let cuda = open_first(&["libcuda.so.1".to_string(), "libcuda.so".to_string()])?;
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                // SAFETY: the signature matches the documented C API of this symbol.
                *unsafe { $lib.get($name) }
                    .map_err(|e| CoreError::Cuda(format!("{}: {e}", String::from_utf8_lossy($name))))?
            };
        }
        Ok(Api {
            cu_get_error_string: sym!(cuda, b"cuGetErrorString"),
            cu_module_load_data: sym!(cuda, b"cuModuleLoadData"),
            cu_module_get_function: sym!(cuda, b"cuModuleGetFunction"),
            cu_launch_kernel: sym!(cuda, b"cuLaunchKernel"),
            cu_ctx_get_current: sym!(cuda, b"cuCtxGetCurrent"),
            cu_ctx_get_device: sym!(cuda, b"cuCtxGetDevice"),
            cu_device_get_attribute: sym!(cuda, b"cuDeviceGetAttribute"),
            cu_mem_get_info: sym!(cuda, b"cuMemGetInfo_v2"),
            cu_func_set_attribute: sym!(cuda, b"cuFuncSetAttribute"),
            nvrtc_create_program: sym!(nvrtc, b"nvrtcCreateProgram"),
            nvrtc_compile_program: sym!(nvrtc, b"nvrtcCompileProgram"),
            nvrtc_get_ptx_size: sym!(nvrtc, b"nvrtcGetPTXSize"),
            nvrtc_get_ptx: sym!(nvrtc, b"nvrtcGetPTX"),
            nvrtc_get_program_log_size: sym!(nvrtc, b"nvrtcGetProgramLogSize"),
            nvrtc_get_program_log: sym!(nvrtc, b"nvrtcGetProgramLog"),
            _nvrtc: nvrtc,
            _cuda: cuda,
        })
    }

    fn check(&self, r: CuResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string.
        unsafe { (self.cu_get_error_string)(r, &mut s) };
        let msg = if s.is_null() {
            format!("error {r}")
        } else {
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(CoreError::Cuda(format!("{what}: {msg}")))
    }
}

/// Kernels of one CUDA context (one per device that ran them).
struct Module {
    perturb: usize,
    update: usize,
    /// The device's multiprocessors: one block each (the shared table takes most of an SM's
    /// shared memory, and fewer blocks load it fewer times).
    sms: u32,
}

/// Shared memory a block takes: the lower half of the Gaussian table, knots 0..=32768.
const TABLE_SHARED_BYTES: u32 = (32_769 * 4) as u32;
const THREADS: u32 = 1024;

struct Kernels {
    api: Api,
    modules: Mutex<Vec<(usize, Module)>>,
}

fn kernels() -> Result<&'static Kernels> {
    static K: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
    K.get_or_init(|| {
        Api::load().map(|api| Kernels { api, modules: Mutex::new(Vec::new()) }).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| CoreError::Cuda(e.clone()))
}

impl Kernels {
    /// The functions for the current context, compiling for its device on first use.
    fn functions(&self) -> Result<(usize, usize, u32)> {
        let api = &self.api;
        let mut ctx = std::ptr::null_mut();
        api.check(unsafe { (api.cu_ctx_get_current)(&mut ctx) }, "cuCtxGetCurrent")?;
        if ctx.is_null() {
            return Err(CoreError::Cuda(
                "no current CUDA context (libtorch has not touched this device yet)".into(),
            ));
        }
        let mut modules = self.modules.lock().expect("kernel cache lock");
        if let Some((_, m)) = modules.iter().find(|(c, _)| *c == ctx as usize) {
            return Ok((m.perturb, m.update, m.sms));
        }
        let mut dev = 0;
        api.check(unsafe { (api.cu_ctx_get_device)(&mut dev) }, "cuCtxGetDevice")?;
        let (mut major, mut minor) = (0, 0);
        // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76.
        api.check(unsafe { (api.cu_device_get_attribute)(&mut major, 75, dev) }, "compute capability")?;
        api.check(unsafe { (api.cu_device_get_attribute)(&mut minor, 76, dev) }, "compute capability")?;
        let ptx = self.compile(&format!("--gpu-architecture=compute_{major}{minor}"))?;
        let mut module = std::ptr::null_mut();
        api.check(
            unsafe { (api.cu_module_load_data)(&mut module, ptx.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        let get = |name: &str| -> Result<usize> {
            let mut f = std::ptr::null_mut();
            let c = CString::new(name).expect("no NUL");
            api.check(unsafe { (api.cu_module_get_function)(&mut f, module, c.as_ptr()) }, name)?;
            // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8: above the default 48 KB.
            api.check(
                unsafe { (api.cu_func_set_attribute)(f, 8, TABLE_SHARED_BYTES as c_int) },
                "allowing the kernel 131 KB of shared memory",
            )?;
            Ok(f as usize)
        };
        let mut sms = 0;
        // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16.
        api.check(unsafe { (api.cu_device_get_attribute)(&mut sms, 16, dev) }, "multiprocessor count")?;
        let m =
            Module { perturb: get("mezo_perturb")?, update: get("mezo_sgd_update")?, sms: sms.max(1) as u32 };
        let out = (m.perturb, m.update, m.sms);
        modules.push((ctx as usize, m));
        Ok(out)
    }

    fn compile(&self, arch: &str) -> Result<Vec<u8>> {
        let api = &self.api;
        let src = CString::new(SOURCE).expect("no NUL");
        let name = CString::new("mezo_fused.cu").expect("no NUL");
        let mut prog = std::ptr::null_mut();
        let r = unsafe {
            (api.nvrtc_create_program)(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(CoreError::Cuda(format!("nvrtcCreateProgram failed ({r})")));
        }
        // --fmad=false: the arithmetic must round exactly like the CPU's (the intrinsics already
        // say so; this keeps any future edit honest).
        let opts = [CString::new(arch).expect("no NUL"), CString::new("--fmad=false").expect("no NUL")];
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let r = unsafe { (api.nvrtc_compile_program)(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
        if r != 0 {
            let mut n = 0usize;
            unsafe { (api.nvrtc_get_program_log_size)(prog, &mut n) };
            let mut log = vec![0u8; n.max(1)];
            unsafe { (api.nvrtc_get_program_log)(prog, log.as_mut_ptr() as *mut c_char) };
            return Err(CoreError::Cuda(format!("NVRTC ({arch}): {}", String::from_utf8_lossy(&log))));
        }
        let mut n = 0usize;
        unsafe { (api.nvrtc_get_ptx_size)(prog, &mut n) };
        let mut ptx = vec![0u8; n];
        unsafe { (api.nvrtc_get_ptx)(prog, ptx.as_mut_ptr() as *mut c_char) };
        Ok(ptx)
    }

    fn launch(&self, f: usize, sms: u32, n: u64, args: &mut [*mut c_void]) -> Result<()> {
        let threads = THREADS;
        let blocks = n.div_ceil(u64::from(threads)).clamp(1, u64::from(sms)) as u32;
        let api = &self.api;
        let r = unsafe {
            (api.cu_launch_kernel)(
                f as *mut c_void,
                blocks,
                1,
                1,
                threads,
                1,
                1,
                TABLE_SHARED_BYTES,
                std::ptr::null_mut(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        api.check(r, "cuLaunchKernel")
    }
}

/// Whether the kernels may move four elements at a time: 16 bytes (f32) or 8 (f16/bf16) aligned.
fn vector_aligned(ptr: *mut c_void, dt: c_int) -> c_int {
    let align = if dt == 0 { 16 } else { 8 };
    ((ptr as usize) % align == 0).into()
}

fn dtype_code(p: &Tensor) -> c_int {
    match p.kind() {
        Kind::Float => 0,
        Kind::Half => 1,
        _ => 2,
    }
}

fn table_on(p: &Tensor, table: &GaussTable) -> Result<()> {
    if table.device() != p.device() {
        return Err(CoreError::InvalidArgument {
            what: "Gaussian table device",
            value: format!("{:?} for a tensor on {:?}", table.device(), p.device()),
            expected: "the table made for the tensor's device",
        });
    }
    Ok(())
}

pub(crate) fn perturb(
    p: &Tensor,
    key: StreamKey,
    scale: f32,
    dist: Distribution,
    table: &GaussTable,
) -> Result<()> {
    table_on(p, table)?;
    let k = kernels()?;
    let (f, _, sms) = k.functions()?;
    let mut ptr = p.data_ptr();
    let mut dt = dtype_code(p);
    let mut n = p.numel() as u64;
    let (mut a, mut b, mut s) = (key.a, key.b, scale);
    let mut tp = table.t.data_ptr();
    let mut di: c_int = matches!(dist, Distribution::Rademacher).into();
    let mut vec = vector_aligned(ptr, dt);
    let mut args: Vec<*mut c_void> = vec![
        &mut ptr as *mut _ as *mut c_void,
        &mut dt as *mut _ as *mut c_void,
        &mut n as *mut _ as *mut c_void,
        &mut a as *mut _ as *mut c_void,
        &mut b as *mut _ as *mut c_void,
        &mut s as *mut _ as *mut c_void,
        &mut tp as *mut _ as *mut c_void,
        &mut di as *mut _ as *mut c_void,
        &mut vec as *mut _ as *mut c_void,
    ];
    k.launch(f, sms, n, &mut args)
}

pub(crate) fn sgd_update(
    p: &Tensor,
    u: &SgdUpdate,
    inv_n: Option<f32>,
    dist: Distribution,
    table: &GaussTable,
) -> Result<()> {
    table_on(p, table)?;
    let k = kernels()?;
    let (_, f, sms) = k.functions()?;
    let dev = p.device();
    let to_dev = |v: Vec<i32>| Tensor::from_slice(&v).to_device(dev);
    let a = to_dev(u.keys.iter().map(|k| k.a as i32).collect());
    let b = to_dev(u.keys.iter().map(|k| k.b as i32).collect());
    let g = Tensor::from_slice(&u.grads).to_device(dev);
    let mut ptr = p.data_ptr();
    let mut dt = dtype_code(p);
    let mut n = p.numel() as u64;
    let (mut ap, mut bp, mut gp) = (a.data_ptr(), b.data_ptr(), g.data_ptr());
    let mut m = u.keys.len() as c_int;
    let mut inv = inv_n.unwrap_or(1.0);
    let mut use_inv: c_int = inv_n.is_some().into();
    let mut wd = u.weight_decay.unwrap_or(0.0);
    let mut use_wd: c_int = u.weight_decay.is_some().into();
    let mut lr = u.lr;
    let mut tp = table.t.data_ptr();
    let mut di: c_int = matches!(dist, Distribution::Rademacher).into();
    let (mut ra, mut rb, mut rs) = u.restore.map_or((0, 0, 0.0), |(k, s)| (k.a, k.b, s));
    let mut use_r: c_int = u.restore.is_some().into();
    let mut vec = vector_aligned(ptr, dt);
    let mut args: Vec<*mut c_void> = vec![
        &mut ptr as *mut _ as *mut c_void,
        &mut dt as *mut _ as *mut c_void,
        &mut n as *mut _ as *mut c_void,
        &mut ap as *mut _ as *mut c_void,
        &mut bp as *mut _ as *mut c_void,
        &mut gp as *mut _ as *mut c_void,
        &mut m as *mut _ as *mut c_void,
        &mut inv as *mut _ as *mut c_void,
        &mut use_inv as *mut _ as *mut c_void,
        &mut wd as *mut _ as *mut c_void,
        &mut use_wd as *mut _ as *mut c_void,
        &mut lr as *mut _ as *mut c_void,
        &mut tp as *mut _ as *mut c_void,
        &mut di as *mut _ as *mut c_void,
        &mut ra as *mut _ as *mut c_void,
        &mut rb as *mut _ as *mut c_void,
        &mut rs as *mut _ as *mut c_void,
        &mut use_r as *mut _ as *mut c_void,
        &mut vec as *mut _ as *mut c_void,
    ];
    k.launch(f, sms, n, &mut args)?;
    // `a`, `b`, `g` must outlive the kernel: the caching allocator only recycles their memory
    // for work queued after this point on the same stream, so dropping them here is safe.
    drop((a, b, g));
    Ok(())
}

/// Bytes in use on `device` (all processes: total minus free, as the driver reports it). tch
/// exposes no allocator statistics; the benchmark takes the difference before and after its
/// work, which counts what libtorch's caching allocator reserved (at least its peak allocation).
pub fn memory_in_use(device: Device) -> Result<u64> {
    let _ = Tensor::zeros([1], (Kind::Float, device)); // the context exists and is current
    let api = &kernels()?.api;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two out-pointers to usize, as the driver API documents.
    api.check(unsafe { (api.cu_mem_get_info)(&mut free, &mut total) }, "cuMemGetInfo")?;
    Ok((total - free) as u64)
}

/// For tests and diagnostics: whether the kernels load and compile on this device.
pub fn available(device: Device) -> Result<()> {
    let _ = Tensor::zeros([1], (Kind::Float, device)); // make libtorch create the context
    kernels()?.functions().map(|_| ())
}
