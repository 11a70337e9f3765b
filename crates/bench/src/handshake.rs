//! The TCRP client (one TCP connection per request, as the original client does: connect,
//! REQUEST, read COMPLIANCE then COMPLETE, close) and the handshake-throughput mode.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tcrp::payload::{self, Caps, Compliance, Request, RequestForm};
use tcrp::{Frame, Operation, State};

use crate::daemon::ThreadTimes;
use crate::error::{Context, Error, Result};
use crate::inflight::{self, Clients, Finished, Job};
use crate::report::{DaemonDelay, Percentiles, RateWindows};

/// Longest wait for any reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Source addresses handed out so far (see [`connect`]).
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Connects to the daemon, blocking until the connection is made. On IPv4 loopback each
/// connection comes from the next address of 127.0.0.0/8 (127.0.0.1 … 127.0.249.250, then
/// round again), as connections from many client hosts would. From one source address,
/// 100,000 short connections leave as many TIME_WAIT entries on the same address pair (both
/// ends live in this kernel), and every `connect` then searches the ephemeral port range
/// past them: measured as ~13% of the generator's CPU after a 100,000-join preload, a cost
/// of the generator, not of the daemon.
pub fn connect(tcp: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = client_socket(tcp)?;
    socket.connect(&tcp.into())?;
    Ok(socket)
}

/// Starts connecting to the daemon without blocking, from the same source addresses as
/// [`connect`]. Returns the socket (non-blocking) and whether the connection is already
/// made (on loopback it usually is); if not, the socket turns writable once it is, and
/// `take_error` then says whether it failed.
pub fn start_connect(tcp: SocketAddr) -> std::io::Result<(socket2::Socket, bool)> {
    let socket = client_socket(tcp)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&tcp.into()) {
        Ok(()) => Ok((socket, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((socket, false)),
        Err(e) => Err(e),
    }
}

/// A TCP socket for a connection to `tcp`, bound to the next loopback source address when
/// `tcp` is on IPv4 loopback (see [`connect`]).
fn client_socket(tcp: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(tcp),
        socket2::Type::STREAM,
        None,
    )?;
    if tcp.ip().is_loopback() && tcp.is_ipv4() {
        let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % (250 * 250);
        let source = Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250) as u8 + 1);
        socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
    }
    Ok(socket)
}

/// Creates (`create = true`) or joins `room` as `username`; returns the token.
pub fn request_token(
    tcp: SocketAddr,
    create: bool,
    room: &str,
    username: &str,
    (caps, max_datagram): (Caps, Option<u16>),
) -> Result<String> {
    let request = if caps.is_empty() {
        Request::original(username)
    } else {
        Request {
            caps,
            max_datagram,
            form: RequestForm::JsonObject,
            ..Request::original(username)
        }
    };
    send_request(tcp, create, room, &request)
}

/// Creates (`create = true`) or joins `room` with `request` as its payload; returns the token.
/// Blocks on its own connection.
pub fn send_request(
    tcp: SocketAddr,
    create: bool,
    room: &str,
    request: &Request,
) -> Result<String> {
    let bytes = encode_request(create, room, request)?;
    let mut reply = Reply::new(create, room);
    let mut stream: TcpStream = connect(tcp).ctx(format!("connect {tcp}"))?.into();
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .ctx("set read timeout")?;
    let _ = stream.set_nodelay(true);
    stream.write_all(&bytes).ctx("send REQUEST")?;
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).ctx("read reply")?;
        if let Some(token) = reply.feed(&chunk[..n])? {
            return Ok(token);
        }
    }
}

/// The REQUEST frame that creates (`create = true`) or joins `room` with `request`.
pub fn encode_request(create: bool, room: &str, request: &Request) -> Result<Vec<u8>> {
    let operation = if create {
        Operation::CreateRoom
    } else {
        Operation::JoinRoom
    };
    let mut body = Vec::new();
    request.encode(&mut body);
    let mut bytes = Vec::new();
    Frame {
        operation,
        state: State::Request,
        room_name: room.as_bytes(),
        payload: &body,
    }
    .encode(&mut bytes)?;
    Ok(bytes)
}

/// Reads the daemon's reply to one REQUEST: COMPLIANCE, then COMPLETE with the token, in
/// whatever pieces the stream delivers them.
pub struct Reply {
    operation: &'static str,
    room: String,
    buf: Vec<u8>,
    compliant: bool,
}

impl Reply {
    /// Waits for the reply to a create (`create = true`) or a join of `room`.
    pub fn new(create: bool, room: &str) -> Reply {
        Reply {
            operation: if create { "create" } else { "join" },
            room: room.to_owned(),
            buf: Vec::new(),
            compliant: false,
        }
    }

    /// Takes the next bytes read (none: the end of the stream). Returns the token once
    /// COMPLETE has arrived, `None` while more is needed, and an error for a refusal, a frame
    /// out of order or an end of stream before COMPLETE.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<String>> {
        if bytes.is_empty() {
            return Err(self.fail("connection closed before COMPLETE".into()));
        }
        self.buf.extend_from_slice(bytes);
        // Decode every whole frame buffered so far.
        while let Some((frame, used)) = tcrp::decode(&self.buf, tcrp::DEFAULT_MAX_PAYLOAD)? {
            match frame.state {
                State::Compliance => match payload::parse_compliance(frame.payload)? {
                    Compliance::Success => self.compliant = true,
                    Compliance::Failure { code, message } => {
                        return Err(self.fail(format!(
                            "refused: {} {}",
                            code.map_or("?", |c| c.as_str()),
                            message.unwrap_or_default()
                        )))
                    }
                },
                State::Complete if self.compliant => {
                    return Ok(Some(payload::parse_complete(frame.payload)?))
                }
                state => return Err(self.fail(format!("unexpected {state:?} frame"))),
            }
            self.buf.drain(..used);
        }
        Ok(None)
    }

    /// The failure of this request for `reason`.
    pub fn fail(&self, reason: String) -> Error {
        Error::Handshake {
            operation: self.operation,
            room: self.room.clone(),
            reason,
        }
    }
}

/// An original client's create (`create = true`) or join of `room` as `username`, for
/// [`inflight::run`].
fn request_job(create: bool, room: &str, username: &str) -> Result<Job> {
    Ok(Job {
        request: encode_request(create, room, &Request::original(username))?,
        reply: Reply::new(create, room),
    })
}

/// The result of a timed batch of requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseResult {
    /// Requests that got a token.
    pub ok: usize,
    /// Requests that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Successes per second.
    pub per_sec: f64,
    /// Rate in the first and last 10% of the requests.
    pub windows: RateWindows,
    /// Latency percentiles, microseconds.
    pub latency_us: Percentiles,
}

fn phase(finished: Finished) -> PhaseResult {
    phase_and_latencies(finished).0
}

/// [`phase`], and the histogram of its latencies, µs.
fn phase_and_latencies(finished: Finished) -> (PhaseResult, Histogram<u64>) {
    let Finished {
        ops,
        errors,
        first_error,
        elapsed,
    } = finished;
    let mut hist = crate::report::histogram();
    for op in &ops {
        let _ = hist.record((op.took.as_micros() as u64).max(1));
    }
    let done: Vec<Duration> = ops.iter().map(|o| o.done_at).collect();
    let result = PhaseResult {
        ok: ops.len(),
        errors,
        first_error: first_error.map(|e| e.to_string()),
        seconds: elapsed.as_secs_f64(),
        per_sec: ops.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        windows: RateWindows::of(&done),
        latency_us: Percentiles::of(&hist),
    };
    (result, hist)
}

/// Each room's name and the tokens issued in it.
pub type RoomTokens = Vec<(String, Vec<String>)>;

/// What [`populate`] did.
#[derive(Debug)]
pub struct Populated {
    /// Every room's create.
    pub creates: PhaseResult,
    /// Then every join; its first and last 10% show whether the join rate stays flat while
    /// the state grows.
    pub joins: PhaseResult,
    /// The tokens, by room.
    pub rooms: RoomTokens,
}

/// Grows the state by `tokens` tokens in rooms of `room_size` named `{prefix}{i}`:
/// every room's create, then every join.
pub fn populate(
    tcp: SocketAddr,
    prefix: &str,
    tokens: usize,
    room_size: usize,
    clients: Clients,
) -> Result<Populated> {
    let room_size = room_size.max(1);
    let rooms = tokens.div_ceil(room_size);
    let names: Vec<String> = (0..rooms).map(|r| format!("{prefix}{r}")).collect();
    let creates: Vec<Mutex<Vec<String>>> = (0..rooms).map(|_| Mutex::new(Vec::new())).collect();
    let create = |r: usize| request_job(true, &names[r], "m0");
    let keep = |r: usize, token: String| {
        if let Ok(mut t) = creates[r].lock() {
            t.push(token);
        }
    };
    let creates_phase = phase(inflight::run(tcp, rooms, clients, &create, &keep));
    let join_jobs: Vec<(usize, usize)> = (0..rooms)
        .flat_map(|r| {
            let members = (tokens - r * room_size).min(room_size);
            (1..members).map(move |m| (r, m))
        })
        .collect();
    let join = |i: usize| {
        let (r, m) = join_jobs[i];
        request_job(false, &names[r], &format!("m{m}"))
    };
    let keep = |i: usize, token: String| keep(join_jobs[i].0, token);
    let joins = phase(inflight::run(tcp, join_jobs.len(), clients, &join, &keep));
    // A state short of what was asked would be reported under the size asked for.
    if creates_phase.errors + joins.errors > 0 {
        let first = [&creates_phase.first_error, &joins.first_error]
            .into_iter()
            .flatten()
            .next()
            .cloned()
            .unwrap_or_default();
        return Err(Error::Preload(format!(
            "{} of {tokens} tokens ({} creates and {} joins failed; first: {first})",
            creates_phase.ok + joins.ok,
            creates_phase.errors,
            joins.errors
        )));
    }
    let rooms = names
        .into_iter()
        .zip(creates)
        .map(|(n, t)| (n, t.into_inner().unwrap_or_default()))
        .collect();
    Ok(Populated {
        creates: creates_phase,
        joins,
        rooms,
    })
}

/// Result of the handshakes mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandshakeResult {
    /// Rooms created in the measured run.
    pub rooms: usize,
    /// Joins per room.
    pub joins_per_room: usize,
    /// Requests in flight, each on its own connection.
    pub concurrency: usize,
    /// Threads driving them (0: one blocking thread per connection, as before 2026-12-03
    /// 14:00 UTC).
    #[serde(default)]
    pub client_threads: usize,
    /// Tokens in the state before the measured run.
    pub preload: usize,
    /// The preload's creates, when there was a preload.
    pub preload_creates: Option<PhaseResult>,
    /// The preload's joins (the state grows from preload/10 to preload tokens meanwhile).
    pub preload_joins: Option<PhaseResult>,
    /// The measured creates.
    pub creates: PhaseResult,
    /// The measured joins.
    pub joins: PhaseResult,
    /// Journal writes (one fsync each) during the joins (group commit when fewer than joins).
    pub journal_writes: f64,
    /// Journal records in them.
    pub journal_records: f64,
    /// Time the daemon's writer spent writing and fsyncing those batches, seconds.
    #[serde(default)]
    pub journal_write_seconds: f64,
    /// How long the joins' replies waited in the daemon for their batch to be durable
    /// (`ocm_handshake_durable_wait_seconds`), when the daemon reports it.
    #[serde(default)]
    pub durable_wait: Option<DaemonDelay>,
    /// CPU time per join during the joins, µs: the daemon (all its threads) and this
    /// generator (all its threads).
    #[serde(default)]
    pub cpu_us_per_join: Option<CpuPerJoin>,
    /// Each of the daemon's threads over the joins, per join: on a CPU and waiting for one
    /// (`/proc/PID/task/TID/schedstat`); `None` in results from before it was kept, empty
    /// where the kernel keeps no schedstat.
    #[serde(default)]
    pub daemon_threads_per_join: Option<Vec<ThreadPerJoin>>,
    /// Whether the state dir is on tmpfs (then fsync costs nothing).
    pub state_on_tmpfs: bool,
    /// joins/s of every round, in order (`creates`/`joins` are the median round's).
    #[serde(default)]
    pub join_rates: Vec<f64>,
    /// Failed creates and joins over every round, not only the median one.
    #[serde(default)]
    pub errors_all_rounds: usize,
    /// Join latency percentiles over the joins of every round, µs (the median round's are in
    /// `joins`); `None` in results from before they were kept.
    #[serde(default)]
    pub join_latency_all_rounds_us: Option<Percentiles>,
}

/// `ocmd 23.1 µs on a CPU + 8.5 waiting for one, ocmd-writer …`: the threads
/// [worth showing](ThreadPerJoin::worth_showing).
pub fn thread_summary(threads: &[ThreadPerJoin]) -> String {
    let shown: Vec<String> = threads
        .iter()
        .filter(|t| t.worth_showing())
        .map(|t| {
            format!(
                "{} {:.1} µs on a CPU + {:.1} waiting for one",
                t.thread, t.run_us, t.wait_us
            )
        })
        .collect();
    shown.join(", ")
}

/// R creates, then R×K joins, over C threads, after an optional preload; `repeat` rounds
/// (fresh rooms each), reporting the round with the median join rate: 3,200 joins take about
/// 0.15 s, short enough for one scheduling hiccup on a shared machine to move the figure.
pub fn run(
    daemon: &crate::daemon::Daemon,
    state_on_tmpfs: bool,
    rooms: usize,
    joins: usize,
    clients: Clients,
    preload: usize,
    repeat: usize,
) -> Result<HandshakeResult> {
    let (preload_creates, preload_joins) = if preload > 0 {
        let p = populate(daemon.tcp, "pre", preload, 10, clients)?;
        (Some(p.creates), Some(p.joins))
    } else {
        (None, None)
    };
    let mut rounds = (0..repeat.max(1))
        .map(|i| round(daemon, &format!("h{i}-"), rooms, joins, clients))
        .collect::<Result<Vec<_>>>()?;
    let join_rates: Vec<f64> = rounds.iter().map(|r| r.1.per_sec).collect();
    let errors_all_rounds = rounds.iter().map(|r| r.0.errors + r.1.errors).sum();
    let mut all_joins = crate::report::histogram();
    for r in &rounds {
        // The histograms resize themselves: adding one cannot fall out of range.
        let _ = all_joins.add(&r.3);
    }
    rounds.sort_by(|a, b| a.1.per_sec.total_cmp(&b.1.per_sec));
    let (creates, joins_phase, journal, _) = rounds.swap_remove(rounds.len() / 2);
    Ok(HandshakeResult {
        rooms,
        joins_per_room: joins,
        concurrency: clients.connections,
        client_threads: clients.threads_used(),
        preload,
        preload_creates,
        preload_joins,
        creates,
        joins: joins_phase,
        journal_writes: journal.writes,
        journal_records: journal.records,
        journal_write_seconds: journal.seconds,
        durable_wait: journal.durable_wait,
        cpu_us_per_join: Some(journal.cpu),
        daemon_threads_per_join: Some(journal.threads),
        state_on_tmpfs,
        join_rates,
        errors_all_rounds,
        join_latency_all_rounds_us: Some(Percentiles::of(&all_joins)),
    })
}

/// One of the daemon's threads (those of one name together) over the joins, per join, µs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadPerJoin {
    /// The thread's name (`comm`): `ocmd` is the event loop, `ocmd-writer` the journal's
    /// writer, `ocmd-compactor` the compactor.
    pub thread: String,
    /// Time on a CPU.
    pub run_us: f64,
    /// Time runnable but waiting for a CPU: the thread was ready and the machine's cores were
    /// taken (by the daemon's other threads or the generator).
    pub wait_us: f64,
}

impl ThreadPerJoin {
    /// Whether it took at least 0.05 µs a join on a CPU or waiting for one: what rounds to
    /// 0.0 either way is left out of the reports.
    pub fn worth_showing(&self) -> bool {
        self.run_us >= 0.05 || self.wait_us >= 0.05
    }
}

/// [`ThreadPerJoin`] for every thread name in `after`, from the [`ThreadTimes`] read before
/// and after `joins` joins (a thread started meanwhile counts from zero), heaviest first.
fn threads_per_join(
    before: &BTreeMap<String, ThreadTimes>,
    after: &BTreeMap<String, ThreadTimes>,
    joins: f64,
) -> Vec<ThreadPerJoin> {
    let per_join = |ns: u64| ns as f64 / 1e3 / joins.max(1.0);
    let mut threads: Vec<ThreadPerJoin> = after
        .iter()
        .map(|(name, now)| {
            let then = before.get(name).copied().unwrap_or_default();
            ThreadPerJoin {
                thread: name.clone(),
                run_us: per_join(now.run_ns.saturating_sub(then.run_ns)),
                wait_us: per_join(now.wait_ns.saturating_sub(then.wait_ns)),
            }
        })
        .collect();
    threads.sort_by(|a, b| b.run_us.total_cmp(&a.run_us));
    threads
}

/// CPU time per join, µs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CpuPerJoin {
    /// `ocmd`, all threads.
    pub daemon: f64,
    /// The load generator, all threads.
    pub bench: f64,
}

/// What the daemon's writer did during one round's joins, from its metrics, and the CPU the
/// joins took.
struct Journal {
    writes: f64,
    records: f64,
    seconds: f64,
    durable_wait: Option<DaemonDelay>,
    cpu: CpuPerJoin,
    threads: Vec<ThreadPerJoin>,
}

/// One round: R creates of rooms named `{prefix}{r}`, then R×K joins. Returns the two phases,
/// the journal writes during the joins and the joins' latencies.
fn round(
    daemon: &crate::daemon::Daemon,
    prefix: &str,
    rooms: usize,
    joins: usize,
    clients: Clients,
) -> Result<(PhaseResult, PhaseResult, Journal, Histogram<u64>)> {
    let tcp = daemon.tcp;
    let names: Vec<String> = (0..rooms).map(|r| format!("{prefix}{r}")).collect();
    let create = |r: usize| request_job(true, &names[r], "host");
    let creates = phase(inflight::run(tcp, rooms, clients, &create, &|_, _| {}));
    let before = daemon.scrape()?;
    let cpu_before = (daemon.cpu_time(), crate::daemon::own_cpu_time());
    let threads_before = daemon.thread_times();
    // Spread consecutive joins over rooms so concurrent requests rarely share one.
    let join = |i: usize| {
        let (r, k) = (i % rooms.max(1), i / rooms.max(1));
        request_job(false, &names[r], &format!("j{k}"))
    };
    let (joins_phase, join_latencies) = phase_and_latencies(inflight::run(
        tcp,
        rooms * joins,
        clients,
        &join,
        &|_, _| {},
    ));
    let cpu_after = (daemon.cpu_time(), crate::daemon::own_cpu_time());
    let threads_after = daemon.thread_times();
    let after = daemon.scrape()?;
    let per_join = |a: Duration, b: Duration| {
        1e6 * b.saturating_sub(a).as_secs_f64() / (joins_phase.ok as f64).max(1.0)
    };
    let delta = |name: &str| after.total(name) - before.total(name);
    let journal = Journal {
        writes: delta("ocm_state_writes_total"),
        records: delta("ocm_state_write_records_total"),
        seconds: delta("ocm_state_write_seconds_total"),
        durable_wait: DaemonDelay::from_buckets(
            &after.histogram_delta(&before, "ocm_handshake_durable_wait_seconds"),
        ),
        cpu: CpuPerJoin {
            daemon: per_join(cpu_before.0, cpu_after.0),
            bench: per_join(cpu_before.1, cpu_after.1),
        },
        threads: threads_per_join(&threads_before, &threads_after, joins_phase.ok as f64),
    };
    Ok((creates, joins_phase, journal, join_latencies))
}

impl PhaseResult {
    fn line(&self, what: &str) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "{what}: {} ok, {} failed in {:.2}s = {:.0}/s (first 10% {:.0}/s, last 10% {:.0}/s); latency µs p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
            self.ok,
            self.errors,
            self.seconds,
            self.per_sec,
            self.windows.first_10pct_per_sec,
            self.windows.last_10pct_per_sec,
            l.p50,
            l.p90,
            l.p99,
            l.max
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!("\n    first failure: {e}"));
        }
        s
    }
}

impl HandshakeResult {
    /// The human-readable report.
    pub fn print(&self) {
        println!(
            "handshakes R={} K={} C={} preload={}{}",
            self.rooms,
            self.joins_per_room,
            self.concurrency,
            self.preload,
            if self.state_on_tmpfs {
                " (state on tmpfs!)"
            } else {
                ""
            }
        );
        if let Some(p) = &self.preload_creates {
            println!("  {}", p.line("preload creates"));
        }
        if let Some(p) = &self.preload_joins {
            println!("  {}", p.line("preload joins"));
        }
        if self.join_rates.len() > 1 {
            let rates: Vec<String> = self.join_rates.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "  joins/s in {} rounds: {} (the median round below)",
                rates.len(),
                rates.join(", ")
            );
        }
        println!("  {}", self.creates.line("creates"));
        println!("  {}", self.joins.line("joins"));
        println!(
            "  journal: {} fsyncs for {} records during the joins ({:.1} records per fsync), write + fsync {:.0} µs on average, the writer busy {:.0}% of the joins",
            self.journal_writes,
            self.journal_records,
            self.journal_records / self.journal_writes.max(1.0),
            1e6 * self.journal_write_seconds / self.journal_writes.max(1.0),
            100.0 * self.journal_write_seconds / self.joins.seconds.max(1e-9)
        );
        if let Some(d) = &self.durable_wait {
            println!(
                "  waiting in ocmd for the disk (ocm_handshake_durable_wait_seconds): {}",
                d.summary("replies")
            );
        }
        if let Some(cpu) = self.cpu_us_per_join {
            println!(
                "  cpu per join: ocmd {:.0} µs, ocm-bench {:.0} µs (all threads)",
                cpu.daemon, cpu.bench
            );
        }
        if let Some(threads) = self
            .daemon_threads_per_join
            .as_deref()
            .filter(|t| !t.is_empty())
        {
            println!("  ocmd's threads per join: {}", thread_summary(threads));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(run_ns: u64, wait_ns: u64) -> ThreadTimes {
        ThreadTimes { run_ns, wait_ns }
    }

    #[test]
    fn threads_per_join_divide_the_growth_and_put_the_heaviest_first() {
        let before = BTreeMap::from([
            ("ocmd".to_owned(), times(1_000_000, 500_000)),
            ("ocmd-writer".to_owned(), times(2_000_000, 0)),
        ]);
        let after = BTreeMap::from([
            (
                "ocmd".to_owned(),
                times(1_000_000 + 46_200_000, 500_000 + 17_000_000),
            ),
            (
                "ocmd-writer".to_owned(),
                times(2_000_000 + 11_600_000, 2_000_000),
            ),
            // Started during the joins: counted from zero.
            ("ocmd-compactor".to_owned(), times(1_800_000, 0)),
        ]);
        let per_join = threads_per_join(&before, &after, 2000.0);
        let summary: Vec<(&str, f64, f64)> = per_join
            .iter()
            .map(|t| (t.thread.as_str(), t.run_us, t.wait_us))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("ocmd", 23.1, 8.5),
                ("ocmd-writer", 5.8, 1.0),
                ("ocmd-compactor", 0.9, 0.0)
            ]
        );
        assert_eq!(
            thread_summary(&per_join),
            "ocmd 23.1 µs on a CPU + 8.5 waiting for one, ocmd-writer 5.8 µs on a CPU + 1.0 \
             waiting for one, ocmd-compactor 0.9 µs on a CPU + 0.0 waiting for one"
        );
    }
}
