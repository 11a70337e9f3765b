//! Counters and gauges, and their Prometheus text rendering.
//!
//! The event loop owns a [`Metrics`] and bumps plain integers (it is single-threaded, so no
//! atomics); `/metrics` renders them in the Prometheus text exposition format, version 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tcrp::Operation;

use crate::conn::CloseReason;
use crate::persist::Compactions;
use crate::rooms::{DropReason, Stats};

/// Every counter the daemon keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Unix time the process started, seconds.
    pub start_time: f64,
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// `accept` calls that failed (EMFILE and friends).
    pub accept_errors: u64,
    /// Times a connection was paused for not reading its replies.
    pub tcp_pauses: u64,
    /// TCP connections refused by reason (`max_connections`, `max_connections_per_ip`,
    /// `max_metrics_connections`, `poll_register`).
    pub tcp_rejected: BTreeMap<&'static str, u64>,
    /// Answers of the metrics endpoint by status code (`200`, `400`, `404`, `431`, `503`).
    pub http_responses: BTreeMap<&'static str, u64>,
    /// TCP connections closed by reason.
    pub tcp_closed: BTreeMap<&'static str, u64>,
    /// TCP connections open now.
    pub tcp_open: u64,
    /// Handshakes by operation and result.
    pub handshakes: BTreeMap<(&'static str, &'static str), u64>,
    /// Datagrams received on the UDP socket.
    pub datagrams_received: u64,
    /// Chat messages relayed (each counted once, whatever its fan-out).
    pub messages_relayed: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Messages delivered (a batch datagram carries several).
    pub deliveries: u64,
    /// Datagrams sent as part of a segmented send (`UDP_SEGMENT`), among `datagrams_sent`.
    pub datagrams_segmented: u64,
    /// Destination IP addresses whose segmented send the kernel refused but whose datagrams
    /// it took one at a time; each gets one datagram per send for a while
    /// (`udp::UNSEGMENTED_FOR`).
    pub segmentation_refusals: u64,
    /// Datagrams dropped, by reason.
    pub datagrams_dropped: BTreeMap<&'static str, u64>,
    /// Sends that failed, by reason.
    pub send_errors: BTreeMap<&'static str, u64>,
    /// Members' last words from their rooms (`__ROOM_CLOSED__`) that the kernel had no room
    /// for, held to be sent again (`last_words.rs`); those given up after
    /// `last_words::MAX_HELD_AGE` count in `send_errors` as `last_words_expired`.
    pub last_words_held: u64,
    /// Rate-limit hits by kind (`chat`, `request`, `password_queue`).
    pub rate_limited: BTreeMap<&'static str, u64>,
    /// Answers to remembered tokens: `__ROOM_CLOSED__`, or the timed-out notice.
    pub closed_room_replies: u64,
    /// Members expired for missing keepalives.
    pub keepalive_expiries: u64,
    /// Rooms closed because nobody was heard from in them (`[liveness] room_idle_secs`).
    pub idle_rooms_closed: u64,
    /// Periodic checkpoints put off because the last one was not durable yet.
    pub checkpoints_deferred: u64,
    /// Journal writes made durable (group commits, carrying every batch queued when each
    /// started): one `write` + `fdatasync` each, or one pair per piece of at most 64 KiB
    /// (`journal::MAX_UNSYNCED_BYTES`) for a larger one.
    pub state_writes: u64,
    /// Records in them.
    pub state_write_records: u64,
    /// Total time spent writing them.
    pub state_write_seconds: f64,
    /// Longest single write.
    pub state_write_max_seconds: f64,
    /// State file writes by the compactor (and the fold at start), as last reported by the
    /// writer.
    pub compactions: Compactions,
    /// The kernel's count of datagrams dropped on the UDP socket before they were read (a
    /// full receive buffer mostly), as a 64-bit total (`udp::KernelDrops`).
    pub udp_kernel_drops: u64,
    /// Configuration reloads by result.
    pub reloads: BTreeMap<&'static str, u64>,
    /// Time from a datagram's arrival on the socket until what it caused was sent.
    pub relay_delay: crate::delay::DelayHistogram,
    /// Time a create or join reply waited for its journal batch to be durable.
    pub durable_wait: crate::delay::DelayHistogram<crate::delay::DurableWait>,
}

/// Name of an operation for labels.
pub fn operation_label(op: Operation) -> &'static str {
    match op {
        Operation::CreateRoom => "create_room",
        Operation::JoinRoom => "join_room",
        Operation::ListRooms => "list_rooms",
        Operation::Presence => "presence",
        Operation::History => "history",
        Operation::Other(_) => "other",
    }
}

/// Reasons a TCP connection is refused at accept (`ocm_tcp_connections_rejected_total`).
const TCP_REJECT_REASONS: [&str; 4] = [
    "max_connections",
    "max_connections_per_ip",
    "max_metrics_connections",
    "poll_register",
];

/// Reasons a datagram's send fails (`ocm_send_errors_total`).
const SEND_ERROR_REASONS: [&str; 4] = [
    "would_block",
    "last_words_full",
    "last_words_expired",
    "other",
];

/// Results of a SIGHUP reload (`ocm_config_reloads_total`).
const RELOAD_RESULTS: [&str; 3] = ["ok", "error", "no_file"];

/// A labelled counter with each of `labels` at 0.
fn at_zero(labels: impl IntoIterator<Item = &'static str>) -> BTreeMap<&'static str, u64> {
    labels.into_iter().map(|label| (label, 0)).collect()
}

impl Metrics {
    /// Fresh counters stamped with the start time.
    pub fn new() -> Metrics {
        Metrics {
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64(),
            // What the alerts (config/ocmd-alerts.yml) and most dashboards read shows from
            // the start, at 0, so that `increase()` and `rate()` see a series before its
            // first event: a series born at 1 shows no increase. That is every reason the
            // registry may drop for, every reason a connection is refused or closed or a
            // send fails, and every reload result. (The codec's parse failures, the rate
            // limits' kinds, the handshakes and the HTTP codes show once they happen:
            // docs/OPERATIONS.md says which.)
            datagrams_dropped: at_zero(DropReason::REGISTRY.iter().map(|r| r.label())),
            tcp_rejected: at_zero(TCP_REJECT_REASONS),
            tcp_closed: at_zero(CloseReason::ALL.iter().map(|r| r.label())),
            send_errors: at_zero(SEND_ERROR_REASONS),
            reloads: at_zero(RELOAD_RESULTS),
            ..Metrics::default()
        }
    }

    /// Adds one to a labelled counter.
    pub fn bump(map: &mut BTreeMap<&'static str, u64>, label: &'static str) {
        *map.entry(label).or_insert(0) += 1;
    }

    /// Records a finished journal write.
    pub fn state_write(&mut self, records: usize, elapsed: Duration) {
        self.state_writes += 1;
        self.state_write_records += records as u64;
        let secs = elapsed.as_secs_f64();
        self.state_write_seconds += secs;
        self.state_write_max_seconds = self.state_write_max_seconds.max(secs);
    }

    /// Records the writer's compaction counters (they are kept by the persister, which the
    /// compactor thread updates).
    pub fn state_compactions(&mut self, compactions: Compactions) {
        self.compactions = compactions;
    }

    /// Renders everything, with the registry's gauges, as Prometheus text.
    pub fn render(&self, stats: Stats) -> String {
        let mut out = String::with_capacity(4096);
        self.render_gauges(&stats, &mut out);
        self.render_counters(&stats, &mut out);
        self.render_labelled(&mut out);
        self.relay_delay.render(
            "ocm_relay_delay_seconds",
            "Time from a datagram's arrival on the UDP socket (kernel timestamp) until every datagram it caused was handed to the kernel.",
            &mut out,
        );
        self.durable_wait.render(
            "ocm_handshake_durable_wait_seconds",
            "Time a create or join reply (one carrying a new token) waited for its journal batch to be written and fsync'd before it could leave: group commit and the disk, as clients see them.",
            &mut out,
        );
        out
    }

    /// The gauges: the registry's `stats`, open connections and the state writes' timings.
    fn render_gauges(&self, stats: &Stats, out: &mut String) {
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge("ocm_rooms", "Rooms open.", stats.rooms as f64);
        gauge(
            "ocm_members",
            "Members (tokens) in all rooms.",
            stats.members as f64,
        );
        gauge(
            "ocm_members_registered",
            "Members with a registered UDP address.",
            stats.registered as f64,
        );
        gauge(
            "ocm_tombstones",
            "Tokens of closed rooms and of expired members remembered, to answer late datagrams.",
            stats.tombstones as f64,
        );
        gauge(
            "ocm_udp_local_addresses",
            "Addresses of this host that members are sent from (a UDP socket bound to a wildcard address only).",
            stats.local_addresses as f64,
        );
        gauge(
            "ocm_tcp_connections_open",
            "TCP connections open.",
            self.tcp_open as f64,
        );
        gauge(
            "ocm_process_start_time_seconds",
            "Start time of the process, Unix seconds.",
            self.start_time,
        );
        gauge(
            "ocm_state_write_max_seconds",
            "Longest journal write (write and fsync), seconds.",
            self.state_write_max_seconds,
        );
        gauge(
            "ocm_state_compaction_last_seconds",
            "Time the last state file write took (a journal compaction, or the fold at start), seconds.",
            self.compactions.last_seconds,
        );
        gauge(
            "ocm_state_compaction_max_seconds",
            "Longest state file write, seconds.",
            self.compactions.max_seconds,
        );
    }

    /// The counters without labels (the registry's retired sources among them).
    fn render_counters(&self, stats: &Stats, out: &mut String) {
        let counters: [(&str, &str, f64); 26] = [
            (
                "ocm_tcp_connections_accepted_total",
                "TCP connections accepted.",
                self.tcp_accepted as f64,
            ),
            (
                "ocm_tcp_accept_errors_total",
                "accept calls that failed (EMFILE and friends); the listener is retried 50 ms later.",
                self.accept_errors as f64,
            ),
            (
                "ocm_tcp_output_pauses_total",
                "Times a TCP connection was paused (its requests left unread) because its unread replies passed max_output_bytes.",
                self.tcp_pauses as f64,
            ),
            (
                "ocm_datagrams_received_total",
                "Datagrams received.",
                self.datagrams_received as f64,
            ),
            (
                "ocm_messages_relayed_total",
                "Chat messages relayed (once each, whatever the fan-out).",
                self.messages_relayed as f64,
            ),
            (
                "ocm_datagrams_sent_total",
                "Datagrams sent.",
                self.datagrams_sent as f64,
            ),
            (
                "ocm_deliveries_total",
                "Messages delivered to members (a batch datagram carries several).",
                self.deliveries as f64,
            ),
            (
                "ocm_datagrams_segmented_total",
                "Datagrams sent as part of a segmented send (several per system-call entry).",
                self.datagrams_segmented as f64,
            ),
            (
                "ocm_udp_segmentation_refusals_total",
                "Destination IP addresses whose segmented send the kernel refused but whose datagrams it took one at a time; each gets one datagram per send for 10 minutes.",
                self.segmentation_refusals as f64,
            ),
            (
                "ocm_last_words_held_total",
                "__ROOM_CLOSED__ datagrams to members of a closing room that the kernel had no room for (a full send buffer, no buffer memory), held and sent again once it has; past 4096 held, they are dropped as ocm_send_errors_total{reason=\"last_words_full\"}, and one held for 30 s is given up as reason=\"last_words_expired\".",
                self.last_words_held as f64,
            ),
            (
                "ocm_closed_room_replies_total",
                "Answers to remembered tokens: __ROOM_CLOSED__, or the timed-out notice.",
                self.closed_room_replies as f64,
            ),
            (
                "ocm_keepalive_expiries_total",
                "Members expired for missing keepalives.",
                self.keepalive_expiries as f64,
            ),
            (
                "ocm_checkpoints_deferred_total",
                "Periodic history checkpoints put off because the last one was not durable yet (a slow or stuck disk).",
                self.checkpoints_deferred as f64,
            ),
            (
                "ocm_idle_rooms_closed_total",
                "Rooms closed because none of their members was heard from for liveness.room_idle_secs.",
                self.idle_rooms_closed as f64,
            ),
            (
                "ocm_state_writes_total",
                "Journal writes made durable (group commits): one write and fdatasync each (one pair per piece of at most 64 KiB for a larger one), carrying the batches queued meanwhile.",
                self.state_writes as f64,
            ),
            (
                "ocm_state_write_records_total",
                "Records in those batches.",
                self.state_write_records as f64,
            ),
            (
                "ocm_state_write_seconds_total",
                "Time spent writing them, seconds.",
                self.state_write_seconds,
            ),
            (
                "ocm_state_write_failures_total",
                "Failed tries to write the journal (a full disk, an I/O error), each retried a second later; creates and joins wait meanwhile.",
                self.compactions.write_failures as f64,
            ),
            (
                "ocm_state_files_restored_total",
                "State files deleted while in use and put back from memory: a journal (with the state file after it), a state file, a lock file.",
                self.compactions.files_restored as f64,
            ),
            (
                "ocm_state_compactions_total",
                "State files written: the fold at start, each journal compaction, and each state file written again after a deletion.",
                self.compactions.written as f64,
            ),
            (
                "ocm_state_compaction_failures_total",
                "State file writes that failed, each retried: compactions (journal.old kept; nothing is lost) and rewrites of a state file deleted while in use.",
                self.compactions.failed as f64,
            ),
            (
                "ocm_state_compaction_seconds_total",
                "Time spent writing state files, seconds.",
                self.compactions.seconds,
            ),
            (
                "ocm_state_backups_total",
                "Backup files (room_manager.json.backup) written on SIGUSR1.",
                self.compactions.backups as f64,
            ),
            (
                "ocm_state_backup_failures_total",
                "Backups asked for with SIGUSR1 that could not be written (each logged at error).",
                self.compactions.backups_failed as f64,
            ),
            (
                "ocm_udp_sources_retired_total",
                "Times an address members were sent from was no longer taken as a source by the kernel.",
                stats.sources_retired as f64,
            ),
            (
                "ocm_udp_receive_buffer_drops_total",
                "Datagrams the kernel dropped on the UDP socket before they were read (a full receive buffer, mostly; also bad checksums and memory pressure).",
                self.udp_kernel_drops as f64,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
    }

    /// The counters with a label (a reason, a kind, a result), and the handshakes by
    /// operation and result.
    fn render_labelled(&self, out: &mut String) {
        let labelled: [(&str, &str, &str, &BTreeMap<&'static str, u64>); 7] = [
            (
                "ocm_tcp_connections_rejected_total",
                "TCP connections refused at accept.",
                "reason",
                &self.tcp_rejected,
            ),
            (
                "ocm_tcp_connections_closed_total",
                "TCP connections closed.",
                "reason",
                &self.tcp_closed,
            ),
            (
                "ocm_datagrams_dropped_total",
                "Datagrams dropped.",
                "reason",
                &self.datagrams_dropped,
            ),
            (
                "ocm_send_errors_total",
                "Datagram sends that failed.",
                "reason",
                &self.send_errors,
            ),
            (
                "ocm_rate_limited_total",
                "Rate-limit hits.",
                "kind",
                &self.rate_limited,
            ),
            (
                "ocm_config_reloads_total",
                "Configuration reloads.",
                "result",
                &self.reloads,
            ),
            (
                "ocm_http_responses_total",
                "Answers of the metrics endpoint.",
                "code",
                &self.http_responses,
            ),
        ];
        for (name, help, label, map) in labelled {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (value, count) in map {
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
            }
        }
        let name = "ocm_handshakes_total";
        let _ = writeln!(
            out,
            "# HELP {name} TCRP requests by operation and result.\n# TYPE {name} counter"
        );
        for ((op, result), count) in &self.handshakes {
            let _ = writeln!(
                out,
                "{name}{{operation=\"{op}\",result=\"{result}\"}} {count}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::{HardLinks, LockState};

    #[test]
    fn renders_prometheus_text() {
        let mut m = Metrics::new();
        Metrics::bump(&mut m.datagrams_dropped, "unknown_token");
        Metrics::bump(&mut m.datagrams_dropped, "unknown_token");
        *m.handshakes.entry(("join_room", "ok")).or_insert(0) += 3;
        m.state_write(4, Duration::from_millis(2));
        m.state_compactions(Compactions {
            written: 3,
            failed: 1,
            seconds: 0.25,
            last_seconds: 0.125,
            max_seconds: 0.125,
            write_failures: 2,
            files_restored: 1,
            files_missing: false,
            lock: LockState::Held,
            hard_links: HardLinks::default(),
            backups: 0,
            backups_failed: 0,
        });
        let text = m.render(Stats {
            rooms: 2,
            members: 5,
            registered: 4,
            tombstones: 0,
            local_addresses: 3,
            sources_retired: 1,
        });
        assert!(text.contains("ocm_udp_local_addresses 3\n"));
        assert!(text.contains("ocm_udp_sources_retired_total 1\n"));
        assert!(text.contains("ocm_rooms 2\n"));
        assert!(text.contains("ocm_datagrams_dropped_total{reason=\"unknown_token\"} 2\n"));
        assert!(text.contains("ocm_datagrams_dropped_total{reason=\"stale\"} 0\n"));
        assert!(text.contains("ocm_handshakes_total{operation=\"join_room\",result=\"ok\"} 3\n"));
        assert!(text.contains("ocm_state_write_records_total 4\n"));
        assert!(text.contains("ocm_state_compactions_total 3\n"));
        assert!(text.contains("ocm_state_compaction_failures_total 1\n"));
        assert!(text.contains("ocm_state_write_failures_total 2\n"));
        assert!(text.contains("ocm_state_files_restored_total 1\n"));
        assert!(text.contains("ocm_state_compaction_last_seconds 0.125\n"));
        // Every sample line belongs to a family declared with # TYPE (a histogram's samples
        // add _bucket, _sum and _count to its name).
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let sample = line.split(['{', ' ']).next().unwrap();
            let declared = |family: &str| text.contains(&format!("# TYPE {family} "));
            let histogram = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                sample
                    .strip_suffix(suffix)
                    .is_some_and(|family| text.contains(&format!("# TYPE {family} histogram")))
            });
            assert!(declared(sample) || histogram, "{line}");
        }
        assert!(text.contains("ocm_relay_delay_seconds_bucket{le=\"+Inf\"} 0\n"));
    }

    #[test]
    fn journal_writes_add_up_their_count_records_and_time_and_keep_the_longest() {
        let mut m = Metrics::new();
        m.state_write(4, Duration::from_millis(500));
        m.state_write(6, Duration::from_millis(250));
        assert_eq!((m.state_writes, m.state_write_records), (2, 10));
        assert_eq!(m.state_write_seconds, 0.75);
        assert_eq!(m.state_write_max_seconds, 0.5);
        let text = m.render(Stats::default());
        assert!(text.contains("ocm_state_writes_total 2\n"), "{text}");
        assert!(
            text.contains("ocm_state_write_seconds_total 0.75\n"),
            "{text}"
        );
        assert!(text.contains("ocm_state_write_max_seconds 0.5\n"), "{text}");
    }

    #[test]
    fn each_operation_is_labelled_as_the_docs_name_it() {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        let row = doc
            .lines()
            .find(|l| l.starts_with("| `ocm_handshakes_total`"))
            .expect("OPERATIONS.md lists ocm_handshakes_total");
        for (op, label) in [
            (Operation::CreateRoom, "create_room"),
            (Operation::JoinRoom, "join_room"),
            (Operation::ListRooms, "list_rooms"),
            (Operation::Presence, "presence"),
            (Operation::History, "history"),
            (Operation::Other(0x2a), "other"),
        ] {
            assert_eq!(operation_label(op), label, "{op:?}");
            assert!(row.contains(&format!("`{label}`")), "{label}: {row}");
        }
    }

    /// docs/OPERATIONS.md's paragraph on which labelled series show before anything happened.
    fn documented_start() -> &'static str {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        let start = doc
            .find("Of the labelled counters")
            .expect("OPERATIONS.md says which labelled series show from the start");
        let rest = &doc[start..];
        &rest[..rest.find("\n\n").unwrap_or(rest.len())]
    }

    #[test]
    fn fresh_metrics_show_the_labelled_series_the_docs_say() {
        let text = Metrics::new().render(Stats::default());
        let doc = documented_start();
        let mut families = std::collections::BTreeSet::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('{') && !l.contains("_bucket{"))
        {
            let (family, rest) = line.split_once('{').unwrap_or_default();
            let value = rest.split('"').nth(1).unwrap_or_default();
            assert!(line.ends_with("} 0"), "{line}: a fresh series is at 0");
            assert!(doc.contains(&format!("`{family}`")), "{family}: {doc}");
            assert!(doc.contains(&format!("`{value}`")), "{line}: {doc}");
            families.insert(family);
        }
        // What the alerts read (config/ocmd-alerts.yml; tests/ops.rs checks that they read
        // only series a fresh daemon shows) and the registry's drop reasons.
        assert_eq!(
            families.into_iter().collect::<Vec<_>>(),
            [
                "ocm_config_reloads_total",
                "ocm_datagrams_dropped_total",
                "ocm_send_errors_total",
                "ocm_tcp_connections_closed_total",
                "ocm_tcp_connections_rejected_total",
            ]
        );
        for reason in DropReason::REGISTRY {
            let series = format!(
                "ocm_datagrams_dropped_total{{reason=\"{}\"}} 0",
                reason.label()
            );
            assert!(text.contains(&series), "{series}");
        }
        for reason in CloseReason::ALL {
            let series = format!(
                "ocm_tcp_connections_closed_total{{reason=\"{}\"}} 0",
                reason.label()
            );
            assert!(text.contains(&series), "{series}");
        }
        // Every other labelled counter starts with no series: the docs name each.
        let labelled_families = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" counter"))
            .filter(|family| !text.contains(&format!("\n{family} ")));
        for family in labelled_families {
            assert!(doc.contains(&format!("`{family}`")), "{family}: {doc}");
        }
    }

    /// The metrics table of docs/OPERATIONS.md: each family's name, type and label names.
    fn documented_families() -> BTreeMap<String, (String, Vec<String>)> {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        doc.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("| `ocm_")?;
                let (name, rest) = rest.split_once("` | ")?;
                let (kind, rest) = rest.split_once(" |")?;
                let cell = rest.split(" | ").next().unwrap_or("");
                // A label name is written `name`: in its cell, its values after it.
                let labels = cell
                    .split('`')
                    .collect::<Vec<_>>()
                    .windows(2)
                    .filter(|w| w[1].starts_with(':'))
                    .map(|w| w[0].to_owned())
                    .collect();
                Some((format!("ocm_{name}"), (kind.to_owned(), labels)))
            })
            .collect()
    }

    /// Every family the metrics endpoint renders is in docs/OPERATIONS.md's table with its
    /// type and label names, and every family there is rendered; and each shows its own
    /// counter: given a different value each, every sample reads the one it was given.
    #[test]
    fn every_family_is_rendered_as_the_docs_list_it_with_its_own_value() {
        let mut m = Metrics::new();
        m.start_time = 101.0;
        m.tcp_accepted = 102;
        m.accept_errors = 103;
        m.tcp_pauses = 104;
        m.tcp_open = 105;
        m.datagrams_received = 106;
        m.messages_relayed = 107;
        m.datagrams_sent = 108;
        m.deliveries = 109;
        m.datagrams_segmented = 110;
        m.segmentation_refusals = 111;
        m.last_words_held = 112;
        m.closed_room_replies = 113;
        m.keepalive_expiries = 114;
        m.idle_rooms_closed = 115;
        m.checkpoints_deferred = 116;
        m.state_writes = 117;
        m.state_write_records = 118;
        m.state_write_seconds = 119.5;
        m.state_write_max_seconds = 120.5;
        m.udp_kernel_drops = 121;
        m.compactions = Compactions {
            written: 122,
            failed: 123,
            seconds: 124.5,
            last_seconds: 125.5,
            max_seconds: 126.5,
            write_failures: 127,
            files_restored: 128,
            backups: 129,
            backups_failed: 130,
            ..Compactions::default()
        };
        m.tcp_rejected.insert("max_connections", 131);
        m.tcp_closed.insert("timeout", 132);
        m.datagrams_dropped.insert("too_short", 133);
        m.send_errors.insert("other", 134);
        m.rate_limited.insert("chat", 135);
        m.reloads.insert("ok", 136);
        m.http_responses.insert("404", 137);
        m.handshakes.insert(("presence", "ok"), 138);
        m.relay_delay.record(Duration::from_millis(2));
        m.durable_wait.record(Duration::from_secs(3));
        m.durable_wait.record(Duration::from_secs(4));
        let text = m.render(Stats {
            rooms: 141,
            members: 142,
            registered: 143,
            tombstones: 144,
            local_addresses: 145,
            sources_retired: 146,
        });
        let expected = [
            ("ocm_rooms", 141.0),
            ("ocm_members", 142.0),
            ("ocm_members_registered", 143.0),
            ("ocm_tombstones", 144.0),
            ("ocm_udp_local_addresses", 145.0),
            ("ocm_tcp_connections_open", 105.0),
            ("ocm_process_start_time_seconds", 101.0),
            ("ocm_state_write_max_seconds", 120.5),
            ("ocm_state_compaction_last_seconds", 125.5),
            ("ocm_state_compaction_max_seconds", 126.5),
            ("ocm_tcp_connections_accepted_total", 102.0),
            ("ocm_tcp_accept_errors_total", 103.0),
            ("ocm_tcp_output_pauses_total", 104.0),
            ("ocm_datagrams_received_total", 106.0),
            ("ocm_messages_relayed_total", 107.0),
            ("ocm_datagrams_sent_total", 108.0),
            ("ocm_deliveries_total", 109.0),
            ("ocm_datagrams_segmented_total", 110.0),
            ("ocm_udp_segmentation_refusals_total", 111.0),
            ("ocm_last_words_held_total", 112.0),
            ("ocm_closed_room_replies_total", 113.0),
            ("ocm_keepalive_expiries_total", 114.0),
            ("ocm_idle_rooms_closed_total", 115.0),
            ("ocm_checkpoints_deferred_total", 116.0),
            ("ocm_state_writes_total", 117.0),
            ("ocm_state_write_records_total", 118.0),
            ("ocm_state_write_seconds_total", 119.5),
            ("ocm_udp_receive_buffer_drops_total", 121.0),
            ("ocm_state_compactions_total", 122.0),
            ("ocm_state_compaction_failures_total", 123.0),
            ("ocm_state_compaction_seconds_total", 124.5),
            ("ocm_state_write_failures_total", 127.0),
            ("ocm_state_files_restored_total", 128.0),
            ("ocm_state_backups_total", 129.0),
            ("ocm_state_backup_failures_total", 130.0),
            ("ocm_udp_sources_retired_total", 146.0),
            (
                "ocm_tcp_connections_rejected_total{reason=\"max_connections\"}",
                131.0,
            ),
            (
                "ocm_tcp_connections_closed_total{reason=\"timeout\"}",
                132.0,
            ),
            ("ocm_datagrams_dropped_total{reason=\"too_short\"}", 133.0),
            ("ocm_send_errors_total{reason=\"other\"}", 134.0),
            ("ocm_rate_limited_total{kind=\"chat\"}", 135.0),
            ("ocm_config_reloads_total{result=\"ok\"}", 136.0),
            ("ocm_http_responses_total{code=\"404\"}", 137.0),
            (
                "ocm_handshakes_total{operation=\"presence\",result=\"ok\"}",
                138.0,
            ),
            ("ocm_relay_delay_seconds_count", 1.0),
            ("ocm_relay_delay_seconds_sum", 0.002),
            ("ocm_handshake_durable_wait_seconds_count", 2.0),
            ("ocm_handshake_durable_wait_seconds_sum", 7.0),
        ];
        let samples: BTreeMap<&str, f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(sample, value)| (sample, value.parse().expect("a number")))
            .collect();
        for (sample, value) in expected {
            assert_eq!(samples.get(sample), Some(&value), "{sample}\n{text}");
        }
        // Each sample above is the only one of its family not at 0, the registry's drop
        // reasons and the histograms' buckets aside: a new family needs a line here.
        for (sample, value) in &samples {
            let listed = expected.iter().any(|(s, _)| s == sample);
            let bucket = sample.contains("_bucket{");
            assert!(listed || bucket || *value == 0.0, "{sample} {value}");
        }

        // The families rendered, with their types and label names, as the docs list them.
        let mut rendered = BTreeMap::new();
        for line in text.lines() {
            if let Some(family) = line.strip_prefix("# TYPE ") {
                let (name, kind) = family.split_once(' ').expect("# TYPE name type");
                let previous = rendered.insert(name.to_owned(), (kind.to_owned(), Vec::new()));
                assert!(previous.is_none(), "{name} declared twice");
            } else if line.starts_with('#') {
                continue;
            } else if let Some((sample, labels)) = line.split_once('{') {
                let family = sample
                    .strip_suffix("_bucket")
                    .filter(|f| rendered.contains_key(*f))
                    .unwrap_or(sample);
                let (_, names) = rendered.get_mut(family).expect("a declared family");
                for label in labels.split(',') {
                    let label = label.split('=').next().unwrap_or("").to_owned();
                    if !names.contains(&label) {
                        names.push(label);
                    }
                }
            }
        }
        for name in rendered.keys() {
            let help = format!("# HELP {name} ");
            assert_eq!(text.matches(&help).count(), 1, "{name}: one HELP line");
        }
        assert_eq!(rendered, documented_families());
    }

    /// What a daemon that has seen nothing renders, byte for byte: every name, HELP line,
    /// type, series and bucket bound that operators, dashboards and alerts read. The file
    /// changes only with them (`OCM_BLESS=1` writes it again, for a change that is meant).
    #[test]
    fn a_fresh_render_is_the_text_operators_were_told_of() {
        let mut m = Metrics::new();
        m.start_time = 0.0;
        let text = m.render(Stats::default());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/metrics_fresh.prom");
        if std::env::var_os("OCM_BLESS").is_some() {
            std::fs::write(path, &text).expect("write the expected render");
        }
        let expected = std::fs::read_to_string(path).expect("tests/data/metrics_fresh.prom");
        for (n, (got, want)) in text.lines().zip(expected.lines()).enumerate() {
            assert_eq!(
                got,
                want,
                "line {}: a changed metric: docs/OPERATIONS.md and dashboards may need it too",
                n + 1
            );
        }
        assert_eq!(text, expected);
    }
}
