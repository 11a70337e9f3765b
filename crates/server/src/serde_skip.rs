//! Defaults and skips for the optional fields of the state file and the journal's records:
//! a field at its default is left out when written and taken back when read, so files stay
//! as short as the original's and records written before a field existed still load.

/// `true`, for a field that is on unless the file says otherwise (`#[serde(default = …)]`).
pub(crate) fn yes() -> bool {
    true
}

/// Whether a flag is on: with [`yes`] as its default, only `false` is written.
pub(crate) fn is_true(v: &bool) -> bool {
    *v
}

/// Whether a value is its type's default (0 for numbers), which is then not written.
pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_values_away_from_their_default_are_written() {
        assert!(yes());
        assert!(is_true(&yes()), "the default is skipped");
        assert!(!is_true(&false));
        assert!(is_default(&0u8) && is_default(&0u64));
        assert!(!is_default(&1u8) && !is_default(&u64::MAX));
    }
}
