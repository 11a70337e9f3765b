//! The pace of our own chat: a token bucket a little under the daemon's default chat
//! allowance (`[rate] chat_per_sec = 50`, `chat_burst = 100`), so that piped or pasted input
//! waits, in order, instead of being dropped by the daemon past its burst. Pure: the caller
//! passes the time and does the waiting.

use std::time::{Duration, Instant};

/// Chat messages per second, in the long run: under the daemon's default 50, so that jitter
/// on the way (two datagrams arriving closer together than they were sent) cannot put us
/// over it.
pub const CHAT_PER_SEC: f64 = 45.0;
/// Chat messages that may go at once after a quiet spell: under the daemon's default 100.
pub const CHAT_BURST: f64 = 90.0;

/// A token bucket: [`Pacer::take`] one token per chat message.
#[derive(Debug)]
pub struct Pacer {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// A full bucket at `now` holding `burst` tokens, refilled at `per_sec`.
    pub fn new(per_sec: f64, burst: f64, now: Instant) -> Pacer {
        Pacer {
            per_sec,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token at `now` if there is one; otherwise how long until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = self.at.max(now);
        // The slack absorbs rounding: waiting exactly as told must be enough.
        if self.tokens >= 1.0 - 1e-6 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_at_once_then_the_rate_holds() {
        let start = Instant::now();
        let mut pacer = Pacer::new(CHAT_PER_SEC, CHAT_BURST, start);
        for _ in 0..90 {
            assert_eq!(pacer.take(start), Ok(()));
        }
        let wait = pacer.take(start).expect_err("the burst is spent");
        assert!(
            (wait.as_secs_f64() - 1.0 / CHAT_PER_SEC).abs() < 1e-6,
            "{wait:?}"
        );
        // Waiting as told gives exactly one more.
        let later = start + wait;
        assert_eq!(pacer.take(later), Ok(()));
        assert!(pacer.take(later).is_err());
        // Over ten seconds: no more than the rate allows, whatever the asking.
        let mut sent = 0;
        let mut now = later;
        while now < later + Duration::from_secs(10) {
            match pacer.take(now) {
                Ok(()) => sent += 1,
                Err(wait) => now += wait,
            }
        }
        assert!((449..=451).contains(&sent), "{sent}");
    }

    /// Part of a token already refilled shortens the wait to what is missing.
    #[test]
    fn a_partly_refilled_bucket_tells_the_time_to_a_whole_token() {
        let start = Instant::now();
        let mut pacer = Pacer::new(CHAT_PER_SEC, 1.0, start);
        assert_eq!(pacer.take(start), Ok(()));
        let interval = Duration::from_secs_f64(1.0 / CHAT_PER_SEC);
        let quarter = pacer
            .take(start + interval / 4)
            .expect_err("a quarter token");
        let left = interval.as_secs_f64() * 0.75;
        assert!((quarter.as_secs_f64() - left).abs() < 1e-6, "{quarter:?}");
        assert_eq!(pacer.take(start + interval / 4 + quarter), Ok(()));
    }

    /// 99% of a token is not a token: the slack for rounding is a millionth, not a
    /// hundredth. (Hand mutant: the slack `1e-6` made `1e-2`.)
    #[test]
    fn most_of_a_token_is_not_enough() {
        let start = Instant::now();
        let mut pacer = Pacer::new(CHAT_PER_SEC, 1.0, start);
        assert_eq!(pacer.take(start), Ok(()));
        let interval = Duration::from_secs_f64(1.0 / CHAT_PER_SEC);
        let almost = start + interval.mul_f64(0.99);
        let wait = pacer.take(almost).expect_err("99% of a token");
        let left = interval.as_secs_f64() * 0.01;
        assert!((wait.as_secs_f64() - left).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn a_quiet_spell_refills_no_more_than_the_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(CHAT_PER_SEC, CHAT_BURST, start);
        let later = start + Duration::from_secs(3600);
        for _ in 0..90 {
            assert_eq!(pacer.take(later), Ok(()));
        }
        assert!(pacer.take(later).is_err());
    }
}
