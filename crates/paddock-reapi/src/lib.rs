//! The Remote Execution API (REAPI v2) as Paddock reads it.
//!
//! This crate owns the vocabulary every other part shares: validated [`Digest`]s,
//! ByteStream resource names, the rules for paths inside an input root or among an
//! action's outputs, and the `google.rpc` details that REAPI clients expect. It holds no
//! I/O and no policy; the generated protocol types come from `bazel-remote-apis` and are
//! re-exported as [`proto`].

pub mod digest;
pub mod filter;
pub mod path;
pub mod resource;
pub mod status;
pub mod time;
pub mod tree;
pub mod validate;

pub use digest::{Digest, DigestError, DigestHasher};

/// The generated REAPI, ByteStream, longrunning and rpc types.
pub mod proto {
    pub use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    pub use bazel_remote_apis::build::bazel::semver;
    pub use bazel_remote_apis::google::bytestream;
    pub use bazel_remote_apis::google::longrunning;
    pub use bazel_remote_apis::google::protobuf;
    pub use bazel_remote_apis::google::rpc;
}

/// The oldest REAPI version Paddock speaks.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
/// The newest REAPI version Paddock implements in full.
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

/// The platform an action asks for, as (name, value) pairs: the Action's own (REAPI
/// 2.2+, which servers should prefer) or else the Command's (older clients).
#[allow(deprecated)] // Command.platform is how REAPI 2.0 and 2.1 clients send it.
pub fn platform(action: &proto::re::Action, command: &proto::re::Command) -> Vec<(String, String)> {
    action
        .platform
        .as_ref()
        .filter(|p| !p.properties.is_empty())
        .or(command.platform.as_ref())
        .map(|p| {
            p.properties
                .iter()
                .map(|prop| (prop.name.clone(), prop.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}
