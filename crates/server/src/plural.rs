//! Counts in log lines: `1 room`, `2 rooms`.

use std::fmt;

/// `count` of `noun` (singular), written with the noun's plural but for one: English nouns
/// that take an `s`, which is every noun the daemon counts.
#[derive(Debug, Clone, Copy)]
pub struct Count<'a>(pub usize, pub &'a str);

impl fmt::Display for Count<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Count(n, noun) = *self;
        write!(f, "{n} {noun}{}", if n == 1 { "" } else { "s" })
    }
}

#[cfg(test)]
mod tests {
    use super::Count;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(Count(0, "room").to_string(), "0 rooms");
        assert_eq!(Count(1, "room").to_string(), "1 room");
        assert_eq!(Count(2, "journal record").to_string(), "2 journal records");
    }
}
