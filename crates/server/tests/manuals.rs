//! The manual pages and shell completions the real binaries write (`ocmd --generate-man`,
//! `ocm generate`), which `scripts/install.sh` installs: each page names every flag its
//! `--help` shows and says what no flag shows; each page's date follows its text (the pages
//! as last recorded are in `tests/data/manuals`); the completions complete. Rendered by
//! `man`, and the zsh and fish completions checked by their shells, where those are installed.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn run(program: &Path, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(program: &Path, args: &[&str]) -> String {
    String::from_utf8(run(program, args).stdout).expect("UTF-8")
}

/// The long flags a `--help` text offers (`--name`, `--check-config`...), each once: from
/// the lines that start with a flag (`  -h, --help  Print help`), not from the prose.
fn long_flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| line.split([',', ' ']).find(|w| w.starts_with("--")))
        .map(|flag| flag.split(['=', '<']).next().unwrap_or(flag).to_owned())
        .collect();
    flags.dedup();
    flags
}

/// The roff source with its escapes for `-` undone, as the flags read on the page.
fn unescaped(roff: &str) -> String {
    roff.replace("\\-", "-")
}

/// The OPTIONS section of a page's (unescaped) source: where each flag is described.
fn options_section(page: &str) -> &str {
    let start = page.find(".SH OPTIONS\n").expect("an OPTIONS section");
    let rest = &page[start + ".SH OPTIONS\n".len()..];
    &rest[..rest.find("\n.SH ").unwrap_or(rest.len())]
}

/// Whether the OPTIONS section describes `flag` (in bold, as a tag of its own).
fn describes(page: &str, flag: &str) -> bool {
    options_section(page).contains(&format!("\\fB{flag}\\fR"))
}

/// A page rendered by `man` as plain text, with the warnings `man --warnings` gave; `None`
/// (a recorded skip) where `man` is not installed.
fn rendered(page: &Path) -> Option<(String, String)> {
    if !installed("man") {
        skipped("man not installed: pages checked as roff source only");
        return None;
    }
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .expect("run man");
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        out.status
    );
    Some((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn ocmd_page_names_every_flag_and_what_no_flag_shows() {
    let ocmd = Path::new(env!("CARGO_BIN_EXE_ocmd"));
    let help = stdout(ocmd, &["--help"]);
    assert!(
        !help.contains("generate-man"),
        "the page's own flag is hidden:\n{help}"
    );
    let page = stdout(ocmd, &["--generate-man"]);
    assert!(page.contains(".TH ocmd 8 "), "{page}");
    let source = unescaped(&page);
    let flags = long_flags(&help);
    assert!(flags.len() >= 6, "{flags:?} from:\n{help}");
    for flag in &flags {
        assert!(describes(&source, flag), "ocmd(8) does not describe {flag}");
    }
    assert!(
        !source.contains("generate-man"),
        "ocmd(8) shows its hidden flag"
    );
    // The signals --help lists after the flags, from the same table.
    for signal in ["SIGHUP", "SIGUSR1", "SIGTERM, SIGINT"] {
        assert!(help.contains(signal), "--help lacks {signal}");
        assert!(source.contains(signal), "ocmd(8) lacks {signal}");
    }
    for section in [
        "SIGNALS",
        "SOCKET ACTIVATION",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
        "SEE ALSO",
    ] {
        assert!(
            source.contains(&format!(".SH \"{section}\""))
                || source.contains(&format!(".SH {section}\n")),
            "ocmd(8) lacks the section {section}"
        );
    }
    for told in [
        "RestartPreventExitStatus=2",
        "LISTEN_FDNAMES",
        ".journal",
        ".backup",
    ] {
        assert!(source.contains(told), "ocmd(8) does not say {told}");
    }

    // The page is all it does: beside another flag it is a usage error (status 2), and
    // nothing is printed or started.
    let out = Command::new(ocmd)
        .args(["--generate-man", "--check-config"])
        .output()
        .expect("run ocmd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // A reader that stops early (`| head -1`) had what it wanted: exit status 0.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(ocmd)
        .arg("--generate-man")
        .stdout(writer)
        .output()
        .expect("run ocmd");
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A page that cannot be written is an error, not a panic: exit status 1.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = Command::new(ocmd)
        .arg("--generate-man")
        .stdout(full)
        .output()
        .expect("run ocmd");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write the manual page"),
        "{out:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocmd.8");
    std::fs::write(&path, &page).unwrap();
    if let Some((text, warnings)) = rendered(&path) {
        assert!(warnings.is_empty(), "man warns about ocmd(8):\n{warnings}");
        assert!(
            text.contains("EXIT STATUS") && text.contains("--check-config"),
            "{text}"
        );
    }
}

#[test]
fn ocm_pages_name_every_flag_of_every_command() {
    let ocm = sibling_binary("ocm");
    let help = stdout(&ocm, &["--help"]);
    assert!(!help.contains("generate"), "`generate` is hidden:\n{help}");
    let dir = tempfile::tempdir().unwrap();
    let listed = stdout(&ocm, &["generate", "man", dir.path().to_str().unwrap()]);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ocm-create.1",
            "ocm-join.1",
            "ocm-rooms.1",
            "ocm-who.1",
            "ocm.1"
        ],
        "the pages written"
    );
    for name in &names {
        assert!(
            listed.contains(name.as_str()),
            "{name} not listed in:\n{listed}"
        );
    }

    // ocm(1): the top-level flags, the commands, the exit statuses of --help.
    let top = unescaped(&std::fs::read_to_string(dir.path().join("ocm.1")).unwrap());
    for flag in long_flags(&help) {
        assert!(describes(&top, &flag), "ocm(1) does not describe {flag}");
    }
    for command in ["ocm-create(1)", "ocm-join(1)", "ocm-rooms(1)", "ocm-who(1)"] {
        assert!(top.contains(command), "ocm(1) does not refer to {command}");
    }
    assert!(!top.contains("generate"), "ocm(1) shows the hidden command");
    let exit_status = top
        .split("EXIT STATUS")
        .nth(1)
        .expect("an EXIT STATUS section");
    // The exit statuses in order, each with what --help says of it.
    let mut at = 0;
    for (code, said) in [
        ("0", "Exit status: 0 after leaving"),
        ("1", "; 1 when the server cannot be reached"),
        ("2", "; 2 for a bad command line"),
        ("3", "; 3 when the room ended the chat"),
    ] {
        let tag = format!(".TP\n\\fB{code}\\fR");
        let Some(found) = exit_status[at..].find(&tag) else {
            panic!("ocm(1) lacks exit status {code} after the one before:\n{exit_status}");
        };
        at += found + tag.len();
        assert!(help.contains(said), "--help lacks {said:?}:\n{help}");
    }
    for variable in ["OCM_PASSWORD", "TERM", "RUST_LOG"] {
        assert!(
            top.contains(&format!("\\fB{variable}\\fR")),
            "ocm(1) lacks {variable}"
        );
    }

    // A page a command: every flag its --help shows (the global ones included).
    for command in ["create", "join", "rooms", "who"] {
        let command_help = stdout(&ocm, &[command, "--help"]);
        let page = unescaped(
            &std::fs::read_to_string(dir.path().join(format!("ocm-{command}.1"))).unwrap(),
        );
        assert!(page.contains(&format!(".TH ocm-{command} 1 ")), "{page}");
        for flag in long_flags(&command_help) {
            assert!(
                describes(&page, &flag),
                "ocm-{command}(1) does not describe {flag}"
            );
        }
        assert!(
            !page.contains("idle-check"),
            "ocm-{command}(1) shows a hidden flag"
        );
    }
    for name in &names {
        if let Some((text, warnings)) = rendered(&dir.path().join(name)) {
            assert!(warnings.is_empty(), "man warns about {name}:\n{warnings}");
            assert!(text.contains("SYNOPSIS"), "{name}:\n{text}");
        }
    }

    // A directory that cannot be written: a clear error, exit status 1.
    let out = Command::new(&ocm)
        .args(["generate", "man"])
        .arg(dir.path().join("missing/dir"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(&format!(
            "ocm: cannot write {}: ",
            dir.path().join("missing/dir/ocm-create.1").display()
        )),
        "{out:?}"
    );
}

/// A page's date (the third word of its `.TH` title line) and its text without that line or
/// the VERSION section, which carry the version: a new version alone is no change of text.
fn dated(page: &str) -> (Option<&str>, String) {
    let mut date = None;
    let mut body = String::with_capacity(page.len());
    let mut in_version = false;
    for line in page.lines() {
        if line.starts_with(".SH ") {
            in_version = line == ".SH VERSION";
        }
        if line.starts_with(".TH ") {
            date = line.split_whitespace().nth(3);
        } else if !in_version {
            body.push_str(line);
            body.push('\n');
        }
    }
    (date, body)
}

/// Today's date in UTC, as a page carries it (YYYY-MM-DD).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    civil_date(i64::try_from(secs / 86_400).expect("days since 1970"))
}

/// The date (YYYY-MM-DD, proleptic Gregorian) `days` after 1970-01-01: H. Hinnant's
/// `civil_from_days`.
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[test]
fn day_counts_become_dates() {
    assert_eq!(civil_date(0), "1970-01-01");
    assert_eq!(civil_date(11_016), "2000-02-29");
    assert_eq!(civil_date(20_794), "2026-12-07");
    assert_eq!(civil_date(47_541), "2100-03-01");
    assert_eq!(civil_date(-1), "1969-12-31");
}

/// The newest modification time of the files under `dir`.
fn newest_under(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let when = if path.is_dir() {
            newest_under(&path)
        } else {
            std::fs::metadata(&path).unwrap().modified().unwrap()
        };
        newest = newest.max(when);
    }
    newest
}

/// Each page carries the date of its text's last change (`PAGE_DATE`, kept by hand in the
/// source that writes it): the pages are recorded in `tests/data/manuals`, and a page whose
/// text differs from its record must carry a later date than the record's, or today's (a
/// second change on the day of the first). `OCM_BLESS=1` records the pages again, once every
/// page passes that check, from an `ocm` built after its last source change; a stale or
/// extra record fails until then.
#[test]
fn each_page_is_dated_by_its_last_change() {
    let ocmd = Path::new(env!("CARGO_BIN_EXE_ocmd"));
    let ocm = sibling_binary("ocm");
    let written = tempfile::tempdir().unwrap();
    run(&ocm, &["generate", "man", written.path().to_str().unwrap()]);
    let mut pages = vec![(
        "ocmd.8".to_owned(),
        stdout(ocmd, &["--generate-man"]),
        "crates/server/src/man_page.rs",
    )];
    let mut names: Vec<String> = std::fs::read_dir(written.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let page = std::fs::read_to_string(written.path().join(&name)).unwrap();
        pages.push((name, page, "crates/client/src/generate.rs"));
    }
    assert_eq!(pages.len(), 6, "ocmd(8), ocm(1) and a page a command");

    let records = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/manuals");
    let today = today();
    let mut stale = Vec::new();
    for (name, page, source) in &pages {
        let path = records.join(name);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let (date, body) = dated(page);
        let date = date.unwrap_or_else(|| panic!("{name} has no date:\n{page}"));
        let (recorded_date, recorded_body) = dated(&recorded);
        let newer = recorded_date.is_none_or(|recorded| date > recorded) || date == today;
        assert!(
            body == recorded_body || newer,
            "{name}'s text differs from {} but its date ({date}) is neither later than the \
             record's nor today's ({today}): bump PAGE_DATE in {source}, then record the pages \
             with OCM_BLESS=1",
            path.display(),
        );
        if *page != recorded {
            stale.push((path, page));
        }
    }
    let extra: Vec<_> = std::fs::read_dir(&records)
        .map(|dir| {
            dir.map(|entry| entry.unwrap().path())
                .filter(|path| !pages.iter().any(|(name, ..)| path.ends_with(name)))
                .collect()
        })
        .unwrap_or_default();
    if std::env::var_os("OCM_BLESS").is_some() {
        let client_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/src");
        let built = std::fs::metadata(&ocm).unwrap().modified().unwrap();
        assert!(
            built >= newest_under(&client_src),
            "{} is older than a source of it: build it (cargo build --workspace --bins) before \
             recording its pages",
            ocm.display()
        );
        std::fs::create_dir_all(&records).unwrap();
        for (path, page) in &stale {
            std::fs::write(path, page).unwrap();
        }
        for path in &extra {
            std::fs::remove_file(path).unwrap();
        }
        return;
    }
    let stale: Vec<_> = stale.iter().map(|(path, _)| path).collect();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "records that differ from the pages: {stale:?}; records of no page: {extra:?}; record \
         the pages with OCM_BLESS=1"
    );
}

/// Asks bash's completion function for the words that complete `line` (a command line up
/// to the cursor, words split at spaces).
fn bash_completes(script: &Path, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{line}'\nCOMP_POINT={}\n\
         _ocm ocm '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{program}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn ocm_completions_complete_its_commands_and_flags() {
    let ocm = sibling_binary("ocm");
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("ocm.bash");
    std::fs::write(&bash, stdout(&ocm, &["generate", "completions", "bash"])).unwrap();

    let commands = bash_completes(&bash, "ocm cr");
    assert_eq!(commands, ["create"], "ocm cr<TAB>");
    let all = bash_completes(&bash, "ocm ");
    for command in ["create", "join", "rooms", "who"] {
        assert!(
            all.iter().any(|w| w == command),
            "{command} not offered: {all:?}"
        );
    }
    assert!(
        !all.iter().any(|w| w == "generate"),
        "hidden command offered: {all:?}"
    );
    let flags = bash_completes(&bash, "ocm join lobby --pass");
    assert_eq!(
        flags,
        ["--password", "--password-file"],
        "ocm join lobby --pass<TAB>"
    );
    // A global flag is offered after the command too; a hidden one never.
    let flags = bash_completes(&bash, "ocm join lobby --se");
    assert_eq!(flags, ["--server"], "ocm join lobby --se<TAB>");
    let flags = bash_completes(&bash, "ocm join lobby --");
    assert!(flags.iter().any(|f| f == "--keepalive"), "{flags:?}");
    assert!(
        !flags.iter().any(|f| f == "--idle-check"),
        "hidden flag offered: {flags:?}"
    );

    // The other shells: their own syntax check, where they are installed.
    for (shell, check) in [
        ("zsh", ["-n"].as_slice()),
        ("fish", ["--no-execute"].as_slice()),
    ] {
        let script = stdout(&ocm, &["generate", "completions", shell]);
        assert!(script.contains("create") && script.contains("password-file"));
        assert!(
            !script.contains("idle-check") && !script.contains("generate"),
            "{shell}'s completions offer what --help hides"
        );
        if !installed(shell) {
            skipped(&format!(
                "{shell} not installed: its completions unchecked by it"
            ));
            continue;
        }
        let path = dir.path().join(format!("ocm.{shell}"));
        std::fs::write(&path, &script).unwrap();
        let out = Command::new(shell).args(check).arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{shell} {check:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let out = Command::new(&ocm)
        .args(["generate", "completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
