//! Generates the `cascade.v1` client (and, for the bare baseline, server) from the product's
//! proto file, so the tools speak exactly the product's contract without linking the product.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/cascade/v1/router.proto");
    let mut prost = tonic_prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        prost,
        &["../proto/cascade/v1/router.proto"],
        &["../proto"],
    )?;
    Ok(())
}
