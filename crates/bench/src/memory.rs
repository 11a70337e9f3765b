//! Memory per registered member, and start-up time on a large state.
//!
//! N members are joined in rooms of `room_size` (one TCP connection each), then registered:
//! member `i` of every room sends its REGISTER from shared socket `i`, so addresses are
//! unique within a room (as with real clients) while only `room_size` sockets are needed:
//! REGISTER binds the datagram's source address to the token named in it, and tokens of
//! different rooms may share an address. VmRSS is read fresh, after the joins and after the
//! registrations. Then the daemon gets SIGTERM and is restarted on the same state; the time
//! from spawn to its listening line is the start-up time, and VmRSS is read again: a daemon
//! that loaded its members must not hold more per member than one that saw them join.
//!
//! The figures after the joins, after the registrations and after the restart are each the
//! highest VmRSS seen until it [settles](Settling): the journal's writer and the compactor
//! may still be at work then (a restart on a journal folds it into a new state file), and a
//! read at the first moment could miss what they take.

use std::net::UdpSocket;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ucrp::datagram;

use crate::daemon::{Daemon, Launcher, StateDir};
use crate::error::{Context, Error, Result};
use crate::handshake::{populate, PhaseResult};
use crate::inflight::Clients;

/// REGISTERs sent before waiting for the daemon to catch up.
const REGISTER_CHUNK: usize = 2_000;
/// Passes over all members before giving up on registering them.
const REGISTER_PASSES: usize = 4;

/// Result of the memory mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryResult {
    /// Members created and registered.
    pub members: usize,
    /// Members per room.
    pub room_size: usize,
    /// Start-up time of the empty daemon, ms.
    pub startup_empty_ms: f64,
    /// VmRSS right after start, KiB.
    pub rss_fresh_kib: u64,
    /// VmRSS after the joins, KiB.
    pub rss_joined_kib: u64,
    /// VmRSS after the registrations, KiB.
    pub rss_registered_kib: u64,
    /// (registered − fresh) / members, bytes.
    pub bytes_per_member: f64,
    /// (registered − joined) / members, bytes: what registration alone adds.
    pub bytes_per_registration: f64,
    /// The joins (after every room's create).
    pub joins: PhaseResult,
    /// `ocm_members_registered` at the end.
    pub registered: f64,
    /// Time to register them all, seconds.
    pub register_seconds: f64,
    /// SIGTERM to exit (state flushed), ms.
    pub stop_ms: f64,
    /// Spawn to listening line on the saved state, ms.
    pub startup_loaded_ms: f64,
    /// `ocm_members` after the restart.
    pub members_after_restart: f64,
    /// VmRSS of the restarted daemon once listening, KiB (0 in results from before it was
    /// measured).
    #[serde(default)]
    pub rss_restarted_kib: u64,
    /// Size of the state directory after the stop, bytes.
    pub state_bytes: u64,
    /// CPU the daemon's event loop used per second while it held every member and nothing
    /// came, ms (the liveness sweeps, every `sweep_interval_ms`); `None` in results from
    /// before it was measured, or where the kernel does not count a thread's CPU time.
    #[serde(default)]
    pub idle_cpu_ms_per_sec: Option<f64>,
}

impl MemoryResult {
    /// (restarted − fresh) / members restored, bytes: memory per member of a daemon that
    /// loaded them from its state file; `None` if not measured. (Dividing by the members
    /// restored, not created, keeps a restart that lost some from looking lean.)
    pub fn bytes_per_member_restarted(&self) -> Option<f64> {
        (self.rss_restarted_kib > 0).then(|| {
            (self.rss_restarted_kib.saturating_sub(self.rss_fresh_kib) * 1024) as f64
                / self.members_after_restart.max(1.0)
        })
    }

    /// The human-readable report.
    pub fn print(&self) {
        println!(
            "memory: {} members in rooms of {} ({} joins/s while growing)",
            self.members,
            self.room_size,
            crate::report::si(self.joins.per_sec)
        );
        println!(
            "  VmRSS fresh {} KiB, joined {} KiB, registered {} KiB ({} registered in {:.1}s)",
            self.rss_fresh_kib,
            self.rss_joined_kib,
            self.rss_registered_kib,
            self.registered,
            self.register_seconds
        );
        println!(
            "  RSS per registered member {:.0} bytes (registration alone {:.0} bytes)",
            self.bytes_per_member, self.bytes_per_registration
        );
        if let Some(ms) = self.idle_cpu_ms_per_sec {
            println!(
                "  idle with them ({} s, nothing sent): ocmd's loop used {ms:.2} ms of CPU per second",
                IDLE_FOR.as_secs()
            );
        }
        if let Some(bytes) = self.bytes_per_member_restarted() {
            println!(
                "  after a restart on that state: VmRSS {} KiB, {bytes:.0} bytes per member",
                self.rss_restarted_kib
            );
        }
        println!(
            "startup: empty state {:.1} ms; SIGTERM→exit {:.0} ms; restart on {} tokens ({} bytes of state) {:.1} ms, {} members restored",
            self.startup_empty_ms,
            self.stop_ms,
            self.members,
            self.state_bytes,
            self.startup_loaded_ms,
            self.members_after_restart
        );
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Sends REGISTER for every token until the daemon reports them all registered.
fn register_all(daemon: &Daemon, rooms: &[(String, Vec<String>)], room_size: usize) -> Result<f64> {
    let sockets: Vec<UdpSocket> = (0..room_size.max(1))
        .map(|_| UdpSocket::bind("127.0.0.1:0").ctx("bind register socket"))
        .collect::<Result<_>>()?;
    let total: usize = rooms.iter().map(|(_, t)| t.len()).sum();
    let registered = || daemon.scrape().map(|s| s.total("ocm_members_registered"));
    let received = || {
        daemon
            .scrape()
            .map(|s| s.total("ocm_datagrams_received_total"))
    };
    let mut d = Vec::new();
    for _ in 0..REGISTER_PASSES {
        let baseline = received()?;
        let mut sent = 0usize;
        for (room, tokens) in rooms {
            for (i, token) in tokens.iter().enumerate() {
                d.clear();
                datagram::encode(
                    room.as_bytes(),
                    token.as_bytes(),
                    datagram::REGISTER,
                    &mut d,
                )?;
                sockets[i % sockets.len()]
                    .send_to(&d, daemon.udp)
                    .ctx("send REGISTER")?;
                sent += 1;
                if sent.is_multiple_of(REGISTER_CHUNK) {
                    // Keep at most one chunk in flight so the daemon's socket never overflows.
                    let target = baseline + (sent - REGISTER_CHUNK) as f64;
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while received()? < target && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let now = registered()?;
            if now >= total as f64 {
                return Ok(now);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let now = registered()?;
    if now <= 0.0 {
        return Err(Error::Register("no REGISTER took effect".into()));
    }
    Ok(now)
}

/// Runs the memory and start-up measurement.
pub fn run(
    launcher: &Launcher,
    members: usize,
    room_size: usize,
    clients: Clients,
) -> Result<MemoryResult> {
    if room_size < 1 || members < 1 {
        return Err(Error::Usage(
            "--members and --room-size must be at least 1".into(),
        ));
    }
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let startup_empty_ms = daemon.startup.as_secs_f64() * 1e3;
    thread::sleep(Duration::from_millis(100));
    let rss_fresh_kib = daemon.rss_kib()?;
    let populated = populate(daemon.tcp, "mem", members, room_size, clients)?;
    for p in [&populated.creates, &populated.joins] {
        if let Some(e) = &p.first_error {
            eprintln!("memory: {} requests failed; first: {e}", p.errors);
        }
    }
    let (joins, rooms) = (populated.joins, populated.rooms);
    let created = populated.creates.ok + joins.ok;
    daemon.check_alive()?;
    let rss_joined_kib = settled_rss_kib(&daemon)?;
    let t = Instant::now();
    let registered = register_all(&daemon, &rooms, room_size)?;
    let register_seconds = t.elapsed().as_secs_f64();
    let rss_registered_kib = settled_rss_kib(&daemon)?;
    let idle_cpu_ms_per_sec = idle_loop_cpu(&daemon);
    let stop_ms = daemon.stop()?.as_secs_f64() * 1e3;
    let state_bytes = dir_bytes(dir.path());
    let restarted = launcher.spawn(&dir)?;
    let rss_restarted_kib = settled_rss_kib(&restarted)?;
    let members_after_restart = restarted.scrape()?.total("ocm_members");
    let startup_loaded_ms = restarted.startup.as_secs_f64() * 1e3;
    drop(restarted);
    let n = created.max(1) as f64;
    Ok(MemoryResult {
        members: created,
        room_size,
        startup_empty_ms,
        rss_fresh_kib,
        rss_joined_kib,
        rss_registered_kib,
        bytes_per_member: (rss_registered_kib.saturating_sub(rss_fresh_kib) * 1024) as f64 / n,
        bytes_per_registration: (rss_registered_kib.saturating_sub(rss_joined_kib) * 1024) as f64
            / n,
        joins,
        registered,
        register_seconds,
        stop_ms,
        startup_loaded_ms,
        members_after_restart,
        rss_restarted_kib,
        state_bytes,
        idle_cpu_ms_per_sec,
    })
}

/// How often [`settled_rss_kib`] reads VmRSS.
const SETTLE_READ_EVERY: Duration = Duration::from_millis(100);
/// Reads in a row, none more than [`SETTLE_BAND_KIB`] above the highest before them, that
/// make VmRSS settled (one second).
const SETTLE_READS: usize = 10;
/// How far a read may rise above the highest before its run and still count as settled: 256 KiB, about 0.3%
/// of a daemon holding 100,000 members (an allocator's trim or a stack page is not a trend).
const SETTLE_BAND_KIB: u64 = 256;
/// Reads after which the highest seen is taken, settled or not (ten seconds).
const SETTLE_MAX_READS: usize = 100;

/// The highest VmRSS of `daemon` seen until it settles, KiB.
fn settled_rss_kib(daemon: &Daemon) -> Result<u64> {
    let mut settling = Settling::default();
    loop {
        if let Some(kib) = settling.read(daemon.rss_kib()?) {
            return Ok(kib);
        }
        thread::sleep(SETTLE_READ_EVERY);
    }
}

/// Reads of a resident size, in order, until it settles: [`SETTLE_READS`] reads in a row
/// none more than [`SETTLE_BAND_KIB`] above the highest before the first of them (a read
/// above that starts the run again, so a slow climb never settles), or [`SETTLE_MAX_READS`]
/// reads in all. What counts is the highest seen: memory taken for a moment is memory the
/// machine must have.
#[derive(Debug, Default)]
struct Settling {
    /// The highest read so far.
    highest: u64,
    /// The highest read before the current run: its reads must stay within the band of it.
    base: u64,
    /// Reads in the current run.
    steady: usize,
    /// Reads in all.
    reads: usize,
}

impl Settling {
    /// Takes one read; returns the highest seen once settled.
    fn read(&mut self, kib: u64) -> Option<u64> {
        self.reads += 1;
        if self.reads == 1 || kib > self.base + SETTLE_BAND_KIB {
            self.base = self.highest.max(kib);
            self.steady = 1;
        } else {
            self.steady += 1;
        }
        self.highest = self.highest.max(kib);
        (self.steady >= SETTLE_READS || self.reads >= SETTLE_MAX_READS).then_some(self.highest)
    }
}

/// How long the daemon is idle for [`idle_loop_cpu`].
const IDLE_FOR: Duration = Duration::from_secs(3);

/// CPU the daemon's event loop uses per second while nothing comes, ms. The loop alone: the
/// journal writer and the compactor may still be busy with the registrations.
fn idle_loop_cpu(daemon: &crate::daemon::Daemon) -> Option<f64> {
    let before = daemon.loop_cpu_time()?;
    thread::sleep(IDLE_FOR);
    let used = daemon.loop_cpu_time()?.saturating_sub(before);
    Some(used.as_secs_f64() * 1e3 / IDLE_FOR.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `reads` to a new [`Settling`]; returns the read (counted from 1) at which it
    /// settled and the figure it gave, or `None` if it never did.
    fn settle(reads: impl IntoIterator<Item = u64>) -> Option<(usize, u64)> {
        let mut settling = Settling::default();
        reads
            .into_iter()
            .enumerate()
            .find_map(|(i, kib)| settling.read(kib).map(|got| (i + 1, got)))
    }

    #[test]
    fn a_steady_size_settles_after_a_run_of_reads() {
        assert_eq!(settle([80_000; 20]), Some((SETTLE_READS, 80_000)));
    }

    #[test]
    fn a_jump_starts_the_run_again_and_the_highest_is_what_counts() {
        // A compaction's buffer: up by 8 MiB for three reads, then given back.
        let mut reads = vec![80_000; 4];
        reads.extend([88_192; 3]);
        reads.extend([80_000; 20]);
        assert_eq!(settle(reads), Some((4 + SETTLE_READS, 88_192)));
    }

    #[test]
    fn a_slow_climb_within_the_band_at_each_step_does_not_settle_until_it_stops() {
        // 200 KiB a read: each within the band of the one before, not of the run's start.
        let climb = (0..30).map(|i| 80_000 + 200 * i);
        let top = 80_000 + 200 * 29;
        let reads: Vec<u64> = climb.chain([top; 20]).collect();
        let (at, got) = settle(reads).expect("settles once the climb stops");
        assert_eq!(got, top);
        assert!(at > 30, "settled at read {at}, during the climb");
    }

    #[test]
    fn reads_within_the_band_count_as_steady() {
        let reads = (0..20).map(|i| 80_000 + if i % 2 == 0 { 0 } else { SETTLE_BAND_KIB });
        assert_eq!(
            settle(reads),
            Some((SETTLE_READS, 80_000 + SETTLE_BAND_KIB))
        );
    }

    #[test]
    fn a_size_that_never_settles_is_taken_at_the_last_read() {
        let reads = (0..200).map(|i| 80_000 + 1_000 * i);
        assert_eq!(
            settle(reads),
            Some((
                SETTLE_MAX_READS,
                80_000 + 1_000 * (SETTLE_MAX_READS as u64 - 1)
            ))
        );
    }
}
