//! A REAPI client, for Paddock's command line, its workers, its tests and its
//! benchmarks. It speaks only the public protocol, so everything here works against
//! any REAPI server, not just Paddock.

pub mod bench;
pub mod exec;
mod remote;
mod transport;
pub mod tree;

pub use remote::{hash_file, ClientError, Remote, Source};
pub use transport::{endpoint, Credentials, LocalServer, Transport};
