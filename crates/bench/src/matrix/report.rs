//! The Markdown report of a matrix run (`docs/BENCHMARKS.md` before the notes are appended):
//! the machine and its load, the targets with their verdicts, then one table per measurement
//! (fan-out, sweeps, handshakes, memory and start-up), each with the words that explain it.

use std::fmt::Write as _;

use crate::cli::CapsArg;
use crate::fanout::{paced_senders_note, FanoutResult, Pace, SweepResult};
use crate::handshake::HandshakeResult;
use crate::memory::MemoryResult;
use crate::report::{micros, si};

use super::{Results, SizeRow};

/// The Markdown report, section by section in the order it reads.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let w = &mut s;
    write_title(w, r);
    write_machine(w, r);
    write_targets(w, r);
    write_fanout(w, r);
    write_sweeps(w, &r.sweeps);
    write_handshakes(w, &r.handshakes, &r.handshakes_preloaded);
    write_memory(w, &r.memory);
    s
}

/// The title and how the report was made.
fn write_title(w: &mut String, r: &Results) {
    let _ = writeln!(w, "# ocmd benchmarks\n");
    let _ = writeln!(
        w,
        "Measured by `ocm-bench` (crate `crates/bench`), a load generator that speaks TCRP/UCRP through the `tcrp`/`ucrp` codecs and starts its own `ocmd` (release build) with `config/bench.toml` on loopback for every run. Regenerate with `{}`; this file and `docs/bench.svg` are written by it.\n",
        r.command
    );
}

/// The machine, its load around the run and how the generator ran on it.
fn write_machine(w: &mut String, r: &Results) {
    let m = &r.machine;
    let _ = writeln!(w, "## Machine and load\n");
    let _ = writeln!(w, "- date: {}; revision: {}", r.date, r.revision);
    let _ = writeln!(w, "- CPUs (`nproc`): {}; model: {}", m.cpus, m.cpu_model);
    let _ = writeln!(w, "- kernel: {}", m.kernel);
    if let Some(ns) = m.null_syscall_ns {
        let _ = writeln!(
            w,
            "- a system call that does nothing (`getppid`) took {ns:.0} ns, the quickest of five batches of 100,000 before the runs: the daemon's and the generator's loopback work is mostly system calls, so this says much of how fast a host runs them (the hosts this VM has landed on differed more than twofold in the `sendto` ceiling: see \"The phases are hosts\" in the notes below)"
        );
    }
    if let Some(found) = &m.cpu_vulnerabilities {
        let listed = if found.is_empty() {
            "none".to_owned()
        } else {
            found.join("; ")
        };
        let _ = writeln!(
            w,
            "- CPU vulnerabilities the kernel reports other than \"Not affected\" (their mitigations tax kernel entries and returns): {listed}"
        );
    }
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
    let _ = writeln!(
        w,
        "- {}",
        draining_note(r.receiver_poll_us, r.receiver_sweep)
    );
    let _ = writeln!(
        w,
        "- paced senders ran {}; one held up sent up to {} ms of its schedule late (`--catch-up-ms`), each message stamped with its slot's due time, and skipped the slots it missed beyond that, counted as loss",
        paced_senders_note(
            r.paced_by_receiver.unwrap_or(false),
            r.paced_senders_realtime.unwrap_or(false)
        ),
        r.paced_catch_up_ms.unwrap_or(2)
    );
    let _ = writeln!(w, "- {}", sender_segments_note(r.sender_segments));
    let _ = writeln!(w, "- {}\n", daemon_nice_note(r.daemon_nice));
}

/// How the senders handed their datagrams to the kernel, as the report says it.
fn sender_segments_note(segmented: bool) -> &'static str {
    if segmented {
        "senders handed each member's messages of one turn to the kernel as one segmented send (`UDP_SEGMENT`, `--sender-segments`), which loopback splits into the same datagrams before the daemon's socket: remote members' sending costs this machine nothing, and this costs it less"
    } else {
        "senders handed the kernel one datagram per message (`sendmmsg`)"
    }
}

/// The niceness `ocmd` ran at, as the report says it.
fn daemon_nice_note(nice: i32) -> String {
    if nice == 0 {
        "`ocmd` ran at nice 0, level with the load generator".to_owned()
    } else {
        format!("`ocmd` ran at nice {nice} (`--daemon-nice`), the load generator at 0")
    }
}

/// How the receivers drained the sockets, as the report says it.
fn draining_note(poll_us: u64, sweep: bool) -> String {
    if poll_us == 0 {
        return "receivers slept in `epoll_wait` as soon as their sockets were empty, so every send on loopback also paid for waking them".to_string();
    }
    let how = if sweep {
        "read every socket in turn, in the order the daemon sends to them, rather than ask epoll which were ready (`--receiver-sweep`)"
    } else {
        "asked `epoll_wait` which sockets were ready"
    };
    format!("receivers kept polling for {poll_us} µs after their last datagram before sleeping (`--receiver-poll-us`), so a send on loopback rarely pays for waking a sleeping receiver, as a send to a remote member never does; while polling they {how}; the ceiling is drained the same way")
}

/// The targets table: each target, what was measured and the verdict.
fn write_targets(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | measured | verdict |\n|---|---|---|");
    let plain = r.sweeps.iter().find(|s| s.max.caps == CapsArg::Plain);
    let batch = r.sweeps.iter().find(|s| s.max.caps == CapsArg::Batch);
    if let Some(p) = plain {
        write_plain_targets(w, p);
    }
    write_joins_target(w, &r.handshakes, &r.handshakes_preloaded);
    write_memory_target(w, &r.memory);
    let batch4k = r.sweeps.iter().find(|s| s.max.caps == CapsArg::Batch4k);
    if let Some(b) = batch {
        write_batch_targets(w, b, batch4k, r.batch_at_3m.as_ref());
    }
    let _ = writeln!(w);
}

/// The plain sweep's targets: sustained fan-out against the ceiling, and p99 at half of it.
fn write_plain_targets(w: &mut String, p: &SweepResult) {
    let d = p.sustained.as_ref().map_or(0.0, |s| s.deliveries_per_sec);
    let pct = pct_of(d, p.ceiling_per_sec);
    let _ = writeln!(
        w,
        "| sustained fan-out M=64 B=128 (loss < 0.1%) ≥ 90% of the sendto ceiling | {} deliveries/s = {:.1}% of {}/s{}; every text is B bytes, so each member's messages of a pass go to the kernel as one segmented send: with texts whose lengths vary, the notes measured 91–98% of the ceiling (\"Segmented sends for members without batches\") | {} |",
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

/// The handshake target: joins/s on an empty and a preloaded state.
fn write_joins_target(w: &mut String, h0: &HandshakeResult, hp: &HandshakeResult) {
    let flat = joins_flat(h0, hp);
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
}

/// Whether the join rate held as the state grew: the preloaded daemon and the preload's last
/// tenth of joins within 80% of the empty daemon and the preload's first tenth.
fn joins_flat(h0: &HandshakeResult, hp: &HandshakeResult) -> bool {
    hp.joins.per_sec >= 0.8 * h0.joins.per_sec
        && hp
            .preload_joins
            .as_ref()
            .is_none_or(|j| j.windows.last_10pct_per_sec >= 0.8 * j.windows.first_10pct_per_sec)
}

/// The memory target: RSS per registered member, live and after a restart.
fn write_memory_target(w: &mut String, mem: &MemoryResult) {
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
}

/// The batch sweep's targets: p99 at half its sustained rate and at 3M deliveries/s, and
/// the 6M deliveries/s it sustains (beside what members with 4 KiB batches sustained).
fn write_batch_targets(
    w: &mut String,
    b: &SweepResult,
    batch4k: Option<&SweepResult>,
    at_3m: Option<&FanoutResult>,
) {
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
    if let Some(at) = at_3m {
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
        "| batch members M=64: ≥ 6M deliveries/s with loss < 0.1% | {} deliveries/s, in batches of up to 64 KiB, as `ocm` asks of a daemon on loopback{} | {} |",
        si(d),
        batch4k
            .and_then(|s| s.sustained.as_ref())
            .map_or(String::new(), |s| format!(
                "; {} with the 4 KiB batches it asks for across a network",
                si(s.deliveries_per_sec)
            )),
        verdict(d >= 6e6)
    );
}

/// The fan-out section: what the columns mean, one row per room size, caps and pace, and
/// the chart.
fn write_fanout(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## Fan-out (S = 2 senders, B = 128-byte texts)\n");
    let _ = writeln!(
        w,
        "`max`: senders flat out; `half`: paced at half the message rate `max` delivered. Deliveries/s counts messages received by members (a batch datagram carries several). The ceiling is one thread doing one plain `sendto` per {}-byte datagram to M loopback sockets, each message encoded once and sent to all M as a relay does, same receivers. Paced messages carry the time their schedule slot was due, so a late sender counts as latency, and a slot skipped after a stall counts as M − 1 deliveries as late as it was when skipped, and as lost in `loss %` (of every message due: skipped slots and sends the generator's socket refused count). `plain` members join with the original JSON-string payload; `batch` members with `{{\"caps\": [\"batch\"], \"max_datagram\": 65507}}`, as `ocm` joins a daemon on loopback. `daemon's p99` is the bucket of `ocm_relay_delay_seconds` (arrival on the daemon's socket → everything it caused handed to the kernel) that holds the 99th percentile: the daemon's own share of the latency. `senders' p99`: how late paced messages left the generator's senders (slot due → `sendmmsg` returned), the generator's own share on the way in. `receivers' p99`: how long deliveries waited in the members' sockets before the receiver read them (the kernel's `SO_TIMESTAMPNS` stamp, taken as the daemon's send hands the datagram to loopback → read), its share on the way out. The three shares' p99s do not add up to the end-to-end p99 (each is its own distribution), but a share near the end-to-end p99 is where the tail was spent. `ocmd CPU %` and `bench CPU %`: each process's user and system time while the senders sent (the drain after them left out), all its threads, in % of one core; the generator's includes its receivers and the stall meter. `stolen ms`: CPU time the hypervisor took from the machine's vCPUs during the run (`/proc/stat`). `stalls`: times a `SCHED_FIFO` thread sleeping 1 ms at a time woke at least 1 ms late during the sending (only what stops a whole vCPU delays it: the hypervisor, or kernel work that cannot be preempted), and the longest.\n",
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
            write_fanout_row(w, row, caps, pace, f);
        }
    }
    let _ = writeln!(w, "\n![deliveries/s and p99 by room size](bench.svg)\n");
}

/// One fan-out row: a room size's run with these caps at this pace.
fn write_fanout_row(w: &mut String, row: &SizeRow, caps: &str, pace: &str, f: &FanoutResult) {
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

/// The sweep section: how a sweep steps, then one row per sweep.
fn write_sweeps(w: &mut String, sweeps: &[SweepResult]) {
    let Some(first) = sweeps.first() else {
        return;
    };
    let m = &first.max;
    let _ = writeln!(
        w,
        "## Sweep: highest rate that passes (M = {}, S = {}, B = {})\n",
        m.members, m.senders, m.bytes
    );
    let _ = writeln!(w, "A flat-out probe bounds the rate; paced {:.1} s steps then go up by half while they pass and bisect once one fails. A step passes when loss < {}% (of every message the senders were due to send: a schedule slot a held-up sender skipped, or a send the generator's socket refused, is lost deliveries too; the part skipped is shown beside a step's loss), the senders kept the pace (≥ 95% of it offered), the members received no more than they were owed, and deliveries kept up with the offered deliveries (≥ 97%: a step may end up to 3% of its length behind, so the sustained rate can be up to 3% above what the daemon holds indefinitely). Each step's verdict is shown with it: one with no loss can fail on the pace or on deliveries that fell behind, so the sweep is stricter than loss alone. `batch4k`: batch members that announce no `max_datagram`, so their batches stop at 4096 bytes (the default). The plain sweep's ceiling is the mean of two measurements just before and just after it (with the sweep's idle daemon running), since the machine's speed drifts within minutes; the batch rows' % of ceiling uses the M = {} row's ceiling.\n",
        first.steps.first().map_or(0.0, |step| step.seconds),
        first.loss_pct,
        m.members
    );
    let _ = writeln!(w, "| caps | sustained msg/s | deliveries/s | % of ceiling | p50 at half | p99 at half | max at half | daemon's p99 at half | senders' p99 at half | receivers' p99 at half | stolen ms at half | stalls ≥ 1 ms at half (longest) | steps (msg/s → loss %, p99: verdict) |");
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in sweeps {
        write_sweep_row(w, s);
    }
    let _ = writeln!(w);
}

/// One sweep row: the sustained rate, the run at half of it and every paced step.
fn write_sweep_row(w: &mut String, s: &SweepResult) {
    let d = s.sustained.as_ref().map_or(0.0, |x| x.deliveries_per_sec);
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
        sweep_steps(s)
    );
}

/// The paced steps of a sweep as `rate → loss %, p99: verdict`, joined by `; `.
fn sweep_steps(s: &SweepResult) -> String {
    let steps: Vec<String> = s
        .steps
        .iter()
        .filter_map(|x| match x.pace {
            Pace::Rate(rate) => Some(format!(
                "{} → {:.2}%{}, {}: {}",
                si(rate),
                x.schedule_loss_pct(),
                skipped_note(x),
                micros(x.latency_us.p99),
                match x.shortfall(rate, s.loss_pct) {
                    None => "passed".to_owned(),
                    // The loss is shown already.
                    Some(why) if why.starts_with("loss ") => "failed on its loss".to_owned(),
                    Some(why) => format!("failed, {why}"),
                }
            )),
            Pace::Max => None,
        })
        .collect();
    steps.join("; ")
}

/// The handshake section: how the joins were driven, one row per daemon and how the
/// preload grew the state.
fn write_handshakes(w: &mut String, h0: &HandshakeResult, hp: &HandshakeResult) {
    let _ = writeln!(
        w,
        "## Handshakes (durable: the daemon fsyncs its journal before replying)\n"
    );
    let driver = handshake_driver(h0.client_threads);
    let _ = writeln!(w, "R = {} rooms created, then R × K = {} joins with C = {} requests in flight, one TCP connection per request, each from its own 127.0.0.0/8 source address, {driver}; {} rounds on each daemon (fresh rooms each), the round with the median join rate shown (`p99 µs, all rounds`: the joins of every round together). The creates are not in the joins' figures. `CPU µs per join`: each process's user and system time over the joins, all its threads, divided by the joins. `ocmd's threads per join`: each of the daemon's threads over the joins (`/proc/PID/task/TID/schedstat`), µs on a CPU + µs runnable but waiting for one, per join: `ocmd` is the event loop, `ocmd-writer` the journal's writer (a write and `fdatasync` per group commit), `ocmd-compactor` the thread that folds the journal into the state file. State under the target directory (tmpfs: {}).\n", h0.rooms, grouped(h0.rooms * h0.joins_per_room), h0.concurrency, h0.join_rates.len().max(1), h0.state_on_tmpfs);
    let _ = writeln!(w, "| state before | joins/s (median round) | every round's joins/s | first 10% /s | last 10% /s | p50 µs | p90 µs | p99 µs | max µs | p99 µs, all rounds | creates/s | records per fsync | write + fsync µs | CPU µs per join: ocmd / bench | ocmd's threads per join, µs on a CPU + waiting | errors, all rounds |");
    let _ = writeln!(
        w,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for h in [h0, hp] {
        write_handshake_row(w, h);
    }
    write_preload_growth(w, hp);
}

/// How the generator drove the handshakes, as the report says it.
fn handshake_driver(client_threads: usize) -> String {
    match client_threads {
        0 => "from one blocking thread per connection (results from before 2026-12-03 14:00 UTC)"
            .to_owned(),
        1 => "driven by one generator thread over epoll".to_owned(),
        n => format!("driven by {n} generator threads over epoll"),
    }
}

/// One handshake row: a daemon's median round and its journal's group commit.
fn write_handshake_row(w: &mut String, h: &HandshakeResult) {
    let l = &h.joins.latency_us;
    let rounds: Vec<String> = h.join_rates.iter().map(|r| format!("{r:.0}")).collect();
    let _ = writeln!(
        w,
        "| {} tokens | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.1} | {} | {} | {} | {} |",
        h.preload,
        h.joins.per_sec,
        rounds.join(", "),
        h.joins.windows.first_10pct_per_sec,
        h.joins.windows.last_10pct_per_sec,
        l.p50,
        l.p90,
        l.p99,
        l.max,
        h.join_latency_all_rounds_us
            .map_or("–".into(), |all| format!("{:.0}", all.p99)),
        h.creates.per_sec,
        h.journal_records / h.journal_writes.max(1.0),
        journal_write_cell(h),
        h.cpu_us_per_join
            .map_or("–".into(), |c| format!("{:.0} / {:.0}", c.daemon, c.bench)),
        threads_cell(h),
        (h.joins.errors + h.creates.errors).max(h.errors_all_rounds)
    );
}

/// `ocmd 23.1 + 8.5; ocmd-writer 5.8 + 1.0`: each thread
/// [worth showing](crate::handshake::ThreadPerJoin::worth_showing), on a CPU + waiting for
/// one; `–` when the results have none.
fn threads_cell(h: &HandshakeResult) -> String {
    let shown: Vec<String> = h
        .daemon_threads_per_join
        .iter()
        .flatten()
        .filter(|t| t.worth_showing())
        .map(|t| format!("{} {:.1} + {:.1}", t.thread, t.run_us, t.wait_us))
        .collect();
    if shown.is_empty() {
        "–".into()
    } else {
        shown.join("; ")
    }
}

/// Microseconds per journal write + fsync, or `–` when the daemon reported no write time.
fn journal_write_cell(h: &HandshakeResult) -> String {
    if h.journal_write_seconds > 0.0 {
        format!(
            "{:.0}",
            1e6 * h.journal_write_seconds / h.journal_writes.max(1.0)
        )
    } else {
        "–".into()
    }
}

/// How the preload grew the state, when both its phases were recorded.
fn write_preload_growth(w: &mut String, hp: &HandshakeResult) {
    if let (Some(c), Some(j)) = (&hp.preload_creates, &hp.preload_joins) {
        let _ = writeln!(
            w,
            "\nGrowing the state to {} tokens (C = {}): {} creates at {:.0}/s, then {} joins (rooms of 10) at {:.0}/s: {:.0}/s over the first 10% of the joins (state ≈ {}–{} tokens) and {:.0}/s over the last 10% (≈ {}–{} tokens); join p99 {:.0} µs.\n",
            hp.preload,
            hp.concurrency,
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
}

/// The memory and start-up section.
fn write_memory(w: &mut String, mem: &MemoryResult) {
    let restarted = mem.bytes_per_member_restarted();
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
    let _ = writeln!(w, "Members are registered from {} shared sockets (member i of every room uses socket i): REGISTER binds its source address to the token it names, and tokens of different rooms may share an address. `per member`: VmRSS after every REGISTER less VmRSS fresh (the empty daemon's), divided by the members; `REGISTER alone`: the part of it that came with the REGISTERs. VmRSS after the joins, after the REGISTERs and restarted is each the highest read, every 100 ms, until ten reads in a row rise no more than 256 KiB above the highest before them. `loop's idle CPU`: what the daemon's event loop (its main thread) used per second, holding them all, over 3 s in which nothing was sent.\n", mem.room_size);
}

/// `n` with its thousands grouped by commas: 3,200.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::{joins_flat, joins_met, latency_met, markdown, memory_met, ratio_met, Results};

    /// A matrix run's results, recorded once and kept fixed so the report renders the same.
    fn fixture() -> Value {
        serde_json::from_str(include_str!("../testdata/matrix-results.json"))
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
        v["machine"]["null_syscall_ns"] = Value::Null;
        v["machine"]["cpu_vulnerabilities"] = json!([]);
        v["receivers"] = json!(1);
        v["receiver_poll_us"] = json!(0);
        v["daemon_nice"] = json!(5);
        v["paced_senders_realtime"] = Value::Null;
        v["paced_catch_up_ms"] = Value::Null;
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
        v["handshakes_preloaded"]["daemon_threads_per_join"] = Value::Null;
        v["handshakes"]["daemon_threads_per_join"] = json!([]);
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
            include_str!("../testdata/matrix-report.md")
        );
    }

    /// As above, for the wordings only older or unusual runs take.
    #[test]
    fn the_report_renders_a_fixed_variant_run_unchanged() {
        assert_eq!(
            markdown(&results(variant())),
            include_str!("../testdata/matrix-report-variant.md")
        );
    }

    /// The receivers' note says how a polling receiver read: by sweeps, or by asking epoll
    /// (the fixture's run, made before the option); of receivers that slept at once, neither.
    #[test]
    fn the_draining_note_says_how_polling_receivers_read() {
        assert!(super::draining_note(20, true).contains("read every socket in turn"));
        assert!(super::draining_note(20, false).contains("asked `epoll_wait` which sockets"));
        let asleep = super::draining_note(0, true);
        assert!(
            asleep.contains("slept") && !asleep.contains("in turn"),
            "{asleep}"
        );
    }

    /// The senders' note says whether they made segmented sends; reports made before the
    /// option did not.
    #[test]
    fn the_senders_note_says_whether_they_made_segmented_sends() {
        assert!(super::sender_segments_note(true).contains("one segmented send"));
        assert!(super::sender_segments_note(false).contains("one datagram per message"));
        assert!(
            !results(fixture()).sender_segments,
            "a report before the option"
        );
    }

    /// A report says which thread sent the paced members' messages: the receiver's, or one
    /// of their own (and at which priority), as every report did before the option.
    #[test]
    fn the_report_says_which_thread_paced_the_senders() {
        let mut by_receiver = fixture();
        by_receiver["paced_by_receiver"] = json!(true);
        let text = markdown(&results(by_receiver));
        assert!(text.contains("paced senders ran from the receiver thread, between its reads"));
        assert!(!text.contains("on a thread of their own"));
        let before = markdown(&results(fixture()));
        assert!(before.contains(
            "paced senders ran on a thread of their own at real-time priority (`SCHED_FIFO` 1)"
        ));
        let normal = markdown(&results(variant()));
        assert!(normal.contains("paced senders ran on a thread of their own at normal priority"));
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

    /// A p99 counts only on a run that kept up: under 1 ms, and a run that would pass as a
    /// sweep step (a p99 of what arrived says nothing of what did not).
    #[test]
    fn a_p99_is_met_only_by_a_run_that_kept_up() {
        let r = results(fixture());
        let half = r.sweeps[0]
            .half
            .clone()
            .expect("the plain sweep's half-rate run");
        assert!(half.latency_us.p99 < 1000.0, "the fixture's run meets it");
        assert!(latency_met(Some(&half), 0.1));
        let mut slow = half.clone();
        slow.latency_us.p99 = 1000.0;
        assert!(!latency_met(Some(&slow), 0.1));
        let mut lossy = half.clone();
        lossy.received -= lossy.expected / 500;
        assert!(!latency_met(Some(&lossy), 0.1), "0.2% lost");
        let mut doubled = half;
        doubled.received += 1;
        assert!(
            !latency_met(Some(&doubled), 0.1),
            "a delivery more than owed"
        );
        assert!(!latency_met(None, 0.1));
    }

    /// Joins are flat when the 100,000-token daemon's median round keeps 80% of the empty
    /// one's, and the preload's last tenth 80% of its first.
    #[test]
    fn joins_are_flat_only_when_both_rates_keep_four_fifths() {
        let r = results(fixture());
        let (h0, hp) = (&r.handshakes, &r.handshakes_preloaded);
        assert!(joins_flat(h0, hp));
        let mut slower = hp.clone();
        slower.joins.per_sec = 0.79 * h0.joins.per_sec;
        assert!(!joins_flat(h0, &slower));
        let mut sagging = hp.clone();
        let growth = sagging
            .preload_joins
            .as_mut()
            .expect("the fixture's preload");
        growth.windows.last_10pct_per_sec = 0.79 * growth.windows.first_10pct_per_sec;
        assert!(!joins_flat(h0, &sagging));
    }
}
