//! Delay histograms: how long a datagram waited in the daemon (the relay delay), and how long
//! a create or join reply waited for the disk (the durable wait).
//!
//! The UDP socket stamps each datagram with its arrival time (`SO_TIMESTAMPNS`, taken by the
//! kernel as the datagram is queued on the socket). After a batch has been handled and every
//! datagram it caused has been handed to the kernel, the loop records, for each datagram of the
//! batch, the time since its stamp: queueing in the socket buffer plus the daemon's own work.
//! Exported as the Prometheus histogram `ocm_relay_delay_seconds`, so an operator (and the
//! benchmark) can tell the daemon's share of end-to-end latency from the network's and the
//! clients'.

use std::fmt::Write;
use std::marker::PhantomData;
use std::time::Duration;

/// The bucket bounds of one histogram, in seconds (a last, unbounded bucket follows).
pub trait Bounds {
    /// Upper bounds, increasing.
    const SECONDS: &'static [f64];
}

/// `ocm_relay_delay_seconds`: from 50 µs (a datagram relayed at once) to 5 s (a socket buffer
/// of backlog).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Relay;

impl Bounds for Relay {
    const SECONDS: &'static [f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        1.0, 5.0,
    ];
}

/// `ocm_handshake_durable_wait_seconds`: dense from 100 µs to 5 ms, where a journal write
/// and its fsync fall on local disks (a quarter faster or slower shows), then up to 30 s for
/// a disk that stalls (a held reply is exempt from the handshake deadline).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DurableWait;

impl Bounds for DurableWait {
    const SECONDS: &'static [f64] = &[
        0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.005, 0.01, 0.025,
        0.05, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
}

/// Counts per bucket and the sum, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct DelayHistogram<B: Bounds = Relay> {
    /// Non-cumulative counts, one per bound and a last one above every bound; empty until
    /// the first delay.
    counts: Vec<u64>,
    sum_seconds: f64,
    bounds: PhantomData<B>,
}

impl<B: Bounds> Default for DelayHistogram<B> {
    fn default() -> Self {
        DelayHistogram {
            counts: Vec::new(),
            sum_seconds: 0.0,
            bounds: PhantomData,
        }
    }
}

impl<B: Bounds> DelayHistogram<B> {
    /// Counts one delay.
    pub fn record(&mut self, delay: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; B::SECONDS.len() + 1];
        }
        let seconds = delay.as_secs_f64();
        let bucket = B::SECONDS.partition_point(|&bound| bound < seconds);
        self.counts[bucket] += 1;
        self.sum_seconds += seconds;
    }

    /// Delays counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The smallest bucket bound at or below which at least `q` (0..=1) of the delays fall,
    /// in seconds; infinity when that is the unbounded bucket, `None` when empty.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let wanted = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return Some(B::SECONDS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in B::SECONDS.iter().enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_seconds);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn delays_land_in_the_first_bucket_that_holds_them() {
        let mut h = DelayHistogram::<Relay>::default();
        for us in [10, 50, 51, 400, 999, 1000, 7_000_000] {
            h.record(micros(us));
        }
        let mut text = String::new();
        h.render("d", "test", &mut text);
        for line in [
            "d_bucket{le=\"0.00005\"} 2",
            "d_bucket{le=\"0.0001\"} 3",
            "d_bucket{le=\"0.0005\"} 4",
            "d_bucket{le=\"0.001\"} 6",
            "d_bucket{le=\"5\"} 6",
            "d_bucket{le=\"+Inf\"} 7",
            "d_count 7",
            "# TYPE d histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("d_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 7.002_51).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn quantile_bounds_follow_the_buckets() {
        let mut h = DelayHistogram::<Relay>::default();
        assert_eq!(h.quantile_bound(0.5), None);
        for _ in 0..98 {
            h.record(micros(80));
        }
        h.record(micros(3000));
        h.record(micros(20_000_000));
        assert_eq!(h.quantile_bound(0.5), Some(0.0001));
        assert_eq!(h.quantile_bound(0.98), Some(0.0001));
        assert_eq!(h.quantile_bound(0.99), Some(0.005));
        assert_eq!(h.quantile_bound(1.0), Some(f64::INFINITY));
    }

    #[test]
    fn the_durable_wait_tells_a_quarter_of_a_millisecond_apart_and_holds_a_stalled_disk() {
        let mut h = DelayHistogram::<DurableWait>::default();
        let empty = {
            let mut text = String::new();
            h.render("w", "test", &mut text);
            text
        };
        assert!(empty.contains("w_bucket{le=\"30\"} 0\n"), "{empty}");
        h.record(micros(600));
        assert_eq!(h.quantile_bound(1.0), Some(0.000_75));
        h.record(micros(900));
        assert_eq!(h.quantile_bound(1.0), Some(0.001));
        h.record(Duration::from_secs(20));
        assert_eq!(h.quantile_bound(1.0), Some(30.0));
        for bounds in [Relay::SECONDS, DurableWait::SECONDS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
    }
}
