//! The ocmd(8) manual page, written by `ocmd --generate-man`. Part of the `ocmd` binary
//! (`main.rs`), not of the library: its synopsis and options come from the same clap
//! definition as `--help`, so the two cannot drift; the sections no flag shows (signals,
//! socket activation, exit status, environment, files) are written here, the signals from the
//! table `--help` prints too.

use std::io::{self, Write};

use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

/// The date the page shows: that of the last change to its text here (the flags' text
/// changes with main.rs; bump this with either). `crates/server/tests/manuals.rs` keeps
/// the page as last recorded and fails on a change of text that keeps this date.
const PAGE_DATE: &str = "2026-12-07";

/// What `ocmd` does on each signal: `--help` and the manual page both print this table.
pub const SIGNALS: [(&str, &str); 3] = [
    (
        "SIGHUP",
        "re-read the --config file (settings fixed at start are logged as such)",
    ),
    (
        "SIGUSR1",
        "write a backup of the state, STATE.backup, while serving",
    ),
    (
        "SIGTERM, SIGINT",
        "stop cleanly: flush the journal and fold it into the state file",
    ),
];

/// Writes the page for `cmd` (ocmd's clap command) to `out`.
pub fn write(cmd: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let man = Man::new(cmd)
        .section("8")
        .date(PAGE_DATE)
        .manual("System Manager's Manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    // The after-help text is left out: the sections below say it at more length.
    out.write_all(sections().render().as_bytes())?;
    man.render_version_section(out)
}

/// The sections that no flag shows.
fn sections() -> Roff {
    let mut page = Roff::new();
    page.control("SH", ["SIGNALS"]);
    for (signal, effect) in SIGNALS {
        item(&mut page, [bold(signal)], effect);
    }

    page.control("SH", ["SOCKET ACTIVATION"]);
    page.text([roman(
        "Sockets passed by systemd (a socket unit; LISTEN_PID, LISTEN_FDS and \
         LISTEN_FDNAMES, read once at start) are served instead of binding --tcp and --udp: \
         the listening TCP socket is the TCRP listener, the UDP socket the UCRP one, and a \
         socket named \"metrics\" (FileDescriptorName=metrics) the metrics listener. Their \
         addresses win over the configuration's [listen]. A passed descriptor that cannot be \
         used stops the start with exit status 2.",
    )]);

    page.control("SH", ["EXIT STATUS"]);
    item(
        &mut page,
        [bold("0")],
        "A clean stop with every change saved; a configuration --check-config passed; \
         --help and --version.",
    );
    item(
        &mut page,
        [bold("1")],
        "A start that failed (an address taken, the state file locked by another ocmd or \
         unreadable), a stop that could not save every change, or --check-config's settings \
         that could not be written to standard output.",
    );
    item(
        &mut page,
        [bold("2")],
        "A bad command line or configuration (--check-config included, which also refuses a \
         state path that is a symbolic link), or sockets passed by systemd that cannot be \
         used: a restart would fail the same way (the unit's RestartPreventExitStatus=2).",
    );
    item(
        &mut page,
        [bold("101")],
        "A panic on any of the daemon's threads (a bug; the state on disk is kept).",
    );

    page.control("SH", ["ENVIRONMENT"]);
    item(
        &mut page,
        [bold("RUST_LOG")],
        "Log filter (error, warn, info, debug, trace, or per module); wins over [log] level.",
    );
    item(
        &mut page,
        [bold("NOTIFY_SOCKET")],
        "Where READY=1, RELOADING=1, STOPPING=1, STATUS= and the watchdog pings go.",
    );
    item(
        &mut page,
        [bold("WATCHDOG_USEC"), roman(", "), bold("WATCHDOG_PID")],
        "Ping the service manager's watchdog every WATCHDOG_USEC/2 from the event loop.",
    );
    item(
        &mut page,
        [
            bold("LISTEN_PID"),
            roman(", "),
            bold("LISTEN_FDS"),
            roman(", "),
            bold("LISTEN_FDNAMES"),
        ],
        "Sockets passed by systemd (above).",
    );
    item(
        &mut page,
        [bold("JOURNAL_STREAM")],
        "When it names standard error, log lines carry syslog priorities for journald.",
    );

    page.control("SH", ["FILES"]);
    item(
        &mut page,
        [italic("STATE")],
        "The state file given by --state or [state] path: room_manager.json in the working \
         directory by default, /var/lib/ocmd/room_manager.json under the shipped unit. A \
         snapshot of the rooms and tokens, written whole (temporary file, fsync, rename).",
    );
    item(
        &mut page,
        [
            italic("STATE"),
            roman(".journal, "),
            italic("STATE"),
            roman(".journal.old"),
        ],
        "Every change since the snapshot, appended and fsynced before a create or join is \
         answered; folded into the snapshot in the background and at a clean stop.",
    );
    item(
        &mut page,
        [italic("STATE"), roman(".lock")],
        "Held while ocmd runs: a second daemon on the same state refuses to start.",
    );
    item(
        &mut page,
        [italic("STATE"), roman(".backup")],
        "Written on SIGUSR1: a state file that restores alone.",
    );
    item(
        &mut page,
        [italic("/etc/ocmd/ocmd.toml")],
        "The configuration under the shipped unit (--config); every key has a default.",
    );

    page.control("SH", ["SEE ALSO"]);
    page.text([
        bold("ocm"),
        roman("(1), "),
        bold("systemd.socket"),
        roman("(5), "),
        bold("sd_notify"),
        roman(
            "(3). OPERATIONS.md in ocmd's documentation directory \
               (/usr/local/share/doc/ocmd from scripts/install.sh, /usr/share/doc/ocmd from \
               the Debian package) covers configuration, the unit and its sandbox, metrics, \
               logs, backups and upgrades.",
        ),
    ]);
    page
}

/// A tagged paragraph: `tag` on its own line, `body` indented below it.
fn item(page: &mut Roff, tag: impl Into<Vec<Inline>>, body: &str) {
    page.control("TP", []);
    page.text(tag);
    page.text([roman(body)]);
}
