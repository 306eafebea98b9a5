//! Durations written for people: `250ms`, `30s`, `10m`, `4h`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

const UNITS: &[(&str, u64)] = &[("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)];

impl Span {
    pub const fn secs(n: u64) -> Self {
        Span(Duration::from_secs(n))
    }

    pub const fn millis(n: u64) -> Self {
        Span(Duration::from_millis(n))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let millis_per = UNITS
            .iter()
            .find(|(u, _)| *u == unit.trim())
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!("{s:?} is not a duration: write a whole number and a unit (ms, s, m, h)")
            })?;
        let value: u64 = number.parse().map_err(|_| {
            format!("{s:?} is not a duration: write a whole number and a unit (ms, s, m, h)")
        })?;
        value
            .checked_mul(millis_per)
            .map(|ms| Span(Duration::from_millis(ms)))
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis() as u64;
        for (unit, m) in UNITS.iter().rev() {
            if ms >= *m && ms.is_multiple_of(*m) {
                return write!(f, "{}{unit}", ms / m);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("30s".parse::<Span>().unwrap(), Span::secs(30));
        assert_eq!("250ms".parse::<Span>().unwrap(), Span::millis(250));
        assert_eq!("4h".parse::<Span>().unwrap(), Span::secs(4 * 3600));
        assert!("30".parse::<Span>().is_err());
        assert!("1.5s".parse::<Span>().is_err());
        assert_eq!(Span::secs(600).to_string(), "10m");
        assert_eq!(Span::millis(1500).to_string(), "1500ms");
    }
}
