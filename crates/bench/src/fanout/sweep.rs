//! The sweep: a flat-out probe bounds the rate, then paced steps go up by half while they
//! pass and bisect once one fails; the highest passing step is the sustained rate, and a
//! run at half of it gives the latency there.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{measure, FanoutResult, Pace};
use crate::cli::CapsArg;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::members::Room;
use crate::receivers::Draining;
use crate::report::si;

/// Result of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepResult {
    /// The flat-out probe.
    pub max: FanoutResult,
    /// Every paced step, in order.
    pub steps: Vec<FanoutResult>,
    /// The highest offered rate (msgs/s) whose step lost less than the threshold.
    pub sustained_rate: f64,
    /// That step.
    pub sustained: Option<FanoutResult>,
    /// The run at half the sustained rate.
    pub half: Option<FanoutResult>,
    /// Loss threshold, percent.
    pub loss_pct: f64,
    /// The sendto ceiling for the same M and B, datagrams/s: in the matrix, the mean of
    /// `ceiling_around`.
    pub ceiling_per_sec: f64,
    /// The ceiling measured right before and right after the sweep, when it was: the
    /// machine's speed drifts within minutes, so one measurement taken earlier is not the
    /// ceiling the sweep ran under.
    #[serde(default)]
    pub ceiling_around: Option<(f64, f64)>,
}

impl SweepResult {
    /// The human-readable summary.
    pub fn print(&self) {
        let m = &self.max;
        println!(
            "sweep M={} S={} B={} caps={}: loss < {}%",
            m.members, m.senders, m.bytes, m.caps, self.loss_pct
        );
        for s in &self.steps {
            if let Pace::Rate(r) = s.pace {
                println!(
                    "  step {:>9.0} msg/s: loss {:.3}% of the schedule ({:.3}% skipped by the senders), deliveries/s {} p99 {:.0} µs",
                    r,
                    s.schedule_loss_pct(),
                    s.skipped_pct(),
                    si(s.deliveries_per_sec),
                    s.latency_us.p99
                );
            }
        }
        match &self.sustained {
            Some(s) => println!(
                "  sustained: {:.0} msg/s offered = {} deliveries/s = {:.1}% of the sendto ceiling ({}/s{})",
                self.sustained_rate,
                si(s.deliveries_per_sec),
                100.0 * s.deliveries_per_sec / self.ceiling_per_sec.max(1.0),
                si(self.ceiling_per_sec),
                self.ceiling_around.map_or(String::new(), |(before, after)| format!(
                    ", the mean of {}/s before the sweep and {}/s after",
                    si(before),
                    si(after)
                ))
            ),
            None => println!("  no step met the loss threshold"),
        }
        if let Some(h) = &self.half {
            println!(
                "  at half ({:.0} msg/s): loss {:.3}% of the schedule, p50 {:.0} µs p99 {:.0} µs max {:.0} µs",
                self.sustained_rate / 2.0,
                h.schedule_loss_pct(),
                h.latency_us.p50,
                h.latency_us.p99,
                h.latency_us.max
            );
        }
    }
}

/// Flat-out probe, then a binary search over the offered rate, then half the best rate.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    daemon: &mut Daemon,
    room: &Room,
    senders: usize,
    bytes: usize,
    caps: CapsArg,
    step: Duration,
    steps: usize,
    loss_pct: f64,
    draining: Draining,
    ceiling_per_sec: f64,
) -> Result<SweepResult> {
    let fanout = room.members.len().saturating_sub(1).max(1) as f64;
    let max = measure(
        daemon,
        room,
        senders,
        bytes,
        caps,
        Pace::Max,
        step,
        draining,
    )?;
    // Upper bound: what went through flat out (a bit more, in case the probe was unlucky),
    // and never more than was offered.
    let delivered_msgs = max.deliveries_per_sec / fanout;
    let mut search = Search::new((delivered_msgs * 1.3).min(max.offered_per_sec).max(100.0));
    let mut best: Option<FanoutResult> = None;
    let mut all = Vec::new();
    for _ in 0..steps {
        let rate = search.next_rate();
        let r = measure(
            daemon,
            room,
            senders,
            bytes,
            caps,
            Pace::Rate(rate),
            step,
            draining,
        )?;
        let passed = r.sustainable(rate, loss_pct);
        if passed {
            best = Some(r.clone());
        }
        search.record(rate, passed);
        all.push(r);
        if search.done() {
            break;
        }
    }
    let sustained_rate = search.sustained();
    let half = if sustained_rate > 0.0 {
        Some(measure(
            daemon,
            room,
            senders,
            bytes,
            caps,
            Pace::Rate(sustained_rate / 2.0),
            step.max(Duration::from_secs(2)),
            draining,
        )?)
    } else {
        None
    };
    Ok(SweepResult {
        max,
        steps: all,
        sustained_rate,
        sustained: best,
        half,
        loss_pct,
        ceiling_per_sec,
        ceiling_around: None,
    })
}

/// The sweep's choice of rates: from a first guess, each passing step raises the rate by
/// half until one fails; then it bisects between the highest pass and the lowest failure
/// until they are within 3% of each other. The sustained rate is always a rate that passed
/// (0 when none did).
#[derive(Debug)]
pub(super) struct Search {
    /// The highest rate that passed.
    lo: f64,
    /// The next rate to try before a failure; the lowest that failed after.
    hi: f64,
    /// Whether a step has failed.
    bracketed: bool,
}

impl Search {
    pub(super) fn new(first: f64) -> Search {
        Search {
            lo: 0.0,
            hi: first,
            bracketed: false,
        }
    }

    /// The rate of the next step.
    pub(super) fn next_rate(&self) -> f64 {
        if self.bracketed {
            (self.lo + self.hi) / 2.0
        } else {
            self.hi
        }
    }

    /// Takes the verdict of the step at `rate`.
    pub(super) fn record(&mut self, rate: f64, passed: bool) {
        if passed {
            self.lo = self.lo.max(rate);
            if !self.bracketed {
                self.hi = rate * 1.5;
            }
        } else {
            self.hi = self.hi.min(rate);
            self.bracketed = true;
        }
    }

    /// Whether the highest pass and the lowest failure are close enough.
    pub(super) fn done(&self) -> bool {
        self.bracketed && (self.hi - self.lo) / self.hi.max(1.0) < 0.03
    }

    /// The highest rate that passed.
    pub(super) fn sustained(&self) -> f64 {
        self.lo
    }
}
