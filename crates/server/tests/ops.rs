//! Operating `ocmd`: the systemd notify protocol and watchdog, `/metrics` and `/healthz`,
//! configuration checks and precedence, SIGHUP reloads, journald-style logs, the systemd
//! unit (`scripts/check-unit`), `scripts/install.sh` and the Debian package
//! (`scripts/package-deb`).
//!
//! Like every integration test here, these drive the real binary with deadlines, never fixed
//! ports or bare sleeps. Checks that need outside tools (`systemd-analyze`, `promtool`,
//! `unshare`) run when the tool is installed and print a note when it is not.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tcrp::payload::ErrorCode;
use tcrp::Operation;

// ---------------------------------------------------------------------------------------------
// Helpers

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Stands for journald's stream in a test's environment: the spawn replaces it with the
/// `dev:ino` of the pipe it gives the daemon as standard error, as systemd does.
const JOURNALD: &str = "journald";

/// `ocmd`'s flags for listeners on free loopback ports, and no metrics listener.
const LOOPBACK_LISTENERS: [&str; 6] = [
    "--tcp",
    "127.0.0.1:0",
    "--udp",
    "127.0.0.1:0",
    "--metrics",
    "off",
];

/// A pipe for a child's standard error, and the `dev:ino` of its writing end (what systemd
/// puts in `JOURNAL_STREAM` for its own stream).
fn stderr_pipe() -> (std::io::PipeReader, std::io::PipeWriter, String) {
    use std::os::fd::AsRawFd;
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat on a descriptor we own, filling `stat`, read only after it succeeded.
    assert_eq!(
        unsafe { libc::fstat(writer.as_raw_fd(), stat.as_mut_ptr()) },
        0
    );
    // SAFETY: initialized by the successful fstat.
    let stat = unsafe { stat.assume_init() };
    let dev_ino = format!("{}:{}", stat.st_dev, stat.st_ino);
    (reader, writer, dev_ino)
}

/// [`run_with_deadline`] with standard error journald's stream (`JOURNAL_STREAM` naming it).
fn run_under_journald(mut cmd: Command) -> Output {
    let (mut reader, writer, dev_ino) = stderr_pipe();
    let mut child = cmd
        .env("JOURNAL_STREAM", dev_ino)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(writer)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Our copy of the writing end, or the reader would never see the end.
    drop(cmd);
    let pid = child.id();
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut err = Vec::new();
        let _ = reader.read_to_end(&mut err);
        let mut out = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut out);
        }
        let _ = tx.send(child.wait().map(|status| Output {
            status,
            stdout: out,
            stderr: err,
        }));
    });
    match rx.recv_timeout(PATIENCE * 6) {
        Ok(output) => output.expect("wait for command"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("ocmd did not finish in time");
        }
    }
}

/// Runs a command to completion with a deadline (a hung script fails the test).
fn run_with_deadline(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE * 6) {
        Ok(output) => output.expect("wait for command"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish in time");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a check (a script, an outside tool) to completion and fails the test with its output,
/// headed by `what`, when it does not pass. Its output, for more checks.
fn assert_passes(cmd: Command, what: &str) -> Output {
    let out = run_with_deadline(cmd);
    assert!(
        out.status.success(),
        "{what}:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `ocmd ARGS...` to completion (for `--check-config`).
fn ocmd(args: &[impl AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
    cmd.args(args).env_remove("NOTIFY_SOCKET");
    run_with_deadline(cmd)
}

/// `ocmd --check-config --config PATH` to completion.
fn check_config_file(path: &Path) -> Output {
    ocmd(&[
        "--check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])
}

/// `ocmd --check-config --state PATH` to completion.
fn check_config_state(path: &Path) -> Output {
    ocmd(&[
        "--check-config".as_ref(),
        "--state".as_ref(),
        path.as_os_str(),
    ])
}

/// Asserts that the command behind `out` exited with `code`; returns its standard error.
#[track_caller]
fn assert_exit_code(out: &Output, code: i32) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    err
}

/// The systemd side of the notify protocol: a datagram socket the daemon writes to.
struct NotifyListener {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Every notification received, in order.
    seen: Vec<String>,
}

impl NotifyListener {
    fn bind() -> NotifyListener {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifyListener {
            socket,
            path,
            _dir: dir,
            seen: Vec::new(),
        }
    }

    fn env(&self) -> (String, String) {
        (
            "NOTIFY_SOCKET".into(),
            self.path.to_str().expect("utf-8 path").to_owned(),
        )
    }

    /// [`NotifyListener::env`] and `WATCHDOG_USEC` set to `usec` (0: no watchdog).
    fn env_with_watchdog_usec(&self, usec: &str) -> Vec<(String, String)> {
        vec![self.env(), ("WATCHDOG_USEC".into(), usec.into())]
    }

    /// The next notification, within `wait`. Only the timeout ends the wait empty-handed: any
    /// other error fails the test, named.
    fn next_within(&mut self, wait: Duration) -> Option<String> {
        let mut buf = [0u8; 4096];
        let socket = &self.socket;
        let received = uninterrupted_within(wait.max(Duration::from_millis(1)), |left| {
            socket.set_read_timeout(Some(left))?;
            socket.recv(&mut buf)
        });
        match received {
            Ok(n) => {
                let msg = text(&buf[..n]);
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("reading the notify socket: {e}; so far: {:?}", self.seen),
        }
    }

    /// The next notification (fails after `PATIENCE`).
    fn next(&mut self) -> String {
        self.next_within(PATIENCE)
            .unwrap_or_else(|| panic!("no notification; so far: {:?}", self.seen))
    }

    /// Skips periodic notifications (`STATUS=`, `WATCHDOG=1`) and returns the next other one.
    fn next_event(&mut self) -> String {
        loop {
            let msg = self.next();
            if !msg.starts_with("STATUS=") && msg != "WATCHDOG=1" {
                return msg;
            }
        }
    }

    /// Fills the socket's queue the way other services' messages do (`OTHER=1`).
    fn fill(&self) {
        fill_datagram_queue(&self.path);
    }

    /// Waits (up to `wait`) for a notification satisfying `want`.
    fn wait_for(&mut self, wait: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "notification not seen; got {:?}",
                self.seen
            );
            if let Some(msg) = self.next_within(left) {
                if want(&msg) {
                    return msg;
                }
            }
        }
    }
}

/// Starts a daemon that notifies `sd`, with `WATCHDOG_USEC` set to `watchdog_usec`.
fn start_notifying(sd: &NotifyListener, watchdog_usec: &str) -> Daemon {
    Daemon::start_with(Options {
        env: sd.env_with_watchdog_usec(watchdog_usec),
        ..Options::default()
    })
}

fn monotonic_usec() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u128) * 1_000_000 + (ts.tv_nsec as u128) / 1000
}

/// The lines `child` writes to its standard error (piped), as they come.
fn stderr_lines(child: &mut Child) -> Receiver<String> {
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped standard error");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

/// One request (`name` its payload) on a connection of its own to `tcp`.
fn request_at(tcp: SocketAddr, op: Operation, room: &str, name: &str) -> Reply {
    let mut s = TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(
        &mut s,
        &request_bytes(op, room, format!("\"{name}\"").as_bytes()),
    )
}

/// The first line of `log` that contains `needle` (fails, showing the log, when none does).
#[track_caller]
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

/// Starts `ocmd` in `dir` with `options` expecting it to refuse; returns what it logged.
#[track_caller]
fn refused_start(dir: Arc<tempfile::TempDir>, options: Options) -> String {
    let place = dir.path().display().to_string();
    match Daemon::spawn(dir, options) {
        Ok(_) => panic!("ocmd started in {place}, where it must refuse to"),
        Err(log) => log,
    }
}

/// One raw HTTP exchange; returns the status line and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// `/readyz` asked in HTTP/1.0; the status line and the body.
fn readyz_over_http_1_0(addr: SocketAddr) -> (String, String) {
    http(addr, "GET /readyz HTTP/1.0\r\n\r\n")
}

/// Samples of a Prometheus text body: `name{labels}` → value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_owned(), value.parse().expect("sample value"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

/// The sum of the samples whose names start with `prefix` (a family's, over its labels).
fn sum_of(samples: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, value)| value)
        .sum()
}

/// Options for a daemon with its `/metrics` listener on.
fn metrics_on() -> Options {
    Options {
        metrics: true,
        ..Options::default()
    }
}

/// Options for a daemon started with `toml` as its config file.
fn configured(toml: &str) -> Options {
    Options {
        config: Some(toml.into()),
        ..Options::default()
    }
}

/// Rewrites the daemon's config file (`Options::config` puts it at `dir/ocmd.toml`).
fn rewrite_config(d: &Daemon, text: &str) {
    let path = d.dir.path().join("ocmd.toml");
    assert!(path.exists(), "the daemon was started with a config file");
    std::fs::write(path, text).expect("rewrite config");
}

fn chat_flows(alice: &Member, bob: &Member, what: &str) {
    alice.send(&format!("a {what}"));
    assert_eq!(bob.recv(), format!("alice: a {what}"));
    bob.send(&format!("b {what}"));
    assert_eq!(alice.recv(), format!("bob: b {what}"));
}

// ---------------------------------------------------------------------------------------------
// systemd notify protocol

#[test]
fn notify_ready_status_reloading_and_stopping() {
    let mut sd = NotifyListener::bind();
    let mut d = Daemon::start_with(Options {
        // 0: no watchdog (also guards against a WATCHDOG_USEC inherited from the test's own
        // environment).
        env: sd.env_with_watchdog_usec("0"),
        // A config file, so that SIGHUP has something to reload.
        ..configured("[log]\nlevel = \"debug\"\n")
    });
    // Start-up: READY=1 is the first notification, and it is sent only after the listening
    // line (Daemon::start_with returned once that line was logged); the daemon serves then.
    assert_eq!(sd.next(), "READY=1");
    assert!(d.log().contains("listening tcp="));
    let status = sd.next();
    assert!(
        status.starts_with("STATUS=0 rooms, 0 members (0 registered)"),
        "{status:?}"
    );
    // The status is live: it follows the registry (refreshed every 5 s).
    let (_alice, _bob) = room_of_two(&d, "lobby");
    let status = sd.wait_for(PATIENCE, |m| m.starts_with("STATUS=1 room,"));
    assert!(status.contains("2 members (2 registered)"), "{status:?}");

    // Reload: RELOADING=1 with the monotonic time of the request, then READY=1 again.
    let before = monotonic_usec();
    d.signal(libc::SIGHUP);
    let reloading = sd.next_event();
    let after = monotonic_usec();
    let usec: u128 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .trim()
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC {usec} outside [{before}, {after}]"
    );
    assert_eq!(sd.next_event(), "READY=1");
    d.wait_for_log("configuration reloaded");

    // Shutdown: STOPPING=1, then a clean exit.
    let (status, _) = d.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(sd.next_event(), "STOPPING=1");
    // STOPPING=1 is the last word.
    assert_eq!(sd.next_within(Duration::from_millis(100)), None);
    assert!(
        !sd.seen.iter().any(|m| m.contains("WATCHDOG")),
        "no watchdog pings without WATCHDOG_USEC: {:?}",
        sd.seen
    );
}

#[test]
fn notify_watchdog_pings_at_half_the_interval() {
    let mut sd = NotifyListener::bind();
    // 200 ms asked: a ping every 100 ms. WATCHDOG_PID is left unset: the child's pid is not
    // known before it is spawned, and an unset WATCHDOG_PID means "you".
    let d = start_notifying(&sd, "200000");
    sd.wait_for(PATIENCE, |m| m == "WATCHDOG=1");
    let (start, cpu_before) = (Instant::now(), cpu_time(d.pid()));
    for _ in 0..5 {
        sd.wait_for(PATIENCE, |m| m == "WATCHDOG=1");
    }
    // Five more pings at 100 ms are 0.5 s; allow a loaded machine a lot of slack, but far less
    // than the 5 s status interval (which would mean pings ride on other timers only).
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "5 pings took {took:?}");
    // The loop sleeps between pings: a ping due in the past would keep the poll timeout at
    // zero, the loop on a core.
    let cpu = cpu_time(d.pid()) - cpu_before;
    assert!(
        cpu < took / 4,
        "the daemon used {cpu:?} of CPU in {took:?} of pings"
    );
    // And the daemon pings from a working loop: it still serves.
    create(&d, "alive", "host");
}

/// The watchdog pings at half its interval however busy the loop is: a pass for other work
/// (here a datagram every 10 ms) does not ping.
#[test]
fn notify_watchdog_pings_no_more_often_under_traffic() {
    let mut sd = NotifyListener::bind();
    // 2 s asked: a ping every second.
    let d = start_notifying(&sd, "2000000");
    sd.wait_for(PATIENCE, |m| m == "WATCHDOG=1");
    let window = Duration::from_millis(1500);
    let udp = d.udp;
    let traffic = thread::spawn(move || {
        let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < window {
            junk.send_to(b"not ucrp", udp).unwrap();
            sent += 1;
            // Pacing, not a wait for anything.
            thread::sleep(Duration::from_millis(10));
        }
        sent
    });
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < window {
        if sd.next_within(window.saturating_sub(start.elapsed())) == Some("WATCHDOG=1".into()) {
            pings += 1;
        }
    }
    let sent = traffic.join().unwrap();
    assert!(sent > 20, "only {sent} datagrams sent");
    // One a second: two in 1.5 s, three if the clocks' edges fall badly.
    assert!(
        pings <= 3,
        "{pings} pings in {window:?} of {sent} datagrams"
    );
}

#[test]
fn notify_watchdog_meant_for_another_pid_is_ignored() {
    let mut sd = NotifyListener::bind();
    // WATCHDOG_PID names pid 1, not ocmd: no pings, whatever WATCHDOG_USEC says.
    let d = Daemon::start_with(Options {
        env: vec![
            sd.env(),
            ("WATCHDOG_USEC".into(), "20000".into()),
            ("WATCHDOG_PID".into(), "1".into()),
        ],
        ..Options::default()
    });
    assert_eq!(sd.next(), "READY=1");
    // The periodic STATUS is sent from the same timer pass that would ping, once at the start
    // and then every 5 s: up to the second one, pings every 10 ms would have come hundreds
    // of times. (The notifications themselves are proven to arrive by the STATUS lines.)
    let mut statuses = 0;
    while statuses < 2 {
        let msg = sd.next();
        assert_ne!(msg, "WATCHDOG=1", "pinged for WATCHDOG_PID=1");
        if msg.starts_with("STATUS=") {
            statuses += 1;
        }
    }
    create(&d, "r", "host");
}

/// OPERATIONS.md: "A failing notification is logged once (warn) and never stops the daemon."
/// A service manager that does not read its socket for a while (PID 1 busy in a long
/// `daemon-reload`, the shared /run/systemd/notify queue full of other services' messages) must
/// not stall the event loop: a periodic notification is dropped (EAGAIN), once warned about.
/// The socket was blocking, so the daemon waited inside `sendto` for as long as nobody read,
/// and answered nothing (not even /healthz) meanwhile (found by a review).
#[test]
fn a_notify_socket_nobody_reads_does_not_stall_the_loop() {
    // Bound, never read: its queue (net.unix.max_dgram_qlen datagrams) fills with pings.
    let sd = NotifyListener::bind();
    let d = Daemon::start_with(Options {
        // A ping every 100 µs fills even a 512-datagram queue within a tenth of a second.
        env: sd.env_with_watchdog_usec("200"),
        ..metrics_on()
    });
    let addr = d.metrics.expect("metrics on");
    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < Duration::from_secs(2) || checks < 3 {
        let mut s = TcpStream::connect(addr).expect("connect metrics");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let mut response = String::new();
        let read = s.read_to_string(&mut response);
        assert!(
            read.is_ok() && response.ends_with("ok\n"),
            "/healthz not answered {:?} after start ({read:?}, {response:?}): the loop is blocked \
             sending to a notify socket nobody reads",
            start.elapsed()
        );
        checks += 1;
    }
    d.wait_for_log("cannot notify the service manager");
    assert_eq!(
        d.log().matches("cannot notify the service manager").count(),
        1,
        "warned once"
    );
    drop(sd);
}

/// A `READY=1` that found the manager's queue full for longer than the second it waits for
/// room was lost: systemd, never told, would time the start out and kill a daemon that was
/// serving. It is held and sent as soon as the queue has room, before any periodic
/// notification (found by a review).
#[test]
fn a_ready_the_full_queue_refused_reaches_the_manager_once_there_is_room() {
    let mut sd = NotifyListener::bind();
    sd.fill();
    let d = start_notifying(&sd, "0");
    d.wait_for_log("notification queue is full: holding \"READY=1\"");
    // The manager reads its queue (other services' messages first): READY=1 comes next.
    let first = sd.wait_for(PATIENCE, |m| m != "OTHER=1");
    assert_eq!(first, "READY=1", "so far: {:?}", sd.seen);
    d.wait_for_log("notification queue took the held notifications");
    // The periodic status follows (within 5 s), and the daemon served throughout.
    let waiting = Instant::now();
    let status = sd.next_within(PATIENCE).unwrap_or_else(|| {
        panic!(
            "no STATUS= within {:?}; so far: {:?}\ndaemon log:\n{}",
            waiting.elapsed(),
            sd.seen,
            d.log()
        )
    });
    assert!(status.starts_with("STATUS="), "{status:?}");
    create(&d, "served", "host");
}

/// A `READY=1` waiting for room in a full queue when `ocmd` is stopped and continued (or gets
/// any signal) has its wait ended with EINTR, even with no handler (signal(7)). That was taken
/// for a failure: the `READY=1` was dropped, and systemd would have killed a serving daemon at
/// the start timeout. It is held like one that timed out, and reaches the manager.
#[test]
fn a_ready_whose_wait_for_room_a_stop_interrupts_still_reaches_the_manager() {
    // An attempt counts once the stop came while the daemon was in the waiting `sendto`;
    // one that looked too late (the second's wait already over) is made again.
    for _attempt in 0..3 {
        let mut sd = NotifyListener::bind();
        sd.fill();
        let d = start_notifying(&sd, "0");
        // `listening ...` (which start_with waits for) is logged just before READY=1 is sent.
        let syscall = format!("/proc/{}/syscall", d.pid());
        let in_sendto = || {
            std::fs::read_to_string(&syscall)
                .map(|s| s.split_whitespace().next() == Some(libc::SYS_sendto.to_string().as_str()))
        };
        let deadline = Instant::now() + PATIENCE;
        let caught = loop {
            match in_sendto() {
                Ok(true) => break true,
                Ok(false) => {}
                Err(e) => {
                    skipped(&format!("cannot read {syscall}: {e}"));
                    return;
                }
            }
            if d.log().contains("notification queue is full") {
                break false;
            }
            assert!(Instant::now() < deadline, "ocmd never waited in sendto");
            thread::sleep(Duration::from_millis(1));
        };
        if !caught {
            continue;
        }
        d.signal(libc::SIGSTOP);
        d.signal(libc::SIGCONT);
        let first = sd.wait_for(PATIENCE, |m| m != "OTHER=1");
        assert_eq!(first, "READY=1", "so far: {:?}\n{}", sd.seen, d.log());
        assert!(
            !d.log().contains("cannot notify"),
            "the interrupted wait was taken for a failure:\n{}",
            d.log()
        );
        create(&d, "served", "host");
        return;
    }
    panic!("three daemons were past their wait for room before they could be stopped in it");
}

// ---------------------------------------------------------------------------------------------
// /metrics and /healthz

#[test]
fn metrics_count_traffic_exactly() {
    let test_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let d = Daemon::start_with(metrics_on());
    let host_token = create(&d, "m", "alice");
    let bob_token = join(&d, "m", "bob");
    let r = request(&d, Operation::JoinRoom, "nowhere", b"\"carol\"");
    assert_eq!(refused(&r), Some(ErrorCode::RoomNotFound));

    // Datagrams: 1 alice REGISTER, 2 bob REGISTER, 3 bob's probe (relayed), 4 an unknown
    // token (dropped), 5 alice's hello (relayed). One socket's datagrams, and datagrams sent
    // one after another from this thread, reach the daemon in order: bob hearing the hello
    // proves all five were handled.
    let alice = Member::joined(&d, "m", &host_token);
    let bob = Member::new(&d, "m", &bob_token);
    bob.registered_with(&alice, "bob");
    let intruder = Member::new(&d, "m", "0123456789abcdef0123456789abcdef");
    intruder.send("let me in");
    alice.send("hello");
    assert_eq!(bob.recv(), "alice: hello");

    let body = d.http_get("/metrics");
    let m = samples(&body);
    let expect = [
        ("ocm_rooms", 1.0),
        ("ocm_members", 2.0),
        ("ocm_members_registered", 2.0),
        (
            "ocm_handshakes_total{operation=\"create_room\",result=\"ok\"}",
            1.0,
        ),
        (
            "ocm_handshakes_total{operation=\"join_room\",result=\"ok\"}",
            1.0,
        ),
        (
            "ocm_handshakes_total{operation=\"join_room\",result=\"room_not_found\"}",
            1.0,
        ),
        ("ocm_messages_relayed_total", 2.0),
        ("ocm_deliveries_total", 2.0),
        ("ocm_datagrams_received_total", 5.0),
        ("ocm_datagrams_dropped_total{reason=\"unknown_token\"}", 1.0),
        ("ocm_closed_room_replies_total", 0.0),
        ("ocm_keepalive_expiries_total", 0.0),
        ("ocm_idle_rooms_closed_total", 0.0),
        ("ocm_checkpoints_deferred_total", 0.0),
        // Each accept drain ends in the listener's WouldBlock, which is not a failure.
        ("ocm_tcp_accept_errors_total", 0.0),
        // Every datagram read gets its relay delay counted (kernel arrival stamps).
        ("ocm_relay_delay_seconds_count", 5.0),
        ("ocm_relay_delay_seconds_bucket{le=\"+Inf\"}", 5.0),
        // The create's and the join's replies waited for the disk; the refusal did not.
        ("ocm_handshake_durable_wait_seconds_count", 2.0),
        (
            "ocm_handshake_durable_wait_seconds_bucket{le=\"+Inf\"}",
            2.0,
        ),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&m, name), value, "{name}\n{body}");
    }
    // Nothing else was dropped or refused.
    let dropped = sum_of(&m, "ocm_datagrams_dropped_total");
    assert_eq!(dropped, 1.0, "{body}");
    let handshakes = sum_of(&m, "ocm_handshakes_total");
    assert_eq!(handshakes, 3.0, "{body}");
    // The create and join were acknowledged only once durable, so writes happened.
    assert!(sample(&m, "ocm_state_writes_total") >= 1.0, "{body}");
    assert!(sample(&m, "ocm_state_write_records_total") >= 2.0, "{body}");
    assert!(
        sample(&m, "ocm_handshake_durable_wait_seconds_sum") > 0.0,
        "{body}"
    );
    let started = sample(&m, "ocm_process_start_time_seconds");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        test_start - 1.0 <= started && started <= now,
        "start time {started} not in [{test_start}, {now}]"
    );
    // Every sample belongs to a declared family, and every family has HELP and TYPE.
    // (A histogram's samples add _bucket, _sum and _count to its family's name.)
    for name in m.keys() {
        let sample = name.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|f| body.contains(&format!("# TYPE {f} histogram")))
            .unwrap_or(sample);
        assert!(body.contains(&format!("# TYPE {family} ")), "{name}");
        assert!(body.contains(&format!("# HELP {family} ")), "{name}");
    }
    // Every family is documented for operators.
    let operations = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/OPERATIONS.md"),
    )
    .expect("docs/OPERATIONS.md");
    for family in body.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            operations.contains(&format!("| `{name}` |")),
            "{name} is not in the metrics table of docs/OPERATIONS.md"
        );
    }
    // Five datagrams on loopback: each waited well under a second in the daemon.
    assert_eq!(
        sample(&m, "ocm_relay_delay_seconds_bucket{le=\"1\"}"),
        5.0,
        "{body}"
    );

    if installed("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        eprintln!("promtool check metrics: OK");
    } else {
        skipped("promtool not installed (apt-get install prometheus): the format lint");
    }
}

/// docs/OPERATIONS.md: `ocm_state_compactions_total` counts "the fold at start (when the
/// journal held records)", and `ocm_state_compaction_last_seconds` is the time the last state
/// file write took, "a journal compaction ..., or the fold at start". The fold happens before
/// the daemon listens, so the first scrape after such a start must already show it, whether
/// or not anything has been written to the journal since.
#[test]
fn the_fold_at_start_shows_in_the_metrics_before_any_traffic() {
    let mut d = Daemon::start_with(metrics_on());
    create(&d, "lobby", "alice");
    // A kill leaves the create in the journal, so the next start folds it.
    d.kill9();
    d.restart();
    assert!(
        d.log().contains("state: folded 1 journal record into"),
        "no fold at start:\n{}",
        d.log()
    );
    assert_eq!(d.metric("ocm_rooms"), 1.0);
    assert_eq!(
        d.metric("ocm_state_compactions_total"),
        1.0,
        "the fold at start is not counted"
    );
    assert!(d.metric("ocm_state_compaction_last_seconds") > 0.0);
}

/// A request refused before all of it was read (a head that never ends within 8 KiB) gets
/// its whole answer: the daemon closes its side and reads what is still coming until the
/// peer's end, instead of closing with unread bytes, which sends an RST that may destroy
/// the answer before the client reads it.
#[test]
fn an_answer_to_an_oversized_request_is_not_cut_by_a_reset() {
    let d = Daemon::start_with(metrics_on());
    let addr = d.metrics.expect("metrics on");
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).expect("connect metrics");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        // 64 KiB: far more than the daemon reads before it answers.
        let junk = format!("GET /{} HTTP/1.1\r\n", "x".repeat(64 * 1024));
        s.write_all(junk.as_bytes())
            .expect("the daemon takes the request");
        // The client has finished sending: only then does it read.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response)
            .expect("the whole answer, then the end, not a reset");
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{response:?}"
        );
    }
    // The same for a TCRP frame whose payload is over the cap: its refusal arrives whole.
    let mut s = TcpStream::connect(d.tcp).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut frame = vec![0u8; 32];
    frame[0] = 1;
    frame[1] = 1; // create
    frame[2] = 0; // REQUEST
    let size: u64 = 1 << 30;
    frame[24..32].copy_from_slice(&size.to_be_bytes());
    frame.push(b'r');
    frame.extend(std::iter::repeat_n(b'x', 64 * 1024));
    s.write_all(&frame).expect("the daemon takes the frame");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .expect("the whole refusal, then the end, not a reset");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("malformed_request"), "{text:?}");
}

#[test]
fn healthz_and_unknown_paths() {
    let d = Daemon::start_with(metrics_on());
    let addr = d.metrics.expect("metrics on");
    assert_eq!(d.http_get("/healthz"), "ok\n");
    let (status, body) = http(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found", "{body}");
    let (status, _) = http(addr, "GET /metricsx HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(addr, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // HEAD gets the head only; a query string is ignored.
    let (status, body) = http(addr, "HEAD /healthz HTTP/1.0\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    let (status, body) = http(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("# TYPE ocm_rooms gauge"));
    // An absolute-form target, behind an empty line, is the path it names (RFC 9112); a
    // request line with more than three parts is a bad request.
    let (status, body) = http(
        addr,
        &format!("\r\nGET http://{addr}/healthz HTTP/1.1\r\n\r\n"),
    );
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, _) = http(addr, "GET /healthz HTTP/1.1 extra\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // A head that does not end within 8 KiB: exactly 8 KiB, so that nothing is left unread
    // when the daemon closes (unread bytes would make the close an RST that may cut the
    // answer).
    let long = format!("GET /{} HTTP/1.1\r\n", "x".repeat(8192 - 16));
    assert_eq!(long.len(), 8192);
    let (status, _) = http(addr, &long);
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    // Every answer is counted by its code, this scrape included: /healthz three times (GET,
    // HEAD and the absolute form), /metrics twice.
    let body = d.http_get("/metrics");
    for (code, count) in [("200", 5), ("400", 2), ("404", 2), ("431", 1)] {
        let sample = format!("ocm_http_responses_total{{code=\"{code}\"}} {count}\n");
        assert!(body.contains(&sample), "{sample:?} in:\n{body}");
    }
}

/// A metrics request head of up to 8 KiB (`http::MAX_REQUEST_BYTES`) is read and answered:
/// only a longer one gets 431. (Here a scraper's long header brings it to 8,000 bytes.)
#[test]
fn a_metrics_request_head_just_under_8_kib_is_answered() {
    let d = Daemon::start_with(metrics_on());
    let addr = d.metrics.expect("metrics on");
    let start = "GET /healthz HTTP/1.1\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let head = format!("{start}{}{end}", "p".repeat(8000 - start.len() - end.len()));
    assert_eq!(head.len(), 8000);
    let (status, body) = http(addr, &head);
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
}

/// A request head whose lines end in a bare LF (RFC 9112 §2.2 lets a server take it) is
/// answered at once, like one with CRLF. Its end was never found, so it was answered with
/// nothing and closed only at the handshake timeout (60 s here; the read gives up at 10 s).
#[test]
fn a_metrics_request_head_with_bare_lf_line_ends_is_answered_at_once() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured("[limits]\nhandshake_timeout_secs = 60\n")
    });
    let addr = d.metrics.expect("metrics on");
    let started = Instant::now();
    let (status, body) = http(addr, "GET /healthz HTTP/1.1\nHost: x\n\n");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\n\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("ocm_rooms "), "{body}");
    // The end in two writes, split between its LFs (separate segments with TCP_NODELAY,
    // most often read apart).
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\n").unwrap();
    s.write_all(b"\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response)
        .expect("a response, then the daemon's end");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_stalled_metrics_client_does_not_stall_relaying() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured("[limits]\nhandshake_timeout_secs = 2\n")
    });
    let (alice, bob) = room_of_two(&d, "busy");
    // Half a request head, then silence.
    let mut stalled = TcpStream::connect(d.metrics.unwrap()).unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for i in 0..20 {
        chat_flows(&alice, &bob, &i.to_string());
    }
    // Other scrapes and handshakes are answered meanwhile.
    assert_eq!(d.http_get("/healthz"), "ok\n");
    join(&d, "busy", "carol");
    // And the silent client is cut off at the handshake deadline instead of holding its slot.
    stalled.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 64];
    let n = uninterrupted(|| stalled.read(&mut buf)).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply: {:?}", text(&buf[..n]));
    wait_until("timeout close counted", || {
        d.metric("ocm_tcp_connections_closed_total{reason=\"timeout\"}") >= 1.0
    });
}

/// Lines about dropped input are paced by `[rate] drop_logs_per_sec` after a burst of five,
/// and 0 turns them off; the drops are counted either way.
#[test]
fn drop_log_lines_are_paced_and_zero_turns_them_off() {
    for rate in ["1.0", "0"] {
        let d = Daemon::start_with(Options {
            metrics: true,
            ..configured(&format!("[rate]\ndrop_logs_per_sec = {rate}\n"))
        });
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        for _ in 0..50 {
            from.send_to(b"\x01\x10rnot-a-token-at-all", d.udp).unwrap();
        }
        wait_until("the drops are counted", || {
            d.metric("ocm_datagrams_dropped_total{reason=\"unknown_token\"}") >= 50.0
        });
        // A line logged after the drops: once it is read, every line about them is too.
        create(&d, "marker", "m");
        d.wait_for_log("\"marker\"");
        let lines = d.log().matches("datagram dropped").count();
        if rate == "0" {
            assert_eq!(lines, 0, "logged with drop_logs_per_sec = 0");
        } else {
            let most = 5 + started.elapsed().as_secs() as usize + 1;
            assert!(
                (1..=most).contains(&lines),
                "{lines} lines, at most {most} expected"
            );
        }
    }
}

/// What `to` hears first while `from` sends "fresh" until something arrives: on a loaded
/// machine a daemon just continued may take a while to run again, and a message sent right
/// away could age past a chat limit as well.
fn first_relayed(from: &Member, to: &Member) -> String {
    let deadline = Instant::now() + PATIENCE;
    to.socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        from.send("fresh");
        let mut buf = [0u8; 512];
        if let Ok((n, _)) = to.socket.recv_from(&mut buf) {
            to.socket.set_read_timeout(Some(PATIENCE)).unwrap();
            return render(&buf[..n]);
        }
        assert!(Instant::now() < deadline, "nothing relayed after SIGCONT");
    }
}

/// With `udp.max_chat_wait_ms` (set by a reload), chat that waited in the socket longer than
/// that (here, while the daemon was stopped) is dropped and counted `stale`, not relayed late,
/// and a `__LEAVE__` that waited as long is still acted on. By default the same chat is
/// relayed.
#[test]
fn chat_that_waited_past_max_chat_wait_ms_is_shed_and_counted() {
    for shed in [true, false] {
        let d = Daemon::start_with(Options {
            metrics: true,
            ..configured("")
        });
        // The room is set up without the limit: on a loaded machine its probes could wait
        // past it.
        let (alice, bob) = room_of_two(&d, "r");
        assert_eq!(
            d.metric("ocm_datagrams_dropped_total{reason=\"stale\"}"),
            0.0
        );
        assert!(d.http_get("/metrics").contains("{reason=\"stale\"} 0\n"));
        if shed {
            d.reload("[udp]\nmax_chat_wait_ms = 200\n");
        }
        // Nothing to wait on: the datagram ages in a stopped daemon's socket, so the sleep is
        // the stimulus (twice the limit), not a hope that something happened.
        let stopped_for = Duration::from_millis(400);
        d.stop();
        bob.send("queued");
        thread::sleep(stopped_for);
        d.signal(libc::SIGCONT);
        let first = first_relayed(&bob, &alice);
        let stale = d.metric("ocm_datagrams_dropped_total{reason=\"stale\"}");
        if shed {
            assert_eq!(first, "bob: fresh", "the queued chat was relayed");
            assert!(stale >= 1.0, "stale drops: {stale}");
        } else {
            assert_eq!(first, "bob: queued");
            assert_eq!(stale, 0.0);
        }
        // The host's __LEAVE__, as late, still closes the room.
        d.stop();
        alice.send("__LEAVE__");
        thread::sleep(stopped_for);
        d.signal(libc::SIGCONT);
        bob.recv_until("CLOSED");
    }
}

/// libfaketime, when installed (`.ci/run` installs it): makes a process's wall clock read a
/// file, leaving its monotonic clock alone.
fn libfaketime() -> Option<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/lib/faketime"),
        PathBuf::from("/usr/lib64/faketime"),
    ];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("faketime")));
    }
    dirs.into_iter()
        .map(|dir| dir.join("libfaketime.so.1"))
        .find(|lib| lib.is_file())
}

/// libfaketime and a clock file for it that reads `+0`; `None` once it said the test skips.
fn faketime_or_skip() -> Option<(PathBuf, tempfile::NamedTempFile)> {
    let Some(lib) = libfaketime() else {
        skipped("libfaketime is not installed (apt-get install faketime)");
        return None;
    };
    let clock = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(clock.path(), "+0\n").unwrap();
    Some((lib, clock))
}

/// The environment that runs a process under libfaketime (`lib`): its wall clock, not its
/// monotonic one, reads the offset written in `clock` (e.g. `+3600`), at every reading.
fn faketime_env(lib: &Path, clock: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            clock.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// A step of the wall clock makes no chat look older than it is. The kernel stamps arrivals
/// on the wall clock; `ocmd` runs under libfaketime, whose wall clock (not its monotonic one)
/// steps an hour forward while chat waits 400 ms in the stopped daemon's socket, with a limit
/// of 30 s. The chat is relayed, not shed as an hour old. (libfaketime steps only the daemon's
/// clock, not the kernel's stamps, so past the 30 s window all chat would look an hour old;
/// the test is over long before.) Skips, saying so, without libfaketime.
#[test]
fn a_forward_step_of_the_wall_clock_sheds_no_fresh_chat() {
    let Some((lib, clock)) = faketime_or_skip() else {
        return;
    };
    let d = Daemon::start_with(Options {
        metrics: true,
        env: faketime_env(&lib, clock.path()),
        ..configured("[udp]\nmax_chat_wait_ms = 30000\n")
    });
    // Chat before the step: the daemon has read both clocks.
    let (alice, bob) = room_of_two(&d, "r");
    bob.send("before");
    alice.recv_until("bob: before");
    d.stop();
    bob.send("queued");
    std::fs::write(clock.path(), "+3600\n").unwrap();
    // The stimulus, not a wait for a condition: the chat ages in the stopped daemon's socket.
    thread::sleep(Duration::from_millis(400));
    d.signal(libc::SIGCONT);
    assert_eq!(first_relayed(&bob, &alice), "bob: queued");
    // The daemon saw the step (without libfaketime in force, it would not have stepped).
    wait_until("the step is logged", || {
        d.log().contains("the wall clock stepped forward by 3600.0")
    });
    assert_eq!(
        d.metric("ocm_datagrams_dropped_total{reason=\"stale\"}"),
        0.0
    );
}

/// History entries carry the wall-clock time they were relayed, and follow a step of the wall
/// clock: `ocmd` read it once at start and added monotonic time, so a daemon started before
/// NTP's first sync (or resumed from suspend, which the monotonic clock does not count) dated
/// its history wrong for as long as it ran (found by a review). It reads it again every 5 s.
/// Skips, saying so, without libfaketime.
#[test]
fn history_times_follow_a_step_of_the_wall_clock() {
    let Some((lib, clock)) = faketime_or_skip() else {
        return;
    };
    // The STATUS notifications come from the same timer pass as the reading of the clock.
    let mut sd = NotifyListener::bind();
    let d = Daemon::start_with(Options {
        env: [
            sd.env_with_watchdog_usec("0"),
            faketime_env(&lib, clock.path()),
        ]
        .concat(),
        ..Options::default()
    });
    let (alice, bob) = room_of_two(&d, "r");
    let unix_now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let last_at = || {
        let body = format!(r#"{{"token": "{}"}}"#, alice.token);
        let page = ask(&d, Operation::History, "r", body.as_bytes()).expect("history");
        let page: tcrp::payload::HistoryPage = tcrp::payload::parse_json(&page).unwrap();
        page.messages.last().expect("a message").at
    };
    bob.send("before");
    alice.recv_until("bob: before");
    let at = last_at();
    assert!((at - unix_now()).abs() < 600.0, "before the step: at {at}");
    // The daemon's wall clock jumps a day ahead. The second STATUS after that was sent after
    // the step (the first may have been on its way before).
    std::fs::write(clock.path(), "+86400\n").unwrap();
    for _ in 0..2 {
        sd.wait_for(PATIENCE, |m| m.starts_with("STATUS="));
    }
    bob.send("after");
    alice.recv_until("bob: after");
    let at = last_at();
    assert!(
        at > unix_now() + 86_000.0,
        "after the step: at {at}, against {} on the stepped clock",
        unix_now() + 86_400.0
    );
}

/// Floods the UDP socket of a stopped daemon so that the kernel drops datagrams, then waits
/// until `ocm_udp_receive_buffer_drops_total` shows them.
fn flood_until_the_kernel_drop_counter_moves(d: &Daemon) {
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    d.stop();
    let payload = [0x41u8; 1000];
    for _ in 0..2000 {
        let _ = flood.send_to(&payload, d.udp);
    }
    d.signal(libc::SIGCONT);
    wait_until(
        "ocm_udp_receive_buffer_drops_total counts the drops",
        || d.metric("ocm_udp_receive_buffer_drops_total") > 0.0,
    );
}

#[test]
fn kernel_receive_buffer_drops_are_counted() {
    let d = Daemon::start_with(Options {
        metrics: true,
        // The smallest buffer the kernel grants: 2000 datagrams of 1000 bytes overflow it.
        ..configured("[udp]\nrecv_buffer_bytes = 4096\n")
    });
    flood_until_the_kernel_drop_counter_moves(&d);
    // The scrape that read the drops must not keep them out of the log: the periodic check
    // (every 5 s) still warns.
    wait_until("the drops are logged", || {
        d.log().contains("the kernel dropped")
    });
}

/// The periodic check of the kernel's drop count (it runs before each STATUS, the first at
/// the start) warns only when the count grew: a daemon that lost no datagram says nothing.
#[test]
fn a_daemon_that_lost_no_datagram_never_warns_of_kernel_drops() {
    let mut sd = NotifyListener::bind();
    let d = Daemon::start_with(Options {
        env: sd.env_with_watchdog_usec("0"),
        metrics: true,
        ..configured("")
    });
    sd.wait_for(PATIENCE, |m| m.starts_with("STATUS="));
    // A later line: every line before it, the check's included, is in the log.
    d.reload("");
    assert_eq!(d.metric("ocm_udp_receive_buffer_drops_total"), 0.0);
    assert!(!d.log().contains("the kernel dropped"), "{}", d.log());
}

/// Once its sockets are drained, the daemon sleeps in `poll` until the next timer: after
/// chat and a handshake, an idle daemon uses next to no CPU. (A drain that took the empty
/// socket's `WouldBlock` for an error would keep it ready, and the loop would spin.)
#[test]
fn an_idle_daemon_does_not_spin() {
    // Checkpoints every second, so that the window below comes after one.
    let d = Daemon::start_with(configured("[history]\ncheckpoint_secs = 1\n"));
    let (alice, bob) = room_of_two(&d, "idle");
    chat_flows(&alice, &bob, "then silence");
    create(&d, "other", "carol");
    let journal = d.state.with_extension("json.journal");
    wait_until("a periodic checkpoint saved the chat", || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("history_append"))
    });
    let before = cpu_time(d.pid());
    let window = Duration::from_secs(2);
    // A measurement window, not a wait for anything.
    thread::sleep(window);
    let used = cpu_time(d.pid()).saturating_sub(before);
    // A spinning loop takes most of a core for the whole window, even on a loaded machine.
    assert!(used < window / 4, "{used:?} of CPU in {window:?} of idling");
}

/// `ProcSubset=pid` in the unit mounts /proc with `subset=pid`, which hides /proc/net but
/// keeps /proc/self/net (where `ocmd` reads the count only on kernels without `SO_MEMINFO`).
/// Runs ocmd that way (a private mount namespace via `unshare`, root only) and checks the
/// kernel drop counter still works.
#[test]
fn kernel_drops_are_counted_under_proc_subset_pid() {
    if !installed("unshare") {
        skipped("unshare not installed");
        return;
    }
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t proc -o subset=pid proc /proc")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skipped(
            "cannot mount /proc with subset=pid in a mount namespace here (not root, or a kernel \
             before 5.8)",
        );
        return;
    }
    // A wrapper script: ocmd under a /proc mounted like ProcSubset=pid does.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let wrapper = dir.path().join("ocmd-proc-subset");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare -m --propagation private sh -c 'mount -t proc -o subset=pid proc /proc && exec \"$0\" \"$@\"' {} \"$@\"\n",
            env!("CARGO_BIN_EXE_ocmd")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let raw = RawDaemon::spawn_program(
        &wrapper,
        &dir,
        "[udp]\nrecv_buffer_bytes = 4096\n",
        &[("RUST_LOG", "info")],
        true,
    );
    assert!(raw.proc_net_hidden(), "the wrapper hides /proc/net");
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.signal(libc::SIGSTOP);
    for _ in 0..2000 {
        let _ = flood.send_to(&[0x41u8; 1000], raw.udp);
    }
    raw.signal(libc::SIGCONT);
    wait_until("drops counted under subset=pid", || {
        let (_, body) = http(
            raw.metrics.unwrap(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        sample(&samples(&body), "ocm_udp_receive_buffer_drops_total") > 0.0
    });
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn check_config_accepts_the_shipped_file_and_prints_toml() {
    let shipped = repo_root().join("config/ocmd.toml");
    let out = check_config_file(&shipped);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("configuration OK"));
    let printed: ocm_server::Config =
        toml::from_str(&text(&out.stdout)).expect("--check-config prints valid TOML");
    let file = ocm_server::Config::from_file(&shipped).expect("shipped config loads");
    assert_eq!(printed, file);
}

#[test]
fn bad_configs_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown key", "[limits]\nbogus_key = 1\n", "bogus_key"),
        (
            "wrong type",
            "[limits]\nmax_connections = \"many\"\n",
            "max_connections",
        ),
        ("port 70000", "[listen]\ntcp = \"127.0.0.1:70000\"\n", "tcp"),
        (
            "negative",
            "[limits]\nhandshake_timeout_secs = -1\n",
            "handshake_timeout_secs",
        ),
        (
            "zero",
            "[limits]\nhandshake_timeout_secs = 0\n",
            "limits.handshake_timeout_secs",
        ),
        ("unknown section", "[nonsense]\nx = 1\n", "nonsense"),
        (
            "not a bool",
            "[udp]\nsegment_sends = \"yes\"\n",
            "segment_sends",
        ),
        ("bad level", "[log]\nlevel = \"loud\"\n", "log.level"),
        // 0 would not mean "never": it turned the pacing of dead-token replies off.
        (
            "unpaced replies",
            "[liveness]\nclosed_reply_interval_ms = 0\n",
            "liveness.closed_reply_interval_ms",
        ),
        (
            "huge wakeup budget",
            "[udp]\ndatagrams_per_wakeup = 100000000000\n",
            "udp.datagrams_per_wakeup",
        ),
    ];
    for (what, body, key) in cases {
        let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, body).unwrap();
        let out = check_config_file(&path);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(key), "{what}: {err:?} does not name {key}");
        assert!(
            err.contains(&path.display().to_string()),
            "{what}: {err:?} does not name the file"
        );
        assert!(out.stdout.is_empty(), "{what}: printed a configuration");
    }
    // A missing file is an error too, naming it.
    let missing = dir.path().join("missing.toml");
    let out = check_config_file(&missing);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&missing.display().to_string()));
    // The daemon itself refuses to start on a bad file, before it listens.
    let err = refused_start(
        Arc::new(tempfile::tempdir().unwrap()),
        configured("[limits]\nhandshake_timeout_secs = 0\n"),
    );
    assert!(err.contains("limits.handshake_timeout_secs"), "{err}");
}

#[test]
fn command_line_flags_override_the_file() {
    // 192.0.2.0/24 is TEST-NET-1: no host has it, so binding there fails. The file names it
    // for every listener; the flags must win.
    let file =
        "[listen]\ntcp = \"192.0.2.1:9\"\nudp = \"192.0.2.1:9\"\nmetrics = \"192.0.2.1:9\"\n\
                [state]\npath = \"/nonexistent/dir/room_manager.json\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocmd.toml");
    std::fs::write(&path, file).unwrap();
    let out = ocmd(&[
        "--check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
        "--tcp".as_ref(),
        "127.0.0.1:5555".as_ref(),
        "--metrics".as_ref(),
        "off".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: ocm_server::Config = toml::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(printed.listen.tcp, "127.0.0.1:5555".parse().unwrap());
    assert_eq!(printed.listen.metrics, "off");
    // Not given on the command line: the file's value stands.
    assert_eq!(printed.listen.udp, "192.0.2.1:9".parse().unwrap());

    // The harness passes --tcp/--udp/--state/--metrics: the daemon starts, on loopback.
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured(file)
    });
    assert!(d.tcp.ip().is_loopback() && d.tcp.port() != 9, "{}", d.tcp);
    assert!(d.log().contains(&format!("listening tcp={}", d.tcp)));
    // The state went where --state said, not to the file's /nonexistent path.
    create(&d, "flags", "host");
    let journal = d.state.with_file_name("room_manager.json.journal");
    assert!(
        journal.exists() || d.state.exists(),
        "{}",
        journal.display()
    );
}

/// A listen address that does not parse says why, in the file (with the line) and from a flag,
/// and exits 2 before anything is bound.
#[test]
fn a_listen_address_that_does_not_parse_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocmd.toml");
    std::fs::write(&path, "[listen]\nudp = \"127.0.0.1:70000\"\n").unwrap();
    let out = check_config_file(&path);
    let err = assert_exit_code(&out, 2);
    assert!(
        err.contains("line 2") && err.contains("the port must be a number from 0 to 65535"),
        "{err}"
    );
    let out = ocmd(&["--check-config", "--tcp", "localhost:9090"]);
    let err = assert_exit_code(&out, 2);
    assert!(err.contains("host names are not looked up"), "{err}");
}

#[test]
fn listeners_that_clash_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("room_manager.json");
    // Both in the file; the wildcard takes the port on 127.0.0.1 too.
    let path = dir.path().join("ocmd.toml");
    std::fs::write(
        &path,
        "[listen]\ntcp = \"0.0.0.0:9090\"\nmetrics = \"127.0.0.1:9090\"\n",
    )
    .unwrap();
    let out = check_config_file(&path);
    let err = assert_exit_code(&out, 2);
    for part in [
        "listen.tcp",
        "listen.metrics",
        "0.0.0.0:9090",
        "127.0.0.1:9090",
    ] {
        assert!(err.contains(part), "{err:?} does not name {part}");
    }
    assert!(!err.contains("configuration OK"), "{err}");
    assert!(out.stdout.is_empty(), "printed a configuration");
    // A flag onto the default metrics address, 127.0.0.1:9092; at start-up as with
    // --check-config, refused before anything is bound (else the bind fails, exit 1).
    for check in [true, false] {
        let mut args = vec![
            "--tcp".as_ref(),
            "127.0.0.1:9092".as_ref(),
            "--state".as_ref(),
            state.as_os_str(),
        ];
        if check {
            args.push("--check-config".as_ref());
        }
        let out = ocmd(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "check {check}: {err}");
        assert!(
            err.contains("listen.tcp and listen.metrics are both 127.0.0.1:9092"),
            "check {check}: {err:?}"
        );
    }
    assert!(!state.exists(), "the refused start wrote state");
    // The UDP socket may share the port number: another protocol.
    let out = ocmd(&[
        "--tcp",
        "127.0.0.1:9090",
        "--udp",
        "127.0.0.1:9090",
        "--check-config",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn reload_of_a_file_whose_listeners_clash_keeps_the_running_configuration() {
    // The addresses come from the file here (no --tcp/--metrics flags).
    let listen = "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\nmetrics = \"off\"\n";
    let d = RawDaemon::spawn_listening_from_file(listen);
    d.rewrite_config(
        "[listen]\ntcp = \"127.0.0.1:9093\"\nudp = \"127.0.0.1:0\"\nmetrics = \"[::]:9093\"\n",
    );
    d.signal(libc::SIGHUP);
    d.wait_for_log("keeping the running configuration");
    let r = d.request(Operation::CreateRoom, "still", "here");
    assert!(r.token.is_some(), "still serving");
    let log = d.stop();
    let line = line_with(&log, "SIGHUP: config file");
    assert!(
        line.contains("listen.tcp (127.0.0.1:9093) and listen.metrics ([::]:9093) clash"),
        "{line}"
    );
    assert!(!log.contains("configuration reloaded"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// SIGHUP reloads

#[test]
fn reload_applies_rate_limits_without_dropping_anyone() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured("[rate]\nrequests_per_sec = 0.0\n")
    });
    let (alice, bob) = room_of_two(&d, "r");
    // Unlimited: a burst of joins from one IP all succeed.
    for i in 0..30 {
        join(&d, "r", &format!("early{i}"));
    }
    chat_flows(&alice, &bob, "before");

    rewrite_config(&d, "[rate]\nrequests_per_sec = 1.0\nrequests_burst = 1.0\n");
    d.signal(libc::SIGHUP);
    d.wait_for_log("configuration reloaded");
    // Now one request per second: of back-to-back requests, some are refused as rate_limited
    // (a slow machine may let one more through per second it spends).
    let mut limited = 0;
    for i in 0..20 {
        let r = request(
            &d,
            Operation::JoinRoom,
            "r",
            format!("\"late{i}\"").as_bytes(),
        );
        match refused(&r) {
            Some(ErrorCode::RateLimited) => limited += 1,
            None => {}
            other => panic!("unexpected refusal {other:?}"),
        }
    }
    assert!(limited >= 5, "only {limited} of 20 rate_limited");
    assert_eq!(
        d.metric("ocm_rate_limited_total{kind=\"request\"}"),
        f64::from(limited)
    );
    // The members from before the reload still chat, and nobody was dropped.
    chat_flows(&alice, &bob, "after");
    assert_eq!(d.metric("ocm_config_reloads_total{result=\"ok\"}"), 1.0);
    assert!(d.metric("ocm_members") >= 32.0);
}

#[test]
fn reload_of_a_setting_fixed_at_start_says_restart() {
    let d = Daemon::start_with(configured(""));
    let (alice, bob) = room_of_two(&d, "r");
    // A restart-only key that no flag overrides.
    rewrite_config(
        &d,
        "[udp]\nrecv_buffer_bytes = 1048576\n[state]\ncompact_journal_bytes = 4096\n",
    );
    d.signal(libc::SIGHUP);
    d.wait_for_log("configuration reloaded");
    let file = d.dir.path().join("ocmd.toml").display().to_string();
    let warned = |key: &str| {
        d.log().lines().any(|l| {
            l.contains("WARN")
                && l.contains(&format!("{key} in {file} differs from the running value"))
                && l.contains("takes effect only after a restart")
        })
    };
    assert!(warned("udp.recv_buffer_bytes"), "{}", d.log());
    assert!(warned("state.compact_journal_bytes"), "{}", d.log());
    // A [listen] change in the file is moot while --tcp overrides it, and the log says so.
    rewrite_config(&d, "[listen]\ntcp = \"127.0.0.1:1\"\n");
    d.signal(libc::SIGHUP);
    wait_until("second reload", || {
        d.log().matches("configuration reloaded").count() >= 2
    });
    assert!(!warned("listen.tcp"), "{}", d.log());
    assert!(
        d.log().contains(&format!(
            "listen.tcp changed in {file}, but a command-line flag overrides it"
        )),
        "{}",
        d.log()
    );
    join(&d, "r", "carol");
    chat_flows(&alice, &bob, "after");
}

/// On a kernel that segments UDP sends (`UDP_SEGMENT`, Linux 4.18), the start says nothing
/// about a kernel that cannot.
#[test]
fn a_kernel_that_segments_sends_is_not_said_to_lack_it() {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    if let Err(e) = int_option(&probe, libc::SOL_UDP, libc::UDP_SEGMENT) {
        skipped(&format!("this kernel cannot segment UDP sends: {e}"));
        return;
    }
    let d = Daemon::start();
    let log = d.log();
    assert!(log.contains("listening "), "{log}");
    assert!(!log.contains("cannot segment sends"), "{log}");
}

/// The kernel caps socket buffers at `net.core.rmem_max`/`wmem_max` without an error: a
/// request past any cap a host would have (512 MiB) is reported at start, with the sysctl to
/// raise, and one it grants is not.
#[test]
fn a_udp_buffer_the_kernel_caps_is_reported_at_start() {
    let d = Daemon::start_with(configured(
        "[udp]\nrecv_buffer_bytes = 536870912\nsend_buffer_bytes = 4096\n",
    ));
    d.wait_for_log("listening");
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("UDP receive buffer: udp.recv_buffer_bytes asks for 536870912 bytes")
            && l.contains("raise net.core.rmem_max to at least 536870912")),
        "{log}"
    );
    assert!(!log.contains("UDP send buffer"), "{log}");
}

/// `RUST_LOG` wins over `[log] level`; a reload that changes the level says so instead of
/// changing nothing in silence (the harness sets `RUST_LOG`).
#[test]
fn reload_of_the_log_level_under_rust_log_says_rust_log_wins() {
    let d = Daemon::start_with(configured("[log]\nlevel = \"info\"\n"));
    rewrite_config(&d, "[log]\nlevel = \"warn\"\n");
    d.signal(libc::SIGHUP);
    d.wait_for_log("configuration reloaded");
    assert!(
        d.log().contains("log.level changed in ") && d.log().contains("but RUST_LOG overrides it"),
        "{}",
        d.log()
    );
}

/// A restart-only key is compared with the running value: every reload while the file differs
/// says a restart is due, and a file put back to the running value says nothing.
#[test]
fn reload_of_a_changed_listen_address_says_restart_until_it_is_the_running_one_again() {
    // The addresses come from the file here (no --tcp/--udp flags), so a change counts.
    let listen = "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\nmetrics = \"off\"\n";
    let d = RawDaemon::spawn_listening_from_file(listen);
    let moved = "[listen]\ntcp = \"127.0.0.1:1\"\nudp = \"127.0.0.1:0\"\nmetrics = \"off\"\n";
    let warnings = || {
        d.log()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && l.contains("listen.tcp in ")
                    && l.contains("differs from the running value")
                    && l.contains("takes effect only after a restart")
            })
            .count()
    };
    for (reload, file, expected) in [(1, moved, 1), (2, moved, 2), (3, listen, 2)] {
        d.rewrite_config(file);
        d.signal(libc::SIGHUP);
        d.wait_for_reloads(reload);
        assert_eq!(warnings(), expected, "after reload {reload}");
    }
    let tcp = d.tcp;
    // Still served on the address it started with.
    let r = d.request(Operation::CreateRoom, "still", "here");
    assert!(r.token.is_some());
    let log = d.stop();
    assert!(!log.contains("listen.udp in"), "{log}");
    assert!(log.contains(&format!("listening tcp={tcp}")));
}

/// With a file that does not mention [listen] or [state], the running values come from the
/// command line (as under the shipped unit: --state), and an unchanged file must not be
/// reported as changing them.
#[test]
fn reload_of_an_unchanged_file_warns_about_nothing() {
    let d = Daemon::start_with(configured(
        "[state]\npath = \"room_manager.json\"\n[rate]\nchat_per_sec = 10.0\n",
    ));
    d.signal(libc::SIGHUP);
    d.wait_for_log("configuration reloaded");
    assert!(
        !d.log().contains("only after a restart"),
        "spurious restart warning:\n{}",
        d.log()
    );
    // Nor as a change that the flags (--tcp, --udp, --metrics, --state) make moot.
    assert!(
        !d.log().contains("but a command-line flag overrides it"),
        "spurious override warning:\n{}",
        d.log()
    );
}

/// With every restart-only setting in the file (no --tcp, --udp, --metrics or --state), each
/// is compared with its running value: a reload of the unchanged file says nothing, and one
/// that moves the state file or the metrics listener names exactly those two.
#[test]
fn reload_with_every_restart_only_setting_in_the_file_warns_only_about_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let file = |state: &str, metrics: &str| {
        format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\nmetrics = \"{metrics}\"\n\
             [state]\npath = \"{}\"\n",
            dir.path().join(state).display()
        )
    };
    let d = RawDaemon::spawn_all_from_file(&file("room_manager.json", "off"));
    d.signal(libc::SIGHUP);
    d.wait_for_reloads(1);
    let log = d.log();
    assert!(!log.contains("SIGHUP: listen."), "{log}");
    assert!(!log.contains("SIGHUP: state."), "{log}");
    d.rewrite_config(&file("moved.json", "127.0.0.1:0"));
    d.signal(libc::SIGHUP);
    d.wait_for_reloads(2);
    let log = d.log();
    for key in ["state.path", "listen.metrics"] {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(&format!("SIGHUP: {key} in "))
                && l.contains("takes effect only after a restart")),
            "{key}: {log}"
        );
    }
    assert!(!log.contains("SIGHUP: listen.tcp"), "{log}");
    assert!(!log.contains("SIGHUP: listen.udp"), "{log}");
    assert!(!log.contains("overrides it"), "{log}");
    // Still on the state file it started with.
    let r = d.request(Operation::CreateRoom, "still", "here");
    assert!(r.token.is_some());
    d.stop();
    assert!(dir.path().join("room_manager.json").exists());
    assert!(!dir.path().join("moved.json").exists());
}

#[test]
fn reload_of_a_broken_file_keeps_the_running_settings() {
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured("[rate]\nrequests_per_sec = 1.0\nrequests_burst = 1.0\n")
    });
    let host = create(&d, "r", "alice");
    let alice = Member::joined(&d, "r", &host);
    // The burst of one is spent by the create; wait for the bucket to refill for bob.
    let bob_token = {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let r = request(&d, Operation::JoinRoom, "r", b"\"bob\"");
            if let Some(token) = r.token {
                break token;
            }
            assert_eq!(refused(&r), Some(ErrorCode::RateLimited));
            assert!(Instant::now() < deadline, "bob never got in");
            thread::sleep(Duration::from_millis(100));
        }
    };
    let bob = Member::new(&d, "r", &bob_token);
    bob.registered_with(&alice, "bob");

    rewrite_config(&d, "[rate\nrequests_per_sec = \n");
    d.signal(libc::SIGHUP);
    d.wait_for_log("keeping the running configuration");
    let log = d.log();
    let file = d.dir.path().join("ocmd.toml").display().to_string();
    let line = line_with(&log, "SIGHUP: config file");
    assert!(line.contains("ERROR"), "logged as an error: {line}");
    assert!(line.contains(&file), "names the file: {line}");
    // The TOML error spans lines (the line quoted, a caret under the column): each carries
    // the entry's timestamp and level, so `grep ERROR` or a shipper taking a line for an
    // entry keeps it whole.
    let entry: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("SIGHUP: config file"))
        .take_while(|l| !l.contains("keeping the running configuration"))
        .chain(
            log.lines()
                .filter(|l| l.contains("keeping the running configuration")),
        )
        .collect();
    assert!(entry.len() >= 3, "a multi-line entry:\n{log}");
    for l in &entry {
        assert!(
            l.starts_with("[20") && l.contains(" ERROR ") && l.contains("] "),
            "a line of the entry without its header: {l:?}\n{log}"
        );
    }
    assert_eq!(d.metric("ocm_config_reloads_total{result=\"error\"}"), 1.0);
    // Still running, still limited to one request per second.
    chat_flows(&alice, &bob, "after");
    let limited = (0..5)
        .filter(|i| {
            let r = request(&d, Operation::JoinRoom, "r", format!("\"x{i}\"").as_bytes());
            refused(&r) == Some(ErrorCode::RateLimited)
        })
        .count();
    assert!(limited >= 2, "old limits kept: {limited} of 5 limited");
}

// ---------------------------------------------------------------------------------------------
// Logs

/// `ocmd` started directly (not through the harness) so that `RUST_LOG` can be unset: the
/// level then comes from the config file.
struct RawDaemon {
    child: Child,
    tcp: SocketAddr,
    udp: SocketAddr,
    metrics: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    dir: Arc<tempfile::TempDir>,
}

impl RawDaemon {
    /// What the daemon has logged so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle`.
    fn wait_for_log(&self, needle: &str) {
        wait_until(needle, || self.log.lock().unwrap().contains(needle));
    }

    /// Waits until the log holds `n` "configuration reloaded" lines.
    fn wait_for_reloads(&self, n: usize) {
        wait_until("reload", || {
            self.log().matches("configuration reloaded").count() >= n
        });
    }

    fn spawn(config: &str, env: &[(&str, &str)]) -> RawDaemon {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        RawDaemon::spawn_program(
            Path::new(env!("CARGO_BIN_EXE_ocmd")),
            &dir,
            config,
            env,
            false,
        )
    }

    /// A daemon whose `[listen]` addresses come from `config`, not from flags.
    fn spawn_listening_from_file(config: &str) -> RawDaemon {
        RawDaemon::spawn_logging_info_from_file(config, true)
    }

    /// A daemon whose `[listen]` addresses and `[state] path` all come from `config`: no
    /// flag overrides a restart-only setting.
    fn spawn_all_from_file(config: &str) -> RawDaemon {
        RawDaemon::spawn_logging_info_from_file(config, false)
    }

    /// A daemon at `RUST_LOG=info` with no listen flags; `state_flag`: its state path given
    /// by `--state` rather than by `config`.
    fn spawn_logging_info_from_file(config: &str, state_flag: bool) -> RawDaemon {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        RawDaemon::spawn_inner(
            Path::new(env!("CARGO_BIN_EXE_ocmd")),
            &dir,
            config,
            &[("RUST_LOG", "info")],
            None,
            state_flag,
        )
    }

    fn spawn_program(
        program: &Path,
        dir: &Arc<tempfile::TempDir>,
        config: &str,
        env: &[(&str, &str)],
        metrics: bool,
    ) -> RawDaemon {
        let flags = [
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--metrics",
            if metrics { "127.0.0.1:0" } else { "off" },
        ];
        RawDaemon::spawn_inner(program, dir, config, env, Some(&flags), true)
    }

    fn spawn_inner(
        program: &Path,
        dir: &Arc<tempfile::TempDir>,
        config: &str,
        env: &[(&str, &str)],
        listen_flags: Option<&[&str]>,
        state_flag: bool,
    ) -> RawDaemon {
        let config_path = dir.path().join("ocmd.toml");
        std::fs::write(&config_path, config).unwrap();
        let (reader, writer, dev_ino) = stderr_pipe();
        let mut cmd = Command::new(program);
        cmd.args(listen_flags.unwrap_or_default());
        if state_flag {
            cmd.arg("--state").arg(dir.path().join("room_manager.json"));
        }
        cmd.arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(writer);
        for (k, v) in env {
            if (*k, *v) == ("JOURNAL_STREAM", JOURNALD) {
                cmd.env(k, &dev_ino);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().expect("spawn ocmd");
        // Our copy of the writing end, or the reader would never see the end.
        drop(cmd);
        let stderr = reader;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx): (_, Receiver<String>) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                    drop(l);
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ocmd did not start:\n{}", log.lock().unwrap());
            };
            if let Some(rest) = line.split("listening ").nth(1) {
                let field = |name: &str| {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(name))
                        .and_then(|a| a.parse().ok())
                };
                return RawDaemon {
                    child,
                    tcp: field("tcp=").expect("tcp"),
                    udp: field("udp=").expect("udp"),
                    metrics: field("metrics="),
                    log,
                    dir: Arc::clone(dir),
                };
            }
        }
    }

    fn rewrite_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("ocmd.toml"), text).unwrap();
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0);
    }

    /// Whether the daemon's view of /proc lacks /proc/net (it runs in its own mount
    /// namespace; its /proc/PID/root shows its mounts).
    fn proc_net_hidden(&self) -> bool {
        !Path::new(&format!("/proc/{}/root/proc/net", self.child.id())).exists()
    }

    /// SIGTERM, wait for exit, and return the whole log.
    fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        wait_for_exit(&mut self.child, "ocmd on SIGTERM");
        // The reader thread ends at EOF; give it the deadline to get there.
        self.wait_for_log("stopped:");
        self.log()
    }

    fn request(&self, op: Operation, room: &str, name: &str) -> Reply {
        request_at(self.tcp, op, room, name)
    }

    fn member(&self, room: &str, token: &str) -> Member {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        Member {
            socket,
            server: self.udp,
            room: room.into(),
            token: token.into(),
        }
    }
}

impl Drop for RawDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- ocmd stderr ----\n{}", self.log.lock().unwrap());
        }
    }
}

#[test]
fn journald_lines_carry_priorities_and_never_whole_tokens() {
    // RUST_LOG unset: the level comes from the file. JOURNAL_STREAM set: journald format.
    let d = RawDaemon::spawn(
        "[log]\nlevel = \"debug\"\n",
        &[("JOURNAL_STREAM", JOURNALD)],
    );
    let mut tokens = Vec::new();
    let host = d.request(Operation::CreateRoom, "logs", "alice");
    let host_token = host.token.expect("created");
    let bob_token = d
        .request(Operation::JoinRoom, "logs", "bob")
        .token
        .expect("joined");
    let carol_token = d
        .request(Operation::JoinRoom, "logs", "carol")
        .token
        .expect("joined");
    assert_eq!(
        refused(&d.request(Operation::JoinRoom, "logs", "bob")),
        Some(ErrorCode::NameTaken)
    );
    tokens.extend([host_token.clone(), bob_token.clone(), carol_token.clone()]);
    let alice = d.member("logs", &host_token);
    alice.send("__REGISTER__");
    let bob = d.member("logs", &bob_token);
    bob.registered_with(&alice, "bob");
    alice.send("hi");
    assert_eq!(bob.recv(), "alice: hi");
    // Carol's token from a stranger's address, and carol leaving: both logged at debug.
    let thief = d.member("logs", &carol_token);
    thief.send("spoof");
    let carol = d.member("logs", &carol_token);
    carol.send("__REGISTER__");
    carol.send("__LEAVE__");
    // A token that does not exist, sent as chat.
    let unknown = "feedfacefeedfacefeedfacefeedface".to_owned();
    d.member("logs", &unknown).send("who?");
    tokens.push(unknown);
    // The host leaves: room closed.
    alice.send("__LEAVE__");
    assert_eq!(bob.recv(), "CLOSED");

    let log = d.stop();
    let mut priorities = BTreeMap::new();
    for line in log.lines() {
        let priority = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .and_then(|(p, rest)| p.parse::<u8>().ok().map(|p| (p, rest)));
        let Some((p, rest)) = priority else {
            panic!("line without a <N> priority: {line:?}");
        };
        assert!(p <= 7, "{line}");
        // No timestamp of our own (journald adds one), no level word, no brackets.
        assert!(
            !rest.starts_with('[') && !rest.starts_with("20"),
            "line with its own timestamp: {line:?}"
        );
        *priorities.entry(p).or_insert(0) += 1;
    }
    assert!(priorities.contains_key(&6), "info lines: {log}");
    assert!(
        priorities.contains_key(&7),
        "debug lines (level from the file, RUST_LOG unset): {log}"
    );
    assert!(log.contains("<6>listening tcp="), "{log}");
    for token in &tokens {
        assert!(
            !log.contains(token.as_str()),
            "token {token} logged whole:\n{log}"
        );
    }
    // The log does identify tokens, by a short prefix, so the check above is not vacuous.
    assert!(
        tokens.iter().any(|t| log.contains(&t[..4])),
        "no token prefix at all in:\n{log}"
    );
}

/// Why a daemon under journald did not start reaches the journal at error priority, once:
/// `journalctl -p warning` must show it. A bad configuration is found before the logger is
/// set up; a port in use after, when the configured level may even hide errors.
#[test]
fn journald_a_failed_start_is_logged_once_at_error_priority() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[rate\nrequests_per_sec = \n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let quiet = dir.path().join("quiet.toml");
    std::fs::write(&quiet, "[log]\nlevel = \"off\"\n").unwrap();
    let state = dir.path().join("room_manager.json");
    for (what, config, code, reason) in [
        ("a bad config", &bad, 2, "config file"),
        ("a port in use", &quiet, 1, &*taken),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
        cmd.arg("--config")
            .arg(config)
            .args(["--tcp", &taken, "--udp", "127.0.0.1:0", "--metrics", "off"])
            .arg("--state")
            .arg(&state)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET");
        let out = run_under_journald(cmd);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{what}: {err}");
        assert!(!err.is_empty(), "{what}: nothing said");
        for line in err.lines() {
            assert!(
                line.starts_with("<3>"),
                "{what}: {line:?} is not at error priority"
            );
        }
        assert_eq!(err.matches(reason).count(), 1, "{what}: said once: {err}");
    }
    // A usage error too (clap's message, exit status 2).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
    cmd.args(["--tcp", "nonsense"]).env_remove("NOTIFY_SOCKET");
    let out = run_under_journald(cmd);
    let err = assert_exit_code(&out, 2);
    assert!(err.contains("invalid value 'nonsense'"), "{err}");
    for line in err.lines() {
        assert!(line.starts_with("<3>"), "{line:?} is not at error priority");
    }
    // A JOURNAL_STREAM inherited from elsewhere (a shell in a desktop session) names another
    // stream than this standard error: plain lines.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
    cmd.args(["--tcp", "nonsense"])
        .env("JOURNAL_STREAM", "8:1234")
        .env_remove("NOTIFY_SOCKET");
    let out = run_with_deadline(cmd);
    let err = assert_exit_code(&out, 2);
    assert!(err.starts_with("ocmd: ") && !err.contains("<3>"), "{err}");
}

/// A config error is several lines (the TOML parser's snippet); under journald each stderr
/// line is an entry of its own, so the continuation lines would lose the `<3>` priority.
#[test]
fn journald_a_failed_reload_is_logged_on_lines_with_priorities() {
    let d = RawDaemon::spawn("", &[("JOURNAL_STREAM", JOURNALD)]);
    d.rewrite_config("[rate\nrequests_per_sec = \n");
    d.signal(libc::SIGHUP);
    d.wait_for_log("keeping the running configuration");
    let log = d.stop();
    for line in log.lines() {
        assert!(
            line.starts_with('<') && line[1..].split_once('>').is_some(),
            "line without a priority: {line:?}\n{log}"
        );
    }
    assert!(log.contains("<3>SIGHUP: config file"), "{log}");
}

#[test]
fn without_journal_stream_lines_have_timestamps_and_info_is_the_default() {
    let d = RawDaemon::spawn("", &[]);
    d.request(Operation::CreateRoom, "plain", "alice")
        .token
        .expect("created");
    let log = d.stop();
    let listening = line_with(&log, "listening tcp=");
    assert!(
        listening.starts_with("[20") && listening.contains(" INFO "),
        "{listening}"
    );
    assert!(
        !log.contains(" DEBUG "),
        "info is the default level:\n{log}"
    );
    assert!(!log.lines().any(|l| l.starts_with('<')), "{log}");
}

/// What `ocmd` writes to standard error from its start to its stop, started directly with
/// `[log] level = "warn"` and `RUST_LOG` set to `rust_log`.
fn log_with_rust_log(rust_log: &std::ffi::OsStr) -> String {
    let mut sd = NotifyListener::bind();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ocmd.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n").unwrap();
    let (key, value) = sd.env();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocmd"))
        .arg("--config")
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("room_manager.json"))
        .args(LOOPBACK_LISTENERS)
        .env("RUST_LOG", rust_log)
        .env(key, value)
        .env("WATCHDOG_USEC", "0")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ocmd");
    sd.wait_for(PATIENCE, |m| m == "READY=1");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    wait_for_exit(&mut child, "ocmd");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

/// A `RUST_LOG` that is not UTF-8 (a stray byte in a drop-in's `Environment=`) counts as
/// unset, with a warning: it made the daemon log everything at trace level (mio's per-event
/// lines included), whatever `[log] level` said, and a reload could not lower it (found by a
/// review). So does an empty one (`Environment=RUST_LOG=`) or one that is not a filter (a
/// typo): env_logger took either for errors only, `[log] level` unapplied, without a word of
/// ours (found by an operator's review).
#[test]
fn a_rust_log_that_is_not_utf8_empty_or_not_a_filter_is_ignored_with_a_warning() {
    use std::os::unix::ffi::OsStrExt;
    for (rust_log, why) in [
        (&b"\xff"[..], "RUST_LOG is not UTF-8"),
        (b"", "RUST_LOG is empty"),
        (b" ", "RUST_LOG is empty"),
        (
            b"this is=not=valid",
            "RUST_LOG \"this is=not=valid\" is not a filter",
        ),
    ] {
        let log = log_with_rust_log(std::ffi::OsStr::from_bytes(rust_log));
        assert!(
            !log.contains(" TRACE ") && !log.contains(" DEBUG ") && !log.contains(" INFO "),
            "[log] level = \"warn\" with RUST_LOG {rust_log:?}:\n{log}"
        );
        assert!(
            log.contains(&format!("WARN  ocmd] {why}"))
                && log.contains(": ignored, [log] level applies"),
            "RUST_LOG {rust_log:?}:\n{log}"
        );
    }
}

/// A `RUST_LOG` that is a filter but lets none of the daemon's errors through (a target
/// that is not the daemon's, as `ocmd=info` for all but the binary's own lines, or `off`)
/// is obeyed, and said once at start, past the logger: a failed journal write or a rejected
/// reload would otherwise go unlogged with nothing to show why.
#[test]
fn a_rust_log_that_turns_off_the_daemons_errors_is_obeyed_and_said_at_start() {
    let log = log_with_rust_log("ocmd=info".as_ref());
    assert!(
        log.contains(
            "ocmd: RUST_LOG=\"ocmd=info\" turns off even the errors of \
             ocm_server::event_loop, ocm_server::password, ocm_server::persist"
        ),
        "{log}"
    );
    assert!(!log.contains("listening"), "obeyed: {log}");
    let log = log_with_rust_log("off".as_ref());
    assert!(
        log.contains("RUST_LOG=\"off\" turns off even the errors of ocmd, ocm_server::"),
        "{log}"
    );
    // A filter that keeps them says nothing of the kind.
    let log = log_with_rust_log("warn,ocm_server::rooms=debug".as_ref());
    assert!(!log.contains("turns off"), "{log}");
    assert!(!log.contains(" INFO "), "{log}");
}

// ---------------------------------------------------------------------------------------------
// The systemd unit and the installer

#[test]
fn the_unit_file_is_valid_and_sandboxed() {
    let unit_path = repo_root().join("config/ocmd.service");
    let unit = std::fs::read_to_string(&unit_path).expect("config/ocmd.service");
    // Static checks, always: the lines that matter, uncommented.
    let keys: BTreeMap<&str, Vec<&str>> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .fold(BTreeMap::new(), |mut m, (k, v)| {
            m.entry(k).or_insert_with(Vec::new).push(v);
            m
        });
    let one = |key: &str| -> &str {
        keys.get(key)
            .and_then(|v| v.first().copied())
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
    };
    assert_eq!(one("Type"), "notify");
    let exec = one("ExecStart");
    assert!(
        exec.starts_with("/usr/local/bin/ocmd ")
            && exec.contains("--config /etc/ocmd/ocmd.toml")
            && exec.contains("--state /var/lib/ocmd/room_manager.json"),
        "{exec}"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("StateDirectory"), "ocmd");
    assert_eq!(one("StateDirectoryMode"), "0700");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("UMask"), "0077");
    assert_eq!(one("WatchdogSec"), "30");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    assert_eq!(one("SystemCallFilter"), "@system-service");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectProc"), "invisible");
    assert_eq!(one("LimitNOFILE"), "65536");
    for key in [
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
    ] {
        assert_eq!(one(key), "yes", "{key}");
    }
    // The state file the unit names is inside its StateDirectory.
    assert!(exec.contains(&format!("/var/lib/{}/", one("StateDirectory"))));
    // ProcSubset=pid hides /proc/net; the daemon reads /proc/self/net/udp, which stays
    // (kernel_drops_are_counted_under_proc_subset_pid runs it that way).
    assert_eq!(one("ProcSubset"), "pid");

    if !installed("systemd-analyze") {
        skipped("systemd-analyze not installed: static checks only");
        return;
    }
    let mut cmd = Command::new(repo_root().join("scripts/check-unit"));
    cmd.arg(env!("CARGO_BIN_EXE_ocmd"));
    let out = assert_passes(cmd, "scripts/check-unit");
    assert!(text(&out.stdout).contains("check-unit: OK"));
    // And the check has teeth: a misspelt key fails it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("ocmd.service");
    std::fs::write(
        &broken,
        unit.replace("ProtectClock=yes", "ProtectClocks=yes"),
    )
    .unwrap();
    let mut cmd = Command::new(repo_root().join("scripts/check-unit"));
    cmd.arg(env!("CARGO_BIN_EXE_ocmd"))
        .env("OCMD_UNIT", &broken);
    let out = run_with_deadline(cmd);
    assert!(!out.status.success(), "a misspelt key passed");
    assert!(
        text(&out.stderr).contains("ProtectClocks"),
        "{}",
        text(&out.stderr)
    );
    // The socket unit is checked too.
    let socket = std::fs::read_to_string(repo_root().join("config/ocmd.socket")).unwrap();
    let broken = dir.path().join("ocmd.socket");
    std::fs::write(&broken, socket.replace("Backlog=", "Backlogg=")).unwrap();
    let mut cmd = Command::new(repo_root().join("scripts/check-unit"));
    cmd.arg(env!("CARGO_BIN_EXE_ocmd"))
        .env("OCMD_SOCKET_UNIT", &broken);
    let out = run_with_deadline(cmd);
    assert!(
        !out.status.success(),
        "a misspelt key in the socket unit passed"
    );
    assert!(
        text(&out.stderr).contains("Backlogg"),
        "{}",
        text(&out.stderr)
    );
}

/// config/ocmd.socket listens where config/ocmd.toml does (its addresses win over the file's
/// when it is enabled, so the two shipped files must agree), with the TCRP listen backlog the
/// file asks for.
#[test]
fn the_socket_unit_listens_where_the_example_configuration_does() {
    let socket = std::fs::read_to_string(repo_root().join("config/ocmd.socket")).unwrap();
    let value = |key: &str| -> Vec<String> {
        socket
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_ocmd"))
        .args(["--check-config", "--config"])
        .arg(repo_root().join("config/ocmd.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective = text(&out.stdout);
    let setting = |key: &str| -> String {
        effective
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} in:\n{effective}"))
            .trim_matches('"')
            .to_owned()
    };
    assert_eq!(value("ListenStream"), [setting("tcp")]);
    assert_eq!(value("ListenDatagram"), [setting("udp")]);
    assert_eq!(value("Backlog"), [setting("listen_backlog")]);
}

fn install_sh(args: &[impl AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(repo_root().join("scripts/install.sh"));
    cmd.args(args);
    run_with_deadline(cmd)
}

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ocmd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The documents `scripts/install.sh` puts beside the operations guide, which refers to them.
const INSTALLED_DOCS: [&str; 7] = [
    "OPERATIONS",
    "PROTOCOL",
    "SECURITY",
    "PERSISTENCE",
    "BENCHMARKS",
    "BENCHMARK-RUNS",
    "CLIENT",
];

/// The manual pages and completions `scripts/install.sh` writes under the prefix, from the
/// binaries (tests/manuals.rs checks what they hold).
const INSTALLED_GENERATED: [&str; 9] = [
    "share/man/man8/ocmd.8",
    "share/man/man1/ocm.1",
    "share/man/man1/ocm-create.1",
    "share/man/man1/ocm-join.1",
    "share/man/man1/ocm-rooms.1",
    "share/man/man1/ocm-who.1",
    "share/bash-completion/completions/ocm",
    "share/zsh/site-functions/_ocm",
    "share/fish/vendor_completions.d/ocm.fish",
];

#[test]
fn install_dry_run_plans_every_action_and_does_none() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    let out = install_sh(&[
        "--dry-run".as_ref(),
        "--no-build".as_ref(),
        "--prefix".as_ref(),
        prefix.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let p = prefix.display();
    let planned_line = |start: &str, end: &str| {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(start) && l.ends_with(end)),
            "no line {start:?}...{end:?} in:\n{stdout}"
        );
    };
    planned_line(
        "would run: install -d -m 0755 ",
        &format!("{p}/share/doc/ocmd"),
    );
    planned_line(
        "would run: install -m 0755 ",
        &format!("/release/ocmd {p}/bin/ocmd"),
    );
    planned_line(
        "would run: install -m 0755 ",
        &format!("/release/ocm {p}/bin/ocm"),
    );
    for doc in INSTALLED_DOCS {
        planned_line(
            "would run: install -m 0644 ",
            &format!("docs/{doc}.md {p}/share/doc/ocmd/{doc}.md"),
        );
    }
    planned_line(
        "would run: install -m 0644 ",
        &format!("docs/bench.svg {p}/share/doc/ocmd/bench.svg"),
    );
    for example in ["ocmd-alerts.yml", "ocmd-dashboard.json"] {
        planned_line(
            "would run: install -m 0644 ",
            &format!("config/{example} {p}/share/doc/ocmd/{example}"),
        );
    }
    planned_line(
        &format!("would write: {p}/share/man/man8/ocmd.8 (mode 0644), from: "),
        "/release/ocmd --generate-man",
    );
    planned_line(
        &format!("would write: {p}/share/man/man1/ocm.1 and ocm-COMMAND.1"),
        "/release/ocm generate man DIR",
    );
    for (path, shell) in [
        ("bash-completion/completions/ocm", "bash"),
        ("zsh/site-functions/_ocm", "zsh"),
        ("fish/vendor_completions.d/ocm.fish", "fish"),
    ] {
        planned_line(
            &format!("would write: {p}/share/{path} (mode 0644), from: "),
            &format!("/release/ocm generate completions {shell}"),
        );
    }
    planned_line(
        "would write: /etc/systemd/system/ocmd.service (mode 0644)",
        "",
    );
    planned_line(
        "would write: /etc/systemd/system/ocmd.socket (mode 0644)",
        "",
    );
    planned_line("would write: /etc/ocmd/ocmd.toml (mode 0644)", "");
    assert!(stdout.contains("systemctl daemon-reload && systemctl enable --now ocmd"));
    assert!(!stdout.contains("cargo build"), "--no-build: {stdout}");
    assert!(!prefix.exists(), "dry run created {}", prefix.display());
    // Every action line is a plan, not a deed.
    assert!(!stdout.lines().any(|l| l.starts_with("+ ")), "{stdout}");

    // Without --no-build the plan starts with the release build.
    let out = install_sh(&[
        "--dry-run".as_ref(),
        "--prefix".as_ref(),
        prefix.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    if out.status.success() {
        assert!(
            stdout.contains("would run: cargo build --release --locked")
                && stdout.contains("-p ocm-server -p ocm-client"),
            "{stdout}"
        );
    } else {
        // No cargo on PATH (it is there whenever cargo runs this test, but be exact).
        assert!(text(&out.stderr).contains("cargo not found"));
    }

    let out = install_sh(&["--help"]);
    assert!(out.status.success());
    for flag in [
        "--prefix",
        "--dry-run",
        "--no-build",
        "--unit-dir",
        "--config-dir",
        "--destdir",
    ] {
        assert!(text(&out.stdout).contains(flag), "--help lacks {flag}");
    }
    let out = install_sh(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn install_puts_files_in_place_and_keeps_a_changed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    let units = tmp.path().join("units");
    let etc = tmp.path().join("etc");
    let build = build_dir();
    let args = [
        "--no-build".as_ref(),
        "--prefix".as_ref(),
        prefix.as_os_str(),
        "--unit-dir".as_ref(),
        units.as_os_str(),
        "--config-dir".as_ref(),
        etc.as_os_str(),
        "--build-dir".as_ref(),
        build.as_os_str(),
    ];
    let out = install_sh(&args);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    };
    let ocmd = prefix.join("bin/ocmd");
    assert_eq!(mode(&ocmd), 0o755);
    assert_eq!(mode(&prefix.join("bin/ocm")), 0o755);
    assert_eq!(
        std::fs::read(&ocmd).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_ocmd")).unwrap()
    );
    for doc in INSTALLED_DOCS {
        assert_eq!(
            mode(&prefix.join(format!("share/doc/ocmd/{doc}.md"))),
            0o644
        );
    }
    assert_eq!(mode(&prefix.join("share/doc/ocmd/bench.svg")), 0o644);
    for example in ["ocmd-alerts.yml", "ocmd-dashboard.json"] {
        assert_eq!(
            std::fs::read(prefix.join("share/doc/ocmd").join(example)).unwrap(),
            std::fs::read(repo_root().join("config").join(example)).unwrap(),
            "{example}"
        );
    }
    for generated in INSTALLED_GENERATED {
        assert_eq!(mode(&prefix.join(generated)), 0o644, "{generated}");
    }
    // Each is what the installed binaries write, and nothing else is in man1.
    let generated_by = |program: &Path, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    };
    let ocm = prefix.join("bin/ocm");
    for (installed, program, args) in [
        ("share/man/man8/ocmd.8", &ocmd, &["--generate-man"][..]),
        (
            "share/bash-completion/completions/ocm",
            &ocm,
            &["generate", "completions", "bash"][..],
        ),
        (
            "share/zsh/site-functions/_ocm",
            &ocm,
            &["generate", "completions", "zsh"][..],
        ),
        (
            "share/fish/vendor_completions.d/ocm.fish",
            &ocm,
            &["generate", "completions", "fish"][..],
        ),
    ] {
        assert_eq!(
            std::fs::read(prefix.join(installed)).unwrap(),
            generated_by(program, args),
            "{installed} is what `{} {args:?}` writes",
            program.display()
        );
    }
    let pages = tempfile::tempdir().unwrap();
    generated_by(&ocm, &["generate", "man", pages.path().to_str().unwrap()]);
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let man1 = prefix.join("share/man/man1");
    assert_eq!(listing(&man1), listing(pages.path()));
    for name in listing(&man1) {
        assert_eq!(
            std::fs::read(man1.join(&name)).unwrap(),
            std::fs::read(pages.path().join(&name)).unwrap(),
            "{name}"
        );
    }
    let unit_path = units.join("ocmd.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} --config {} --state /var/lib/ocmd/room_manager.json",
            ocmd.display(),
            etc.join("ocmd.toml").display()
        )),
        "ExecStart follows --prefix and --config-dir:\n{unit}"
    );
    let socket_path = units.join("ocmd.socket");
    assert_eq!(mode(&socket_path), 0o644);
    let socket = std::fs::read_to_string(&socket_path).unwrap();
    assert!(
        socket.contains(&format!(
            "Documentation=man:ocmd(8) file:{}/share/doc/ocmd/OPERATIONS.md",
            prefix.display()
        )),
        "Documentation follows --prefix:\n{socket}"
    );
    let config_path = etc.join("ocmd.toml");
    assert_eq!(mode(&config_path), 0o644);
    let installed_config = std::fs::read_to_string(&config_path).unwrap();
    assert!(installed_config.contains("path = \"/var/lib/ocmd/room_manager.json\""));
    // The installed binary accepts the installed config.
    let out = Command::new(&ocmd)
        .args(["--check-config", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Second run: an operator's change survives; the new example lands beside it.
    let mine = format!("{installed_config}\n# changed by the operator\n");
    std::fs::write(&config_path, &mine).unwrap();
    let out = install_sh(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), mine);
    let new = etc.join("ocmd.toml.new");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), installed_config);
    assert_eq!(mode(&new), 0o644);
    assert!(text(&out.stdout).contains("ocmd.toml.new"));

    // Third run with the config back to the example: nothing to write.
    std::fs::write(&config_path, &installed_config).unwrap();
    std::fs::remove_file(&new).unwrap();
    let out = install_sh(&args);
    assert!(out.status.success());
    assert!(!new.exists());
    assert!(text(&out.stdout).contains("keep:"));
}

/// A SIGHUP (a log rotation script, an early reload) while `ocmd` is still loading its state
/// does not kill it: the handlers come first, and the signal waits until the loop runs. The
/// state file is a FIFO here, so the load waits until the test feeds it.
#[test]
fn a_sighup_while_the_state_loads_does_not_kill_ocmd() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("room_manager.json");
    let path = std::ffi::CString::new(state.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // Killed and reaped however the test ends (a failed assertion included).
    let mut guard = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ocmd"))
            .args(LOOPBACK_LISTENERS)
            .arg("--state")
            .arg(&state)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ocmd"),
    );
    let child = &mut guard.0;
    let lines = stderr_lines(child);
    // The lock is taken after the handlers are installed; the load then waits on the FIFO.
    let lock = dir.path().join("room_manager.json.lock");
    wait_until("the state lock taken", || {
        std::fs::read_to_string(&lock).is_ok_and(|pid| pid.starts_with("pid "))
    });
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    // Feed the state each time ocmd opens the FIFO for reading (the start opens it more than
    // once; an open for writing without a reader fails with ENXIO) until it serves. A dead
    // ocmd never opens it. Each reader gets the state once: the next write waits until the
    // reader has taken it and closed its end, since an open for writing also succeeds while
    // a reader that has not yet seen the end of the last write holds the FIFO, and a second
    // copy would reach that reader as trailing bytes (seen once on a loaded machine).
    // A reader whose open has not returned holds no descriptor yet, but it keeps the pipe
    // and what was written to it: a look of our own (a read end opened and closed without
    // reading) sees those bytes. ocmd also opens the file once without reading it.
    let ocmd_holds_fifo = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| target == state)
        })
    };
    let unread_in_fifo = || {
        use std::os::fd::AsRawFd;
        let look = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&state)
            .expect("open the FIFO to look");
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes the pipe's unread byte count to `n`.
        let rc = unsafe { libc::ioctl(look.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n
    };
    let ocmd_gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<String> = Vec::new();
    while !seen.iter().any(|l| l.contains("listening ")) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ocmd died while starting: {status}: {seen:#?}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ocmd did not start: {seen:#?}");
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&state)
        {
            Ok(mut fifo) => {
                use std::os::unix::fs::FileTypeExt;
                let kind = fifo.metadata().unwrap().file_type();
                assert!(kind.is_fifo(), "the state file is no longer the FIFO");
                match fifo.write_all(br#"{"rooms": {}, "tokens": {}}"#) {
                    Ok(()) => {
                        drop(fifo);
                        let pid = child.id();
                        wait_until("ocmd took the state and closed the FIFO", || {
                            ocmd_gone(pid) || (!ocmd_holds_fifo(pid) && unread_in_fifo() == 0)
                        });
                    }
                    // The reader closed between our open and the write (a write this short
                    // goes in whole or not at all): feed its next open.
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
                    Err(e) => panic!("writing the FIFO: {e}"),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => panic!("opening the FIFO: {e}"),
        }
        seen.extend(lines.recv_timeout(Duration::from_millis(5)));
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_for_exit(child, "ocmd after SIGTERM");
    assert!(status.success(), "{status}: {seen:#?}");
}

// ---------------------------------------------------------------------------------------------
// A journal the disk does not take

/// The variable and file that switch [`fdatasync_failer`] on.
const FAIL_FDATASYNC: (&str, &str) = ("OCM_TEST_FAIL_FDATASYNC", "fail-fdatasync");

/// An `fdatasync` that fails while [`FAIL_FDATASYNC`]'s file exists: a journal whose appends
/// fail, as on a full disk.
fn fdatasync_failer(dir: &Path) -> PathBuf {
    sync_stub(
        dir,
        "fdatasync",
        FAIL_FDATASYNC.0,
        SyncStub::Fail {
            regular_files_only: false,
        },
    )
}

/// Runs `meanwhile` while a create (room "during", by bob) waits for a disk that fails while
/// `fail` exists; then removes `fail` and waits until that create is answered.
fn while_a_create_waits_for_the_disk(d: &Daemon, fail: &Path, meanwhile: impl FnOnce()) {
    thread::scope(|s| {
        let joining = s.spawn(|| create(d, "during", "bob"));
        meanwhile();
        std::fs::remove_file(fail).unwrap();
        joining
            .join()
            .expect("the create is answered once the disk takes it");
    });
}

/// A journal that cannot be written (a full disk) holds every create and join until it can,
/// and nothing else showed it: `/healthz` answers, and the write counters only move once a
/// write succeeds. `ocm_state_write_failures_total` counts each failed try while it lasts.
#[test]
fn journal_write_failures_are_counted_while_they_last() {
    let (d, fail, _library) = spawn_preloaded(fdatasync_failer, FAIL_FDATASYNC, metrics_on());
    create(&d, "before", "alice");
    assert_eq!(d.metric("ocm_state_write_failures_total"), 0.0);
    std::fs::write(&fail, b"").unwrap();
    while_a_create_waits_for_the_disk(&d, &fail, || {
        // Retried every second: two failures take about two seconds.
        wait_until("failed journal writes are counted", || {
            d.metric("ocm_state_write_failures_total") >= 2.0
        });
    });
    let failures = d.metric("ocm_state_write_failures_total");
    create(&d, "after", "carol");
    assert_eq!(
        d.metric("ocm_state_write_failures_total"),
        failures,
        "a write that succeeds is not a failure"
    );
}

/// A journal that cannot be written is retried every second; the log says so at the first
/// failure, not at every retry (a full disk for an hour made 3,600 error lines), and says
/// when the journal takes writes again, with how long it failed: otherwise the errors just
/// stop, which reads the same as a daemon that died or a log that stopped.
#[test]
fn a_journal_that_cannot_be_written_is_logged_once_and_so_is_its_recovery() {
    let (d, fail, _library) = spawn_preloaded(fdatasync_failer, FAIL_FDATASYNC, metrics_on());
    create(&d, "before", "alice");
    std::fs::write(&fail, b"").unwrap();
    while_a_create_waits_for_the_disk(&d, &fail, || {
        wait_until("four failed journal writes", || {
            d.metric("ocm_state_write_failures_total") >= 4.0
        });
    });
    d.wait_for_log("takes writes again");
    let log = d.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot append to journal"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one line for the failure, not one a retry:\n{log}"
    );
    assert!(errors[0].contains("ERROR"), "{log}");
    let recovered = line_with(&log, "takes writes again");
    assert!(
        recovered.contains("WARN")
            && recovered.contains(&d.state.with_extension("json.journal").display().to_string())
            && recovered.contains("failed attempts"),
        "the recovery names the journal and how often it failed, at the failure's \
         neighbouring level (journalctl -p warning shows both): {recovered}"
    );
}

/// The reload's log line says what it changed, with the old and the new value, or that it
/// changed nothing: "configuration reloaded" alone read the same after an edit of the wrong
/// file (the `.new` beside it, a copy elsewhere) as after the intended one.
#[test]
fn reload_says_which_settings_it_changed() {
    let d = Daemon::start_with(configured("[rate]\nchat_per_sec = 50.0\n"));
    d.reload("[rate]\nchat_per_sec = 20.0\n[history]\nmessages = 7\n");
    let line = |n: usize| {
        d.log()
            .lines()
            .filter(|l| l.contains("configuration reloaded"))
            .nth(n)
            .map(str::to_owned)
            .unwrap()
    };
    let changed = line(0);
    assert!(
        changed.contains("history.messages 100 -> 7")
            && changed.contains("rate.chat_per_sec 50.0 -> 20.0"),
        "{changed}"
    );
    // The same file again: nothing changed, and the line says so.
    d.reload("[rate]\nchat_per_sec = 20.0\n[history]\nmessages = 7\n");
    let unchanged = line(1);
    assert!(unchanged.contains("no setting changed"), "{unchanged}");
}

/// A dropped datagram's debug line names the room and the token (its prefix) it claimed, not
/// only its source: a chat dropped as `address_mismatch` comes from an address no other line
/// names, so "127.0.0.1:40000: datagram dropped (address_mismatch)" left an operator asking
/// why bob's messages vanish unable to tell whether these were bob's.
#[test]
fn a_dropped_datagram_is_logged_with_its_room_and_token() {
    let d = Daemon::start();
    let (_alice, bob) = room_of_two(&d, "lobby");
    // bob's token from another socket: not the address bob registered.
    let elsewhere = Member::new(&d, "lobby", &bob.token);
    elsewhere.send("hello?");
    d.wait_for_log("datagram dropped (address_mismatch)");
    let log = d.log();
    let line = line_with(&log, "datagram dropped (address_mismatch)");
    assert!(
        line.contains(&elsewhere.addr().to_string())
            && line.contains("room \"lobby\"")
            && line.contains(&format!("token {}…", &bob.token[..6])),
        "{line}"
    );
    assert!(!line.contains(&bob.token), "never the whole token: {line}");
}

/// A listen address given as a port alone (`--tcp 9090`), or with the address left out
/// (`:9090`, `*:9090`, as other daemons take for every address) says that the address is
/// missing: it used to say that the port was missing, or that host names are not looked up.
#[test]
fn a_listen_address_without_its_ip_says_the_address_is_missing() {
    for given in ["9090", ":9090", "*:9090"] {
        let out = ocmd(&["--check-config", "--tcp", given]);
        let err = assert_exit_code(&out, 2);
        assert!(
            err.contains("the IP address is missing")
                && err.contains("0.0.0.0:9090")
                && err.contains("127.0.0.1:9090")
                && !err.contains("PORT is missing")
                && !err.contains("host names"),
            "{given}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The open-file limit

/// `ocmd` under an open-file limit ([`spawn_with_open_files`]), killed on drop.
struct LimitedDaemon {
    process: KillOnDrop,
    tcp: SocketAddr,
    /// Its standard error up to the `listening` line.
    log: String,
    /// The lines after it, as they come.
    _more: Receiver<String>,
    /// Its config and state; removed once the process is gone.
    _dir: tempfile::TempDir,
}

/// Starts `ocmd` in a directory of its own with the open-file limit set to `soft` and `hard`
/// and the config `toml`.
fn spawn_with_open_files(soft: u64, hard: u64, toml: &str) -> LimitedDaemon {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("ocmd.toml");
    std::fs::write(&config, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
    cmd.args(LOOPBACK_LISTENERS)
        .arg("--state")
        .arg(dir.join("room_manager.json"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit(2) only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut guard = KillOnDrop(cmd.spawn().expect("spawn ocmd"));
    let lines = stderr_lines(&mut guard.0);
    let mut log = String::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("ocmd did not start:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("listening tcp=").nth(1) {
            let tcp = rest.split_whitespace().next().unwrap().parse().unwrap();
            return LimitedDaemon {
                process: guard,
                tcp,
                log,
                _more: lines,
                _dir: tmp,
            };
        }
    }
}

/// The soft open-file limit of process `pid`, from /proc.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// `ocmd` started with a soft open-file limit below what `limits.max_connections` needs (1024
/// in a shell outside systemd, against 4096 connections by default) raises it, up to the hard
/// limit. Otherwise, once the descriptors ran out, `accept` failed (EMFILE) before
/// `max_connections` was reached, so an idle connection was never closed to make room: a
/// create waited behind held-open connections until their handshake timer closed them (seen:
/// 9.6 s with 80 idle connections under `ulimit -n 64`).
#[test]
fn a_soft_open_file_limit_below_max_connections_is_raised() {
    let toml = "[limits]\nmax_connections = 100\nhandshake_timeout_secs = 60\n";
    let d = spawn_with_open_files(64, 4096, toml);
    assert!(
        soft_open_files(d.process.0.id()) > 100 + 16,
        "the soft limit stayed at {}:\n{}",
        soft_open_files(d.process.0.id()),
        d.log
    );
    // More idle connections than max_connections: the newest request makes room at once.
    assert_a_create_is_served_past_idle_connections(d.tcp, 110);
}

/// A hard open-file limit too low for `limits.max_connections` is said at start, with both
/// numbers and what to change.
#[test]
fn a_hard_open_file_limit_below_max_connections_is_reported_at_start() {
    let d = spawn_with_open_files(200, 200, "[limits]\nmax_connections = 4096\n");
    let warning = line_with(&d.log, "open files");
    assert!(
        warning.contains("WARN")
            && warning.contains("limits.max_connections = 4096")
            && warning.contains("200"),
        "{warning}"
    );
}

/// A hard open-file limit too low for `limits.max_connections` lowers the cap to what the
/// descriptors allow. Before, `accept` failed (EMFILE) before `max_connections` was reached,
/// so no idle connection was ever closed to make room: sources that held their connections
/// open (with a request now and then, under every limit) locked out every newcomer and every
/// health check for good. Seen with the defaults under a hard limit of 4096 (no warning then):
/// 4,012 connections open, a new client's request unanswered after 4 s.
#[test]
fn a_hard_open_file_limit_lowers_the_connection_cap_so_idle_connections_make_room() {
    let toml = "[limits]\nhandshake_timeout_secs = 60\n";
    let d = spawn_with_open_files(200, 200, toml);
    assert!(
        d.log.contains("at most 120 handshake connections"),
        "the lowered cap is not said:\n{}",
        d.log
    );
    // More idle connections than the descriptors hold.
    assert_a_create_is_served_past_idle_connections(d.tcp, 200);
}

/// Opens `idle` connections to `tcp` that send nothing, then a create on one more: it is
/// answered within 5 s, far under the 60 s handshake timeout these tests set (which would
/// otherwise free a place), so an idle connection was closed to make room for it.
fn assert_a_create_is_served_past_idle_connections(tcp: SocketAddr, idle: usize) {
    let idle: Vec<TcpStream> = (0..idle)
        .map(|_| TcpStream::connect(tcp).unwrap())
        .collect();
    let started = Instant::now();
    let reply = request_at(tcp, Operation::CreateRoom, "r", "alice");
    assert!(reply.token.is_some(), "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

/// A notification that cannot be sent is logged with the socket it was for: "cannot notify
/// the service manager: No such file or directory (os error 2)" did not say which file, and
/// `NOTIFY_SOCKET` is set by whatever started the daemon, not by the operator reading the log.
#[test]
fn a_notify_socket_that_does_not_exist_is_named_in_the_warning() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-notify.sock");
    let d = Daemon::start_with(Options {
        env: vec![("NOTIFY_SOCKET".into(), missing.display().to_string())],
        ..Options::default()
    });
    d.wait_for_log("cannot notify the service manager");
    let log = d.log();
    let line = line_with(&log, "cannot notify the service manager");
    assert!(line.contains(&missing.display().to_string()), "{line}");
}

/// A generator that fails (a broken `ocm` in the build directory) stops the install with a
/// message naming it and exit status 1; the completion it would have written is left as it
/// was, and its temporary files are gone.
#[test]
fn install_with_a_failing_generator_replaces_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    std::fs::create_dir(&build).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ocmd"), build.join("ocmd")).unwrap();
    let broken = build.join("ocm");
    std::fs::write(
        &broken,
        "#!/bin/sh\n[ \"$1\" = generate ] && [ \"$2\" = completions ] && { echo partial; exit 1; }\n\
         exec \"$OCM_REAL\" \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prefix = tmp.path().join("usr");
    let bash_completion = prefix.join("share/bash-completion/completions/ocm");
    std::fs::create_dir_all(bash_completion.parent().unwrap()).unwrap();
    std::fs::write(&bash_completion, "# the one installed before\n").unwrap();
    let scratch = tmp.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let mut cmd = Command::new(repo_root().join("scripts/install.sh"));
    cmd.args(["--no-build", "--prefix"])
        .arg(&prefix)
        .arg("--unit-dir")
        .arg(tmp.path().join("units"))
        .arg("--config-dir")
        .arg(tmp.path().join("etc"))
        .arg("--build-dir")
        .arg(&build)
        .env("OCM_REAL", sibling_binary("ocm"))
        .env("TMPDIR", &scratch);
    let out = run_with_deadline(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}{stderr}", text(&out.stdout));
    assert!(
        stderr.contains("generate completions bash failed (exit status 1)")
            && stderr.contains("is unchanged"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&bash_completion).unwrap(),
        "# the one installed before\n"
    );
    // The steps before it were done (the pages), those after it were not (the unit).
    assert!(prefix.join("share/man/man1/ocm.1").exists());
    assert!(!tmp.path().join("units/ocmd.service").exists());
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "temporary files left in TMPDIR"
    );
}

/// `scripts/install.sh` says so when it installs where the unit's sandbox hides things from
/// the service: under /home, /root or /run/user (`ProtectHome=yes`) or /tmp and /var/tmp
/// (`PrivateTmp=yes`), a unit whose ExecStart or --config points there cannot start (the
/// binary or the file is not there for it), and the install used to say "Installed".
#[test]
fn install_into_a_directory_the_unit_hides_says_so() {
    let out = install_sh(&[
        "--dry-run",
        "--no-build",
        "--prefix",
        "/home/ocm-install-test/usr",
        "--config-dir",
        "/tmp/ocm-install-test/etc",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{}{stderr}", text(&out.stdout));
    assert!(
        stderr.contains("/home/ocm-install-test/usr") && stderr.contains("ProtectHome=yes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("/tmp/ocm-install-test/etc") && stderr.contains("PrivateTmp=yes"),
        "{stderr}"
    );
    // The default places are visible to the service: nothing to say.
    let out = install_sh(&["--dry-run", "--no-build"]);
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("ProtectHome") && !stderr.contains("PrivateTmp"),
        "{stderr}"
    );
}

/// `--destdir` stages every file under a directory, for a package to take, while the paths
/// written into the unit and the configuration name the final places.
#[test]
fn install_with_destdir_stages_files_that_name_the_final_places() {
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let build = build_dir();
    // Final places that do not exist on this machine, so that a file written there instead of
    // under --destdir shows (the tests may run as root).
    let place = PathBuf::from(format!("/ocm-destdir-test-{}", std::process::id()));
    let (prefix, units, etc) = (place.join("usr"), place.join("units"), place.join("etc"));
    let out = install_sh(&[
        "--no-build".as_ref(),
        "--build-dir".as_ref(),
        build.as_os_str(),
        "--destdir".as_ref(),
        stage.as_os_str(),
        "--prefix".as_ref(),
        prefix.as_os_str(),
        "--unit-dir".as_ref(),
        units.as_os_str(),
        "--config-dir".as_ref(),
        etc.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        !place.exists(),
        "{} was written outside --destdir",
        place.display()
    );
    assert!(
        stdout.contains(&format!("Staged under {}", stage.display())),
        "{stdout}"
    );
    let staged = |path: &Path| stage.join(path.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(staged(&prefix.join("bin/ocmd"))).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_ocmd")).unwrap()
    );
    for generated in INSTALLED_GENERATED {
        assert!(staged(&prefix.join(generated)).is_file(), "{generated}");
    }
    let (p, e) = (prefix.display(), etc.display());
    let unit = std::fs::read_to_string(staged(&units.join("ocmd.service"))).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={p}/bin/ocmd --config {e}/ocmd.toml --state /var/lib/ocmd/room_manager.json"
        )) && unit.contains(&format!(
            "Documentation=man:ocmd(8) file:{p}/share/doc/ocmd/OPERATIONS.md"
        )) && unit.contains(&format!(
            "# Installed by scripts/install.sh as {}/ocmd.service.",
            units.display()
        )),
        "{unit}"
    );
    assert!(!unit.contains(&stage.display().to_string()), "{unit}");
    assert!(staged(&etc.join("ocmd.toml")).is_file());
    // The next steps name the final places too.
    assert!(
        stdout.contains(&format!(
            "{p}/bin/ocmd --config {e}/ocmd.toml --check-config"
        )),
        "{stdout}"
    );

    let out = install_sh(&["--no-build", "--destdir", "relative/stage"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--destdir must be absolute"),
        "{}",
        text(&out.stderr)
    );
}

/// Every shell script of the repository (the scripts, the maintainer scripts of the package
/// and CI's entry point) passes shellcheck, which finds quoting and exit-status mistakes that
/// a test of the happy path does not.
#[test]
fn the_shell_scripts_pass_shellcheck() {
    if !installed("shellcheck") {
        skipped("shellcheck not installed (apt-get install shellcheck)");
        return;
    }
    let root = repo_root();
    let mut scripts = vec![root.join(".ci/run")];
    for dir in ["scripts", "config/debian"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let head = std::fs::read(&path).unwrap_or_default();
            if head.starts_with(b"#!/bin/sh") || head.starts_with(b"#!/usr/bin/env bash") {
                scripts.push(path);
            }
        }
    }
    assert!(scripts.len() >= 12, "too few scripts found: {scripts:?}");
    let mut cmd = Command::new("shellcheck");
    cmd.args(&scripts);
    assert_passes(cmd, "shellcheck");
}

/// The example alerting rules (config/ocmd-alerts.yml) load, and their unit tests pass: each
/// alert fires on the series meant to raise it, stays quiet beside it, and renders its text.
#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() {
    if !installed("promtool") {
        skipped("promtool not installed (apt-get install prometheus): the alert rules");
        return;
    }
    let root = repo_root();
    for args in [
        ["check", "rules", "config/ocmd-alerts.yml"],
        [
            "test",
            "rules",
            "crates/server/tests/data/ocmd-alerts.test.yml",
        ],
    ] {
        let mut cmd = Command::new("promtool");
        cmd.args(args).current_dir(&root);
        assert_passes(cmd, &format!("promtool {args:?}"));
    }
}

/// A metric selector in PromQL, `ocm_name{key="value", key=~"a|b"}`.
struct Selector {
    /// The metric family (a histogram's `_bucket` series are its family's).
    family: String,
    /// Each label matcher's key and the values it matches (a regular expression's
    /// alternatives split).
    matchers: Vec<(String, Vec<String>)>,
}

/// The metric selectors in PromQL text. Names without a selector are prose and are passed
/// over.
fn promql_selectors(promql: &str) -> Vec<Selector> {
    let mut found = Vec::new();
    let mut rest = promql;
    while let Some(at) = rest.find("ocm_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        let Some(after) = rest.strip_prefix('{') else {
            continue;
        };
        let close = after.find('}').expect("a closed selector");
        let matchers = after[..close]
            .split(',')
            .map(str::trim)
            .map(|m| {
                let (key, values) = ["=~", "!~", "!=", "="]
                    .iter()
                    .find_map(|op| m.split_once(op))
                    .unwrap_or_else(|| panic!("matcher {m}"));
                let values = values.trim_matches('"').split('|').map(str::to_owned);
                (key.to_owned(), values.collect())
            })
            .collect();
        let family = name.strip_suffix("_bucket").unwrap_or(name).to_owned();
        found.push(Selector { family, matchers });
    }
    found
}

/// A fresh daemon's full render (tests/data/metrics_fresh.prom, which the unit tests of
/// metrics.rs keep true).
fn fresh_render() -> String {
    std::fs::read_to_string(repo_root().join("crates/server/tests/data/metrics_fresh.prom"))
        .unwrap()
}

/// Every selector in `promql` (from `source`) reads a metric in `served` (a render of
/// `ocmd`'s), and every label it matches on other than `job` and `instance`, and each of its
/// values, is one docs/OPERATIONS.md documents for that metric. With `from_start` (and a
/// fresh daemon's render), each counter series it reads is there already, at 0, so that
/// `increase()` sees its first event. Returns how many selectors there were.
fn assert_reads_what_ocmd_serves(
    promql: &str,
    source: &str,
    served: &str,
    from_start: bool,
) -> usize {
    let guide = std::fs::read_to_string(repo_root().join("docs/OPERATIONS.md")).unwrap();
    let selectors = promql_selectors(promql);
    for Selector { family, matchers } in &selectors {
        assert!(
            served.contains(&format!("# TYPE {family} ")),
            "{family} (in {source}) is not among the metrics ocmd serves"
        );
        let row = guide
            .lines()
            .find(|l| l.starts_with(&format!("| `{family}` |")))
            .unwrap_or_else(|| panic!("{family} has no row in docs/OPERATIONS.md"));
        let labels: Vec<_> = matchers
            .iter()
            .filter(|(key, _)| key != "job" && key != "instance")
            .collect();
        for (key, values) in &labels {
            assert!(
                row.contains(&format!("`{key}`:")),
                "{family}{{{key}=…}} in {source}: docs/OPERATIONS.md documents no label {key}"
            );
            for value in values {
                assert!(
                    row.contains(&format!("`{value}`")),
                    "{family}{{{key}=\"{value}\"}} in {source}: docs/OPERATIONS.md documents no such {key}"
                );
            }
        }
        if !from_start || !served.contains(&format!("# TYPE {family} counter")) {
            continue;
        }
        if labels.is_empty() {
            // Unlabelled, or every series of a labelled family (served at 0 from the start
            // when the family is: tests of metrics.rs check that).
            assert!(
                served.contains(&format!("\n{family} 0\n"))
                    || served.contains(&format!("\n{family}{{")),
                "{family} (in {source}) is not served at 0 from the start"
            );
        }
        for (key, values) in labels {
            for value in values {
                let series = format!("\n{family}{{{key}=\"{value}\"}} 0\n");
                assert!(
                    served.contains(&series),
                    "{} (in {source}) is not served at 0 from the start: a series born at 1 \
                     shows no increase",
                    series.trim()
                );
            }
        }
    }
    selectors.len()
}

/// Every metric and label value the alerting rules read is one `ocmd` serves and the guide
/// documents, and every alert has a unit test and a line in the guide's "Alerts".
#[test]
fn the_alert_rules_read_what_ocmd_serves_and_are_each_tested_and_documented() {
    let root = repo_root();
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let rules = read("config/ocmd-alerts.yml");
    let guide = read("docs/OPERATIONS.md");
    let unit_tests = read("crates/server/tests/data/ocmd-alerts.test.yml");
    let expressions = alert_expressions();
    let selectors = assert_reads_what_ocmd_serves(
        &expressions,
        "config/ocmd-alerts.yml",
        &fresh_render(),
        true,
    );
    assert!(selectors >= 10, "only {selectors} metric selectors found");

    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        assert!(
            unit_tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test"
        );
        assert!(
            guide.contains(&format!("| `{alert}` |")),
            "{alert} is not in docs/OPERATIONS.md, \"Alerts\""
        );
    }
}

/// The alert rules (config/ocmd-alerts.yml) without their comments, which name metrics in
/// prose.
fn alert_expressions() -> String {
    let rules = std::fs::read_to_string(repo_root().join("config/ocmd-alerts.yml")).unwrap();
    rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A real daemon that has seen nothing serves every counter series the alert rules read,
/// at 0, as tests/data/metrics_fresh.prom says: an alert sees the first event of each (a
/// series born at 1 shows no increase).
#[test]
fn a_fresh_daemon_serves_every_series_the_alerts_read_at_zero() {
    let d = Daemon::start_with(metrics_on());
    let served = d.http_get("/metrics");
    let expressions = alert_expressions();
    let selectors = assert_reads_what_ocmd_serves(&expressions, "a fresh ocmd", &served, true);
    assert!(selectors >= 10, "only {selectors} metric selectors found");
}

/// The Grafana dashboard (config/ocmd-dashboard.json) is JSON Grafana can import: panels with
/// unique ids, a title, a description and queries, laid out on the 24-column grid without
/// overlapping; and every query reads what `ocmd` serves, with label values the guide
/// documents.
#[test]
fn the_dashboard_reads_what_ocmd_serves_and_its_panels_do_not_overlap() {
    let path = repo_root().join("config/ocmd-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    assert_eq!(dashboard["uid"], "ocmd");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut exprs = Vec::new();
    let served = fresh_render();
    for panel in panels {
        let title = panel["title"].as_str().expect("a title").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id used twice"
        );
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {grid}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: no description"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let selectors =
                assert_reads_what_ocmd_serves(expr, &format!("the panel {title}"), &served, false);
            assert!(selectors > 0, "{title}: {expr} reads no ocm_ metric");
            assert!(expr.contains(r#"instance=~"$instance""#), "{title}: {expr}");
            exprs.push((title.clone(), expr.to_owned()));
        }
    }
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    // Each alert is named on the panel that shows what it watches.
    let descriptions: String = panels
        .iter()
        .filter_map(|p| p["description"].as_str())
        .collect();
    let rules = std::fs::read_to_string(repo_root().join("config/ocmd-alerts.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert: "))
    {
        assert!(
            descriptions.contains(alert),
            "no panel's description names {alert}"
        );
    }

    // The queries parse: promtool checks them as recording rules, Grafana's variables
    // replaced by what they stand for.
    if !installed("promtool") {
        skipped("promtool not installed (apt-get install prometheus): the dashboard's PromQL");
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        rules += &format!(
            "      # {title}\n      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::Value::String(expr)
        );
    }
    let file = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "rules"]).arg(file.path());
    assert_passes(cmd, "promtool check rules on the dashboard's queries");
}

/// Whether the tools that make a Debian package are here; a recorded skip where they are not.
fn dpkg_tools_installed() -> bool {
    for tool in ["dpkg-deb", "dpkg-shlibdeps"] {
        if !installed(tool) {
            skipped(&format!("{tool} not installed (apt-get install dpkg-dev)"));
            return false;
        }
    }
    true
}

fn package_deb(args: &[impl AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(repo_root().join("scripts/package-deb"));
    cmd.args(args);
    run_with_deadline(cmd)
}

/// `scripts/package-deb --fast` of the test build into `out`, its work files in `tmpdir`
/// when given; the package's path.
fn built_package(out: &Path, tmpdir: Option<&Path>) -> PathBuf {
    let mut cmd = Command::new(repo_root().join("scripts/package-deb"));
    cmd.args(["--no-build", "--fast", "--build-dir"])
        .arg(build_dir())
        .arg("--out")
        .arg(out);
    if let Some(dir) = tmpdir {
        cmd.env("TMPDIR", dir);
    }
    let result = run_with_deadline(cmd);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", text(&result.stderr));
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert_eq!(deb.parent(), Some(out), "{stdout}");
    deb
}

/// `dpkg-deb ARGS...`'s standard output, which must succeed.
fn dpkg_deb(args: &[impl AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new("dpkg-deb").args(args).output().unwrap();
    assert!(out.status.success(), "dpkg-deb: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The Debian package holds what `scripts/install.sh` installs, where Debian puts it: the
/// programs stripped and working, the units naming /usr/bin/ocmd, the manual pages
/// compressed, ocmd.toml a configuration file, the maintainer scripts of config/debian, and
/// dependencies read from the binaries. Two builds are the same bytes, and lintian (when
/// installed) has nothing to say. scripts/systemd-trial installs, upgrades, removes and
/// purges it under a real systemd.
#[test]
fn package_deb_builds_a_package_debian_accepts() {
    if !dpkg_tools_installed() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = built_package(&tmp.path().join("one"), None);
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();

    let field = |name: &str| {
        dpkg_deb(&["--field".as_ref(), deb.as_os_str(), name.as_ref()])
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "ocmd");
    // The workspace's version, then the commit's time and hash: a later commit is an upgrade.
    let version = field("Version");
    let cargo_version = env!("CARGO_PKG_VERSION");
    assert!(
        version.starts_with(&format!("{cargo_version}+git")),
        "{version}"
    );
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let commit = text(&commit.stdout).trim().to_owned();
    assert!(
        commit.len() == 12 && version.contains(&format!(".{commit}")),
        "{version} names commit {commit}"
    );
    assert_eq!(
        name,
        format!("ocmd_{version}_{}.deb", field("Architecture"))
    );
    assert!(
        field("Depends").contains("libc6 (>= "),
        "{}",
        field("Depends")
    );
    assert_eq!(
        dpkg_deb(&["--info".as_ref(), deb.as_os_str(), "conffiles".as_ref()]),
        "/etc/ocmd/ocmd.toml\n"
    );

    let contents = dpkg_deb(&["--contents".as_ref(), deb.as_os_str()]);
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .unwrap_or_else(|| panic!("no {path} in:\n{contents}"))
    };
    for program in ["usr/bin/ocmd", "usr/bin/ocm"] {
        assert!(
            entry(program).starts_with("-rwxr-xr-x root/root "),
            "{}",
            entry(program)
        );
    }
    for doc in INSTALLED_DOCS {
        entry(&format!("usr/share/doc/ocmd/{doc}.md"));
    }
    for file in [
        "usr/share/doc/ocmd/copyright",
        "usr/share/doc/ocmd/changelog.gz",
        "usr/share/doc/ocmd/ocmd-alerts.yml",
        "usr/share/doc/ocmd/ocmd-dashboard.json",
        "usr/lib/systemd/system/ocmd.service",
        "usr/lib/systemd/system/ocmd.socket",
        "etc/ocmd/ocmd.toml",
    ] {
        assert!(
            entry(file).starts_with("-rw-r--r-- root/root "),
            "{}",
            entry(file)
        );
    }
    for generated in INSTALLED_GENERATED {
        if generated.starts_with("share/man/") {
            entry(&format!("usr/{generated}.gz"));
        } else {
            entry(&format!("usr/{generated}"));
        }
    }
    assert!(
        !contents
            .lines()
            .any(|l| l.ends_with(".1") || l.ends_with(".8")),
        "an uncompressed manual page:\n{contents}"
    );

    // Unpacked: the programs work and the unit and the configuration agree.
    let root = tmp.path().join("root");
    dpkg_deb(&["-x".as_ref(), deb.as_os_str(), root.as_os_str()]);
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/ocmd.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/ocmd --config /etc/ocmd/ocmd.toml "),
        "{unit}"
    );
    let out = Command::new(root.join("usr/bin/ocmd"))
        .arg("--check-config")
        .arg("--config")
        .arg(root.join("etc/ocmd/ocmd.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("path = \"/var/lib/ocmd/room_manager.json\""));
    let out = Command::new(root.join("usr/bin/ocm"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let control = tmp.path().join("control");
    dpkg_deb(&["-e".as_ref(), deb.as_os_str(), control.as_os_str()]);
    for script in ["postinst", "prerm", "postrm"] {
        let packaged = control.join(script);
        assert_eq!(
            std::fs::read(&packaged).unwrap(),
            std::fs::read(repo_root().join("config/debian").join(script)).unwrap(),
            "{script}"
        );
        let mode = std::fs::metadata(&packaged).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
    }

    // The copyright file names the crates built in ("name vVERSION: licence"), and after them
    // the licence files each ships ("name VERSION: file"): the texts, each once, but for the
    // Apache License's standard terms, which Debian keeps in /usr/share/common-licenses.
    let copyright = std::fs::read_to_string(root.join("usr/share/doc/ocmd/copyright")).unwrap();
    assert!(
        copyright.contains("\nLicense: MIT\n Permission is"),
        "{copyright}"
    );
    let built_in: Vec<(&str, &str)> = copyright
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix(' ')?.split_once(" v")?;
            let (version, _licence) = rest.split_once(": ")?;
            let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            (name.chars().all(is_name) && version.starts_with(|c: char| c.is_ascii_digit()))
                .then_some((name, version))
        })
        .collect();
    assert!(
        built_in.len() >= 40 && built_in.iter().any(|(name, _)| *name == "mio"),
        "{built_in:?}"
    );
    for (name, version) in &built_in {
        // A label starts a line, or follows "== " or "; " in a list of the crates sharing a
        // text: "core 1.0" must not be found in "rand_core 1.0".
        let named = ["\n ", "== ", "; "]
            .iter()
            .any(|before| copyright.contains(&format!("{before}{name} {version}: ")));
        assert!(
            named,
            "no licence file of {name} {version} in the copyright file"
        );
    }
    let mio = licence_text(&copyright, "mio");
    assert!(mio.contains("Permission is hereby granted"), "{mio}");
    assert!(
        !copyright.contains("TERMS AND CONDITIONS FOR USE, REPRODUCTION"),
        "the Apache License's text in full"
    );

    // Reproducible: the same binaries make the same bytes, built on another file system
    // (/dev/shm, a tmpfs, where there is one) too.
    let shm = Path::new("/dev/shm");
    let again = built_package(&tmp.path().join("two"), shm.is_dir().then_some(shm));
    assert!(
        std::fs::read(&deb).unwrap() == std::fs::read(&again).unwrap(),
        "two builds of the same binaries differ: {} and {}",
        deb.display(),
        again.display()
    );

    if !installed("lintian") {
        skipped("lintian not installed (apt-get install lintian): the package's lint");
        return;
    }
    let out = Command::new("lintian")
        .arg("--pedantic")
        .arg(&deb)
        .output()
        .unwrap();
    let said: Vec<String> = text(&out.stdout)
        .lines()
        .chain(text(&out.stderr).lines())
        .filter(|l| !l.contains("running with root privileges"))
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success() && said.is_empty(),
        "lintian: {said:#?}"
    );
}

/// The licence text a copyright file of the package gives after the crates that ship it, the
/// crate `name` (of any version) among them.
fn licence_text<'a>(copyright: &'a str, name: &str) -> &'a str {
    copyright
        .split("\n == ")
        .find(|text| {
            let shipped_by = text.lines().next().unwrap_or_default();
            shipped_by
                .split("; ")
                .any(|label| label.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no licence text of {name}:\n{copyright}"))
}

/// A cargo home in `home` of links to the real one's registry (`$CARGO_HOME`'s, else
/// ~/.cargo's): its index and cache, and in each of its directories of sources a link to each
/// crate's, so that what cargo unpacks goes to `home`. The links to mio's sources (one a
/// version), for a test to put something else in their place.
fn cargo_home_of_links(home: &Path) -> Vec<PathBuf> {
    let real_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let real = real_home.join("registry");
    let registry = home.join("registry");
    std::fs::create_dir_all(registry.join("src")).unwrap();
    for shared in ["index", "cache"] {
        std::os::unix::fs::symlink(real.join(shared), registry.join(shared)).unwrap();
    }
    let mut mios = Vec::new();
    for index in std::fs::read_dir(real.join("src")).unwrap() {
        let index = index.unwrap().path();
        let ours = registry.join("src").join(index.file_name().unwrap());
        std::fs::create_dir(&ours).unwrap();
        for krate in std::fs::read_dir(&index).unwrap() {
            let krate = krate.unwrap().path();
            let name = krate.file_name().unwrap().to_string_lossy().into_owned();
            let link = ours.join(&name);
            std::os::unix::fs::symlink(&krate, &link).unwrap();
            if name.starts_with("mio-") && name[4..].starts_with(|c: char| c.is_ascii_digit()) {
                mios.push(link);
            }
        }
    }
    assert!(!mios.is_empty(), "no mio in {}", real.display());
    mios
}

/// A copy in `to` of the crate's sources in `from` but for its licence files (LICENSE*): its
/// files copied, its directories linked.
fn copy_but_licences(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap().path();
        let name = file.file_name().unwrap();
        if file.is_dir() {
            std::os::unix::fs::symlink(&file, to.join(name)).unwrap();
        } else if !name.to_string_lossy().starts_with("LICENSE") {
            std::fs::copy(&file, to.join(name)).unwrap();
        }
    }
}

/// `scripts/package-deb --fast` of the test build with the cargo home `home`, into
/// `home`/out.
fn package_deb_with_cargo_home(home: &Path) -> Output {
    let mut cmd = Command::new(repo_root().join("scripts/package-deb"));
    cmd.args(["--no-build", "--fast", "--build-dir"])
        .arg(build_dir())
        .arg("--out")
        .arg(home.join("out"))
        .env("CARGO_HOME", home);
    run_with_deadline(cmd)
}

/// A crate whose licence the package cannot give stops the build with its name: none in its
/// sources, or one that is not UTF-8. The crates come from a cargo home of links to the real
/// registry's, but for mio, a copy whose licence file is taken away, then spoiled.
#[test]
fn package_deb_stops_on_a_crate_whose_licence_it_cannot_give() {
    if !dpkg_tools_installed() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let mios = cargo_home_of_links(home.path());
    for mio in &mios {
        let real = std::fs::read_link(mio).unwrap();
        std::fs::remove_file(mio).unwrap();
        copy_but_licences(&real, mio);
    }
    let package = |what: &str| {
        let out = package_deb_with_cargo_home(home.path());
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out.stderr));
        text(&out.stderr)
    };
    let stderr = package("no licence file");
    assert!(
        stderr.contains("package-deb: the crate mio ") && stderr.contains(" ships no licence file"),
        "{stderr}"
    );
    for mio in &mios {
        std::fs::write(mio.join("LICENSE"), b"Copyright \xe9 Latin-1\n").unwrap();
    }
    let stderr = package("a licence file not in UTF-8");
    assert!(
        stderr.contains("mio-") && stderr.contains("/LICENSE is not UTF-8 text"),
        "{stderr}"
    );
    assert!(
        !home.path().join("out").exists()
            || std::fs::read_dir(home.path().join("out"))
                .unwrap()
                .next()
                .is_none(),
        "a package was made"
    );
}

/// The licence files are read from the sources cargo builds from, as cargo metadata names
/// them: not from another copy of a crate of the same name and version that the directory of
/// another index holds (a mirror's, say), even one listed before cargo's own.
#[test]
fn package_deb_reads_the_licences_of_the_sources_cargo_builds_from() {
    if !dpkg_tools_installed() {
        return;
    }
    const DECOY: &str = "Not mio's licence: a copy of mio in another index's directory.";
    let home = tempfile::tempdir().unwrap();
    let mios = cargo_home_of_links(home.path());
    let src = home.path().join("registry/src");
    let mirror = src.join("10.0.0.1-0123456789abcdef");
    for index in std::fs::read_dir(&src).unwrap() {
        let index = index.unwrap().file_name();
        assert!(
            mirror.file_name().unwrap().as_encoded_bytes() < index.as_encoded_bytes(),
            "{} sorts after {index:?}",
            mirror.display()
        );
    }
    std::fs::create_dir(&mirror).unwrap();
    for mio in &mios {
        let copy = mirror.join(mio.file_name().unwrap());
        copy_but_licences(&std::fs::read_link(mio).unwrap(), &copy);
        std::fs::write(copy.join("LICENSE"), format!("{DECOY}\n")).unwrap();
    }
    let out = package_deb_with_cargo_home(home.path());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    let root = home.path().join("root");
    dpkg_deb(&["-x".as_ref(), deb.as_os_str(), root.as_os_str()]);
    let copyright = std::fs::read_to_string(root.join("usr/share/doc/ocmd/copyright")).unwrap();
    assert!(!copyright.contains(DECOY), "{copyright}");
    // mio's own text, line for line, whichever of its versions is built in.
    let mio = licence_text(&copyright, "mio");
    let own = mios.iter().any(|link| {
        let real = std::fs::read_to_string(std::fs::read_link(link).unwrap().join("LICENSE"));
        real.is_ok_and(|real| {
            real.lines()
                .filter(|line| !line.trim().is_empty())
                .all(|line| mio.lines().any(|l| l == format!(" {}", line.trim_end())))
        })
    });
    assert!(own, "not mio's own licence:\n{mio}");
}

/// Where `program` is on `PATH`, as a shell finds it: the first file of that name that may be
/// run, its path made absolute but its links kept (a rustup proxy is named for its tool).
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let file = std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })?;
    std::path::absolute(file).ok()
}

/// The version of the crate `name` that Cargo.lock locks, which must be the only one.
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap();
    let versions: Vec<&str> = lock
        .split("[[package]]\n")
        .filter_map(|package| {
            let mut lines = package.lines();
            if lines.next()? != format!("name = \"{name}\"") {
                return None;
            }
            lines
                .next()?
                .strip_prefix("version = \"")?
                .strip_suffix('"')
        })
        .collect();
    assert_eq!(versions.len(), 1, "{name} in Cargo.lock: {versions:?}");
    versions[0].to_owned()
}

/// A `cargo` that runs the real one (`$OCM_REAL_CARGO`), but passes the standard output of
/// `cargo metadata` and `cargo tree` through a test's perl code: `@METADATA@` changes
/// `$metadata`, the JSON decoded, and `@TREE@` changes `$_`, the text. Perl with JSON::PP,
/// which the script needs too.
const CARGO_SHIM: &str = r##"#!/usr/bin/env perl
use strict;
use warnings;
use JSON::PP;
my $real = $ENV{OCM_REAL_CARGO} // die "cargo shim: OCM_REAL_CARGO is not set\n";
my $subcommand = $ARGV[0] // "";
if ($subcommand ne "metadata" && $subcommand ne "tree") {
  exec { $real } $real, @ARGV or die "cargo shim: $real: $!\n";
}
open my $cargo, "-|", $real, @ARGV or die "cargo shim: $real: $!\n";
local $_ = do { local $/; <$cargo> };
close $cargo or exit(($? >> 8) || 1);
if ($subcommand eq "metadata") {
  my $metadata = JSON::PP->new->utf8->decode($_);
  @METADATA@
  $_ = JSON::PP->new->utf8->encode($metadata);
} else {
  @TREE@
}
print;
"##;

/// `scripts/package-deb --no-build --fast` of the test build into `dir`/out (made empty
/// first), with [`CARGO_SHIM`] as `cargo`, first on `PATH`, changing what cargo metadata and
/// cargo tree say with the perl code `metadata` and `tree`.
fn package_deb_with_cargo_saying(dir: &Path, metadata: &str, tree: &str) -> Output {
    // Looked up before the shim goes first on PATH.
    let real = on_path("cargo").expect("cargo on PATH");
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let shim = bin.join("cargo");
    std::fs::write(
        &shim,
        CARGO_SHIM
            .replace("@METADATA@", metadata)
            .replace("@TREE@", tree),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path))).unwrap();
    std::fs::create_dir(dir.join("out")).unwrap();
    let mut cmd = Command::new(repo_root().join("scripts/package-deb"));
    cmd.args(["--no-build", "--fast", "--build-dir"])
        .arg(build_dir())
        .arg("--out")
        .arg(dir.join("out"))
        .env("PATH", path)
        .env("OCM_REAL_CARGO", real);
    run_with_deadline(cmd)
}

/// The platform cargo builds for by default (`cargo -vV`'s `host:`).
fn cargo_host() -> String {
    let version = Command::new("cargo").arg("-vV").output().unwrap();
    text(&version.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .expect("cargo -vV names the host")
}

/// Checks that package-deb refused: its `fail` exit status (1), `message` its last word on
/// standard error, no package's path printed and nothing left in `dir`/out.
fn assert_package_deb_refused(out: &Output, dir: &Path, message: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().last(), Some(message), "{stderr}");
    assert_eq!(text(&out.stdout), "");
    let left: Vec<_> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a package was made: {left:?}");
}

/// A crate cargo tree names but cargo metadata does not list (mio, taken out of its JSON)
/// stops the build, named with its version, before a package is made.
#[test]
fn package_deb_stops_on_a_crate_cargo_metadata_does_not_list() {
    if !dpkg_tools_installed() {
        return;
    }
    let host = cargo_host();
    let dir = tempfile::tempdir().unwrap();
    let out = package_deb_with_cargo_saying(
        dir.path(),
        r#"$metadata->{packages} = [grep { $_->{name} ne "mio" } @{ $metadata->{packages} }];"#,
        "",
    );
    let mio = locked_version("mio");
    assert_package_deb_refused(
        &out,
        dir.path(),
        &format!(
            "package-deb: cargo metadata (for {host}) lists no package of the crate mio {mio} \
             that cargo tree names, for its licence"
        ),
    );
}

/// A crate from outside crates.io (mio, from a git repository as cargo tree and cargo metadata
/// are made to say) of which cargo metadata lists two packages, from two repositories, stops
/// the build: which one's licence goes with the binaries is not known.
#[test]
fn package_deb_stops_on_a_crate_from_two_sources_outside_crates_io() {
    if !dpkg_tools_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = package_deb_with_cargo_saying(
        dir.path(),
        r#"$metadata->{packages} = [map {
    my $package = $_;
    $package->{name} ne "mio" ? $package : map {
      my $source = "git+$_?tag=v$package->{version}#0123456789abcdef0123456789abcdef01234567";
      +{ %$package, id => "$source#mio\@$package->{version}", source => $source };
    } "https://github.com/tokio-rs/mio", "https://example.org/a-fork-of/mio";
  } @{ $metadata->{packages} }];"#,
        r#"s{^mio v(\S+):}{mio v$1 (https://github.com/tokio-rs/mio?tag=v$1#01234567):}mg;"#,
    );
    let (host, mio) = (cargo_host(), locked_version("mio"));
    assert_package_deb_refused(
        &out,
        dir.path(),
        &format!(
            "package-deb: cargo metadata (for {host}) lists 2 packages of the crate mio {mio} \
             not from crates.io: which one is built in is not known, for its licence"
        ),
    );
}

#[test]
fn package_deb_says_how_it_is_used() {
    let out = package_deb(&["--help"]);
    assert!(out.status.success());
    for flag in ["--build-dir", "--no-build", "--out", "--fast"] {
        assert!(text(&out.stdout).contains(flag), "--help lacks {flag}");
    }
    let out = package_deb(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown argument: --frobnicate"));
    // A hyphen would start a Debian revision, which a native package has none of.
    let out = package_deb(&["--no-build", "--version", "1.0-1"]);
    if installed("dpkg-shlibdeps") {
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains("not a version for this package: '1.0-1'"),
            "{}",
            text(&out.stderr)
        );
    }
    // A build directory without the programs: nothing is made, and the reason is given.
    let tmp = tempfile::tempdir().unwrap();
    let out = package_deb(&[
        "--no-build".as_ref(),
        "--build-dir".as_ref(),
        tmp.path().as_os_str(),
        "--out".as_ref(),
        tmp.path().join("out").as_os_str(),
    ]);
    let stderr = text(&out.stderr);
    if !installed("dpkg-shlibdeps") {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ocmd is missing"), "{stderr}");
    assert!(!tmp.path().join("out").exists());
}

/// The variable and file that switch [`file_fsync_failer`] on.
const FAIL_FILE_FSYNC: (&str, &str) = ("OCM_TEST_FAIL_FILE_FSYNC", "fail-file-fsync");

/// An `fsync` of a regular file that fails while [`FAIL_FILE_FSYNC`]'s file exists: the state
/// file cannot be written (its temporary file's `fsync`), while the journal's `fdatasync` and
/// the directories' `fsync` go through.
fn file_fsync_failer(dir: &Path) -> PathBuf {
    sync_stub(
        dir,
        "fsync",
        FAIL_FILE_FSYNC.0,
        SyncStub::Fail {
            regular_files_only: true,
        },
    )
}

/// A compaction that keeps failing (the state file cannot be written: a full disk) is retried
/// with the first journal write at least 5 s later; the log says so at the first failure, not
/// at every retry (an error every 5 s for as long as the disk stays full), and says when a
/// compaction works again.
#[test]
fn a_compaction_that_keeps_failing_is_logged_once_and_so_is_its_recovery() {
    let (d, fail, _library) = spawn_preloaded(
        file_fsync_failer,
        FAIL_FILE_FSYNC,
        Options {
            metrics: true,
            // Every append is past the threshold: a compaction is due at each one.
            ..configured("[state]\ncompact_journal_bytes = 1\n")
        },
    );
    std::fs::write(&fail, b"").unwrap();
    // Creates keep coming, so that every retry that is due is made.
    let mut n = 0;
    let mut create_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            create(&d, &format!("r{n}"), "alice");
            n += 1;
            thread::sleep(Duration::from_millis(100));
        }
    };
    create_until("two failed compactions", &|| {
        d.metric("ocm_state_compaction_failures_total") >= 2.0
    });
    std::fs::remove_file(&fail).unwrap();
    create_until("a compaction that works again", &|| {
        d.log().contains("compaction works again")
    });
    let log = d.log();
    let errors = log
        .lines()
        .filter(|l| l.contains("compaction failed after"))
        .count();
    assert_eq!(
        errors, 1,
        "one line for the failure, not one a retry:\n{log}"
    );
    let recovered = line_with(&log, "compaction works again");
    assert!(
        recovered.contains("WARN") && recovered.contains("2 failed attempts"),
        "{recovered}"
    );
}

/// A journal moved from its name and a copy of it put back (`mv`, then `cp`) is replaced as a
/// deleted one is, the state file written from memory; the copy at the name is emptied only
/// once the state file holds its records, for until then it is the one place a start would
/// find them. Here the state file cannot be written for a while (its `fsync` fails): the copy
/// must still be whole then, and once the state file is written it must hold every join.
#[test]
fn a_copy_of_the_journal_put_back_at_its_name_is_kept_until_the_state_file_holds_it() {
    let (d, fail, _library) = spawn_preloaded(file_fsync_failer, FAIL_FILE_FSYNC, metrics_on());
    let tokens = [create(&d, "copied", "alice"), join(&d, "copied", "bob")];
    let journal = d.dir.path().join("room_manager.json.journal");
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::write(&fail, b"").unwrap();
    std::fs::rename(&journal, &elsewhere).unwrap();
    std::fs::copy(&elsewhere, &journal).unwrap();
    let copy = std::fs::read(&journal).unwrap();
    assert!(
        tokens.iter().all(|t| text(&copy).contains(t.as_str())),
        "the copy holds both joins"
    );
    d.wait_for_log("is no longer the file at its name");
    // The first write to fail: the state file's, or a fresh journal's (emptied, then synced).
    wait_until("a write that failed", || {
        d.metric("ocm_state_compaction_failures_total") + d.metric("ocm_state_write_failures_total")
            >= 1.0
    });
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        copy,
        "the copy at the journal's name was changed before the state file held its records"
    );
    std::fs::remove_file(&fail).unwrap();
    d.wait_for_log("replaced and state file");
    let state = std::fs::read(&d.state).unwrap();
    for token in &tokens {
        assert!(
            text(&state).contains(token.as_str()),
            "{token} not in the state file"
        );
    }
    let fresh = std::fs::read(&journal).unwrap();
    assert!(
        fresh.iter().all(|&b| b == 0),
        "the journal at the name is a fresh one once the state file is written: {:?}",
        text(&fresh)
    );
}

/// A state file that is a symbolic link (to put the state on another disk) is refused at
/// start, with the link and its target named. It used to be taken: the first snapshot was
/// renamed over the link, so the state silently moved beside the link (the target kept a
/// stale copy, and its backups with it), and the lock beside the link did not keep a second
/// `ocmd` started on the target itself off the same state.
#[test]
fn a_state_file_that_is_a_symbolic_link_is_refused() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let target = data.join("room_manager.json");
    let state = br#"{"rooms": {}, "tokens": {}}"#;
    std::fs::write(&target, state).unwrap();
    let link = dir.path().join("room_manager.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // `--check-config` says so too, as the operator's check before a restart.
    let out = check_config_state(&link);
    let err = assert_exit_code(&out, 2);
    assert!(
        err.contains("symbolic link") && err.contains(&target.display().to_string()),
        "{err}"
    );
    let log = refused_start(Arc::clone(&dir), Options::default());
    assert!(
        log.contains("symbolic link")
            && log.contains(&link.display().to_string())
            && log.contains(&target.display().to_string()),
        "{log}"
    );
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), state);
}

/// A state file or journal with a second name (a hard link) is refused at start, by
/// `--check-config` too, with the file named; a daemon already serving when the link is made
/// says so at its next file check. Before, a second `ocmd` started on the other name took a
/// lock of its own (the lock is the name given plus `.lock`), so both daemons wrote the same
/// file.
#[test]
fn a_state_file_or_journal_with_a_second_name_is_refused() {
    let first_dir = Arc::new(tempfile::tempdir().unwrap());
    let state = first_dir.path().join("room_manager.json");
    std::fs::write(&state, br#"{"rooms": {}, "tokens": {}}"#).unwrap();
    let first = Daemon::spawn(Arc::clone(&first_dir), Options::default()).expect("ocmd starts");
    create(&first, "lobby", "alice");
    for file in ["room_manager.json", "room_manager.json.journal"] {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let other = dir.path().join(file);
        std::fs::hard_link(first_dir.path().join(file), &other).unwrap();
        let out = check_config_state(&dir.path().join("room_manager.json"));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(
            err.contains("hard link") && err.contains(&other.display().to_string()),
            "{file}: {err}"
        );
        let log = refused_start(Arc::clone(&dir), Options::default());
        assert!(
            log.contains("hard link") && log.contains(&other.display().to_string()),
            "{file}: {log}"
        );
        // The daemon serving the first name sees the second at its next check.
        let named = first_dir.path().join(file);
        first.wait_for_log(&format!("{} has 2 names", named.display()));
        std::fs::remove_file(&other).unwrap();
    }
    // It serves on, its state whole.
    join(&first, "lobby", "bob");
}

/// A state path that is a directory (`--state /var/lib/ocmd`, a directory for a file), or a
/// journal that is a socket, is refused at start and by `--check-config`, saying what it
/// is. A directory was called a state file with "2 names (hard links)", with advice to look
/// for them (found by an operator's review).
#[test]
fn a_state_path_that_is_not_a_file_is_refused_saying_what_it_is() {
    for (file, kind) in [
        ("room_manager.json", "a directory"),
        ("room_manager.json.journal", "a socket"),
    ] {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().join(file);
        let _socket = if kind == "a directory" {
            std::fs::create_dir(&path).unwrap();
            None
        } else {
            Some(std::os::unix::net::UnixListener::bind(&path).unwrap())
        };
        let out = check_config_state(&dir.path().join("room_manager.json"));
        let err = text(&out.stderr);
        let said = format!("{} is {kind}, not a file", path.display());
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(&said) && !err.contains("hard link"), "{err}");
        let log = refused_start(Arc::clone(&dir), Options::default());
        assert!(log.contains(&said) && !log.contains("hard link"), "{log}");
    }
}

/// A state path in a directory that does not exist stops the start (status 1: a mount that
/// is late may be there at the next try) naming the directory as missing: it said only
/// `cannot write …lock: No such file or directory` (found by an operator's review).
#[test]
fn a_state_directory_that_does_not_exist_is_named_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-made");
    let out = ocmd(&[
        "--state".as_ref(),
        missing.join("room_manager.json").as_os_str(),
        "--tcp".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--udp".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--metrics".as_ref(),
        "off".as_ref(),
    ]);
    let err = assert_exit_code(&out, 1);
    assert!(
        err.contains(&format!(
            "state directory {} does not exist",
            missing.display()
        )),
        "{err}"
    );
    assert!(!missing.exists(), "ocmd made no directory");
}

/// A hard link made to the state file or the journal while the daemon serves makes `/readyz`
/// 503, naming the file and its count of names, from the writer's next check until the other
/// name is removed; then it is ready again. It was only logged, so a check that takes a
/// daemon out of rotation, or an alert on `/readyz`, never saw it.
#[test]
fn readyz_says_a_state_file_or_journal_has_a_second_name_while_it_has() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(
        dir.path().join("room_manager.json"),
        br#"{"rooms": {}, "tokens": {}}"#,
    )
    .unwrap();
    let d = Daemon::spawn(dir, metrics_on()).expect("ocmd starts");
    create(&d, "lobby", "alice");
    assert_eq!(d.http_get("/readyz"), "ready\n");
    for (what, file) in [
        ("state file", "room_manager.json"),
        ("journal", "room_manager.json.journal"),
    ] {
        let named = d.dir.path().join(file);
        let other = d.dir.path().join(format!("copy of {file}"));
        std::fs::hard_link(&named, &other).unwrap();
        // The writer checks once a second.
        wait_until(&format!("/readyz to name the {what}'s second name"), || {
            d.http_answer("/readyz").0 != "HTTP/1.1 200 OK"
        });
        let answer = d.http_answer("/readyz");
        assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
        assert_eq!(
            answer.1,
            format!(
                "not ready: the {what} {} has 2 names (hard links): a second ocmd started on \
                 another name would take a lock of its own and both would write the same file; \
                 remove the other names (the log says more)\n",
                named.display()
            ),
            "{what}"
        );
        std::fs::remove_file(&other).unwrap();
        wait_until(
            &format!("/readyz to be ready once the {what} has one name"),
            || d.http_answer("/readyz").0 == "HTTP/1.1 200 OK",
        );
        d.wait_for_log(&format!("{what} {} has one name again", named.display()));
    }
    // Both at once: each is named.
    let links: Vec<PathBuf> = ["room_manager.json", "room_manager.json.journal"]
        .iter()
        .map(|file| {
            let other = d.dir.path().join(format!("copy of {file}"));
            std::fs::hard_link(d.dir.path().join(file), &other).unwrap();
            other
        })
        .collect();
    wait_until("/readyz to name both files", || {
        let body = d.http_answer("/readyz").1;
        body.contains("the state file ") && body.contains(" and the journal ")
    });
    for other in links {
        std::fs::remove_file(other).unwrap();
    }
    wait_until("/readyz to be ready again", || {
        d.http_answer("/readyz").0 == "HTTP/1.1 200 OK"
    });
    join(&d, "lobby", "bob");
}

/// A create or join refused because a registry cap is reached (`server_full`) is said at warn,
/// naming the cap, once a minute at most: it was logged only at debug, so at the default
/// level an operator whose users were all turned away saw nothing in the log (the connection
/// caps, by contrast, are warned about).
#[test]
fn server_full_is_warned_about_with_the_cap_reached() {
    let d = Daemon::start_with(Options {
        env: vec![("RUST_LOG".into(), "info".into())],
        ..configured("[limits]\nmax_rooms = 2\n")
    });
    create(&d, "a", "alice");
    create(&d, "b", "bob");
    for n in 0..5 {
        let r = request(&d, Operation::CreateRoom, &format!("c{n}"), b"\"carol\"");
        assert_eq!(refused(&r), Some(ErrorCode::ServerFull));
    }
    d.wait_for_log("server_full");
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("server_full")).collect();
    assert_eq!(lines.len(), 1, "once, not once a refusal:\n{log}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("limits.max_rooms (2)"),
        "{}",
        lines[0]
    );
}

/// `--check-config` into a reader that stopped early (`| grep -q …`, `| head -0`, `| true`)
/// still reports the check: it panicked on the broken pipe ("failed printing to stdout"),
/// with a backtrace and exit status 101, which a script under `set -o pipefail` read as a
/// bad configuration of an unknown kind.
#[test]
fn check_config_into_a_pipe_closed_early_still_says_ok() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let (status, err) = check_config_with_stdout(Stdio::from(writer));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("ocmd: configuration OK") && !err.contains("panicked"),
        "{err}"
    );
}

/// Runs `ocmd --check-config` with the embedded defaults and standard output `stdout`;
/// its exit status and what it wrote to standard error.
fn check_config_with_stdout(stdout: Stdio) -> (std::process::ExitStatus, String) {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ocmd"))
            .arg("--check-config")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ocmd"),
    );
    let status = wait_for_exit(&mut child.0, "ocmd --check-config");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .expect("piped standard error")
        .read_to_string(&mut err)
        .expect("read standard error");
    (status, err)
}

/// While the journal cannot be written, the `STATUS=` line that `systemctl status` shows
/// says so, and goes back to normal once it can: it said "1 room, 1 member …" all along,
/// while every create and join waited for the disk.
#[test]
fn status_says_when_the_journal_cannot_be_written() {
    let mut sd = NotifyListener::bind();
    let (d, fail, _library) = spawn_preloaded(
        fdatasync_failer,
        FAIL_FDATASYNC,
        Options {
            env: sd.env_with_watchdog_usec("0"),
            ..metrics_on()
        },
    );
    create(&d, "before", "alice");
    std::fs::write(&fail, b"").unwrap();
    while_a_create_waits_for_the_disk(&d, &fail, || {
        // STATUS= comes every 5 s.
        let status = sd.wait_for(Duration::from_secs(15), |m| {
            m.starts_with("STATUS=") && m.contains("journal")
        });
        assert!(
            status.contains("the journal cannot be written") && status.contains("wait"),
            "{status}"
        );
    });
    let status = sd.wait_for(Duration::from_secs(15), |m| {
        m.starts_with("STATUS=") && !m.contains("journal")
    });
    assert!(status.starts_with("STATUS=2 rooms, 2 members"), "{status}");
}

/// `/readyz` answers 503 once creates and joins have waited more than 5 s for a journal the
/// disk does not take, while `/healthz` (the loop runs) stays 200; both are 200 again once
/// the disk takes the journal.
#[test]
fn readyz_says_when_creates_and_joins_wait_for_the_disk() {
    let (d, fail, _library) = spawn_preloaded(fdatasync_failer, FAIL_FDATASYNC, metrics_on());
    let addr = d.metrics.expect("metrics on");
    assert_eq!(readyz_over_http_1_0(addr).0, "HTTP/1.1 200 OK");
    assert_eq!(d.http_get("/readyz"), "ready\n");
    create(&d, "before", "alice");
    std::fs::write(&fail, b"").unwrap();
    // Before the create: the daemon's wait starts no sooner.
    let started = Instant::now();
    while_a_create_waits_for_the_disk(&d, &fail, || {
        wait_until("/readyz to say not ready", || {
            readyz_over_http_1_0(addr).0 != "HTTP/1.1 200 OK"
        });
        assert!(
            started.elapsed() > Duration::from_secs(5),
            "not ready after {:?}, under the 5 s a batch may wait",
            started.elapsed()
        );
        let answer = readyz_over_http_1_0(addr);
        assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
        assert!(
            answer
                .1
                .starts_with("not ready: the journal has taken no write for ")
                && answer.1.contains("creates and joins wait"),
            "{answer:?}"
        );
        assert_eq!(d.http_get("/healthz"), "ok\n", "the loop runs all along");
    });
    assert_eq!(d.http_get("/readyz"), "ready\n");
    assert!(d.metric("ocm_http_responses_total{code=\"503\"}") >= 1.0);
}

/// `/readyz` says not ready as soon as the writer finds the state's files gone and cannot
/// write them again (here their directory removed while the daemon is idle), not only once a
/// create or join has waited 5 s for them; and ready again once they are back.
#[test]
fn readyz_says_not_ready_while_the_state_directory_is_gone() {
    let d = Daemon::start_with(metrics_on());
    create(&d, "gone", "alice");
    assert_eq!(d.http_get("/readyz"), "ready\n");
    let dir = d.dir.path().to_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    d.wait_for_log("cannot open a fresh journal");
    let addr = d.metrics.expect("metrics on");
    let answer = readyz_over_http_1_0(addr);
    assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
    assert!(
        answer
            .1
            .starts_with("not ready: the state's files were deleted while in use"),
        "{answer:?}"
    );
    std::fs::create_dir(&dir).unwrap();
    d.wait_for_log("written again from memory");
    assert_eq!(d.http_get("/readyz"), "ready\n");
}

/// A `--metrics` value that is not an address is refused as a bad `--metrics`, as `--tcp` and
/// `--udp` are: it was reported as `listen.metrics: …`, a key of a file the operator may not
/// have, with nothing naming the flag actually given.
#[test]
fn a_bad_metrics_flag_is_named_as_the_flag() {
    let out = ocmd(&["--check-config", "--metrics", "garbage"]);
    let err = assert_exit_code(&out, 2);
    assert!(
        err.contains("'--metrics <ADDR:PORT|off>'") && err.contains("\"garbage\""),
        "{err}"
    );
    // Every spelling of "off" still works.
    for off in ["off", "none", "false", ""] {
        let out = ocmd(&["--check-config", "--metrics", off]);
        assert_eq!(out.status.code(), Some(0), "{off:?}: {}", text(&out.stderr));
    }
}

// ---------------------------------------------------------------------------------------------
// The listen backlog

/// The backlog of the listening TCP socket bound to `addr` as the kernel reports it (`ss
/// -ltn` shows a listener's backlog as its Send-Q), or `None` when `ss` is not installed.
fn listen_backlog(addr: SocketAddr) -> Option<u64> {
    if !installed("ss") {
        return None;
    }
    let out = Command::new("ss")
        .args(["-ltn", "sport", "=", &format!(":{}", addr.port())])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    // State, Recv-Q, Send-Q, local address, peer address.
    let backlog = listing.lines().find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        match columns[..] {
            ["LISTEN", _, send_q, local, ..] if local == addr.to_string() => send_q.parse().ok(),
            _ => None,
        }
    });
    Some(backlog.unwrap_or_else(|| panic!("{addr} is not listed by ss -ltn:\n{listing}")))
}

/// `net.core.somaxconn`, the kernel's cap on a listen backlog.
fn somaxconn() -> u64 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read net.core.somaxconn")
        .trim()
        .parse()
        .expect("a number")
}

/// The TCRP listener's backlog is `limits.listen_backlog` (4096), as far as
/// `net.core.somaxconn` allows, and a reload changes it. mio binds with 128: under a flood of
/// connections, clients past it had their SYN dropped and connected ~1 s later, after its
/// retransmit.
#[test]
fn the_tcp_listen_backlog_is_limits_listen_backlog_and_a_reload_changes_it() {
    let cap = somaxconn();
    if cap <= 128 {
        skipped(&format!(
            "net.core.somaxconn is {cap}: a backlog of 4096 cannot be told from mio's 128"
        ));
        return;
    }
    let d = Daemon::start_with(configured(""));
    let Some(backlog) = listen_backlog(d.tcp) else {
        skipped("ss is not installed (apt-get install iproute2): the listen backlog");
        return;
    };
    assert_eq!(backlog, cap.min(4096), "somaxconn {cap}");
    // Below the default and the kernel's cap, so that a reload that did nothing shows.
    let lower = cap.min(4096) / 2;
    d.reload(&format!("[limits]\nlisten_backlog = {lower}\n"));
    assert_eq!(listen_backlog(d.tcp), Some(lower));
    // Still the same listener, serving.
    create(&d, "after-the-reload", "host");
    // More than the kernel allows: taken as its cap, and said.
    if cap < i32::MAX as u64 {
        d.reload(&format!("[limits]\nlisten_backlog = {}\n", cap + 1));
        assert_eq!(listen_backlog(d.tcp), Some(cap));
        d.wait_for_log("TCP listen backlog: limits.listen_backlog asks for");
    }
}

/// Sets `net.core.somaxconn` in the calling thread's network namespace; whether it could.
fn set_somaxconn(cap: u32) -> bool {
    std::fs::write("/proc/sys/net/core/somaxconn", format!("{cap}\n")).is_ok()
}

/// A TCRP backlog the kernel capped at start (`net.core.somaxconn` below
/// `limits.listen_backlog`) is what was asked for once the sysctl is raised and the daemon
/// reloaded, the file unchanged, as docs/OPERATIONS.md tells the operator to do. The kernel
/// reads the cap at listen(2), and a reload asked again only when `listen_backlog` changed:
/// the backlog stayed capped until a restart.
#[test]
fn a_listen_backlog_capped_at_start_is_asked_for_again_at_a_reload_once_somaxconn_allows_it() {
    in_private_network(|| {
        // In this namespace only: the host's sysctl is left alone.
        if !set_somaxconn(64) {
            skipped("cannot set net.core.somaxconn in a network namespace of our own");
            return;
        }
        let config = "[limits]\nlisten_backlog = 1000\n";
        let d = Daemon::start_with(configured(config));
        let Some(backlog) = listen_backlog(d.tcp) else {
            skipped("ss is not installed (apt-get install iproute2): the listen backlog");
            return;
        };
        assert_eq!(backlog, 64);
        d.wait_for_log("limits.listen_backlog asks for 1000, the kernel allows 64");
        assert!(set_somaxconn(4096), "net.core.somaxconn set once already");
        d.reload(config);
        assert_eq!(listen_backlog(d.tcp), Some(1000), "{}", d.log());
        create(&d, "after-the-reload", "host");
    });
}

/// The metrics listener's backlog is a deliberate 64 (four full allowances of metrics
/// connections), not mio's 128, and `limits.listen_backlog`, sized for floods of handshake
/// connections, does not change it.
#[test]
fn the_metrics_listen_backlog_is_64_whatever_limits_listen_backlog_says() {
    let cap = somaxconn();
    if cap < 64 {
        skipped(&format!(
            "net.core.somaxconn is {cap}: a backlog of 64 cannot be told from the kernel's cap"
        ));
        return;
    }
    let d = Daemon::start_with(Options {
        metrics: true,
        ..configured("[limits]\nlisten_backlog = 100\n")
    });
    let metrics = d.metrics.expect("metrics on");
    let Some(backlog) = listen_backlog(metrics) else {
        skipped("ss is not installed (apt-get install iproute2): the listen backlog");
        return;
    };
    assert_eq!(backlog, 64);
    assert_eq!(listen_backlog(d.tcp), Some(cap.min(100)));
    d.reload("[limits]\nlisten_backlog = 50\n");
    assert_eq!(listen_backlog(metrics), Some(64));
    assert_eq!(d.http_get("/healthz"), "ok\n");
}

// ---------------------------------------------------------------------------------------------
// `ocmd` itself: --help and --version, --check-config's output, journald's stream
// (the mutation testing of main.rs, docs/SECURITY.md)

/// `--help` and `--version` are answers, not errors: on standard output, status 0, as
/// clap's own handling does (`ocmd --version | head -1` in a script). A usage error is the
/// other kind: on standard error, status 2, nothing on standard output.
#[test]
fn help_and_version_are_printed_on_standard_output_with_status_0() {
    let out = ocmd(&["--help"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "--help: {stderr}");
    assert!(
        stdout.contains("--check-config") && stderr.is_empty(),
        "--help:\n{stdout}\nstandard error:\n{stderr}"
    );
    // What no flag shows: the signals and socket activation.
    for told in ["SIGHUP", "SIGUSR1", "STATE.backup", "SIGTERM", "LISTEN_FDS"] {
        assert!(
            stdout.contains(told),
            "--help does not mention {told}:\n{stdout}"
        );
    }
    let out = ocmd(&["--version"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "--version: {stderr}");
    assert_eq!(stdout, format!("ocmd {}\n", env!("CARGO_PKG_VERSION")));
    assert!(stderr.is_empty(), "--version: {stderr}");
    let out = ocmd(&["--no-such-flag"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        out.stdout.is_empty() && stderr.starts_with("ocmd: "),
        "{stderr}"
    );
}

/// `--check-config` whose settings cannot be written (standard output a full disk, here
/// `/dev/full`) says so and exits 1: only a reader that stopped early (a broken pipe) lets
/// the check pass without them.
#[test]
fn check_config_whose_settings_cannot_be_written_says_so_and_fails() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let (status, err) = check_config_with_stdout(Stdio::from(full));
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "ocmd: configuration OK, but it cannot be written to standard output: \
         No space left on device (os error 28)\n"
    );
}

/// A `JOURNAL_STREAM` is journald's only when both its device and its inode are standard
/// error's: one inherited from a parent names another stream, which may be on the same
/// device (another pipe) or have the same inode number on another device. Either way the
/// lines are plain, with no `<N>` priority.
#[test]
fn a_journal_stream_with_only_the_device_or_only_the_inode_of_standard_error_is_not_journald() {
    for (what, other_device, other_inode) in [("the device", 0, 1), ("the inode", 1, 0)] {
        let (mut reader, writer, dev_ino) = stderr_pipe();
        let (dev, ino) = dev_ino.split_once(':').expect("dev:ino");
        let dev: u64 = dev.parse().expect("a device number");
        let ino: u64 = ino.parse().expect("an inode number");
        let stream = format!("{}:{}", dev + other_device, ino + other_inode);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocmd"));
        cmd.args(["--tcp", "nonsense"])
            .env("JOURNAL_STREAM", &stream)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(writer);
        let mut child = KillOnDrop(cmd.spawn().expect("spawn ocmd"));
        // Our copy of the writing end, or the reader would never see the end.
        drop(cmd);
        let status = wait_for_exit(&mut child.0, "ocmd --tcp nonsense");
        let mut err = String::new();
        reader
            .read_to_string(&mut err)
            .expect("read standard error");
        assert_eq!(status.code(), Some(2), "{what}: {err}");
        assert!(
            err.starts_with("ocmd: ") && !err.contains("<3>"),
            "only {what} of standard error ({dev_ino}) in JOURNAL_STREAM={stream}: {err}"
        );
    }
}

/// A soft open-file limit below what `limits.max_connections` needs, under a hard limit that
/// fits them, is raised and leaves the connection cap whole: nothing is said about a lower
/// cap, and a second idle connection does not close the first to make room.
#[test]
fn a_soft_open_file_limit_raised_to_fit_leaves_the_connection_cap_whole() {
    let toml = "[limits]\nmax_connections = 100\nhandshake_timeout_secs = 60\n";
    let d = spawn_with_open_files(64, 4096, toml);
    assert!(!d.log.contains("handshake connections"), "{}", d.log);
    let mut first = TcpStream::connect(d.tcp).unwrap();
    // The create, on a second connection.
    let reply = request_at(d.tcp, Operation::CreateRoom, "r", "alice");
    assert!(reply.token.is_some(), "{reply:?}");
    // A connection closed to make room would have been closed before the second was read.
    first.set_nonblocking(true).unwrap();
    match first.read(&mut [0; 1]) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the first connection was closed: {other:?}"),
    }
}

/// A hard open-file limit equal to `limits.max_connections` (4096 against the default 4096 on
/// some systems) falls short only by the daemon's spare descriptors: the lowered cap is said
/// at level info, not as a warning at every start.
#[test]
fn a_hard_open_file_limit_equal_to_max_connections_is_said_at_info_not_warned() {
    let d = spawn_with_open_files(200, 200, "[limits]\nmax_connections = 200\n");
    let line = line_with(&d.log, "open files");
    assert!(
        line.contains("INFO") && line.contains("limits.max_connections = 200 is taken as 120"),
        "{line}"
    );
}

/// Only a listen backlog the kernel caps is warned about: the TCRP listener's
/// `limits.listen_backlog` and the metrics listener's 64, granted whole under
/// `net.core.somaxconn`, are not; the metrics listener's capped by it is, with the sysctl to
/// raise.
#[test]
fn only_a_listen_backlog_the_kernel_caps_is_warned_about() {
    in_private_network(|| {
        // In this namespace only: the host's sysctl is left alone.
        if !set_somaxconn(100) {
            skipped("cannot set net.core.somaxconn in a network namespace of our own");
            return;
        }
        let granted = Daemon::start_with(Options {
            metrics: true,
            ..configured("[limits]\nlisten_backlog = 100\n")
        });
        let log = granted.log();
        assert!(log.contains("listening tcp="), "{log}");
        assert!(!log.contains("asks for"), "{log}");
        assert!(set_somaxconn(32), "net.core.somaxconn set once already");
        let capped = Daemon::start_with(Options {
            metrics: true,
            ..configured("[limits]\nlisten_backlog = 32\n")
        });
        capped.wait_for_log(
            "metrics listen backlog: ocmd asks for 64, the kernel allows 32 (net.core.somaxconn \
             caps it); raise net.core.somaxconn to at least 64",
        );
        assert!(
            !capped.log().contains("limits.listen_backlog asks for"),
            "{}",
            capped.log()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Socket activation

/// Sockets bound by the test, as a systemd socket unit binds them, and handed to each `ocmd`
/// started with them at descriptors 3, 4 and 5 with `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES`. The test keeps them open across a daemon's restart, as systemd does.
struct SocketUnit {
    udp: UdpSocket,
    tcp: std::net::TcpListener,
    metrics: std::net::TcpListener,
    dir: tempfile::TempDir,
    starts: usize,
}

impl SocketUnit {
    fn bind() -> SocketUnit {
        SocketUnit {
            udp: UdpSocket::bind("127.0.0.1:0").expect("a UDP socket"),
            tcp: std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP listener"),
            metrics: std::net::TcpListener::bind("127.0.0.1:0").expect("a metrics listener"),
            dir: tempfile::tempdir().expect("a state directory"),
            starts: 0,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("room_manager.json")
    }

    /// Starts `ocmd` with the three sockets passed (the UDP socket and the TCRP listener
    /// named after their unit, as one socket unit names them; the metrics listener named
    /// `metrics`, as its own unit would), `--tcp` and `--udp` pointing elsewhere (a passed
    /// socket wins), its log in a file of its own; returns it and the log's path.
    fn start(&mut self) -> (KillOnDrop, PathBuf) {
        self.starts += 1;
        let log = self.dir.path().join(format!("ocmd-{}.log", self.starts));
        let config = self.dir.path().join("ocmd.toml");
        std::fs::write(
            &config,
            format!("[udp]\nrecv_buffer_bytes = {UNIT_RECV_BUFFER}\n"),
        )
        .unwrap();
        let mut args = vec![OsString::from("--config"), config.into()];
        args.extend(["--state".into(), self.state().into()]);
        args.extend(["--tcp", "127.0.0.1:1", "--udp", "127.0.0.1:1"].map(OsString::from));
        let child = spawn_passing(
            &[
                (self.udp.as_raw_fd(), "ocmd.socket"),
                (self.tcp.as_raw_fd(), "ocmd.socket"),
                (self.metrics.as_raw_fd(), "metrics"),
            ],
            &args,
            &log,
        );
        wait_until("ocmd listening", || {
            read_log(&log).contains("listening tcp=")
        });
        (child, log)
    }
}

/// Starts `ocmd` with `args`, its log in `log`, with `passed` (descriptors and their names)
/// at descriptors 3, 4, … and `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` set, as systemd
/// passes a socket unit's sockets: `LISTEN_PID` must be the daemon's own pid, so a shell
/// sets it and execs `ocmd` in its place.
fn spawn_passing(passed: &[(RawFd, &str)], args: &[OsString], log: &Path) -> KillOnDrop {
    // Out of the way of 3, 4, … (a dup2 onto itself would keep close-on-exec), and closed at
    // exec: only their copies there are passed.
    let high: Vec<OwnedFd> = passed
        .iter()
        .map(|&(fd, _)| {
            let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
            assert!(copy >= 100, "F_DUPFD_CLOEXEC");
            unsafe { OwnedFd::from_raw_fd(copy) }
        })
        .collect();
    let sources: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let names: Vec<&str> = passed.iter().map(|&(_, name)| name).collect();
    let mut command = Command::new("sh");
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_ocmd"))
        .args(args)
        .env("LISTEN_FDS", passed.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"));
    // SAFETY: dup2(2) only, which is async-signal-safe, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            for (target, &source) in (3..).zip(&sources) {
                if libc::dup2(source, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    KillOnDrop(command.spawn().expect("ocmd starts"))
}

/// `[udp] recv_buffer_bytes` for the daemons [`SocketUnit`] starts: small, so that a passed
/// socket's larger buffer fits under any host's `net.core.rmem_max`.
const UNIT_RECV_BUFFER: libc::c_int = 32 * 1024;

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Sends SIGTERM to `ocmd` and checks that it stopped cleanly.
fn terminate(child: &mut KillOnDrop) {
    let rc = unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_for_exit(&mut child.0, "ocmd after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// With sockets passed by systemd, `ocmd` serves on them rather than binding its own (the
/// configuration's addresses are moot), and what comes while it restarts waits in them: a
/// chat sent while no daemon runs is relayed by the next one, and a join asked for then is
/// answered by it.
#[test]
fn sockets_passed_by_systemd_are_served_and_hold_what_comes_during_a_restart() {
    let mut unit = SocketUnit::bind();
    let tcp = unit.tcp.local_addr().unwrap();
    let udp = unit.udp.local_addr().unwrap();
    let metrics = unit.metrics.local_addr().unwrap();
    // A receive buffer the socket unit made larger than the configuration asks for stays.
    let fd = unit.udp.as_raw_fd();
    let set = 4 * UNIT_RECV_BUFFER;
    ocm_server::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, set).unwrap();
    let unit_buffer = ocm_server::sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
    let (mut first, log) = unit.start();
    let text = read_log(&log);
    if unit_buffer >= 2 * UNIT_RECV_BUFFER {
        assert_eq!(
            ocm_server::sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap(),
            unit_buffer,
            "the passed socket's larger buffer was lowered"
        );
    } else {
        skipped("net.core.rmem_max is below 64 KiB: the passed buffer's size is not checked");
    }
    // The flags' addresses are moot, and said to be.
    for (key, passed) in [("listen.tcp", tcp), ("listen.udp", udp)] {
        assert!(
            text.contains(&format!(
                "socket activation: systemd passed {passed} where {key} asks for 127.0.0.1:1; \
                 {passed} is served"
            )),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "socket activation: systemd passed tcp={tcp} udp={udp} metrics={metrics}; they \
             win over the configuration"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening tcp={tcp} udp={udp} metrics={metrics}")),
        "{text}"
    );
    let ask = |op: Operation, room: &str, name: &str| -> String {
        let mut stream = TcpStream::connect(tcp).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let body = format!("\"{name}\"");
        exchange(&mut stream, &request_bytes(op, room, body.as_bytes()))
            .token
            .unwrap_or_else(|| panic!("{op:?} {room} as {name} refused"))
    };
    let member = |token: &str| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        Member {
            socket,
            server: udp,
            room: "r".into(),
            token: token.to_owned(),
        }
    };
    let host = member(&ask(Operation::CreateRoom, "r", "host"));
    host.send("__REGISTER__");
    let bob = member(&ask(Operation::JoinRoom, "r", "bob"));
    bob.registered_with(&host, "bob");
    let get = |path: &str| -> String {
        let mut stream = TcpStream::connect(metrics).expect("metrics");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    let health = get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    terminate(&mut first);
    // No daemon: the kernel keeps the chat in the passed socket, and the join's connection
    // in the listener's backlog.
    bob.send("said while ocmd restarted");
    // Then more than the socket holds: the kernel drops the rest, and the next daemon counts
    // the drops made while none ran (its counter starts from the socket's).
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..2000 {
        flood.send_to(&[b'x'; 1000], udp).unwrap();
    }
    let join = thread::spawn(move || {
        let mut stream = TcpStream::connect(tcp).expect("connect while down");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        exchange(
            &mut stream,
            &request_bytes(Operation::JoinRoom, "r", b"\"carol\""),
        )
    });
    let (mut second, log) = unit.start();
    host.recv_until("bob: said while ocmd restarted");
    let reply = join.join().expect("the join's thread");
    assert!(reply.token.is_some(), "{reply:?}: {}", read_log(&log));
    // A scrape reads the kernel's count.
    let scraped = get("/metrics");
    let drops: f64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("ocm_udp_receive_buffer_drops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop count in:\n{scraped}"));
    assert!(
        drops > 0.0,
        "the flood's drops while no ocmd ran are not counted"
    );
    terminate(&mut second);
}

/// A descriptor systemd passed that `ocmd` cannot use stops the start, naming it and why:
/// a socket left unserved would keep its clients waiting.
#[test]
fn a_passed_descriptor_that_is_no_listening_socket_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ocmd.log");
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let mut args = vec![
        OsString::from("--state"),
        dir.path().join("room_manager.json").into(),
    ];
    args.extend(
        [
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--metrics",
            "off",
        ]
        .map(OsString::from),
    );
    let mut child = spawn_passing(&[(file.as_raw_fd(), "ucrp")], &args, &log);
    let status = wait_for_exit(&mut child.0, "ocmd on a file");
    // Not restarted by systemd (RestartPreventExitStatus=2): a restart would pass it again.
    assert_eq!(status.code(), Some(2), "{}", read_log(&log));
    assert!(
        read_log(&log).contains("socket activation: descriptor 3 (\"ucrp\"): not a socket"),
        "{}",
        read_log(&log)
    );
}
