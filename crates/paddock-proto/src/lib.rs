//! Paddock's own protocols, generated from `proto/` at build time.
//!
//! `worker::v1` is the scheduler-worker protocol (see
//! `proto/paddock/worker/v1/worker.proto` for its rules); `execution::v1` holds the
//! messages Paddock adds to REAPI results, such as `ResourceUsage`; `admin::v1` is
//! the operators' protocol (workers, their health, cache invalidation).
//! `google::devtools::build::v1` is the Build Event Service and `build_event_stream`
//! Bazel's build events in it: subsets of the upstream protocols with their field
//! numbers (see `proto/README.md`).

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("paddock.worker.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("paddock.admin.v1");
    }
}

pub mod execution {
    pub mod v1 {
        tonic::include_proto!("paddock.execution.v1");

        /// The full name `ResourceUsage` is packed under in an `Any`.
        pub const RESOURCE_USAGE: &str = "paddock.execution.v1.ResourceUsage";
    }
}

pub mod google {
    pub mod devtools {
        pub mod build {
            pub mod v1 {
                tonic::include_proto!("google.devtools.build.v1");
            }
        }
    }
}

pub mod build_event_stream {
    tonic::include_proto!("build_event_stream");

    /// The full name Bazel packs its events under in the envelope's `Any`.
    pub const BUILD_EVENT: &str = "build_event_stream.BuildEvent";
}
