//! A stall meter: a thread that sleeps 1 ms at a time and notes how late it wakes.
//!
//! On a shared VM the whole guest sometimes stops for milliseconds (the host runs something
//! else) without the guest's steal counter showing all of it. At half load one such stall
//! holds back about twice its length of messages, which in a run of a few seconds is enough
//! to set the p99. The meter runs at real-time priority (`SCHED_FIFO` 1, when this process may set it):
//! then only what stops the whole CPU (the hypervisor, interrupts, kernel sections that
//! cannot be preempted) makes it late, not the daemon or the generator. Waking 1,000 times
//! a second for a few microseconds, it costs well under 1% of a core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The meter's sleep.
const TICK: Duration = Duration::from_millis(1);
/// A wake-up this much later than asked counts as a stall.
const STALL: Duration = Duration::from_millis(1);

/// What the meter saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stalls {
    /// Wake-ups at least 1 ms late.
    pub count: u64,
    /// The latest wake-up, ms past the time asked for.
    pub longest_ms: f64,
    /// Lateness of the stalls added up, ms.
    pub total_ms: f64,
    /// Whether the meter ran at real-time priority (else its lateness includes waiting for
    /// a core like any other thread).
    pub realtime: bool,
}

impl Stalls {
    fn note(&mut self, late: Duration) {
        if late >= STALL {
            let ms = late.as_secs_f64() * 1e3;
            self.count += 1;
            self.total_ms += ms;
            self.longest_ms = self.longest_ms.max(ms);
        }
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        format!(
            "stalls (a {} thread sleeping 1 ms woke ≥ 1 ms late): {}, longest {:.1} ms, {:.0} ms in all",
            if self.realtime { "SCHED_FIFO" } else { "normal-priority" },
            self.count,
            self.longest_ms,
            self.total_ms
        )
    }
}

/// A running meter.
pub struct StallMeter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Stalls>,
}

impl StallMeter {
    /// Starts the meter thread.
    pub fn start() -> std::io::Result<StallMeter> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("stall-meter".into())
            .spawn(move || measure(&flag))?;
        Ok(StallMeter { stop, handle })
    }

    /// Stops the thread and returns what it saw.
    pub fn finish(self) -> Stalls {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn measure(stop: &AtomicBool) -> Stalls {
    let mut seen = Stalls {
        realtime: become_realtime(),
        ..Stalls::default()
    };
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        thread::sleep(TICK);
        seen.note(asked.elapsed().saturating_sub(TICK));
    }
    seen
}

/// Puts the calling thread under `SCHED_FIFO` priority 1; false when not permitted.
pub(crate) fn become_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes only the calling thread's policy; `param` is a valid sched_param.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wakeups_a_millisecond_late_or_more_count() {
        let mut s = Stalls::default();
        s.note(Duration::from_micros(80));
        s.note(Duration::from_micros(999));
        assert_eq!(s.count, 0);
        s.note(Duration::from_millis(3));
        s.note(Duration::from_millis(1));
        assert_eq!(s.count, 2);
        assert!((s.longest_ms - 3.0).abs() < 1e-9);
        assert!((s.total_ms - 4.0).abs() < 1e-9);
    }
}
