//! The standard matrix behind `scripts/bench`: fan-out at M = 16, 64, 256 (S = 2, B = 128,
//! flat out and at half the delivered rate, plain and batch members) beside the sendto
//! ceiling; the loss < 0.1% sweep at M = 64; handshakes (R = 200, K = 16, C = 16) on an empty
//! and a preloaded state; memory per member and start-up time. Writes `docs/BENCHMARKS.md`
//! and `docs/bench.svg` (the Markdown's tables and wording are [`report`]'s).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ceiling::{self, CeilingResult};
use crate::cli::CapsArg;
use crate::daemon::{is_tmpfs, Daemon, Launcher, StateDir};
use crate::error::{Context, Result};
use crate::fanout::{self, FanoutResult, Pace, SweepResult};
use crate::handshake::{self, HandshakeResult};
use crate::inflight::Clients;
use crate::members::{self, Room};
use crate::memory::{self, MemoryResult};
use crate::receivers::Draining;
use crate::report::{loadavg, machine_busy_pct, Machine};
use crate::svg;

mod report;

/// Room sizes of the fan-out rows.
pub const SIZES: [usize; 3] = [16, 64, 256];
/// Senders per room.
const SENDERS: usize = 2;
/// Text bytes per message.
const BYTES: usize = 128;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Seconds per fan-out run.
    pub duration: Duration,
    /// Tokens for the preload and memory runs.
    pub state_tokens: usize,
    /// How the receiver threads drain the members' sockets.
    pub draining: Draining,
    /// Client socket receive buffer.
    pub client_rcvbuf: usize,
    /// The command recorded in the report.
    pub command: String,
}

/// One room size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeRow {
    /// Members.
    pub members: usize,
    /// The sendto ceiling.
    pub ceiling: CeilingResult,
    /// Plain members, flat out.
    pub plain_max: FanoutResult,
    /// Plain members at half the flat-out delivered rate.
    pub plain_half: FanoutResult,
    /// Batch members, flat out.
    pub batch_max: FanoutResult,
    /// Batch members at half the flat-out delivered rate.
    pub batch_half: FanoutResult,
}

/// Everything the matrix measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// UTC date and time of the start.
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// The workspace revision measured.
    pub revision: String,
    /// The command.
    pub command: String,
    /// Whole-machine busy CPU over 2 s just before the start, % (other load, e.g. a fuzzer).
    pub busy_before_pct: f64,
    /// 1-minute load average before and after.
    pub loadavg_before: f64,
    /// See `loadavg_before`.
    pub loadavg_after: f64,
    /// Seconds the matrix took.
    pub seconds: f64,
    /// Receiver threads.
    pub receivers: usize,
    /// Microseconds a receiver thread polled after its last datagram before sleeping
    /// (absent from reports made before the option: they slept at once).
    #[serde(default)]
    pub receiver_poll_us: u64,
    /// Whether a polling receiver read every socket in turn rather than ask epoll
    /// (`--receiver-sweep`; absent from reports made before the option: they asked epoll).
    #[serde(default)]
    pub receiver_sweep: bool,
    /// The niceness `ocmd` ran at (the load generator runs at 0).
    #[serde(default)]
    pub daemon_nice: i32,
    /// Whether every paced step ran its senders at real-time priority (`--sender-priority`;
    /// false when the receiver paced them, at normal priority); `None` in reports made before
    /// the option (normal priority).
    #[serde(default)]
    pub paced_senders_realtime: Option<bool>,
    /// Whether every paced step's senders were driven by the first receiver thread
    /// (`--pacer receiver`); `None` in reports made before the option (a thread of their own).
    #[serde(default)]
    pub paced_by_receiver: Option<bool>,
    /// How much of its schedule a held-up paced sender sent late, milliseconds
    /// (`--catch-up-ms`); `None` in reports made before the option (2 ms).
    #[serde(default)]
    pub paced_catch_up_ms: Option<u64>,
    /// Whether the senders made segmented sends (`--sender-segments`; absent from reports
    /// made before the option: one datagram at a time).
    #[serde(default)]
    pub sender_segments: bool,
    /// Fan-out rows.
    pub rows: Vec<SizeRow>,
    /// Sweeps at M = 64: plain, batch4k, batch.
    pub sweeps: Vec<SweepResult>,
    /// Batch members, M = 64, paced at 3M deliveries/s: half the 6M target.
    #[serde(default)]
    pub batch_at_3m: Option<FanoutResult>,
    /// Handshakes on an empty state.
    pub handshakes: HandshakeResult,
    /// Handshakes after the preload.
    pub handshakes_preloaded: HandshakeResult,
    /// Memory and start-up.
    pub memory: MemoryResult,
}

/// `git rev-parse --short HEAD`, marked dirty when crates/server has local changes.
fn revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) if !rev.is_empty() => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "crates/server",
                "crates/ucrp",
                "crates/tcrp",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev} (with uncommitted daemon changes)")
            } else {
                rev
            }
        }
        _ => "?".into(),
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn fanout_pair(
    launcher: &Launcher,
    plan: &Plan,
    m: usize,
    caps: CapsArg,
    ceiling: f64,
) -> Result<(FanoutResult, FanoutResult)> {
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let room = members::build_room(daemon.tcp, daemon.udp, "bench", m, caps, plan.client_rcvbuf)?;
    let run = |daemon: &mut _, pace| {
        fanout::measure(
            daemon,
            &room,
            SENDERS,
            BYTES,
            caps,
            pace,
            plan.duration,
            plan.draining,
        )
    };
    let mut max = run(&mut daemon, Pace::Max)?;
    max.ceiling_per_sec = Some(ceiling);
    max.print();
    let delivered_msgs = max.deliveries_per_sec / (m - 1) as f64;
    let mut half = run(&mut daemon, Pace::Rate((delivered_msgs / 2.0).max(10.0)))?;
    half.ceiling_per_sec = Some(ceiling);
    half.print();
    Ok((max, half))
}

/// The sendto ceiling for M members and the matrix's text size (at most 3 s), printed.
fn measure_ceiling(plan: &Plan, members: usize) -> Result<CeilingResult> {
    let c = ceiling::run(
        members,
        BYTES,
        plan.duration.min(Duration::from_secs(3)),
        plan.draining,
        plan.client_rcvbuf,
    )?;
    c.print();
    Ok(c)
}

/// Runs the matrix, printing each result as it comes.
pub fn run(launcher: &Launcher, plan: &Plan) -> Result<Results> {
    let date = utc_now();
    // Read before the runs, as the date is: the daemon under test was built from the tree as
    // it is now, and an edit made while the matrix runs is not in it.
    let revision = revision();
    let started = std::time::Instant::now();
    let loadavg_before = loadavg();
    let busy_before_pct = machine_busy_pct(Duration::from_secs(2));
    // On the idle machine, before the runs: it times a system call.
    let machine = Machine::probe();
    println!(
        "matrix: machine busy {busy_before_pct:.0}% before start, loadavg {loadavg_before:.2}; \
         a null system call {}",
        machine
            .null_syscall_ns
            .map_or_else(|| "not timed".to_owned(), |ns| format!("{ns:.0} ns"))
    );
    let rows = SIZES
        .into_iter()
        .map(|m| measure_size_row(launcher, plan, m))
        .collect::<Result<Vec<_>>>()?;
    let (sweeps, batch_at_3m) = measure_sweeps(launcher, plan, ceiling_at_64(&rows))?;
    let handshakes = measure_handshakes(launcher, 0)?;
    let handshakes_preloaded = measure_handshakes(launcher, plan.state_tokens)?;
    let memory = memory::run(launcher, plan.state_tokens, 64, Clients::STANDARD)?;
    memory.print();
    Ok(Results {
        date,
        machine,
        revision,
        command: plan.command.clone(),
        busy_before_pct,
        loadavg_before,
        loadavg_after: loadavg(),
        seconds: started.elapsed().as_secs_f64(),
        receivers: plan.draining.threads,
        receiver_poll_us: u64::try_from(plan.draining.poll.as_micros()).unwrap_or(u64::MAX),
        receiver_sweep: plan.draining.sweep,
        daemon_nice: launcher.nice,
        paced_senders_realtime: every_paced_run(&sweeps, batch_at_3m.as_ref(), |r| {
            r.paced_senders_realtime
        }),
        paced_by_receiver: every_paced_run(&sweeps, batch_at_3m.as_ref(), |r| r.paced_by_receiver),
        paced_catch_up_ms: Some(crate::fanout::catch_up_ms()),
        sender_segments: crate::fanout::segmented_sends(),
        rows,
        sweeps,
        batch_at_3m,
        handshakes,
        handshakes_preloaded,
        memory,
    })
}

/// One room size: its ceiling, then plain and batch members flat out and at half.
fn measure_size_row(launcher: &Launcher, plan: &Plan, m: usize) -> Result<SizeRow> {
    let c = measure_ceiling(plan, m)?;
    let (plain_max, plain_half) =
        fanout_pair(launcher, plan, m, CapsArg::Plain, c.received_per_sec)?;
    let (batch_max, batch_half) =
        fanout_pair(launcher, plan, m, CapsArg::Batch, c.received_per_sec)?;
    Ok(SizeRow {
        members: m,
        ceiling: c,
        plain_max,
        plain_half,
        batch_max,
        batch_half,
    })
}

/// The M = 64 row's ceiling, which the sweeps are compared with (0 when there is none).
fn ceiling_at_64(rows: &[SizeRow]) -> f64 {
    rows.iter()
        .find(|r| r.members == 64)
        .map_or(0.0, |r| r.ceiling.received_per_sec)
}

/// The sweeps at M = 64 (plain, batch4k, batch), each on a fresh daemon, and batch members
/// paced at 3M deliveries/s on the batch sweep's daemon.
fn measure_sweeps(
    launcher: &Launcher,
    plan: &Plan,
    ceiling: f64,
) -> Result<(Vec<SweepResult>, Option<FanoutResult>)> {
    let mut sweeps = Vec::new();
    let mut batch_at_3m = None;
    for caps in [CapsArg::Plain, CapsArg::Batch4k, CapsArg::Batch] {
        let dir = StateDir::new(&launcher.state_root)?;
        let mut daemon = launcher.spawn(&dir)?;
        let room = members::build_room(
            daemon.tcp,
            daemon.udp,
            "sweep",
            64,
            caps,
            plan.client_rcvbuf,
        )?;
        sweeps.push(sweep_at_64(&mut daemon, &room, plan, caps, ceiling)?);
        if caps == CapsArg::Batch {
            batch_at_3m = Some(batch_at_3m_deliveries(&mut daemon, &room, plan, ceiling)?);
        }
    }
    Ok((sweeps, batch_at_3m))
}

/// One sweep at M = 64, printed; the plain one between two fresh measurements of the ceiling.
fn sweep_at_64(
    daemon: &mut Daemon,
    room: &Room,
    plan: &Plan,
    caps: CapsArg,
    ceiling: f64,
) -> Result<SweepResult> {
    // The plain target is a ratio to the ceiling, and the machine's speed drifts within
    // minutes: measure the ceiling again right around that sweep.
    let before = if caps == CapsArg::Plain {
        Some(measure_ceiling(plan, 64)?.received_per_sec)
    } else {
        None
    };
    let mut s = fanout::sweep(
        daemon,
        room,
        SENDERS,
        BYTES,
        caps,
        Duration::from_secs(2),
        7,
        0.1,
        plan.draining,
        before.unwrap_or(ceiling),
    )?;
    if let Some(before) = before {
        let after = measure_ceiling(plan, 64)?.received_per_sec;
        s.ceiling_around = Some((before, after));
        s.ceiling_per_sec = (before + after) / 2.0;
    }
    s.print();
    Ok(s)
}

/// Batch members at M = 64 paced at 3M deliveries/s (half the 6M target), printed.
fn batch_at_3m_deliveries(
    daemon: &mut Daemon,
    room: &Room,
    plan: &Plan,
    ceiling: f64,
) -> Result<FanoutResult> {
    let mut at = fanout::measure(
        daemon,
        room,
        SENDERS,
        BYTES,
        CapsArg::Batch,
        Pace::Rate(3e6 / 63.0),
        plan.duration,
        plan.draining,
    )?;
    at.ceiling_per_sec = Some(ceiling);
    at.print();
    Ok(at)
}

/// Handshakes (R = 200, K = 16) on a fresh daemon after preloading `preload` tokens, printed.
fn measure_handshakes(launcher: &Launcher, preload: usize) -> Result<HandshakeResult> {
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let h = handshake::run(
        &daemon,
        is_tmpfs(dir.path()),
        200,
        16,
        Clients::STANDARD,
        preload,
        5,
    )?;
    daemon.check_alive()?;
    h.print();
    Ok(h)
}

/// Whether `how` holds of every paced run (sweep steps, runs at half, the 3M run): real-time
/// senders, senders driven by the receiver; `None` when any result predates the option.
fn every_paced_run(
    sweeps: &[SweepResult],
    batch_at_3m: Option<&FanoutResult>,
    how: impl Fn(&FanoutResult) -> Option<bool>,
) -> Option<bool> {
    sweeps
        .iter()
        .flat_map(|s| s.steps.iter().chain(&s.half))
        .chain(batch_at_3m)
        .map(how)
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().all(|&on| on))
}

/// Writes the Markdown, the SVG and (optionally) the raw JSON.
pub fn write(r: &Results, md: &Path, svg_path: &Path, json: Option<&Path>) -> Result<()> {
    let mut text = report::markdown(r);
    text.push_str(&notes());
    std::fs::write(md, text).ctx(format!("write {}", md.display()))?;
    std::fs::write(svg_path, svg::chart(r)).ctx(format!("write {}", svg_path.display()))?;
    if let Some(path) = json {
        let body = serde_json::to_string_pretty(r).unwrap_or_default();
        std::fs::write(path, body).ctx(format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Hand-written notes (how to run, method, observations, where the targets stand) appended
/// after the tables. The run-by-run log, docs/BENCHMARK-RUNS.md, is not embedded: it is kept
/// by hand.
fn notes() -> String {
    include_str!("../NOTES.md").to_owned()
}

#[cfg(test)]
mod tests {
    /// docs/BENCHMARKS.md is written by the matrix with NOTES.md appended: after an edit of
    /// the notes, re-render it (`ocm-bench matrix --from-json target/bench-results.json
    /// --markdown docs/BENCHMARKS.md --svg docs/bench.svg`) so the two never disagree.
    #[test]
    fn the_committed_report_carries_the_current_notes() {
        let report = include_str!("../../../docs/BENCHMARKS.md");
        assert!(
            report.contains(super::notes().trim()),
            "docs/BENCHMARKS.md is older than crates/bench/NOTES.md: re-render it"
        );
    }
}
