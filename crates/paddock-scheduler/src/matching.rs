//! Platform matching: which workers may run an action.
//!
//! An action's platform is a list of (name, value) requirements; a worker offers a
//! multimap of properties. Each name is matched by its policy: exact (the default),
//! minimum (numbers, sizes with units) or ignore.

use std::collections::{BTreeMap, BTreeSet};

use paddock_config::{ByteSize, MatchPolicy};

/// The properties a worker offers; a name may carry several values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer(BTreeMap<String, BTreeSet<String>>);

impl Offer {
    pub fn new(properties: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, value) in properties {
            map.entry(name).or_default().insert(value);
        }
        Offer(map)
    }

    pub fn values(&self, name: &str) -> impl Iterator<Item = &String> {
        self.0.get(name).into_iter().flatten()
    }

    /// Every property offered, as (name, value) pairs in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |v| (name, v)))
    }
}

impl std::fmt::Display for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (name, values) in &self.0 {
            for value in values {
                if !first {
                    write!(f, ", ")?;
                }
                write!(f, "{name}={value}")?;
                first = false;
            }
        }
        if first {
            write!(f, "(nothing)")?;
        }
        Ok(())
    }
}

/// Properties that name something a worker's root-filesystem resolver provides (not
/// a property to match), and the worker property that says the worker has one.
/// `sandbox` is what container workers offer: they mount the input root where the
/// action asks and check its toolchain manifest.
const RESOLVED: &[(&str, &str)] = &[
    ("nix-store-paths", "nix"),
    ("container-image", "oci"),
    ("input-root-path", "sandbox"),
    ("toolchain-manifest", "sandbox"),
];

/// The matching policy of every property name.
#[derive(Debug, Clone)]
pub struct Policies {
    overrides: BTreeMap<String, MatchPolicy>,
}

impl Policies {
    pub fn new(overrides: BTreeMap<String, MatchPolicy>) -> Self {
        Policies { overrides }
    }

    pub fn of(&self, name: &str) -> MatchPolicy {
        if let Some(p) = self.overrides.get(name) {
            return *p;
        }
        match name {
            "cores" | "memory" => MatchPolicy::Minimum,
            "pids" => MatchPolicy::Ignore,
            _ => MatchPolicy::Exact,
        }
    }

    /// Checks that every property matched as a minimum holds a number or a size.
    pub fn check(&self, platform: &[(String, String)]) -> Result<(), String> {
        for (name, value) in platform {
            if self.of(name) == MatchPolicy::Minimum && quantity(value).is_none() {
                return Err(format!(
                    "platform property {name}={value:?} must be a number or a size such as 2GiB"
                ));
            }
        }
        Ok(())
    }

    /// Whether `offer` satisfies every requirement in `platform`.
    pub fn satisfies(&self, offer: &Offer, platform: &[(String, String)]) -> bool {
        platform
            .iter()
            .all(|(name, wanted)| self.satisfies_one(offer, name, wanted))
    }

    /// The requirements `offer` does not meet, for messages.
    pub fn unmet<'a>(
        &self,
        offer: &Offer,
        platform: &'a [(String, String)],
    ) -> Vec<&'a (String, String)> {
        platform
            .iter()
            .filter(|(name, wanted)| !self.satisfies_one(offer, name, wanted))
            .collect()
    }

    fn satisfies_one(&self, offer: &Offer, name: &str, wanted: &str) -> bool {
        if let Some((_, capability)) = RESOLVED.iter().find(|(key, _)| *key == name) {
            return offer.values(capability).next().is_some();
        }
        match self.of(name) {
            MatchPolicy::Ignore => true,
            MatchPolicy::Exact => offer.values(name).any(|v| v == wanted),
            MatchPolicy::Minimum => match quantity(wanted) {
                Some(needed) => offer
                    .values(name)
                    .filter_map(|v| quantity(v))
                    .any(|have| have >= needed),
                None => false,
            },
        }
    }
}

/// A number, or a size with a unit (`2GiB`), as a comparable quantity.
fn quantity(text: &str) -> Option<u128> {
    if let Ok(n) = text.trim().parse::<u128>() {
        return Some(n);
    }
    text.parse::<ByteSize>().ok().map(|b| b.bytes() as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn offer(pairs: &[(&str, &str)]) -> Offer {
        Offer::new(platform(pairs))
    }

    #[test]
    fn exact_minimum_and_ignore() {
        let policies = Policies::new(BTreeMap::new());
        let worker = offer(&[
            ("OSFamily", "Linux"),
            ("Pool", "a"),
            ("Pool", "b"),
            ("cores", "8"),
            ("memory", "16GiB"),
        ]);
        assert!(policies.satisfies(&worker, &platform(&[("OSFamily", "Linux")])));
        assert!(policies.satisfies(&worker, &platform(&[("Pool", "b"), ("cores", "4")])));
        assert!(policies.satisfies(&worker, &platform(&[("memory", "2GiB"), ("pids", "100")])));
        assert!(!policies.satisfies(&worker, &platform(&[("cores", "16")])));
        assert!(!policies.satisfies(&worker, &platform(&[("Pool", "c")])));
        assert!(!policies.satisfies(&worker, &platform(&[("gpu", "yes")])));
        assert!(!policies.satisfies(&worker, &platform(&[("cores", "lots")])));
        assert!(policies.satisfies(&worker, &[]));
        assert_eq!(
            policies.unmet(&worker, &platform(&[("cores", "16"), ("Pool", "a")])),
            vec![&("cores".to_string(), "16".to_string())]
        );
    }

    #[test]
    fn resolved_properties_need_the_capability_only() {
        let policies = Policies::new(BTreeMap::new());
        let store = platform(&[("nix-store-paths", "/nix/store/anything")]);
        assert!(policies.satisfies(&offer(&[("nix", "2")]), &store));
        assert!(!policies.satisfies(&offer(&[("OSFamily", "Linux")]), &store));
    }

    #[test]
    fn overrides_win() {
        let policies = Policies::new(BTreeMap::from([("gpu".to_string(), MatchPolicy::Ignore)]));
        assert!(policies.satisfies(&offer(&[]), &platform(&[("gpu", "yes")])));
    }
}
