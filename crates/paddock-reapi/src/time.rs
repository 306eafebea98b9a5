//! Conversions between `std::time` and the protobuf well-known time types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto::protobuf;

pub fn timestamp(at: SystemTime) -> protobuf::Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    protobuf::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// Microseconds since the Unix epoch (0 before it), as Paddock's own protocols carry
/// times.
pub fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

/// The inverse of [`unix_micros`]; a negative value is the epoch.
pub fn from_unix_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64)
}

pub fn now() -> protobuf::Timestamp {
    timestamp(SystemTime::now())
}

/// The time a timestamp names; `None` before the epoch or out of range.
pub fn system_time(ts: &protobuf::Timestamp) -> Option<SystemTime> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(ts.seconds as u64, ts.nanos as u32))
}

/// A protobuf duration as a `std` one; `None` if it is negative or malformed.
pub fn duration(d: &protobuf::Duration) -> Option<Duration> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn proto_duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_reject_negative() {
        let d = Duration::from_millis(1500);
        assert_eq!(duration(&proto_duration(d)), Some(d));
        assert_eq!(
            duration(&protobuf::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert_eq!(
            duration(&protobuf::Duration {
                seconds: 1,
                nanos: -5
            }),
            None
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(system_time(&timestamp(t)), Some(t));
    }
}
