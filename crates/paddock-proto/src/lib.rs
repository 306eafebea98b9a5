//! Paddock's own protocols, generated from `proto/` at build time.
//!
//! `worker::v1` is the scheduler-worker protocol (see
//! `proto/paddock/worker/v1/worker.proto` for its rules); `execution::v1` holds the
//! messages Paddock adds to REAPI results, such as `ResourceUsage`; `admin::v1` is
//! the operators' protocol (workers, their health, cache invalidation).

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
