//! Test harness: the real `ocmd` on free loopback ports with a temporary state file, raw
//! TCRP/UCRP clients built on the protocol crates, and the real `ocm` binary.
//!
//! Every wait has a deadline; nothing sleeps blindly. A [`Daemon`] kills and reaps its child
//! on drop and prints its stderr if the test panicked.
#![allow(dead_code)]

mod shared;
#[allow(unused_imports)]
pub use shared::{
    fill_datagram_queue, skipped, uninterrupted, uninterrupted_within, woken_or_interrupted,
};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tcrp::payload::{self, Compliance, ErrorCode};
use tcrp::{Frame, Operation, State};
use ucrp::delivery::{self, Delivery};

/// How long any single expectation may take before the test fails (generous for a loaded
/// 2-core machine).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The most a clean stop (SIGTERM) may take on a disk that answers: a stop normally takes
/// milliseconds, but the daemon may wait up to 1.5 s for state writes in flight, and a
/// loaded machine's fsync adds to it. (Only a disk that stops answering takes it to its own
/// 11.5 s bound, still inside `TimeoutStopSec=15` in config/ocmd.service.)
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Checks a clean stop that took `took`: within [`STOP_LIMIT`], and without waiting out the
/// daemon's allowance for state writes in flight (it logs that), which only a stuck disk
/// needs: docs/OPERATIONS.md promises a stop "well under a second". An order of events, not
/// a tighter time limit, so that a loaded machine does not fail it.
pub fn assert_stopped_promptly(d: &Daemon, took: Duration) {
    assert!(took < STOP_LIMIT, "stopped in {took:?}");
    // The last line of a clean stop: the reader thread has every line before it.
    d.wait_for_log("stopped: ");
    let log = d.log();
    assert!(
        !log.contains("state writes still in flight"),
        "the stop waited out its allowance for state writes ({took:?}):\n{log}"
    );
}

/// `ocm`'s exit status when the room ended its chat (closed, or the member no longer held):
/// 3, as documented in README.md and docs/CLIENT.md, told apart from `/quit` and the end of
/// input (0).
pub const OCM_ROOM_ENDED: i32 = 3;

/// Whether `program` is on `PATH`.
pub fn installed(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Path of a binary built beside `ocmd` (e.g. `ocm`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let ocmd = Path::new(env!("CARGO_BIN_EXE_ocmd"));
    let path = ocmd.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build every binary first (cargo build --workspace --bins, as scripts/test does)",
        path.display()
    );
    path
}

/// A seed from `OCM_SEED` or the clock, printed so that a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("OCM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (replay with OCM_SEED={seed})");
    seed
}

/// The receive queue (bytes waiting) and the kernel's drop count of the IPv4 UDP socket that
/// datagrams to `addr` reach (bound to its address or to 0.0.0.0, at its port), from
/// `/proc/net/udp`; `None` if there is no such socket.
pub fn udp_queue(addr: SocketAddr) -> Option<(u64, u64)> {
    let SocketAddr::V4(v4) = addr else {
        panic!("an IPv4 socket expected, not {addr}")
    };
    let local = |ip: std::net::Ipv4Addr| {
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), v4.port())
    };
    let bound = [local(*v4.ip()), local(std::net::Ipv4Addr::UNSPECIFIED)];
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !bound.iter().any(|b| fields.get(1) == Some(&b.as_str())) {
            return None;
        }
        let queued = u64::from_str_radix(fields.get(4)?.split_once(':')?.1, 16).ok()?;
        let drops = fields.last()?.parse().ok()?;
        Some((queued, drops))
    })
}

/// The CPU time (user and system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let (_, rest) = stat.rsplit_once(')').expect("stat line");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(per_sec > 0, "clock ticks per second");
    Duration::from_secs_f64(ticks as f64 / per_sec as f64)
}

/// The Presence reply for `payload` (`b"{}"`, or a token to be told `you`) in `room`.
pub fn presence_of(d: &Daemon, room: &str, payload: &[u8]) -> payload::RoomPresence {
    let mut stream = connect(d);
    stream
        .write_all(&request_bytes(Operation::Presence, room, payload))
        .unwrap();
    let mut frames = FrameReader::default();
    let (state, body) = frames.next(&mut stream).expect("a COMPLIANCE");
    assert_eq!(
        state,
        State::Compliance,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (state, body) = frames.next(&mut stream).expect("a COMPLETE");
    assert_eq!(state, State::Complete);
    payload::parse_json(&body).unwrap()
}

/// One extension request on its own connection; the COMPLETE payload, or the refusal.
pub fn ask(daemon: &Daemon, op: Operation, room: &str, body: &[u8]) -> Result<Vec<u8>, Compliance> {
    let mut s = connect(daemon);
    s.write_all(&request_bytes(op, room, body)).unwrap();
    let mut reader = FrameReader::default();
    let (state, body) = reader.next(&mut s).expect("COMPLIANCE");
    assert_eq!(state, State::Compliance);
    match payload::parse_compliance(&body).expect("COMPLIANCE payload") {
        Compliance::Success => {
            let (state, body) = reader.next(&mut s).expect("COMPLETE");
            assert_eq!(state, State::Complete);
            Ok(body)
        }
        refusal => Err(refusal),
    }
}

/// The integer socket option `level`/`name` of `socket`.
pub fn int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the int we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Stops process `pid` (SIGSTOP) and waits until it is stopped.
pub fn stop_process(pid: u32) {
    // SAFETY: kill(2) on a process of the test's own; the result is checked.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let stat = format!("/proc/{pid}/stat");
    wait_until("the process stopped", || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    });
}

/// Polls `condition` until it holds or [`PATIENCE`] runs out.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// How to start a daemon.
#[derive(Clone, Default)]
pub struct Options {
    /// TOML written to a config file passed with `--config`.
    pub config: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Fixed TCP/UDP addresses (for restarts on the same ports); otherwise free ports outside
    /// the kernel's ephemeral range ([`Daemon::spawn`]).
    pub tcp: Option<SocketAddr>,
    /// See `tcp`.
    pub udp: Option<SocketAddr>,
    /// Serve metrics on a free port.
    pub metrics: bool,
    /// Where in the temporary directory the state goes (`--state DIR/state_in/room_manager.json`;
    /// a symbolic link the test made there, say); the directory itself when `None`.
    pub state_in: Option<PathBuf>,
}

/// A running `ocmd`.
pub struct Daemon {
    child: Option<Child>,
    /// Bound TCRP address.
    pub tcp: SocketAddr,
    /// Bound UCRP address.
    pub udp: SocketAddr,
    /// Bound metrics address.
    pub metrics: Option<SocketAddr>,
    /// The temporary directory holding the state.
    pub dir: Arc<tempfile::TempDir>,
    /// `room_manager.json` inside `dir` (or inside its `Options::state_in`).
    pub state: PathBuf,
    options: Options,
    log: Arc<Mutex<LogPipe>>,
    /// This test's claims on the ports picked for it, kept across restarts.
    claims: Vec<PortClaim>,
}

/// The daemon's stderr, read without blocking, and the lines read from it. Every read takes
/// the lock, so a read that finds the pipe empty has every line written before it started:
/// no line can be out of the pipe and not yet in `text` (as with a reader thread that reads,
/// then locks to append).
struct LogPipe {
    pipe: ChildStderr,
    /// Every whole line read, each ending in `\n`.
    text: String,
    /// The start of a line whose end is not read yet.
    partial: Vec<u8>,
    /// False once the pipe reached its end (or failed).
    open: bool,
}

impl LogPipe {
    fn new(pipe: ChildStderr) -> LogPipe {
        let fd = pipe.as_raw_fd();
        // SAFETY: fcntl on a descriptor `pipe` owns; it reads and sets its status flags only.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert!(flags >= 0, "F_GETFL on ocmd's stderr");
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "O_NONBLOCK on ocmd's stderr");
        LogPipe {
            pipe,
            text: String::new(),
            partial: Vec::new(),
            open: true,
        }
    }

    fn fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Reads what the pipe holds now; returns the whole lines it completed.
    fn drain(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut chunk = [0u8; 8192];
        while self.open {
            match self.pipe.read(&mut chunk) {
                Ok(0) => {
                    self.open = false;
                    // A last line without its end, as `BufRead::lines` gives it.
                    if !self.partial.is_empty() {
                        self.partial.push(b'\n');
                    }
                }
                Ok(n) => self.partial.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.open = false,
            }
            while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.partial[..end]).into_owned();
                self.partial.drain(..=end);
                self.text.push_str(&line);
                self.text.push('\n');
                lines.push(line);
            }
        }
        lines
    }
}

/// Blocks until `fd` can be read (data, or its end).
fn wait_readable(fd: RawFd) {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // EINTR or a spurious wake-up: the caller reads what there is and comes back.
    // SAFETY: poll reads and fills one pollfd; the descriptor stays open while the caller
    // holds the `LogPipe` that owns it.
    unsafe { libc::poll(&mut poll, 1, -1) };
}

/// A port picked for a daemon, held for as long as its [`Daemon`] is, across the daemon's
/// restarts: a write lock on byte `port` of one file that every test process of this user
/// opens ([`PortClaim::file`]). A pick that finds its port claimed picks again, so no test's
/// daemon takes a port while another's is down for a restart (a restart found its port
/// taken in about 1 of 22,000 runs before). The lock belongs to the open file
/// description (`F_OFD_SETLK`), so two claims in one process exclude each other too (a
/// process's plain `fcntl` locks would not), the descriptor is closed on exec (no daemon
/// inherits it), and the kernel lets the claim go with it, however the test ends.
pub struct PortClaim {
    _lock: std::fs::File,
}

impl PortClaim {
    /// The file whose bytes the claims lock: one per user in `std::env::temp_dir()` (another
    /// user's could not be opened for writing). It stays empty: a lock may cover bytes past
    /// a file's end.
    pub fn file() -> PathBuf {
        // SAFETY: getuid has no preconditions and cannot fail.
        let user = unsafe { libc::getuid() };
        std::env::temp_dir().join(format!("ocm-test-ports-{user}.lock"))
    }

    /// Claims `port`: `Ok(None)` when another claim holds it; an error when the file cannot
    /// be opened or locked.
    pub fn try_claim(port: u16) -> std::io::Result<Option<PortClaim>> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(PortClaim::file())?;
        // SAFETY: an all-zero `flock` is a valid value of the C struct (l_pid must be 0
        // for an open file description's lock); the fields that matter are set below.
        let mut byte: libc::flock = unsafe { std::mem::zeroed() };
        byte.l_type = libc::F_WRLCK as libc::c_short;
        byte.l_whence = libc::SEEK_SET as libc::c_short;
        byte.l_start = libc::off_t::from(port);
        byte.l_len = 1;
        // SAFETY: fcntl reads the `flock` passed; the descriptor is open for the call.
        if unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_OFD_SETLK, &byte) } == 0 {
            return Ok(Some(PortClaim { _lock: lock }));
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Ok(None),
            _ => Err(error),
        }
    }

    /// Whether another claim holds `port` now (one this call makes is let go at once).
    pub fn held_elsewhere(port: u16) -> bool {
        matches!(PortClaim::try_claim(port), Ok(None))
    }

    /// Why no port can be claimed here, if none can: no range to pick from
    /// ([`unhanded_port`]), or no file to lock.
    pub fn unavailable() -> Option<String> {
        if unhanded_port().is_none() {
            return Some("fewer than 1000 ports below the ephemeral range to pick from".into());
        }
        // Byte 0: no claim is ever made on port 0.
        PortClaim::try_claim(0)
            .err()
            .map(|error| format!("{}: {error}", PortClaim::file().display()))
    }
}

/// A port [`unhanded_port`] picks and no other test has claimed, with this test's claim on
/// it; the claim is `None` where no claim can be made (the lock file cannot be opened), as
/// picks were before claims. `None` where [`unhanded_port`] has no range to pick from.
fn claimed_unhanded_port() -> Option<(u16, Option<PortClaim>)> {
    for _ in 0..1000 {
        let port = unhanded_port()?;
        match PortClaim::try_claim(port) {
            Ok(Some(claim)) => return Some((port, Some(claim))),
            Ok(None) => {}
            Err(error) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!("cannot claim test ports ({error}): picks go unclaimed");
                });
                return Some((port, None));
            }
        }
    }
    panic!("a thousand picks in a row found their ports claimed by other tests")
}

/// A port from 10000 up to the start of the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), at random: one no socket bound to port 0 or
/// connecting is ever given. `None` where that range holds fewer than 1000 ports (the
/// caller then asks for port 0).
fn unhanded_port() -> Option<u16> {
    use std::hash::{BuildHasher, RandomState};
    static PICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let first_handed: u16 = range.split_whitespace().next()?.parse().ok()?;
    let from = 10_000u16;
    let count = first_handed.checked_sub(from).filter(|&n| n >= 1000)?;
    // A fresh random key each time (RandomState::new), and a count so that two picks differ.
    let pick = PICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let random = RandomState::new().hash_one(pick);
    Some(from + (random % u64::from(count)) as u16)
}

impl Daemon {
    /// A daemon with default settings and a fresh state directory.
    pub fn start() -> Daemon {
        Daemon::start_with(Options::default())
    }

    /// A daemon with `options` and a fresh state directory.
    pub fn start_with(options: Options) -> Daemon {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Daemon::spawn(dir, options).expect("ocmd starts")
    }

    /// Starts `ocmd` on `dir`; returns its stderr if it exits before listening. The TCP and
    /// UDP ports `options` leaves open (no address, or port 0) are picked among those the
    /// kernel never hands out on its own ([`unhanded_port`]) and claimed for as long as the
    /// daemon is kept ([`PortClaim`]), so that a [`Daemon::restart`] finds them free: a port
    /// from the ephemeral range, left free while the daemon is down, may be given meanwhile
    /// to any socket bound to port 0 or connecting, by any test, and one not claimed may be
    /// picked by another test. Another program may hold a port picked: another pick then.
    pub fn spawn(dir: Arc<tempfile::TempDir>, options: Options) -> Result<Daemon, String> {
        for _ in 0..20 {
            let mut claims = Vec::new();
            // An address with port 0 (or none: 127.0.0.1) gets a claimed port on its IP.
            let mut pick = |given: Option<SocketAddr>| match given {
                Some(fixed) if fixed.port() != 0 => Some(fixed),
                given => {
                    let ip = given.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |a| a.ip());
                    let Some((port, claim)) = claimed_unhanded_port() else {
                        return given;
                    };
                    claims.extend(claim);
                    Some(SocketAddr::new(ip, port))
                }
            };
            let picked = Options {
                tcp: pick(options.tcp),
                udp: pick(options.udp),
                ..options.clone()
            };
            let any_picked = picked.tcp != options.tcp || picked.udp != options.udp;
            match Daemon::spawn_once(Arc::clone(&dir), picked) {
                Err(log) if any_picked && log.contains("Address already in use") => {}
                Ok(mut started) => {
                    started.claims = claims;
                    return Ok(started);
                }
                failed => return failed,
            }
        }
        Daemon::spawn_once(dir, options)
    }

    /// Starts `ocmd` on `dir` with the addresses of `options` (port 0 where it names none);
    /// returns its stderr if it exits before listening.
    fn spawn_once(dir: Arc<tempfile::TempDir>, options: Options) -> Result<Daemon, String> {
        let state = match &options.state_in {
            Some(sub) => dir.path().join(sub),
            None => dir.path().to_owned(),
        }
        .join("room_manager.json");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
        cmd.arg("--tcp")
            .arg(
                options
                    .tcp
                    .map_or("127.0.0.1:0".to_owned(), |a| a.to_string()),
            )
            .arg("--udp")
            .arg(
                options
                    .udp
                    .map_or("127.0.0.1:0".to_owned(), |a| a.to_string()),
            )
            .arg("--state")
            .arg(&state)
            .arg("--metrics")
            .arg(if options.metrics {
                "127.0.0.1:0"
            } else {
                "off"
            });
        if let Some(text) = &options.config {
            let path = dir.path().join("ocmd.toml");
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(path);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
        );
        cmd.env_remove("NOTIFY_SOCKET");
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_this_process(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ocmd");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(LogPipe::new(stderr)));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let log = Arc::clone(&log);
            thread::spawn(move || loop {
                // Waits without the lock, so that `Daemon::log` can read meanwhile.
                let fd = log.lock().unwrap().fd();
                wait_readable(fd);
                let (lines, open) = {
                    let mut pipe = log.lock().unwrap();
                    (pipe.drain(), pipe.open)
                };
                for line in lines {
                    let _ = tx.send(line);
                }
                if !open {
                    break;
                }
            });
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening ").nth(1) {
                        let field = |name: &str| {
                            rest.split_whitespace()
                                .find_map(|kv| kv.strip_prefix(name))
                                .map(str::to_owned)
                        };
                        let tcp = field("tcp=")
                            .and_then(|a| a.parse().ok())
                            .expect("tcp address");
                        let udp = field("udp=")
                            .and_then(|a| a.parse().ok())
                            .expect("udp address");
                        let metrics = field("metrics=").and_then(|a| a.parse().ok());
                        return Ok(Daemon {
                            child: Some(child),
                            tcp,
                            udp,
                            metrics,
                            dir,
                            state,
                            options,
                            log,
                            claims: Vec::new(),
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The child is gone, so its stderr reaches EOF: the reader has collected
                    // every line once it hangs up. (`restart` looks for "Address already in
                    // use" in what this returns.)
                    let deadline = Instant::now() + PATIENCE;
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(_) => continue,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                panic!("ocmd's stderr stayed open after it exited")
                            }
                        }
                    }
                    return Err(log.lock().unwrap().text.clone());
                }
            }
        }
    }

    /// Everything the daemon wrote to stderr before this call: what the reader thread has not
    /// taken from the pipe yet is read here (so a line logged before a reply the test has
    /// received, or before the daemon exited, is in it).
    pub fn log(&self) -> String {
        let mut pipe = self.log.lock().unwrap();
        pipe.drain();
        pipe.text.clone()
    }

    /// Waits until the daemon's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        wait_until(&format!("log line {needle:?}"), || {
            self.log().contains(needle)
        });
    }

    /// Like [`Daemon::wait_for_log`], for a line that comes only after a bound of the daemon's
    /// own that is longer than [`PATIENCE`] (a stop that gives up on the disk after 10 s).
    pub fn wait_for_log_within(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} within {limit:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the `--config` file (the one `Options::config` created) with `toml`, sends
    /// SIGHUP, and waits for this reload's `configuration reloaded` line.
    pub fn reload(&self, toml: &str) {
        const RELOADED: &str = "configuration reloaded";
        let before = self.log().matches(RELOADED).count();
        std::fs::write(self.dir.path().join("ocmd.toml"), toml).expect("write the config");
        self.signal(libc::SIGHUP);
        wait_until("the reload", || {
            self.log().matches(RELOADED).count() > before
        });
    }

    /// Asserts that the dynamic loader took `library` into this daemon (it only warns when it
    /// cannot).
    pub fn assert_loaded(&self, library: &std::path::Path) {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        assert!(
            maps.contains(&library.display().to_string()),
            "{} is not loaded into ocmd",
            library.display()
        );
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Stops the daemon (SIGSTOP) and waits until it is stopped: `kill` returns before a
    /// running or waking process has stopped, and a pass it finishes meanwhile may read what
    /// a test means to queue behind the stop.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid());
        wait_until("the daemon stopped", || {
            std::fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    == Some("T")
            })
        });
    }

    /// Waits for the child to exit (with a deadline) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let status = wait_for_exit(self.child.as_mut().expect("running"), "ocmd");
        self.child = None;
        status
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit();
    }

    /// SIGTERM; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let status = self.wait_exit();
        (status, t.elapsed())
    }

    /// SIGTERM, checking that the daemon exited successfully; returns how long the stop took.
    #[track_caller]
    pub fn stop_cleanly(&mut self) -> Duration {
        let (status, took) = self.terminate();
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
        took
    }

    /// Starts a new daemon on the same state directory and the same ports (the old one
    /// must have exited).
    pub fn restart(&mut self) {
        self.restart_on_udp(self.udp);
    }

    /// Like [`Daemon::restart`], with the UDP socket bound to `udp` instead.
    pub fn restart_on_udp(&mut self, udp: SocketAddr) {
        assert!(self.child.is_none(), "stop the daemon first");
        let mut options = self.options.clone();
        options.tcp = Some(self.tcp);
        options.udp = Some(udp);
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Daemon::spawn(Arc::clone(&self.dir), options.clone()) {
                Ok(mut fresh) => {
                    self.child = fresh.child.take();
                    self.log = Arc::clone(&fresh.log);
                    self.metrics = fresh.metrics;
                    self.udp = fresh.udp;
                    return;
                }
                // The old ports can take a moment to be free again.
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(log) => panic!("restart failed:\n{log}"),
            }
        }
    }

    /// `GET path` on the metrics listener; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        let (status, body) = self.http_answer(path);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        body
    }

    /// GET `path` from the metrics listener, whatever the answer: its status line and body.
    pub fn http_answer(&self, path: &str) -> (String, String) {
        let addr = self.metrics.expect("metrics enabled");
        let mut s = TcpStream::connect(addr).expect("connect metrics");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read response");
        let (head, body) = text.split_once("\r\n\r\n").expect("http response");
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    /// One sample from `/metrics` (0 when absent), e.g. `ocm_rooms` or
    /// `ocm_datagrams_dropped_total{reason="unknown_token"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let body = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().expect("number"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("---- ocmd stderr ----\n{}---------------------", self.log());
        }
    }
}

/// Builds the C `source` into a shared library for `LD_PRELOAD` named after `name`, in `dir`
/// (not `/tmp`, which may be mounted `noexec`: the tests pass `CARGO_TARGET_TMPDIR`), with the
/// C compiler that links Rust binaries (`$CC`, which may carry arguments, or `cc`). Returns
/// its path.
pub fn preload_library(dir: &std::path::Path, name: &str, source: &str) -> PathBuf {
    let source_path = dir.join(format!("{name}.c"));
    let library = dir.join(format!("lib{name}.so"));
    std::fs::write(&source_path, source).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut words = cc.split_whitespace();
    let status = Command::new(words.next().unwrap_or("cc"))
        .args(words)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source_path)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(status.success(), "{cc} failed: {status}");
    library
}

/// What a [`sync_stub`] does to the calls it stands in for while its switch file exists.
#[derive(Debug, Clone, Copy)]
pub enum SyncStub {
    /// Waits, at most `cap_ms` (a stuck disk the test can free, and that frees itself should
    /// the test fail first), creating the switch's name plus `.held` once it has begun.
    Hold { cap_ms: u32 },
    /// Fails with `ENOSPC` (a full disk), on regular files only if `regular_files_only`.
    Fail { regular_files_only: bool },
}

/// Builds, in `dir`, a library for `LD_PRELOAD` whose `function` (`fsync` or `fdatasync`,
/// both `int f(int)`) does what `stub` says while the file named by the environment
/// variable `variable` exists, and otherwise calls the real one.
pub fn sync_stub(dir: &Path, function: &str, variable: &str, stub: SyncStub) -> PathBuf {
    const TEMPLATE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

int @FUNCTION@(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "@FUNCTION@");
    const char *flag = getenv("@VARIABLE@");
    struct stat st;
    if (@FAIL@ && flag && access(flag, F_OK) == 0
            && (!@REGULAR_ONLY@ || (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)))) {
        errno = ENOSPC;
        return -1;
    }
    for (int waited = 0; @HOLD@ && flag && access(flag, F_OK) == 0 && waited < @CAP_MS@; waited++) {
        if (waited == 0) {
            char held[4096];
            snprintf(held, sizeof held, "%s.held", flag);
            int marker = open(held, O_WRONLY | O_CREAT, 0600);
            if (marker >= 0) close(marker);
        }
        usleep(1000);
    }
    return real(fd);
}
"#;
    let (hold, cap_ms, fail, regular_only) = match stub {
        SyncStub::Hold { cap_ms } => (1, cap_ms, 0, false),
        SyncStub::Fail { regular_files_only } => (0, 0, 1, regular_files_only),
    };
    let source = TEMPLATE
        .replace("@HOLD@", &hold.to_string())
        .replace("@CAP_MS@", &cap_ms.to_string())
        .replace("@FAIL@", &fail.to_string())
        .replace("@REGULAR_ONLY@", if regular_only { "1" } else { "0" })
        .replace("@FUNCTION@", function)
        .replace("@VARIABLE@", variable);
    let kind = if hold == 1 { "hold" } else { "fail" };
    preload_library(dir, &format!("{kind}_{function}"), &source)
}

/// Starts `ocmd` on a fresh temporary directory with the `LD_PRELOAD` library `build` makes
/// (in a directory of its own under `CARGO_TARGET_TMPDIR`), `variable` naming the file
/// `switch` in the daemon's directory (the flag or mark the library reads), and `options`
/// for the rest; checks that the library is loaded. Returns the daemon, the switch's path,
/// and the library's directory, to keep while the daemon may restart with it.
pub fn spawn_preloaded(
    build: impl FnOnce(&Path) -> PathBuf,
    (variable, switch): (&str, &str),
    mut options: Options,
) -> (Daemon, PathBuf, tempfile::TempDir) {
    let build_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let library = build(build_dir.path());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let switch = dir.path().join(switch);
    options
        .env
        .push(("LD_PRELOAD".into(), library.display().to_string()));
    options
        .env
        .push((variable.into(), switch.display().to_string()));
    let d = Daemon::spawn(dir, options).expect("ocmd starts");
    d.assert_loaded(&library);
    (d, switch, build_dir)
}

/// A child process killed and reaped when the test ends, failed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a TCRP exchange returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The COMPLIANCE payload, parsed.
    pub compliance: Compliance,
    /// The token from COMPLETE, on success.
    pub token: Option<String>,
}

/// The error code of a refusal; `None` for a success or a refusal without a code.
pub fn refused(reply: &Reply) -> Option<ErrorCode> {
    match &reply.compliance {
        Compliance::Failure { code, .. } => *code,
        Compliance::Success => None,
    }
}

/// Waits (up to [`PATIENCE`]) for `child` to exit and returns its status; `what` names it in
/// the failure.
pub fn wait_for_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads whole TCRP frames from a stream, keeping bytes that arrive early.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame's state and payload; `None` on EOF.
    pub fn next(&mut self, stream: &mut TcpStream) -> Option<(State, Vec<u8>)> {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((frame, used)) = tcrp::decode(&self.buf, 1 << 20).expect("valid frame") {
                let parsed = (frame.state, frame.payload.to_vec());
                self.buf.drain(..used);
                return Some(parsed);
            }
            let n = uninterrupted(|| stream.read(&mut chunk)).expect("read reply");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one reply: COMPLIANCE, and COMPLETE after a success.
    pub fn reply(&mut self, stream: &mut TcpStream) -> Reply {
        let (state, body) = self.next(stream).expect("COMPLIANCE frame");
        assert_eq!(state, State::Compliance);
        let compliance = payload::parse_compliance(&body).expect("COMPLIANCE payload");
        let token = if compliance == Compliance::Success {
            let (state, body) = self.next(stream).expect("COMPLETE frame");
            assert_eq!(state, State::Complete);
            Some(payload::parse_complete(&body).expect("token"))
        } else {
            None
        };
        Reply { compliance, token }
    }
}

/// Sends one request's bytes on `stream` and reads its reply.
pub fn exchange(stream: &mut TcpStream, request: &[u8]) -> Reply {
    stream.write_all(request).expect("send request");
    FrameReader::default().reply(stream)
}

/// The bytes of a REQUEST frame.
pub fn request_bytes(op: Operation, room: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Frame {
        operation: op,
        state: State::Request,
        room_name: room.as_bytes(),
        payload,
    }
    .encode(&mut out)
    .expect("room name fits");
    out
}

/// A fresh connection with TCP_NODELAY and a read timeout.
pub fn connect(daemon: &Daemon) -> TcpStream {
    let s = TcpStream::connect(daemon.tcp).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// One request on its own connection, as the original client does.
pub fn request(daemon: &Daemon, op: Operation, room: &str, payload: &[u8]) -> Reply {
    let mut s = connect(daemon);
    exchange(&mut s, &request_bytes(op, room, payload))
}

/// Creates `room` as `name` with the original client's payload; returns the token.
pub fn create(daemon: &Daemon, room: &str, name: &str) -> String {
    let r = request(
        daemon,
        Operation::CreateRoom,
        room,
        format!("\"{name}\"").as_bytes(),
    );
    r.token
        .unwrap_or_else(|| panic!("create {room} refused: {:?}", r.compliance))
}

/// Joins `room` as `name` with the original client's payload; returns the token.
pub fn join(daemon: &Daemon, room: &str, name: &str) -> String {
    let r = request(
        daemon,
        Operation::JoinRoom,
        room,
        format!("\"{name}\"").as_bytes(),
    );
    r.token
        .unwrap_or_else(|| panic!("join {room} refused: {:?}", r.compliance))
}

/// A room with a host `alice` and a member `bob`, both registered and heard.
pub fn room_of_two(d: &Daemon, room: &str) -> (Member, Member) {
    host_and_member(d, room, "alice", "bob")
}

/// Creates `room` as `host` and joins it as `member`, each from a fresh socket, the member
/// registered and heard by the host; returns the two.
pub fn host_and_member(d: &Daemon, room: &str, host: &str, member: &str) -> (Member, Member) {
    let host_token = create(d, room, host);
    let member_token = join(d, room, member);
    let host = Member::joined(d, room, &host_token);
    let joined = Member::new(d, room, &member_token);
    joined.registered_with(&host, member);
    (host, joined)
}

/// A chat participant speaking raw UCRP from its own UDP socket.
pub struct Member {
    /// The socket.
    pub socket: UdpSocket,
    /// The daemon's UDP address.
    pub server: SocketAddr,
    /// Room name.
    pub room: String,
    /// Token.
    pub token: String,
}

impl Member {
    /// A member with a fresh socket, not yet registered.
    pub fn new(daemon: &Daemon, room: &str, token: &str) -> Member {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        Member {
            socket,
            server: daemon.udp,
            room: room.to_owned(),
            token: token.to_owned(),
        }
    }

    /// A member that has sent its `__REGISTER__` (not yet seen to be bound: see
    /// [`Member::registered_with`]).
    pub fn joined(daemon: &Daemon, room: &str, token: &str) -> Member {
        let m = Member::new(daemon, room, token);
        m.send("__REGISTER__");
        m
    }

    /// The member's local address.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Sends a UCRP datagram with this member's room and token.
    pub fn send(&self, message: &str) {
        let mut b = Vec::new();
        ucrp::datagram::encode(self.room.as_bytes(), self.token.as_bytes(), message, &mut b)
            .expect("fits");
        self.send_raw(&b);
    }

    /// Sends arbitrary bytes to the daemon's UDP socket.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).expect("send");
    }

    /// Waits for the next datagram from the daemon (panics after [`PATIENCE`]). Datagrams
    /// from any other source are skipped: tests run in parallel, and a port this socket took
    /// may have been another test's, whose daemon or relay still sends to it.
    pub fn recv_raw(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (n, from) = uninterrupted(|| self.socket.recv_from(&mut buf))
                .expect("a datagram within the deadline");
            if from == self.server {
                return buf[..n].to_vec();
            }
            eprintln!(
                "skipped a datagram from {from}, not the daemon ({})",
                self.server
            );
            assert!(
                Instant::now() < deadline,
                "no datagram from the daemon in time"
            );
        }
    }

    /// The next datagram, rendered: `sender: text`, `CLOSED`, `#seq sender: text`,
    /// `* name Joined`, or the entries of a batch joined by ` | `.
    pub fn recv(&self) -> String {
        render(&self.recv_raw())
    }

    /// Receives until a datagram renders as `expected`, skipping others; returns the skipped.
    pub fn recv_until(&self, expected: &str) -> Vec<String> {
        let mut skipped = Vec::new();
        loop {
            let got = self.recv();
            if got == expected {
                return skipped;
            }
            skipped.push(got);
        }
    }

    /// Sends `__REGISTER__`, then a probe that `other` must receive: proof that the daemon
    /// has bound our address (UDP gives no acknowledgement). Loopback keeps the two in order
    /// and the daemon handles them in order, so one of each is enough.
    pub fn registered_with(&self, other: &Member, name: &str) {
        self.send("__REGISTER__");
        let probe = format!("probe from {name}");
        self.send(&probe);
        assert_eq!(other.recv(), format!("{name}: {probe}"));
    }
}

/// Renders a server datagram as text for assertions.
pub fn render(bytes: &[u8]) -> String {
    match delivery::parse(bytes).expect("well-formed delivery") {
        Delivery::Chat { sender, message } => format!("{sender}: {message}"),
        Delivery::Sequenced {
            seq,
            sender,
            message,
        } => format!("#{seq} {sender}: {message}"),
        Delivery::RoomClosed => "CLOSED".into(),
        Delivery::Notice { what, name } => format!("* {name} {what:?}"),
        Delivery::Batch(body) => delivery::batch_entries(body)
            .map(|e| render(e.expect("batch entry")))
            .collect::<Vec<_>>()
            .join(" | "),
    }
}

/// The real `ocm` client, driven through pipes.
pub struct Ocm {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    /// stderr lines collected so far.
    pub stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Ocm {
    /// Starts `ocm ARGS... --server 127.0.0.1 --tcp-port T --udp-port U` against `daemon`.
    pub fn start(daemon: &Daemon, args: &[&str]) -> Ocm {
        Ocm::start_at(daemon.tcp.port(), daemon.udp.port(), args)
    }

    /// Starts `ocm ARGS... --server 127.0.0.1 --tcp-port TCP --udp-port UDP` (a server the
    /// test plays itself, for one).
    pub fn start_at(tcp: u16, udp: u16, args: &[&str]) -> Ocm {
        Ocm::start_with_env(tcp, udp, args, &[])
    }

    /// [`Ocm::start_at`] with these environment variables set (`RUST_LOG`, for one).
    pub fn start_with_env(tcp: u16, udp: u16, args: &[&str], env: &[(&str, &str)]) -> Ocm {
        Ocm::launch("127.0.0.1", tcp, udp, args, env, None)
    }

    /// [`Ocm::start`] with `--server HOST` (another loopback address, for one).
    pub fn start_via(daemon: &Daemon, host: &str, args: &[&str]) -> Ocm {
        let (tcp, udp) = (daemon.tcp.port(), daemon.udp.port());
        Ocm::launch(host, tcp, udp, args, &[], None)
    }

    /// [`Ocm::start`] with standard output a pipe whose reader is already gone (`ocm ... |
    /// head` once `head` has quit): every write to it fails with `EPIPE`.
    pub fn start_output_closed(daemon: &Daemon, args: &[&str]) -> Ocm {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        Ocm::launch(
            "127.0.0.1",
            daemon.tcp.port(),
            daemon.udp.port(),
            args,
            &[],
            Some(Stdio::from(writer)),
        )
    }

    /// [`Ocm::start`] with standard output `stdout` (the write end of a pipe the test reads,
    /// for one), which [`Ocm::line`] then does not read.
    pub fn start_with_stdout(daemon: &Daemon, args: &[&str], stdout: Stdio) -> Ocm {
        let (tcp, udp) = (daemon.tcp.port(), daemon.udp.port());
        Ocm::launch("127.0.0.1", tcp, udp, args, &[], Some(stdout))
    }

    /// [`Ocm::start`] with standard error `stderr` (a pipe nobody reads, for one), which
    /// [`Ocm::wait_stderr`] then does not see.
    pub fn start_with_stderr(daemon: &Daemon, args: &[&str], stderr: Stdio) -> Ocm {
        let (tcp, udp) = (daemon.tcp.port(), daemon.udp.port());
        Ocm::launch_with("127.0.0.1", tcp, udp, args, &[], (None, Some(stderr)))
    }

    /// Starts `ocm`; its standard output is `stdout` if given, else read line by line.
    fn launch(
        server: &str,
        tcp: u16,
        udp: u16,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Option<Stdio>,
    ) -> Ocm {
        Ocm::launch_with(server, tcp, udp, args, env, (stdout, None))
    }

    /// Starts `ocm`; its standard output and error are the ones given, else read line by
    /// line.
    fn launch_with(
        server: &str,
        tcp: u16,
        udp: u16,
        args: &[&str],
        env: &[(&str, &str)],
        (stdout, stderr): (Option<Stdio>, Option<Stdio>),
    ) -> Ocm {
        let read_stdout = stdout.is_none();
        let mut child = Command::new(sibling_binary("ocm"))
            .envs(env.iter().copied())
            .arg("--server")
            .arg(server)
            .arg("--tcp-port")
            .arg(tcp.to_string())
            .arg("--udp-port")
            .arg(udp.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout.unwrap_or_else(Stdio::piped))
            .stderr(stderr.unwrap_or_else(Stdio::piped))
            .spawn()
            .expect("spawn ocm");
        let stdin = child.stdin.take();
        let (tx, stdout) = mpsc::channel();
        if read_stdout {
            let out = child.stdout.take().expect("stdout");
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        // Taken only when piped: when given, it is not ours to read.
        let stderr_reader = child.stderr.take().map(|err| {
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            })
        });
        Ocm {
            child,
            stdin,
            stdout,
            stderr,
            stderr_reader,
        }
    }

    /// Types a line.
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to ocm");
        stdin.flush().unwrap();
    }

    /// Types `/quit` and checks that `ocm` exits successfully.
    #[track_caller]
    pub fn quit_cleanly(&mut self) {
        self.type_line("/quit");
        assert!(self.wait().success());
    }

    /// Hands standard input over (to feed it from another thread).
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin open")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, from `/proc/PID/status`, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("ocm's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Closes standard input (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next stdout line.
    pub fn line(&self) -> String {
        self.stdout.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!(
                "no output from ocm; stderr:\n{}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// Reads stdout lines until one equals `expected`, all within [`PATIENCE`]; returns the
    /// lines before it.
    pub fn lines_until(&self, expected: &str) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line == expected => return before,
                Ok(line) => before.push(line),
                Err(_) => panic!(
                    "ocm never printed {expected:?}; before it: {before:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// The next stdout line if one comes within `wait` (for bounded retry loops).
    pub fn line_within(&self, wait: Duration) -> Option<String> {
        self.stdout.recv_timeout(wait).ok()
    }

    /// Every stdout line still to come, up to the reader's end (EOF after `ocm` exited),
    /// within [`PATIENCE`]: a negative check that does not race the reader thread.
    pub fn rest_of_stdout(&self) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return rest,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("ocm's stdout stayed open"),
            }
        }
    }

    /// Sends a signal to the `ocm` process (e.g. SIGSTOP/SIGCONT to fake a sleeping laptop).
    pub fn signal(&self, signal: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        wait_until(&format!("ocm stderr {needle:?}"), || {
            self.stderr.lock().unwrap().contains(needle)
        });
    }

    /// Waits until a joined `ocm` has shown the room's recent history and gone live: a message
    /// sent before that may show in the history (`[hh:mm] alice: hello`) instead of live.
    pub fn wait_live(&self) {
        self.wait_stderr("* --- live ---");
    }

    /// Waits for exit and returns the status.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The pipe is closed now: let the reader take the last lines.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "ocm did not exit; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ocm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Has the process `cmd` starts killed when this one dies, however it dies: a test binary
/// killed at a harness's time limit (or a mutation run's) would otherwise leave its `ocmd`
/// running, and one built from a mutant that spins keeps a core busy for good. (The signal
/// comes when the thread that spawned the child ends; every daemon here is started, and
/// dropped, by the test's own thread.) If this process died before the `prctl`, the child is
/// not started at all.
pub fn die_with_this_process(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure makes raw system calls only and builds io::Errors from errno
    // values, allocating nothing, as code between fork and exec must.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A pipe filled to the brim that nobody reads (a `2>` whose reader stopped): a write to its
/// write end blocks until the test reads. The write end is handed back blocking, as a shell
/// hands one over.
pub fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    let (reader, mut writer) = std::io::pipe().expect("a pipe");
    let fd = writer.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns; it changes only its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(flags >= 0, "{}", std::io::Error::last_os_error());
    let set = |flags: libc::c_int| {
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    };
    set(flags | libc::O_NONBLOCK);
    // Whole pages first, then byte by byte into what is left of the last one.
    for chunk in [4096, 1] {
        let filler = vec![b'.'; chunk];
        loop {
            match writer.write(&filler) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    set(flags);
    (reader, writer)
}

/// A pseudo-terminal of 24 rows and 80 columns: the test's side (what is written to it is
/// typed; what the child writes is read from it) and the terminal a child is given. Neither
/// is inherited by a child unless handed to it: one holding the test's side would keep the
/// terminal alive (and itself never hung up) should the test die.
pub fn open_pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the integers passed; the name buffer and
    // termios are optional (null).
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [controller, terminal] {
        // SAFETY: fcntl on a descriptor this function owns.
        assert_eq!(
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) },
            0
        );
    }
    // SAFETY: both descriptors were just opened and nothing else owns them.
    unsafe {
        (
            std::fs::File::from_raw_fd(controller),
            std::os::fd::OwnedFd::from_raw_fd(terminal),
        )
    }
}

/// Starts the stopped daemon again on the same ports with no state at all: every room and
/// token it had is gone, as after a restart on a lost or fresh state file.
pub fn restart_with_fresh_state(d: &mut Daemon) {
    for entry in std::fs::read_dir(d.dir.path()).expect("the state directory") {
        let path = entry.expect("a directory entry").path();
        if path.file_name().is_some_and(|name| name != "ocmd.toml") {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove a state directory");
            } else {
                std::fs::remove_file(&path).expect("remove a state file");
            }
        }
    }
    d.restart();
}

/// An address the tests in a private network ([`in_private_network`]) serve on, and take
/// away to cut the way to the server as a network gone does.
pub const PRIVATE_ADDRESS: &str = "10.77.0.1";

/// Runs `ip ARGS...`; whether it succeeded.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `test` on a thread of its own in a network namespace of its own, whose loopback
/// interface is up and holds [`PRIVATE_ADDRESS`]/8 too; the processes it starts inherit the
/// namespace (it belongs to the thread), so the test may cut their way to each other. Where
/// no such namespace can be made (not root, no `ip`), says so ([`skipped`]) and returns.
pub fn in_private_network(test: impl FnOnce() + Send + 'static) {
    let (ready, made) = std::sync::mpsc::channel();
    let thread = thread::spawn(move || {
        // SAFETY: unshare with no pointer arguments; it moves only this thread, which runs
        // nothing but the test, to a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let why = std::io::Error::last_os_error();
            let _ = ready.send(Err(format!("no network namespace of our own here: {why}")));
            return;
        }
        let address = format!("{PRIVATE_ADDRESS}/8");
        if !ip(&["link", "set", "lo", "up"]) || !ip(&["addr", "add", &address, "dev", "lo"]) {
            let _ = ready.send(Err("cannot set up a network namespace with ip".to_owned()));
            return;
        }
        let _ = ready.send(Ok(()));
        test();
    });
    let made = made.recv();
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
    match made {
        Ok(Ok(())) => {}
        Ok(Err(why)) => skipped(&why),
        Err(_) => panic!("the test thread ended before its network was set up"),
    }
}
