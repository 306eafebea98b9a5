//! Compiles `proto/` with protox (pure Rust), so building needs no `protoc`.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("paddock/worker/v1/worker.proto"),
        root.join("paddock/execution/v1/resource_usage.proto"),
        root.join("paddock/admin/v1/admin.proto"),
        root.join("google/devtools/build/v1/publish_build_event.proto"),
        root.join("build_event_stream/build_event_stream.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("google/devtools/build/v1/build_events.proto")
            .display()
    );
    let descriptors = protox::compile(&files, [&root]).expect("proto/ must compile");
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .expect("generating Paddock's protocols");
}
