//! Instance-name patterns: text in which `*` stands for any run of characters.

/// A pattern over instance names: `*` (every instance, the empty one included),
/// `team-*`, `*-release`, or a name to match exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        Pattern(text.to_owned())
    }

    pub fn any() -> Pattern {
        Pattern("*".into())
    }

    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty(); // no `*`: the whole name must match
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_match_any_run() {
        let cases = [
            ("*", "", true),
            ("*", "main", true),
            ("main", "main", true),
            ("main", "main2", false),
            ("", "", true),
            ("", "x", false),
            ("team-*", "team-a", true),
            ("team-*", "team-", true),
            ("team-*", "other", false),
            ("*-release", "x-release", true),
            ("*-release", "release", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-c", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(name),
                want,
                "{pattern} {name}"
            );
        }
    }
}
