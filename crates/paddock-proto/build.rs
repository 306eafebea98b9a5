//! Compiles `proto/` with protox (pure Rust), so building needs no `protoc`.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("paddock/worker/v1/worker.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root]).expect("proto/ must compile");
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .expect("generating the worker protocol");
}
