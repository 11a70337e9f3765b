//! Result summaries shared by the modes: percentiles, rate windows, loss attribution from the
//! daemon's metrics, and facts about the machine and its load.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::daemon::Scrape;

/// A histogram with 3 significant figures, auto-resizing.
pub fn histogram() -> Histogram<u64> {
    // Local invariant: 3 significant figures is within hdrhistogram's 0..=5.
    let mut h = Histogram::new(3).expect("3 significant figures is valid");
    h.auto(true);
    h
}

/// Latency percentiles in the histogram's unit.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `h`, unchanged unit.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles::scaled(h, 1.0)
    }

    /// Percentiles of `h` divided by `divisor` (e.g. 1000 for ns → µs).
    pub fn scaled(h: &Histogram<u64>, divisor: f64) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50) as f64 / divisor,
            p90: h.value_at_quantile(0.90) as f64 / divisor,
            p99: h.value_at_quantile(0.99) as f64 / divisor,
            max: h.max() as f64 / divisor,
        }
    }
}

/// Throughput at the start and the end of a run, to show whether it stays flat.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RateWindows {
    /// Operations per second over the first 10% of operations.
    pub first_10pct_per_sec: f64,
    /// Operations per second over the last 10% of operations.
    pub last_10pct_per_sec: f64,
}

impl RateWindows {
    /// From sorted completion times (since the run's start).
    pub fn of(done: &[Duration]) -> RateWindows {
        let n = done.len();
        let tenth = n / 10;
        if tenth == 0 {
            return RateWindows::default();
        }
        let first = done[tenth - 1].as_secs_f64();
        let last = (done[n - 1] - done[n - 1 - tenth]).as_secs_f64();
        RateWindows {
            first_10pct_per_sec: tenth as f64 / first.max(1e-9),
            last_10pct_per_sec: tenth as f64 / last.max(1e-9),
        }
    }
}

/// Where datagrams were lost, from the daemon's metrics (deltas over the run) and the client
/// sockets' kernel counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LossAttribution {
    /// `ocm_udp_receive_buffer_drops_total`: the daemon's socket overflowed (inbound lost).
    pub daemon_rcvbuf_drops: f64,
    /// `ocm_datagrams_dropped_total` by reason (the daemon refused the datagram).
    pub daemon_dropped: Vec<String>,
    /// `ocm_send_errors_total` by reason (the daemon's sendto failed, e.g. would_block).
    pub daemon_send_errors: Vec<String>,
    /// Sum of the send errors.
    pub daemon_send_errors_total: f64,
    /// Client sockets' kernel drop counters (the bench's receive buffers overflowed).
    pub client_rcvbuf_drops: u64,
    /// `ocm_datagrams_received_total` delta.
    pub daemon_received: f64,
    /// `ocm_datagrams_sent_total` delta.
    pub daemon_sent: f64,
    /// `ocm_deliveries_total` delta.
    pub daemon_deliveries: f64,
}

impl LossAttribution {
    /// The deltas between two scrapes plus the client-side drops.
    pub fn between(before: &Scrape, after: &Scrape, client_drops: u64) -> LossAttribution {
        let delta = |f: &str| after.total(f) - before.total(f);
        LossAttribution {
            daemon_rcvbuf_drops: delta("ocm_udp_receive_buffer_drops_total"),
            daemon_dropped: after.grown(before, "ocm_datagrams_dropped_total"),
            daemon_send_errors: after.grown(before, "ocm_send_errors_total"),
            daemon_send_errors_total: delta("ocm_send_errors_total"),
            client_rcvbuf_drops: client_drops,
            daemon_received: delta("ocm_datagrams_received_total"),
            daemon_sent: delta("ocm_datagrams_sent_total"),
            daemon_deliveries: delta("ocm_deliveries_total"),
        }
    }

    /// One line for the text report.
    pub fn line(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "0".to_owned()
            } else {
                v.join(",")
            }
        };
        format!(
            "daemon: received {} datagrams, sent {} datagrams / {} deliveries; loss: daemon rcvbuf drops {}, daemon dropped {}, daemon send errors {}, client rcvbuf drops {}",
            self.daemon_received,
            self.daemon_sent,
            self.daemon_deliveries,
            self.daemon_rcvbuf_drops,
            list(&self.daemon_dropped),
            list(&self.daemon_send_errors),
            self.client_rcvbuf_drops
        )
    }
}

/// CPU used by the daemon and by the bench over a window, as % of one core.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// The daemon's user + system time / wall time, percent of one core.
    pub daemon_pct: f64,
    /// The bench's (all its threads), same unit.
    pub bench_pct: f64,
}

impl CpuUse {
    /// From CPU times before and after a window of `wall`.
    pub fn of(daemon: (Duration, Duration), bench: (Duration, Duration), wall: Duration) -> CpuUse {
        let pct = |(a, b): (Duration, Duration)| {
            100.0 * b.saturating_sub(a).as_secs_f64() / wall.as_secs_f64().max(1e-9)
        };
        CpuUse {
            daemon_pct: pct(daemon),
            bench_pct: pct(bench),
        }
    }
}

/// The 1-minute load average (includes the bench itself while it runs).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU time the hypervisor took from this machine's virtual CPUs so far (all of them), from
/// the `steal` column of `/proc/stat`; zero on bare metal or when unreadable.
pub fn steal_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| {
            let line = text.lines().next()?;
            line.split_whitespace().nth(8)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
}

/// Busy CPU fraction of the whole machine over `window` (all cores, 0..=100 × cores).
pub fn machine_busy_pct(window: Duration) -> f64 {
    fn sample() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().next()?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().sum(), idle))
    }
    let Some((t0, i0)) = sample() else { return 0.0 };
    std::thread::sleep(window);
    let Some((t1, i1)) = sample() else { return 0.0 };
    let total = t1.saturating_sub(t0).max(1);
    let busy = total - i1.saturating_sub(i0).min(total);
    100.0 * busy as f64 / total as f64
}

/// The machine, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `nproc`.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// net.core.rmem_max.
    pub rmem_max: String,
    /// net.core.wmem_max.
    pub wmem_max: String,
    /// How long an idle vCPU polls before it halts (`cpuidle-haltpoll`'s
    /// `guest_halt_poll_ns`), on a KVM guest whose kernel has it; `None` elsewhere, and in
    /// reports from before it was recorded.
    #[serde(default)]
    pub halt_poll_ns: Option<String>,
    /// What a system call that does nothing costs on this machine, nanoseconds
    /// ([`null_syscall_ns`]): the daemon's loopback work is mostly system calls, and the
    /// hosts the VM has landed on differed more than twofold in the `sendto` ceiling,
    /// and about twice in a join's CPU. `None` in reports from before it was recorded.
    #[serde(default)]
    pub null_syscall_ns: Option<f64>,
    /// What the kernel says of each CPU vulnerability it reports other than "Not affected"
    /// (`/sys/devices/system/cpu/vulnerabilities`, as `name: status`): the mitigations that
    /// tax kernel entries and returns. `None` in reports from before it was recorded.
    #[serde(default)]
    pub cpu_vulnerabilities: Option<Vec<String>>,
}

/// `cpuidle-haltpoll`'s knob (see [`Machine::halt_poll_ns`]).
pub const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Where the kernel reports the CPU's vulnerabilities, one file each.
const VULNERABILITIES: &str = "/sys/devices/system/cpu/vulnerabilities";

/// Calls timed per batch in [`null_syscall_ns`].
const NULL_SYSCALLS_PER_BATCH: u32 = 100_000;
/// Batches timed in [`null_syscall_ns`]; the quickest counts.
const NULL_SYSCALL_BATCHES: usize = 5;

/// The cost of one `getppid` system call, nanoseconds: the quickest of
/// [`NULL_SYSCALL_BATCHES`] batches of [`NULL_SYSCALLS_PER_BATCH`] (7 ms each at 66 ns), so
/// a batch that the scheduler or the hypervisor interrupted does not count. Made through
/// `syscall(2)`, so that no C library can answer from a cache.
pub fn null_syscall_ns() -> f64 {
    (0..NULL_SYSCALL_BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..NULL_SYSCALLS_PER_BATCH {
                // SAFETY: getppid takes no arguments, touches no memory and cannot fail.
                std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
            }
            start.elapsed().as_nanos() as f64 / f64::from(NULL_SYSCALLS_PER_BATCH)
        })
        .fold(f64::INFINITY, f64::min)
}

/// `name: status` for each vulnerability in `dir` whose status is not "Not affected", by
/// name; `None` where the directory cannot be read (an older kernel, a sandbox).
fn cpu_vulnerabilities(dir: &std::path::Path) -> Option<Vec<String>> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let status = std::fs::read_to_string(entry.path()).ok()?;
            let status = status.trim();
            (status != "Not affected")
                .then(|| format!("{}: {status}", entry.file_name().to_string_lossy()))
        })
        .collect();
    found.sort();
    Some(found)
}

impl Machine {
    /// Reads /proc and /sys, and times a system call: on an idle machine, before the runs.
    pub fn probe() -> Machine {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into())
        };
        let cpuinfo = read("/proc/cpuinfo");
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_else(|| "?".into()),
            kernel: read("/proc/sys/kernel/osrelease"),
            rmem_max: read("/proc/sys/net/core/rmem_max"),
            wmem_max: read("/proc/sys/net/core/wmem_max"),
            halt_poll_ns: std::fs::read_to_string(HALT_POLL_NS)
                .ok()
                .map(|s| s.trim().to_owned()),
            null_syscall_ns: Some(null_syscall_ns()),
            cpu_vulnerabilities: cpu_vulnerabilities(std::path::Path::new(VULNERABILITIES)),
        }
    }
}

/// Prints `value` as one JSON line when asked.
pub fn print_json<T: Serialize>(enabled: bool, kind: &str, value: &T) {
    if enabled {
        let line = serde_json::json!({ "kind": kind, "result": value });
        println!("{line}");
    }
}

/// `850` → `850 µs`, `12500` → `12.5 ms`, `2500000` → `2500 ms`.
pub fn micros(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.0} ms", us / 1000.0)
    }
}

/// `12345678.9` → `12.35M`.
pub fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_of_a_steady_run_are_equal() {
        let done: Vec<Duration> = (1..=100).map(|i| Duration::from_millis(i * 10)).collect();
        let w = RateWindows::of(&done);
        assert!((w.first_10pct_per_sec - 100.0).abs() < 1e-6);
        assert!((w.last_10pct_per_sec - 100.0).abs() < 1e-6);
    }

    /// A run that slows down halfway (ops every 10 ms, then every 20 ms) shows it: the
    /// flatness verdict compares these two windows.
    #[test]
    fn windows_of_a_run_that_slows_down_differ() {
        let done: Vec<Duration> = (1..=100u64)
            .map(|i| Duration::from_millis(if i <= 50 { i * 10 } else { 500 + (i - 50) * 20 }))
            .collect();
        let w = RateWindows::of(&done);
        assert!((w.first_10pct_per_sec - 100.0).abs() < 1e-6, "{w:?}");
        assert!((w.last_10pct_per_sec - 50.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn scrape_totals_and_deltas() {
        let before = Scrape::parse("a_total{reason=\"x\"} 1\na_total{reason=\"y\"} 2\nb 5\n");
        let after =
            Scrape::parse("# HELP a\na_total{reason=\"x\"} 4\na_total{reason=\"y\"} 2\nb 7\n");
        assert_eq!(after.total("a_total"), 6.0);
        assert_eq!(after.total("b"), 7.0);
        assert_eq!(after.grown(&before, "a_total"), vec!["reason=\"x\"=3"]);
    }

    #[test]
    fn machines_recorded_before_halt_polling_was_still_read() {
        let old = r#"{"cpus":2,"cpu_model":"x","kernel":"6.1","rmem_max":"1","wmem_max":"2"}"#;
        let machine: Machine = serde_json::from_str(old).unwrap();
        assert_eq!(machine.halt_poll_ns, None);
        let new = r#"{"cpus":2,"cpu_model":"x","kernel":"6.1","rmem_max":"1","wmem_max":"2","halt_poll_ns":"200000"}"#;
        let machine: Machine = serde_json::from_str(new).unwrap();
        assert_eq!(machine.halt_poll_ns.as_deref(), Some("200000"));
        assert_eq!(machine.null_syscall_ns, None);
        assert_eq!(machine.cpu_vulnerabilities, None);
    }

    #[test]
    fn a_null_system_call_is_timed_in_nanoseconds() {
        let ns = null_syscall_ns();
        // A system call costs tens to hundreds of nanoseconds on any machine this runs on;
        // a figure outside (0, 100 µs) would be a unit or arithmetic slip, not a slow host.
        assert!(ns.is_finite() && ns > 0.0 && ns < 100_000.0, "{ns}");
    }

    #[test]
    fn vulnerabilities_not_affected_are_left_out_and_the_rest_sorted() {
        let dir = std::env::temp_dir().join(format!("ocm-bench-vuln-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, status) in [
            ("spectre_v2", "Mitigation: Retpolines\n"),
            ("meltdown", "Not affected\n"),
            ("retbleed", "Vulnerable\n"),
        ] {
            std::fs::write(dir.join(name), status).unwrap();
        }
        let found = cpu_vulnerabilities(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            found,
            Some(vec![
                "retbleed: Vulnerable".to_owned(),
                "spectre_v2: Mitigation: Retpolines".to_owned()
            ])
        );
        assert_eq!(cpu_vulnerabilities(&dir), None, "a directory that is gone");
    }

    #[test]
    fn si_units() {
        assert_eq!(si(6_123_000.0), "6.12M");
        assert_eq!(si(300_400.0), "300.4k");
        assert_eq!(si(12.0), "12");
    }
}

/// Upper bounds on quantiles of one of the daemon's delay histograms, from its growth over a
/// run: the relay delay (`ocm_relay_delay_seconds`: from a datagram's arrival on its socket
/// until what it caused was sent) or the durable wait (`ocm_handshake_durable_wait_seconds`:
/// a join's reply waiting for its journal write). Bucket bounds, so "p99 ≤ 250 µs".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonDelay {
    /// Delays counted (datagrams, or replies).
    pub count: f64,
    /// Bucket bound holding the median, µs (infinity: beyond the last bound; JSON `null`).
    #[serde(deserialize_with = "infinite_if_null")]
    pub p50_us: f64,
    /// Bucket bound holding the 99th percentile, µs.
    #[serde(deserialize_with = "infinite_if_null")]
    pub p99_us: f64,
    /// The histogram's last finite bound, µs: a quantile beyond it is "> this".
    #[serde(default = "relay_last_bound_us")]
    pub last_bound_us: f64,
}

/// `ocm_relay_delay_seconds`' last finite bound (5 s), for results saved before
/// [`DaemonDelay::last_bound_us`] existed.
fn relay_last_bound_us() -> f64 {
    5e6
}

/// JSON has no infinity: serde_json writes it as `null`; read `null` back as infinity.
fn infinite_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl DaemonDelay {
    /// From `(bound seconds, cumulative count)` buckets; `None` when nothing was counted.
    pub fn from_buckets(buckets: &[(f64, f64)]) -> Option<DaemonDelay> {
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let bound = |q: f64| {
            buckets
                .iter()
                .find(|(_, cumulative)| *cumulative >= q * total)
                .map_or(f64::INFINITY, |(b, _)| b * 1e6)
        };
        let last_bound_us = buckets
            .iter()
            .rev()
            .find(|(b, _)| b.is_finite())
            .map_or(f64::INFINITY, |(b, _)| b * 1e6);
        Some(DaemonDelay {
            count: total,
            p50_us: bound(0.5),
            p99_us: bound(0.99),
            last_bound_us,
        })
    }

    /// `p50 ≤ 250 µs p99 ≤ 1 ms over 3200 {what}`.
    pub fn summary(&self, what: &str) -> String {
        format!(
            "p50 {} p99 {} over {:.0} {what}",
            self.show(self.p50_us),
            self.show(self.p99_us),
            self.count
        )
    }

    /// One of this histogram's quantiles: `≤ 250 µs`, `≤ 2.5 ms`, `> 5 s`.
    pub fn show(&self, us: f64) -> String {
        if us.is_infinite() {
            format!("> {}", DaemonDelay::bound(self.last_bound_us))
        } else {
            format!("≤ {}", DaemonDelay::bound(us))
        }
    }

    /// `250 µs`, `2.5 ms`, `5 s`.
    fn bound(us: f64) -> String {
        if us >= 1e6 {
            format!("{} s", us / 1e6)
        } else if us >= 1000.0 {
            format!("{} ms", us / 1000.0)
        } else {
            format!("{us:.0} µs")
        }
    }
}

#[cfg(test)]
mod daemon_delay_tests {
    use super::*;

    #[test]
    fn an_unbounded_quantile_survives_a_json_round_trip() {
        let d = DaemonDelay::from_buckets(&[(5.0, 1.0), (f64::INFINITY, 100.0)]).unwrap();
        assert_eq!(d.p50_us, f64::INFINITY);
        let text = serde_json::to_string(&d).unwrap();
        let back: DaemonDelay = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.show(back.p99_us), "> 5 s");
        assert_eq!(back.show(2500.0), "≤ 2.5 ms");
        assert_eq!(back.show(5e6), "≤ 5 s");
        assert_eq!(d.summary("replies"), "p50 > 5 s p99 > 5 s over 100 replies");
        // The durable wait's histogram goes on to 30 s.
        let w =
            DaemonDelay::from_buckets(&[(0.001, 1.0), (30.0, 2.0), (f64::INFINITY, 3.0)]).unwrap();
        assert_eq!(w.show(w.p99_us), "> 30 s");
        assert_eq!(w.show(w.p50_us), "≤ 30 s");
        // Saved before the field existed: the relay delay's 5 s.
        let old: DaemonDelay =
            serde_json::from_str(r#"{"count":1.0,"p50_us":null,"p99_us":null}"#).unwrap();
        assert_eq!(old.show(old.p99_us), "> 5 s");
    }
}
