//! The daemon's lifecycle inside the loop: signals, configuration reload (SIGHUP), backups
//! (SIGUSR1) and the orderly shutdown (SIGTERM, SIGINT).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

use super::setup::{fit_open_files, segmentation, set_listen_backlog, set_user_timeout};
use super::{ConnId, Server};
use crate::config::{self, Config};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::persist::Stopped;
use crate::plural::Count;
use crate::sockopt;

impl Server {
    /// Returns true when the daemon should stop.
    pub(super) fn handle_signals(&mut self) -> bool {
        let pending: Vec<i32> = self.signals.pending().collect();
        let mut stop = false;
        for signal in pending {
            match signal {
                SIGHUP => self.reload(),
                SIGUSR1 => self.back_up(),
                SIGTERM | SIGINT => stop = true,
                _ => {}
            }
        }
        stop
    }

    /// Reloads the configuration file on SIGHUP, telling systemd (`RELOADING=1`, then
    /// `READY=1`) whether or not the file could be used; a file that cannot keeps the running
    /// configuration.
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            info!("SIGHUP: no --config file; nothing to reload");
            Metrics::bump(&mut self.metrics.reloads, "no_file");
            return;
        };
        self.notifier
            .send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        match self.read_config(&path) {
            Ok((file, new)) => self.apply_config(&path, file, new),
            Err(e) => {
                error!("SIGHUP: {e}; keeping the running configuration");
                Metrics::bump(&mut self.metrics.reloads, "error");
            }
        }
        self.notifier.send("READY=1");
    }

    /// The configuration file at `path` as read, and with the command-line flags applied.
    fn read_config(&self, path: &Path) -> Result<(Config, Config), Error> {
        // The file with the flags applied is checked whole (the listeners too, though they
        // change only at a restart: the next start would fail on a clash).
        Config::from_file(path).and_then(|file| {
            let new = file
                .with_overrides(&self.overrides)
                .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
            Ok((file, new))
        })
    }

    /// Runs with `new` (the file read from `path`, `file`, with the flags applied), except
    /// for the settings fixed at start, and says what changed.
    fn apply_config(&mut self, path: &Path, file: Config, mut new: Config) {
        self.warn_of_fixed_settings(path, &file, &new);
        self.file_config = file;
        new.listen = self.config.listen.clone();
        new.state = self.config.state.clone();
        new.udp.recv_buffer_bytes = self.config.udp.recv_buffer_bytes;
        new.udp.send_buffer_bytes = self.config.udp.send_buffer_bytes;
        self.registry.set_limits(new.registry_limits());
        self.registry.set_lookalike_checks(
            new.names.refuse_lookalike_usernames,
            new.names.refuse_lookalike_room_names,
        );
        self.sender.set_max_batch(new.udp.max_batch_datagram_bytes);
        self.sender
            .set_segmentation(segmentation(&new, self.udp.as_raw_fd()));
        self.shorten_timers(&new);
        self.apply_log_level(path, &new);
        if new.limits.max_connections != self.config.limits.max_connections {
            self.connection_cap = fit_open_files(&new);
        }
        if let Some(tcp) = &self.tcp {
            // The kernel caps a backlog at `net.core.somaxconn` as it was at listen(2): one
            // capped then is asked for again, so that a raised sysctl takes effect at this
            // reload, not only at the next restart.
            let capped = sockopt::accept_queue(tcp.as_raw_fd())
                .is_ok_and(|queue| queue.backlog < new.limits.listen_backlog);
            if capped || new.limits.listen_backlog != self.config.limits.listen_backlog {
                if let Err(e) = set_listen_backlog(tcp, new.limits.listen_backlog) {
                    warn!("SIGHUP: cannot set the TCP listen backlog: {e}; keeping the old one");
                    new.limits.listen_backlog = self.config.limits.listen_backlog;
                }
            }
        }
        // For connections accepted from now on: the open ones keep theirs.
        if new.limits.handshake_timeout_secs != self.config.limits.handshake_timeout_secs {
            if let Some(tcp) = &self.tcp {
                set_user_timeout(tcp, "TCP", &new);
            }
            if let Some(metrics) = &self.metrics_listener {
                set_user_timeout(metrics, "metrics", &new);
            }
        }
        let changes = self.config.changes(&new);
        self.config = new;
        // What changed, so that a reload of the wrong file (the `.new` beside it) does
        // not read like the intended one.
        let changed = match changes {
            Some(changes) if changes.is_empty() => "no setting changed".to_owned(),
            Some(changes) => changes.join(", "),
            None => "the changes cannot be listed".to_owned(),
        };
        info!(
            "SIGHUP: configuration reloaded from {}: {changed}",
            path.display()
        );
        Metrics::bump(&mut self.metrics.reloads, "ok");
    }

    /// Warns of the settings fixed at start that `new` (the file read from `path`, `file`,
    /// with the flags applied) would change. Those a flag overrides run as the flag says: a
    /// file change is moot, and the log says so once. The others are compared with the
    /// running value, so every reload reminds of a restart still due, and a file put back to
    /// the running value says nothing.
    fn warn_of_fixed_settings(&self, path: &Path, file: &Config, new: &Config) {
        let old = &self.file_config;
        let running = &self.config;
        let o = &self.overrides;
        let systemd = o.from_systemd;
        // Each: the key, whether `new` differs from the running value, whether the file
        // changed it, and what overrides it (a flag, a socket from systemd).
        let fixed = [
            (
                "listen.tcp",
                new.listen.tcp != running.listen.tcp,
                file.listen.tcp != old.listen.tcp,
                config::overrider(o.tcp.is_some(), systemd.tcp),
            ),
            (
                "listen.udp",
                new.listen.udp != running.listen.udp,
                file.listen.udp != old.listen.udp,
                config::overrider(o.udp.is_some(), systemd.udp),
            ),
            (
                "listen.metrics",
                // "off" and "none" are one setting, as are two spellings of an address.
                new.metrics_addr().ok() != running.metrics_addr().ok(),
                file.listen.metrics != old.listen.metrics,
                config::overrider(o.metrics.is_some(), systemd.metrics),
            ),
            (
                "state.path",
                new.state.path != running.state.path,
                file.state.path != old.state.path,
                config::overrider(o.state.is_some(), false),
            ),
            (
                "state.compact_journal_bytes",
                new.state.compact_journal_bytes != running.state.compact_journal_bytes,
                false,
                None,
            ),
            (
                "udp.recv_buffer_bytes",
                new.udp.recv_buffer_bytes != running.udp.recv_buffer_bytes,
                false,
                None,
            ),
            (
                "udp.send_buffer_bytes",
                new.udp.send_buffer_bytes != running.udp.send_buffer_bytes,
                false,
                None,
            ),
        ];
        for (key, not_running, file_changed, overridden) in fixed {
            if let Some(by) = overridden.filter(|_| file_changed) {
                warn!(
                    "SIGHUP: {key} changed in {}, but {by} overrides it",
                    path.display()
                );
            } else if overridden.is_none() && not_running {
                warn!(
                    "SIGHUP: {key} in {} differs from the running value; it takes \
                     effect only after a restart",
                    path.display()
                );
            }
        }
    }

    /// Brings the next sweep and checkpoint forward when `new` shortens their periods:
    /// shorter periods apply now, not after the sweep or checkpoint already due.
    fn shorten_timers(&mut self, new: &Config) {
        let now = Instant::now();
        let sweep = Duration::from_millis(new.liveness.sweep_interval_ms);
        self.next_sweep = self.next_sweep.min(now + sweep);
        let checkpoint = Duration::from_secs(new.history.checkpoint_secs);
        self.next_checkpoint = self.next_checkpoint.min(now + checkpoint);
    }

    /// Sets the log level `new` asks for, unless `RUST_LOG` sets it (then a changed
    /// `log.level` in the file at `path` is warned of).
    fn apply_log_level(&self, path: &Path, new: &Config) {
        if config::rust_log().is_none() {
            if let Some(level) = config::log_level(&new.log.level) {
                log::set_max_level(level);
            }
        } else if new.log.level != self.config.log.level {
            warn!(
                "SIGHUP: log.level changed in {}, but RUST_LOG overrides it",
                path.display()
            );
        }
    }

    /// Stops accepting, answers what can be answered, makes every change durable, and folds
    /// the journal into the state file; says how far it got with the state.
    pub(super) fn shutdown(&mut self) -> Stopped {
        if let Some(persister) = &self.persister {
            persister.skip_backups();
        }
        info!("stopping: flushing state");
        self.notifier.send("STOPPING=1");
        if let Some(mut tcp) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut tcp);
        }
        // Closed too, so that a health check is refused at once while the stop waits for the
        // disk (up to 11.5 s), rather than left unanswered in the backlog: a monitor or load
        // balancer then sees a daemon going away, not a wedged one.
        if let Some(mut metrics) = self.metrics_listener.take() {
            let _ = self.poll.registry().deregister(&mut metrics);
        }
        // Last words held for a full send buffer get a last try: they live in memory only.
        let now = Instant::now();
        self.sender.send_held(
            &self.udp,
            self.registry.locals_mut(),
            &mut self.metrics,
            now,
        );
        self.flush_outbox(now);
        self.registry.checkpoint_history();
        self.registry.save_sources();
        self.persist();
        let stopped = if let Some(mut persister) = self.persister.take() {
            // Let waiting joins get their tokens: wait (bounded) for the batches in flight.
            // A writer that is gone said so when it dropped the records.
            let waited = persister.wait_durable(Instant::now() + SHUTDOWN_WRITE_WAIT);
            if !waited && persister.busy() {
                warn!(
                    "stopping: state writes still in flight after {} ms; any join waiting \
                     for them gets no token (made durable later, its name stays taken)",
                    SHUTDOWN_WRITE_WAIT.as_millis()
                );
            }
            let durable = persister.durable();
            let ids: Vec<ConnId> = self.conns.iter().map(|(k, _)| ConnId(k)).collect();
            for id in ids {
                if let Some(conn) = self.conns.get_mut(id.0) {
                    // Counted like any release, though no scrape follows the exit.
                    let _ = conn.release(durable, Instant::now(), &mut self.metrics.durable_wait);
                    let _ = conn.flush();
                }
            }
            persister.shutdown()
        } else {
            Stopped::Folded
        };
        let s = self.registry.stats();
        let (rooms, members) = (Count(s.rooms, "room"), Count(s.members, "member"));
        match stopped {
            Stopped::Folded => info!("stopped: {rooms}, {members} saved"),
            Stopped::Unfolded => warn!(
                "stopped: {rooms}, {members} saved in the journal, not folded into the state \
                 file (the next start folds them)"
            ),
            Stopped::Lost => error!(
                "stopped: {rooms}, {members}, not saved: the state's files were deleted while \
                 in use and could not be written again, so the next start has only what is \
                 left on disk (nothing, if their directory is gone)"
            ),
            Stopped::Unwritten => error!(
                "stopped: {rooms}, {members}; the changes still waiting for the disk are not \
                 durable"
            ),
        }
        stopped
    }
}

/// How long a clean stop waits for the state writes in flight, so that the joins waiting
/// for them get their tokens.
const SHUTDOWN_WRITE_WAIT: Duration = Duration::from_millis(1500);

fn monotonic_usec() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u128) * 1_000_000 + (ts.tv_nsec as u128) / 1000
}

/// Reloads driven by hand on a server whose loop is not run.
#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    // Added with the mutation run of 2026-12-06 (docs/SECURITY.md, "The daemon: the loop's
    // datagrams and lifecycle").

    /// A server on loopback ports of its own that reads its configuration from a file in
    /// `dir` (written with `text` first), its state in `dir`, without a metrics listener; its
    /// loop is not run. Returns it and the file.
    fn server_reading(dir: &Path, text: &str) -> (Server, PathBuf) {
        let path = dir.join("ocmd.toml");
        std::fs::write(&path, text).expect("write the configuration file");
        let file = Config::from_file(&path).expect("a valid configuration file");
        let overrides = config::Overrides {
            tcp: Some("127.0.0.1:0".parse().expect("an address")),
            udp: Some("127.0.0.1:0".parse().expect("an address")),
            state: Some(dir.join("room_manager.json")),
            metrics: Some("off".into()),
            ..config::Overrides::default()
        };
        let server = Server::bind(file, Some(path.clone()), overrides).expect("a server");
        (server, path)
    }

    /// Rewrites the file at `path` with `text` and reloads it, as a SIGHUP would.
    fn reload_with(server: &mut Server, path: &Path, text: &str) {
        std::fs::write(path, text).expect("rewrite the configuration file");
        let before = server.metrics.reloads.get("ok").copied().unwrap_or(0);
        server.reload();
        assert_eq!(server.metrics.reloads.get("ok"), Some(&(before + 1)));
    }

    /// A reload that changes `limits.max_connections` caps the connection table at the new
    /// value at once, not at the next restart.
    #[test]
    fn a_reload_that_changes_max_connections_caps_the_table_at_the_new_value() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (mut server, path) = server_reading(dir.path(), "[limits]\nmax_connections = 100\n");
        assert_eq!(server.connection_cap, 100);
        reload_with(&mut server, &path, "[limits]\nmax_connections = 10\n");
        assert_eq!(server.connection_cap, 10);
        reload_with(&mut server, &path, "[limits]\nmax_connections = 10\n");
        assert_eq!(server.connection_cap, 10);
    }

    /// A reload that changes `limits.handshake_timeout_secs` sets the TCRP listener's
    /// `TCP_USER_TIMEOUT` (twice the timeout, which the connections accepted from then on
    /// inherit).
    #[test]
    fn a_reload_that_changes_the_handshake_timeout_sets_the_listeners_user_timeout() {
        let user_timeout = |server: &Server| {
            let tcp = server.tcp.as_ref().expect("the TCRP listener");
            sockopt::get_int(tcp.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)
                .expect("TCP_USER_TIMEOUT")
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (mut server, path) =
            server_reading(dir.path(), "[limits]\nhandshake_timeout_secs = 10\n");
        assert_eq!(user_timeout(&server), 20_000);
        reload_with(&mut server, &path, "[limits]\nhandshake_timeout_secs = 3\n");
        assert_eq!(user_timeout(&server), 6_000);
    }

    /// A reload brings the next liveness sweep and history checkpoint forward when it
    /// shortens their periods, to a period from the reload, and leaves them where they were
    /// when it does not.
    #[test]
    fn a_reload_brings_the_sweep_and_the_checkpoint_forward_only_when_it_shortens_them() {
        let long = "[liveness]\nsweep_interval_ms = 60000\n[history]\ncheckpoint_secs = 3600\n";
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (mut server, path) = server_reading(dir.path(), long);
        let due = (server.next_sweep, server.next_checkpoint);
        reload_with(&mut server, &path, long);
        assert_eq!((server.next_sweep, server.next_checkpoint), due);
        let before = Instant::now();
        reload_with(
            &mut server,
            &path,
            "[liveness]\nsweep_interval_ms = 1000\n[history]\ncheckpoint_secs = 2\n",
        );
        let after = Instant::now();
        let sweep = Duration::from_millis(1000);
        assert!(before + sweep <= server.next_sweep && server.next_sweep <= after + sweep);
        let checkpoint = Duration::from_secs(2);
        assert!(
            before + checkpoint <= server.next_checkpoint
                && server.next_checkpoint <= after + checkpoint
        );
    }
}
