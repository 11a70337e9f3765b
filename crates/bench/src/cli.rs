//! Command-line flags. Every mode but `ceiling` (and `matrix --from-json`) starts its own
//! `ocmd` (see [`crate::daemon`]); the flags
//! shared by all modes live in [`Common`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Load generator and benchmark for `ocmd`, speaking TCRP/UCRP from its own code.
#[derive(Debug, Parser)]
#[command(name = "ocm-bench", version)]
pub struct Cli {
    /// Flags every mode takes.
    #[command(flatten)]
    pub common: Common,
    /// The mode to run.
    #[command(subcommand)]
    pub mode: Mode,
}

/// Flags shared by every mode.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The daemon binary [default: `ocmd` next to this executable].
    #[arg(long, global = true, value_name = "PATH")]
    pub ocmd: Option<PathBuf>,
    /// Daemon configuration passed with `--config`.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "config/bench.toml"
    )]
    pub config: PathBuf,
    /// Parent directory of the daemons' state directories; must be a real disk, not tmpfs,
    /// for durable handshakes to mean anything [default: `bench-state` in the target dir].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Receiver threads draining the members' sockets. One keeps up with the daemon on this
    /// 2-core machine (9M deliveries/s) and takes less from it than two: measured 418k vs
    /// 357k datagrams/s on the sendto ceiling, and a lower p99 in paced runs.
    #[arg(long, global = true, default_value_t = 1)]
    pub receivers: usize,
    /// Microseconds a receiver thread keeps polling its sockets after the last datagram
    /// before it sleeps in epoll_wait. On loopback the sender pays for waking a sleeping
    /// receiver inside its own system call (a third of its time in `perf`); remote members
    /// would not. 0 sleeps at once, as every run before 2026-12-02 06:00 UTC did.
    #[arg(long, global = true, default_value_t = 20, value_name = "MICROS")]
    pub receiver_poll_us: u64,
    /// Whether a polling receiver reads every socket in turn (true) or asks `epoll_wait`
    /// which are ready (false, as every run before 2026-12-07 02:30 UTC did). Sweeping read
    /// sooner under load here (the read lag's p50 a third at M = 64 and 3M batch deliveries/s)
    /// and raised the sendto ceiling 8%; with many sockets and a light load it reads later.
    #[arg(
        long,
        global = true,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub receiver_sweep: bool,
    /// Whether a sender hands a member's messages of one turn to the kernel as one segmented
    /// send (`UDP_SEGMENT`: the daemon receives the same datagrams) rather than one datagram
    /// at a time, as every run before 2026-12-07 06:40 UTC did. It took a fifth off the paced
    /// sender's CPU at 8M batch deliveries/s, CPU that the daemon and receivers share.
    #[arg(
        long,
        global = true,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub sender_segments: bool,
    /// SO_RCVBUF asked for on each client socket, bytes (forced past rmem_max when root).
    #[arg(long, global = true, default_value_t = 4 << 20)]
    pub client_rcvbuf: usize,
    /// Niceness `ocmd` runs at. 0, level with the load generator, is the standard setup;
    /// a negative value (root or CAP_SYS_NICE) lets the daemon preempt the generator. The
    /// notes in docs/BENCHMARKS.md measure what -5 changes: lower p99 in paced plain runs,
    /// a lower batch ceiling, because the generator loses the cores.
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub daemon_nice: i32,
    /// Which thread sends the paced members' messages. `receiver`: the first receiver thread,
    /// between its reads, looking at the schedule every 8 sockets (and after each full read of
    /// one with a backlog) and sleeping no later than the next slot, so that the generator is
    /// one busy thread beside the daemon's loop on the two cores instead of two. `own`: a thread of their own that sleeps between slots (in
    /// ticks of 100 µs at high rates), at `--sender-priority`, as every run before 2026-12-07
    /// 17:00 UTC did. Flat-out senders always have a thread each.
    #[arg(long, global = true, value_enum, default_value_t = PacerThread::Receiver)]
    pub pacer: PacerThread,
    /// Priority of the paced senders' own thread (`--pacer own`). `realtime` (`SCHED_FIFO` 1,
    /// when this process may set it) sends each slot on time as a remote member would,
    /// whatever the daemon and the receivers take of the two cores; `normal` leaves it level
    /// with them, where it skipped 0.006–0.22% of its slots in 5 of 8 runs at 567k–6.3M
    /// deliveries/s (counted as loss). Flat-out senders, and a receiver that paces them,
    /// always run at normal priority.
    #[arg(long, global = true, value_enum, default_value_t = SenderPriority::Realtime)]
    pub sender_priority: SenderPriority,
    /// How much of its schedule a held-up paced sender still sends late, milliseconds (each
    /// message stamped with its slot's due time, so its lateness is latency); the slots it
    /// missed beyond that are skipped and count as loss. 2 before 2026-12-05 13:00 UTC, when
    /// stalls of a few ms failed sweep steps on skipped slots alone.
    #[arg(long, global = true, default_value_t = 20, value_name = "MILLIS")]
    pub catch_up_ms: u64,
    /// Also print each result as one JSON line.
    #[arg(long, global = true)]
    pub json: bool,
}

/// See `--pacer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PacerThread {
    /// The first receiver thread, between its reads.
    Receiver,
    /// A thread of their own, asleep between slots.
    Own,
}

/// See `--sender-priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SenderPriority {
    /// `SCHED_FIFO` 1, falling back to normal priority when not permitted.
    Realtime,
    /// Level with the daemon and the receivers.
    Normal,
}

/// What the members ask for at join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapsArg {
    /// The original JSON-string join payload: one datagram per delivery.
    Plain,
    /// A JSON-object join with `"caps": ["batch"], "max_datagram": 65507`, as `ocm` joins a
    /// daemon on loopback: several deliveries per datagram, up to 64 KiB.
    Batch,
    /// `"caps": ["batch"]` without `max_datagram`: batch frames of at most 4096 bytes.
    #[value(name = "batch4k")]
    #[serde(rename = "batch4k")]
    Batch4k,
}

impl CapsArg {
    /// The join request's capabilities and `max_datagram`.
    pub fn request(self) -> (tcrp::payload::Caps, Option<u16>) {
        use tcrp::payload::{Caps, MAX_MAX_DATAGRAM};
        match self {
            CapsArg::Plain => (Caps::none(), None),
            CapsArg::Batch => (Caps::BATCH, Some(MAX_MAX_DATAGRAM)),
            CapsArg::Batch4k => (Caps::BATCH, None),
        }
    }
}

impl std::fmt::Display for CapsArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CapsArg::Plain => "plain",
            CapsArg::Batch => "batch",
            CapsArg::Batch4k => "batch4k",
        })
    }
}

/// Flags of a fan-out run.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Members in the room, host included.
    #[arg(long, default_value_t = 64)]
    pub members: usize,
    /// Members that send, in each room.
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Rooms of --members each, their senders taking turns room by room, so that the daemon
    /// relays to several rooms in one pass; the ceiling sends to all their members.
    #[arg(long, default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub rooms: usize,
    /// Chat text size per message, bytes (the delivery datagram adds 1 + sender name).
    #[arg(long, default_value_t = 128)]
    pub bytes: usize,
    /// Total offered messages per second over all senders (of all rooms).
    #[arg(long, conflicts_with = "max")]
    pub rate: Option<f64>,
    /// Send as fast as possible (the default when no --rate is given).
    #[arg(long)]
    pub max: bool,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Join payload form of the members.
    #[arg(long, value_enum, default_value_t = CapsArg::Plain)]
    pub caps: CapsArg,
    /// Skip the sendto ceiling measurement (no ratio is printed then).
    #[arg(long)]
    pub no_ceiling: bool,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Fan-out throughput and latency of one room (or of several in turn, --rooms).
    Fanout(FanoutArgs),
    /// The machine's ceiling: one thread, plain sendto round-robin to M loopback sockets.
    Ceiling {
        /// Receiving sockets.
        #[arg(long, default_value_t = 64)]
        members: usize,
        /// Chat text size, bytes (datagrams are sized like one delivery of it).
        #[arg(long, default_value_t = 128)]
        bytes: usize,
        /// Seconds of sending.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
    },
    /// Highest offered rate with loss under --loss-pct, then p99 at half of it.
    Sweep {
        /// Members in the room.
        #[arg(long, default_value_t = 64)]
        members: usize,
        /// Members that send.
        #[arg(long, default_value_t = 2)]
        senders: usize,
        /// Chat text size, bytes.
        #[arg(long, default_value_t = 128)]
        bytes: usize,
        /// Join payload form of the members.
        #[arg(long, value_enum, default_value_t = CapsArg::Plain)]
        caps: CapsArg,
        /// Seconds per step.
        #[arg(long, default_value_t = 2.0)]
        step: f64,
        /// Binary-search steps after the max-rate probe.
        #[arg(long, default_value_t = 7)]
        steps: usize,
        /// Loss allowed at the sustained rate, percent.
        #[arg(long, default_value_t = 0.1)]
        loss_pct: f64,
    },
    /// Create/join handshake throughput with durable (fsync'd) journal writes.
    Handshakes {
        /// Rooms created.
        #[arg(long, default_value_t = 200)]
        rooms: usize,
        /// Joins per room.
        #[arg(long, default_value_t = 16)]
        joins: usize,
        /// Requests in flight, each on a TCP connection of its own.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Threads driving the requests in flight, each over one epoll set. One thread per
        /// connection, blocking in `read`, cost the generator about as much CPU per join as
        /// the daemon (crates/bench/NOTES.md, "A handshake driver on epoll").
        #[arg(long, default_value_t = crate::inflight::DEFAULT_THREADS,
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        client_threads: usize,
        /// Tokens to create first (in rooms of 10) so the state is large.
        #[arg(long, default_value_t = 0)]
        preload: usize,
        /// Rounds of R creates and R×K joins (fresh rooms each); the median round is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// RSS per registered member, and start-up time on that state after SIGTERM + restart.
    Memory {
        /// Members (tokens) to create and register.
        #[arg(long, default_value_t = 100_000)]
        members: usize,
        /// Members per room.
        #[arg(long, default_value_t = 64)]
        room_size: usize,
        /// Requests in flight, each on a TCP connection of its own.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Threads driving the requests in flight.
        #[arg(long, default_value_t = crate::inflight::DEFAULT_THREADS,
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        client_threads: usize,
    },
    /// Churn for a long time (rooms created, chatted in, left and closed, silent hosts
    /// expired, junk between) while the daemon's size, descriptors, state on disk and gauges
    /// are sampled; fails if a delivery is missing, a member that left still hears the room,
    /// a drop or expiry goes uncounted, or anything is left behind.
    Soak {
        /// Seconds of load.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
        /// Worker threads, each cycling through rooms of its own.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// The largest room a cycle makes, host included.
        #[arg(long, default_value_t = 8)]
        max_members: usize,
        /// Seconds between two samples.
        #[arg(long, default_value_t = 10.0)]
        sample_every: f64,
        /// Seconds between two SIGHUPs (configuration reloads); 0 sends none.
        #[arg(long, default_value_t = 60.0)]
        reload_every: f64,
    },
    /// A short run of every mode with small sizes (a 3 s soak included), for CI: fails only
    /// if the daemon fails, nothing is delivered, a fan-out counts datagrams it could not read,
    /// from an earlier run or beyond those owed, no handshake completes, the daemon's threads
    /// show no event loop on a CPU over the joins (where the kernel keeps schedstat) or the
    /// soak fails.
    Smoke,
    /// The standard matrix; writes the Markdown report and the SVG chart.
    Matrix {
        /// Markdown report to write.
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        markdown: PathBuf,
        /// SVG chart to write.
        #[arg(long, default_value = "docs/bench.svg")]
        svg: PathBuf,
        /// Raw results as JSON.
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// Seconds per fan-out run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Tokens for the preload, memory and start-up runs.
        #[arg(long, default_value_t = 100_000)]
        state_tokens: usize,
        /// The command line to record in the report.
        #[arg(long, default_value = "scripts/bench")]
        command: String,
        /// Do not measure: re-render the report from a JSON file written by --json-out.
        #[arg(long, value_name = "FILE")]
        from_json: Option<PathBuf>,
    },
}
