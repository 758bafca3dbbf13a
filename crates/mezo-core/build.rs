include!("../torch_link.rs");

fn main() {
    link_libtorch();
    build_ops_shim();
    build_graph_shim();
}

/// Compiles `csrc/ops.cpp` (operators tch does not bind as mezo needs them; see that file) when
/// libtorch's headers are found, setting the `mezo_ops` cfg; without it `ops` falls back to
/// tch's unfused operators, with one kernel more each.
fn build_ops_shim() {
    println!("cargo::rustc-check-cfg=cfg(mezo_ops)");
    println!("cargo:rerun-if-changed=csrc/ops.cpp");
    let Some(lib) = torch_lib_dir() else { return };
    let Some(torch) = lib.parent().map(std::path::Path::to_path_buf) else { return };
    if !torch.join("include/ATen/ATen.h").exists() {
        return;
    }
    shim(&torch).file("csrc/ops.cpp").compile("mezo_ops");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-cfg=mezo_ops");
}

/// Compiles `csrc/graph.cpp`, the C++ shim over libtorch's CUDA graphs, when this libtorch has
/// CUDA (libtorch_cuda.so and the CUDA runtime headers its pip wheel ships); sets the
/// `mezo_cuda_graphs` cfg then. Without it mezo builds and runs the same, every step eager.
fn build_graph_shim() {
    println!("cargo::rustc-check-cfg=cfg(mezo_cuda_graphs)");
    println!("cargo:rerun-if-changed=csrc/graph.cpp");
    println!("cargo:rerun-if-env-changed=MEZO_NO_CUDA_GRAPHS");
    if std::env::var_os("MEZO_NO_CUDA_GRAPHS").is_some() {
        return;
    }
    let Some(lib) = torch_lib_dir() else { return };
    let torch = lib.parent().expect("torch/lib has a parent").to_path_buf();
    if !lib.join("libtorch_cuda.so").exists() || !lib.join("libc10_cuda.so").exists() {
        return;
    }
    // pip's CUDA wheels: site-packages/nvidia/cu13/include (CUDA 13) or cuda_runtime/include (12).
    let nvidia = torch.parent().expect("site-packages").join("nvidia");
    let cuda_include = ["cu13/include", "cuda_runtime/include"]
        .iter()
        .map(|p| nvidia.join(p))
        .chain(std::env::var_os("CUDA_HOME").map(|h| std::path::Path::new(&h).join("include")))
        .chain([std::path::PathBuf::from("/usr/local/cuda/include")])
        .find(|p| p.join("cuda_runtime_api.h").exists());
    let Some(cuda_include) = cuda_include else {
        println!("cargo:warning=no CUDA runtime headers beside libtorch: building without CUDA graphs");
        return;
    };
    // The runtime wheel leaves out the compiler's crt/ headers that cuda_runtime.h includes; the
    // triton wheel (a dependency of torch's CUDA wheels) ships them.
    let crt =
        [cuda_include.clone(), torch.parent().expect("site-packages").join("triton/backends/nvidia/include")]
            .into_iter()
            .find(|p| p.join("crt/host_config.h").exists());
    let Some(crt) = crt else {
        println!("cargo:warning=no CUDA crt/ headers beside libtorch: building without CUDA graphs");
        return;
    };
    shim(&torch).include(&cuda_include).include(&crt).file("csrc/graph.cpp").compile("mezo_graph");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-cfg=mezo_cuda_graphs");
}

/// A C++ build against libtorch's headers, with the C++ ABI libtorch was built with.
fn shim(torch: &std::path::Path) -> cc::Build {
    println!("cargo:rerun-if-changed=csrc/try.h");
    let abi = python_value("import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))").unwrap_or("1".into());
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT");
    b
}

fn python_value(code: &str) -> Option<String> {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python).args(["-c", code]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
