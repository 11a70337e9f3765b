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
//! none younger than the window looks older (by more than the millisecond below which a change
//! counts as reading noise). A backward step makes earlier stamps look younger, never older,
//! so it is left alone. Past the window, anything stamped before the step is older than the
//! window on either clock. The clocks are read with every batch of datagrams; two steps
//! between two readings are seen as one, their sum, so a datagram that arrived between a step
//! back and a step forward can look older by the smaller of the two.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info};

/// Differences of the two clocks that move less than this are reading noise, not a step.
const MIN_STEP: Duration = Duration::from_millis(1);
/// A pair of readings taken further apart than this (the thread was preempted between them)
/// cannot tell a step from the wait: [`WallClock::now`] tries again, and then reads back by
/// the largest forward step the readings allow, for that call only.
const MAX_READ_SPREAD: Duration = Duration::from_micros(200);
/// Tries at a pair of readings close enough together.
const READ_TRIES: usize = 3;
/// Steps remembered; beyond, the two oldest are merged so that every read-back stays at least
/// as large as it would be.
const MAX_STEPS: usize = 16;
/// Steps at least this large are logged at `info`, smaller ones at `debug`.
const LOGGED_STEP: Duration = Duration::from_millis(100);

/// Follows the wall clock's steps (see the module documentation).
#[derive(Debug)]
pub struct WallClock {
    /// The monotonic clock's origin for the readings.
    origin: Instant,
    /// Wall clock minus monotonic clock at the last step seen (or the first reading), ns.
    offset: Option<i128>,
    /// The steps seen within the last window, oldest first.
    steps: VecDeque<Step>,
}

/// One step of the wall clock.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Monotonic time (since the origin) of the reading that saw it.
    seen_at: Duration,
    /// Signed size, ns: forward is positive.
    size: i128,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

impl WallClock {
    /// Starts following the clocks, from a first reading of both: a step between a
    /// datagram's arrival and the first batch read is then seen as one.
    pub fn new() -> WallClock {
        let mut clock = WallClock::unread();
        let _ = clock.now(Duration::ZERO);
        clock
    }

    /// A clock that has read nothing yet: its first reading is its reference.
    fn unread() -> WallClock {
        WallClock {
            origin: Instant::now(),
            offset: None,
            steps: VecDeque::new(),
        }
    }

    /// The wall clock now (since the Unix epoch) to measure arrival stamps against, read back
    /// by the forward steps seen within the last `window`. `None` before 1970.
    pub fn now(&mut self, window: Duration) -> Option<Duration> {
        let origin = self.origin;
        let (wall, before, after) = read_closely(|| {
            let before = origin.elapsed();
            let wall = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
            Some((wall, before, origin.elapsed()))
        })?;
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
        while self
            .steps
            .front()
            .is_some_and(|step| step.seen_at + window <= after)
        {
            self.steps.pop_front();
        }
        let wall_ns = wall.as_nanos() as i128;
        // The offset lies between these two: the wall clock was read between the others.
        let (low, high) = (
            wall_ns - after.as_nanos() as i128,
            wall_ns - before.as_nanos() as i128,
        );
        let precise = after.saturating_sub(before) <= MAX_READ_SPREAD;
        // The largest forward step these readings may hide, read back for this call only.
        let mut unsure = 0;
        match self.offset {
            // Lowest, so that a later step looks larger rather than smaller.
            None => self.offset = Some(low),
            Some(last) if precise => {
                let offset = low + (high - low) / 2;
                let size = offset - last;
                if size.unsigned_abs() >= MIN_STEP.as_nanos() {
                    self.offset = Some(offset);
                    self.record(Step {
                        seen_at: after,
                        size,
                    });
                }
            }
            Some(last) => unsure = (high - last).max(0),
        }
        wall.saturating_sub(nanos(self.read_back() + unsure))
    }

    /// Remembers `step` and logs it.
    fn record(&mut self, step: Step) {
        let size = nanos(step.size.unsigned_abs() as i128);
        let way = if step.size > 0 { "forward" } else { "back" };
        let seconds = size.as_secs_f64();
        if size >= LOGGED_STEP {
            info!(
                "the wall clock stepped {way} by {seconds:.3} s: ages of datagrams that \
                 arrived before it are measured past the step"
            );
        } else {
            debug!("the wall clock stepped {way} by {seconds:.3} s");
        }
        if self.steps.len() == MAX_STEPS {
            if let (Some(oldest), Some(next)) = (self.steps.pop_front(), self.steps.front_mut()) {
                // Every run of steps that began with either now sums to no less than it did.
                next.size = next.size.max(oldest.size + next.size);
            }
        }
        self.steps.push_back(step);
    }

    /// How far to read the wall clock back: the largest sum of the latest steps, which is
    /// what a stamp taken before the first of them needs; none when every such sum is a step
    /// back.
    fn read_back(&self) -> i128 {
        let (mut sum, mut most) = (0i128, 0i128);
        for step in self.steps.iter().rev() {
            sum += step.size;
            most = most.max(sum);
        }
        most
    }
}

/// Takes `read`'s readings (wall, monotonic before, monotonic after) until a pair of monotonic
/// ones lies at most [`MAX_READ_SPREAD`] apart, [`READ_TRIES`] at most: the first such, or else
/// the last. `None` if a reading is.
fn read_closely(
    mut read: impl FnMut() -> Option<(Duration, Duration, Duration)>,
) -> Option<(Duration, Duration, Duration)> {
    let mut reading = None;
    for _ in 0..READ_TRIES {
        let (wall, before, after) = read()?;
        reading = Some((wall, before, after));
        if after.saturating_sub(before) <= MAX_READ_SPREAD {
            break;
        }
    }
    reading
}

/// A non-negative count of nanoseconds as a duration.
fn nanos(n: i128) -> Duration {
    Duration::from_nanos(u64::try_from(n.max(0)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_log::logged;

    const WINDOW: Duration = Duration::from_secs(5);
    /// 2026-12-03 on the wall clock.
    const EPOCH_NOW: Duration = Duration::from_secs(1_796_300_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Reads the clock at monotonic time `t` with the wall clock `jump` ahead of where it
    /// started, the monotonic readings at once around it.
    fn read(clock: &mut WallClock, t: Duration, jump: i64) -> Duration {
        let wall = if jump >= 0 {
            EPOCH_NOW + t + ms(jump as u64)
        } else {
            EPOCH_NOW + t - ms(jump.unsigned_abs())
        };
        clock.observe(wall, t, t, WINDOW)
    }

    #[test]
    fn without_a_step_it_is_the_wall_clock() {
        let mut clock = WallClock::unread();
        for t in [0, 1, 50, 4_000, 90_000] {
            let wall = EPOCH_NOW + ms(t);
            assert_eq!(read(&mut clock, ms(t), 0), wall);
        }
    }

    #[test]
    fn a_forward_step_is_read_back_for_the_window_then_forgotten() {
        let mut clock = WallClock::unread();
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
        let mut clock = WallClock::unread();
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
        let mut clock = WallClock::unread();
        read(&mut clock, ms(0), 0);
        read(&mut clock, ms(10), 10_000);
        let now = read(&mut clock, ms(20), 4_000);
        // Net +4 s since the start: read back by 4 s, so a stamp from before both steps
        // shows its age.
        assert_eq!(now, EPOCH_NOW + ms(20));
    }

    #[test]
    fn a_preempted_reading_is_read_back_by_the_most_it_allows_this_once() {
        let mut clock = WallClock::unread();
        read(&mut clock, ms(0), 0);
        // Preempted for 30 ms between the readings, with a 1 h step or without: it cannot
        // tell, so it reads back by all the wait.
        let wall = EPOCH_NOW + ms(1_030);
        let us = Duration::from_micros;
        assert_eq!(
            clock.observe(wall, ms(1_000), ms(1_030), WINDOW),
            wall - ms(30)
        );
        // Then nothing more: no step was taken for it.
        assert_eq!(read(&mut clock, ms(2_000), 0), EPOCH_NOW + ms(2_000));
        // Half a millisecond off: reading noise.
        let wall = EPOCH_NOW + ms(3_000) + us(500);
        assert_eq!(clock.observe(wall, ms(3_000), ms(3_000), WINDOW), wall);
    }

    #[test]
    fn frequent_small_steps_are_forgotten_once_older_than_the_window() {
        let mut clock = WallClock::unread();
        read(&mut clock, ms(0), 0);
        // 2 ms forward every second for a minute, as a guest agent keeping time might.
        let mut now = Duration::ZERO;
        for second in 1..=60 {
            now = read(&mut clock, ms(second * 1_000), 2 * second as i64);
        }
        // Only the steps of the last 5 s are read back.
        let read_back = EPOCH_NOW + ms(60_000) + ms(120) - now;
        assert!(read_back >= ms(8) && read_back <= ms(10), "{read_back:?}");
    }

    #[test]
    fn merged_steps_read_back_no_less() {
        let mut clock = WallClock::unread();
        let sizes: Vec<i64> = (0..40)
            .map(|i| if i % 3 == 0 { -7 } else { 5 + i })
            .collect();
        let mut offset = 0;
        read(&mut clock, ms(0), 0);
        for (i, size) in sizes.iter().enumerate() {
            offset += size;
            read(&mut clock, ms(10 * (i as u64 + 1)), offset);
        }
        assert!(clock.steps.len() <= MAX_STEPS);
        let mut exact = 0;
        let mut sum = 0;
        for size in sizes.iter().rev() {
            sum += size;
            exact = exact.max(sum);
        }
        assert!(clock.read_back() >= ms(exact as u64).as_nanos() as i128);
    }

    /// A precise pair of readings puts the offset in the middle of what it allows: a step of
    /// 950 to 1150 µs (the readings 200 µs apart) is taken as 1050 µs.
    #[test]
    fn a_precise_reading_takes_the_middle_of_what_it_allows() {
        let mut clock = WallClock::unread();
        read(&mut clock, ms(0), 0);
        let us = Duration::from_micros;
        let (before, after) = (ms(1_000), ms(1_000) + MAX_READ_SPREAD);
        // The wall clock 950 µs ahead if read at `after`, 1150 µs if read at `before`.
        let wall = EPOCH_NOW + after + us(950);
        assert_eq!(clock.observe(wall, before, after, WINDOW), wall - us(1_050));
    }

    /// A thread preempted between the readings tries again, and keeps the first close pair:
    /// a wider one would read the clock back by all the wait.
    #[test]
    fn readings_are_taken_again_until_close_enough_a_few_times_at_most() {
        let us = Duration::from_micros;
        let spreads = |spreads: Vec<Duration>| {
            let mut taken = 0;
            let reading = read_closely(|| {
                let spread = spreads[taken];
                taken += 1;
                Some((EPOCH_NOW, ms(1_000), ms(1_000) + spread))
            });
            (reading.map(|(_, before, after)| after - before), taken)
        };
        let wide = MAX_READ_SPREAD + us(1);
        assert_eq!(spreads(vec![us(3), wide]), (Some(us(3)), 1));
        assert_eq!(
            spreads(vec![ms(30), MAX_READ_SPREAD, us(3)]),
            (Some(MAX_READ_SPREAD), 2)
        );
        assert_eq!(
            spreads(vec![ms(30), ms(20), wide, us(3)]),
            (Some(wide), READ_TRIES)
        );
        assert_eq!(read_closely(|| None), None);
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

    /// Each step is logged with its way and size: at info from a tenth of a second (the
    /// default level shows it: ages measured past it), at debug below.
    #[test]
    fn a_step_is_logged_forward_or_back_at_info_from_a_tenth_of_a_second() {
        let lines = logged(|| {
            let mut clock = WallClock::unread();
            read(&mut clock, ms(0), 0);
            // Forward 1 h, back 250 ms, forward 2 ms, back 100 ms, back 99 ms.
            for (t, jump) in [
                (10, 3_600_000),
                (20, 3_599_750),
                (30, 3_599_752),
                (40, 3_599_652),
                (50, 3_599_553),
            ] {
                read(&mut clock, ms(t), jump);
            }
        });
        let past = ": ages of datagrams that arrived before it are measured past the step";
        let expected = [
            (
                log::Level::Info,
                format!("the wall clock stepped forward by 3600.000 s{past}"),
            ),
            (
                log::Level::Info,
                format!("the wall clock stepped back by 0.250 s{past}"),
            ),
            (
                log::Level::Debug,
                "the wall clock stepped forward by 0.002 s".to_owned(),
            ),
            (
                log::Level::Info,
                format!("the wall clock stepped back by 0.100 s{past}"),
            ),
            (
                log::Level::Debug,
                "the wall clock stepped back by 0.099 s".to_owned(),
            ),
        ];
        assert_eq!(lines, expected);
    }

    /// One event of a clock's life: time passing, then maybe a step of the wall clock, then
    /// maybe a datagram arriving, then maybe the loop reading a batch.
    #[derive(Debug, Clone)]
    struct Event {
        pass_ms: u64,
        step_ms: i64,
        arrives: bool,
        reads: bool,
        /// How long before the wall clock's reading the first monotonic one was taken (the
        /// thread preempted between them when above 0).
        spread_ms: u64,
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            0u64..3_000,
            prop_oneof![3 => Just(0i64), 1 => -4_000i64..4_000, 1 => -100_000i64..100_000],
            any::<bool>(),
            any::<bool>(),
            prop_oneof![3 => Just(0u64), 1 => 1u64..40],
        )
            .prop_map(|(pass_ms, step_ms, arrives, reads, spread_ms)| Event {
                pass_ms,
                step_ms,
                arrives,
                reads,
                spread_ms,
            })
    }

    proptest! {
        /// Whatever the steps (one at most between two readings), a datagram younger than the
        /// window never looks older than it is, and on a clock that never stepped every age
        /// read precisely is exact.
        #[test]
        fn no_datagram_younger_than_the_window_looks_older(
            events in proptest::collection::vec(event(), 1..60)
        ) {
            let mut clock = WallClock::unread();
            // True time (the monotonic clock) and the wall clock's offset from it, in ms.
            let (mut t, mut offset) = (0u64, 0i64);
            let wall_at = |t: u64, offset: i64| {
                Duration::from_millis((1_796_300_000_000i64 + t as i64 + offset) as u64)
            };
            clock.observe(wall_at(t, offset), ms(t), ms(t), WINDOW);
            let stepped = events.iter().any(|e| e.step_ms != 0);
            // (true arrival time, stamp)
            let mut waiting: Vec<(u64, Duration)> = Vec::new();
            // Whether the clock stepped since the last precise reading. Two steps between two
            // readings are seen as one, their sum (module documentation): the loop reads the
            // clocks with every batch, so the model reads them (without taking the waiting
            // datagrams) before a second step.
            let mut unseen_step = false;
            for e in &events {
                t += e.pass_ms;
                if e.step_ms != 0 {
                    if unseen_step {
                        clock.observe(wall_at(t, offset), ms(t), ms(t), WINDOW);
                    }
                    offset += e.step_ms;
                    unseen_step = true;
                }
                if e.arrives {
                    waiting.push((t, wall_at(t, offset)));
                }
                if e.reads {
                    let before = ms(t.saturating_sub(e.spread_ms));
                    let now = clock.observe(wall_at(t, offset), before, ms(t), WINDOW);
                    unseen_step &= e.spread_ms > 0;
                    for &(arrived, stamp) in &waiting {
                        let truth = ms(t - arrived);
                        let measured = now.saturating_sub(stamp);
                        if !stepped && e.spread_ms == 0 {
                            prop_assert_eq!(measured, truth);
                        } else if truth < WINDOW {
                            prop_assert!(
                                measured <= truth,
                                "arrived at {} ms, read at {} ms: measured {:?}, truly {:?}",
                                arrived, t, measured, truth
                            );
                        }
                    }
                    waiting.clear();
                }
            }
        }
    }
}
