//! The relay-delay histogram: how long a datagram waited in the daemon.
//!
//! The UDP socket stamps each datagram with its arrival time (`SO_TIMESTAMPNS`, taken by the
//! kernel as the datagram is queued on the socket). After a batch has been handled and every
//! datagram it caused has been handed to the kernel, the loop records, for each datagram of the
//! batch, the time since its stamp: queueing in the socket buffer plus the daemon's own work.
//! Exported as the Prometheus histogram `ocm_relay_delay_seconds`, so an operator (and the
//! benchmark) can tell the daemon's share of end-to-end latency from the network's and the
//! clients'.

use std::fmt::Write;
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (a last, unbounded bucket follows).
pub const BOUNDS_SECONDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// Counts per bucket and the sum, as Prometheus wants them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DelayHistogram {
    /// Non-cumulative counts; the last one is above every bound.
    counts: [u64; BOUNDS_SECONDS.len() + 1],
    sum_seconds: f64,
}

impl DelayHistogram {
    /// Counts one delay.
    pub fn record(&mut self, delay: Duration) {
        let seconds = delay.as_secs_f64();
        let bucket = BOUNDS_SECONDS.partition_point(|&bound| bound < seconds);
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
                return Some(BOUNDS_SECONDS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BOUNDS_SECONDS.iter().zip(&self.counts) {
            cumulative += n;
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
        let mut h = DelayHistogram::default();
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
        let mut h = DelayHistogram::default();
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
}
