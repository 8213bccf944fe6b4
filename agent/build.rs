//! Compiles `proto/vmmagent/v1/*.proto` with protox (pure Rust, so no system `protoc`), then generates
//! the prost messages and tonic client/server code, and writes the descriptor set that server
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "vmmagent/v1/vm.proto",
        "vmmagent/v1/host.proto",
        "vmmagent/v1/operations.proto",
        "vmmagent/v1/vm_resources.proto",
        "vmmagent/v1/snapshot.proto",
        "vmmagent/v1/snapshot_resources.proto",
        "vmmagent/v1/migration.proto",
        "vmmagent/v1/migration_resources.proto",
        "vmmagent/v1/image.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("vmmagent_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
