//! The hand-off of records to the writer: new records as they come, the periodic history
//! checkpoint, the replies released once the batches they waited for are durable, and
//! backups on request.

use std::time::{Duration, Instant};

use log::info;

use super::{Server, HISTORY_CHECKPOINT_BYTES, SOURCES_PER_CHECKPOINT};

impl Server {
    /// A periodic checkpoint of the rooms' new history and members' moved sources, unless
    /// the last one is not durable yet (a slow or stuck disk): then the rooms keep their
    /// unsaved messages for the next, so a stall holds one checkpoint's records in memory,
    /// not one per interval.
    pub(super) fn checkpoint(&mut self) {
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        if persister.durable() < self.checkpoint_batch {
            self.metrics.checkpoints_deferred += 1;
            return;
        }
        self.registry
            .checkpoint_history_within(HISTORY_CHECKPOINT_BYTES);
        self.registry.save_sources_within(SOURCES_PER_CHECKPOINT);
        if self.registry.has_records() {
            self.checkpoint_batch = persister.submit(self.registry.take_records());
        }
    }

    /// Hands new records to the writer (those not tied to a reply: registers, leaves).
    pub(super) fn persist(&mut self) {
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        if self.registry.has_records() {
            persister.submit(self.registry.take_records());
        }
        persister.pump();
    }

    /// SIGUSR1: a backup of the state as it is now ([`Persister::backup`](crate::persist::Persister::backup)),
    /// with the rooms' history as a checkpoint now would save it (unless the last checkpoint
    /// still waits for the disk). Written off the loop; the compactor logs the result.
    pub(super) fn back_up(&mut self) {
        self.checkpoint();
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        if self.registry.has_records() {
            persister.submit(self.registry.take_records());
        }
        info!("SIGUSR1: writing a backup of the state");
        persister.backup();
        // A writer that is gone wakes nobody: its failure counts at once.
        self.metrics.state_compactions(persister.compactions());
    }

    /// The writer finished batches: release the replies that waited for them.
    pub(super) fn collect_durable(&mut self) {
        let Some(persister) = self.persister.as_mut() else {
            return;
        };
        let done = persister.poll_done();
        // The compactor wakes the loop too, with no batch done: its counters still count.
        self.metrics.state_compactions(persister.compactions());
        if done.is_empty() {
            return;
        }
        for d in &done {
            self.metrics.state_write(d.records, d.elapsed);
        }
        let durable = persister.durable();
        let now = Instant::now();
        let timeout = Duration::from_secs(self.config.limits.handshake_timeout_secs);
        let mut still = Vec::new();
        for id in std::mem::take(&mut self.holding) {
            // Gone, or a connection in a reused slot that is not listed.
            let Some(conn) = self.conns.get_mut(id.0).filter(|c| c.listed_holding) else {
                continue;
            };
            conn.listed_holding = false;
            // The timer restarts when a reply leaves, as after a reply not held: a wait for
            // the disk longer than the timeout does not close the connection the moment its
            // reply is out.
            if conn.release(durable, now, &mut self.metrics.durable_wait) {
                conn.restart_timer(now + timeout, &mut self.activity);
            }
            self.after_io(id, None);
            // Answering more (a paused connection resumed) may have listed it again.
            if let Some(conn) = self.conns.get_mut(id.0) {
                if conn.has_held() && !conn.listed_holding {
                    conn.listed_holding = true;
                    still.push(id);
                }
            }
        }
        self.holding.extend(still);
        // A slot reused while its old connection was listed can list the new one twice.
        self.holding.sort_unstable_by_key(|id| id.0);
        self.holding.dedup();
    }
}
