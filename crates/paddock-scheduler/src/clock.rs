//! Where the scheduler's time comes from: the system's clocks in a server, one a
//! test moves by hand in the scheduler's unit tests, so that timeouts, leases,
//! cooldowns and retention are tested in microseconds, without sleeping.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Monotonic time for deadlines and wall time for what is shown or saved.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn wall(&self) -> SystemTime;
}

pub type SharedClock = Arc<dyn Clock>;

/// The system's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
pub use manual::ManualClock;

#[cfg(test)]
mod manual {
    use super::Clock;
    use std::time::{Duration, Instant, SystemTime};

    /// A clock that stands still until a test moves it.
    pub struct ManualClock {
        start: Instant,
        wall: SystemTime,
        elapsed: parking_lot::Mutex<Duration>,
    }

    impl ManualClock {
        pub fn new() -> ManualClock {
            ManualClock {
                start: Instant::now(),
                wall: SystemTime::now(),
                elapsed: Default::default(),
            }
        }

        pub fn advance(&self, by: Duration) {
            *self.elapsed.lock() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            self.start + *self.elapsed.lock()
        }

        fn wall(&self) -> SystemTime {
            self.wall + *self.elapsed.lock()
        }
    }
}
