//! Nix store paths, parsed strictly.

use std::fmt;

/// The alphabet of Nix's base-32 hashes (no e, o, u or t).
const NIX_BASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
const STORE: &str = "/nix/store/";

/// A validated top-level store path: `/nix/store/<32 base-32 chars>-<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(String);

impl StorePath {
    pub fn parse(text: &str) -> Result<StorePath, String> {
        let base = text
            .strip_prefix(STORE)
            .ok_or_else(|| format!("{text:?} is not in /nix/store"))?;
        if base.contains('/') {
            return Err(format!(
                "{text:?} names something inside a store path; name the store path itself"
            ));
        }
        let (hash, name) = base
            .split_once('-')
            .ok_or_else(|| format!("{text:?} has no name after its hash"))?;
        if hash.len() != 32 || !hash.chars().all(|c| NIX_BASE32.contains(c)) {
            return Err(format!(
                "{text:?} does not start with a 32-character Nix hash"
            ));
        }
        let name_ok = !name.is_empty()
            && name.len() <= 211
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c));
        if !name_ok {
            return Err(format!("{text:?} has an invalid name"));
        }
        Ok(StorePath(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after `/nix/store/`.
    pub fn base_name(&self) -> &str {
        &self.0[STORE.len()..]
    }

    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits a `nix-store-paths` property value (whitespace or comma separated) and
/// validates every path; the result is sorted and deduplicated.
pub fn parse_list(value: &str) -> Result<Vec<StorePath>, String> {
    let mut paths = value
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(StorePath::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if paths.is_empty() {
        return Err("nix-store-paths names no store path".into());
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_store_paths_and_nothing_else() {
        let good = "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-bb";
        assert_eq!(
            StorePath::parse(good).unwrap().base_name(),
            "27b0z5an29ndfx9iahixxs8rpqq0hx3s-bb"
        );
        for bad in [
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-bb/bin/sh",
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s",
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3e-bb",
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3-bb",
            "/nix/store/../etc",
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-..",
            "/usr/bin",
            "nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-bb",
            "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-b b",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_split_on_spaces_and_commas() {
        let a = "/nix/store/27b0z5an29ndfx9iahixxs8rpqq0hx3s-bb";
        let b = "/nix/store/ic9jz8b59b91x9lag1zs14dak85x4vzw-tools";
        let list = parse_list(&format!("{b}, {a}\n{a}")).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].as_str(), a);
        assert!(parse_list(" , ").is_err());
    }
}
