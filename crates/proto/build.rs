//! Generates the gRPC code and a file descriptor set (for server reflection) from proto/.
//! protoc comes from the protoc-bin-vendored crate, so a fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        root.join("tandem/v1/generation.proto"),
        root.join("tandem/shard/v1/shard.proto"),
        root.join("tandem/draft/v1/draft.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tandem_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
