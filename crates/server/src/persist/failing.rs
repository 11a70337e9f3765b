//! Failures that last, logged without flooding the log: the first of a run, a reminder with
//! the tally once a minute while it lasts, and its end once. The writer and the compactor
//! retry their writes every second through a full disk or a failing one.

use std::time::{Duration, Instant};

use crate::plural::Count;

/// How often a failure that lasts is logged again: a full disk retried every second would
/// otherwise log a line a second for as long as it lasts.
pub(super) const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One kind of write failure retried every second, logged without flooding the log: the
/// first failure of a run, then at most one line every [`FAILURE_LOG_INTERVAL`] while it
/// lasts, each with the tally so far; and the end of the run, once.
#[derive(Debug, Default)]
pub(super) struct Failing {
    /// The run: when its first failure came, its failures, and when one was last logged.
    run: Option<(Instant, u64, Instant)>,
}

impl Failing {
    /// Counts a failure at `now`. Returns what to add to its log line ("" for the first of
    /// a run, the tally for a reminder), or `None` when it is not to be logged.
    pub(super) fn failed(&mut self, now: Instant) -> Option<String> {
        let Some((since, tries, logged)) = &mut self.run else {
            self.run = Some((now, 1, now));
            return Some(String::new());
        };
        *tries += 1;
        if now.saturating_duration_since(*logged) < FAILURE_LOG_INTERVAL {
            return None;
        }
        *logged = now;
        Some(format!(
            " (still failing: {} over {} s)",
            Count(*tries as usize, "failed attempt"),
            now.saturating_duration_since(*since).as_secs()
        ))
    }

    /// The run ended at `now` (the write worked): returns its tally, if there was one.
    pub(super) fn ended(&mut self, now: Instant) -> Option<String> {
        let (since, tries, _) = self.run.take()?;
        Some(format!(
            "{} over {} s",
            Count(tries as usize, "failed attempt"),
            now.saturating_duration_since(since).as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure retried every second is logged at its first try, then once every
    /// [`FAILURE_LOG_INTERVAL`] with the tally, and its end once; a new run starts afresh.
    #[test]
    fn a_lasting_failure_is_logged_at_first_then_once_a_minute_and_at_its_end() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut failing = Failing::default();
        assert_eq!(failing.ended(at(0)), None, "no run, no end");
        assert_eq!(failing.failed(at(0)), Some(String::new()));
        for second in 1..60 {
            assert_eq!(failing.failed(at(second)), None, "second {second}");
        }
        assert_eq!(
            failing.failed(at(60)),
            Some(" (still failing: 61 failed attempts over 60 s)".to_owned())
        );
        assert_eq!(failing.failed(at(61)), None);
        assert_eq!(
            failing.ended(at(62)),
            Some("62 failed attempts over 62 s".to_owned())
        );
        assert_eq!(failing.ended(at(63)), None, "ended once");
        assert_eq!(failing.failed(at(64)), Some(String::new()), "a new run");
        assert_eq!(
            failing.ended(at(64)),
            Some("1 failed attempt over 0 s".to_owned())
        );
    }
}
