//! `ocm-bench`: a load generator and benchmark for `ocmd`.
//!
//! It speaks TCRP and UCRP through the `tcrp` and `ucrp` codecs (no code from the daemon),
//! starts its own `ocmd` on free loopback ports for every run, and reports throughput, loss
//! (attributed with the daemon's metrics and the kernel's socket counters), latency, handshake
//! rates, memory and start-up time, and in a long soak whether anything in the daemon grows
//! or is left behind under churn. See `docs/BENCHMARKS.md` for the modes and the results.

mod ceiling;
mod cli;
mod daemon;
mod epoll;
mod error;
mod fanout;
mod handshake;
mod inflight;
mod matrix;
mod members;
mod memory;
mod receivers;
mod report;
mod smoke;
mod soak;
mod stalls;
mod svg;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{CapsArg, Cli, Common, FanoutArgs, Mode, PacerThread, SenderPriority};
use crate::daemon::{is_tmpfs, Launcher, StateDir};
use crate::error::{Error, Result};
use crate::fanout::Pace;
use crate::inflight::Clients;
use crate::receivers::Draining;
use crate::report::print_json;

/// Builds the launcher from the shared flags: `ocmd` defaults to the binary beside this one,
/// the state root to `bench-state` in the target directory (a real disk, unlike a tmpfs /tmp).
fn launcher(common: &Common) -> Result<Launcher> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        context: "find own executable".into(),
        source,
    })?;
    let exe_dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let ocmd = common.ocmd.clone().unwrap_or_else(|| exe_dir.join("ocmd"));
    if !ocmd.exists() {
        return Err(Error::Usage(format!(
            "{} does not exist: build it (cargo build --release --bins) or pass --ocmd",
            ocmd.display()
        )));
    }
    if !common.config.exists() {
        return Err(Error::Usage(format!(
            "{} does not exist: run from the workspace root or pass --config",
            common.config.display()
        )));
    }
    let state_root = common.state_dir.clone().unwrap_or_else(|| {
        exe_dir
            .parent()
            .map_or_else(|| exe_dir.clone(), PathBuf::from)
            .join("bench-state")
    });
    std::fs::create_dir_all(&state_root).map_err(|source| Error::Io {
        context: format!("create {}", state_root.display()),
        source,
    })?;
    if is_tmpfs(&state_root) {
        eprintln!(
            "ocm-bench: warning: {} is on tmpfs; fsync is free there, so handshake rates overstate a disk",
            state_root.display()
        );
    }
    let nice = daemon::settable_nice(common.daemon_nice).unwrap_or_else(|warning| {
        eprintln!("ocm-bench: warning: {warning}");
        0
    });
    if nice != 0 {
        println!("ocm-bench: ocmd runs at nice {nice}, this generator at 0");
    }
    Ok(Launcher {
        ocmd,
        config: common.config.clone(),
        state_root,
        nice,
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.05))
}

/// Runs the chosen mode with the shared flags applied.
fn run(cli: Cli) -> Result<()> {
    let common = &cli.common;
    fanout::set_paced_senders_realtime(common.sender_priority == SenderPriority::Realtime);
    fanout::set_paced_by_receiver(common.pacer == PacerThread::Receiver);
    fanout::set_catch_up(Duration::from_millis(common.catch_up_ms));
    fanout::set_segmented_sends(common.sender_segments);
    let draining = draining(common);
    match cli.mode {
        Mode::Ceiling {
            members,
            bytes,
            duration,
        } => run_ceiling(common, draining, members, bytes, duration),
        Mode::Fanout(args) => run_fanout(common, draining, &args),
        Mode::Sweep {
            members,
            senders,
            bytes,
            caps,
            step,
            steps,
            loss_pct,
        } => run_sweep(
            common, draining, members, senders, bytes, caps, step, steps, loss_pct,
        ),
        Mode::Handshakes {
            rooms,
            joins,
            concurrency,
            client_threads,
            preload,
            repeat,
        } => run_handshakes(
            common,
            rooms,
            joins,
            concurrency,
            client_threads,
            preload,
            repeat,
        ),
        Mode::Memory {
            members,
            room_size,
            concurrency,
            client_threads,
        } => run_memory(common, members, room_size, concurrency, client_threads),
        Mode::Soak {
            duration,
            workers,
            max_members,
            sample_every,
            reload_every,
        } => run_soak(
            common,
            duration,
            workers,
            max_members,
            sample_every,
            reload_every,
        ),
        Mode::Smoke => {
            let launcher = launcher(common)?;
            smoke::run(&launcher, draining, common.client_rcvbuf)
        }
        Mode::Matrix {
            markdown,
            svg,
            json_out,
            duration,
            state_tokens,
            command,
            from_json,
        } => match from_json {
            Some(path) => rerender_matrix(&path, &markdown, &svg),
            None => run_matrix(
                common,
                &matrix::Plan {
                    duration: secs(duration),
                    state_tokens,
                    draining,
                    client_rcvbuf: common.client_rcvbuf,
                    command,
                },
                &markdown,
                &svg,
                json_out.as_deref(),
            ),
        },
    }
}

/// How the receiver threads drain the members' sockets, from the shared flags.
fn draining(common: &Common) -> Draining {
    Draining {
        threads: common.receivers,
        poll: Duration::from_micros(common.receiver_poll_us),
        sweep: common.receiver_sweep,
        // Turned on by the paced fan-out runs, which report the read lag.
        stamp_arrivals: false,
    }
}

/// `ceiling`: the sendto ceiling alone, no daemon.
fn run_ceiling(
    common: &Common,
    draining: Draining,
    members: usize,
    bytes: usize,
    duration: f64,
) -> Result<()> {
    let r = ceiling::run(
        members,
        bytes,
        secs(duration),
        draining,
        common.client_rcvbuf,
    )?;
    r.print();
    print_json(common.json, "ceiling", &r);
    Ok(())
}

/// `fanout`: one room (or `--rooms` of them) at one pace, beside the ceiling unless
/// `--no-ceiling`.
fn run_fanout(common: &Common, draining: Draining, args: &FanoutArgs) -> Result<()> {
    let launcher = launcher(common)?;
    let ceiling = fanout_ceiling(common, draining, args)?;
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let rooms = (0..args.rooms)
        .map(|i| {
            let name = match i {
                0 => "bench".to_owned(),
                i => format!("bench-{i}"),
            };
            let (tcp, udp, rcvbuf) = (daemon.tcp, daemon.udp, common.client_rcvbuf);
            members::build_room(tcp, udp, &name, args.members, args.caps, rcvbuf)
        })
        .collect::<Result<Vec<_>>>()?;
    let pace = args.rate.map_or(Pace::Max, Pace::Rate);
    let mut r = fanout::measure_rooms(
        &mut daemon,
        &rooms,
        args.senders,
        args.bytes,
        args.caps,
        pace,
        secs(args.duration),
        draining,
    )?;
    r.ceiling_per_sec = ceiling;
    r.print();
    print_json(common.json, "fanout", &r);
    Ok(())
}

/// The ceiling a fan-out run is compared with (at most 3 s), printed; `None` with
/// `--no-ceiling`.
fn fanout_ceiling(common: &Common, draining: Draining, args: &FanoutArgs) -> Result<Option<f64>> {
    if args.no_ceiling {
        return Ok(None);
    }
    let c = ceiling::run(
        args.members * args.rooms,
        args.bytes,
        secs(args.duration.min(3.0)),
        draining,
        common.client_rcvbuf,
    )?;
    c.print();
    Ok(Some(c.received_per_sec))
}

/// `sweep`: the highest rate with loss under `loss_pct`, after the ceiling it is compared
/// with.
// One argument per flag of the mode, as `fanout::sweep` takes them.
#[allow(clippy::too_many_arguments)]
fn run_sweep(
    common: &Common,
    draining: Draining,
    members: usize,
    senders: usize,
    bytes: usize,
    caps: CapsArg,
    step: f64,
    steps: usize,
    loss_pct: f64,
) -> Result<()> {
    let launcher = launcher(common)?;
    let c = ceiling::run(
        members,
        bytes,
        secs(step.max(2.0)),
        draining,
        common.client_rcvbuf,
    )?;
    c.print();
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let room = members::build_room(
        daemon.tcp,
        daemon.udp,
        "sweep",
        members,
        caps,
        common.client_rcvbuf,
    )?;
    let r = fanout::sweep(
        &mut daemon,
        &room,
        senders,
        bytes,
        caps,
        secs(step),
        steps,
        loss_pct,
        draining,
        c.received_per_sec,
    )?;
    r.print();
    print_json(common.json, "sweep", &r);
    Ok(())
}

/// `handshakes`: room creates and joins on one daemon, optionally after a preload.
fn run_handshakes(
    common: &Common,
    rooms: usize,
    joins: usize,
    concurrency: usize,
    client_threads: usize,
    preload: usize,
    repeat: usize,
) -> Result<()> {
    let launcher = launcher(common)?;
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let r = handshake::run(
        &daemon,
        is_tmpfs(dir.path()),
        rooms,
        joins,
        Clients {
            connections: concurrency,
            threads: client_threads,
        },
        preload,
        repeat,
    )?;
    daemon.check_alive()?;
    r.print();
    print_json(common.json, "handshakes", &r);
    Ok(())
}

/// `memory`: resident size per member and start-up time.
fn run_memory(
    common: &Common,
    members: usize,
    room_size: usize,
    concurrency: usize,
    client_threads: usize,
) -> Result<()> {
    let launcher = launcher(common)?;
    let r = memory::run(
        &launcher,
        members,
        room_size,
        Clients {
            connections: concurrency,
            threads: client_threads,
        },
    )?;
    r.print();
    print_json(common.json, "memory", &r);
    Ok(())
}

/// `soak`: churn for a while, then fail when anything grew or was left behind.
fn run_soak(
    common: &Common,
    duration: f64,
    workers: usize,
    max_members: usize,
    sample_every: f64,
    reload_every: f64,
) -> Result<()> {
    let plan = soak::Plan {
        duration: secs(duration),
        workers,
        max_members,
        sample_every: secs(sample_every),
        reload_every: Duration::from_secs_f64(reload_every.max(0.0)),
        rcvbuf: common.client_rcvbuf,
    };
    // Refused before a daemon is started for nothing.
    plan.check()?;
    let launcher = launcher(common)?;
    let dir = StateDir::new(&launcher.state_root)?;
    let mut daemon = launcher.spawn(&dir)?;
    let r = soak::run(&mut daemon, &dir, plan)?;
    r.print();
    print_json(common.json, "soak", &r);
    let problems = r.problems();
    if !problems.is_empty() {
        return Err(Error::Soak(problems.join("; ")));
    }
    Ok(())
}

/// `matrix --from-json`: renders the report and chart again from a run's saved results.
fn rerender_matrix(path: &Path, markdown: &Path, svg: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("read {}", path.display()),
        source,
    })?;
    let results: matrix::Results = serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    matrix::write(&results, markdown, svg, None)?;
    println!("wrote {} and {}", markdown.display(), svg.display());
    Ok(())
}

/// `matrix`: the standard matrix, then its report, chart and (optionally) raw results.
fn run_matrix(
    common: &Common,
    plan: &matrix::Plan,
    markdown: &Path,
    svg: &Path,
    json_out: Option<&Path>,
) -> Result<()> {
    let launcher = launcher(common)?;
    let results = matrix::run(&launcher, plan)?;
    matrix::write(&results, markdown, svg, json_out)?;
    println!("wrote {} and {}", markdown.display(), svg.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
