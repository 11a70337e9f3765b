//! `smoke`: every mode once, briefly and small, for CI. No timing is asserted; it fails only
//! when the daemon fails, nothing is delivered, a fan-out's counting is off (datagrams it
//! could not read or from an earlier run, deliveries beyond those owed), no handshake
//! completes or the short soak finds a delivery missing or something left behind. Its last
//! line is
//! `smoke: deliveries=N handshakes=N soak_rooms=N`, which the crate's test reads.

use std::time::Duration;

use crate::cli::CapsArg;
use crate::daemon::{is_tmpfs, Daemon, Launcher, StateDir};
use crate::error::{Error, Result};
use crate::fanout::{self, Pace};
use crate::handshake::HandshakeResult;
use crate::inflight::Clients;
use crate::receivers::Draining;
use crate::soak::SoakResult;
use crate::{ceiling, handshake, members, memory, soak};

/// The unit of every timed step: short, since nothing is timed.
const SECOND: Duration = Duration::from_secs(1);

/// Runs the smoke checks.
pub fn run(launcher: &Launcher, draining: Draining, rcvbuf: usize) -> Result<()> {
    let c = ceiling::run(8, 64, SECOND, draining, rcvbuf)?;
    c.print();
    let (deliveries, h) = on_one_daemon(launcher, draining, rcvbuf, c.received_per_sec)?;
    let soaked = soak_briefly(launcher, rcvbuf)?;
    measure_memory(launcher)?;
    let handshakes = h.joins.ok + h.creates.ok;
    let soak_rooms = soaked.totals.cycles;
    println!("smoke: deliveries={deliveries} handshakes={handshakes} soak_rooms={soak_rooms}");
    check_counts(deliveries, handshakes, &h)
}

/// Fan-out, a short sweep and a few handshakes on one daemon, which must still be alive
/// after them; returns the deliveries counted and the handshakes.
fn on_one_daemon(
    launcher: &Launcher,
    draining: Draining,
    rcvbuf: usize,
    ceiling: f64,
) -> Result<(u64, HandshakeResult)> {
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let mut deliveries = fanout_runs(&mut daemon, draining, rcvbuf, ceiling)?;
    deliveries += short_sweep(&mut daemon, draining, rcvbuf, ceiling)?;
    let h = few_handshakes(&daemon, &dir)?;
    daemon.check_alive()?;
    Ok((deliveries, h))
}

/// Plain members paced at 2,000 msg/s, then batch members flat out, each in a room of 8,
/// printed; returns the deliveries they received.
fn fanout_runs(
    daemon: &mut Daemon,
    draining: Draining,
    rcvbuf: usize,
    ceiling: f64,
) -> Result<u64> {
    let mut deliveries = 0;
    for (caps, pace) in [
        (CapsArg::Plain, Pace::Rate(2_000.0)),
        (CapsArg::Batch, Pace::Max),
    ] {
        let room = members::build_room(
            daemon.tcp,
            daemon.udp,
            &format!("smoke-{caps}"),
            8,
            caps,
            rcvbuf,
        )?;
        let mut r = fanout::measure(daemon, &room, 2, 64, caps, pace, SECOND, draining)?;
        r.ceiling_per_sec = Some(ceiling);
        r.print();
        check_counting(&r)?;
        deliveries += r.received;
    }
    Ok(deliveries)
}

/// A two-step sweep of plain members in a room of 8, printed; returns the deliveries its
/// flat-out probe received.
fn short_sweep(
    daemon: &mut Daemon,
    draining: Draining,
    rcvbuf: usize,
    ceiling: f64,
) -> Result<u64> {
    let room = members::build_room(
        daemon.tcp,
        daemon.udp,
        "smoke-sweep",
        8,
        CapsArg::Plain,
        rcvbuf,
    )?;
    let s = fanout::sweep(
        daemon,
        &room,
        2,
        64,
        CapsArg::Plain,
        Duration::from_millis(500),
        2,
        0.1,
        draining,
        ceiling,
    )?;
    s.print();
    Ok(s.max.received)
}

/// Two rounds of 5 rooms with 4 joins each, after a preload of 50 tokens, printed.
fn few_handshakes(daemon: &Daemon, dir: &StateDir) -> Result<HandshakeResult> {
    let h = handshake::run(
        daemon,
        is_tmpfs(dir.path()),
        5,
        4,
        Clients {
            connections: 2,
            threads: 1,
        },
        50,
        2,
    )?;
    h.print();
    Ok(h)
}

/// A 3 s soak on its own daemon, printed; an error when it found a delivery missing or
/// something left behind.
fn soak_briefly(launcher: &Launcher, rcvbuf: usize) -> Result<SoakResult> {
    let soak_dir = StateDir::new(&launcher.state_root)?;
    let mut soak_daemon = launcher.spawn(&soak_dir)?;
    let plan = soak::Plan {
        duration: 3 * SECOND,
        workers: 2,
        max_members: 5,
        sample_every: SECOND,
        reload_every: 2 * SECOND,
        rcvbuf,
    };
    let soaked = soak::run(&mut soak_daemon, &soak_dir, plan)?;
    soaked.print();
    if let problems @ [_, ..] = soaked.problems().as_slice() {
        return Err(Error::Smoke(format!("soak: {}", problems.join("; "))));
    }
    Ok(soaked)
}

/// Memory and start-up with 300 members in rooms of 16, printed.
fn measure_memory(launcher: &Launcher) -> Result<()> {
    let m = memory::run(
        launcher,
        300,
        16,
        Clients {
            connections: 4,
            threads: 1,
        },
    )?;
    m.print();
    Ok(())
}

/// Fails the smoke run when a fan-out's counting is off: a datagram the generator could not
/// read or that came from an earlier run, or more deliveries than owed. Fewer is not checked:
/// on a loaded machine a stall at the end of a run outlasts the receivers' drain (300 ms of
/// quiet), and with a small `rmem_max` it can overflow their sockets, neither of which is the
/// counting's fault.
fn check_counting(r: &fanout::FanoutResult) -> Result<()> {
    if r.undecodable > 0 || r.stale > 0 || r.received > r.expected {
        return Err(Error::Smoke(format!(
            "{} fan-out: received {} of {} owed, {} undecodable, {} stale",
            r.caps, r.received, r.expected, r.undecodable, r.stale
        )));
    }
    Ok(())
}

/// Fails the smoke run when nothing was delivered, no handshake completed, the handshake
/// rounds were not the 2 × 20 joins asked for, the latencies over all rounds are not of all
/// 40, or the daemon's threads over the joins show no event loop ([`check_threads`]).
fn check_counts(deliveries: u64, handshakes: usize, h: &HandshakeResult) -> Result<()> {
    if deliveries == 0 {
        return Err(Error::Smoke("nothing was delivered".into()));
    }
    if handshakes == 0 {
        return Err(Error::Smoke("no handshake completed".into()));
    }
    if h.join_rates.len() != 2 || h.joins.ok != 20 {
        return Err(Error::Smoke(format!(
            "expected 2 rounds of 20 joins, got rates {:?} and {} joins",
            h.join_rates, h.joins.ok
        )));
    }
    let pooled = h.join_latency_all_rounds_us.map(|all| all.count);
    if pooled != Some(40) {
        return Err(Error::Smoke(format!(
            "the join latencies over all rounds counted {pooled:?} joins, not 40"
        )));
    }
    check_threads(h)
}

/// Fails unless the daemon's event loop (`ocmd`) shows time on a CPU among its threads over
/// the joins, where the kernel keeps schedstat at all.
fn check_threads(h: &HandshakeResult) -> Result<()> {
    if !std::path::Path::new("/proc/self/schedstat").exists() {
        return Ok(());
    }
    let threads = h.daemon_threads_per_join.as_deref().unwrap_or_default();
    if !threads.iter().any(|t| t.thread == "ocmd" && t.run_us > 0.0) {
        return Err(Error::Smoke(format!(
            "the daemon's threads over the joins show no event loop on a CPU: {threads:?}"
        )));
    }
    Ok(())
}
