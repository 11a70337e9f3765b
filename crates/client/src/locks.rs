//! Poison-tolerant locking, shared by every thread of the client.
//!
//! A thread that panics while it holds one of the client's locks leaves nothing half-done
//! that matters: what they guard (the screen, the queues of lines, a timestamp, a flag) is
//! whole between statements. So a poisoned lock is used as it is, rather than passing the
//! panic on to the main loop, which must still leave the room and give the terminal back.
//! A thread that is stopped for good while it holds one (in a signal handler that waits for
//! the process to end) is another matter: [`lock_within`] is for those that must not wait on it.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;
use std::time::Duration;

/// Locks `mutex`, poisoned or not.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `changed` with `guard`'s lock, poisoned or not.
pub(crate) fn wait<'a, T>(changed: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `changed` with `guard`'s lock for at most `within`, poisoned or not. Callers
/// look at the guarded value and the clock again, so whether it timed out is not returned.
pub(crate) fn wait_timeout<'a, T>(
    changed: &Condvar,
    guard: MutexGuard<'a, T>,
    within: Duration,
) -> MutexGuard<'a, T> {
    changed
        .wait_timeout(guard, within)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// Locks `mutex`, poisoned or not, unless that takes longer than `within` (`None` then):
/// for a thread that must not wait for good on one another thread may hold for good (a
/// thread stopped in a signal handler while it held it). Tries again every `retry`; the
/// wait is counted in tries, so that time the process spent stopped meanwhile does not
/// count (a stop longer than the wait would otherwise end it at the next try, whatever the
/// other thread was about to do).
pub(crate) fn lock_within<T>(
    mutex: &Mutex<T>,
    within: Duration,
    retry: Duration,
) -> Option<MutexGuard<'_, T>> {
    let tries = within.as_nanos() / retry.as_nanos().max(1);
    let mut tried = 0;
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) if tried >= tries => return None,
            Err(TryLockError::WouldBlock) => {
                tried += 1;
                thread::sleep(retry);
            }
        }
    }
}
