// Shared by the build scripts of the crates whose binaries or tests use libtorch's CUDA
// (`include!`d, since build scripts cannot depend on workspace crates without a build-time crate).
//
// Debian's linker drops libtorch_cuda.so with --as-needed, because nothing references its symbols
// directly: CUDA then reports as unavailable at run time. Linking it explicitly keeps it, when this
// libtorch has it (a CPU-only libtorch does not). The venv's libtorch is not on the loader's path
// either: the rpath lets the binaries run without LD_LIBRARY_PATH on the machine that built them
// (elsewhere, set LD_LIBRARY_PATH). Link args apply to the crate's own binaries and tests only.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let Some(lib_dir) = torch_lib_dir() else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
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
        .args(["-c", "import torch, os; print(os.path.dirname(torch.__file__))"])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(std::path::Path::new(dir.trim()).join("lib"))
}
