//! Generates the prost messages and the tonic `MeshApi` client/server from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/clustermesh/v1/records.proto",
        "proto/clustermesh/v1/mesh_api.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Watch payloads are forwarded from the server's cache without copying.
        .bytes(".clustermesh.v1.Upsert.value")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
