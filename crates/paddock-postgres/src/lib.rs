//! Paddock's state in PostgreSQL, for servers that share it: the connection pool and
//! the schema (migrations embedded in the binary, applied at start-up, and a refusal
//! to run against a schema newer than the binary), the ActionCache
//! ([`PgActionCache`], hash-partitioned by action digest) and the workers' health
//! records and name bindings ([`PgRecords`]), the queue servers share
//! ([`PgQueue`]: executions, operations, invocations), and the index of blobs in
//! the object store ([`PgBlobIndex`]), and the history of recent builds that the
//! web pages show ([`PgHistory`]).
//!
//! TLS to the database is rustls, checked against `state.tls_ca_file` or the
//! system's roots. Every statement runs within `state.statement_timeout`; a database that cannot be
//! reached makes calls fail with UNAVAILABLE (clients retry), is reported in logs and
//! in `paddock_database_up`, and is used again as soon as it answers.

mod action_cache;
mod cas_filter;
mod cas_fresh;
mod cas_index;
mod database;
mod history;
mod queue;
mod records;
mod tls;

pub use action_cache::PgActionCache;
pub use cas_index::PgBlobIndex;
pub use database::{maintain, Database, DatabaseError};
pub use history::PgHistory;
pub use queue::{PgQueue, QueueSettings};
pub use records::PgRecords;
