//! Compiles `proto/ringtrain.proto` with the protoc shipped by `protoc-bin-vendored`, so
//! the build never depends on a protoc that happens to be installed.

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/ringtrain.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        // The descriptor set the coordinator serves through gRPC reflection.
        .file_descriptor_set_path(out.join("ringtrain_descriptor.bin"))
        .compile_protos(&["proto/ringtrain.proto"], &["proto"])?;
    Ok(())
}
