//! When the writer tries again to lay down the journal's space ahead after a failure: at
//! doubling intervals from [`FIRST_DELAY`] up to [`MAX_DELAY`], or sooner once the file system
//! has the room a lay needs. The space ahead only spares each append a size update, so a full
//! disk is no reason to write a megabyte at it, and log a line, every second; and appends
//! never wait for it. A schedule only: the writer brings the clock and the free space, so the
//! tests bring their own.

use std::time::{Duration, Instant};

use crate::plural::Count;

/// The wait after a run's first failure; each failure after it doubles the wait.
pub(super) const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
pub(super) const MAX_DELAY: Duration = Duration::from_secs(60);
/// How often at most the file system's free space is asked while a lay waits for room.
pub(super) const FREE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The failures to lay down the space ahead since the last lay that worked.
#[derive(Debug, Default)]
pub(super) struct LayBackoff {
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    /// When its first failure came.
    since: Instant,
    /// Failures in a row.
    failures: u32,
    /// No try before this, unless the file system has room again.
    next_try: Instant,
    /// The last failure came with less free space than a lay needs (a full disk): room
    /// freed since is worth a try at once. Not so for a failure with room to spare (a quota,
    /// an I/O error), which only the schedule retries.
    short_of_room: bool,
    /// When the free space was last asked.
    free_checked_at: Instant,
}

impl LayBackoff {
    /// Whether a lay of `needed` bytes is to be tried at `now`: always when none failed, else
    /// once the wait is over, or when the last failure was for want of room and `free` (asked
    /// at most every [`FREE_CHECK_INTERVAL`]) now says there is room for `needed`.
    pub(super) fn due(
        &mut self,
        now: Instant,
        needed: u64,
        free: impl FnOnce() -> Option<u64>,
    ) -> bool {
        let Some(run) = &mut self.run else {
            return true;
        };
        if now >= run.next_try {
            return true;
        }
        if !run.short_of_room
            || now.saturating_duration_since(run.free_checked_at) < FREE_CHECK_INTERVAL
        {
            return false;
        }
        run.free_checked_at = now;
        free().is_some_and(|bytes| bytes >= needed)
    }

    /// Counts a failed lay at `now`; `short_of_room` says whether the file system then had
    /// less free space than a lay needs. Returns whether it is the first of its run (the one
    /// to log) and the wait before the next try.
    pub(super) fn failed(&mut self, now: Instant, short_of_room: bool) -> (bool, Duration) {
        let first = self.run.is_none();
        let run = self.run.get_or_insert(Run {
            since: now,
            failures: 0,
            next_try: now,
            short_of_room,
            free_checked_at: now,
        });
        run.failures = run.failures.saturating_add(1);
        // 1 s, 2 s, 4 s, … : the shift stops well before the cap could overflow.
        let delay = FIRST_DELAY
            .saturating_mul(1 << (run.failures - 1).min(16))
            .min(MAX_DELAY);
        run.next_try = now + delay;
        run.short_of_room = short_of_room;
        run.free_checked_at = now;
        (first, delay)
    }

    /// A lay worked at `now`: ends the run, and returns its tally if there was one.
    pub(super) fn succeeded(&mut self, now: Instant) -> Option<String> {
        let run = self.run.take()?;
        Some(format!(
            "{} over {} s",
            Count(run.failures as usize, "failed attempt"),
            now.saturating_duration_since(run.since).as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tries double their spacing up to a minute; a lay that works ends the run, and the next
    /// failure starts again from a second.
    #[test]
    fn tries_double_their_spacing_up_to_a_minute_and_a_success_starts_afresh() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut backoff = LayBackoff::default();
        let never = || -> Option<u64> { panic!("free space asked without a shortage") };
        assert!(backoff.due(at(0), 10, never));
        let delays: Vec<u64> = (0..9)
            .map(|i| backoff.failed(at(i), false))
            .map(|(first, delay)| {
                assert_eq!(first, delay == FIRST_DELAY, "only the first of the run");
                delay.as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(
            !backoff.due(at(67), 10, never),
            "not before the wait is over"
        );
        assert!(backoff.due(at(68), 10, never));
        assert_eq!(
            backoff.succeeded(at(70)).as_deref(),
            Some("9 failed attempts over 70 s")
        );
        assert_eq!(backoff.succeeded(at(71)), None, "ended once");
        assert_eq!(backoff.failed(at(72), false), (true, FIRST_DELAY));
    }

    /// After a failure for want of room, the free space is asked at most once a second, and
    /// room for the lay makes it due at once.
    #[test]
    fn room_freed_after_a_full_disk_makes_a_lay_due_before_its_wait_is_over() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut backoff = LayBackoff::default();
        for _ in 0..6 {
            let _ = backoff.failed(at(0), true);
        }
        let mut asked = 0;
        let mut free = |bytes: u64| {
            asked += 1;
            Some(bytes)
        };
        assert!(!backoff.due(at(500), 10, || free(100)), "asked too soon");
        assert!(!backoff.due(at(1000), 10, || free(9)), "still short");
        assert!(!backoff.due(at(1500), 10, || free(100)), "asked too soon");
        assert!(backoff.due(at(2000), 10, || free(10)), "room again");
        assert_eq!(asked, 2);
    }
}
