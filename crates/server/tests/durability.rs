//! "No acknowledged join is ever lost": crashes (SIGKILL) and stops (SIGTERM) in the middle of
//! join storms, restarts on the same state, corrupt and torn state files, the state lock,
//! keepalive expiry of crashed clients, and tombstones of closed rooms.
//!
//! Every token a client received before a crash must still work after the restart: the
//! daemon releases a COMPLETE only after the journal record holding its token is fsync'd.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tcrp::payload::{self, Compliance, ErrorCode};
use tcrp::{Operation, State};

/// Short keepalive timings: a member that promised 1 s keepalives is expired after 2 s.
const FAST_LIVENESS: &str =
    "[liveness]\nkeepalive_misses = 2\nsweep_interval_ms = 100\nmin_keepalive_secs = 1\n";

/// Join storms must not be slowed by the per-IP request limit.
const NO_REQUEST_LIMIT: &str = "[rate]\nrequests_per_sec = 0.0\n";

/// A journal threshold so small that a join storm rotates and compacts it over and over.
const TINY_COMPACTION: &str = "[state]\ncompact_journal_bytes = 4096\n";

/// Options with metrics on and `config` as the configuration file.
fn metrics_and_config(config: impl Into<String>) -> Options {
    Options {
        config: Some(config.into()),
        metrics: true,
        ..Options::default()
    }
}

/// Options with metrics on and nothing else changed.
fn metrics_only() -> Options {
    Options {
        metrics: true,
        ..Options::default()
    }
}

/// A daemon with metrics that rotates and compacts its journal every few records.
fn compacting_daemon() -> Daemon {
    Daemon::start_with(metrics_and_config(format!(
        "{NO_REQUEST_LIMIT}{TINY_COMPACTION}"
    )))
}

/// One request on its own connection that never panics: `None` when the daemon went away
/// before the whole reply arrived (the token, if any, was then never received).
fn try_request(addr: SocketAddr, op: Operation, room: &str, body: &[u8]) -> Option<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    s.write_all(&request_bytes(op, room, body)).ok()?;
    let mut buf = Vec::new();
    let mut frames: Vec<(State, Vec<u8>)> = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        loop {
            let parsed = match tcrp::decode(&buf, 1 << 20) {
                Ok(Some((frame, used))) => Some((frame.state, frame.payload.to_vec(), used)),
                Ok(None) => None,
                Err(e) => panic!("daemon sent a bad frame: {e}"),
            };
            let Some((state, body, used)) = parsed else {
                break;
            };
            buf.drain(..used);
            frames.push((state, body));
        }
        if let Some((_, body)) = frames.first() {
            let compliance = payload::parse_compliance(body).expect("COMPLIANCE payload");
            if compliance != Compliance::Success {
                return Some(Reply {
                    compliance,
                    token: None,
                });
            }
            if let Some((state, body)) = frames.get(1) {
                assert_eq!(*state, State::Complete);
                let token = payload::parse_complete(body).expect("COMPLETE payload");
                return Some(Reply {
                    compliance,
                    token: Some(token),
                });
            }
        }
        match uninterrupted(|| s.read(&mut chunk)) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A token some client received.
#[derive(Debug, Clone)]
struct Received {
    room: String,
    name: String,
    token: String,
}

/// Members joined after each create in a storm.
const STORM_MEMBERS: usize = 3;

/// A storm's stop flag and the tokens it received.
type StormState = (Arc<AtomicBool>, Arc<Mutex<Vec<Received>>>);

/// A fresh stop flag (down) and an empty list of received tokens, for [`start_storm`].
fn storm_state() -> StormState {
    (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    )
}

/// Starts `threads` clients that create rooms `PREFIX-tN-K` and join them with
/// [`STORM_MEMBERS`] members, each request on a fresh connection, until `stop` is set or the
/// daemon goes away. Every token received lands in `got`.
fn start_storm(
    addr: SocketAddr,
    threads: usize,
    prefix: &str,
    stop: &Arc<AtomicBool>,
    got: &Arc<Mutex<Vec<Received>>>,
) -> Vec<thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let stop = Arc::clone(stop);
            let got = Arc::clone(got);
            let prefix = format!("{prefix}-t{t}");
            thread::spawn(move || {
                for k in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let room = format!("{prefix}-{k}");
                    let Some(r) = try_request(addr, Operation::CreateRoom, &room, b"\"host\"")
                    else {
                        return;
                    };
                    let token = r
                        .token
                        .unwrap_or_else(|| panic!("create {room} refused: {:?}", r.compliance));
                    got.lock().unwrap().push(Received {
                        room: room.clone(),
                        name: "host".into(),
                        token,
                    });
                    for m in 0..STORM_MEMBERS {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let name = format!("m{m}");
                        let body = format!("\"{name}\"");
                        let Some(r) =
                            try_request(addr, Operation::JoinRoom, &room, body.as_bytes())
                        else {
                            return;
                        };
                        let token = r.token.unwrap_or_else(|| {
                            panic!("join {room} as {name} refused: {:?}", r.compliance)
                        });
                        got.lock().unwrap().push(Received {
                            room: room.clone(),
                            name,
                            token,
                        });
                    }
                }
            })
        })
        .collect()
}

/// Sets the storm's `stop` flag, waits for its clients to end, and returns (and empties) the
/// tokens they received.
fn end_storm(
    stop: &AtomicBool,
    storm: Vec<thread::JoinHandle<()>>,
    got: &Mutex<Vec<Received>>,
) -> Vec<Received> {
    stop.store(true, Ordering::SeqCst);
    for client in storm {
        client.join().expect("storm client panicked");
    }
    std::mem::take(&mut *got.lock().unwrap())
}

/// Checks that every received token works on the running daemon: each registers (the count
/// of registered members grows by exactly their number and nothing is dropped), and each
/// member's message is relayed to its host.
fn verify_tokens(d: &Daemon, received: &[Received]) {
    let registered_before = d.metric("ocm_members_registered");
    let mut rooms: BTreeMap<&str, Vec<&Received>> = BTreeMap::new();
    for r in received {
        rooms.entry(&r.room).or_default().push(r);
    }
    for (room, members) in &rooms {
        let host = members
            .iter()
            .find(|r| r.name == "host")
            .unwrap_or_else(|| panic!("room {room}: members received but no host token"));
        let host = Member::joined(d, room, &host.token);
        for m in members.iter().filter(|r| r.name != "host") {
            let member = Member::new(d, room, &m.token);
            member.send("__REGISTER__");
            // The probe names its room, and anything else is skipped: a closed test socket's
            // port can be taken by a new one, which then gets late relays meant for the old.
            let probe = format!("probe from {} in {room}", m.name);
            member.send(&probe);
            host.recv_until(&format!("{}: {probe}", m.name));
        }
    }
    let expected = registered_before + received.len() as f64;
    wait_until("every received token registered", || {
        d.metric("ocm_members_registered") >= expected
    });
    assert_eq!(d.metric("ocm_members_registered"), expected);
    for reason in [
        "unknown_token",
        "wrong_room",
        "unregistered",
        "address_mismatch",
    ] {
        assert_eq!(
            d.metric(&format!(
                "ocm_datagrams_dropped_total{{reason=\"{reason}\"}}"
            )),
            0.0,
            "no datagram dropped as {reason} after restart"
        );
    }
}

/// Asserts that a (re)started daemon logged nothing alarming about its state.
fn assert_clean_start(log: &str) {
    for bad in ["ERROR", "corrupt", "cannot parse", "skipped"] {
        assert!(!log.contains(bad), "start-up log mentions {bad:?}:\n{log}");
    }
}

/// Checks that the daemon's log so far contains `needle`; the failure shows the log.
#[track_caller]
fn assert_logged(d: &Daemon, needle: &str) {
    let log = d.log();
    assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
}

/// Asserts that every acknowledged token is in the state file (read after a stop).
fn assert_all_saved(d: &Daemon, received: &[Received]) {
    let saved = saved_tokens(d);
    for r in received {
        assert!(
            saved.contains(&r.token),
            "{r:?} acknowledged but missing from the state file"
        );
    }
}

/// Starts the stopped daemon again on its state and checks that the start was clean.
#[track_caller]
fn restart_cleanly(d: &mut Daemon) {
    d.restart();
    assert_clean_start(&d.log());
}

/// Restarts the stopped daemon on its state, checks the start was clean, and that every
/// acknowledged token still registers and relays.
fn restart_and_verify(d: &mut Daemon, received: &[Received]) {
    restart_cleanly(d);
    verify_tokens(d, received);
}

/// Checks that each of `tokens` is in the state file (read after a stop); `what` names the
/// case in the failure.
#[track_caller]
fn assert_tokens_saved(d: &Daemon, tokens: &[String], what: &str) {
    let saved = saved_tokens(d);
    for (n, token) in tokens.iter().enumerate() {
        assert!(
            saved.contains(token),
            "{what}: acknowledged token {n} ({token}) not in the state file"
        );
    }
}

/// The state file's tokens after a clean stop.
fn saved_tokens(d: &Daemon) -> HashSet<String> {
    let bytes = std::fs::read(&d.state).expect("state file written on shutdown");
    let state: serde_json::Value = serde_json::from_slice(&bytes).expect("state file is JSON");
    state["tokens"]
        .as_object()
        .expect("tokens object")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn sigkill_during_a_join_storm_loses_no_acknowledged_token() {
    const ROUNDS: usize = 20;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed());
    let mut d = Daemon::start_with(metrics_and_config(NO_REQUEST_LIMIT));
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let (stop, got) = storm_state();
        let delay = Duration::from_millis(rng.random_range(5..=80));
        let storm = start_storm(d.tcp, 4, &format!("r{round}"), &stop, &got);
        thread::sleep(delay); // the random kill moment, not a wait for correctness
        d.kill9();
        let received = end_storm(&stop, storm, &got);
        eprintln!(
            "round {round}: killed after {delay:?}; {} tokens received",
            received.len()
        );
        restart_and_verify(&mut d, &received);
        all.extend(received);
    }
    assert!(
        !all.is_empty(),
        "the storms got no token at all: the test proved nothing"
    );
    // A clean stop folds everything into the state file: every token is in it.
    d.stop_cleanly();
    assert_all_saved(&d, &all);
    eprintln!(
        "{ROUNDS} crash rounds, {} tokens, in {:?}",
        all.len(),
        started.elapsed()
    );
}

/// State files the daemon wrote while serving (after its `listening` line): compactions.
fn compactions_while_serving(log: &str) -> usize {
    log.split_once("listening ")
        .map_or(0, |(_, serving)| serving.matches("state: wrote").count())
}

/// The journal's companions after a clean stop: no `journal.old`, and an empty journal (or
/// none).
fn assert_folded(d: &Daemon) {
    let old = d.state.with_file_name("room_manager.json.journal.old");
    assert!(!old.exists(), "{} left after a clean stop", old.display());
    let journal = d.state.with_file_name("room_manager.json.journal");
    let len = std::fs::metadata(&journal).map_or(0, |m| m.len());
    assert_eq!(len, 0, "{} not empty after a clean stop", journal.display());
}

#[test]
fn sigkill_while_the_journal_is_rotated_and_compacted_loses_no_acknowledged_token() {
    const ROUNDS: usize = 6;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut compactions = 0;
    for round in 0..ROUNDS {
        // A fresh state each round: the threshold also grows with the state file, and a small
        // one keeps the rotations coming.
        let mut d = compacting_daemon();
        let (stop, got) = storm_state();
        let storm = start_storm(d.tcp, 4, &format!("c{round}"), &stop, &got);
        // 100 records are several times the threshold: rotations have begun. The kill comes
        // after a compaction finished, so that each round tests one (the count below is
        // otherwise at the mercy of a loaded machine's timing).
        wait_until("the storm got tokens", || got.lock().unwrap().len() >= 100);
        wait_until("a compaction finished while serving", || {
            compactions_while_serving(&d.log()) >= 1
        });
        let delay = Duration::from_millis(rng.random_range(0..=200));
        thread::sleep(delay); // the random kill moment, not a wait for correctness
        d.kill9();
        let received = end_storm(&stop, storm, &got);
        let compacted = compactions_while_serving(&d.log());
        compactions += compacted;
        eprintln!(
            "round {round}: killed {delay:?} after 100 tokens; {} tokens received, \
             {compacted} compactions finished",
            received.len()
        );
        restart_and_verify(&mut d, &received);
        d.stop_cleanly();
        assert_folded(&d);
        assert_all_saved(&d, &received);
    }
    assert!(
        compactions >= ROUNDS,
        "only {compactions} compactions while serving: compact_journal_bytes was not applied"
    );
}

#[test]
fn a_clean_stop_during_compactions_leaves_no_old_journal_and_an_empty_journal() {
    let mut d = compacting_daemon();
    let (stop, got) = storm_state();
    let storm = start_storm(d.tcp, 4, "clean", &stop, &got);
    wait_until("the storm got tokens", || got.lock().unwrap().len() >= 200);
    let (status, took) = d.terminate();
    let received = end_storm(&stop, storm, &got);
    assert!(status.success(), "SIGTERM exit status: {status:?}");
    assert!(took < STOP_LIMIT, "stopped in {took:?}");
    assert_folded(&d);
    assert_all_saved(&d, &received);
    restart_and_verify(&mut d, &received);
}

#[test]
fn sigterm_during_a_join_storm_exits_cleanly_and_keeps_every_token() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut d = Daemon::start_with(metrics_and_config(NO_REQUEST_LIMIT));
    for round in 0..3 {
        let (stop, got) = storm_state();
        let delay = Duration::from_millis(rng.random_range(20..=80));
        let storm = start_storm(d.tcp, 4, &format!("t{round}"), &stop, &got);
        thread::sleep(delay); // the random stop moment, not a wait for correctness
        let (status, took) = d.terminate();
        let received = end_storm(&stop, storm, &got);
        assert!(status.success(), "SIGTERM exit status: {status:?}");
        assert!(took < STOP_LIMIT, "stopped in {took:?}");
        eprintln!(
            "round {round}: stopped after {delay:?} in {took:?}; {} tokens received",
            received.len()
        );
        assert_all_saved(&d, &received);
        restart_and_verify(&mut d, &received);
    }
}

/// A backup asked for with SIGUSR1 in the middle of a join storm, while the journal is
/// rotated and compacted over and over: put alone in a fresh directory as the state file (a
/// restore), it starts a daemon on which every token acknowledged before the signal works.
/// The daemon goes on serving meanwhile, and a second signal writes the backup again: the
/// second time the old file is removed first and the new one copied the moment it exists, as
/// docs/OPERATIONS.md tells operators to do.
#[test]
fn a_backup_taken_during_a_join_storm_restores_every_token_acknowledged_before_it() {
    let d = compacting_daemon();
    let backup = d.state.with_extension("json.backup");
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("room_manager.json");
    let mut before = Vec::new();
    for round in 1..=2 {
        let (stop, got) = storm_state();
        let storm = start_storm(d.tcp, 4, &format!("b{round}"), &stop, &got);
        wait_until("tokens received in the storm", || {
            got.lock().unwrap().len() >= 40
        });
        before.extend(got.lock().unwrap().iter().cloned());
        if round == 1 {
            d.signal(libc::SIGUSR1);
            wait_until("the backup written", || {
                d.metric("ocm_state_backups_total") >= 1.0
            });
        } else {
            std::fs::remove_file(&backup).unwrap();
            d.signal(libc::SIGUSR1);
            wait_until("the backup file there", || backup.exists());
            std::fs::copy(&backup, &copied).unwrap();
        }
        let after = end_storm(&stop, storm, &got);
        assert!(after.len() > 40, "the storm stopped at the backup");
    }
    // Counted after the rename's directory fsync, which may come after the file shows.
    wait_until("the second backup counted", || {
        d.metric("ocm_state_backups_total") >= 2.0
    });
    assert_eq!(d.metric("ocm_state_backups_total"), 2.0);
    assert_eq!(d.metric("ocm_state_backup_failures_total"), 0.0);
    assert_logged(&d, "SIGUSR1: writing a backup of the state");
    assert_logged(&d, "state: backup written to ");
    assert!(
        compactions_while_serving(&d.log()) > 0,
        "no compaction ran beside the backups"
    );

    let restored = fresh_dir();
    std::fs::copy(&copied, restored.path().join("room_manager.json")).unwrap();
    let r = Daemon::spawn(restored, metrics_only()).expect("ocmd starts on the backup");
    assert_clean_start(&r.log());
    verify_tokens(&r, &before);
    eprintln!(
        "{} tokens acknowledged before the backups, all restored",
        before.len()
    );
}

/// A backup that cannot be written is logged at error and counted, and nothing else changes:
/// joins go on being acknowledged and kept; the next signal, once the way is clear, writes it.
#[test]
fn a_backup_that_cannot_be_written_says_so_and_the_daemon_serves_on() {
    let mut d = Daemon::start_with(metrics_only());
    let host = create(&d, "r", "host");
    // The backup's temporary name taken by a directory: its creation fails.
    let blocker = d.state.with_extension("json.backup.tmp");
    std::fs::create_dir(&blocker).unwrap();
    d.signal(libc::SIGUSR1);
    d.wait_for_log("not written: ");
    wait_until("the failed backup counted", || {
        d.metric("ocm_state_backup_failures_total") >= 1.0
    });
    assert_logged(&d, "ERROR");
    assert!(!d.state.with_extension("json.backup").exists());
    let member = join(&d, "r", "m");

    std::fs::remove_dir(&blocker).unwrap();
    d.signal(libc::SIGUSR1);
    wait_until("the backup written", || {
        d.metric("ocm_state_backups_total") >= 1.0
    });
    assert_eq!(d.metric("ocm_state_backup_failures_total"), 1.0);
    let backup = std::fs::read(d.state.with_extension("json.backup")).unwrap();
    let backup: serde_json::Value = serde_json::from_slice(&backup).expect("a JSON state file");
    for token in [&host, &member] {
        assert!(
            backup["tokens"].get(token).is_some(),
            "{token} not in {backup}"
        );
    }
    d.stop_cleanly();
    assert_tokens_saved(&d, &[host, member], "after a failed backup");
}

/// A backup holds the rooms' history as said before the signal, though the periodic
/// checkpoint that would save it is far off: the signal checkpoints it first.
#[test]
fn a_backup_holds_the_history_said_before_it() {
    let d = Daemon::start_with(metrics_and_config("[history]\ncheckpoint_secs = 3600\n"));
    let (host, member) = host_and_member(&d, "r", "host", "m");
    member.send("said before the backup");
    host.recv_until("m: said before the backup");
    d.signal(libc::SIGUSR1);
    wait_until("the backup written", || {
        d.metric("ocm_state_backups_total") >= 1.0
    });
    let backup = std::fs::read(d.state.with_extension("json.backup")).unwrap();
    let backup: serde_json::Value = serde_json::from_slice(&backup).expect("a JSON state file");
    let history = backup["rooms"]["r"]["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history for room r in {backup}"));
    assert!(
        history
            .iter()
            .any(|m| m["sender"] == "m" && m["text"] == "said before the backup"),
        "{history:?}"
    );
}

/// The variable and file that switch [`fdatasync_holder`] on: the journal's appends stick.
const HOLD_FDATASYNC: (&str, &str) = ("OCM_TEST_HOLD_FDATASYNC", "hold-fdatasync");
/// The variable and file that switch [`fsync_holder`] on: the state file's writes stick.
const HOLD_FSYNC: (&str, &str) = ("OCM_TEST_HOLD_FSYNC", "hold-fsync");

/// An `fdatasync` held while [`HOLD_FDATASYNC`]'s file exists, at most 20 s.
fn fdatasync_holder(dir: &Path) -> PathBuf {
    sync_stub(
        dir,
        "fdatasync",
        HOLD_FDATASYNC.0,
        SyncStub::Hold { cap_ms: 20_000 },
    )
}

/// An `fsync` held while [`HOLD_FSYNC`]'s file exists, at most 60 s: the state file's
/// writes (the journal's `fdatasync` goes through).
fn fsync_holder(dir: &Path) -> PathBuf {
    sync_stub(
        dir,
        "fsync",
        HOLD_FSYNC.0,
        SyncStub::Hold { cap_ms: 60_000 },
    )
}

/// A daemon whose disk stuck under a join: `alice` created "stuck" (durable), then bob's join
/// was admitted and waits for an `fdatasync` held while `hold` exists (see
/// [`fdatasync_holder`]).
struct StuckJoin {
    d: Daemon,
    hold: PathBuf,
    /// Keeps the preloaded library's directory.
    _library: tempfile::TempDir,
    /// alice's token.
    host: String,
    /// bob's join, answered only once its record is durable.
    joining: thread::JoinHandle<Option<Reply>>,
}

fn a_join_stuck_in_fdatasync() -> StuckJoin {
    a_join_stuck_in_fdatasync_with(Options::default())
}

fn a_join_stuck_in_fdatasync_with(options: Options) -> StuckJoin {
    let (d, hold, _library) = spawn_preloaded(fdatasync_holder, HOLD_FDATASYNC, options);
    let held = hold.with_extension("held");
    let host = create(&d, "stuck", "alice");
    std::fs::write(&hold, b"").unwrap();
    let joining = {
        let tcp = d.tcp;
        thread::spawn(move || try_request(tcp, Operation::JoinRoom, "stuck", b"\"bob\""))
    };
    wait_until("the disk is held", || held.exists());
    // The held sync may be the space laid ahead after alice's record, before bob's request
    // was even read: wait until his join is admitted, its record queued behind the disk.
    d.wait_for_log(r#"room "stuck": "bob" joined"#);
    StuckJoin {
        d,
        hold,
        _library,
        host,
        joining,
    }
}

/// A clean stop waits (up to 1.5 s) for the state writes in flight, so that a join whose
/// record is on its way to the disk still gets its token before the daemon exits: the
/// join's client is not left without an answer for a name it then holds.
#[test]
fn a_clean_stop_lets_a_join_waiting_for_the_disk_get_its_token() {
    let StuckJoin {
        mut d,
        hold,
        _library,
        host,
        joining,
    } = a_join_stuck_in_fdatasync();
    d.signal(libc::SIGTERM);
    d.wait_for_log("stopping: flushing state");
    // The disk comes back while the stop waits for it.
    std::fs::remove_file(&hold).unwrap();
    let status = d.wait_exit();
    assert!(status.success(), "{status:?}");
    let reply = joining
        .join()
        .unwrap()
        .expect("the join was answered before the daemon exited");
    assert_eq!(reply.compliance, Compliance::Success);
    let bob = reply.token.expect("bob's token");
    let log = d.log();
    assert!(!log.contains("state writes still in flight"), "{log}");
    // The token it was given is saved.
    let saved = saved_tokens(&d);
    assert!(saved.contains(&host) && saved.contains(&bob), "{saved:?}");
}

/// While a stop waits for the disk, the handshake and metrics ports both refuse connections
/// at once: `/healthz` and `/readyz` were left unanswered in the metrics listener's backlog
/// (found by an operator's review), which a monitor reads as a wedged daemon, not a
/// stopping one.
#[test]
fn a_stop_waiting_for_the_disk_refuses_health_checks_at_once() {
    let StuckJoin {
        mut d,
        hold,
        _library,
        joining,
        ..
    } = a_join_stuck_in_fdatasync_with(metrics_only());
    let metrics = d.metrics.expect("a metrics listener");
    d.signal(libc::SIGTERM);
    d.wait_for_log("stopping: flushing state");
    for (what, addr) in [("handshake", d.tcp), ("metrics", metrics)] {
        wait_until(&format!("the {what} port refuses"), || {
            matches!(
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionRefused)
            )
        });
    }
    assert!(hold.exists(), "the stop still waits for the disk");
    std::fs::remove_file(&hold).unwrap();
    assert!(d.wait_exit().success());
    let reply = joining.join().unwrap();
    assert!(
        reply.is_some_and(|r| r.token.is_some()),
        "bob got his token"
    );
}

/// `TimeoutStopSec` of config/ocmd.service: how long systemd waits for a stop before it
/// sends SIGKILL.
fn unit_stop_timeout() -> Duration {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/ocmd.service");
    let text = std::fs::read_to_string(&unit).expect("config/ocmd.service");
    let secs = text
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .and_then(|value| value.trim().parse().ok())
        .expect("TimeoutStopSec=SECONDS in config/ocmd.service");
    Duration::from_secs(secs)
}

/// A clean stop whose last writes the disk never takes exits all the same, 11.5 s after
/// SIGTERM at most (1.5 s for the writes in flight, then 10 s for the writer in all), within
/// systemd's `TimeoutStopSec`, and says what it could not make durable: the join that waited
/// for those writes is never answered (its record, written but not synced, may or may not
/// be there after a restart, as after a `kill -9`); the room made before is kept.
#[test]
fn a_clean_stop_whose_last_writes_never_reach_the_disk_exits_and_says_so() {
    let StuckJoin {
        mut d,
        hold,
        _library,
        host,
        joining,
    } = a_join_stuck_in_fdatasync();
    let signalled = Instant::now();
    d.signal(libc::SIGTERM);
    // The holder lets go after 20 s; the daemon gives up on the writer after 11.5 s.
    d.wait_for_log_within("stopped: ", Duration::from_secs(40));
    let status = d.wait_exit();
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(1),
        "a stop that left changes not durable reports a failure: {status:?}"
    );
    let systemd_waits = unit_stop_timeout();
    assert!(
        took < systemd_waits,
        "the stop took {took:?}: systemd would have killed it after {systemd_waits:?}"
    );
    assert!(
        hold.exists(),
        "the disk came back before the daemon gave up"
    );
    let log = d.log();
    for said in [
        "state writer did not finish its last writes within 10 s",
        "stopped: 1 room, 2 members; the changes still waiting for the disk are not durable",
    ] {
        assert!(log.contains(said), "{said:?} not in:\n{log}");
    }
    let reply = joining.join().unwrap();
    assert!(
        reply.as_ref().is_none_or(|r| r.token.is_none()),
        "a join that never reached the disk was answered with a token: {reply:?}"
    );
    std::fs::remove_file(&hold).unwrap();
    d.restart();
    d.stop_cleanly();
    let saved = saved_tokens(&d);
    assert!(saved.contains(&host), "the host's token is kept: {saved:?}");
}

/// While a periodic checkpoint's records wait for a stuck disk, the next checkpoints are
/// deferred, not stacked behind it, and each one is counted in
/// `ocm_checkpoints_deferred_total`; once the disk comes back, the messages they left are
/// saved by a later one.
#[test]
fn checkpoints_are_deferred_and_counted_while_the_last_one_waits_for_the_disk() {
    let options = metrics_and_config("[history]\ncheckpoint_secs = 1\n");
    let (d, hold, _library) = spawn_preloaded(fdatasync_holder, HOLD_FDATASYNC, options);
    let held = hold.with_extension("held");
    let (alice, bob) = room_of_two(&d, "stuck");
    // The disk sticks; the next checkpoint's history record waits in fdatasync.
    std::fs::write(&hold, b"").unwrap();
    alice.send("before");
    assert_eq!(bob.recv(), "alice: before");
    wait_until("a checkpoint waits in fdatasync", || held.exists());
    alice.send("while stuck");
    assert_eq!(bob.recv(), "alice: while stuck");
    wait_until("a checkpoint deferred", || {
        d.metric("ocm_checkpoints_deferred_total") >= 1.0
    });
    std::fs::remove_file(&hold).unwrap();
    let journal = d.state.with_extension("json.journal");
    wait_until("the message left by the deferred checkpoint saved", || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("while stuck"))
    });
}

/// A full connection table never closes a connection whose reply waits for the disk: a
/// newcomer makes an idle one go instead, even one answered later, and the waiting join
/// gets its token once the disk comes back.
#[test]
fn a_full_table_does_not_close_a_connection_whose_reply_waits_for_the_disk() {
    let options =
        metrics_and_config("[limits]\nmax_connections = 2\nhandshake_timeout_secs = 600\n");
    let (d, hold, _library) = spawn_preloaded(fdatasync_holder, HOLD_FDATASYNC, options);
    let held = hold.with_extension("held");
    let host = create(&d, "stuck", "alice");
    // The disk sticks: bob's join waits for its record to be durable.
    std::fs::write(&hold, b"").unwrap();
    let mut waiting = connect(&d);
    waiting
        .write_all(&request_bytes(Operation::JoinRoom, "stuck", b"\"bob\""))
        .unwrap();
    wait_until("the join's record waits in fdatasync", || held.exists());
    // An idle connection, answered after the join was asked, fills the table.
    let list_rooms = |s: &mut TcpStream| {
        s.write_all(&request_bytes(Operation::ListRooms, "", b"{}"))
            .unwrap();
        let mut frames = FrameReader::default();
        let (state, body) = frames.next(s).expect("COMPLIANCE");
        assert_eq!(state, State::Compliance);
        assert_eq!(payload::parse_compliance(&body), Ok(Compliance::Success));
        let (state, _) = frames.next(s).expect("the room list");
        assert_eq!(state, State::Complete);
    };
    let mut idle = connect(&d);
    list_rooms(&mut idle);
    // A newcomer is served: the idle one made room.
    list_rooms(&mut connect(&d));
    assert_eq!(
        d.metric("ocm_tcp_connections_closed_total{reason=\"evicted\"}"),
        1.0
    );
    let mut rest = Vec::new();
    assert!(
        matches!(idle.read_to_end(&mut rest), Ok(0)),
        "the idle connection is still open"
    );
    // The disk comes back: the join is answered.
    std::fs::remove_file(&hold).unwrap();
    let reply = FrameReader::default().reply(&mut waiting);
    assert_eq!(reply.compliance, Compliance::Success);
    let bob = reply.token.expect("bob's token");
    assert_ne!(bob, host);
}

/// Starts `ocm VERB ROOM --name NAME --keepalive 1` (`verb` is `create` or `join`) and waits
/// until it says it created or joined the room.
fn ocm_keeping_alive(d: &Daemon, verb: &str, room: &str, name: &str) -> Ocm {
    let ocm = Ocm::start(d, &[verb, room, "--name", name, "--keepalive", "1"]);
    let done = if verb == "create" {
        "created"
    } else {
        "joined"
    };
    ocm.wait_stderr(&format!("* {done} {room} as {name}"));
    ocm
}

#[test]
fn a_crashed_ocm_host_closes_its_room_and_a_crashed_member_times_out() {
    let d = Daemon::start_with(metrics_and_config(FAST_LIVENESS));

    // The host crashes: the member hears that it timed out, then the room close, and exits 0.
    let mut alice = ocm_keeping_alive(&d, "create", "crash1", "alice");
    let mut bob = ocm_keeping_alive(&d, "join", "crash1", "bob");
    assert_eq!(alice.line(), "* bob joined");
    alice.kill9();
    bob.lines_until("* alice timed out");
    bob.lines_until("* room crash1 was closed");
    assert_eq!(
        bob.wait().code(),
        Some(OCM_ROOM_ENDED),
        "bob: the room closed"
    );

    // A silent member crashes: the host hears it timed out.
    let mut carol = ocm_keeping_alive(&d, "create", "crash2", "carol");
    let mut dave = ocm_keeping_alive(&d, "join", "crash2", "dave");
    assert_eq!(carol.line(), "* dave joined");
    dave.kill9();
    carol.lines_until("* dave timed out");
    assert!(d.metric("ocm_keepalive_expiries_total") >= 2.0);
    carol.quit_cleanly();
}

/// A laptop that slept through its keepalives: the member is expired, and when it wakes its
/// next keepalive is answered with "you timed out", so `ocm` says so and exits instead of
/// talking to nobody.
#[test]
fn an_ocm_member_that_slept_past_its_timeout_is_told_and_exits() {
    let d = Daemon::start_with(Options {
        config: Some(FAST_LIVENESS.into()),
        ..Options::default()
    });
    let mut host = ocm_keeping_alive(&d, "create", "nap", "host");
    let mut sleepy = ocm_keeping_alive(&d, "join", "nap", "sleepy");
    assert_eq!(host.line(), "* sleepy joined");
    // Asleep while chatting: stopped before it had its join's history, `ocm` asks for it on
    // waking, and that request's refusal (no longer a member: "* you are no longer in room
    // nap", on standard error) can end the session before the notice does.
    sleepy.wait_live();
    sleepy.signal(libc::SIGSTOP);
    host.lines_until("* sleepy timed out");
    sleepy.signal(libc::SIGCONT);
    let deadline = Instant::now() + PATIENCE;
    while !sleepy
        .line_within(deadline.saturating_duration_since(Instant::now()))
        .expect("sleepy is told")
        .starts_with("* you were removed from room nap")
    {}
    assert_eq!(
        sleepy.wait().code(),
        Some(OCM_ROOM_ENDED),
        "sleepy was removed"
    );
    // The room lives on for the host.
    host.quit_cleanly();
}

#[test]
fn original_members_are_never_expired_for_silence() {
    let d = Daemon::start_with(metrics_and_config(FAST_LIVENESS));
    let (host, orig) = host_and_member(&d, "quiet", "host", "orig");
    // A member that promises keepalives every second, registers once and goes silent.
    let r = request(
        &d,
        Operation::JoinRoom,
        "quiet",
        br#"{"username": "ka", "keepalive": 1}"#,
    );
    let ka = Member::new(&d, "quiet", &r.token.expect("keepalive member joins"));
    // Before its last datagram: the daemon times the silence from that datagram's arrival.
    let silent_since = Instant::now();
    ka.registered_with(&host, "ka");
    // Sweeps ran past the timeout: the keepalive member (seen after orig) is gone.
    wait_until("the keepalive member expires", || {
        d.metric("ocm_keepalive_expiries_total") >= 1.0
    });
    assert!(silent_since.elapsed() >= Duration::from_secs(2));
    assert_eq!(d.metric("ocm_keepalive_expiries_total"), 1.0);
    // Silent longer than ka, orig still relays, and the host (original too) still hears.
    orig.send("still here");
    assert_eq!(host.recv(), "orig: still here");
    host.send("me too");
    // orig heard ka's probe while ka was alive, and nothing since.
    assert_eq!(orig.recv_until("host: me too"), ["ka: probe from ka"]);
    assert_eq!(d.metric("ocm_members"), 2.0);
}

/// With `[liveness] room_idle_secs`, a room in which nobody is heard from closes as if its
/// host had left (its registered members told `__ROOM_CLOSED__`) and stays closed after a
/// restart: the way out for rooms of original clients whose host vanished without a
/// `__LEAVE__`. A room where someone is heard from stays.
#[test]
fn a_room_nobody_is_heard_from_closes_after_room_idle_secs_and_stays_closed() {
    let mut d = Daemon::start_with(metrics_and_config(format!(
        "{FAST_LIVENESS}room_idle_secs = 2\n"
    )));
    let host_token = create(&d, "ghost", "host");
    let host = Member::joined(&d, "ghost", &host_token);
    let orig = Member::new(&d, "ghost", &join(&d, "ghost", "orig"));
    // Before the room's last datagram: the daemon times the silence from its arrival.
    let silent_since = Instant::now();
    orig.registered_with(&host, "orig");
    let (talker, listener) = host_and_member(&d, "live", "talker", "listener");
    // The original host vanished without a __LEAVE__; its member hears the room close.
    let mut spoke = Instant::now();
    wait_until("the idle room closes", || {
        // Meanwhile the other room keeps talking, well within the chat rate (each message
        // relayed proves it is still open).
        if spoke.elapsed() >= Duration::from_millis(200) {
            talker.send("still here");
            assert_eq!(listener.recv(), "talker: still here");
            spoke = Instant::now();
        }
        d.metric("ocm_idle_rooms_closed_total") >= 1.0
    });
    assert_eq!(orig.recv(), "CLOSED");
    assert_eq!(
        host.recv(),
        "CLOSED",
        "the host did not leave: it is told too"
    );
    assert!(silent_since.elapsed() >= Duration::from_secs(2));
    assert_eq!(d.metric("ocm_idle_rooms_closed_total"), 1.0);
    assert_eq!(d.metric("ocm_rooms"), 1.0, "the room heard from stays");
    assert_logged(
        &d,
        "room \"ghost\" closed: nobody heard from for 2 s; 2 members told",
    );
    // The close was journaled: after a restart the name is free, the other room still there
    // (read from the load's log line: with the same limit, the restarted daemon closes the
    // silent "live" room 2 s later).
    d.stop_cleanly();
    d.restart();
    assert_logged(&d, ": 1 room, 2 tokens loaded");
    let r = request(&d, Operation::JoinRoom, "ghost", b"\"late\"");
    assert_eq!(refused(&r), Some(ErrorCode::RoomNotFound));
}

/// A chat whose server went away says so once, and says when it answers again after a
/// restart: the user knows when typing is worth it again.
#[test]
fn a_chat_says_when_its_server_answers_again_after_a_restart() {
    let mut d = Daemon::start();
    let mut alice = Ocm::start(
        &d,
        &[
            "create",
            "back",
            "--name",
            "alice",
            "--keepalive",
            "1",
            "--idle-check",
            "1",
        ],
    );
    alice.wait_stderr("* created back as alice");
    d.stop_cleanly();
    alice.type_line("into the void");
    alice.wait_stderr("* cannot reach the server");
    d.restart();
    alice.wait_stderr("* the server answers again");
    alice.quit_cleanly();
}

#[test]
fn a_live_ocm_chat_survives_a_daemon_restart() {
    let mut d = Daemon::start();
    let mut alice = ocm_keeping_alive(&d, "create", "live", "alice");
    let mut bob = ocm_keeping_alive(&d, "join", "live", "bob");
    bob.wait_live();
    assert_eq!(alice.line(), "* bob joined");

    fn deliver(from: &mut Ocm, to: &Ocm, sender: &str, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        for i in 0.. {
            assert!(
                Instant::now() < deadline,
                "{text:?} from {sender} never arrived"
            );
            from.type_line(&format!("{text} {i}"));
            if let Some(line) = to.line_within(Duration::from_millis(300)) {
                if line.starts_with(&format!("{sender}: {text}")) {
                    return;
                }
            }
        }
    }

    deliver(&mut alice, &bob, "alice", "first");
    let took = d.stop_cleanly();
    assert_stopped_promptly(&d, took);
    d.restart();
    deliver(&mut bob, &alice, "bob", "second");
    deliver(&mut alice, &bob, "alice", "third");
    alice.quit_cleanly();
    assert_eq!(
        bob.wait().code(),
        Some(OCM_ROOM_ENDED),
        "bob: the host left"
    );
}

/// A fresh temporary state directory, to start daemons on with [`spawn_on`].
fn fresh_dir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().unwrap())
}

/// Starts `ocmd` with default options on `dir`; its stderr if it exits before listening.
fn spawn_on(dir: &Arc<tempfile::TempDir>) -> Result<Daemon, String> {
    Daemon::spawn(Arc::clone(dir), Options::default())
}

/// Starts `ocmd` on `dir` expecting it to refuse; returns the refusal's log. Panics with
/// `started` if it started after all.
#[track_caller]
fn refused_start(dir: &Arc<tempfile::TempDir>, started: &str) -> String {
    match spawn_on(dir) {
        Ok(_) => panic!("{started}"),
        Err(log) => log,
    }
}

/// Tokens and password hashes are secrets: a state file left readable by others (the
/// original server's, or a `cp` under umask 022) is its owner's alone once `ocmd` has started
/// on it, and the log says so.
#[test]
fn a_state_file_readable_by_others_is_narrowed_to_its_owner_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_dir();
    let mut d = spawn_on(&dir).expect("ocmd starts");
    create(&d, "r", "host");
    d.stop_cleanly();
    drop(d);
    let state = dir.path().join("room_manager.json");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = spawn_on(&dir).expect("ocmd restarts");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", d.log());
    assert_logged(&d, "was readable by others (mode 644); now 600");
}

#[test]
fn a_corrupt_state_file_stops_the_start_and_is_left_untouched() {
    let dir = fresh_dir();
    let state = dir.path().join("room_manager.json");
    let garbage = b"{\"rooms\": {\"lobby\": \x00\xff garbage".to_vec();
    std::fs::write(&state, &garbage).unwrap();
    let log = refused_start(&dir, "ocmd started on a corrupt state file");
    assert!(
        log.contains("cannot parse state file") && log.contains(&state.display().to_string()),
        "the refusal names the file:\n{log}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), garbage, "file unchanged");
}

#[test]
fn a_state_file_of_the_wrong_shape_stops_the_start_and_is_left_untouched() {
    for text in [
        "[]",
        "[1]",
        "[1, {}, {}, null, 0]",
        "{\"rooms\": 5}",
        "null",
        "\"x\"",
    ] {
        let dir = fresh_dir();
        let state = dir.path().join("room_manager.json");
        std::fs::write(&state, text).unwrap();
        match spawn_on(&dir) {
            Ok(mut d) => {
                let (status, _) = d.terminate();
                panic!(
                    "ocmd started on the state file {text:?} (exit {status:?}); it now holds:\n{}",
                    std::fs::read_to_string(&state).unwrap_or_default()
                );
            }
            Err(log) => {
                assert!(
                    log.contains("cannot parse state file")
                        && log.contains(&state.display().to_string()),
                    "{text:?}: the refusal names the file:\n{log}"
                );
                // An object of the wrong contents gets the parser's own reason.
                let reason = if text.starts_with('{') {
                    "invalid type"
                } else {
                    "not an ocm state file"
                };
                assert!(
                    log.contains(reason),
                    "{text:?}: the refusal says {reason:?}:\n{log}"
                );
            }
        }
        assert_eq!(
            std::fs::read_to_string(&state).unwrap(),
            text,
            "file unchanged"
        );
    }
}

/// A state file that would lose something if loaded stops the start, naming why, and is left
/// as it was: a room given twice in "rooms" (the last copy would win) and a file of a newer
/// format (this ocmd would drop what it does not know at its next snapshot).
#[test]
fn a_state_file_that_would_lose_data_stops_the_start_and_is_left_untouched() {
    let host = |token: &str| {
        format!(r#"{{"username":"h","room_name":"lobby","is_host":true,"token":"{token}"}}"#)
    };
    let room = |token: &str| format!(r#"{{"host_token":"{token}","members":["{token}"]}}"#);
    let twice = format!(
        r#"{{"rooms":{{"lobby":{},"lobby":{}}},"tokens":{{"h1":{},"h2":{}}}}}"#,
        room("h1"),
        room("h2"),
        host("h1"),
        host("h2")
    );
    let newer = r#"{"version":99,"rooms":{},"tokens":{},"future":[1]}"#.to_owned();
    for (what, text, reason) in [
        (
            "a room given twice",
            twice,
            r#"the key "lobby" is given twice"#,
        ),
        ("a newer format", newer, "written by a newer ocmd"),
    ] {
        let dir = fresh_dir();
        let state = dir.path().join("room_manager.json");
        std::fs::write(&state, &text).unwrap();
        let log = refused_start(&dir, &format!("ocmd started on {what}"));
        assert!(
            log.contains(&state.display().to_string()) && log.contains(reason),
            "{what}: the refusal names the file and says {reason:?}:\n{log}"
        );
        assert_eq!(
            std::fs::read_to_string(&state).unwrap(),
            text,
            "{what}: file unchanged"
        );
    }
}

/// The journal's bytes before the NULs at its end: the space the daemon lays down ahead of
/// its appends, there or not depending on when the kill came.
fn journal_data(journal: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(journal).unwrap();
    let data_end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    bytes.truncate(data_end);
    bytes
}

/// The journal in the state directory `dir`.
fn journal_in(dir: &Path) -> PathBuf {
    dir.join("room_manager.json.journal")
}

/// The journal's records (before the space laid ahead), each a line with its `\n`.
fn journal_lines(journal: &Path) -> Vec<Vec<u8>> {
    journal_data(journal)
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// The space `ocmd` lays down ahead of its journal appends, as the tests write it back.
const SPACE_AHEAD: usize = 1024 * 1024;

/// A daemon on `dir` that created `journal` and joined `m1`, `m2`, then was killed, so the
/// records are only in the journal. Returns the tokens.
fn journal_only_state(dir: &Arc<tempfile::TempDir>) -> Vec<String> {
    killed_after_joins(dir, "journal", &["m1", "m2"])
}

/// A daemon on `dir` that created `room` as `host` and joined `members` to it, then was
/// killed, so the records are only in the journal. Returns the tokens, the host's first.
fn killed_after_joins(dir: &Arc<tempfile::TempDir>, room: &str, members: &[&str]) -> Vec<String> {
    let mut d = spawn_on(dir).expect("ocmd starts");
    let mut tokens = vec![create(&d, room, "host")];
    for name in members {
        tokens.push(join(&d, room, name));
    }
    d.kill9();
    tokens
}

/// Checks that the host's token (`tokens[0]`) of `room` registers and that each member named
/// in `names`, holding the token after it, registers and is heard by the host.
#[track_caller]
fn assert_members_relay(d: &Daemon, room: &str, tokens: &[String], names: &[&str]) {
    assert_eq!(
        tokens.len(),
        names.len() + 1,
        "a token for the host and each name"
    );
    let host = Member::joined(d, room, &tokens[0]);
    for (name, token) in names.iter().zip(&tokens[1..]) {
        Member::new(d, room, token).registered_with(&host, name);
    }
}

#[test]
fn a_corrupt_journal_line_stops_the_start_and_is_left_untouched() {
    let dir = fresh_dir();
    journal_only_state(&dir);
    let journal = journal_in(dir.path());
    let lines = journal_lines(&journal);
    assert_eq!(lines.len(), 3, "one line per record");
    let mut corrupt = lines[0].clone();
    corrupt.extend_from_slice(b"{\"n\": 2, \"op\": \x01 not a record\n");
    corrupt.extend_from_slice(&lines[1]);
    corrupt.extend_from_slice(&lines[2]);
    std::fs::write(&journal, &corrupt).unwrap();
    let state_before = std::fs::read(dir.path().join("room_manager.json")).ok();
    let log = refused_start(&dir, "ocmd started on a corrupt journal");
    assert!(
        log.contains(&journal.display().to_string()) && log.contains("line 2"),
        "the refusal names the journal and the line:\n{log}"
    );
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        corrupt,
        "journal unchanged"
    );
    assert_eq!(
        std::fs::read(dir.path().join("room_manager.json")).ok(),
        state_before,
        "state file unchanged"
    );
}

#[test]
fn a_torn_final_journal_line_is_ignored() {
    let dir = fresh_dir();
    let tokens = journal_only_state(&dir);
    let journal = journal_in(dir.path());
    // The append of record 4 was cut short: its first bytes reached the space ahead.
    let mut torn = journal_data(&journal);
    torn.extend_from_slice(br#"{"n":4,"op":"join","room":"journal","member":{"tok"#);
    torn.resize(torn.len() + SPACE_AHEAD, 0);
    std::fs::write(&journal, &torn).unwrap();
    let d = spawn_on(&dir).expect("ocmd starts despite a torn last line");
    assert_logged(&d, "torn final line was ignored");
    // Every acknowledged record survived: all three tokens relay.
    assert_members_relay(&d, "journal", &tokens, &["m1", "m2"]);
    let r = request(&d, Operation::JoinRoom, "journal", b"\"m2\"");
    assert_eq!(r.token, None, "m2 is still taken");
}

/// journal.old was synced whole before its rotation, so a torn tail there lost acknowledged
/// records: the start stops, the files untouched, whether the journal goes on past the lost
/// record or holds nothing after it, until the operator cuts journal.old as documented.
#[test]
fn a_journal_old_cut_short_before_later_records_stops_the_start_untouched() {
    let dir = fresh_dir();
    killed_after_joins(&dir, "cut", &["m1", "m2", "m3"]);
    // As if a compaction had rotated the first three records to journal.old, and the disk
    // had then lost the third: journal.old ends in a zero-filled hole, and the journal goes
    // on with record 4.
    let journal = journal_in(dir.path());
    let old = dir.path().join("room_manager.json.journal.old");
    let lines = journal_lines(&journal);
    assert_eq!(lines.len(), 4, "one line per record");
    let mut cut = lines[..2].concat();
    cut.extend_from_slice(&vec![0; lines[2].len()]);
    std::fs::write(&old, &cut).unwrap();
    std::fs::write(&journal, &lines[3]).unwrap();
    let log = refused_start(&dir, "ocmd replayed the journal across the lost record");
    assert!(
        log.contains("is cut short at line 3") && log.contains("acknowledged records"),
        "{log}"
    );
    assert_eq!(std::fs::read(&old).unwrap(), cut, "journal.old untouched");
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        lines[3],
        "journal untouched"
    );
    // Without the journal nothing shows that the hole held no synced record either. Ending
    // in nothing but NULs, journal.old looks as a live journal moved to its name would, and
    // the refusal says both.
    std::fs::rename(&journal, dir.path().join("journal.aside")).unwrap();
    let log = refused_start(&dir, "ocmd folded journal.old's hole away");
    let nuls = format!("ends in {} NUL bytes from line 3", lines[2].len());
    assert!(
        log.contains(&nuls) && log.contains("or the disk lost synced records there"),
        "{log}"
    );
    assert_eq!(std::fs::read(&old).unwrap(), cut, "journal.old untouched");
    // The documented way out: cut journal.old before the line named, the journal aside.
    std::fs::write(&old, lines[..2].concat()).unwrap();
    let d = spawn_on(&dir).expect("ocmd starts on the cut journal.old");
    assert_logged(&d, ": 1 room, 2 tokens loaded");
}

/// Records are numbered one by one from the state file's `journal_seq`: a journal that starts
/// past the number due (its state file lost, or older than the journal) stops the start, the
/// files untouched, instead of folding the acknowledged tokens away; with the right state file
/// back, every token is there.
#[test]
fn a_journal_that_skips_records_after_the_state_file_stops_the_start_untouched() {
    let dir = fresh_dir();
    let mut d = spawn_on(&dir).expect("ocmd starts");
    create(&d, "gap", "host");
    join(&d, "gap", "m1");
    d.stop_cleanly();
    drop(d);
    // Records 1 and 2 are folded into the state file; 3 and 4 stay in the journal.
    let mut d = spawn_on(&dir).expect("ocmd restarts");
    join(&d, "gap", "m2");
    join(&d, "gap", "m3");
    d.kill9();
    drop(d);
    let state = dir.path().join("room_manager.json");
    let aside = dir.path().join("state.aside");
    let journal = journal_in(dir.path());
    let journal_bytes = std::fs::read(&journal).unwrap();
    std::fs::rename(&state, &aside).unwrap();
    let log = refused_start(
        &dir,
        "ocmd started on a journal without the state file it follows",
    );
    assert!(
        log.contains("holds record 3 where record 1 was due")
            && log.contains("records 1 to 2 are missing")
            && log.contains("the state file is missing"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        journal_bytes,
        "journal untouched"
    );
    assert!(!state.exists(), "no state file written in its place");
    std::fs::rename(&aside, &state).unwrap();
    let d = spawn_on(&dir).expect("ocmd starts with its state file back");
    assert_logged(&d, ": 1 room, 4 tokens loaded");
}

/// A power cut during an append that no `fdatasync` completed for can leave it as a
/// zero-filled hole with later bytes after it. The hole and everything after it were never
/// acknowledged: the daemon starts with every record before the hole, says what it ignored,
/// and folds the journal away.
#[test]
fn a_zero_filled_hole_in_the_journal_ends_it_as_a_torn_tail() {
    let dir = fresh_dir();
    let tokens = killed_after_joins(&dir, "journal", &["m1", "m2", "m3"]);
    let journal = journal_in(dir.path());
    let lines = journal_lines(&journal);
    assert_eq!(lines.len(), 4, "one line per record");
    // m2's join was being appended when the power went: the block holding its first half
    // reads as zeros, while its second half and m3's join, written later, reached the disk.
    let half = lines[2].len() / 2;
    let mut holed = lines[..2].concat();
    holed.extend_from_slice(&vec![0; half]);
    holed.extend_from_slice(&lines[2][half..]);
    holed.extend_from_slice(&lines[3]);
    holed.resize(holed.len() + SPACE_AHEAD, 0);
    std::fs::write(&journal, &holed).unwrap();
    let d = spawn_on(&dir).expect("ocmd starts despite a zero-filled hole");
    let log = d.log();
    assert!(
        log.contains("a torn tail was ignored")
            && log.contains(&format!("{} from line 3: 2 lines", journal.display())),
        "{log}"
    );
    assert!(log.contains(": 1 room, 2 tokens loaded"), "{log}");
    assert!(
        log.contains("WARN") && log.contains("otherwise check the disk"),
        "the hole is also a warning: {log}"
    );
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "folded");
    // Everything before the hole: the host and m1 relay.
    assert_members_relay(&d, "journal", &tokens[..2], &["m1"]);
    // The joins after it were never acknowledged: their names are free again.
    for name in ["m2", "m3"] {
        let r = request(
            &d,
            Operation::JoinRoom,
            "journal",
            format!("\"{name}\"").as_bytes(),
        );
        assert!(r.token.is_some(), "{name} joins again: {r:?}");
    }
}

/// `ocmd` lays NUL bytes down ahead of its journal appends, so that an append's `fdatasync`
/// writes no new file size. Killed with that space there, it restarts with every record and
/// without a word about a torn tail, and the fold empties the journal.
#[test]
fn a_kill_with_space_laid_ahead_of_the_journal_restarts_with_every_record_and_no_tear() {
    let dir = fresh_dir();
    let mut d = spawn_on(&dir).expect("ocmd starts");
    let tokens = [
        create(&d, "ahead", "host"),
        join(&d, "ahead", "m1"),
        join(&d, "ahead", "m2"),
    ];
    let journal = journal_in(dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let size = std::fs::metadata(&journal).unwrap().len();
        if size >= (journal_data(&journal).len() + SPACE_AHEAD / 4) as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no space laid ahead: {size} bytes"
        );
        thread::sleep(Duration::from_millis(10));
    }
    d.kill9();
    drop(d);
    let records = journal_lines(&journal).len();
    assert_eq!(records, 3, "one line per record");
    let d = spawn_on(&dir).expect("ocmd restarts");
    let log = d.log();
    assert_clean_start(&log);
    assert!(
        log.contains("folded 3 journal records") && !log.contains("torn") && !log.contains("WARN"),
        "{log}"
    );
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "folded");
    assert_members_relay(&d, "ahead", &tokens, &["m1", "m2"]);
}

/// A journal of nothing but space laid down ahead (a stop right after a rotation leaves one
/// if nothing was appended since, and so does a crash) is no journal to fold: `ocmd` starts
/// on it without a word, writes its first record at its first byte, and a clean stop leaves
/// it empty.
#[test]
fn a_journal_of_only_space_ahead_starts_quietly_and_a_clean_stop_empties_it() {
    let dir = fresh_dir();
    let journal = journal_in(dir.path());
    // Stopped with nothing to fold: the space goes, and no state file is written.
    std::fs::write(&journal, vec![0; SPACE_AHEAD]).unwrap();
    let mut d = spawn_on(&dir).expect("ocmd starts");
    d.stop_cleanly();
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "{}", d.log());
    assert!(!d.state.exists());
    drop(d);
    // Written into.
    std::fs::write(&journal, vec![0; SPACE_AHEAD]).unwrap();
    let mut d = spawn_on(&dir).expect("ocmd starts");
    let log = d.log();
    assert_clean_start(&log);
    assert!(
        !log.contains("folded") && !log.contains("torn") && !log.contains("WARN"),
        "{log}"
    );
    let token = create(&d, "ahead", "host");
    assert!(
        std::fs::read(&journal).unwrap().starts_with(b"{\"n\":1,"),
        "the first record at the journal's first byte"
    );
    d.stop_cleanly();
    assert_folded(&d);
    assert!(saved_tokens(&d).contains(&token));
}

/// A zero-filled hole with more after it than one append leaves unsynced (64 KiB) is not a
/// torn append: acknowledged records lie behind it (a media error, a bad copy). `ocmd` refuses
/// to start, naming the journal and the hole's line, and leaves the journal as it was, where
/// a torn tail would have been folded away with those records.
#[test]
fn a_zero_filled_hole_with_synced_records_after_it_stops_the_start() {
    let dir = fresh_dir();
    journal_only_state(&dir);
    let journal = journal_in(dir.path());
    let lines = journal_lines(&journal);
    assert_eq!(lines.len(), 3, "one line per record");
    // m1's join reads as zeros; more than 64 KiB of lines follow (their content is not
    // looked at: the hole alone stops the load).
    let mut holed = lines[0].clone();
    holed.extend_from_slice(&vec![0; lines[1].len()]);
    while holed.len() < 70 * 1024 {
        holed.extend_from_slice(&lines[2]);
    }
    holed.resize(holed.len() + SPACE_AHEAD, 0);
    std::fs::write(&journal, &holed).unwrap();
    let log = refused_start(
        &dir,
        "ocmd started on a journal with acknowledged records behind a hole",
    );
    assert!(
        log.contains(&journal.display().to_string())
            && log.contains("line 2")
            && log.contains("zero-filled hole"),
        "the refusal names the journal, the line and the hole:\n{log}"
    );
    assert_eq!(std::fs::read(&journal).unwrap(), holed, "journal unchanged");
}

/// A clean stop whose final fold is stuck in `fsync` exits after its bound instead of waiting
/// for the disk, and loses nothing: the journal holds every change, and the next start folds
/// it. (The stop used to wait for the fold as long as the disk did.)
#[test]
fn a_clean_stop_stuck_in_its_final_fold_exits_without_it_and_loses_nothing() {
    let (mut d, hold, _library) = spawn_preloaded(fsync_holder, HOLD_FSYNC, Options::default());
    let held = hold.with_extension("held");
    let host = create(&d, "stuck", "alice");
    std::fs::write(&hold, b"").unwrap();
    d.signal(libc::SIGTERM);
    wait_until("the final fold waits in fsync", || held.exists());
    // The daemon gives up on the fold after 10 s, long before the holder lets it go (60 s).
    let gave_up = "state writer did not finish the final fold within 10 s; exiting without it";
    d.wait_for_log_within(gave_up, Duration::from_secs(40));
    let status = d.wait_exit();
    assert!(status.success(), "{status:?}");
    let log = d.log();
    assert!(
        log.contains("stopped: 1 room, 1 member saved in the journal, not folded"),
        "{log}"
    );
    assert!(hold.exists(), "the disk never came back");
    std::fs::remove_file(&hold).unwrap();
    d.restart();
    d.wait_for_log("state: folded 1 journal record");
    d.stop_cleanly();
    assert!(saved_tokens(&d).contains(&host), "the host's token is kept");
}

/// A backup still queued when the daemon stops is skipped, so that the stop's final fold
/// (the same state) does not wait for it: the first backup is held in `fsync`, a second is
/// asked for behind it, then SIGTERM. Once the disk answers, the first is written, the second
/// is said to be skipped, and the stop folds every change.
#[test]
fn a_backup_still_queued_at_a_stop_is_skipped() {
    let (mut d, hold, _library) = spawn_preloaded(fsync_holder, HOLD_FSYNC, Options::default());
    let held = hold.with_extension("held");
    let host = create(&d, "r", "alice");
    std::fs::write(&hold, b"").unwrap();
    d.signal(libc::SIGUSR1);
    wait_until("the first backup waits in fsync", || held.exists());
    d.signal(libc::SIGUSR1);
    wait_until("the second backup asked for", || {
        d.log().matches("SIGUSR1: writing a backup").count() == 2
    });
    d.signal(libc::SIGTERM);
    // Backups are skipped from the stop's first line on.
    d.wait_for_log("stopping: flushing state");
    std::fs::remove_file(&hold).unwrap();
    let status = d.wait_exit();
    assert!(status.success(), "{status:?}");
    let log = d.log();
    assert_eq!(log.matches("state: backup written to ").count(), 1, "{log}");
    assert!(
        log.contains("not written: the daemon is stopping, and the state file it writes at the stop holds every change"),
        "{log}"
    );
    assert!(log.contains("stopped: 1 room, 1 member saved"), "{log}");
    assert!(saved_tokens(&d).contains(&host), "the host's token is kept");
}

/// Builds a shared library for `LD_PRELOAD` that makes `fsync` of a directory fail with `EIO`
/// while the file named by `OCM_TEST_FAIL_DIR_FSYNC` exists, past the first
/// `OCM_TEST_FAIL_DIR_FSYNC_SKIP` such calls (every other `fsync` goes through), in `dir`.
/// Returns its path.
fn directory_fsync_failer(dir: &std::path::Path) -> std::path::PathBuf {
    const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

int fsync(int fd) {
    static int (*real_fsync)(int);
    if (!real_fsync) real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    static int seen;
    const char *flag = getenv("OCM_TEST_FAIL_DIR_FSYNC");
    const char *skip = getenv("OCM_TEST_FAIL_DIR_FSYNC_SKIP");
    struct stat st;
    if (flag && access(flag, F_OK) == 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)
        && __atomic_fetch_add(&seen, 1, __ATOMIC_SEQ_CST) >= (skip ? atoi(skip) : 0)) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}
"#;
    preload_library(dir, "fail_dir_fsync", SOURCE)
}

/// After a failed directory `fsync` (a rotation's fresh journal, or the compactor's new
/// state file), no retry can be trusted: `ocmd` stops with status 1 and says why, and the
/// next start has every token it acknowledged.
#[test]
fn a_failed_directory_fsync_while_serving_stops_ocmd_and_loses_no_acknowledged_token() {
    // The rotation's is the first directory fsync once the flag is there, the compactor's
    // (its state file's rename) the second.
    let build = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let library = directory_fsync_failer(build.path());
    for (skip, when) in [(0, "rotating the journal"), (1, "compacting the journal")] {
        a_failed_directory_fsync_stops_ocmd(&library, skip, when);
    }
}

fn a_failed_directory_fsync_stops_ocmd(library: &std::path::Path, skip: u32, when: &str) {
    let dir = fresh_dir();
    let flag = dir.path().join("fail-directory-fsyncs");
    let options = Options {
        config: Some(format!("{NO_REQUEST_LIMIT}{TINY_COMPACTION}")),
        env: vec![
            ("LD_PRELOAD".into(), library.display().to_string()),
            ("OCM_TEST_FAIL_DIR_FSYNC".into(), flag.display().to_string()),
            ("OCM_TEST_FAIL_DIR_FSYNC_SKIP".into(), skip.to_string()),
        ],
        ..Options::default()
    };
    let mut d = Daemon::spawn(Arc::clone(&dir), options).expect("ocmd starts");
    d.assert_loaded(library);
    let mut tokens = vec![create(&d, "fsync", "host")];
    std::fs::write(&flag, b"").unwrap();
    // Joins until the first rotation or compaction stops the daemon (4 KiB of journal is
    // a few dozen joins); a join it never answered was never acknowledged.
    for n in 0.. {
        assert!(
            n < 10_000,
            "ocmd kept serving after failed directory fsyncs"
        );
        let name = format!("\"m{n}\"");
        match try_request(d.tcp, Operation::JoinRoom, "fsync", name.as_bytes()) {
            Some(reply) => tokens.push(reply.token.expect("a join is answered with a token")),
            None => break,
        }
    }
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "{when}: {status:?}: {}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!(
            "{when}: fsync of the directory failed: Input/output error (os error 5); stopping: \
             after a failed directory fsync no retry can be trusted"
        )),
        "{when}: {log}"
    );
    std::fs::remove_file(&flag).unwrap();
    restart_cleanly(&mut d);
    d.stop_cleanly();
    assert_tokens_saved(&d, &tokens, when);
}

/// A backup whose rename's directory `fsync` fails stops `ocmd` as a compaction's does (the
/// kernel reports the error once, and the journal's entries share the directory), and loses
/// no acknowledged token.
#[test]
fn a_failed_directory_fsync_after_a_backup_stops_ocmd_and_loses_nothing() {
    let build = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let library = directory_fsync_failer(build.path());
    let dir = fresh_dir();
    let flag = dir.path().join("fail-directory-fsyncs");
    let options = Options {
        env: vec![
            ("LD_PRELOAD".into(), library.display().to_string()),
            ("OCM_TEST_FAIL_DIR_FSYNC".into(), flag.display().to_string()),
        ],
        ..Options::default()
    };
    let mut d = Daemon::spawn(Arc::clone(&dir), options).expect("ocmd starts");
    d.assert_loaded(&library);
    let tokens = vec![create(&d, "r", "host"), join(&d, "r", "m")];
    // An idle daemon: the backup's is the next directory fsync.
    std::fs::write(&flag, b"").unwrap();
    d.signal(libc::SIGUSR1);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}: {}", d.log());
    let backup = d.state.with_extension("json.backup");
    assert_logged(
        &d,
        &format!(
            "backup {}: fsync of the directory failed: Input/output error (os error 5); \
             stopping: after a failed directory fsync no retry can be trusted",
            backup.display()
        ),
    );
    std::fs::remove_file(&flag).unwrap();
    restart_cleanly(&mut d);
    d.stop_cleanly();
    assert_tokens_saved(&d, &tokens, "after a backup's failed directory fsync");
}

/// A daemon killed in the middle of a compaction leaves the older records in `journal.old`
/// and the newer ones in the journal: the next start replays both, in that order, and folds
/// them into the state file.
#[test]
fn a_kill_between_rotation_and_compaction_loses_nothing() {
    let dir = fresh_dir();
    let tokens = journal_only_state(&dir);
    let journal = journal_in(dir.path());
    let old = dir.path().join("room_manager.json.journal.old");
    let lines = journal_lines(&journal);
    assert_eq!(lines.len(), 3, "one line per record");
    // The create is in journal.old: the joins replay only if it comes first.
    std::fs::write(&old, &lines[0]).unwrap();
    std::fs::write(&journal, lines[1..].concat()).unwrap();
    let d = spawn_on(&dir).expect("ocmd starts");
    assert_clean_start(&d.log());
    assert!(!old.exists(), "journal.old folded at start");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    assert_members_relay(&d, "journal", &tokens, &["m1", "m2"]);
}

#[test]
fn a_second_daemon_on_the_same_state_refuses_and_names_the_holder() {
    let first = Daemon::start();
    let token = create(&first, "mine", "host");
    let log = refused_start(&first.dir, "a second ocmd started on the same state file");
    assert!(
        log.contains("in use by another ocmd") && log.contains(&format!("pid {}", first.pid())),
        "the refusal names the holder:\n{log}"
    );
    // The first one is unharmed.
    let bob = join(&first, "mine", "bob");
    assert_members_relay(&first, "mine", &[token, bob], &["bob"]);
}

/// The state directory removed whole while the daemon runs, then made again (by hand, or by
/// systemd at the next `StateDirectory=` setup): the daemon fills it again, lock file first,
/// so a second ocmd started on it is refused as before, and the joins acknowledged before the
/// removal survive a `kill -9`.
#[test]
fn a_state_directory_removed_while_serving_is_filled_again_with_its_lock() {
    let mut d = Daemon::start();
    let mut tokens = vec![create(&d, "gone", "alice"), join(&d, "gone", "bob")];
    let dir = d.dir.path().to_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    d.wait_for_log("cannot open a fresh journal");
    std::fs::create_dir(&dir).unwrap();
    d.wait_for_log("was deleted while in use: taken again");
    tokens.push(join(&d, "gone", "carol"));
    let log = refused_start(
        &d.dir,
        "a second ocmd started on a state directory made again",
    );
    assert!(
        log.contains("in use by another ocmd") && log.contains(&format!("pid {}", d.pid())),
        "the refusal names the holder:\n{log}"
    );
    assert_kept_through_a_kill(&mut d, &tokens);
}

/// A clean stop with the state directory removed and not made again exits once it gave up on
/// the writer, says the state is lost, and reports it in its exit status (1, as systemd and
/// scripts read it), not as the success of a stop that saved everything.
#[test]
fn a_stop_that_cannot_write_the_state_again_fails() {
    let mut d = Daemon::start();
    create(&d, "gone", "alice");
    std::fs::remove_dir_all(d.dir.path()).unwrap();
    d.wait_for_log("cannot open a fresh journal");
    d.signal(libc::SIGTERM);
    // The daemon gives up on the writer after 10 s.
    d.wait_for_log_within("stopped: ", Duration::from_secs(40));
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("stopped: 1 room, 1 member, not saved"),
        "the stop says the state is lost:\n{log}"
    );
}

/// Starts `ocmd` (with its HTTP endpoint) and a room, then replaces its state's lock file by
/// one another process holds (the test, naming itself "pid 4242"), in one rename so that no
/// check of the daemon's can come between, and waits for the daemon to name that pid.
/// Returns the daemon, the other process's file (its lock held until dropped), and the
/// lock file's path.
fn serving_with_its_lock_taken() -> (Daemon, std::fs::File, PathBuf) {
    let d = Daemon::start_with(metrics_only());
    create(&d, "locked", "alice");
    let lock = d.dir.path().join("room_manager.json.lock");
    let taken = d.dir.path().join("other.lock");
    let mut other = std::fs::File::create(&taken).unwrap();
    other.try_lock().unwrap();
    writeln!(other, "pid 4242").unwrap();
    std::fs::rename(&taken, &lock).unwrap();
    d.wait_for_log("(pid 4242)");
    (d, other, lock)
}

/// A lock file replaced while in use (deleted, and another ocmd took a new one at its name
/// before the daemon's next check; here the test takes it, in one rename, so that the check
/// cannot come between): the daemon does not take the new file for its own lock, and says
/// once that another process holds it, naming its pid; `/readyz` says not ready until the
/// other process lets go and the daemon takes the lock again.
#[test]
fn a_lock_file_taken_by_another_process_while_serving_is_reported() {
    let (d, other, _) = serving_with_its_lock_taken();
    let log = d.log();
    assert!(
        log.contains("another ocmd took it"),
        "the line says what happened:\n{log}"
    );
    assert!(
        !log.contains("taken again"),
        "the daemon took the other process's lock file for its own:\n{log}"
    );
    let answer = d.http_answer("/readyz");
    assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
    assert!(
        answer
            .1
            .starts_with("not ready: the state's lock file was deleted while in use"),
        "{answer:?}"
    );
    drop(other);
    d.wait_for_log("was deleted while in use: taken again");
    assert_eq!(d.http_get("/readyz"), "ready\n");
}

/// `/readyz` says what the writer's latest check found of a lock file deleted while in use:
/// once the other process's lock file is gone in turn and the lock cannot be taken again (a
/// directory at its name here), it says so, not that another process holds it, which it kept
/// saying before, naming a holder that no longer existed. Ready again once the lock is taken.
#[test]
fn readyz_says_a_lock_that_cannot_be_taken_again_after_another_process_let_it_go() {
    let (d, other, lock) = serving_with_its_lock_taken();
    assert!(
        d.http_answer("/readyz")
            .1
            .contains("another process took it"),
        "{}",
        d.log()
    );
    // The other process stops, its lock file goes, and something else takes the name.
    drop(other);
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    // The writer checks once a second.
    wait_until("/readyz no longer names another process", || {
        !d.http_answer("/readyz")
            .1
            .contains("another process took it")
    });
    let answer = d.http_answer("/readyz");
    assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
    assert!(
        answer.1.starts_with(
            "not ready: the state's lock file was deleted while in use and cannot be taken again"
        ),
        "{answer:?}"
    );
    // Logged at once, not as a reminder of the other failure a minute later.
    d.wait_for_log("it cannot be taken again");
    std::fs::remove_dir(&lock).unwrap();
    d.wait_for_log("was deleted while in use: taken again");
    assert_eq!(d.http_get("/readyz"), "ready\n");
}

/// A lock file whose name cannot be examined (its `stat` fails with an error other than "not
/// found": here a loop of symbolic links in its path, which root meets as well as anyone,
/// unlike a directory's permissions) makes `/readyz` 503 with the error, from the writer's
/// next check until it can look again and finds its own lock there; then it is ready again.
/// The check kept what it had found last, so `/readyz` said ready while the daemon could not
/// tell whether another ocmd could start on the state.
#[test]
fn readyz_says_a_lock_file_that_cannot_be_examined() {
    let dir = fresh_dir();
    // The state is reached through `via`, a link to the directory, which the test turns into a
    // loop and back, each in one rename, so that no check comes between.
    let via = dir.path().join("via");
    let point_via_at = |target: &str| {
        let new = dir.path().join("via.new");
        std::os::unix::fs::symlink(target, &new).unwrap();
        std::fs::rename(&new, &via).unwrap();
    };
    point_via_at(".");
    let d = Daemon::spawn(
        Arc::clone(&dir),
        Options {
            metrics: true,
            state_in: Some("via".into()),
            ..Options::default()
        },
    )
    .expect("ocmd starts");
    create(&d, "locked", "alice");
    assert_eq!(d.http_get("/readyz"), "ready\n");
    point_via_at("via");
    // The writer checks once a second.
    wait_until("/readyz to say not ready", || {
        d.http_answer("/readyz").0 != "HTTP/1.1 200 OK"
    });
    let answer = d.http_answer("/readyz");
    assert_eq!(answer.0, "HTTP/1.1 503 Service Unavailable", "{answer:?}");
    let error = std::io::Error::from_raw_os_error(libc::ELOOP).to_string();
    assert_eq!(
        answer.1,
        format!(
            "not ready: the state's lock file cannot be examined: {error}; whether this ocmd \
             still holds it is unknown, and if not, another ocmd could start on the state and \
             write it too (the log says more)\n"
        )
    );
    d.wait_for_log(&format!(
        "lock file {} cannot be examined: {error}",
        d.state.with_extension("json.lock").display()
    ));
    point_via_at(".");
    wait_until("/readyz to be ready again", || {
        d.http_answer("/readyz").0 == "HTTP/1.1 200 OK"
    });
    d.wait_for_log("can be examined again");
    let log = d.log();
    assert!(
        !log.contains("taken again") && !log.contains("another ocmd took it"),
        "the daemon took its own lock for another's, or took it again:\n{log}"
    );
    join(&d, "locked", "bob");
}

#[test]
fn tombstones_answer_a_few_times_per_interval_and_never_for_unknown_tokens() {
    // Three times the default interval, so that the five datagrams below fall in one
    // interval even when a loaded machine stalls the test for a second or two.
    const INTERVAL: Duration = Duration::from_secs(3);
    let d = Daemon::start_with(metrics_and_config(format!(
        "[liveness]\nclosed_reply_interval_ms = {}\n",
        INTERVAL.as_millis()
    )));
    let (host, bob) = host_and_member(&d, "tomb", "host", "bob");
    host.send("__LEAVE__");
    assert_eq!(bob.recv_raw(), b"__ROOM_CLOSED__");

    // A late datagram with the dead token is told, up to 4 times per interval from one
    // source.
    // The interval starts as the daemon handles the first: taken before it is sent, `told`
    // comes no later.
    let told = Instant::now();
    bob.send("anyone?");
    assert_eq!(bob.recv_raw(), b"__ROOM_CLOSED__");
    for i in 0..4 {
        bob.send(&format!("anyone at all? ({i})"));
    }
    let all_sent = told.elapsed();
    // A never-issued token gets nothing.
    let stranger = Member::new(&d, "tomb", "00112233445566778899aabbccddeeff");
    stranger.send("hello?");
    assert!(
        all_sent < INTERVAL,
        "the machine stalled for {all_sent:?}: the datagrams were not within the interval"
    );
    // A TCP round trip, then the counters: every datagram was handled before it.
    create(&d, "after", "x");
    wait_until(
        "the last of bob's and the stranger's drops are counted",
        || d.metric("ocm_datagrams_dropped_total{reason=\"unknown_token\"}") >= 2.0,
    );
    assert_eq!(d.metric("ocm_closed_room_replies_total"), 4.0);
    for _ in 0..3 {
        assert_eq!(bob.recv_raw(), b"__ROOM_CLOSED__");
    }
    for (who, m) in [("bob", &bob), ("stranger", &stranger)] {
        m.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let got = m.socket.recv_from(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{who} got a reply: {got:?}"
        );
        m.socket.set_nonblocking(false).unwrap();
    }
    // After the interval the dead token is told again (bounded retries, not a sleep).
    let deadline = Instant::now() + PATIENCE;
    bob.socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        assert!(Instant::now() < deadline, "never told again");
        bob.send("still anyone?");
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = bob.socket.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"__ROOM_CLOSED__");
            break;
        }
    }
    assert!(told.elapsed() >= INTERVAL);
}

#[test]
fn refusal_codes_survive_restart() {
    // Names stay taken and rooms stay existing across a crash: the journal replays joins.
    let mut d = Daemon::start();
    create(&d, "keep", "host");
    join(&d, "keep", "bob");
    d.kill9();
    d.restart();
    let r = request(&d, Operation::JoinRoom, "keep", b"\"bob\"");
    assert_eq!(refused(&r), Some(ErrorCode::NameTaken), "{r:?}");
    let r = request(&d, Operation::CreateRoom, "keep", b"\"x\"");
    assert_eq!(refused(&r), Some(ErrorCode::RoomExists), "{r:?}");
}

/// Usernames that look like JSON strings: `"\n"` (four characters: quote, backslash, n,
/// quote), `"a"` with its quotes, and a plain `a` beside it.
const QUOTED_NAMES: [&str; 3] = ["\"\\n\"", "\"a\"", "a"];

/// A JSON-object create or join payload for `name`.
fn named(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "username": name })).unwrap()
}

/// Checks that room `r` of [`QUOTED_NAMES`] (tokens in the same order) works on `d`: every
/// member's message reaches the host under its own name, the host's reaches every member, and
/// every name is still taken.
fn quoted_names_room_works(d: &Daemon, tokens: &[String]) {
    let host = Member::joined(d, "r", &tokens[0]);
    let members: Vec<Member> = QUOTED_NAMES[1..]
        .iter()
        .zip(&tokens[1..])
        .map(|(name, token)| {
            let m = Member::new(d, "r", token);
            m.send("__REGISTER__");
            let probe = format!("probe from {name}");
            m.send(&probe);
            host.recv_until(&format!("{name}: {probe}"));
            m
        })
        .collect();
    host.send("from the host");
    for m in &members {
        m.recv_until(&format!("{}: from the host", QUOTED_NAMES[0]));
    }
    for name in QUOTED_NAMES {
        let r = request(d, Operation::JoinRoom, "r", &named(name));
        assert_eq!(
            refused(&r),
            Some(ErrorCode::NameTaken),
            "{name:?} is no longer taken: {r:?}"
        );
    }
}

/// ocmd stores the name a client chose as it is: names that look like JSON strings must come
/// back unchanged from its own state file, after a compaction and a crash, and after a clean
/// stop (which folds everything into the state file). They were once JSON-decoded at every
/// load, as if the file were the original server's: `"\n"` became a line feed, the host was
/// refused by the name check, and the room and all its tokens were gone.
#[test]
fn names_that_look_like_json_strings_survive_compactions_and_restarts() {
    let mut d = compacting_daemon();
    let mut tokens = Vec::new();
    for (i, name) in QUOTED_NAMES.iter().enumerate() {
        let op = if i == 0 {
            Operation::CreateRoom
        } else {
            Operation::JoinRoom
        };
        let r = request(&d, op, "r", &named(name));
        tokens.push(
            r.token
                .unwrap_or_else(|| panic!("{name:?} refused: {:?}", r.compliance)),
        );
    }
    quoted_names_room_works(&d, &tokens);
    // More records until a compaction has written the room into the state file.
    let mut k = 0;
    wait_until("a compaction while serving", || {
        create(&d, &format!("fill-{k}"), "host");
        k += 1;
        compactions_while_serving(&d.log()) > 0
    });
    d.kill9();
    restart_cleanly(&mut d);
    quoted_names_room_works(&d, &tokens);
    for restart in 0..2 {
        d.stop_cleanly();
        assert_folded(&d);
        restart_cleanly(&mut d);
        let loaded = format!(
            ": {} rooms, {} tokens loaded",
            k + 1,
            k + QUOTED_NAMES.len()
        );
        assert!(d.log().contains(&loaded), "restart {restart}: {}", d.log());
        quoted_names_room_works(&d, &tokens);
    }
}

#[test]
fn sigterm_under_hostile_load_still_stops_before_systemd_would_kill_it() {
    let mut d = Daemon::start_with(metrics_and_config(format!(
        "{NO_REQUEST_LIMIT}[limits]\nmax_output_bytes = 4096\n"
    )));
    // Half-open connections that never finish a frame.
    let mut slow = Vec::new();
    while slow.len() < 200 {
        for _ in 0..50 {
            let mut s = TcpStream::connect(d.tcp).unwrap();
            s.write_all(&[5, 1]).unwrap();
            slow.push(s);
        }
        wait_until("the slow connections are accepted", || {
            d.metric("ocm_tcp_connections_accepted_total") >= slow.len() as f64
        });
    }
    // A peer that pipelines requests and never reads.
    let deaf = {
        let mut s = TcpStream::connect(d.tcp).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        let one = request_bytes(Operation::Other(0x42), &"r".repeat(200), b"\"x\"");
        let chunk = one.repeat(512);
        thread::spawn(move || {
            for _ in 0..64 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    // A datagram flood.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        let to = d.udp;
        thread::spawn(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut bytes = Vec::new();
            ucrp::datagram::encode(b"x", &[b'f'; 32], "flood", &mut bytes).unwrap();
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..64 {
                    let _ = sock.send_to(&bytes, to);
                }
            }
        })
    };
    // And a join storm.
    let got = Arc::new(Mutex::new(Vec::new()));
    let storm = start_storm(d.tcp, 2, "hostile", &stop, &got);
    wait_until("the storm got tokens", || got.lock().unwrap().len() >= 8);
    let (status, took) = d.terminate();
    let received = end_storm(&stop, storm, &got);
    flood.join().unwrap();
    deaf.join().unwrap();
    drop(slow);
    assert!(status.success(), "SIGTERM exit status: {status:?}");
    assert!(took < STOP_LIMIT, "stopped in {took:?}");
    assert_all_saved(&d, &received);
    restart_and_verify(&mut d, &received);
}

/// A state file in which token `h5` was the host of "zz" and later joined "dup" (its entry
/// says "dup"; "zz" still names it as host). The daemon serves `h5` as member "c" of "dup"
/// and leaves "zz" out, while its writer keeps the file as loaded. Creating "zz" made the
/// writer close the file's stale "zz" first, deleting every token that room listed: `h5`,
/// a live member of "dup", gone after a clean restart (found by a review).
#[test]
fn a_room_created_over_one_skipped_at_load_does_not_cost_another_room_a_member() {
    let dir = fresh_dir();
    let state = dir.path().join("room_manager.json");
    std::fs::write(
        &state,
        r#"{"version":1,
            "rooms":{"dup":{"host_token":"h3","members":["h3","h5"]},
                     "zz":{"host_token":"h5","members":["h5"]}},
            "tokens":{"h3":{"username":"b","room_name":"dup","is_host":true},
                      "h5":{"username":"c","room_name":"dup","is_host":false}}}"#,
    )
    .unwrap();
    let mut d = Daemon::spawn(Arc::clone(&dir), Options::default()).expect("ocmd starts");
    let members = |d: &Daemon| -> Vec<String> {
        let presence = presence_of(d, "dup", b"{}");
        presence.members.into_iter().map(|m| m.name).collect()
    };
    assert_eq!(members(&d), ["b", "c"]);
    d.wait_for_log("lists a token whose entry is in room \"dup\"");
    // "zz" was left out at load: its name is free, and a client takes it.
    create(&d, "zz", "new");
    d.stop_cleanly();
    d.restart();
    assert_eq!(members(&d), ["b", "c"], "log:\n{}", d.log());
    assert_eq!(presence_of(&d, "zz", b"{}").members.len(), 1);
}

/// The `register` records in `dir`'s journal.
fn register_records(dir: &Path) -> usize {
    let journal = journal_data(&journal_in(dir));
    String::from_utf8_lossy(&journal)
        .lines()
        .filter(|line| line.contains(r#""op":"register""#))
        .count()
}

/// `ocm` sends `__REGISTER__` every keepalive interval: from the address the member already
/// has, that is no change and writes nothing (a record each would be a journal write per
/// member per interval for as long as the room lives). A REGISTER from a new address is a
/// change and writes one. A join is acknowledged only once its record is durable, after
/// every record emitted before it, so each count is read behind one.
#[test]
fn keepalive_registers_from_an_unchanged_address_write_no_journal_record() {
    let dir = fresh_dir();
    let d = spawn_on(&dir).expect("ocmd starts");
    let (host, m1) = host_and_member(&d, "keep", "host", "m1");
    join(&d, "keep", "after-first-registers");
    assert_eq!(register_records(dir.path()), 2, "one record per member");

    for _ in 0..20 {
        host.send("__REGISTER__");
        m1.send("__REGISTER__");
    }
    // Loopback and the daemon keep one socket's datagrams in order: once the probe is
    // relayed, every REGISTER before it has been handled.
    m1.registered_with(&host, "m1");
    join(&d, "keep", "after-keepalives");
    assert_eq!(
        register_records(dir.path()),
        2,
        "REGISTERs from unchanged addresses wrote records"
    );

    let moved = Member::new(&d, "keep", &m1.token);
    moved.registered_with(&host, "m1");
    join(&d, "keep", "after-the-move");
    assert_eq!(
        register_records(dir.path()),
        3,
        "a REGISTER from a new address writes one record"
    );
}

/// Kills the daemon with SIGKILL, starts it again on what is on disk, stops it cleanly, and
/// checks that every acknowledged token in `tokens` is in the state file it leaves.
#[track_caller]
fn assert_kept_through_a_kill(d: &mut Daemon, tokens: &[String]) {
    d.kill9();
    restart_cleanly(d);
    d.stop_cleanly();
    assert_tokens_saved(d, tokens, "after a kill -9 and a restart");
}

/// A journal deleted while the daemon runs (a cleaner let loose, an `rm` in the wrong
/// place) would still take appends and syncs that no start could read back, and the joins
/// acknowledged since the last state file would be lost at the next start. The daemon puts a
/// fresh journal in its place and writes the state file from memory before it answers the
/// next join; a deleted state file is written again within a second or so. Each is shown by
/// a `kill -9` and a start on what is left on disk.
#[test]
fn state_files_deleted_while_serving_are_written_again_and_lose_no_join() {
    let mut d = Daemon::start_with(metrics_only());
    let mut tokens = vec![create(&d, "gone", "alice"), join(&d, "gone", "bob")];
    std::fs::remove_file(journal_in(d.dir.path())).unwrap();
    tokens.push(join(&d, "gone", "carol"));
    assert!(
        d.log().contains("replaced and state file"),
        "carol's join was answered before the files were written again:\n{}",
        d.log()
    );
    assert!(
        d.metric("ocm_state_write_failures_total") >= 1.0,
        "the append into the deleted journal was not counted as failed"
    );
    assert_eq!(d.metric("ocm_state_files_restored_total"), 1.0);
    d.kill9();
    restart_cleanly(&mut d);

    tokens.push(join(&d, "gone", "dave"));
    std::fs::remove_file(&d.state).unwrap();
    d.wait_for_log("written again from memory");
    assert!(d.state.exists(), "the log says so, but no state file");
    assert_eq!(
        d.metric("ocm_state_files_restored_total"),
        1.0,
        "since the restart"
    );
    assert_kept_through_a_kill(&mut d, &tokens);
}

/// A journal moved from its name while the daemon serves (by `move_away`, given the journal's
/// path and another in its directory) still has a name: appends go on into it and are
/// acknowledged, but no start reads it, so a `kill -9` would lose every join since the last
/// state file. The writer's file check (once a second) sees that the file at the journal's
/// name is not the daemon's and does what it does for a deleted journal: a fresh journal at
/// the name, the state file written from memory. Shown by the state file holding every join,
/// one made in the window among them, and by a `kill -9` and a start on what is left on disk.
/// The moved file is left alone.
fn assert_a_journal_moved_away_is_replaced(how: &str, move_away: impl FnOnce(&Path, &Path)) {
    let mut d = Daemon::start_with(metrics_only());
    let mut tokens = vec![create(&d, "moved", "alice"), join(&d, "moved", "bob")];
    let journal = journal_in(d.dir.path());
    let elsewhere = d.dir.path().join("elsewhere");
    let moved = Instant::now();
    move_away(&journal, &elsewhere);
    // Acknowledged into the moved file, unless the check came first.
    tokens.push(join(&d, "moved", "carol"));
    wait_until(&format!("a journal {how} to be back at its name"), || {
        journal.exists()
    });
    let took = moved.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "noticed after {took:?}, not at the writer's check a second later"
    );
    d.wait_for_log("replaced and state file");
    assert_logged(
        &d,
        "room_manager.json.journal is no longer the file at its name (renamed away, or that \
         name removed while the file had another, a hard link)",
    );
    assert_tokens_saved(&d, &tokens, how);
    assert_eq!(d.metric("ocm_state_files_restored_total"), 1.0);
    assert_eq!(d.http_get("/readyz"), "ready\n");
    assert!(elsewhere.exists(), "the moved file was left alone");
    tokens.push(join(&d, "moved", "dave"));
    assert_kept_through_a_kill(&mut d, &tokens);
}

/// `mv room_manager.json.journal elsewhere` while serving: the file keeps its one name, so the
/// count of names after each sync never saw it (see [`assert_a_journal_moved_away_is_replaced`]).
#[test]
fn a_journal_renamed_away_while_serving_is_replaced_and_loses_no_join() {
    assert_a_journal_moved_away_is_replaced("renamed away", |journal, elsewhere| {
        std::fs::rename(journal, elsewhere).unwrap();
    });
}

/// `ln room_manager.json.journal copy`, then `rm room_manager.json.journal` (the daemon's name,
/// not the copy's): the file still has one name, so the daemon said "has one name again" and
/// ready, with nothing at the journal's name (see [`assert_a_journal_moved_away_is_replaced`]).
#[test]
fn a_journal_whose_own_name_was_removed_while_it_had_another_is_replaced_and_loses_no_join() {
    assert_a_journal_moved_away_is_replaced("its own name removed", |journal, copy| {
        std::fs::hard_link(journal, copy).unwrap();
        std::fs::remove_file(journal).unwrap();
    });
}

/// A library for `LD_PRELOAD` that, as it loads, puts `ocmd` under a seccomp filter refusing
/// `statx` with `errno`: `ENOSYS` as a kernel before 4.11 does, `EPERM` as container
/// runtimes' default profiles did before they knew the call, or any other a filter may be
/// set to give (glibc's `statx` emulates the call after `ENOSYS`, not after the others).
fn statx_refuser(dir: &Path, errno: &str) -> PathBuf {
    const SOURCE: &str = r#"
#include <errno.h>
#include <stddef.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((constructor)) static void refuse_statx(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_statx, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | @ERRNO@),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = { sizeof filter / sizeof filter[0], filter };
    /* A filter that did not take would let the test pass on nothing: refuse to run. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
        _exit(97);
    }
}
"#;
    let source = SOURCE.replace("@ERRNO@", errno);
    preload_library(dir, &format!("refuse_statx_{errno}"), &source)
}

/// Where `statx` is refused, creates and joins are still acknowledged, durably: the writer
/// counts the journal's names after each sync with `fstat` instead. Under a filter that said
/// `EPERM` it took the refusal for a failed append and retried it for ever, so that no create
/// or join was ever answered ("cannot append to journal …: Operation not permitted").
#[test]
fn creates_and_joins_are_acknowledged_where_statx_is_refused() {
    for errno in ["EPERM", "ENOSYS", "EACCES"] {
        let (mut d, _, _library) = spawn_preloaded(
            |dir| statx_refuser(dir, errno),
            ("OCM_UNUSED", "unused"),
            metrics_only(),
        );
        let created = try_request(d.tcp, Operation::CreateRoom, "nostatx", b"\"alice\"");
        assert!(
            created.is_some_and(|r| r.token.is_some()),
            "{errno}: the create was answered\n{}",
            d.log()
        );
        let joined = try_request(d.tcp, Operation::JoinRoom, "nostatx", b"\"bob\"");
        assert!(
            joined.is_some_and(|r| r.token.is_some()),
            "{errno}: the join was answered"
        );
        assert_eq!(d.metric("ocm_state_write_failures_total"), 0.0, "{errno}");
        assert!(!d.log().contains("cannot append"), "{errno}: {}", d.log());

        // Durable: a kill -9 keeps both.
        d.kill9();
        d.restart();
        assert_eq!(
            refused(&request(&d, Operation::JoinRoom, "nostatx", b"\"bob\"")),
            Some(ErrorCode::NameTaken),
            "{errno}"
        );
    }
}
