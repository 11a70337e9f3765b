//! Runs `ocm-bench smoke` against the debug `ocmd` built beside it (scripts/test builds every
//! binary first) and checks that messages were delivered, handshakes completed and the short
//! soak closed rooms (it fails the run itself if anything was missing or left behind). No timing
//! is asserted: CI machines are shared.

use std::path::Path;
use std::process::Command;

#[test]
fn smoke_delivers_and_handshakes() {
    let bench = Path::new(env!("CARGO_BIN_EXE_ocm-bench"));
    let ocmd = bench.with_file_name("ocmd");
    assert!(
        ocmd.exists(),
        "{} is missing: build every binary first (cargo build --workspace --bins, as scripts/test does)",
        ocmd.display()
    );
    let stdout = run_with_bench_config(&ocmd, &["smoke"]);
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("smoke: "))
        .unwrap_or_else(|| panic!("no summary line\n{stdout}"));
    let count = |key: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {summary:?}"))
    };
    assert!(count("deliveries=") > 0, "{stdout}");
    assert!(count("handshakes=") > 0, "{stdout}");
    assert!(count("soak_rooms=") > 0, "{stdout}");
}

/// A preload that cannot build the state asked for (here the daemon caps rooms at 5 members,
/// the preload wants rooms of 10) stops the run with an error, instead of reporting figures
/// "at N tokens" measured on fewer.
#[test]
fn a_preload_that_falls_short_is_an_error() {
    let bench = Path::new(env!("CARGO_BIN_EXE_ocm-bench"));
    let ocmd = bench.with_file_name("ocmd");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shipped = std::fs::read_to_string(workspace.join("config/bench.toml")).unwrap();
    let capped = shipped.replace("max_members_per_room = 0", "max_members_per_room = 5");
    assert_ne!(
        capped, shipped,
        "config/bench.toml sets max_members_per_room"
    );
    let dir = std::env::temp_dir().join(format!("ocm-bench-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("capped.toml");
    std::fs::write(&config, capped).unwrap();
    let output = Command::new(bench)
        .arg("--ocmd")
        .arg(&ocmd)
        .arg("--config")
        .arg(&config)
        .args(["handshakes", "--rooms", "2", "--joins", "2"])
        .args(["--concurrency", "2", "--preload", "50"])
        .output()
        .expect("run ocm-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run went on: {stderr}");
    assert!(
        stderr.contains("the preload fell short: 25 of 50 tokens"),
        "{stderr}"
    );
}

/// A fan-out run in three rooms against the debug `ocmd`: every message a sender of any room
/// offered reaches the other members of its room, once. No timing is asserted.
#[test]
fn a_fanout_in_several_rooms_delivers_each_rooms_messages_to_its_members() {
    let ocmd = Path::new(env!("CARGO_BIN_EXE_ocm-bench")).with_file_name("ocmd");
    let args = "--json fanout --members 4 --rooms 3 --senders 2 --rate 600 --duration 1 \
                --caps batch --no-ceiling";
    let stdout = run_with_bench_config(&ocmd, &args.split_whitespace().collect::<Vec<_>>());
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line\n{stdout}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON result");
    let result = &json["result"];
    let count = |key: &str| {
        result[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {result}"))
    };
    assert_eq!((count("rooms"), count("members")), (3, 4), "{result}");
    assert!(count("offered") > 0, "{result}");
    assert_eq!(count("expected"), count("offered") * 3, "{result}");
    assert_eq!(count("received"), count("expected"), "{result}");
    assert_eq!((count("undecodable"), count("stale")), (0, 0), "{result}");
    assert!(stdout.contains("rooms=3"), "{stdout}");
}

/// Runs `ocm-bench` with `ocmd` and config/bench.toml, then `args`; returns its stdout once
/// it succeeded (a failure shows both streams).
fn run_with_bench_config(ocmd: &Path, args: &[&str]) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(env!("CARGO_BIN_EXE_ocm-bench"))
        .arg("--ocmd")
        .arg(ocmd)
        .arg("--config")
        .arg(workspace.join("config/bench.toml"))
        .args(args)
        .output()
        .expect("run ocm-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ocm-bench {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    stdout
}
