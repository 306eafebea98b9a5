//! Paddock's own protocols, generated from `proto/` at build time.
//!
//! `worker::v1` is the scheduler-worker protocol: see
//! `proto/paddock/worker/v1/worker.proto` for its rules.

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("paddock.worker.v1");
    }
}
