//! Compiles `proto/bandshare/v1/*.proto` with protox (pure Rust, no system
//! `protoc`) and generates tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["common", "sharer", "requester", "health", "qos", "cluster"]
        .map(|f| root.join(format!("bandshare/v1/{f}.proto")));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
