//! The standard matrix behind `scripts/bench`: fan-out at M = 16, 64, 256 (S = 2, B = 128,
//! flat out and at half the delivered rate, plain and batch members) beside the sendto
//! ceiling; the loss < 0.1% sweep at M = 64; handshakes (R = 200, K = 16, C = 16) on an empty
//! and a preloaded state; memory per member and start-up time. Writes `docs/BENCHMARKS.md`
//! and `docs/bench.svg`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ceiling::{self, CeilingResult};
use crate::cli::CapsArg;
use crate::daemon::{is_tmpfs, Launcher, StateDir};
use crate::error::{Context, Result};
use crate::fanout::{self, senders_priority_note, FanoutResult, Pace, SweepResult};
use crate::handshake::{self, HandshakeResult};
use crate::inflight::Clients;
use crate::memory::{self, MemoryResult};
use crate::receivers::Draining;
use crate::report::{loadavg, machine_busy_pct, micros, si, Machine};
use crate::{members, svg};

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
    /// The niceness `ocmd` ran at (the load generator runs at 0).
    #[serde(default)]
    pub daemon_nice: i32,
    /// Whether every paced step ran its senders at real-time priority (`--sender-priority`);
    /// `None` in reports made before the option (normal priority).
    #[serde(default)]
    pub paced_senders_realtime: Option<bool>,
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

/// How the receivers drained the sockets, as the report says it.
fn draining_note(poll_us: u64) -> String {
    if poll_us == 0 {
        "receivers slept in `epoll_wait` as soon as their sockets were empty, so every send on loopback also paid for waking them".to_string()
    } else {
        format!("receivers kept polling for {poll_us} µs after their last datagram before sleeping (`--receiver-poll-us`), so a send on loopback rarely pays for waking a sleeping receiver, as a send to a remote member never does; the ceiling is drained the same way")
    }
}

/// Runs the matrix, printing each result as it comes.
pub fn run(launcher: &Launcher, plan: &Plan) -> Result<Results> {
    let date = utc_now();
    let started = std::time::Instant::now();
    let loadavg_before = loadavg();
    let busy_before_pct = machine_busy_pct(Duration::from_secs(2));
    println!(
        "matrix: machine busy {busy_before_pct:.0}% before start, loadavg {loadavg_before:.2}"
    );
    let mut rows = Vec::new();
    for m in SIZES {
        let c = measure_ceiling(plan, m)?;
        let (plain_max, plain_half) =
            fanout_pair(launcher, plan, m, CapsArg::Plain, c.received_per_sec)?;
        let (batch_max, batch_half) =
            fanout_pair(launcher, plan, m, CapsArg::Batch, c.received_per_sec)?;
        rows.push(SizeRow {
            members: m,
            ceiling: c,
            plain_max,
            plain_half,
            batch_max,
            batch_half,
        });
    }
    let mut sweeps = Vec::new();
    let mut batch_at_3m = None;
    for caps in [CapsArg::Plain, CapsArg::Batch4k, CapsArg::Batch] {
        let ceiling = rows
            .iter()
            .find(|r| r.members == 64)
            .map_or(0.0, |r| r.ceiling.received_per_sec);
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
        // The plain target is a ratio to the ceiling, and the machine's speed drifts within
        // minutes: measure the ceiling again right around that sweep.
        let before = if caps == CapsArg::Plain {
            Some(measure_ceiling(plan, 64)?.received_per_sec)
        } else {
            None
        };
        let mut s = fanout::sweep(
            &mut daemon,
            &room,
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
        sweeps.push(s);
        if caps == CapsArg::Batch {
            let mut at = fanout::measure(
                &mut daemon,
                &room,
                SENDERS,
                BYTES,
                caps,
                Pace::Rate(3e6 / 63.0),
                plan.duration,
                plan.draining,
            )?;
            at.ceiling_per_sec = Some(ceiling);
            at.print();
            batch_at_3m = Some(at);
        }
    }
    let mut hs = Vec::new();
    for preload in [0, plan.state_tokens] {
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
        hs.push(h);
    }
    let memory = memory::run(launcher, plan.state_tokens, 64, Clients::STANDARD)?;
    memory.print();
    let handshakes_preloaded = hs
        .pop()
        .ok_or_else(|| crate::error::Error::Usage("no run".into()))?;
    let handshakes = hs
        .pop()
        .ok_or_else(|| crate::error::Error::Usage("no run".into()))?;
    Ok(Results {
        date,
        machine: Machine::probe(),
        revision: revision(),
        command: plan.command.clone(),
        busy_before_pct,
        loadavg_before,
        loadavg_after: loadavg(),
        seconds: started.elapsed().as_secs_f64(),
        receivers: plan.draining.threads,
        receiver_poll_us: u64::try_from(plan.draining.poll.as_micros()).unwrap_or(u64::MAX),
        daemon_nice: launcher.nice,
        paced_senders_realtime: sweeps
            .iter()
            .flat_map(|s| s.steps.iter().chain(&s.half))
            .chain(&batch_at_3m)
            .map(|r| r.paced_senders_realtime)
            .collect::<Option<Vec<bool>>>()
            .map(|all| all.iter().all(|&on| on)),
        rows,
        sweeps,
        batch_at_3m,
        handshakes,
        handshakes_preloaded,
        memory,
    })
}

/// The daemon's own p99 (a histogram bucket bound), or `–` when it did not report one.
fn daemon_p99(f: &FanoutResult) -> String {
    f.daemon_delay.map_or("–".into(), |d| d.show(d.p99_us))
}

/// The paced senders' own p99 lateness (slot due → handed to the kernel), or `–` for
/// flat-out runs and results recorded before it was measured.
fn senders_p99(f: &FanoutResult) -> String {
    f.sender_lateness_us.map_or("–".into(), |l| micros(l.p99))
}

/// The receivers' own p99 read lag (in the member's socket → read), or `–` for results
/// recorded before it was measured.
fn receivers_p99(f: &FanoutResult) -> String {
    f.receiver_lag_us.map_or("–".into(), |l| micros(l.p99))
}

/// For a sweep step: how much of its schedule the held-up senders skipped, when any.
fn skipped_note(f: &FanoutResult) -> String {
    match f.skipped_pct() {
        s if s > 0.0 => format!(" ({s:.2}% skipped)"),
        _ => String::new(),
    }
}

/// The stall meter's count and longest stall, or `–` for results recorded before it existed;
/// marked when the meter lacked real-time priority (then it also counts waits for a core).
fn stalls_cell(f: &FanoutResult) -> String {
    f.stalls.map_or("–".into(), |s| {
        let mark = if s.realtime { "" } else { ", normal priority" };
        format!("{} ({:.1} ms{mark})", s.count, s.longest_ms)
    })
}

/// Beside a p99 verdict: the daemon's own p99, and the vCPU stalls in the same run. At half
/// load a stall of T holds back about 2T of messages, so a stall of 10 ms or more in a run of a
/// few seconds can set the p99 alone.
fn tail_context(f: &FanoutResult) -> String {
    let mut own = format!("daemon's own p99 {}", daemon_p99(f));
    if f.sender_lateness_us.is_some() {
        own += &format!(", senders' {}", senders_p99(f));
    }
    if f.receiver_lag_us.is_some() {
        own += &format!(", receivers' {}", receivers_p99(f));
    }
    match f.stalls {
        // A meter without real-time priority also counts its own wait for a core.
        Some(s) if !s.realtime => format!(
            "{own}; a normal-priority meter woke ≥ 1 ms late {} times, longest {:.1} ms",
            s.count, s.longest_ms
        ),
        Some(s) if s.count > 0 => format!(
            "{own}; {} vCPU stall{} ≥ 1 ms, longest {:.1} ms",
            s.count,
            if s.count == 1 { "" } else { "s" },
            s.longest_ms
        ),
        Some(_) => format!("{own}; no vCPU stall ≥ 1 ms"),
        None => own,
    }
}

/// Whether a latency run meets the p99 < 1 ms target: its p99, and the run itself held its
/// pace with loss under `loss_pct` (a p99 of what arrived says nothing of what did not).
fn latency_met(run: Option<&FanoutResult>, loss_pct: f64) -> bool {
    run.is_some_and(|f| {
        let rate = match f.pace {
            Pace::Rate(r) => r,
            Pace::Max => f.offered_per_sec,
        };
        f.latency_us.p99 < 1000.0 && f.sustainable(rate, loss_pct)
    })
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

fn pct_of(x: f64, of: f64) -> f64 {
    100.0 * x / of.max(1.0)
}

/// The sustained fan-out target: at least 90% of a ceiling that measured something (`pct_of`
/// of a zero ceiling is the deliveries themselves, in the millions of percent).
fn ratio_met(deliveries: f64, ceiling: f64) -> bool {
    ceiling > 0.0 && pct_of(deliveries, ceiling) >= 90.0
}

/// The handshake target: 20,000 joins/s on both daemons, flat, and durable (on tmpfs an
/// fsync is free).
fn joins_met(empty: f64, preloaded: f64, flat: bool, on_tmpfs: bool) -> bool {
    empty >= 20_000.0 && preloaded >= 20_000.0 && flat && !on_tmpfs
}

/// The memory target: under 1 KiB per registered member, live and restarted. The figure
/// divides by the members created, so it holds only if all of them registered.
fn memory_met(members: usize, registered: f64, per_member: f64, restarted: Option<f64>) -> bool {
    registered >= members as f64 && per_member.max(restarted.unwrap_or(0.0)) < 1024.0
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# ocmd benchmarks\n");
    let _ = writeln!(
        w,
        "Measured by `ocm-bench` (crate `crates/bench`), a load generator that speaks TCRP/UCRP through the `tcrp`/`ucrp` codecs and starts its own `ocmd` (release build) with `config/bench.toml` on loopback for every run. Regenerate with `{}`; this file and `docs/bench.svg` are written by it.\n",
        r.command
    );
    let m = &r.machine;
    let _ = writeln!(w, "## Machine and load\n");
    let _ = writeln!(w, "- date: {}; revision: {}", r.date, r.revision);
    let _ = writeln!(w, "- CPUs (`nproc`): {}; model: {}", m.cpus, m.cpu_model);
    let _ = writeln!(w, "- kernel: {}", m.kernel);
    let _ = writeln!(
        w,
        "- net.core.rmem_max = {}, wmem_max = {} (`scripts/bench` raises them with `sysctl -w` when it can; the daemon's 16 MiB socket buffers are capped there otherwise)",
        m.rmem_max, m.wmem_max
    );
    if let Some(ns) = &m.halt_poll_ns {
        let _ = writeln!(
            w,
            "- guest halt polling: `guest_halt_poll_ns` = {ns} (an idle vCPU polls that long before it halts, so a thread woken within it runs without an exit to the hypervisor; the kernel's default is 200000, this VM boots with 0, and `scripts/bench` sets 200000 for the run when it can: see \"Guest halt polling\" in the notes below)"
        );
    }
    let _ = writeln!(
        w,
        "- load: whole machine {:.0}% busy (of {} cores × 100%) in the 2 s before the start; 1-min loadavg {:.2} before, {:.2} after; the matrix took {:.0} s",
        r.busy_before_pct,
        m.cpus,
        r.loadavg_before,
        r.loadavg_after,
        r.seconds
    );
    let _ = writeln!(
        w,
        "- everything (daemon, senders, {} receiver thread{}) shares the same {} cores, so the generator's own CPU use is part of every figure",
        r.receivers,
        if r.receivers == 1 { "" } else { "s" },
        m.cpus
    );
    let _ = writeln!(w, "- {}", draining_note(r.receiver_poll_us));
    let _ = writeln!(
        w,
        "- paced senders ran {}",
        senders_priority_note(r.paced_senders_realtime.unwrap_or(false))
    );
    let _ = writeln!(
        w,
        "- {}\n",
        if r.daemon_nice == 0 {
            "`ocmd` ran at nice 0, level with the load generator".to_owned()
        } else {
            format!(
                "`ocmd` ran at nice {} (`--daemon-nice`), the load generator at 0",
                r.daemon_nice
            )
        }
    );

    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | measured | verdict |\n|---|---|---|");
    let plain = r.sweeps.iter().find(|s| s.max.caps == CapsArg::Plain);
    let batch = r.sweeps.iter().find(|s| s.max.caps == CapsArg::Batch);
    if let Some(p) = plain {
        let d = p.sustained.as_ref().map_or(0.0, |s| s.deliveries_per_sec);
        let pct = pct_of(d, p.ceiling_per_sec);
        let _ = writeln!(
            w,
            "| sustained fan-out M=64 B=128 (loss < 0.1%) ≥ 90% of the sendto ceiling | {} deliveries/s = {:.1}% of {}/s{} | {} |",
            si(d),
            pct,
            si(p.ceiling_per_sec),
            p.ceiling_around
                .map_or(String::new(), |(before, after)| format!(
                    " (the mean of {}/s just before the sweep and {}/s just after)",
                    si(before),
                    si(after)
                )),
            verdict(ratio_met(d, p.ceiling_per_sec))
        );
        let p99 = p.half.as_ref().map_or(f64::INFINITY, |h| h.latency_us.p99);
        let _ = writeln!(
            w,
            "| p99 < 1 ms at half the sustained rate, M=64 (plain) | p99 {:.0} µs at {:.0} msg/s ({}) | {} |",
            p99,
            p.sustained_rate / 2.0,
            p.half.as_ref().map_or("–".into(), tail_context),
            verdict(latency_met(p.half.as_ref(), p.loss_pct))
        );
    }
    let h0 = &r.handshakes;
    let hp = &r.handshakes_preloaded;
    let flat = hp.joins.per_sec >= 0.8 * h0.joins.per_sec
        && hp
            .preload_joins
            .as_ref()
            .is_none_or(|j| j.windows.last_10pct_per_sec >= 0.8 * j.windows.first_10pct_per_sec);
    let _ = writeln!(
        w,
        "| ≥ 20,000 joins/s, durable group commit, flat to {} tokens | {:.0} joins/s empty, {:.0} joins/s at {} tokens | {} |",
        hp.preload,
        h0.joins.per_sec,
        hp.joins.per_sec,
        hp.preload,
        verdict(joins_met(
            h0.joins.per_sec,
            hp.joins.per_sec,
            flat,
            h0.state_on_tmpfs || hp.state_on_tmpfs
        ))
    );
    let mem = &r.memory;
    let restarted = mem.bytes_per_member_restarted();
    let all_registered = mem.registered >= mem.members as f64;
    let _ = writeln!(
        w,
        "| RSS per registered member < 1 KiB at {} members | {:.0} bytes{}{} | {} |",
        mem.members,
        mem.bytes_per_member,
        restarted.map_or(String::new(), |b| format!(
            "; {b:.0} bytes after a restart on that state"
        )),
        if all_registered {
            String::new()
        } else {
            format!(" (only {:.0} registered)", mem.registered)
        },
        verdict(memory_met(
            mem.members,
            mem.registered,
            mem.bytes_per_member,
            restarted
        ))
    );
    if let Some(b) = batch {
        let p99 = b.half.as_ref().map_or(f64::INFINITY, |h| h.latency_us.p99);
        let _ = writeln!(
            w,
            "| p99 < 1 ms at half the sustained rate, M=64 (batch) | p99 {:.0} µs at {:.0} msg/s ({} deliveries/s; {}) | {} |",
            p99,
            b.sustained_rate / 2.0,
            si(b.sustained_rate / 2.0 * 63.0),
            b.half.as_ref().map_or("–".into(), tail_context),
            verdict(latency_met(b.half.as_ref(), b.loss_pct))
        );
        if let Some(at) = &r.batch_at_3m {
            let _ = writeln!(
                w,
                "| p99 < 1 ms at half of 6M deliveries/s, M=64 (batch) | p99 {:.0} µs at {:.0} msg/s = {} deliveries/s ({}) | {} |",
                at.latency_us.p99,
                at.offered_per_sec,
                si(at.deliveries_per_sec),
                tail_context(at),
                verdict(latency_met(Some(at), b.loss_pct))
            );
        }
        let d = b.sustained.as_ref().map_or(0.0, |s| s.deliveries_per_sec);
        let _ = writeln!(
            w,
            "| batch members M=64: ≥ 6M deliveries/s with loss < 0.1% | {} deliveries/s | {} |",
            si(d),
            verdict(d >= 6e6)
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Fan-out (S = 2 senders, B = 128-byte texts)\n");
    let _ = writeln!(
        w,
        "`max`: senders flat out; `half`: paced at half the message rate `max` delivered. Deliveries/s counts messages received by members (a batch datagram carries several). The ceiling is one thread doing one plain `sendto` per {}-byte datagram to M loopback sockets, each message encoded once and sent to all M as a relay does, same receivers. Paced messages carry the time their schedule slot was due, so a late sender counts as latency, and a slot skipped after a stall counts as M − 1 deliveries as late as it was when skipped, and as lost in `loss %` (of every message due: skipped slots and sends the generator's socket refused count). `plain` members join with the original JSON-string payload; `batch` members with `{{\"caps\": [\"batch\"], \"max_datagram\": 65507}}`, as `ocm` joins a daemon on loopback. `daemon's p99` is the bucket of `ocm_relay_delay_seconds` (arrival on the daemon's socket → everything it caused handed to the kernel) that holds the 99th percentile: the daemon's own share of the latency. `senders' p99`: how late paced messages left the generator's senders (slot due → `sendmmsg` returned), the generator's own share on the way in. `receivers' p99`: how long deliveries waited in the members' sockets before the receiver read them (the kernel's `SO_TIMESTAMPNS` stamp, taken as the daemon's send hands the datagram to loopback → read), its share on the way out. The three shares' p99s do not add up to the end-to-end p99 (each is its own distribution), but a share near the end-to-end p99 is where the tail was spent. `stolen ms`: CPU time the hypervisor took from the machine's vCPUs during the run (`/proc/stat`). `stalls`: times a `SCHED_FIFO` thread sleeping 1 ms at a time woke at least 1 ms late during the sending (only what stops a whole vCPU delays it: the hypervisor, or kernel work that cannot be preempted), and the longest.\n",
        r.rows.first().map_or(0, |x| x.ceiling.datagram_bytes)
    );
    let _ = writeln!(
        w,
        "| M | ceiling dgram/s | caps | pace | offered msg/s | deliveries/s | % of ceiling | loss % | p50 | p99 | max | daemon's p99 | senders' p99 | receivers' p99 | daemon rcvbuf drops | send errors | client drops | ocmd CPU % | bench CPU % | stolen ms | stalls ≥ 1 ms (longest) |"
    );
    let _ = writeln!(
        w,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        for (caps, pace, f) in [
            ("plain", "max", &row.plain_max),
            ("plain", "half", &row.plain_half),
            ("batch", "max", &row.batch_max),
            ("batch", "half", &row.batch_half),
        ] {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} |",
                row.members,
                si(row.ceiling.received_per_sec),
                caps,
                pace,
                si(f.offered_per_sec),
                si(f.deliveries_per_sec),
                pct_of(f.deliveries_per_sec, row.ceiling.received_per_sec),
                f.schedule_loss_pct(),
                micros(f.latency_us.p50),
                micros(f.latency_us.p99),
                micros(f.latency_us.max),
                daemon_p99(f),
                senders_p99(f),
                receivers_p99(f),
                f.loss.daemon_rcvbuf_drops,
                f.loss.daemon_send_errors_total,
                f.loss.client_rcvbuf_drops,
                f.cpu.daemon_pct,
                f.cpu.bench_pct,
                f.steal_ms,
                stalls_cell(f)
            );
        }
    }
    let _ = writeln!(w, "\n![deliveries/s and p99 by room size](bench.svg)\n");

    let _ = writeln!(
        w,
        "## Sweep: highest rate with loss < 0.1% (M = 64, S = 2, B = 128)\n"
    );
    let _ = writeln!(w, "A flat-out probe bounds the rate; paced 2 s steps then go up by half while they pass and bisect once one fails. A step passes when loss < 0.1% (of every message the senders were due to send: a schedule slot a held-up sender skipped, or a send the generator's socket refused, is lost deliveries too; the part skipped is shown beside a step's loss), the senders kept the pace, and deliveries kept up with the offered deliveries (≥ 97%, so no backlog grew in the daemon's socket buffer). `batch4k`: batch members that announce no `max_datagram`, so their batches stop at 4096 bytes (the default). The plain sweep's ceiling is the mean of two measurements just before and just after it (with the sweep's idle daemon running), since the machine's speed drifts within minutes; the batch rows' % of ceiling uses the M = 64 row's ceiling.\n");
    let _ = writeln!(w, "| caps | sustained msg/s | deliveries/s | % of ceiling | p50 at half | p99 at half | max at half | daemon's p99 at half | senders' p99 at half | receivers' p99 at half | stolen ms at half | stalls ≥ 1 ms at half (longest) | steps (msg/s → loss %, p99) |");
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.sweeps {
        let d = s.sustained.as_ref().map_or(0.0, |x| x.deliveries_per_sec);
        let steps: Vec<String> = s
            .steps
            .iter()
            .filter_map(|x| match x.pace {
                Pace::Rate(rate) => Some(format!(
                    "{} → {:.2}%{}, {}",
                    si(rate),
                    x.schedule_loss_pct(),
                    skipped_note(x),
                    micros(x.latency_us.p99)
                )),
                Pace::Max => None,
            })
            .collect();
        let (p50, p99, max) = s.half.as_ref().map_or((0.0, 0.0, 0.0), |h| {
            (h.latency_us.p50, h.latency_us.p99, h.latency_us.max)
        });
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            s.max.caps,
            s.sustained_rate,
            si(d),
            pct_of(d, s.ceiling_per_sec),
            micros(p50),
            micros(p99),
            micros(max),
            s.half.as_ref().map_or("–".into(), daemon_p99),
            s.half.as_ref().map_or("–".into(), senders_p99),
            s.half.as_ref().map_or("–".into(), receivers_p99),
            s.half.as_ref().map_or(0.0, |h| h.steal_ms),
            s.half.as_ref().map_or("–".into(), stalls_cell),
            steps.join("; ")
        );
    }
    let _ = writeln!(w);

    let _ = writeln!(
        w,
        "## Handshakes (durable: the daemon fsyncs its journal before replying)\n"
    );
    let driver = match h0.client_threads {
        0 => "from one blocking thread per connection (results from before 2026-12-03 14:00 UTC)"
            .to_owned(),
        1 => "driven by one generator thread over epoll".to_owned(),
        n => format!("driven by {n} generator threads over epoll"),
    };
    let _ = writeln!(w, "R = 200 rooms created, then R × K = 3,200 joins with C = 16 requests in flight, one TCP connection per request, each from its own 127.0.0.0/8 source address, {driver}; {} rounds on each daemon (fresh rooms each), the round with the median join rate shown. State under the target directory (tmpfs: {}).\n", h0.join_rates.len().max(1), h0.state_on_tmpfs);
    let _ = writeln!(w, "| state before | joins/s (median round) | every round's joins/s | first 10% /s | last 10% /s | p50 µs | p90 µs | p99 µs | max µs | creates/s | records per fsync | write + fsync µs | CPU µs per join: ocmd / bench | errors, all rounds |");
    let _ = writeln!(
        w,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for h in [h0, hp] {
        let l = &h.joins.latency_us;
        let rounds: Vec<String> = h.join_rates.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            w,
            "| {} tokens | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} | {} |",
            h.preload,
            h.joins.per_sec,
            rounds.join(", "),
            h.joins.windows.first_10pct_per_sec,
            h.joins.windows.last_10pct_per_sec,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            h.creates.per_sec,
            h.journal_records / h.journal_writes.max(1.0),
            if h.journal_write_seconds > 0.0 {
                format!(
                    "{:.0}",
                    1e6 * h.journal_write_seconds / h.journal_writes.max(1.0)
                )
            } else {
                "–".into()
            },
            h.cpu_us_per_join
                .map_or("–".into(), |c| format!("{:.0} / {:.0}", c.daemon, c.bench)),
            (h.joins.errors + h.creates.errors).max(h.errors_all_rounds)
        );
    }
    if let (Some(c), Some(j)) = (&hp.preload_creates, &hp.preload_joins) {
        let _ = writeln!(
            w,
            "\nGrowing the state to {} tokens (C = 16): {} creates at {:.0}/s, then {} joins (rooms of 10) at {:.0}/s: {:.0}/s over the first 10% of the joins (state ≈ {}–{} tokens) and {:.0}/s over the last 10% (≈ {}–{} tokens); join p99 {:.0} µs.\n",
            hp.preload,
            c.ok,
            c.per_sec,
            j.ok,
            j.per_sec,
            j.windows.first_10pct_per_sec,
            c.ok,
            c.ok + j.ok / 10,
            j.windows.last_10pct_per_sec,
            c.ok + j.ok - j.ok / 10,
            c.ok + j.ok,
            j.latency_us.p99
        );
    }

    let _ = writeln!(w, "## Memory and start-up\n");
    let _ = writeln!(w, "| members | room size | VmRSS fresh | after joins | after REGISTER | per member | REGISTER alone | state on disk | start-up (empty) | SIGTERM → exit | start-up on that state | VmRSS restarted (per member) | loop's idle CPU, ms/s |");
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        w,
        "| {} | {} | {} KiB | {} KiB | {} KiB | {:.0} B | {:.0} B | {:.1} MB | {:.1} ms | {:.0} ms | {:.1} ms | {} | {} |\n",
        mem.members,
        mem.room_size,
        mem.rss_fresh_kib,
        mem.rss_joined_kib,
        mem.rss_registered_kib,
        mem.bytes_per_member,
        mem.bytes_per_registration,
        mem.state_bytes as f64 / 1e6,
        mem.startup_empty_ms,
        mem.stop_ms,
        mem.startup_loaded_ms,
        restarted.map_or("not measured".to_owned(), |b| format!(
            "{} KiB ({b:.0} B)",
            mem.rss_restarted_kib
        )),
        mem.idle_cpu_ms_per_sec
            .map_or("not measured".to_owned(), |ms| format!("{ms:.2}"))
    );
    let _ = writeln!(w, "Members are registered from {} shared sockets (member i of every room uses socket i): REGISTER binds its source address to the token it names, and tokens of different rooms may share an address. `loop's idle CPU`: what the daemon's event loop (its main thread) used per second, holding them all, over 3 s in which nothing was sent.\n", mem.room_size);
    s
}

/// Writes the Markdown, the SVG and (optionally) the raw JSON.
pub fn write(r: &Results, md: &Path, svg_path: &Path, json: Option<&Path>) -> Result<()> {
    let mut text = markdown(r);
    text.push_str(&notes());
    std::fs::write(md, text).ctx(format!("write {}", md.display()))?;
    std::fs::write(svg_path, svg::chart(r)).ctx(format!("write {}", svg_path.display()))?;
    if let Some(path) = json {
        let body = serde_json::to_string_pretty(r).unwrap_or_default();
        std::fs::write(path, body).ctx(format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Hand-written notes (how to run, method, observations) appended after the tables.
fn notes() -> String {
    include_str!("../NOTES.md").to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::{joins_met, markdown, memory_met, ratio_met, Results};

    /// A matrix run's results, recorded once and kept fixed so the report renders the same.
    fn fixture() -> Value {
        serde_json::from_str(include_str!("testdata/matrix-results.json"))
            .expect("the fixture is valid JSON")
    }

    fn results(value: Value) -> Results {
        serde_json::from_value(value).expect("the fixture matches `Results`")
    }

    /// The fixture with every optional part the report words differently missing or changed:
    /// no halt polling, one receiver that sleeps at once, a niced daemon, results recorded
    /// before the per-share p99s and the stall meter, a normal-priority meter, no plain
    /// ceiling pair, blocking handshake clients, no preload phases and no restart figures.
    fn variant() -> Value {
        let mut v = fixture();
        v["machine"]["halt_poll_ns"] = Value::Null;
        v["receivers"] = json!(1);
        v["receiver_poll_us"] = json!(0);
        v["daemon_nice"] = json!(5);
        v["paced_senders_realtime"] = Value::Null;
        v["batch_at_3m"] = Value::Null;
        let plain_max = &mut v["rows"][0]["plain_max"];
        plain_max["stalls"]["realtime"] = json!(false);
        let plain_half = &mut v["rows"][0]["plain_half"];
        for field in [
            "stalls",
            "daemon_delay",
            "sender_lateness_us",
            "receiver_lag_us",
        ] {
            plain_half[field] = Value::Null;
        }
        v["rows"][1]["batch_half"]["stalls"]["count"] = json!(1);
        v["rows"][2]["batch_half"]["stalls"]["count"] = json!(0);
        v["sweeps"][0]["ceiling_around"] = Value::Null;
        v["sweeps"][0]["half"]["stalls"]["count"] = json!(1);
        v["sweeps"][2]["half"]["stalls"]["count"] = json!(0);
        v["sweeps"][1]["half"] = Value::Null;
        v["sweeps"][2]["sustained"] = Value::Null;
        v["handshakes"]["client_threads"] = json!(0);
        v["handshakes"]["journal_write_seconds"] = json!(0.0);
        v["handshakes_preloaded"]["client_threads"] = json!(4);
        v["handshakes_preloaded"]["preload_joins"] = Value::Null;
        v["handshakes_preloaded"]["cpu_us_per_join"] = Value::Null;
        v["memory"]["rss_restarted_kib"] = json!(0);
        v["memory"]["idle_cpu_ms_per_sec"] = Value::Null;
        v["memory"]["registered"] = json!(50_000.0);
        v
    }

    /// The report renders a fixed run byte for byte as it did when the test was written, so
    /// a change to how it is built cannot change what it says.
    #[test]
    fn the_report_renders_a_fixed_run_unchanged() {
        assert_eq!(
            markdown(&results(fixture())),
            include_str!("testdata/matrix-report.md")
        );
    }

    /// As above, for the wordings only older or unusual runs take.
    #[test]
    fn the_report_renders_a_fixed_variant_run_unchanged() {
        assert_eq!(
            markdown(&results(variant())),
            include_str!("testdata/matrix-report-variant.md")
        );
    }

    /// Writes the expected reports; run once by hand with `--ignored` to record them.
    #[test]
    #[ignore = "records the golden reports; run by hand only when the report is meant to change"]
    fn record_the_golden_reports() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata");
        std::fs::write(
            format!("{dir}/matrix-report.md"),
            markdown(&results(fixture())),
        )
        .expect("write matrix-report.md");
        std::fs::write(
            format!("{dir}/matrix-report-variant.md"),
            markdown(&results(variant())),
        )
        .expect("write matrix-report-variant.md");
    }

    /// Each verdict holds only when every condition its target names does (a review found a
    /// zero ceiling, joins on tmpfs and a half-registered state all read as met).
    #[test]
    fn verdicts_need_every_condition() {
        assert!(ratio_met(720_000.0, 800_000.0));
        assert!(!ratio_met(700_000.0, 800_000.0));
        assert!(
            !ratio_met(1_590_000.0, 0.0),
            "a ceiling that measured nothing"
        );
        assert!(joins_met(34_227.0, 27_655.0, true, false));
        assert!(
            !joins_met(34_227.0, 27_655.0, true, true),
            "fsync free on tmpfs"
        );
        assert!(!joins_met(34_227.0, 27_655.0, false, false));
        assert!(!joins_met(19_999.0, 27_655.0, true, false));
        assert!(memory_met(100_000, 100_000.0, 777.0, Some(860.0)));
        assert!(
            !memory_met(100_000, 50_000.0, 777.0, Some(860.0)),
            "half registered"
        );
        assert!(!memory_met(100_000, 100_000.0, 777.0, Some(1024.0)));
    }

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
