// Generates the gRPC code from ../../proto into OUT_DIR (never committed). protoc comes from the
// protoc-bin-vendored crate, so building needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a build script compiled for a clone at another path
    // (CI clones afresh but shares the cargo target dir) must look at this clone's protos.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos: Vec<_> =
        ["run.proto", "mezo.proto", "worker.proto"].iter().map(|f| root.join("mezo/v1").join(f)).collect();
    // Relative to this package (cargo resolves them so): an absolute path would tie the cached
    // build to whichever clone built it first, since clones share the target dir.
    for f in ["run.proto", "mezo.proto", "worker.proto"] {
        println!("cargo:rerun-if-changed=../../proto/mezo/v1/{f}");
    }
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure()
        .file_descriptor_set_path(
            std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("mezo_descriptor.bin"),
        )
        .compile_protos(&protos, &[root])?;
    Ok(())
}
