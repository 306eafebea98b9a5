//! Paddock's web pages, served on the HTTP port that also serves `/metrics`: the
//! overview of the farm, invocations and their actions (with why an action missed the
//! cache), workers with their health and the operators' orders, and a CAS browser.
//!
//! Pages are rendered on the server from templates compiled into the binary (`maud`),
//! with no script. Who may see what follows the identity's grants
//! (`paddock-auth`): a browser signs in with a token, kept in an HttpOnly,
//! SameSite=Strict cookie, or presents a client certificate over TLS. Forms that
//! change anything carry a token bound to the browser's cookie. With no `[auth]`
//! configured, pages are open to loopback callers only, unless
//! `auth.allow_anonymous` says the network is trusted.
//!
//! The crate reads the farm (`paddock-history`, the scheduler's reports, the CAS) and
//! gives orders only through the scheduler's own operator interface.

mod blob;
mod chart;
mod explain;
mod http;
mod pages;
mod watch;

use std::sync::Arc;

use paddock_auth::Authenticator;
use paddock_cas::BlobStore;
use paddock_history::History;
use paddock_scheduler::Scheduler;
use tokio::sync::Semaphore;

pub use http::serve;
pub use watch::watch;

/// What the pages read and who may read them.
pub struct Web {
    history: Arc<History>,
    scheduler: Scheduler,
    cas: Arc<dyn BlobStore>,
    authenticator: Arc<Authenticator>,
    /// Serve pages to anonymous callers beyond loopback (`auth.allow_anonymous`).
    anonymous_anywhere: bool,
    /// The gRPC address clients use, for the `paddock exec` line of an action.
    grpc_url: String,
    /// Binds the forms' anti-forgery tokens to this process.
    secret: [u8; 32],
    /// Cache-miss explanations computed at once (each reads the CAS).
    explaining: Semaphore,
    /// Blob downloads served at once (each held in memory whole).
    downloading: Semaphore,
}

impl Web {
    pub fn new(
        history: Arc<History>,
        scheduler: Scheduler,
        cas: Arc<dyn BlobStore>,
        authenticator: Arc<Authenticator>,
        anonymous_anywhere: bool,
        grpc_url: String,
    ) -> Web {
        Web {
            history,
            scheduler,
            cas,
            authenticator,
            anonymous_anywhere,
            grpc_url,
            secret: rand::random(),
            explaining: Semaphore::new(2),
            downloading: Semaphore::new(4),
        }
    }

    /// The history the pages read, for whoever fills it.
    pub fn history(&self) -> Arc<History> {
        self.history.clone()
    }
}
