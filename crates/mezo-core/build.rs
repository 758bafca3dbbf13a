// For the CUDA test (`cuda_bits_equal_cpu_bits`) only: Debian's linker drops libtorch_cuda.so
// with --as-needed, since nothing references its symbols directly, and CUDA then reports as
// unavailable. Linking it explicitly keeps it, when this libtorch has it (a CPU-only one does not).
// Link args of a library apply to its own test binaries, never to crates that depend on it.
// Same logic as crates/mezo-cli/build.rs.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let Some(lib_dir) = torch_lib_dir() else {
        return;
    };
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

fn torch_lib_dir() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(std::path::Path::new(&dir).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(std::path::Path::new(dir.trim()).join("lib"))
}
