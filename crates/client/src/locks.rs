//! Poison-tolerant locking, shared by every thread of the client.
//!
//! A thread that panics while it holds one of the client's locks leaves nothing half-done
//! that matters: what they guard (the screen, the queues of lines, a timestamp, a flag) is
//! whole between statements. So a poisoned lock is used as it is, rather than passing the
//! panic on to the main loop, which must still leave the room and give the terminal back.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
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
