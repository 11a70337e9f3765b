//! `ocmd`: flags, logging, and start-up. Everything else is in the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ocm_server::{config, Config, Server};

/// The Online Chat Messenger daemon: TCRP handshakes over TCP, chat relay over UDP.
#[derive(Debug, Parser)]
#[command(name = "ocmd", version)]
struct Args {
    /// TOML configuration file (every key has an embedded default).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// TCP address for create/join handshakes [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Option<SocketAddr>,
    /// UDP address for chat datagrams [default: 127.0.0.1:9091].
    #[arg(long, value_name = "ADDR:PORT")]
    udp: Option<SocketAddr>,
    /// State file [default: ./room_manager.json].
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// Metrics HTTP address, or "off" [default: 127.0.0.1:9092].
    #[arg(long, value_name = "ADDR:PORT|off")]
    metrics: Option<String>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
}

fn effective_config(args: &Args) -> Result<Config, ocm_server::Error> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(tcp) = args.tcp {
        config.listen.tcp = tcp;
    }
    if let Some(udp) = args.udp {
        config.listen.udp = udp;
    }
    if let Some(state) = &args.state {
        config.state.path = state.clone();
    }
    if let Some(metrics) = &args.metrics {
        config.listen.metrics = metrics.clone();
    }
    config.validate().map_err(ocm_server::Error::Config)?;
    Ok(config)
}

/// env_logger to stderr. `RUST_LOG` wins; otherwise the configured level. Under journald
/// (`JOURNAL_STREAM` set) lines carry `<N>` syslog priorities and no timestamp of their own.
fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(spec) => {
            builder.parse_filters(&spec);
        }
        Err(_) => {
            builder.filter_level(log::LevelFilter::Trace);
        }
    }
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}", record.args())
        });
    }
    builder.init();
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(config::log_level(level).unwrap_or(log::LevelFilter::Info));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match effective_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ocmd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        eprintln!("ocmd: configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log.level);
    let server = match Server::bind(config, args.config.clone()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            eprintln!("ocmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
