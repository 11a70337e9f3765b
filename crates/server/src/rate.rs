//! Token-bucket rate limits: one bucket per member for chat (and for moves of its address),
//! and bounded maps of buckets per source (an IPv4 address or an IPv6 /64, [`source`]): one
//! for TCRP requests of every kind, one for failed room passwords.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The source a per-source limit counts: the IPv4 address, or for IPv6 its /64, since one
/// host usually holds a whole /64 and could otherwise take a share per address. An
/// IPv4-mapped address (an IPv4 peer of a dual-stack listener) counts as its IPv4 address: its
/// /64 would be `::`, shared by every IPv4 client.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        ip @ IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Tokens available at `now`, without taking any.
    pub fn peek(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }

    /// Takes one token if there is one. Rate and burst are passed in so that a configuration
    /// reload applies to existing buckets.
    pub fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back one token taken by [`TokenBucket::take`] (never above `burst`).
    pub fn give_back(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate + 1.0).min(burst);
    }
}

/// How long a full limiter refuses newcomers outright after a sweep that freed little (less
/// than a sixteenth of its capacity): a sweep is a pass over every key, so without this each
/// newcomer could cost one (an attacker letting one bucket go idle per new address).
const SWEEP_BACKOFF: Duration = Duration::from_millis(100);

/// Buckets per key (a source IP), bounded in memory: when full, buckets that have refilled
/// completely are forgotten (they are indistinguishable from new ones).
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    buckets: HashMap<K, TokenBucket>,
    capacity: usize,
    /// Set when a sweep freed little: until then newcomers find no room without a sweep.
    full_until: Option<Instant>,
}

impl<K: Hash + Eq + Copy> KeyedLimiter<K> {
    /// A limiter remembering at most `capacity` keys.
    pub fn new(capacity: usize) -> KeyedLimiter<K> {
        KeyedLimiter {
            buckets: HashMap::new(),
            capacity,
            full_until: None,
        }
    }

    /// Whether `key` has a token left, without taking it.
    pub fn has_budget(&self, key: K, now: Instant, rate: f64, burst: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        self.buckets
            .get(&key)
            .is_none_or(|b| b.peek(now, rate, burst) >= 1.0)
    }

    /// Takes a token from `key`'s bucket; `rate <= 0` means unlimited.
    pub fn allow(&mut self, key: K, now: Instant, rate: f64, burst: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            if self.full_until.is_some_and(|until| now < until) {
                return false;
            }
            let refill = burst / rate;
            let before = self.buckets.len();
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < refill);
            let freed = before - self.buckets.len();
            if freed * 16 < self.capacity.max(16) {
                // Few were idle: do not pay for another pass for a while.
                self.full_until = Some(now + SWEEP_BACKOFF);
            }
            if self.buckets.len() >= self.capacity {
                // Everyone is active: refuse newcomers rather than grow without bound.
                return false;
            }
        }
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(burst, now))
            .take(now, rate, burst)
    }

    /// Gives back a token that [`KeyedLimiter::allow`] took from `key`. A key that was
    /// forgotten meanwhile had a full bucket, so there is nothing to give back then.
    pub fn give_back(&mut self, key: K, now: Instant, rate: f64, burst: f64) {
        if rate <= 0.0 {
            return;
        }
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.give_back(now, rate, burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(source(v4), v4);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_sources_of_their_own() {
        // A listener on [::] (or [::ffff:a.b.c.d]) reports IPv4 peers as IPv4-mapped IPv6
        // addresses: each is still its own source, not one /64 shared by every IPv4 client.
        let a: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let b: IpAddr = "::ffff:198.51.100.1".parse().unwrap();
        assert_ne!(source(a), source(b));
        assert_eq!(source(a), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0, t0);
        assert!((0..3).all(|_| b.take(t0, 10.0, 3.0)));
        assert!(!b.take(t0, 10.0, 3.0));
        assert!(b.take(t0 + Duration::from_millis(100), 10.0, 3.0));
        assert!(!b.take(t0 + Duration::from_millis(100), 10.0, 3.0));
    }

    #[test]
    fn keyed_limiter_is_bounded_and_forgets_idle_keys() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(2);
        assert!(l.allow(1, t0, 1.0, 1.0));
        assert!(!l.allow(1, t0, 1.0, 1.0));
        assert!(l.allow(2, t0, 1.0, 1.0));
        assert!(!l.allow(3, t0, 1.0, 1.0), "full of active keys");
        assert!(
            l.allow(3, t0 + Duration::from_secs(2), 1.0, 1.0),
            "idle keys forgotten"
        );
        assert!(l.allow(9, t0, 0.0, 0.0), "rate 0 is unlimited");
    }

    #[test]
    fn a_full_limiter_sweeps_at_most_once_per_backoff() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(2);
        // Rate 100/s, burst 1: a bucket is forgettable 10 ms after its last use.
        assert!(l.allow(1, t0, 100.0, 1.0));
        assert!(l.allow(2, t0, 100.0, 1.0));
        assert!(!l.allow(3, t0, 100.0, 1.0), "full of active keys");
        // Both keys are idle by now, but the table is not swept again so soon.
        let soon = t0 + SWEEP_BACKOFF / 2;
        assert!(!l.allow(3, soon, 100.0, 1.0));
        assert_eq!(l.buckets.len(), 2, "no sweep within the backoff");
        assert!(l.allow(3, t0 + SWEEP_BACKOFF, 100.0, 1.0), "swept after it");
        assert_eq!(l.buckets.len(), 1);
    }

    #[test]
    fn a_sweep_that_frees_little_also_backs_off() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(32);
        // Rate 100/s, burst 1: forgettable 10 ms after the last use. Key 0 goes idle first.
        assert!(l.allow(0, t0, 100.0, 1.0));
        let t1 = t0 + Duration::from_millis(20);
        for key in 1..32 {
            assert!(l.allow(key, t1, 100.0, 1.0));
        }
        // The sweep frees key 0 only (1 of 32): the newcomer gets its place...
        let t2 = t0 + Duration::from_millis(25);
        assert!(l.allow(100, t2, 100.0, 1.0));
        // ...and the next newcomers are refused without a sweep while the backoff lasts,
        // although by then every other key has gone idle.
        let t3 = t0 + Duration::from_millis(40);
        assert!(!l.allow(101, t3, 100.0, 1.0));
        assert_eq!(l.buckets.len(), 32, "no sweep within the backoff");
        assert!(l.allow(101, t2 + SWEEP_BACKOFF, 100.0, 1.0));
    }

    #[test]
    fn a_token_given_back_can_be_taken_again_but_never_past_the_burst() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(4);
        assert!(l.allow(1, t0, 1.0, 2.0));
        assert!(l.allow(1, t0, 1.0, 2.0));
        assert!(!l.has_budget(1, t0, 1.0, 2.0));
        l.give_back(1, t0, 1.0, 2.0);
        assert!(l.allow(1, t0, 1.0, 2.0));
        assert!(!l.allow(1, t0, 1.0, 2.0));
        // Refilled to the burst, then a give-back: still only two.
        let t1 = t0 + Duration::from_secs(10);
        l.give_back(1, t1, 1.0, 2.0);
        assert!(l.allow(1, t1, 1.0, 2.0));
        assert!(l.allow(1, t1, 1.0, 2.0));
        assert!(!l.allow(1, t1, 1.0, 2.0));
        l.give_back(7, t1, 1.0, 2.0); // unknown key: nothing to do
        assert!(!l.buckets.contains_key(&7));
    }

    /// What a bucket holds at a moment counts the refill since it was last used, at its rate,
    /// as `take` does, both for `has_budget` and for a give-back: at 0.5 a second, an emptied
    /// bucket has half a token after a second and one after two; a token given back after a
    /// second joins that half, no more.
    #[test]
    fn peeking_and_giving_back_count_the_refill_at_rate() {
        let t0 = Instant::now();
        let (rate, burst) = (0.5, 3.0);
        let mut l = KeyedLimiter::new(4);
        assert!((0..3).all(|_| l.allow(1, t0, rate, burst)));
        assert!(!l.has_budget(1, t0, rate, burst));
        let t1 = t0 + Duration::from_secs(1);
        assert!(!l.has_budget(1, t1, rate, burst), "half a token");
        assert!(l.has_budget(1, t0 + Duration::from_secs(2), rate, burst));
        l.give_back(1, t1, rate, burst);
        assert!(l.allow(1, t1, rate, burst));
        assert!(!l.allow(1, t1, rate, burst), "half a token left");
        assert!(l.allow(1, t1 + Duration::from_secs(1), rate, burst));
    }

    /// A bucket idle for exactly the time it takes to refill from empty is full again, so a
    /// full limiter forgets it for a newcomer.
    #[test]
    fn a_bucket_idle_for_exactly_its_refill_time_is_forgotten() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1);
        assert!(l.allow(1, t0, 1.0, 1.0));
        assert!(l.allow(2, t0 + Duration::from_secs(1), 1.0, 1.0));
        assert!(!l.buckets.contains_key(&1));
    }

    /// A sweep that frees a sixteenth of the capacity (not less) does not back off: the next
    /// newcomer may sweep again at once.
    #[test]
    fn a_sweep_that_frees_a_sixteenth_does_not_back_off() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = KeyedLimiter::new(16);
        // Rate 100/s, burst 1: forgettable 10 ms after the last use. Key 0 goes idle first,
        // key 1 next.
        assert!(l.allow(0, at(0), 100.0, 1.0));
        assert!(l.allow(1, at(25), 100.0, 1.0));
        for key in 2..16 {
            assert!(l.allow(key, at(30), 100.0, 1.0));
        }
        // The sweep frees key 0 only: 1 of 16, a sixteenth.
        assert!(l.allow(100, at(31), 100.0, 1.0));
        // Key 1 is idle 5 ms later, well within the backoff: a newcomer sweeps it out.
        assert!(l.allow(101, at(36), 100.0, 1.0));
        assert!(!l.buckets.contains_key(&1));
    }

    /// A full limiter whose sweep freed nothing refuses newcomers for 100 ms, as
    /// docs/SECURITY.md ("Floods") says: still at 99 ms, no longer at 100 ms. Kills the hand
    /// mutants `SWEEP_BACKOFF` 99 ms and 101 ms (the other tests use the constant itself).
    #[test]
    fn the_sweep_backoff_lasts_100_ms() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = KeyedLimiter::new(2);
        // Rate 100/s, burst 1: a bucket is forgettable 10 ms after its last use.
        assert!(l.allow(1, at(0), 100.0, 1.0));
        assert!(l.allow(2, at(0), 100.0, 1.0));
        assert!(!l.allow(3, at(0), 100.0, 1.0), "full of active keys");
        assert!(!l.allow(3, at(99), 100.0, 1.0), "still backing off");
        assert!(l.allow(3, at(100), 100.0, 1.0), "swept at 100 ms");
    }

    /// A sweep that frees less than a sixteenth of the capacity backs off, however little
    /// less: 2 of 33 (2 × 16 = 32 < 33). Kills the hand mutant `freed * 17` (2 × 17 = 34),
    /// which would let a crowd of newcomers cost a pass each by idling one bucket in 17.
    #[test]
    fn a_sweep_that_frees_just_under_a_sixteenth_backs_off() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = KeyedLimiter::new(33);
        // Rate 100/s, burst 1: forgettable 10 ms after the last use. Keys 0 and 1 go idle
        // first.
        assert!(l.allow(0, at(0), 100.0, 1.0));
        assert!(l.allow(1, at(0), 100.0, 1.0));
        for key in 2..33 {
            assert!(l.allow(key, at(20), 100.0, 1.0));
        }
        // The sweep frees keys 0 and 1 (2 of 33): two newcomers get their places...
        assert!(l.allow(100, at(25), 100.0, 1.0));
        assert!(l.allow(102, at(25), 100.0, 1.0));
        // ...and the next is refused without a sweep, though the others are idle by then.
        assert!(!l.allow(101, at(40), 100.0, 1.0));
        assert_eq!(l.buckets.len(), 33, "no sweep within the backoff");
    }

    /// `has_budget` answers as `allow` would: a source never seen has a full bucket, and rate
    /// 0 means unlimited, also for a source whose bucket was emptied before a reload set it to
    /// 0. The handshake tests read the password limiter through it. Kills the hand mutants
    /// `is_none_or` made `is_some_and` and `rate <= 0.0` made `rate < 0.0` in `has_budget`.
    #[test]
    fn has_budget_answers_as_allow_would() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(4);
        assert!(l.has_budget(1, t0, 1.0, 1.0), "never seen");
        assert!(l.allow(1, t0, 1.0, 1.0));
        assert!(!l.has_budget(1, t0, 1.0, 1.0));
        assert!(l.has_budget(1, t0, 0.0, 1.0), "rate 0 is unlimited");
        assert!(l.allow(1, t0, 0.0, 1.0));
    }
}
