//! Room passwords: argon2id hashing and verification on a worker thread.
//!
//! A password hash takes tens of milliseconds on purpose, far too long for the event loop, so
//! the loop hands [`Job`]s to this thread and is woken (through its `mio::Waker`) when an
//! [`Outcome`] is ready. Only PHC-format hashes (`$argon2id$v=19$m=…`) are ever stored;
//! passwords are never stored, logged or kept after the job.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
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

/// Hashes `password` with a fresh random 16-byte salt.
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    hash_with_salt(password, &salt)
}

/// Hashes `password` with `salt`, in PHC form with argon2's defaults.
fn hash_with_salt(password: &str, salt: &[u8]) -> Result<String, String> {
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// The most a stored hash may ask of a check: memory in KiB, passes and lanes. A check runs
/// with the hash's own parameters, and the state file is read from disk: a hand-edited
/// `m=` of gigabytes must not make the hashing thread try to allocate them. Hashes made here
/// use argon2's defaults (19 MiB, 2 passes, 1 lane), well within.
const MAX_M_COST_KIB: u32 = 256 * 1024;
/// See [`MAX_M_COST_KIB`].
const MAX_T_COST: u32 = 16;
/// See [`MAX_M_COST_KIB`].
const MAX_P_COST: u32 = 16;

/// Checks `password` against a PHC hash. An unparsable hash never matches, nor does one that
/// asks for more than `MAX_M_COST_KIB`, `MAX_T_COST` or `MAX_P_COST` (256 MiB, 16 passes, 16
/// lanes).
pub fn verify(password: &str, hash: &str) -> bool {
    let parsed = match PasswordHash::new(hash) {
        Ok(parsed) => parsed,
        Err(e) => {
            error!("stored password hash is unreadable ({e}); refusing the password");
            return false;
        }
    };
    if let Err(why) = affordable(&parsed) {
        error!("stored password hash {why}; refusing the password");
        return false;
    }
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Whether a check against `hash` stays within [`MAX_M_COST_KIB`], [`MAX_T_COST`] and
/// [`MAX_P_COST`]; if not, what it asks for.
fn affordable(hash: &PasswordHash) -> Result<(), String> {
    let p = argon2::Params::try_from(hash).map_err(|e| format!("has unusable parameters ({e})"))?;
    if p.m_cost() <= MAX_M_COST_KIB && p.t_cost() <= MAX_T_COST && p.p_cost() <= MAX_P_COST {
        return Ok(());
    }
    Err(format!(
        "asks for m={} KiB, t={}, p={}, more than a check may take (m={MAX_M_COST_KIB}, \
         t={MAX_T_COST}, p={MAX_P_COST})",
        p.m_cost(),
        p.t_cost(),
        p.p_cost()
    ))
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
    use std::time::{Duration, Instant};

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

    /// A hash stored by an `ocmd` built with argon2 0.5 (every release before 2026-12-04),
    /// made of this password and salt: it still verifies, and the same password and salt
    /// hash to the very same string, so state files carry over the upgrade both ways.
    const STORED_BY_ARGON2_0_5: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$BwECAwQFBgcICQoLDA0ODw$Kf6vR7gfPvgjjpJbVtTUwFM5S7GH+zmBw3vMGdAlJYM";
    const SALT_OF_THE_STORED_HASH: [u8; 16] =
        [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    #[test]
    fn a_hash_stored_by_the_argon2_0_5_build_verifies_and_is_made_the_same_way() {
        assert!(verify("open sesame", STORED_BY_ARGON2_0_5));
        assert!(!verify("open sesame!", STORED_BY_ARGON2_0_5));
        assert_eq!(
            hash_with_salt("open sesame", &SALT_OF_THE_STORED_HASH).unwrap(),
            STORED_BY_ARGON2_0_5
        );
    }

    #[test]
    fn a_stored_hash_asking_for_too_much_is_refused_without_running_it() {
        let h = hash("s3cret").unwrap();
        assert!(h.contains("$m=19456,t=2,p=1$"), "{h}");
        // 4 GiB of memory, 100,000 passes, 17 lanes: refused before any check runs.
        for (from, to) in [
            ("m=19456", "m=4194304"),
            ("t=2", "t=100000"),
            ("p=1", "p=17"),
        ] {
            let greedy = h.replacen(from, to, 1);
            let parsed = PasswordHash::new(&greedy).unwrap();
            let why = affordable(&parsed).unwrap_err();
            assert!(why.contains(to), "{why}");
            assert!(!verify("s3cret", &greedy), "{greedy}");
        }
        assert_eq!(affordable(&PasswordHash::new(&h).unwrap()), Ok(()));
        // Within the bounds, a stored hash's own parameters are used.
        let cheaper = Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8 * 1024, 1, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"s3cret", &[7; 16])
        .unwrap()
        .to_string();
        assert!(verify("s3cret", &cheaper));
        assert!(!verify("wrong", &cheaper));
    }

    /// The bounds are 256 MiB, 16 passes and 16 lanes: a stored hash at each is run, one a
    /// step past any is refused (checked without running either).
    #[test]
    fn a_stored_hash_may_ask_for_256_mib_16_passes_and_16_lanes_and_no_more() {
        let h = hash("s3cret").unwrap();
        for (from, at, past) in [
            ("m=19456", "m=262144", "m=262145"),
            ("t=2", "t=16", "t=17"),
            ("p=1", "p=16", "p=17"),
        ] {
            let at_bound = h.replacen(from, at, 1);
            assert_eq!(
                affordable(&PasswordHash::new(&at_bound).unwrap()),
                Ok(()),
                "{at}"
            );
            let over = h.replacen(from, past, 1);
            let why = affordable(&PasswordHash::new(&over).unwrap()).unwrap_err();
            assert!(why.contains(past), "{why}");
        }
    }

    #[test]
    fn the_worker_hands_back_each_outcome_with_its_ticket_and_wakes_the_loop() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let worker = Worker::start(waker).unwrap();
        // Hashes that do not parse: checked (and refused) without running argon2.
        worker.submit(
            7,
            Job::Verify {
                password: "pw".into(),
                hash: "not a hash".into(),
            },
        );
        worker.submit(
            9,
            Job::Verify {
                password: "pw".into(),
                hash: "nor this".into(),
            },
        );
        let mut events = mio::Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut outcomes = Vec::new();
        while outcomes.len() < 2 {
            assert!(Instant::now() < deadline, "timed out with {outcomes:?}");
            crate::test_shared::woken_or_interrupted(
                poll.poll(&mut events, Some(Duration::from_secs(1))),
            )
            .unwrap();
            // Outcomes are only looked for once the worker has woken the loop.
            if !events.is_empty() {
                outcomes.extend(worker.poll());
            }
        }
        let verified = |hash: &str| Outcome::Verified {
            matched: false,
            hash: hash.into(),
        };
        assert_eq!(
            outcomes,
            vec![(7, verified("not a hash")), (9, verified("nor this"))]
        );
    }
}
