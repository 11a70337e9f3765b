//! `soak`: a long run of churn against one daemon, sampled, to show what a short benchmark
//! cannot: that nothing in `ocmd` grows while the load stays the same, and that nothing is
//! left behind once it stops.
//!
//! Worker threads repeat one cycle, each in rooms of its own:
//! 1. create a room of 2 to N members (plain or batch members, at random), join and register
//!    them all ([`members::build_room_with`]);
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

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tcrp::payload::{Caps, Request, RequestForm};
use ucrp::datagram;
use ucrp::delivery::{self, Delivery, Notice};

use crate::cli::CapsArg;
use crate::daemon::{Daemon, StateDir};
use crate::error::{Context, Error, Result};
use crate::handshake;
use crate::members::{self, is_probe, recv_before, Room};

/// How long a member waits for what it must receive.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection of garbage may stay open before the daemon must have closed it.
const JUNK_CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How long the daemon may take to be idle after the load stops (a silent host takes about
/// three keepalive intervals to expire).
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);
/// Samples a judged window of resident size needs ([`SoakResult::judged_window`]).
pub const MIN_JUDGED_SAMPLES: usize = 3;
/// How much the resident size may grow over the judged window under the same load: what an
/// allocator's high-water marks add (0.04–0.6% in the ten-minute runs of 2026-12-03), with
/// room to spare, while a leak of a few bytes per member adds tens of per cent.
pub const RSS_GROWTH_LIMIT_PCT: f64 = 10.0;

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
    const HEADER: &'static str =
        "    secs   cycles   RSS KiB   fds  threads   disk KiB   rooms  members  tombstones  tcp open";

    fn row(&self) -> String {
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
    fn is_idle(&self, start: &Sample) -> bool {
        self.rooms == 0.0
            && self.members == 0.0
            && self.tcp_open <= start.tcp_open
            && self.fds <= start.fds
    }

    fn take(daemon: &Daemon, dir: &Path, secs: f64, cycles: u64) -> Result<Sample> {
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

/// One worker: cycles until told to stop.
fn work(
    worker: usize,
    tcp: SocketAddr,
    udp: SocketAddr,
    plan: Plan,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(0x50a4 + worker as u64);
    let junk = match UdpSocket::bind("127.0.0.1:0").ctx("bind the junk socket") {
        Ok(junk) => junk,
        Err(e) => return counters.failed(&e),
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result = cycle(worker, n, tcp, udp, plan, counters, &mut rng).and_then(|room| {
            send_junk(&junk, udp, &room, &mut rng, counters)?;
            if n.is_multiple_of(8) {
                send_junk_connections(tcp, &room.name, counters)?;
            }
            if n == 1 || n.is_multiple_of(16) {
                make_silent_host(tcp, &format!("{}-silent", room.name), counters)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                counters.cycles.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counters.failed(&e),
        }
    }
}

/// One room's life; returns the (closed) room, whose tokens the junk reuses.
fn cycle(
    worker: usize,
    n: u64,
    tcp: SocketAddr,
    udp: SocketAddr,
    plan: Plan,
    counters: &Counters,
    rng: &mut StdRng,
) -> Result<Room> {
    let count = rng.random_range(2..=plan.max_members);
    let caps = if rng.random_bool(0.5) {
        CapsArg::Plain
    } else {
        CapsArg::Batch
    }
    .request();
    // The host hears members leave, so that it speaks again only once they are gone.
    let host_caps = (caps.0.with(Caps::NOTICES), caps.1);
    let name = format!("soak-{worker}-{n}");
    let room = members::build_room_with(tcp, udp, &name, count, (host_caps, caps), plan.rcvbuf)?;
    counters.members.fetch_add(count as u64, Ordering::Relaxed);
    // Everyone speaks once; everyone else must hear it.
    for i in 0..count {
        send(&room, i, &format!("c{n} m{i}"))?;
    }
    counters.messages.fetch_add(count as u64, Ordering::Relaxed);
    for i in 0..count {
        let want = (0..count).filter(|&j| j != i).map(|j| format!("c{n} m{j}"));
        await_texts(&room, i, want.collect(), false, counters)?;
    }
    // The odd members leave; once the host has heard them go, it speaks to those still there.
    let leavers: Vec<usize> = (1..count).step_by(2).collect();
    for &i in &leavers {
        send(&room, i, datagram::LEAVE)?;
    }
    await_left(&room, &leavers)?;
    let after = format!("c{n} after");
    send(&room, 0, &after)?;
    counters.messages.fetch_add(1, Ordering::Relaxed);
    let stayers: Vec<usize> = (2..count).step_by(2).collect();
    for &i in &stayers {
        await_texts(&room, i, HashSet::from([after.clone()]), false, counters)?;
    }
    // The host leaves: the room closes for everyone still in it. A member still there that
    // has the closure shows that the daemon is done with the host's last message and its
    // leave, and it sends in order, so whatever it sent a member that had left is in that
    // member's socket by now. (A room of two keeps no member to show it; the host's dead
    // token would earn a reply, but at most one a second per source address, and the
    // kernel hands the ports of closed sockets out again, so that reply may not come.)
    send(&room, 0, datagram::LEAVE)?;
    for &i in &stayers {
        await_texts(&room, i, HashSet::new(), true, counters)?;
    }
    if !stayers.is_empty() {
        for &i in &leavers {
            let late = drain(&room.members[i].socket)?;
            counters.unexpected.fetch_add(late, Ordering::Relaxed);
        }
    }
    Ok(room)
}

/// Member `i` sends `text` with its token.
fn send(room: &Room, i: usize, text: &str) -> Result<()> {
    let m = &room.members[i];
    let mut d = Vec::new();
    datagram::encode(room.name.as_bytes(), m.token.as_bytes(), text, &mut d)?;
    m.socket.send(&d).ctx("send a datagram")?;
    Ok(())
}

/// Reads member `i`'s socket until every text in `want` has come (and, with `closure`, the
/// room-closed notice), counting deliveries; a text that comes twice or was not wanted, and
/// a room-closed notice not waited for, count as unexpected.
fn await_texts(
    room: &Room,
    i: usize,
    mut want: HashSet<String>,
    mut closure: bool,
    counters: &Counters,
) -> Result<()> {
    let socket = &room.members[i].socket;
    counters
        .expected
        .fetch_add(want.len() as u64, Ordering::Relaxed);
    counters
        .closures_expected
        .fetch_add(u64::from(closure), Ordering::Relaxed);
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    while !want.is_empty() || closure {
        let Some(n) = recv_before(socket, &mut buf, deadline)? else {
            return Err(Error::Soak(format!(
                "member {i} of room {:?}: {} messages{} missing after {RECEIVE_DEADLINE:?}",
                room.name,
                want.len(),
                if closure { " and the closure" } else { "" }
            )));
        };
        if matches!(delivery::parse(&buf[..n]), Ok(Delivery::RoomClosed)) {
            if closure {
                closure = false;
                counters.closures_received.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        for text in members::texts(&buf[..n])
            .into_iter()
            .filter(|t| !is_probe(t))
        {
            if want.remove(text) {
                counters.received.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Waits until the host (member 0, which asked for notices) has heard every member in
/// `leavers` leave.
fn await_left(room: &Room, leavers: &[usize]) -> Result<()> {
    let mut names: HashSet<String> = leavers.iter().map(|i| format!("m{i}")).collect();
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    while !names.is_empty() {
        let Some(n) = recv_before(&room.members[0].socket, &mut buf, deadline)? else {
            return Err(Error::Soak(format!(
                "the host of room {:?} never heard {} of its members leave",
                room.name,
                names.len()
            )));
        };
        for (what, name) in notices(&buf[..n]) {
            if what == Notice::Left {
                names.remove(name);
            }
        }
    }
    Ok(())
}

/// The notices in one delivery datagram (batches unpacked).
fn notices(bytes: &[u8]) -> Vec<(Notice, &str)> {
    let one = |d| match delivery::parse(d) {
        Ok(Delivery::Notice { what, name }) => Some((what, name)),
        _ => None,
    };
    match delivery::parse(bytes) {
        Ok(Delivery::Batch(body)) => delivery::batch_entries(body)
            .filter_map(|e| one(e.ok()?))
            .collect(),
        _ => one(bytes).into_iter().collect(),
    }
}

/// Reads whatever is waiting on `socket` without waiting; returns how many chat messages
/// (probes aside) and room-closed notices it held: for a member that left, none may come.
fn drain(socket: &UdpSocket) -> Result<u64> {
    socket.set_nonblocking(true).ctx("set non-blocking")?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let mut count = 0;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let d = &buf[..n];
                let chat = members::texts(d)
                    .into_iter()
                    .filter(|t| !is_probe(t))
                    .count();
                let closed = matches!(delivery::parse(d), Ok(Delivery::RoomClosed));
                count += chat as u64 + u64::from(closed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(count),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).ctx("drain"),
        }
    }
}

/// Datagrams the daemon must drop and count: random bytes, the room's frame with a token one
/// byte off (the room is closed by now, so a real token would earn a reply), and a header
/// that claims more than the datagram holds.
fn send_junk(
    junk: &UdpSocket,
    udp: SocketAddr,
    room: &Room,
    rng: &mut StdRng,
    counters: &Counters,
) -> Result<()> {
    let mut noise = vec![0u8; rng.random_range(0..64)];
    rng.fill(&mut noise[..]);
    junk.send_to(&noise, udp).ctx("send junk")?;
    let mut token = room.members[0].token.clone().into_bytes();
    if let Some(last) = token.last_mut() {
        *last = if *last == b'0' { b'1' } else { b'0' };
    }
    let mut d = Vec::new();
    datagram::encode(room.name.as_bytes(), &token, "junk", &mut d)?;
    junk.send_to(&d, udp).ctx("send junk")?;
    junk.send_to(&[200, 1, b'x'], udp).ctx("send junk")?;
    counters.junk_datagrams.fetch_add(3, Ordering::Relaxed);
    Ok(())
}

/// Two bad handshake connections: one that stops inside a header and is closed by this side,
/// and a whole header of garbage (an HTTP request: operation byte `E`), which the daemon must
/// close of its own accord.
fn send_junk_connections(tcp: SocketAddr, room: &str, counters: &Counters) -> Result<()> {
    let mut half = TcpStream::connect(tcp).ctx("connect for junk")?;
    let _ = half.write_all(&[room.len().min(255) as u8, 1, 1]);
    drop(half);
    let mut garbage = TcpStream::connect(tcp).ctx("connect for junk")?;
    garbage
        .write_all(b"GET /rooms HTTP/1.1\r\nHost: ocmd\r\nAccept: */*\r\n\r\n")
        .ctx("send junk")?;
    let deadline = Instant::now() + JUNK_CLOSE_DEADLINE;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Soak(format!(
                "a connection of garbage was still open after {JUNK_CLOSE_DEADLINE:?}"
            )));
        }
        garbage
            .set_read_timeout(Some(left))
            .ctx("set read timeout")?;
        match garbage.read(&mut buf) {
            // A refusal, if the daemon sends one, comes before the end of the stream.
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            // A reset: the daemon closed with bytes of ours unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).ctx("read from a connection of garbage"),
        }
    }
    counters.junk_connections.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Creates room `name` with a host that promises a keepalive every second and never sends
/// one: the daemon must expire it, which closes the room.
fn make_silent_host(tcp: SocketAddr, name: &str, counters: &Counters) -> Result<()> {
    let host = Request {
        form: RequestForm::JsonObject,
        keepalive_secs: Some(1),
        ..Request::original("m0")
    };
    handshake::send_request(tcp, true, name, &host)?;
    counters.silent_hosts.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rooms: f64, fds: usize, rss_kib: u64) -> Sample {
        Sample {
            secs: 0.0,
            cycles: 0,
            rss_kib,
            fds,
            threads: 4,
            disk_bytes: 0,
            rooms,
            members: rooms * 2.0,
            tombstones: 0.0,
            tcp_open: 0.0,
            expiries: 0.0,
            dropped: 0.0,
            segmented: 0.0,
            reloads_applied: 0.0,
        }
    }

    fn result(totals: Totals, idle: Sample) -> SoakResult {
        SoakResult {
            plan: Plan {
                duration: Duration::from_secs(1),
                workers: 1,
                max_members: 4,
                sample_every: Duration::from_secs(1),
                reload_every: Duration::ZERO,
                rcvbuf: 0,
            },
            start: sample(0.0, 10, 1000),
            samples: [5000, 3000, 4000, 4100, 4200, 4100]
                .into_iter()
                .map(|rss| sample(3.0, 14, rss))
                .collect(),
            idle,
            reloads: 3,
            totals,
        }
    }

    fn clean() -> Totals {
        Totals {
            cycles: 10,
            members: 30,
            messages: 40,
            expected: 80,
            received: 80,
            closures_expected: 5,
            closures_received: 5,
            junk_datagrams: 30,
            dropped: 30.0,
            silent_hosts: 2,
            expiries: 2.0,
            reloads_applied: 3.0,
            ..Totals::default()
        }
    }

    #[test]
    fn a_clean_run_passes_and_every_shortfall_is_named() {
        let idle = || sample(0.0, 10, 0);
        assert!(result(clean(), idle()).problems().is_empty());
        let cases = [
            (
                "deliveries arrived",
                Totals {
                    received: 79,
                    ..clean()
                },
                idle(),
            ),
            (
                "room-closed",
                Totals {
                    closures_received: 4,
                    ..clean()
                },
                idle(),
            ),
            (
                "had left",
                Totals {
                    unexpected: 1,
                    ..clean()
                },
                idle(),
            ),
            (
                "cycles failed",
                Totals {
                    errors: 1,
                    ..clean()
                },
                idle(),
            ),
            (
                "keepalive expiries",
                Totals {
                    expiries: 1.0,
                    ..clean()
                },
                idle(),
            ),
            (
                "no silent host",
                Totals {
                    silent_hosts: 0,
                    expiries: 0.0,
                    ..clean()
                },
                idle(),
            ),
            (
                "counted as dropped",
                Totals {
                    dropped: 29.0,
                    ..clean()
                },
                idle(),
            ),
            (
                "reloads applied",
                Totals {
                    reloads_applied: 2.0,
                    ..clean()
                },
                idle(),
            ),
            ("left behind", clean(), sample(1.0, 10, 0)),
            ("descriptors", clean(), sample(0.0, 11, 0)),
        ];
        for (needle, totals, idle) in cases {
            let problems = result(totals, idle).problems();
            assert_eq!(problems.len(), 1, "{needle}: {problems:?}");
            assert!(problems[0].contains(needle), "{needle}: {problems:?}");
        }
        let none = Totals {
            cycles: 0,
            ..clean()
        };
        assert!(result(none, idle()).problems()[0].contains("no cycle"));
    }

    #[test]
    fn a_plan_without_workers_or_with_rooms_of_one_is_refused() {
        let plan = result(clean(), sample(0.0, 10, 0)).plan;
        assert!(plan.check().is_ok());
        for bad in [
            Plan { workers: 0, ..plan },
            Plan {
                max_members: 1,
                ..plan
            },
        ] {
            let err = bad.check().expect_err("refused").to_string();
            assert!(err.contains("--workers ≥ 1 and --max-members ≥ 2"), "{err}");
        }
    }

    #[test]
    fn idle_means_nothing_held_beyond_the_start() {
        let start = sample(0.0, 10, 0);
        assert!(sample(0.0, 10, 0).is_idle(&start));
        assert!(sample(0.0, 9, 0).is_idle(&start));
        assert!(!sample(1.0, 10, 0).is_idle(&start));
        assert!(!sample(0.0, 11, 0).is_idle(&start));
        let open = Sample {
            tcp_open: 1.0,
            ..sample(0.0, 10, 0)
        };
        assert!(!open.is_idle(&start));
    }

    #[test]
    fn resident_size_is_judged_past_the_first_third_once_the_tombstones_are_full() {
        let with_tombstones = |rss: &[u64], tombstones: &[f64]| {
            let mut r = result(clean(), sample(0.0, 10, 0));
            r.samples = rss
                .iter()
                .zip(tombstones)
                .map(|(&rss_kib, &tombstones)| Sample {
                    tombstones,
                    ..sample(3.0, 14, rss_kib)
                })
                .collect();
            r.idle.tombstones = *tombstones.last().unwrap_or(&0.0);
            r
        };
        let full = [9.0; 6];
        // Six samples: the first two (a third) are left out; 4000 → 4500 is +12.5%.
        let r = with_tombstones(&[5000, 3000, 4000, 4500, 4200, 4100], &full);
        assert_eq!(r.rss_growth(), Some((4000, 4500, 12.5)));
        assert!(
            r.problems().iter().any(|p| p.contains("grew 12.5%")),
            "{:?}",
            r.problems()
        );
        let r = with_tombstones(&[5000, 3000, 4000, 4300, 4200, 4100], &full);
        assert_eq!(r.rss_growth(), Some((4000, 4300, 7.5)));
        assert!(r.problems().is_empty(), "{:?}", r.problems());
        // Tombstones still growing until the fourth sample: the window starts there.
        let filling = [1.0, 2.0, 3.0, 9.0, 9.0, 9.0];
        let r = with_tombstones(&[1000, 2000, 3000, 4000, 4100, 4200], &filling);
        assert_eq!(r.rss_growth(), Some((4000, 4200, 5.0)));
        // Full only at the fifth: two samples left, too few to judge.
        let late = [1.0, 2.0, 3.0, 4.0, 9.0, 9.0];
        let r = with_tombstones(&[1000, 2000, 3000, 4000, 8000, 9000], &late);
        assert_eq!(r.rss_growth(), None);
        assert!(r.problems().is_empty(), "{:?}", r.problems());
    }

    #[test]
    fn notices_are_read_alone_and_out_of_batches() {
        let mut left = Vec::new();
        delivery::encode_notice(Notice::Left, "m3", &mut left).expect("encode");
        assert_eq!(notices(&left), vec![(Notice::Left, "m3")]);
        let mut batch = Vec::new();
        delivery::begin_batch(&mut batch);
        let mut joined = Vec::new();
        delivery::encode_notice(Notice::Joined, "m5", &mut joined).expect("encode");
        let mut chat = Vec::new();
        delivery::encode_chat("m1", b"hi", &mut chat).expect("encode");
        for entry in [&left, &chat, &joined] {
            delivery::push_batch_entry(entry, &mut batch).expect("push");
        }
        assert_eq!(
            notices(&batch),
            vec![(Notice::Left, "m3"), (Notice::Joined, "m5")]
        );
        assert!(notices(&chat).is_empty());
    }
}
