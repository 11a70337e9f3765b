//! The soak's verdicts and the notices it reads.

use ucrp::delivery::{self, Notice};

use super::cycle::notices;
use super::*;

fn sample(rooms: f64, fds: usize, rss_kib: u64) -> Sample {
    Sample {
        secs: 0.0,
        cycles: 0,
        rss_kib,
        fds,
        threads: 4,
        disk_bytes: 0,
        rooms,
        members: rooms * 2.0,
        tombstones: 0.0,
        tcp_open: 0.0,
        expiries: 0.0,
        dropped: 0.0,
        segmented: 0.0,
        reloads_applied: 0.0,
    }
}

fn result(totals: Totals, idle: Sample) -> SoakResult {
    SoakResult {
        plan: Plan {
            duration: Duration::from_secs(1),
            workers: 1,
            max_members: 4,
            sample_every: Duration::from_secs(1),
            reload_every: Duration::ZERO,
            rcvbuf: 0,
        },
        start: sample(0.0, 10, 1000),
        samples: [5000, 3000, 4000, 4100, 4200, 4100]
            .into_iter()
            .map(|rss| sample(3.0, 14, rss))
            .collect(),
        idle,
        reloads: 3,
        totals,
    }
}

fn clean() -> Totals {
    Totals {
        cycles: 10,
        members: 30,
        messages: 40,
        expected: 80,
        received: 80,
        closures_expected: 5,
        closures_received: 5,
        junk_datagrams: 30,
        dropped: 30.0,
        silent_hosts: 2,
        expiries: 2.0,
        reloads_applied: 3.0,
        ..Totals::default()
    }
}

#[test]
fn a_clean_run_passes_and_every_shortfall_is_named() {
    let idle = || sample(0.0, 10, 0);
    assert!(result(clean(), idle()).problems().is_empty());
    let cases = [
        (
            "deliveries arrived",
            Totals {
                received: 79,
                ..clean()
            },
            idle(),
        ),
        (
            "room-closed",
            Totals {
                closures_received: 4,
                ..clean()
            },
            idle(),
        ),
        (
            "had left",
            Totals {
                unexpected: 1,
                ..clean()
            },
            idle(),
        ),
        (
            "cycles failed",
            Totals {
                errors: 1,
                ..clean()
            },
            idle(),
        ),
        (
            "keepalive expiries",
            Totals {
                expiries: 1.0,
                ..clean()
            },
            idle(),
        ),
        (
            "no silent host",
            Totals {
                silent_hosts: 0,
                expiries: 0.0,
                ..clean()
            },
            idle(),
        ),
        (
            "counted as dropped",
            Totals {
                dropped: 29.0,
                ..clean()
            },
            idle(),
        ),
        (
            "reloads applied",
            Totals {
                reloads_applied: 2.0,
                ..clean()
            },
            idle(),
        ),
        ("left behind", clean(), sample(1.0, 10, 0)),
        ("descriptors", clean(), sample(0.0, 11, 0)),
    ];
    for (needle, totals, idle) in cases {
        let problems = result(totals, idle).problems();
        assert_eq!(problems.len(), 1, "{needle}: {problems:?}");
        assert!(problems[0].contains(needle), "{needle}: {problems:?}");
    }
    let none = Totals {
        cycles: 0,
        ..clean()
    };
    assert!(result(none, idle()).problems()[0].contains("no cycle"));
}

#[test]
fn a_plan_without_workers_or_with_rooms_of_one_is_refused() {
    let plan = result(clean(), sample(0.0, 10, 0)).plan;
    assert!(plan.check().is_ok());
    for bad in [
        Plan { workers: 0, ..plan },
        Plan {
            max_members: 1,
            ..plan
        },
    ] {
        let err = bad.check().expect_err("refused").to_string();
        assert!(err.contains("--workers ≥ 1 and --max-members ≥ 2"), "{err}");
    }
}

#[test]
fn idle_means_nothing_held_beyond_the_start() {
    let start = sample(0.0, 10, 0);
    assert!(sample(0.0, 10, 0).is_idle(&start));
    assert!(sample(0.0, 9, 0).is_idle(&start));
    assert!(!sample(1.0, 10, 0).is_idle(&start));
    assert!(!sample(0.0, 11, 0).is_idle(&start));
    let open = Sample {
        tcp_open: 1.0,
        ..sample(0.0, 10, 0)
    };
    assert!(!open.is_idle(&start));
}

#[test]
fn resident_size_is_judged_past_the_first_third_once_the_tombstones_are_full() {
    let with_tombstones = |rss: &[u64], tombstones: &[f64]| {
        let mut r = result(clean(), sample(0.0, 10, 0));
        r.samples = rss
            .iter()
            .zip(tombstones)
            .map(|(&rss_kib, &tombstones)| Sample {
                tombstones,
                ..sample(3.0, 14, rss_kib)
            })
            .collect();
        r.idle.tombstones = *tombstones.last().unwrap_or(&0.0);
        r
    };
    let full = [9.0; 6];
    // Six samples: the first two (a third) are left out; 4000 → 4500 is +12.5%.
    let r = with_tombstones(&[5000, 3000, 4000, 4500, 4200, 4100], &full);
    assert_eq!(r.rss_growth(), Some((4000, 4500, 12.5)));
    assert!(
        r.problems().iter().any(|p| p.contains("grew 12.5%")),
        "{:?}",
        r.problems()
    );
    let r = with_tombstones(&[5000, 3000, 4000, 4300, 4200, 4100], &full);
    assert_eq!(r.rss_growth(), Some((4000, 4300, 7.5)));
    assert!(r.problems().is_empty(), "{:?}", r.problems());
    // Tombstones still growing until the fourth sample: the window starts there.
    let filling = [1.0, 2.0, 3.0, 9.0, 9.0, 9.0];
    let r = with_tombstones(&[1000, 2000, 3000, 4000, 4100, 4200], &filling);
    assert_eq!(r.rss_growth(), Some((4000, 4200, 5.0)));
    // Full only at the fifth: two samples left, too few to judge.
    let late = [1.0, 2.0, 3.0, 4.0, 9.0, 9.0];
    let r = with_tombstones(&[1000, 2000, 3000, 4000, 8000, 9000], &late);
    assert_eq!(r.rss_growth(), None);
    assert!(r.problems().is_empty(), "{:?}", r.problems());
}

#[test]
fn notices_are_read_alone_and_out_of_batches() {
    let mut left = Vec::new();
    delivery::encode_notice(Notice::Left, "m3", &mut left).expect("encode");
    assert_eq!(notices(&left), vec![(Notice::Left, "m3")]);
    let mut batch = Vec::new();
    delivery::begin_batch(&mut batch);
    let mut joined = Vec::new();
    delivery::encode_notice(Notice::Joined, "m5", &mut joined).expect("encode");
    let mut chat = Vec::new();
    delivery::encode_chat("m1", b"hi", &mut chat).expect("encode");
    for entry in [&left, &chat, &joined] {
        delivery::push_batch_entry(entry, &mut batch).expect("push");
    }
    assert_eq!(
        notices(&batch),
        vec![(Notice::Left, "m3"), (Notice::Joined, "m5")]
    );
    assert!(notices(&chat).is_empty());
}
