//! Compiles `proto/qit/v1/broker.proto` (and the cluster's internal
//! `proto/qit/cluster/v1/cluster.proto`) with the protoc shipped by `protoc-bin-vendored`,
//! so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // `bytes` fields as `Bytes`: message bodies are shared with the request buffer instead
    // of copied into a `Vec` and again into the stored record.
    config.bytes(["."]);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("qit_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/qit/v1/broker.proto",
                "proto/qit/cluster/v1/cluster.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
