//! `soak`: a long run of churn against one daemon, sampled, to show what a short benchmark
//! cannot: that nothing in `ocmd` grows while the load stays the same, and that nothing is
//! left behind once it stops.
//!
//! Worker threads repeat one cycle, each in rooms of its own:
//! 1. create a room of 2 to N members (plain or batch members, at random), join and register
//!    them all ([`crate::members::build_room_with`]);
//! 2. every member sends one message, which every other member must receive;
//! 3. every odd member sends `__LEAVE__`; once the host (which asks for notices) has heard
//!    each of them leave, it sends one more message, which only the members still in the
//!    room may receive;
//! 4. the host leaves, and every member still in the room must get `__ROOM_CLOSED__`; by
//!    then nothing may have reached a member that left, neither the host's last message nor
//!    the closure;
//! 5. junk, each piece of which the daemon must count as a dropped datagram: random bytes,
//!    the room's frame with a token one byte off, a header longer than its datagram; and every
//!    eighth cycle a TCP connection that stops inside a header, and one of garbage, which the
//!    daemon must close;
//! 6. in a worker's first cycle and every sixteenth, a room whose host promises a keepalive
//!    every second and then says nothing: the daemon must expire it and close the room.
//!
//! Meanwhile the main thread sends `SIGHUP` (a configuration reload) every so often and
//! samples the daemon: resident size, open descriptors, threads, bytes of state on disk, and
//! its room, member, tombstone and connection gauges. When the time is up the load stops and,
//! once the daemon is idle, a last sample must show no room or member left, no more open
//! connections (the sampler's own scrape is one) or descriptors than at the start, every
//! reload applied, and the daemon's own counts of drops and expiries equal to the junk and
//! the silent hosts sent.
//!
//! This module runs the soak and samples the daemon; `cycle` is a worker's cycle and the
//! junk it sends; `verdict` the totals, the samples and what a run must show to pass.

mod cycle;
#[cfg(test)]
mod tests;
mod verdict;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::daemon::{Daemon, StateDir};
use crate::error::{Error, Result};
use cycle::work;
pub use verdict::{Sample, SoakResult, Totals};

/// How long a member waits for what it must receive.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection of garbage may stay open before the daemon must have closed it.
const JUNK_CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How long the daemon may take to be idle after the load stops (a silent host takes about
/// three keepalive intervals to expire).
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);

/// What a soak run does.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    /// How long the load runs.
    pub duration: Duration,
    /// Worker threads, each cycling through rooms of its own.
    pub workers: usize,
    /// The largest room a cycle makes, host included (at least 2).
    pub max_members: usize,
    /// Time between two samples.
    pub sample_every: Duration,
    /// Time between two `SIGHUP`s; zero sends none.
    pub reload_every: Duration,
    /// SO_RCVBUF asked for on the members' sockets.
    #[serde(skip)]
    pub rcvbuf: usize,
}

impl Plan {
    /// Refuses a plan that cannot run: no worker, or rooms of fewer than two members.
    pub fn check(&self) -> Result<()> {
        if self.workers == 0 || self.max_members < 2 {
            return Err(Error::Usage(
                "soak needs --workers ≥ 1 and --max-members ≥ 2".into(),
            ));
        }
        Ok(())
    }
}

/// What the workers did, counted as they go.
#[derive(Debug, Default)]
struct Counters {
    cycles: AtomicU64,
    members: AtomicU64,
    messages: AtomicU64,
    expected: AtomicU64,
    received: AtomicU64,
    closures_expected: AtomicU64,
    closures_received: AtomicU64,
    unexpected: AtomicU64,
    junk_datagrams: AtomicU64,
    junk_connections: AtomicU64,
    silent_hosts: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn failed(&self, e: &Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| e.to_string());
        }
    }

    fn totals(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            cycles: get(&self.cycles),
            members: get(&self.members),
            messages: get(&self.messages),
            expected: get(&self.expected),
            received: get(&self.received),
            closures_expected: get(&self.closures_expected),
            closures_received: get(&self.closures_received),
            unexpected: get(&self.unexpected),
            junk_datagrams: get(&self.junk_datagrams),
            junk_connections: get(&self.junk_connections),
            dropped: 0.0,
            segmented: 0.0,
            silent_hosts: get(&self.silent_hosts),
            expiries: 0.0,
            reloads_applied: 0.0,
            errors: get(&self.errors),
            first_error: self.first_error.lock().ok().and_then(|f| f.clone()),
        }
    }
}

/// Runs the soak against a daemon started on `dir`.
pub fn run(daemon: &mut Daemon, dir: &StateDir, plan: Plan) -> Result<SoakResult> {
    plan.check()?;
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let start = Sample::take(daemon, dir.path(), 0.0, 0)?;
    let began = Instant::now();
    let mut samples = Vec::new();
    let mut reloads = 0;
    let (tcp, udp) = (daemon.tcp, daemon.udp);
    let outcome = thread::scope(|s| {
        for worker in 0..plan.workers {
            let (counters, stop) = (&counters, &stop);
            s.spawn(move || work(worker, tcp, udp, plan, counters, stop));
        }
        let result = watch(
            daemon,
            dir,
            plan,
            began,
            &counters,
            &mut samples,
            &mut reloads,
        );
        stop.store(true, Ordering::Relaxed);
        result
    });
    outcome?;
    let idle = settle(daemon, dir, began, &counters, &start)?;
    let mut totals = counters.totals();
    totals.expiries = idle.expiries - start.expiries;
    totals.dropped = idle.dropped - start.dropped;
    totals.segmented = idle.segmented - start.segmented;
    totals.reloads_applied = idle.reloads_applied - start.reloads_applied;
    Ok(SoakResult {
        plan,
        start,
        samples,
        idle,
        reloads,
        totals,
    })
}

/// The main thread's part while the load runs: reloads and samples. The rows go to stderr as
/// they come, so that a long run shows its progress and stdout holds only the report.
fn watch(
    daemon: &mut Daemon,
    dir: &StateDir,
    plan: Plan,
    began: Instant,
    counters: &Counters,
    samples: &mut Vec<Sample>,
    reloads: &mut u64,
) -> Result<()> {
    let mut next_sample = plan.sample_every;
    let mut next_reload = plan.reload_every;
    eprintln!("  {}", Sample::HEADER);
    loop {
        let elapsed = began.elapsed();
        if elapsed >= plan.duration {
            return Ok(());
        }
        let mut wake = next_sample.min(plan.duration);
        if !plan.reload_every.is_zero() {
            wake = wake.min(next_reload);
        }
        thread::sleep(wake.saturating_sub(elapsed).min(Duration::from_millis(200)));
        let elapsed = began.elapsed();
        daemon.check_alive()?;
        if !plan.reload_every.is_zero() && elapsed >= next_reload {
            daemon.signal(libc::SIGHUP);
            *reloads += 1;
            next_reload += plan.reload_every;
        }
        if elapsed >= next_sample {
            let cycles = counters.cycles.load(Ordering::Relaxed);
            let sample = Sample::take(daemon, dir.path(), elapsed.as_secs_f64(), cycles)?;
            eprintln!("  {}", sample.row());
            samples.push(sample);
            next_sample += plan.sample_every;
        }
    }
}

/// Waits until the daemon is idle ([`Sample::is_idle`]) or the deadline passes, and takes the
/// last sample. Descriptors are part of the test, since the daemon holds some for a moment
/// (reading `/proc/self/net/udp`, rotating its journal).
fn settle(
    daemon: &mut Daemon,
    dir: &StateDir,
    began: Instant,
    counters: &Counters,
    start: &Sample,
) -> Result<Sample> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        daemon.check_alive()?;
        let cycles = counters.cycles.load(Ordering::Relaxed);
        let sample = Sample::take(daemon, dir.path(), began.elapsed().as_secs_f64(), cycles)?;
        if sample.is_idle(start) || Instant::now() >= deadline {
            return Ok(sample);
        }
        thread::sleep(Duration::from_millis(100));
    }
}
