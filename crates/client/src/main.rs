//! `ocm`: the terminal client of Online Chat Messenger.
//!
//! ```text
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] create ROOM --name NAME [--keepalive SECS]
//!     [--password PW | --password-file PATH] [--unlisted]
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] create ROOM --name NAME [--keepalive SECS]
//!     --original
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] join   ROOM --name NAME [--keepalive SECS]
//!     [--password PW | --password-file PATH]
//! ocm [--server HOST] [--tcp-port N] [--udp-port N] join   ROOM --name NAME [--keepalive SECS]
//!     --original
//! ocm [--server HOST] [--tcp-port N] rooms
//! ocm [--server HOST] [--tcp-port N] who ROOM [--password PW | --password-file PATH]
//! ```
//!
//! A password may also come from the `OCM_PASSWORD` environment variable, read only when
//! neither flag is given, so that it need not appear in `ps`.
//!
//! This file owns the command line, the logger and the exit codes; the work is in [`handshake`]
//! (TCP: REQUEST → COMPLIANCE → COMPLETE for the token), [`query`] (the list, presence and
//! history extensions) and [`chat`](mod@chat) (UDP: register, relay, keepalive, leave), which
//! get their bytes from the `tcrp` and `ucrp` crates. Messages from the room go to standard
//! output, one per line; the client's own remarks (`* joined ...`, `* message too long ...`)
//! and errors go to standard error, through a queue that a standard error nobody reads cannot
//! stop ([`stderr`]). `rooms` and `who` print their answer to standard output.
//!
//! Exit codes: 0 after leaving (`/quit`, the end of input, SIGINT, SIGTERM, SIGHUP or
//! SIGQUIT, the reader of standard output gone) or after `rooms`/`who` answered; 3 when the
//! room ended the chat (it was closed, or the server no longer holds the member: at once,
//! lines of the input still waiting their turn not sent); 1 when the server cannot be reached
//! or misbehaves, when reading standard input or writing standard output fails, or when after
//! a signal the chat did not end within 3 s (`ocm` then leaves the room itself), or the
//! process within 3 s after the chat ended; 2 for a bad command line, an invalid name, an
//! unusable password, or a refusal.

mod chat;
mod closure;
mod error;
#[cfg(test)]
mod fake_server;
mod feed;
mod generate;
mod handshake;
mod input;
mod listing;
mod locks;
mod pacing;
mod query;
mod reach;
mod render;
mod screen;
mod stderr;
mod threads;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tcrp::{names, ErrorCode};

use crate::chat::Ending;
use crate::error::ClientError;
use crate::handshake::Verb;

/// The chat's UDP port when `--udp-port` gives none.
const DEFAULT_UDP_PORT: u16 = 9091;

/// The environment variable a password is read from when no flag gives one.
const PASSWORD_ENV: &str = "OCM_PASSWORD";

/// Terminal client for the ocmd chat daemon.
#[derive(Debug, Parser)]
#[command(name = "ocm", version)]
struct Cli {
    /// Host name or IP address of the daemon (an IPv6 address with or without brackets); the
    /// ports are --tcp-port and --udp-port.
    #[arg(long, global = true, default_value = "127.0.0.1", value_parser = server_host)]
    server: String,
    /// TCP port of the handshake (create/join) and of the rooms/who/history requests.
    #[arg(long, global = true, default_value_t = 9090, value_parser = clap::value_parser!(u16).range(1..))]
    tcp_port: u16,
    /// UDP port of the chat of `create` and `join` [default: 9091]
    // Not global, unlike the others: `rooms` and `who` do not use it, so their help must not
    // offer it. `create` and `join` take it after them too (`RoomArgs::udp_port`).
    #[arg(long, value_name = "UDP_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    udp_port: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

/// Checks `--server`: a host without a port, that could be a host name or an address.
/// `127.0.0.1:9090` or `[::1]:9090` would otherwise reach the resolver as a name and fail
/// as "not known", which says nothing of where the port goes; an empty name, a space in it
/// (`/etc/hosts` splits at spaces, DNS names hold none in practice) or an empty label (two
/// dots in a row, a dot first: DNS cannot carry one, and it is a typo far more often than
/// a line of `/etc/hosts`) failed the same way, as a server that cannot be reached (exit
/// status 1) rather than the bad command line it is (2).
///
/// Everything else is left to the resolver, lengths included. DNS caps a label at 63 bytes
/// and a name at 253, but the system resolver asks other sources first (`/etc/hosts`,
/// through nsswitch), where glibc finds a name of any length: a label of 40 `é` (80 bytes
/// of UTF-8, as it also goes to DNS) once made a name that `/etc/hosts` resolved a bad
/// command line. A name that only DNS could know and DNS cannot carry fails in the lookup,
/// as "cannot resolve server" (exit status 1).
fn server_host(value: &str) -> Result<String, String> {
    let with_port = value.parse::<std::net::SocketAddr>().is_ok()
        || value.rsplit_once(':').is_some_and(|(host, port)| {
            !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit())
        });
    if with_port {
        return Err("give the host alone; the ports are --tcp-port and --udp-port".into());
    }
    if value.is_empty() {
        return Err("the host is empty: give a host name or an IP address".into());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a host name holds no spaces or control characters".into());
    }
    // An IPv6 address (scoped ones included) is the resolver's to judge.
    if !value.contains(':') {
        let name = value.strip_suffix('.').unwrap_or(value);
        if name.split('.').any(str::is_empty) {
            return Err(
                "not a host name: it has an empty label (a dot first, or two dots in a row)".into(),
            );
        }
    }
    Ok(value.to_owned())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a room, host it and chat in it (the room closes when you leave).
    Create(CreateArgs),
    /// Join an existing room and chat in it; the recent messages are shown first.
    Join(RoomArgs),
    /// List the rooms on the server (rooms created with --unlisted are left out).
    Rooms,
    /// Show who hosts a room and who is in it.
    Who(WhoArgs),
    /// Write the manual pages or a shell's completions (for scripts/install.sh and packagers).
    #[command(hide = true, subcommand)]
    Generate(Artifact),
}

/// What `ocm generate` writes.
#[derive(Debug, Subcommand)]
enum Artifact {
    /// ocm.1 and a page for each command (ocm-create.1, ...), into DIR.
    Man {
        /// The directory the pages go to.
        dir: PathBuf,
    },
    /// The completions for SHELL, to standard output.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `ocm`'s command line: the flags of [`Cli`], and after them the exit statuses.
fn cli_command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().after_help(generate::exit_status_help())
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    #[command(flatten)]
    room: RoomArgs,
    /// Leave the room out of `ocm rooms` listings (it can still be joined by name).
    #[arg(long, conflicts_with = "original")]
    unlisted: bool,
}

#[derive(Debug, clap::Args)]
struct RoomArgs {
    /// The room's name.
    room: String,
    /// Your name in the room.
    #[arg(long)]
    name: String,
    /// UDP port of the chat [default: 9091].
    #[arg(long = "udp-port", id = "room_udp_port", value_name = "UDP_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    udp_port: Option<u16>,
    /// Seconds between keepalives (re-sent __REGISTER__).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    keepalive: u32,
    /// Seconds without a datagram from the server after which to ask it over TCP whether we
    /// are still in the room (hidden: for tests; see docs/CLIENT.md).
    #[arg(long, value_name = "SECS", default_value_t = 60, hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    idle_check: u32,
    /// Send the original client's request (a bare JSON name: no keepalive promise, no
    /// notices, sequence numbers, batches, history or password).
    #[arg(long, conflicts_with_all = ["password", "password_file"])]
    original: bool,
    #[command(flatten)]
    password: PasswordArgs,
}

#[derive(Debug, clap::Args)]
struct WhoArgs {
    /// The room's name.
    room: String,
    #[command(flatten)]
    password: PasswordArgs,
}

/// Where the room password comes from. Without either flag it is read from the
/// `OCM_PASSWORD` environment variable, if set and not empty.
#[derive(Debug, Clone, Default, clap::Args)]
struct PasswordArgs {
    /// The room's password (create: sets it; join, who: gives it). Other users can see it
    /// in `ps`: prefer --password-file, or the OCM_PASSWORD environment variable, which is
    /// read when neither flag is given.
    #[arg(long, value_name = "PW", conflicts_with = "password_file")]
    password: Option<String>,
    /// Read the room's password from this file (one trailing newline is dropped).
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,
}

/// Longest password file read: a request's whole payload cap.
const MAX_PASSWORD_FILE_LEN: usize = tcrp::DEFAULT_MAX_PAYLOAD;

impl PasswordArgs {
    /// The password to send, from `--password`, `--password-file` or else `env` (the value
    /// of `OCM_PASSWORD`); `None` when none gives one.
    fn resolve(&self, env: Option<OsString>) -> Result<Option<String>, ClientError> {
        let (password, from) = if let Some(password) = &self.password {
            (password.clone(), "--password")
        } else if let Some(path) = &self.password_file {
            (read_password_file(path)?, "--password-file")
        } else {
            match env {
                // An empty variable counts as unset, as shells make it easy to export one.
                None => return Ok(None),
                Some(value) if value.is_empty() => return Ok(None),
                Some(value) => (
                    value
                        .into_string()
                        .map_err(|_| ClientError::UnusablePassword {
                            from: PASSWORD_ENV,
                            problem: "is not UTF-8",
                        })?,
                    PASSWORD_ENV,
                ),
            }
        };
        if password.is_empty() {
            return Err(ClientError::UnusablePassword {
                from,
                problem: "is empty",
            });
        }
        Ok(Some(password))
    }
}

/// The password in the file at `path`, less one trailing newline (`\n` or `\r\n`). At most
/// what one request can carry is read, plus one byte to tell a longer file: a wrong path
/// such as /dev/zero must not be read without end.
fn read_password_file(path: &Path) -> Result<String, ClientError> {
    let mut bytes = Vec::new();
    let read = |source| ClientError::PasswordFile {
        path: path.to_owned(),
        source,
    };
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_PASSWORD_FILE_LEN as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(read)?;
    // The length first: the cut may fall inside a character.
    if bytes.len() > MAX_PASSWORD_FILE_LEN {
        return Err(ClientError::PasswordFileTooLong {
            max: MAX_PASSWORD_FILE_LEN,
        });
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|e| read(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    start_logger();
    let code = match run(cli) {
        Ok(Ending::Left) => ExitCode::SUCCESS,
        Ok(Ending::RoomEnded) => ExitCode::from(error::EXIT_ROOM_ENDED),
        Err(error) => {
            screen::to_stderr(&format!("ocm: {error}"));
            ExitCode::from(error.exit_code())
        }
    };
    // The last lines, when standard error is read; past the wait they are lost.
    stderr::drain(stderr::EXIT_DRAIN);
    code
}

/// Logs through standard error's queue ([`stderr`]), so that a log line never waits for a
/// standard error nobody reads. Quiet by default: the terminal is the chat. RUST_LOG=debug
/// shows the protocol steps.
fn start_logger() {
    let env = env_logger::Env::default().default_filter_or("warn");
    let mut builder = env_logger::Builder::from_env(env);
    // env_logger colours only what it writes to a terminal itself: choose as it would for
    // standard error, unless RUST_LOG_STYLE says.
    if !matches!(
        std::env::var(env_logger::DEFAULT_WRITE_STYLE_ENV).as_deref(),
        Ok("always" | "never")
    ) {
        builder.write_style(anstream::AutoStream::choice(&io::stderr()).into());
    }
    builder
        .target(env_logger::Target::Pipe(Box::new(stderr::LogPipe)))
        .init();
}

fn run(cli: Cli) -> Result<Ending, ClientError> {
    let Cli {
        server,
        tcp_port,
        udp_port,
        command,
    } = cli;
    match command {
        Command::Rooms => {
            let mut stream = handshake::connect(&server, tcp_port)?;
            let list = query::list_rooms(&mut stream)?;
            print_lines(&listing::room_list_lines(&list)).map(|()| Ending::Left)
        }
        Command::Who(args) => {
            let room_name = check_room_name(&args.room)?;
            let password = args.password.resolve(std::env::var_os(PASSWORD_ENV))?;
            let mut stream = handshake::connect(&server, tcp_port)?;
            let presence = query::presence(&mut stream, room_name, None, password.as_deref())?;
            print_lines(&listing::presence_lines(&presence)).map(|()| Ending::Left)
        }
        Command::Create(args) => chat(
            &server,
            tcp_port,
            udp_port,
            Verb::Create,
            &args.room,
            !args.unlisted,
        ),
        Command::Join(args) => chat(&server, tcp_port, udp_port, Verb::Join, &args, true),
        Command::Generate(Artifact::Man { dir }) => {
            let written = generate::man_pages(cli_command(), &dir)?;
            let lines: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            print_lines(&lines).map(|()| Ending::Left)
        }
        Command::Generate(Artifact::Completions { shell }) => {
            generate::completions(&cli_command(), shell, &mut io::stdout().lock())
                .or_else(|e| {
                    if chat::output_gone(&e) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(ClientError::io("writing to standard output"))
                .map(|()| Ending::Left)
        }
    }
}

fn check_room_name(room: &str) -> Result<&str, ClientError> {
    names::check_room_name(room.as_bytes()).map_err(|rule| ClientError::InvalidRoomName {
        room: room.to_owned(),
        rule,
    })
}

/// Prints an answer to standard output. A reader that went away before the end (`ocm rooms
/// | head -1`) took what it wanted: that is not an error.
fn print_lines(lines: &[String]) -> Result<(), ClientError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match lines
        .iter()
        .try_for_each(|line| writeln!(out, "{line}"))
        .and_then(|()| out.flush())
    {
        Err(e) if chat::output_gone(&e) => Ok(()),
        written => written.map_err(ClientError::io("writing to standard output")),
    }
}

/// How ocmd limits room-password guesses (docs/SECURITY.md, "Room passwords"; the numbers
/// are its defaults, `[rate] password_failures_burst` and `password_failures_per_min`).
const PASSWORD_LIMIT: &str = "ocmd counts wrong room passwords per source address (an IPv4 \
     address or an IPv6 /64): after 5, it checks none, the right one included, until its \
     allowance refills at one try every 6 s (by default)";

/// A join with a password refused as `rate_limited` for wrong passwords: the server's words
/// ("too many wrong passwords; try again later") say neither what is counted nor that the
/// right password is refused too, so the rule follows them. The same code also answers the
/// request limit and a full password queue, which have nothing to do with passwords tried:
/// only the wrong-password refusal, told by its words, gets the rule.
fn explain_password_limit(error: ClientError, password_sent: bool) -> ClientError {
    let for_wrong_passwords = |message: Option<&str>| {
        password_sent && message.is_some_and(|words| words.contains("wrong password"))
    };
    with_note(
        error,
        ErrorCode::RateLimited,
        for_wrong_passwords,
        PASSWORD_LIMIT,
    )
}

/// Why `--original` cannot join a room with a password.
const ORIGINAL_SENDS_NO_PASSWORD: &str = "--original sends none: the original request is a \
     bare name; join without --original to give it";

/// A join with `--original` refused for its password: the server's words ("wrong or missing
/// password") do not say that the flag cannot send one, whatever --password-file or
/// `OCM_PASSWORD` holds.
fn explain_original_password(error: ClientError, original: bool) -> ClientError {
    with_note(
        error,
        ErrorCode::BadPassword,
        |_| original,
        ORIGINAL_SENDS_NO_PASSWORD,
    )
}

/// What holds a name after a session ends without leaving (a crash, a lost network): ocmd
/// expires a member after `[liveness] keepalive_misses` (3) of the intervals it promised
/// (`--keepalive`, 10 s), and never one that promised none.
const NAME_HELD: &str = "a session that ended without leaving keeps its name until the \
     server expires it: after three missed keepalives (about 30 s with the defaults), or, \
     if it promised none (--original, the original client), only when the room closes";

/// A join refused as `name_taken`: the server's words do not say that the holder may be the
/// user's own session that crashed a moment ago, nor when such a name frees up.
fn explain_name_taken(error: ClientError) -> ClientError {
    with_note(error, ErrorCode::NameTaken, |_| true, NAME_HELD)
}

/// A join refused with `code`, when its message passes `when`: the same refusal with `note`
/// after the server's words, in brackets (or in their place when it sent none). Any other
/// error is returned as it is.
fn with_note(
    error: ClientError,
    code: ErrorCode,
    when: impl Fn(Option<&str>) -> bool,
    note: &str,
) -> ClientError {
    match error {
        ClientError::Refused {
            verb: Verb::Join,
            room,
            code: Some(got),
            message,
        } if got == code && when(message.as_deref()) => ClientError::Refused {
            verb: Verb::Join,
            room,
            code: Some(code),
            message: Some(match message {
                Some(words) => format!("{words} ({note})"),
                None => note.to_owned(),
            }),
        },
        other => other,
    }
}

/// Terminal types the line editor cannot draw on (rustyline's own list); on these it could
/// only fail, and plain lines are what such a terminal (an Emacs shell buffer, say) expects.
const UNEDITABLE_TERMINALS: [&str; 3] = ["dumb", "cons25", "emacs"];

/// Whether a terminal of type `term` (the value of `TERM`) can take the line editor.
fn editable_terminal(term: Option<OsString>) -> bool {
    !term.is_some_and(|term| {
        UNEDITABLE_TERMINALS
            .iter()
            .any(|plain| term.eq_ignore_ascii_case(plain))
    })
}

/// The server's UDP address: the handshake's address at `udp_port`, keeping an IPv6
/// address's scope (a link-local `fe80::1%eth0` is unreachable without it).
fn udp_address(tcp: SocketAddr, udp_port: u16) -> SocketAddr {
    let mut udp = tcp;
    udp.set_port(udp_port);
    udp
}

/// The chat's UDP port: `--udp-port` after `create` or `join` (`after`), else before it
/// (`before`), else [`DEFAULT_UDP_PORT`].
fn chat_udp_port(after: Option<u16>, before: Option<u16>) -> u16 {
    after.or(before).unwrap_or(DEFAULT_UDP_PORT)
}

/// `create` and `join`: the handshake, then the chat.
fn chat(
    server: &str,
    tcp_port: u16,
    udp_port: Option<u16>,
    verb: Verb,
    args: &RoomArgs,
    listed: bool,
) -> Result<Ending, ClientError> {
    let room_name = check_room_name(&args.room)?;
    names::check_username(&args.name).map_err(|rule| ClientError::InvalidUsername {
        name: args.name.clone(),
        rule,
    })?;

    let mut request = handshake::build_request(&args.name, args.keepalive, args.original);
    if !args.original {
        // The original request is a bare name: it carries neither field.
        request.password = args.password.resolve(std::env::var_os(PASSWORD_ENV))?;
        request.listed = (!listed).then_some(false);
    }
    let mut stream = handshake::connect(server, tcp_port)?;
    // Chat with the very address the handshake reached, not a fresh resolution of the name.
    // Read now: once the server has closed the connection (the original one closes after its
    // reply, perhaps with a reset) the socket may no longer say.
    let tcp = stream
        .peer_addr()
        .map_err(ClientError::io("reading the server's address"))?;
    if !args.original {
        request.max_datagram = handshake::max_datagram_for(tcp.ip());
    }
    let password_sent = request.password.is_some();
    let token = handshake::exchange(&mut stream, verb, room_name, &request).map_err(|e| {
        let e = explain_original_password(e, args.original);
        explain_name_taken(explain_password_limit(e, password_sent))
    })?;
    drop(stream);

    let udp_port = chat_udp_port(args.udp_port, udp_port);
    let session = chat::Session::open(udp_address(tcp, udp_port), room_name, &args.name, token)?;
    chat::run(
        session,
        chat::Options {
            verb,
            username: args.name.clone(),
            keepalive: Duration::from_secs(u64::from(args.keepalive)),
            tcp,
            join_history: verb == Verb::Join && !args.original,
            check_closures: !args.original,
            check_reach: !args.original,
            idle_check: (!args.original).then(|| Duration::from_secs(u64::from(args.idle_check))),
            original: args.original,
            line_editor: std::io::stdin().is_terminal()
                && std::io::stdout().is_terminal()
                && editable_terminal(std::env::var_os("TERM")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn dumb_terminals_get_plain_lines() {
        for term in ["dumb", "DUMB", "emacs", "cons25"] {
            assert!(!editable_terminal(Some(term.into())), "{term}");
        }
        for term in ["xterm", "xterm-256color", "screen", "linux", ""] {
            assert!(editable_terminal(Some(term.into())), "{term}");
        }
        assert!(editable_terminal(None));
    }

    #[test]
    fn only_the_wrong_password_refusal_gets_the_password_rule() {
        let refusal = |words: &str| ClientError::Refused {
            verb: Verb::Join,
            room: "secret".into(),
            code: Some(ErrorCode::RateLimited),
            message: Some(words.into()),
        };
        let message = |e: ClientError| match e {
            ClientError::Refused { message, .. } => message.unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        let told = message(explain_password_limit(
            refusal("too many wrong passwords; try again later"),
            true,
        ));
        assert!(told.contains(PASSWORD_LIMIT), "{told}");
        // The request limit and a busy password queue use the same code.
        for words in [
            "too many requests; try again shortly",
            "password checks are busy",
        ] {
            assert_eq!(message(explain_password_limit(refusal(words), true)), words);
        }
    }

    #[test]
    fn only_a_password_refused_to_an_original_join_names_the_flag() {
        let refusal = |verb, code| ClientError::Refused {
            verb,
            room: "vault".into(),
            code: Some(code),
            message: Some("wrong or missing password for room \"vault\"".into()),
        };
        let told = explain_original_password(refusal(Verb::Join, ErrorCode::BadPassword), true)
            .to_string();
        assert!(
            told.ends_with(&format!("\"vault\" ({ORIGINAL_SENDS_NO_PASSWORD})")),
            "{told}"
        );
        for (verb, code, original) in [
            (Verb::Join, ErrorCode::BadPassword, false),
            (Verb::Join, ErrorCode::RoomNotFound, true),
            (Verb::Create, ErrorCode::BadPassword, true),
        ] {
            let told = explain_original_password(refusal(verb, code), original).to_string();
            assert!(!told.contains("--original"), "{told}");
        }
    }

    #[test]
    fn only_a_join_refused_for_its_name_gets_the_rule_of_held_names() {
        let refusal = |verb, code| ClientError::Refused {
            verb,
            room: "lobby".into(),
            code: Some(code),
            message: Some("the name \"alice\" is already taken in room \"lobby\"".into()),
        };
        let told = explain_name_taken(refusal(Verb::Join, ErrorCode::NameTaken)).to_string();
        assert!(
            told.contains("is already taken in room \"lobby\" (a session that ended"),
            "{told}"
        );
        assert!(told.contains(NAME_HELD), "{told}");
        for (verb, code) in [
            (Verb::Create, ErrorCode::NameTaken),
            (Verb::Join, ErrorCode::RoomNotFound),
        ] {
            let told = explain_name_taken(refusal(verb, code)).to_string();
            assert!(!told.contains(NAME_HELD), "{told}");
        }
    }

    #[test]
    fn the_udp_address_keeps_the_handshakes_address_and_ipv6_scope() {
        let v4: SocketAddr = "192.0.2.7:9090".parse().unwrap();
        assert_eq!(udp_address(v4, 9091), "192.0.2.7:9091".parse().unwrap());
        let link_local = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            9090,
            0,
            3,
        ));
        let SocketAddr::V6(udp) = udp_address(link_local, 9091) else {
            panic!("an IPv6 address became IPv4");
        };
        assert_eq!((udp.port(), udp.scope_id()), (9091, 3));
        assert_eq!(*udp.ip(), "fe80::1".parse::<std::net::Ipv6Addr>().unwrap());
    }

    #[test]
    fn the_udp_port_after_the_command_wins_and_9091_is_the_default() {
        assert_eq!(chat_udp_port(None, None), 9091);
        assert_eq!(chat_udp_port(None, Some(7)), 7);
        assert_eq!(chat_udp_port(Some(8), None), 8);
        assert_eq!(chat_udp_port(Some(8), Some(7)), 8);
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn parse(argv: &[&str]) -> Command {
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .command
    }

    #[test]
    fn defaults_and_flags() {
        let cli = Cli::try_parse_from(["ocm", "join", "lobby", "--name", "alice"]).unwrap();
        assert_eq!(cli.server, "127.0.0.1");
        assert_eq!((cli.tcp_port, cli.udp_port), (9090, None));
        let Command::Join(args) = cli.command else {
            panic!("not a join: {:?}", cli.command)
        };
        assert_eq!((args.room.as_str(), args.name.as_str()), ("lobby", "alice"));
        assert_eq!(args.keepalive, 10);
        assert!(!args.original);
        assert_eq!(args.password.password, None);
        assert_eq!(args.password.password_file, None);

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
            ("::1", 1, Some(2))
        );
        let Command::Create(args) = cli.command else {
            panic!("not a create: {:?}", cli.command)
        };
        assert_eq!(args.room.keepalive, 3);
        assert!(args.room.original);
        assert!(!args.unlisted);
    }

    #[test]
    fn a_server_with_a_port_is_a_usage_error_naming_the_port_flags() {
        for with_port in [
            "127.0.0.1:9090",
            "[::1]:9090",
            "chat.example:9090",
            "localhost:1",
            "localhost:",
        ] {
            let err = Cli::try_parse_from(["ocm", "--server", with_port, "rooms"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{with_port}"
            );
            assert!(err.to_string().contains("--tcp-port"), "{err}");
            // A usage error exits 2, like every bad command line.
            assert_eq!(err.exit_code(), 2);
        }
        for host in [
            "127.0.0.1",
            "::1",
            "[::1]",
            "fe80::1",
            "chat.example",
            "localhost",
        ] {
            let cli = Cli::try_parse_from(["ocm", "--server", host, "rooms"]).unwrap();
            assert_eq!(cli.server, host);
        }
    }

    /// A host no resolver can know is a bad command line (exit status 2), said before any
    /// lookup, not a server that cannot be reached.
    #[test]
    fn an_impossible_host_is_a_usage_error() {
        for (host, said) in [
            ("", "the host is empty"),
            (" ", "no spaces"),
            (" localhost", "no spaces"),
            ("chat example", "no spaces"),
            ("a\tb", "control characters"),
            ("a\0b", "control characters"),
            (".", "empty label"),
            ("a..b", "empty label"),
            (".example", "empty label"),
            ("..", "empty label"),
            ("\u{e9}..example", "empty label"),
        ] {
            let err = Cli::try_parse_from(["ocm", "--server", host, "rooms"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{host:?}"
            );
            assert!(err.to_string().contains(said), "{host:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
        for host in ["chat.example.", "my_host", "fe80::1%eth0"] {
            let cli = Cli::try_parse_from(["ocm", "--server", host, "rooms"]).unwrap();
            assert_eq!(cli.server, host);
        }
    }

    /// Lengths are the resolver's to judge: glibc finds in `/etc/hosts` a label of 40 `é`
    /// (80 bytes of UTF-8), of 64 ASCII letters, or a name over 253 bytes, all of which DNS
    /// alone could not carry. None is refused as a bad command line for its length in bytes
    /// of UTF-8.
    #[test]
    fn a_long_name_is_left_to_the_resolver() {
        let accented = format!("{}.lan", "\u{e9}".repeat(40));
        let umlauts = format!("{}.lan", "\u{fc}".repeat(63));
        let ascii_label = format!("{}.lan", "a".repeat(64));
        let long_name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        let longest_dns = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        for host in [
            accented.as_str(),
            umlauts.as_str(),
            ascii_label.as_str(),
            long_name.as_str(),
            &format!("{long_name}."),
            longest_dns.as_str(),
            &format!("{longest_dns}."),
        ] {
            let cli = Cli::try_parse_from(["ocm", "--server", host, "rooms"])
                .unwrap_or_else(|e| panic!("{host:?}: {e}"));
            assert_eq!(cli.server, host);
        }
    }

    #[test]
    fn rooms_and_who() {
        assert!(matches!(parse(&["ocm", "rooms"]), Command::Rooms));
        let cli = Cli::try_parse_from(["ocm", "rooms", "--server", "10.0.0.1", "--tcp-port", "7"])
            .unwrap();
        assert_eq!((cli.server.as_str(), cli.tcp_port), ("10.0.0.1", 7));
        let Command::Who(args) = parse(&["ocm", "who", "lobby"]) else {
            panic!("not a who")
        };
        assert_eq!(args.room, "lobby");
        assert_eq!(args.password.password, None);
        let Command::Who(args) = parse(&["ocm", "who", "vault", "--password", "pw"]) else {
            panic!("not a who")
        };
        assert_eq!(args.password.password.as_deref(), Some("pw"));
    }

    #[test]
    fn passwords_and_unlisted_rooms() {
        let Command::Create(args) = parse(&[
            "ocm",
            "create",
            "vault",
            "--name",
            "a",
            "--password",
            "pw",
            "--unlisted",
        ]) else {
            panic!("not a create")
        };
        assert!(args.unlisted);
        assert_eq!(args.room.password.password.as_deref(), Some("pw"));
        let Command::Join(args) = parse(&[
            "ocm",
            "join",
            "vault",
            "--name",
            "b",
            "--password-file",
            "/run/pw",
        ]) else {
            panic!("not a join")
        };
        assert_eq!(
            args.password.password_file.as_deref(),
            Some(std::path::Path::new("/run/pw"))
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for argv in [
            &["ocm", "join", "lobby"][..],
            &["ocm", "join", "--name", "a"],
            &["ocm", "join", "r", "--name", "a", "--keepalive", "0"],
            &["ocm", "--tcp-port", "0", "join", "r", "--name", "a"],
            &["ocm", "leave", "r", "--name", "a"],
            &["ocm", "who"],
            &["ocm", "rooms", "extra"],
            // --unlisted is for create only.
            &["ocm", "join", "r", "--name", "a", "--unlisted"],
            // One source of password at a time.
            &[
                "ocm",
                "join",
                "r",
                "--name",
                "a",
                "--password",
                "x",
                "--password-file",
                "f",
            ],
            &["ocm", "who", "r", "--password", "x", "--password-file", "f"],
            // The original request cannot carry a password or the listing flag.
            &[
                "ocm",
                "join",
                "r",
                "--name",
                "a",
                "--original",
                "--password",
                "x",
            ],
            &[
                "ocm",
                "create",
                "r",
                "--name",
                "a",
                "--original",
                "--password-file",
                "f",
            ],
            &[
                "ocm",
                "create",
                "r",
                "--name",
                "a",
                "--original",
                "--unlisted",
            ],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn help_says_how_to_keep_the_password_out_of_ps() {
        let mut cmd = Cli::command();
        let join = cmd.find_subcommand_mut("join").unwrap();
        let help = join.render_long_help().to_string();
        assert!(help.contains("--password-file"), "{help}");
        assert!(help.contains("OCM_PASSWORD"), "{help}");
        assert!(help.contains("ps"), "{help}");
    }

    #[test]
    fn udp_port_is_offered_only_where_it_is_used() {
        for name in ["rooms", "who"] {
            let mut cmd = Cli::command();
            cmd.build();
            let sub = cmd.find_subcommand_mut(name).unwrap();
            let help = sub.render_long_help().to_string();
            assert!(!help.contains("--udp-port <"), "{name}: {help}");
        }
        for name in ["create", "join"] {
            let mut cmd = Cli::command();
            cmd.build();
            let sub = cmd.find_subcommand_mut(name).unwrap();
            let help = sub.render_long_help().to_string();
            assert!(help.contains("--udp-port <"), "{name}: {help}");
        }
        // Before the command, as the usage lines show it, or after a create or join.
        let cli = Cli::try_parse_from(["ocm", "--udp-port", "7", "rooms"]).unwrap();
        assert_eq!(cli.udp_port, Some(7));
        let cli =
            Cli::try_parse_from(["ocm", "join", "r", "--name", "a", "--udp-port", "8"]).unwrap();
        let Command::Join(args) = cli.command else {
            panic!("not a join")
        };
        assert_eq!(args.udp_port, Some(8));
        assert!(Cli::try_parse_from(["ocm", "rooms", "--udp-port", "7"]).is_err());
    }

    fn from_flag(password: Option<&str>, file: Option<PathBuf>) -> PasswordArgs {
        PasswordArgs {
            password: password.map(str::to_owned),
            password_file: file,
        }
    }

    #[test]
    fn password_sources_in_order() {
        let dir = std::env::temp_dir().join(format!("ocm-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "from file\r\n").unwrap();
        let env = || Some(OsString::from("from env"));

        // The flag, then the file, then the environment.
        assert_eq!(
            from_flag(Some("flag"), None).resolve(env()).unwrap(),
            Some("flag".into())
        );
        assert_eq!(
            from_flag(None, Some(file.clone())).resolve(env()).unwrap(),
            Some("from file".into())
        );
        assert_eq!(
            from_flag(None, None).resolve(env()).unwrap(),
            Some("from env".into())
        );
        assert_eq!(from_flag(None, None).resolve(None).unwrap(), None);
        assert_eq!(
            from_flag(None, None)
                .resolve(Some(OsString::new()))
                .unwrap(),
            None,
            "an empty variable is no password"
        );

        // Only one line ending is dropped; inner spaces are kept.
        std::fs::write(&file, " two words \n\n").unwrap();
        assert_eq!(
            from_flag(None, Some(file.clone())).resolve(None).unwrap(),
            Some(" two words \n".into())
        );

        // Unusable sources are refusals (exit 2), before any connection.
        std::fs::write(&file, "\n").unwrap();
        let err = from_flag(None, Some(file.clone()))
            .resolve(None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the password from --password-file is empty"
        );
        assert_eq!(err.exit_code(), error::EXIT_REFUSED);
        // A file as long as a request can carry is read whole.
        std::fs::write(&file, "a".repeat(MAX_PASSWORD_FILE_LEN)).unwrap();
        assert_eq!(
            from_flag(None, Some(file.clone())).resolve(None).unwrap(),
            Some("a".repeat(MAX_PASSWORD_FILE_LEN))
        );
        // A file longer than a request is refused after reading only that much, whether the
        // cut falls between characters or inside one.
        std::fs::write(&file, "é".repeat(10_000)).unwrap();
        for long in [PathBuf::from("/dev/zero"), file.clone()] {
            let err = from_flag(None, Some(long)).resolve(None).unwrap_err();
            assert_eq!(
                err.to_string(),
                "the password from --password-file is longer than a request can carry (16 KiB)"
            );
            assert_eq!(err.exit_code(), error::EXIT_REFUSED);
        }
        let err = from_flag(Some(""), None).resolve(None).unwrap_err();
        assert_eq!(err.to_string(), "the password from --password is empty");
        let err = from_flag(None, Some(dir.join("missing")))
            .resolve(None)
            .unwrap_err();
        assert!(matches!(err, ClientError::PasswordFile { .. }), "{err:?}");
        assert_eq!(err.exit_code(), error::EXIT_REFUSED);
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let err = from_flag(None, None)
                .resolve(Some(OsString::from_vec(vec![0xff])))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "the password from OCM_PASSWORD is not UTF-8"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
        let cli = Cli::try_parse_from(["ocm", "--server", "0.0.0.0", "--tcp-port", "1", "who", ""])
            .unwrap();
        assert!(matches!(
            run(cli).unwrap_err(),
            ClientError::InvalidRoomName { .. }
        ));
    }
}
