//! What a worker reports of its memory with each heartbeat (`mezo_worker_memory_bytes`).
//!
//! CUDA: the device's memory in use (total minus free, every process on the GPU, as nvidia-smi
//! counts it) and its capacity, from the driver API's `cuMemGetInfo`, opened with dlopen like the
//! fused kernels' loader (so a CPU-only machine never needs libcuda). tch exposes no CUDA memory
//! statistics, and the driver answers from any thread once the device's primary context (the one
//! libtorch uses) is pushed, so the heartbeat task can ask without disturbing the engine thread.
//!
//! CPU: the worker process's resident set (`VmRSS` in /proc/self/status) and the memory it may
//! use: the host's `MemTotal`, or the cgroup's `memory.max` when that is lower (a container's limit).

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use mezo_proto::v1 as pb;

/// Where a worker's memory is read from: set once from `--device`.
pub enum MemoryProbe {
    Cpu,
    Cuda { ordinal: c_int },
}

impl MemoryProbe {
    /// `device` as `--device` takes it: cpu, cuda or cuda:N (already validated). Of a list (a
    /// model split over devices) the first: where the embeddings, the head and the inputs are.
    pub fn new(device: &str) -> MemoryProbe {
        let device = device.split(',').next().unwrap_or(device).trim();
        match device.strip_prefix("cuda") {
            Some(rest) => MemoryProbe::Cuda {
                ordinal: rest.strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or(0),
            },
            None => MemoryProbe::Cpu,
        }
    }

    /// The report for a heartbeat; `None` when the memory cannot be read (no libcuda, the device
    /// not used yet): the coordinator then keeps no value for this worker rather than a wrong one.
    pub fn report(&self) -> Option<pb::MemoryUsage> {
        let (device, (used_bytes, total_bytes)) = match self {
            MemoryProbe::Cpu => ("cpu", cpu_memory()?),
            MemoryProbe::Cuda { ordinal } => ("cuda", cuda_memory(*ordinal)?),
        };
        Some(pb::MemoryUsage { device: device.into(), used_bytes, total_bytes })
    }
}

/// `(resident bytes of this process, bytes it may use)`.
pub fn cpu_memory() -> Option<(u64, u64)> {
    let kib = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024)
    };
    let rss = kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:")?;
    let mut total = kib(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")?;
    // cgroup v2: "max" (no limit) does not parse and leaves MemTotal.
    if let Some(limit) =
        std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok())
    {
        total = total.min(limit);
    }
    Some((rss, total))
}

type CuResult = c_int;
type Ctx = *mut c_void;

/// The few driver API entry points the probe needs (the `_v2` names are what cuda.h's macros
/// resolve to).
struct Driver {
    _lib: libloading::Library,
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    primary_ctx_get_state: unsafe extern "C" fn(c_int, *mut c_uint, *mut c_int) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut Ctx, c_int) -> CuResult,
    primary_ctx_release: unsafe extern "C" fn(c_int) -> CuResult,
    ctx_push: unsafe extern "C" fn(Ctx) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut Ctx) -> CuResult,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
}

impl Driver {
    fn load() -> Option<Driver> {
        // SAFETY: loading NVIDIA's driver library, whose initialisers are trusted.
        let lib = unsafe { libloading::Library::new("libcuda.so.1") }.ok()?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: each field's type is the documented C signature of the symbol.
                *unsafe { lib.get($name) }.ok()?
            };
        }
        Some(Driver {
            init: sym!(b"cuInit\0"),
            device_get: sym!(b"cuDeviceGet\0"),
            primary_ctx_get_state: sym!(b"cuDevicePrimaryCtxGetState\0"),
            primary_ctx_retain: sym!(b"cuDevicePrimaryCtxRetain\0"),
            primary_ctx_release: sym!(b"cuDevicePrimaryCtxRelease_v2\0"),
            ctx_push: sym!(b"cuCtxPushCurrent_v2\0"),
            ctx_pop: sym!(b"cuCtxPopCurrent_v2\0"),
            mem_get_info: sym!(b"cuMemGetInfo_v2\0"),
            _lib: lib,
        })
    }
}

/// `(bytes in use on the GPU, its capacity)`, or `None` before libtorch has opened the device
/// (retaining an inactive primary context would create one: hundreds of MiB taken just to look).
fn cuda_memory(ordinal: c_int) -> Option<(u64, u64)> {
    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
    let d = DRIVER.get_or_init(Driver::load).as_ref()?;
    // SAFETY: the driver API's documented calling sequence: every out-pointer is a live local,
    // the context is pushed and popped on this thread and the retain is paired with a release.
    unsafe {
        if (d.init)(0) != 0 {
            return None;
        }
        let mut dev = 0;
        if (d.device_get)(&mut dev, ordinal) != 0 {
            return None;
        }
        let (mut flags, mut active) = (0, 0);
        if (d.primary_ctx_get_state)(dev, &mut flags, &mut active) != 0 || active == 0 {
            return None;
        }
        let mut ctx: Ctx = std::ptr::null_mut();
        if (d.primary_ctx_retain)(&mut ctx, dev) != 0 {
            return None;
        }
        let mut out = None;
        if (d.ctx_push)(ctx) == 0 {
            let (mut free, mut total) = (0usize, 0usize);
            if (d.mem_get_info)(&mut free, &mut total) == 0 {
                out = Some(((total - free.min(total)) as u64, total as u64));
            }
            let mut popped: Ctx = std::ptr::null_mut();
            (d.ctx_pop)(&mut popped);
        }
        (d.primary_ctx_release)(dev);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_report_is_this_process_rss_within_the_host_memory() {
        // Touch 64 MiB so the resident set visibly holds it.
        let block = vec![1u8; 64 << 20];
        let r = MemoryProbe::new("cpu").report().expect("/proc is readable on Linux");
        assert_eq!(r.device, "cpu");
        assert!(r.used_bytes >= 64 << 20, "RSS {} should count the 64 MiB just touched", r.used_bytes);
        assert!(r.used_bytes < r.total_bytes, "{r:?}");
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }

    #[test]
    fn device_strings_pick_the_probe() {
        assert!(matches!(MemoryProbe::new("cpu"), MemoryProbe::Cpu));
        assert!(matches!(MemoryProbe::new("cuda"), MemoryProbe::Cuda { ordinal: 0 }));
        assert!(matches!(MemoryProbe::new("cuda:3"), MemoryProbe::Cuda { ordinal: 3 }));
        assert!(matches!(MemoryProbe::new("cuda:1,cuda:0"), MemoryProbe::Cuda { ordinal: 1 }));
    }

    /// On a GPU (`cargo test -p mezo-worker --release -- --ignored`): nothing before libtorch
    /// opens the device, then a 1 GiB allocation shows in the memory in use.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_probe_sees_libtorch_allocations() {
        let probe = MemoryProbe::new("cuda:0");
        assert_eq!(probe.report(), None, "no primary context before libtorch opens the device");
        let warm = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(0)));
        let before = probe.report().expect("libtorch made the primary context active");
        assert_eq!(before.device, "cuda");
        let big = tch::Tensor::zeros([256 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
        let after = probe.report().unwrap();
        assert!(after.used_bytes >= before.used_bytes + (1 << 30), "{before:?} -> {after:?}");
        assert!(after.used_bytes <= after.total_bytes);
        drop((warm, big));
    }

    /// On a machine without a GPU or libcuda the CUDA probe says nothing rather than failing.
    #[test]
    fn cuda_probe_without_an_active_device_reports_nothing_or_a_sane_value() {
        if let Some(r) = MemoryProbe::new("cuda:0").report() {
            assert!(r.used_bytes <= r.total_bytes && r.total_bytes > 0, "{r:?}");
        }
    }
}
