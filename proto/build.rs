//! Compiles `proto/ringtrain.proto` with the protoc shipped by `protoc-bin-vendored`, so
//! the build never depends on a protoc that happens to be installed.

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/ringtrain.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/ringtrain.proto"], &["proto"])?;
    Ok(())
}
