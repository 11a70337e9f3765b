//! `ocm generate` (hidden, for `scripts/install.sh` and packagers): the manual pages — ocm(1)
//! and one page a command, ocm-create(1), ocm-join(1), ocm-rooms(1), ocm-who(1) — and the
//! shell completions, all made from the same clap definition as `--help`, so none can drift
//! from the flags. The exit statuses come from the table `--help` prints too.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap_mangen::roff::{bold, roman, Inline, Roff};
use clap_mangen::Man;

use crate::error::{ClientError, EXIT_FAILURE, EXIT_REFUSED, EXIT_ROOM_ENDED};

/// The date the pages show: that of the last change to their text here (the flags' text
/// changes with main.rs; bump this with either). `crates/server/tests/manuals.rs` keeps
/// each page as last recorded and fails on a change of text that keeps this date.
const PAGE_DATE: &str = "2026-12-07";

/// `ocm`'s exit statuses and when each is given: `--help` and ocm(1) both print this table.
pub const EXIT_STATUSES: [(u8, &str); 4] = [
    (
        0,
        "after leaving (/quit, end of input, a signal, the reader of the output gone) or an \
         answer to rooms/who",
    ),
    (
        EXIT_FAILURE,
        "when the server cannot be reached or misbehaves, when reading the input or writing \
         the output fails, or when a signal could not end the chat within 3 s",
    ),
    (EXIT_REFUSED, "for a bad command line or a refusal"),
    (
        EXIT_ROOM_ENDED,
        "when the room ended the chat (closed, or the server no longer holds you: at once, \
         input lines still waiting not sent)",
    ),
];

/// The exit statuses as one paragraph, for `--help`.
pub fn exit_status_help() -> String {
    let statuses: Vec<String> = EXIT_STATUSES
        .iter()
        .map(|(code, when)| format!("{code} {when}"))
        .collect();
    format!("Exit status: {}.", statuses.join("; "))
}

/// Writes ocm.1 and a page for each visible command into `dir`; returns the paths written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, ClientError> {
    // Built, the commands carry the global flags and their display names (ocm-create).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let man = page(sub.clone());
        written.push(write_page(dir, &man, |out| man.render(out))?);
    }
    let man = page(cmd.clone());
    written.push(write_page(dir, &man, |out| {
        man.render_title(out)?;
        man.render_name_section(out)?;
        man.render_synopsis_section(out)?;
        man.render_description_section(out)?;
        man.render_options_section(out)?;
        man.render_subcommands_section(out)?;
        // The after-help text is left out: EXIT STATUS below says it as a list.
        out.write_all(top_page_sections().render().as_bytes())?;
        man.render_version_section(out)
    })?);
    Ok(written)
}

/// The page of `cmd` (ocm or one of its commands), dated and named as ocm's.
fn page(cmd: clap::Command) -> Man {
    Man::new(cmd)
        .date(PAGE_DATE)
        .source(format!("ocm {}", env!("CARGO_PKG_VERSION")))
        .manual("ocm manual")
}

/// Writes one page through `render` to `dir`, under the page's own file name.
fn write_page(
    dir: &Path,
    man: &Man,
    render: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<PathBuf, ClientError> {
    let path = dir.join(man.get_filename());
    let written = std::fs::File::create(&path).and_then(|file| {
        let mut out = io::BufWriter::new(file);
        render(&mut out)?;
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    });
    match written {
        Ok(()) => Ok(path),
        Err(source) => Err(ClientError::WriteFile { path, source }),
    }
}

/// The sections of ocm(1) that no flag shows.
fn top_page_sections() -> Roff {
    let mut page = Roff::new();
    page.control("SH", ["EXIT STATUS"]);
    for (code, when) in EXIT_STATUSES {
        item(&mut page, [bold(code.to_string())], &as_sentence(when));
    }
    page.control("SH", ["ENVIRONMENT"]);
    item(
        &mut page,
        [bold("OCM_PASSWORD")],
        "The room's password for create, join (both without --original) and who when \
         neither --password nor --password-file gives one (unlike a flag, it does not show in \
         ps).",
    );
    item(
        &mut page,
        [bold("TERM")],
        "dumb, emacs or cons25: plain lines instead of the line editor, which otherwise runs \
         when standard input and output are a terminal.",
    );
    item(
        &mut page,
        [bold("RUST_LOG")],
        "Log filter for the client's own log on standard error (warn by default; debug \
         shows the protocol steps).",
    );
    page.control("SH", ["SEE ALSO"]);
    page.text([
        bold("ocmd"),
        roman(
            "(8). CLIENT.md in ocmd's documentation directory (/usr/local/share/doc/ocmd \
               from scripts/install.sh, /usr/share/doc/ocmd from the Debian package, or docs/ \
               in the source) describes the chat's commands and what \
               each line on the screen means.",
        ),
    ]);
    page
}

/// Completions for `shell` to `out`.
pub fn completions(
    cmd: &clap::Command,
    shell: clap_complete::Shell,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut offered = visible(cmd);
    let mut buffer = Vec::new();
    clap_complete::generate(shell, &mut offered, "ocm", &mut buffer);
    out.write_all(&buffer)?;
    out.flush()
}

/// `cmd` with only what `--help` shows: clap_complete offers hidden commands and flags too
/// (`generate`, `--idle-check`).
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut shown = clap::Command::new(cmd.get_name().to_owned())
        .args(
            cmd.get_arguments()
                .filter(|arg| !arg.is_hide_set())
                .cloned(),
        )
        .subcommands(
            cmd.get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .map(visible),
        );
    if let Some(about) = cmd.get_about() {
        shown = shown.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        shown = shown.version(version.to_owned());
    }
    shown
}

/// A tagged paragraph: `tag` on its own line, `body` indented below it.
fn item(page: &mut Roff, tag: impl Into<Vec<Inline>>, body: &str) {
    page.control("TP", []);
    page.text(tag);
    page.text([roman(body)]);
}

/// `when` as a sentence: its first letter capitalized, a full stop at the end.
fn as_sentence(when: &str) -> String {
    let mut chars = when.chars();
    let first = chars.next().map(|c| c.to_uppercase().to_string());
    format!("{}{}.", first.unwrap_or_default(), chars.as_str())
}
