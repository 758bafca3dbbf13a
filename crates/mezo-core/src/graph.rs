//! CUDA graphs: a step's kernels captured once and replayed with one launch, through libtorch's
//! `at::cuda::CUDAGraph` (a small C++ shim, `csrc/graph.cpp`; tch has no binding). Eager libtorch
//! issues each of a forward's hundreds of small kernels from the host, and on a small model the
//! GPU waits on the host; a replay issues them all at once.
//!
//! What a graph may capture: a pure function of tensors that live across replays (its inputs are
//! copied into them before each replay), with no host synchronisation (no `.to_device(Cpu)`, no
//! host-to-device copy of host data) and no new host values (a Rust scalar becomes a constant of
//! the graph). Its outputs are tensors from the capture, overwritten by every replay.
//!
//! Built only where libtorch has CUDA (see build.rs); elsewhere [`supported`] is false and
//! callers run eagerly.

#[cfg(mezo_cuda_graphs)]
use std::ffi::{c_char, CStr};
use std::ffi::{c_int, c_void};
#[cfg(mezo_cuda_graphs)]
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Device;

use crate::error::{CoreError, Result};

#[cfg(mezo_cuda_graphs)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn mezo_graph_free_error(e: *mut c_char);
        pub fn mezo_current_stream(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        pub fn mezo_side_stream_begin(device: c_int) -> *mut c_char;
        pub fn mezo_side_stream_end(device: c_int) -> *mut c_char;
        pub fn mezo_graph_pool(first: *mut u64, second: *mut u64) -> *mut c_char;
        pub fn mezo_graph_new(out: *mut *mut c_void) -> *mut c_char;
        pub fn mezo_graph_delete(g: *mut c_void);
        pub fn mezo_graph_capture_begin(g: *mut c_void, first: u64, second: u64) -> *mut c_char;
        pub fn mezo_graph_capture_end(g: *mut c_void) -> *mut c_char;
        pub fn mezo_graph_replay(g: *mut c_void) -> *mut c_char;
    }
}

/// Whether this build has CUDA graphs (libtorch with CUDA at build time) and `device` is CUDA.
pub fn supported(device: Device) -> bool {
    cfg!(mezo_cuda_graphs) && device.is_cuda()
}

#[cfg(mezo_cuda_graphs)]
fn check(e: *mut c_char, what: &str) -> Result<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated malloc'd string from the shim, freed once here.
    let msg = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
    unsafe { ffi::mezo_graph_free_error(e) };
    // libtorch's messages carry C++ frames after the first line; the first line says it.
    let first = msg.lines().next().unwrap_or("").to_string();
    Err(CoreError::Cuda(format!("{what}: {first}")))
}

#[cfg(not(mezo_cuda_graphs))]
fn unavailable<T>() -> Result<T> {
    Err(CoreError::Cuda("this build of mezo has no CUDA graphs (libtorch without CUDA at build time)".into()))
}

fn index(device: Device) -> Result<c_int> {
    match device {
        Device::Cuda(i) => Ok(i as c_int),
        d => Err(CoreError::Cuda(format!("CUDA graphs need a CUDA device, not {d:?}"))),
    }
}

/// libtorch's current stream on `device` (`cudaStream_t`): where its next kernel goes, and where
/// kernels of ours must go to stay ordered with it (and to be captured with it).
pub fn current_stream(device: Device) -> Result<*mut c_void> {
    let d = index(device)?;
    #[cfg(mezo_cuda_graphs)]
    {
        let mut s = std::ptr::null_mut();
        // SAFETY: the shim writes one pointer.
        check(unsafe { ffi::mezo_current_stream(d, &mut s) }, "current CUDA stream")?;
        Ok(s)
    }
    #[cfg(not(mezo_cuda_graphs))]
    {
        let _ = d;
        // The legacy default stream, libtorch's default when nothing else was made current.
        Ok(std::ptr::null_mut())
    }
}

/// A memory pool shared by graphs: their intermediate tensors reuse one another's memory, so
/// several batch shapes cost about one shape's activations. Sound as long as each replay's
/// outputs are read before the next replay of any graph of the pool (what [`Graph::replay`]'s
/// callers do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pool(u64, u64);

impl Pool {
    pub fn new() -> Result<Self> {
        #[cfg(mezo_cuda_graphs)]
        {
            let (mut a, mut b) = (0, 0);
            // SAFETY: the shim writes two integers.
            check(unsafe { ffi::mezo_graph_pool(&mut a, &mut b) }, "CUDA graph pool")?;
            Ok(Pool(a, b))
        }
        #[cfg(not(mezo_cuda_graphs))]
        unavailable()
    }
}

/// One captured graph.
pub struct Graph {
    raw: *mut c_void,
    device: Device,
}

// SAFETY: the graph object is only used through &self/&mut self; libtorch's CUDAGraph is usable
// from any thread (replay launches on that thread's current stream).
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        #[cfg(mezo_cuda_graphs)]
        // SAFETY: `raw` came from mezo_graph_new and is deleted once.
        unsafe {
            ffi::mezo_graph_delete(self.raw)
        };
    }
}

/// Restores the stream and device on every exit path of a capture.
#[cfg(mezo_cuda_graphs)]
struct SideStream(c_int);

#[cfg(mezo_cuda_graphs)]
impl SideStream {
    fn begin(d: c_int) -> Result<Self> {
        // SAFETY: plain calls into the shim.
        check(unsafe { ffi::mezo_side_stream_begin(d) }, "switching to a side CUDA stream")?;
        Ok(SideStream(d))
    }
}

#[cfg(mezo_cuda_graphs)]
impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: plain call into the shim; an error here leaves nothing to clean up.
        let _ = check(unsafe { ffi::mezo_side_stream_end(self.0) }, "restoring the CUDA stream");
    }
}

impl Graph {
    /// Runs `body` once eagerly on a side stream (warm-up: cuBLAS handles and workspaces, kernel
    /// modules), then captures a second run of it. Returns the graph and what the captured run
    /// returned: tensors that each [`Graph::replay`] overwrites. Nothing has been computed into
    /// them yet; replay to get values. A panic or error of `body` (for example an operation that
    /// synchronises with the host, which capture forbids) ends the capture and comes back as an
    /// error, leaving the streams as they were.
    pub fn capture<T, E: From<CoreError>>(
        device: Device,
        pool: Option<Pool>,
        mut body: impl FnMut() -> std::result::Result<T, E>,
    ) -> std::result::Result<(Self, T), E> {
        let d = index(device)?;
        #[cfg(mezo_cuda_graphs)]
        {
            let _side = SideStream::begin(d)?;
            let warm = catch_unwind(AssertUnwindSafe(&mut body));
            match warm {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(p) => {
                    return Err(CoreError::Cuda(format!("warm-up before capture: {}", panic_text(&p))).into())
                }
            }
            let mut raw = std::ptr::null_mut();
            // SAFETY: the shim writes one pointer.
            check(unsafe { ffi::mezo_graph_new(&mut raw) }, "creating a CUDA graph")?;
            let graph = Graph { raw, device };
            let Pool(a, b) = pool.unwrap_or_default();
            // SAFETY: a live graph; the side stream is current.
            check(unsafe { ffi::mezo_graph_capture_begin(graph.raw, a, b) }, "beginning CUDA graph capture")?;
            let out = catch_unwind(AssertUnwindSafe(&mut body));
            // SAFETY: ends the capture begun above, whatever `body` did.
            let ended = check(unsafe { ffi::mezo_graph_capture_end(graph.raw) }, "ending CUDA graph capture");
            let out = match out {
                Ok(r) => r?,
                Err(p) => {
                    return Err(
                        CoreError::Cuda(format!("during CUDA graph capture: {}", panic_text(&p))).into()
                    )
                }
            };
            ended?;
            Ok((graph, out))
        }
        #[cfg(not(mezo_cuda_graphs))]
        {
            let _ = (d, device, pool, &mut body);
            unavailable().map_err(E::from)
        }
    }

    /// Launches the captured kernels on the current stream (ordered with everything before).
    pub fn replay(&self) -> Result<()> {
        #[cfg(mezo_cuda_graphs)]
        {
            // SAFETY: a live, captured graph.
            check(unsafe { ffi::mezo_graph_replay(self.raw) }, "replaying a CUDA graph")
        }
        #[cfg(not(mezo_cuda_graphs))]
        unavailable()
    }

    pub fn device(&self) -> Device {
        self.device
    }
}

#[cfg(mezo_cuda_graphs)]
fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    let s = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    s.lines().next().unwrap_or("").to_string()
}
