//! Generates the `cascade.v1` gRPC code and the descriptor set served by reflection.
//! protoc comes from `protoc-bin-vendored`, so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut prost = tonic_prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // An image's bytes are taken as a slice of the received message, not copied out of it.
    prost.bytes([".cascade.v1.Image.data"]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cascade_v1_descriptor.bin"))
        .compile_with_config(prost, &["proto/cascade/v1/router.proto"], &["proto"])?;
    Ok(())
}
