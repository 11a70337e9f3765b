//! `ocmd`: flags, logging, and start-up. Everything else is in the library.

mod man_page;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use ocm_server::config::{self, Overrides};
use ocm_server::{Config, Server};

/// The Online Chat Messenger daemon: TCRP handshakes over TCP, chat relay over UDP.
#[derive(Debug, Parser)]
#[command(name = "ocmd", version)]
struct Args {
    /// TOML configuration file (every key has an embedded default).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// TCP address for the TCRP requests: create/join handshakes, room lists, presence and
    /// history [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_listen_addr)]
    tcp: Option<SocketAddr>,
    /// UDP address for chat datagrams [default: 127.0.0.1:9091].
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_listen_addr)]
    udp: Option<SocketAddr>,
    /// State file [default: ./room_manager.json].
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// Metrics HTTP address, or "off" [default: 127.0.0.1:9092].
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = config::parse_metrics_flag)]
    metrics: Option<String>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the ocmd(8) manual page (roff) and exit: for scripts/install.sh and packagers.
    #[arg(long, hide = true, exclusive = true)]
    generate_man: bool,
}

/// ocmd's command line: the flags of [`Args`], and after them what the daemon does on
/// signals and with sockets passed by systemd, which no flag shows.
fn command() -> clap::Command {
    let mut after = String::from("Signals:\n");
    for (signal, effect) in man_page::SIGNALS {
        after.push_str(&format!("  {signal:<16} {effect}\n"));
    }
    after.push_str(
        "\nSockets passed by systemd (LISTEN_FDS, a socket unit) are served instead of binding \
         --tcp,\n--udp and, when named \"metrics\", --metrics. docs/OPERATIONS.md has the \
         details; man ocmd has\nthe exit statuses, the environment and the files.",
    );
    Args::command().after_help(after)
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            tcp: self.tcp,
            udp: self.udp,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            ..Overrides::default()
        }
    }
}

/// The file as read (or the defaults) and the effective configuration with flags applied.
fn load_config(args: &Args) -> Result<(Config, Config), ocm_server::Error> {
    let file = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let config = file
        .with_overrides(&args.overrides())
        .map_err(ocm_server::Error::Config)?;
    Ok((file, config))
}

/// Whether standard error is journald's stream: `JOURNAL_STREAM` names its device and inode
/// (`dev:ino`), and they are standard error's own. The variable alone is inherited by children
/// whose standard error went elsewhere (a terminal, a file), which would get `<N>` prefixes
/// and no timestamps (`systemd.exec(5)` asks for this check).
fn stderr_is_journal() -> bool {
    static IS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IS.get_or_init(|| {
        let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
            return false;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
            return false;
        };
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `stat` when it returns 0, which is checked before it is read.
        if unsafe { libc::fstat(libc::STDERR_FILENO, stat.as_mut_ptr()) } != 0 {
            return false;
        }
        // SAFETY: initialized by the successful fstat above.
        let stat = unsafe { stat.assume_init() };
        stat.st_dev == dev && stat.st_ino == ino
    })
}

/// env_logger to stderr. `RUST_LOG` wins; otherwise the configured level. Under journald
/// (`JOURNAL_STREAM` naming standard error) lines carry `<N>` syslog priorities and no timestamp
/// of their own; elsewhere each line of an entry carries env_logger's header (timestamp, level,
/// target).
fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    match config::rust_log() {
        Some(spec) => {
            builder.parse_filters(&spec);
        }
        None => {
            builder.filter_level(log::LevelFilter::Trace);
        }
    }
    if stderr_is_journal() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            // journald makes each line an entry: every line needs its priority.
            let text = record.args().to_string();
            for line in text.lines() {
                writeln!(buf, "<{priority}>{line}")?;
            }
            Ok(())
        });
    } else {
        builder.format(|buf, record| {
            // env_logger's own header, on every line of an entry: a multi-line one (a TOML
            // error in a rejected reload) stays whole under `grep ERROR` or a log shipper
            // that takes a line for an entry.
            use env_logger::fmt::style::{AnsiColor, Style};
            let level = record.level();
            let style = buf.default_level_style(level);
            // Brackets dimmed as env_logger dims them, when it colours at all (every level
            // has a colour of its own then).
            let dim = if style == Style::new() {
                Style::new()
            } else {
                AnsiColor::BrightBlack.on_default()
            };
            let header = format!(
                "{dim}[{dim:#}{} {style}{level:<5}{style:#} {}{dim}]{dim:#}",
                buf.timestamp(),
                record.target()
            );
            let text = record.args().to_string();
            if text.is_empty() {
                return writeln!(buf, "{header}");
            }
            for line in text.lines() {
                writeln!(buf, "{header} {line}")?;
            }
            Ok(())
        });
    }
    builder.init();
    match config::rust_log() {
        None => {
            log::set_max_level(config::log_level(level).unwrap_or(log::LevelFilter::Info));
            if let Some(why) = config::rust_log_ignored() {
                log::warn!("RUST_LOG {why}: ignored, [log] level applies");
            }
        }
        Some(spec) => {
            let silenced = config::errors_filtered_out(&spec);
            if !silenced.is_empty() {
                // Past the logger, which would drop it: the filter is obeyed, but not unseen.
                print_line(
                    4,
                    &format!(
                        "ocmd: RUST_LOG={spec:?} turns off even the errors of {} (a failed \
                         journal write, a rejected reload); the daemon's log targets are \
                         ocmd and ocm_server::*",
                        silenced.join(", ")
                    ),
                );
            }
        }
    }
}

/// Prints why the daemon cannot start where the logger cannot: before it is set up, or
/// when its level shows no errors. Under journald every line carries the error priority,
/// so `journalctl -p warning` shows why a unit failed.
fn print_fatal(error: &dyn std::fmt::Display) {
    print_line(3, &format!("ocmd: {error}"));
}

/// Writes `text` to standard error past the logger, each line with the syslog `priority`
/// under journald (3 error, 4 warning). Best effort, unlike `eprintln!`, which panics on a
/// closed standard error and would turn the exit status into 101.
fn print_line(priority: u8, text: &str) {
    let prefix = if stderr_is_journal() {
        format!("<{priority}>")
    } else {
        String::new()
    };
    let mut stderr = std::io::stderr().lock();
    for line in text.lines() {
        let _ = writeln!(stderr, "{prefix}{line}");
    }
}

/// Logs why the daemon stops, once: at error level, or on standard error if the configured
/// level hides errors (`level = "off"`).
fn log_fatal(error: &dyn std::fmt::Display) {
    if log::log_enabled!(log::Level::Error) {
        log::error!("{error}");
    } else {
        print_fatal(error);
    }
}

/// Makes glibc map every allocation of 1 MiB or more for itself and unmap it when it is freed.
/// By default glibc raises that threshold to the size of a mapped block once one is freed (up
/// to 32 MiB), so after the first password hash each later one took argon2's 19 MiB from a
/// thread arena, which it does not trim: wrong passwords from a dozen source addresses, which
/// anyone who can reach the TCP port may send, left the daemon some 150 MB larger for good. A
/// fixed threshold turns that adjustment off. (musl maps blocks that large by itself.)
fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Blocks this large or larger are mapped for themselves.
        const MMAP_THRESHOLD_BYTES: libc::c_int = 1024 * 1024;
        // SAFETY: mallopt(3) takes no pointer; called before any other thread is started.
        // It fails only for an unknown option or a value over 32 MiB (then nothing changes).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
    }
}

fn main() -> ExitCode {
    let args = match command()
        .try_get_matches()
        .and_then(|matches| Args::from_arg_matches(&matches))
    {
        Ok(args) => args,
        // --help and --version: to standard output, as clap would.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A usage error: written like any other reason not to start (exit status 2).
        Err(e) => {
            let text = e.render().to_string();
            print_fatal(&text.trim_end().trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if args.generate_man {
        let mut stdout = std::io::stdout().lock();
        return match man_page::write(command(), &mut stdout).and_then(|()| stdout.flush()) {
            Ok(()) => ExitCode::SUCCESS,
            // A reader that stopped early (`| head`) had what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                print_fatal(&format!("cannot write the manual page: {e}"));
                ExitCode::FAILURE
            }
        };
    }
    let (file_config, config) = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            print_fatal(&e);
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        // The state checks a start would fail on before it reads anything.
        if let Err(e) = ocm_server::persist::refuse_linked_state(&config.state.path) {
            print_fatal(&e);
            return ExitCode::from(2);
        }
        let mut stdout = std::io::stdout().lock();
        let written = stdout
            .write_all(config.to_toml().as_bytes())
            .and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            // A reader that stopped early (`| grep -q …`, `| head`): the check itself passed.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                print_fatal(&format!(
                    "configuration OK, but it cannot be written to standard output: {e}"
                ));
                return ExitCode::FAILURE;
            }
        }
        // Best effort, as in `print_fatal`: `eprintln!` panics on a broken pipe.
        let _ = writeln!(std::io::stderr(), "ocmd: configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log.level);
    map_large_allocations();
    ocm_server::panics::end_the_process_on_any_panic();
    let server = match Server::bind(file_config, args.config.clone(), args.overrides()) {
        Ok(s) => s,
        Err(e) => {
            log_fatal(&e);
            // Sockets passed by systemd that cannot be used are a mistake in the socket
            // units, which a restart cannot mend (the unit's RestartPreventExitStatus=2).
            return match e {
                ocm_server::Error::Activation(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            };
        }
    };
    match server.run() {
        Ok(stopped) if stopped.kept_the_state() => ExitCode::SUCCESS,
        // Already logged at error: the exit status is for systemd and scripts.
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            log_fatal(&e);
            ExitCode::FAILURE
        }
    }
}
