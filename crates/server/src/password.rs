//! Room passwords: argon2id hashing and verification on a worker thread.
//!
//! A password hash takes tens of milliseconds on purpose, far too long for the event loop, so
//! the loop hands [`Job`]s to this thread and is woken (through its `mio::Waker`) when an
//! [`Outcome`] is ready. Only PHC-format hashes (`$argon2id$v=19$m=…`) are ever stored;
//! passwords are never stored, logged or kept after the job.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use log::error;

/// Work for the hashing thread.
pub enum Job {
    /// Hash a new room's password.
    Hash {
        /// The password.
        password: String,
    },
    /// Check a password against a room's stored hash.
    Verify {
        /// The password given.
        password: String,
        /// The stored PHC hash.
        hash: String,
    },
}

/// What the thread found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The PHC hash of a new password (or why hashing failed).
    Hashed(Result<String, String>),
    /// Whether the password matched `hash`, the stored hash it was checked against (the room
    /// may have been closed and re-created, with another password, while the check ran).
    Verified {
        /// The password matched.
        matched: bool,
        /// The hash of the [`Job::Verify`].
        hash: String,
    },
}

/// Hashes `password` with a fresh random salt.
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks `password` against a PHC hash; an unparsable hash never matches.
pub fn verify(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(e) => {
            error!("stored password hash is unreadable ({e}); refusing the password");
            false
        }
    }
}

/// Does one job (on the worker thread; inline in tests).
pub fn run(job: Job) -> Outcome {
    match job {
        Job::Hash { password } => Outcome::Hashed(hash(&password)),
        Job::Verify { password, hash } => Outcome::Verified {
            matched: verify(&password, &hash),
            hash,
        },
    }
}

/// The loop's handle on the hashing thread. Jobs carry a ticket the loop chooses.
pub struct Worker {
    tx: Sender<(u64, Job)>,
    rx: Receiver<(u64, Outcome)>,
}

impl Worker {
    /// Starts the thread; it wakes `waker` after each outcome.
    pub fn start(waker: Arc<mio::Waker>) -> std::io::Result<Worker> {
        let (tx, jobs) = mpsc::channel::<(u64, Job)>();
        let (results, rx) = mpsc::channel();
        thread::Builder::new()
            .name("ocmd-passwords".into())
            .spawn(move || {
                for (ticket, job) in jobs {
                    if results.send((ticket, run(job))).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Worker { tx, rx })
    }

    /// Queues a job.
    pub fn submit(&self, ticket: u64, job: Job) {
        if self.tx.send((ticket, job)).is_err() {
            error!("password thread is gone");
        }
    }

    /// Finished jobs.
    pub fn poll(&self) -> Vec<(u64, Outcome)> {
        self.rx.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains("s3cret"));
        assert!(verify("s3cret", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("s3cret", "not a hash"));
        assert_ne!(hash("s3cret").unwrap(), h, "salted");
    }
}
