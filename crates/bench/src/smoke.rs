//! `smoke`: every mode once, briefly and small, for CI. No timing is asserted; it fails only
//! when the daemon fails, nothing is delivered, no handshake completes or the short soak
//! finds a delivery missing or something left behind. Its last line is
//! `smoke: deliveries=N handshakes=N soak_rooms=N`, which the crate's test reads.

use std::time::Duration;

use crate::cli::CapsArg;
use crate::daemon::{is_tmpfs, Launcher, StateDir};
use crate::error::{Error, Result};
use crate::fanout::{self, Pace};
use crate::inflight::Clients;
use crate::receivers::Draining;
use crate::{ceiling, handshake, members, memory, soak};

/// Runs the smoke checks.
pub fn run(launcher: &Launcher, draining: Draining, rcvbuf: usize) -> Result<()> {
    let second = Duration::from_secs(1);
    let c = ceiling::run(8, 64, second, draining, rcvbuf)?;
    c.print();
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
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
        let mut r = fanout::measure(&mut daemon, &room, 2, 64, caps, pace, second, draining)?;
        r.ceiling_per_sec = Some(c.received_per_sec);
        r.print();
        deliveries += r.received;
    }
    let room = members::build_room(
        daemon.tcp,
        daemon.udp,
        "smoke-sweep",
        8,
        CapsArg::Plain,
        rcvbuf,
    )?;
    let s = fanout::sweep(
        &mut daemon,
        &room,
        2,
        64,
        CapsArg::Plain,
        Duration::from_millis(500),
        2,
        0.1,
        draining,
        c.received_per_sec,
    )?;
    s.print();
    deliveries += s.max.received;
    let h = handshake::run(
        &daemon,
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
    daemon.check_alive()?;
    drop(daemon);
    let soak_dir = StateDir::new(&launcher.state_root)?;
    let mut soak_daemon = launcher.spawn(&soak_dir)?;
    let plan = soak::Plan {
        duration: 3 * second,
        workers: 2,
        max_members: 5,
        sample_every: second,
        reload_every: 2 * second,
        rcvbuf,
    };
    let soaked = soak::run(&mut soak_daemon, &soak_dir, plan)?;
    soaked.print();
    if let problems @ [_, ..] = soaked.problems().as_slice() {
        return Err(Error::Smoke(format!("soak: {}", problems.join("; "))));
    }
    drop(soak_daemon);
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
    let handshakes = h.joins.ok + h.creates.ok;
    let soak_rooms = soaked.totals.cycles;
    println!("smoke: deliveries={deliveries} handshakes={handshakes} soak_rooms={soak_rooms}");
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
    Ok(())
}
