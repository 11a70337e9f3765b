//! `ocm`: the terminal client of Online Chat Messenger.
//!
//! ```text
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] create ROOM --name NAME [--keepalive SECS] [--original]
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] join   ROOM --name NAME [--keepalive SECS] [--original]
//! ```
//!
//! This file owns the command line, the logger and the exit codes; the work is in
//! [`handshake`] (TCP: REQUEST → COMPLIANCE → COMPLETE for the token) and [`chat`] (UDP:
//! register, relay, keepalive, leave), which get their bytes from the `tcrp` and `ucrp`
//! crates. Messages from the room go to standard output, one per line; the client's own
//! remarks (`* joined ...`, `* message too long ...`) and errors go to standard error.
//!
//! Exit codes: 0 after leaving or when the host closed the room; 1 when the server cannot be
//! reached or misbehaves; 2 for a bad command line, an invalid name, or a refusal.

mod chat;
mod error;
mod handshake;
mod input;
mod render;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tcrp::names;

use crate::error::ClientError;
use crate::handshake::Verb;

/// Terminal client for the ocmd chat daemon.
#[derive(Debug, Parser)]
#[command(name = "ocm", version)]
struct Cli {
    /// Host name or IP address of the daemon.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    server: String,
    /// TCP port of the handshake (create/join).
    #[arg(long, global = true, default_value_t = 9090, value_parser = clap::value_parser!(u16).range(1..))]
    tcp_port: u16,
    /// UDP port of the chat.
    #[arg(long, global = true, default_value_t = 9091, value_parser = clap::value_parser!(u16).range(1..))]
    udp_port: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a room, host it and chat in it (the room closes when you leave).
    Create(RoomArgs),
    /// Join an existing room and chat in it.
    Join(RoomArgs),
}

#[derive(Debug, clap::Args)]
struct RoomArgs {
    /// The room's name.
    room: String,
    /// Your name in the room.
    #[arg(long)]
    name: String,
    /// Seconds between keepalives (re-sent __REGISTER__).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    keepalive: u32,
    /// Send the original client's request (a bare JSON name: no keepalive promise, no
    /// notices, sequence numbers or batches).
    #[arg(long)]
    original: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet by default: the terminal is the chat. RUST_LOG=debug shows the protocol steps.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ocm: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), ClientError> {
    let (verb, args) = match cli.command {
        Command::Create(args) => (Verb::Create, args),
        Command::Join(args) => (Verb::Join, args),
    };
    let room_name = names::check_room_name(args.room.as_bytes()).map_err(|rule| {
        ClientError::InvalidRoomName {
            room: args.room.clone(),
            rule,
        }
    })?;
    names::check_username(&args.name).map_err(|rule| ClientError::InvalidUsername {
        name: args.name.clone(),
        rule,
    })?;

    let request = handshake::build_request(&args.name, args.keepalive, args.original);
    let mut stream = handshake::connect(&cli.server, cli.tcp_port)?;
    let token = handshake::exchange(&mut stream, verb, room_name, &request)?;
    // Chat with the very address the handshake reached, not a fresh resolution of the name.
    let server_ip = stream
        .peer_addr()
        .map_err(ClientError::io("reading the server's address"))?
        .ip();
    drop(stream);

    let session = chat::Session::open(SocketAddr::new(server_ip, cli.udp_port), room_name, token)?;
    chat::run(
        session,
        verb,
        &args.name,
        Duration::from_secs(u64::from(args.keepalive)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_flags() {
        let cli = Cli::try_parse_from(["ocm", "join", "lobby", "--name", "alice"]).unwrap();
        assert_eq!(cli.server, "127.0.0.1");
        assert_eq!((cli.tcp_port, cli.udp_port), (9090, 9091));
        let Command::Join(args) = cli.command else {
            panic!("not a join: {:?}", cli.command)
        };
        assert_eq!((args.room.as_str(), args.name.as_str()), ("lobby", "alice"));
        assert_eq!(args.keepalive, 10);
        assert!(!args.original);

        let cli = Cli::try_parse_from([
            "ocm",
            "--server",
            "::1",
            "--tcp-port",
            "1",
            "--udp-port",
            "2",
            "create",
            "r",
            "--name",
            "b",
            "--keepalive",
            "3",
            "--original",
        ])
        .unwrap();
        assert_eq!(
            (cli.server.as_str(), cli.tcp_port, cli.udp_port),
            ("::1", 1, 2)
        );
        let Command::Create(args) = cli.command else {
            panic!("not a create: {:?}", cli.command)
        };
        assert_eq!(args.keepalive, 3);
        assert!(args.original);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for argv in [
            &["ocm", "join", "lobby"][..],
            &["ocm", "join", "--name", "a"],
            &["ocm", "join", "r", "--name", "a", "--keepalive", "0"],
            &["ocm", "--tcp-port", "0", "join", "r", "--name", "a"],
            &["ocm", "leave", "r", "--name", "a"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn invalid_names_fail_before_any_connection() {
        // Port 1 on the discard address: reaching the network would be a Connect error.
        for (room, name) in [("", "alice"), ("lobby", ""), ("lobby", "a\nb")] {
            let cli = Cli::try_parse_from([
                "ocm",
                "--server",
                "0.0.0.0",
                "--tcp-port",
                "1",
                "join",
                room,
                "--name",
                name,
            ])
            .unwrap();
            let err = run(cli).unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::InvalidRoomName { .. } | ClientError::InvalidUsername { .. }
                ),
                "{err:?}"
            );
            assert_eq!(err.exit_code(), error::EXIT_REFUSED);
        }
    }
}
