//! Generates the replica-to-replica gRPC service (client and server) from
//! `proto/clustermesh/raft/v1/raft.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/clustermesh/raft/v1/raft.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
