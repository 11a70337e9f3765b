//! The wall clock that datagram ages are measured on, kept honest across a step of it.
//!
//! The kernel stamps each datagram's arrival on the wall clock (`SO_TIMESTAMPNS` gives
//! `CLOCK_REALTIME`; there is no monotonic choice for software receive stamps), so the loop
//! measures ages against the wall clock too: for `udp.max_chat_wait_ms` and for
//! `ocm_relay_delay_seconds`. When NTP or an operator steps the clock forward by S, every
//! datagram stamped before the step looks S older than it is, and a limit of 100 ms would
//! drop a whole backlog of fresh chat.
//!
//! [`WallClock`] watches the difference between the wall clock and the monotonic clock, which
//! slewing changes on both alike and only a step changes. After a forward step it reads the
//! wall clock back by the step for a window (the longest age that matters): a datagram stamped
//! before the step then shows its true age, one stamped after it looks younger than it is, and
//! none looks older. A backward step makes earlier stamps look younger, never older, so it is
//! left alone. Past the window, anything stamped before the step is older than the window on
//! either clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Differences of the two clocks that move less than this are reading noise, not a step.
const MIN_STEP: Duration = Duration::from_millis(1);
/// A pair of readings taken further apart than this (the thread was preempted between them)
/// says nothing about a step and is not compared.
const MAX_READ_SPREAD: Duration = Duration::from_micros(200);

/// Follows the wall clock's steps (see the module documentation).
#[derive(Debug)]
pub struct WallClock {
    /// The monotonic clock's origin for [`WallClock::offset`].
    origin: Instant,
    /// Wall clock minus monotonic clock at the last step seen (or the first reading), ns.
    offset: Option<i128>,
    /// How far the wall clock is read back: the forward steps of the window, net of backward
    /// ones, never below zero.
    step_back: Duration,
    /// Monotonic time (since `origin`) at which `step_back` lapses.
    step_back_until: Duration,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

impl WallClock {
    /// Starts following the clocks.
    pub fn new() -> WallClock {
        WallClock {
            origin: Instant::now(),
            offset: None,
            step_back: Duration::ZERO,
            step_back_until: Duration::ZERO,
        }
    }

    /// The wall clock now (since the Unix epoch) to measure arrival stamps against, read back
    /// by a forward step seen within the last `window`. `None` before 1970.
    pub fn now(&mut self, window: Duration) -> Option<Duration> {
        let before = self.origin.elapsed();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        let after = self.origin.elapsed();
        Some(self.observe(wall, before, after, window))
    }

    /// [`WallClock::now`] on given readings: `wall` taken between the monotonic readings
    /// `before` and `after` (since the origin).
    fn observe(
        &mut self,
        wall: Duration,
        before: Duration,
        after: Duration,
        window: Duration,
    ) -> Duration {
        if after >= self.step_back_until {
            self.step_back = Duration::ZERO;
        }
        let spread = after.saturating_sub(before);
        if spread <= MAX_READ_SPREAD {
            let middle = before + spread / 2;
            let offset = wall.as_nanos() as i128 - middle.as_nanos() as i128;
            match self.offset {
                None => self.offset = Some(offset),
                Some(last) => {
                    let step = offset - last;
                    if step.unsigned_abs() >= MIN_STEP.as_nanos() {
                        self.offset = Some(offset);
                        let size = nanos(step.unsigned_abs());
                        if step > 0 {
                            self.step_back += size;
                            self.step_back_until = after + window;
                        } else {
                            self.step_back = self.step_back.saturating_sub(size);
                        }
                    }
                }
            }
        }
        wall.saturating_sub(self.step_back)
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);
    /// 2026-12-03 on the wall clock.
    const EPOCH_NOW: Duration = Duration::from_secs(1_796_300_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Reads the clock at monotonic time `t` with the wall clock `jump` ahead of where it
    /// started, both readings 10 µs apart.
    fn read(clock: &mut WallClock, t: Duration, jump: i64) -> Duration {
        let wall = if jump >= 0 {
            EPOCH_NOW + t + ms(jump as u64)
        } else {
            EPOCH_NOW + t - ms(jump.unsigned_abs())
        };
        clock.observe(wall, t, t + Duration::from_micros(10), WINDOW)
    }

    #[test]
    fn without_a_step_it_is_the_wall_clock() {
        let mut clock = WallClock::new();
        for t in [0, 1, 50, 4_000, 90_000] {
            let wall = EPOCH_NOW + ms(t);
            assert_eq!(read(&mut clock, ms(t), 0), wall);
        }
    }

    #[test]
    fn a_forward_step_is_read_back_for_the_window_then_forgotten() {
        let mut clock = WallClock::new();
        assert_eq!(read(&mut clock, ms(0), 0), EPOCH_NOW);
        // A datagram stamped at 100 ms, read at 120 ms just after a 1 h step: 20 ms old.
        let stamped = EPOCH_NOW + ms(100);
        let now = read(&mut clock, ms(120), 3_600_000);
        assert_eq!(now - stamped, ms(20));
        // Still read back within the window, with no further step.
        let now = read(&mut clock, ms(4_000), 3_600_000);
        assert_eq!(now, EPOCH_NOW + ms(4_000));
        // Past the window, the wall clock as it is.
        let now = read(&mut clock, ms(5_200), 3_600_000);
        assert_eq!(now, EPOCH_NOW + ms(5_200) + ms(3_600_000));
    }

    #[test]
    fn a_backward_step_never_makes_anything_look_older() {
        let mut clock = WallClock::new();
        read(&mut clock, ms(0), 0);
        let now = read(&mut clock, ms(100), -60_000);
        assert_eq!(now, EPOCH_NOW + ms(100) - ms(60_000));
        // Stepped forward again to where it was: read back by that step, so what was stamped
        // between the two steps shows its age, and what was stamped before them looks younger.
        let between = EPOCH_NOW + ms(150) - ms(60_000);
        let now = read(&mut clock, ms(200), 0);
        assert_eq!(now - between, ms(50));
    }

    #[test]
    fn a_backward_step_inside_the_window_takes_back_part_of_a_forward_one() {
        let mut clock = WallClock::new();
        read(&mut clock, ms(0), 0);
        read(&mut clock, ms(10), 10_000);
        let now = read(&mut clock, ms(20), 4_000);
        // Net +4 s since the start: read back by 4 s, so a stamp from before both steps
        // shows its age.
        assert_eq!(now, EPOCH_NOW + ms(20));
    }

    #[test]
    fn readings_far_apart_or_a_little_off_are_not_steps() {
        let mut clock = WallClock::new();
        read(&mut clock, ms(0), 0);
        // The thread was preempted for 30 ms between the readings: no step.
        let wall = EPOCH_NOW + ms(1_030);
        assert_eq!(clock.observe(wall, ms(1_000), ms(1_030), WINDOW), wall);
        assert_eq!(read(&mut clock, ms(2_000), 0), EPOCH_NOW + ms(2_000));
        // Half a millisecond off: reading noise.
        let wall = EPOCH_NOW + ms(3_000) + Duration::from_micros(500);
        assert_eq!(clock.observe(wall, ms(3_000), ms(3_000), WINDOW), wall);
    }

    #[test]
    fn now_reads_the_real_clocks() {
        let mut clock = WallClock::new();
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        let ours = clock.now(WINDOW).expect("after 1970");
        assert!(ours >= system && ours - system < Duration::from_secs(5));
    }
}
