//! Loads arbitrary bytes as a state file and a journal, then rebuilds and drives a registry.
//!
//! Input layout: the state file's bytes, then (optionally) a NUL byte and the journal's bytes
//! (JSON never holds a raw NUL). Without a NUL, the whole input is tried as both.
//!
//! Checks (besides "never panics"):
//! - `parse_state`: a state that loads is written by `State::to_file_bytes` into bytes that
//!   load again to the same state (what we save, we can load);
//! - `Registry::from_state` + `stats()`: no more rooms than the file has, no more registered
//!   members than members;
//! - `parse_journal`: every record applies to the state (`State::apply`) without panicking,
//!   and the result still saves and loads;
//! - the registry rebuilt from the journaled state answers `list_rooms`, `presence`,
//!   `history_page`, and a `__REGISTER__`, chat and `__LEAVE__` datagram for each of its
//!   tokens, then `checkpoint_history` and `poll_expired`, without panicking.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use ocm_server::outbox::Outbox;
use ocm_server::rooms::{Limits, Registry};
use ocm_server::store::{self, State};
use rand::SeedableRng;

/// Tokens driven through the registry per input, to keep each run fast.
const MAX_DRIVEN_TOKENS: usize = 32;

fn registry(state: &State, now: Instant) -> Registry {
    Registry::from_state(
        state,
        Limits::default(),
        Box::new(rand::rngs::StdRng::seed_from_u64(0)),
        now,
    )
}

/// Floats go through JSON text, which the default serde_json parser reads to within a few
/// ULPs; compare the rest exactly.
fn same_state(a: &State, b: &State) -> bool {
    let close = |x: f64, y: f64| x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-12;
    let times_close = a.rooms.len() == b.rooms.len()
        && a.rooms.values().zip(b.rooms.values()).all(|(x, y)| {
            close(x.created_at, y.created_at)
                && x.history.len() == y.history.len()
                && x.history
                    .iter()
                    .zip(&y.history)
                    .all(|(m, n)| close(m.at, n.at))
        });
    let strip = |s: &State| {
        let mut s = s.clone();
        for room in s.rooms.values_mut() {
            room.created_at = 0.0;
            room.history.iter_mut().for_each(|m| m.at = 0.0);
        }
        s
    };
    times_close && strip(a) == strip(b)
}

/// Saving must give bytes that load back to the same state.
fn check_save_load(state: &State) {
    let mut saved = state.clone();
    let bytes = saved
        .to_file_bytes(SystemTime::UNIX_EPOCH)
        .expect("a loaded state serializes");
    let loaded = store::parse_state(&bytes).unwrap_or_else(|e| {
        panic!(
            "a saved state does not load: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert!(
        same_state(&loaded, &saved),
        "state changed through save/load"
    );
}

fn drive(state: &State, now: Instant) {
    let mut reg = registry(state, now);
    let stats = reg.stats();
    assert!(stats.rooms <= state.rooms.len());
    assert!(stats.registered <= stats.members);
    let _ = reg.list_rooms(usize::MAX);
    for name in state.rooms.keys() {
        let _ = reg.presence(name);
    }
    for (token, entry) in state.tokens.iter().take(MAX_DRIVEN_TOKENS) {
        let _ = reg.history_page(&entry.room_name, token.as_bytes(), None, 10);
        let _ = reg.history_page(&entry.room_name, token.as_bytes(), Some(2), usize::MAX);
    }
    let mut out = Outbox::default();
    let src = SocketAddr::from(([127, 0, 0, 1], 40000));
    for (token, entry) in state.tokens.iter().take(MAX_DRIVEN_TOKENS) {
        for message in ["__REGISTER__", "hi", "__LEAVE__"] {
            let mut d = Vec::new();
            if ucrp::datagram::encode(
                entry.room_name.as_bytes(),
                token.as_bytes(),
                message,
                &mut d,
            )
            .is_ok()
            {
                let _ = reg.handle_datagram(src, None, &d, now, &mut out);
            }
        }
        for send in out.sends() {
            let _ = out.bytes_of(&send);
        }
        out.clear();
    }
    let _ = reg.checkpoint_history();
    let _ = reg.poll_expired(now + Duration::from_secs(1 << 20), &mut out);
    let after = reg.stats();
    assert!(after.registered <= after.members);
    let _ = reg.take_records();
}

fuzz_target!(|data: &[u8]| {
    let (state_bytes, journal_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let now = Instant::now();
    let mut state = match store::parse_state(state_bytes) {
        Ok(state) => {
            check_save_load(&state);
            let reg = registry(&state, now);
            let stats = reg.stats();
            assert!(stats.rooms <= state.rooms.len());
            assert!(stats.registered <= stats.members);
            state
        }
        Err(_) => State::default(),
    };
    if let Ok(replay) = store::parse_journal(journal_bytes) {
        for entry in &replay.records {
            state.apply(&entry.record);
        }
        if !replay.records.is_empty() {
            check_save_load(&state);
        }
    }
    drive(&state, now);
});
