//! What a soak run shows: the workers' totals and the daemon's own counts, the samples of its
//! size, descriptors and gauges, and the problems that fail the run.

use std::path::Path;

use serde::Serialize;

use crate::daemon::Daemon;
use crate::error::{Context, Result};

use super::Plan;

/// Samples a judged window of resident size needs ([`SoakResult::judged_window`]).
pub const MIN_JUDGED_SAMPLES: usize = 3;
/// How much the resident size may grow over the judged window under the same load: what an
/// allocator's high-water marks add (0.04–0.6% in the ten-minute runs of 2026-12-03), with
/// room to spare, while a leak of a few bytes per member adds tens of per cent.
pub const RSS_GROWTH_LIMIT_PCT: f64 = 10.0;

/// What a run did, counted by the workers and (where said) by the daemon.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Rooms created and closed.
    pub cycles: u64,
    /// Members joined (hosts included).
    pub members: u64,
    /// Chat messages sent.
    pub messages: u64,
    /// Deliveries that had to arrive.
    pub expected: u64,
    /// Deliveries that did.
    pub received: u64,
    /// `__ROOM_CLOSED__` notices that had to arrive.
    pub closures_expected: u64,
    /// Those that did.
    pub closures_received: u64,
    /// Deliveries to members that had left, a second copy of a message, or a room-closed
    /// notice nobody had reason to get.
    pub unexpected: u64,
    /// Junk datagrams sent.
    pub junk_datagrams: u64,
    /// Connections of garbage the daemon closed (those it left open are failed cycles).
    pub junk_connections: u64,
    /// Datagrams the daemon counted as dropped (`ocm_datagrams_dropped_total`, every
    /// reason): one per junk datagram.
    pub dropped: f64,
    /// Datagrams the daemon sent in segmented sends (`ocm_datagrams_segmented_total`): not
    /// judged, shown so that a run says whether it went that way.
    pub segmented: f64,
    /// Rooms whose host promised keepalives and went silent.
    pub silent_hosts: u64,
    /// Keepalive expiries the daemon counted (`ocm_keepalive_expiries_total`): one per
    /// silent host.
    pub expiries: f64,
    /// Reloads the daemon counted as applied (`ocm_config_reloads_total{result="ok"}`).
    pub reloads_applied: f64,
    /// Cycles that failed: a refused handshake, a registration that never took, something
    /// that never arrived, a connection of garbage left open.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
}

/// One look at the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub secs: f64,
    /// Cycles done so far.
    pub cycles: u64,
    /// Resident size.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: u64,
    /// Bytes of every file in the state directory (state file and journal).
    pub disk_bytes: u64,
    /// `ocm_rooms`.
    pub rooms: f64,
    /// `ocm_members`.
    pub members: f64,
    /// `ocm_tombstones`.
    pub tombstones: f64,
    /// `ocm_tcp_connections_open`.
    pub tcp_open: f64,
    /// `ocm_keepalive_expiries_total`.
    pub expiries: f64,
    /// `ocm_datagrams_dropped_total`, every reason.
    pub dropped: f64,
    /// `ocm_datagrams_segmented_total`.
    pub segmented: f64,
    /// `ocm_config_reloads_total{result="ok"}`.
    pub reloads_applied: f64,
}

/// A soak run's samples and verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    /// What ran.
    pub plan: Plan,
    /// Before the load.
    pub start: Sample,
    /// During the load, every `sample_every`.
    pub samples: Vec<Sample>,
    /// After the load, once the daemon was idle (or the settle deadline passed).
    pub idle: Sample,
    /// `SIGHUP`s sent.
    pub reloads: u64,
    /// What was done.
    pub totals: Totals,
}

impl SoakResult {
    /// Every way the run failed; empty when it passed.
    pub fn problems(&self) -> Vec<String> {
        let t = &self.totals;
        let mut out = Vec::new();
        if t.cycles == 0 {
            out.push("no cycle completed".to_owned());
        }
        if t.errors > 0 {
            out.push(format!(
                "{} cycles failed (first: {})",
                t.errors,
                t.first_error.as_deref().unwrap_or("?")
            ));
        }
        if t.received != t.expected {
            out.push(format!(
                "{} of {} deliveries arrived",
                t.received, t.expected
            ));
        }
        if t.closures_received != t.closures_expected {
            out.push(format!(
                "{} of {} room-closed notices arrived",
                t.closures_received, t.closures_expected
            ));
        }
        if t.unexpected > 0 {
            out.push(format!(
                "{} deliveries to members that had left, duplicated or uncalled for",
                t.unexpected
            ));
        }
        if t.silent_hosts == 0 {
            out.push("no silent host was made".to_owned());
        }
        if t.expiries != t.silent_hosts as f64 {
            out.push(format!(
                "{} keepalive expiries for {} silent hosts",
                t.expiries, t.silent_hosts
            ));
        }
        if t.dropped != t.junk_datagrams as f64 {
            out.push(format!(
                "{} datagrams counted as dropped for {} junk datagrams",
                t.dropped, t.junk_datagrams
            ));
        }
        if t.reloads_applied != self.reloads as f64 {
            out.push(format!(
                "{} reloads applied for {} SIGHUPs",
                t.reloads_applied, self.reloads
            ));
        }
        let idle = &self.idle;
        if idle.rooms != 0.0 || idle.members != 0.0 || idle.tcp_open > self.start.tcp_open {
            out.push(format!(
                "left behind once idle: {} rooms, {} members, {} open connections",
                idle.rooms, idle.members, idle.tcp_open
            ));
        }
        if idle.fds > self.start.fds {
            out.push(format!(
                "{} descriptors open once idle, {} at the start",
                idle.fds, self.start.fds
            ));
        }
        if let Some((first, high, pct)) = self.rss_growth() {
            if pct > RSS_GROWTH_LIMIT_PCT {
                out.push(format!(
                    "resident size grew {pct:.1}% ({first} → {high} KiB) under a steady load, \
                     more than {RSS_GROWTH_LIMIT_PCT}%"
                ));
            }
        }
        out
    }

    /// The samples whose resident size is judged: from the later of the end of the first
    /// third and the first sample in which the tombstones had reached their final count (they
    /// only grow, up to `tombstone_capacity`, within a run shorter than their hour), when at
    /// least [`MIN_JUDGED_SAMPLES`] remain; `None` otherwise.
    pub fn judged_window(&self) -> Option<&[Sample]> {
        let third = self.samples.len() / 3;
        let full = self
            .samples
            .iter()
            .position(|s| s.tombstones >= self.idle.tombstones)?;
        let window = &self.samples[third.max(full)..];
        (window.len() >= MIN_JUDGED_SAMPLES).then_some(window)
    }

    /// Growth of the resident size over the judged window: its first sample, its highest,
    /// and the growth in percent.
    pub fn rss_growth(&self) -> Option<(u64, u64, f64)> {
        let window = self.judged_window()?;
        let first = window.first()?.rss_kib;
        let high = window.iter().map(|s| s.rss_kib).max()?;
        let pct = 100.0 * high.saturating_sub(first) as f64 / first.max(1) as f64;
        Some((first, high, pct))
    }

    /// The report: the samples as a table, the totals and the verdict.
    pub fn print(&self) {
        let p = &self.plan;
        println!(
            "soak {:.0}s, {} workers, rooms of 2..={} members, a sample every {:.0}s, SIGHUP every {:.0}s",
            p.duration.as_secs_f64(),
            p.workers,
            p.max_members,
            p.sample_every.as_secs_f64(),
            p.reload_every.as_secs_f64()
        );
        println!("  {}", Sample::HEADER);
        println!("  {}  (start)", self.start.row());
        for s in &self.samples {
            println!("  {}", s.row());
        }
        println!("  {}  (idle)", self.idle.row());
        let t = &self.totals;
        println!(
            "  {} rooms, {} members, {} messages; deliveries {}/{}, room-closed {}/{}, unexpected {}; datagrams the daemon sent in segmented sends {}",
            t.cycles,
            t.members,
            t.messages,
            t.received,
            t.expected,
            t.closures_received,
            t.closures_expected,
            t.unexpected,
            t.segmented,
        );
        println!(
            "  silent hosts expired {}/{}; junk datagrams counted as dropped {}/{}; connections of garbage closed by the daemon {}; reloads applied {}/{}; failed cycles {}",
            t.expiries,
            t.silent_hosts,
            t.dropped,
            t.junk_datagrams,
            t.junk_connections,
            t.reloads_applied,
            self.reloads,
            t.errors
        );
        match self.rss_growth() {
            Some((first, high, pct)) => println!(
                "  resident size once the tombstones were full, past the first third: {first} KiB, at most {high} KiB (+{pct:.2}%; the limit is {RSS_GROWTH_LIMIT_PCT}%)"
            ),
            None => println!(
                "  resident size not judged: fewer than {MIN_JUDGED_SAMPLES} samples past the first third with the tombstones full"
            ),
        }
        match self.problems().as_slice() {
            [] => println!("soak: passed"),
            problems => println!("soak: FAILED: {}", problems.join("; ")),
        }
    }
}

impl Sample {
    pub(super) const HEADER: &'static str =
        "    secs   cycles   RSS KiB   fds  threads   disk KiB   rooms  members  tombstones  tcp open";

    pub(super) fn row(&self) -> String {
        format!(
            "{:>8.1} {:>8} {:>9} {:>5} {:>8} {:>10} {:>7} {:>8} {:>11} {:>9}",
            self.secs,
            self.cycles,
            self.rss_kib,
            self.fds,
            self.threads,
            self.disk_bytes / 1024,
            self.rooms,
            self.members,
            self.tombstones,
            self.tcp_open
        )
    }

    /// Whether the daemon holds no room, no member, and no more open connections (the
    /// scrape's own is one) or descriptors than at `start`.
    pub(super) fn is_idle(&self, start: &Sample) -> bool {
        self.rooms == 0.0
            && self.members == 0.0
            && self.tcp_open <= start.tcp_open
            && self.fds <= start.fds
    }

    pub(super) fn take(daemon: &Daemon, dir: &Path, secs: f64, cycles: u64) -> Result<Sample> {
        // Descriptors first: the scrape's own connection must not be counted.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .ctx("list the daemon's descriptors")?
            .count();
        let status = daemon.status()?;
        let disk_bytes = std::fs::read_dir(dir)
            .ctx("list the state directory")?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        let scrape = daemon.scrape()?;
        Ok(Sample {
            secs,
            cycles,
            rss_kib: status.rss_kib,
            fds,
            threads: status.threads,
            disk_bytes,
            rooms: scrape.total("ocm_rooms"),
            members: scrape.total("ocm_members"),
            tombstones: scrape.total("ocm_tombstones"),
            tcp_open: scrape.total("ocm_tcp_connections_open"),
            expiries: scrape.total("ocm_keepalive_expiries_total"),
            dropped: scrape.total("ocm_datagrams_dropped_total"),
            segmented: scrape.total("ocm_datagrams_segmented_total"),
            reloads_applied: scrape.total("ocm_config_reloads_total{result=\"ok\"}"),
        })
    }
}
