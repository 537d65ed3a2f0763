//! Compiles the workspace's `proto/externalscaler.proto` (KEDA's contract) with protox.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO_DIR: &str = "../proto";
    const PROTO: &str = "../proto/externalscaler.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], [PROTO_DIR])?;
    // The server side is generated too, so tests can stand up a scripted scaler.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
