//! The gate of a password-protected room: a right password, or a member's token where that
//! opens it, goes on; a wrong or missing one is refused; and every check is paid for up front
//! with one failure token from the source's allowance, given back when the password was right.

use std::net::IpAddr;
use std::time::Instant;

use tcrp::payload::{ErrorCode, Request};

use super::{Context, Refusal, RequestLimits};
use crate::password::{self, Outcome};
use crate::rate::{self, KeyedLimiter};

/// Decides whether a request may enter a password-protected room: `Ok(None)` to go on,
/// `Ok(Some(job))` to verify first, or a refusal. A member token of the room also opens it
/// when `token_opens` (presence from inside the room).
pub(super) fn check_password(
    ctx: &mut Context<'_>,
    room_name: &str,
    request: &Request,
    outcome: Option<&Outcome>,
    token_opens: bool,
) -> Result<Option<password::Job>, Refusal> {
    let (rate, burst) = (
        ctx.limits.password_failure_rate,
        ctx.limits.password_failure_burst,
    );
    // Every check is paid for up front: one failure token is taken from the source's bucket
    // BEFORE the password goes to the hashing thread (`submit_check`), and given back here
    // when the password turns out right. A source therefore has at most as many checks in
    // flight as it has tokens left, so parallel guesses on many connections cannot outrun
    // the allowance (charging on the result let every guess already queued through, since
    // the bucket still looked full while they waited). The cost: a right password briefly
    // holds a token while it is checked. (`handle_frame` gives it back.)
    let Some(hash) = ctx.registry.password_hash(room_name).map(str::to_owned) else {
        return Ok(None);
    };
    if token_opens {
        if let Some(token) = &request.token {
            if ctx.registry.is_member(room_name, token.as_bytes()) {
                return Ok(None);
            }
        }
    }
    let bad_password = || {
        (
            ErrorCode::BadPassword,
            format!("wrong or missing password for room {room_name:?}"),
        )
    };
    match (outcome, request.password.as_deref()) {
        // The room may have been closed and re-created with another password while the check
        // was queued: only a password checked against the CURRENT hash opens it (a new room
        // always has a fresh salt, hence a new hash). Otherwise it is checked again, and that
        // check is paid for like any other.
        (
            Some(Outcome::Verified {
                matched: true,
                hash: checked,
            }),
            _,
        ) if *checked == hash => Ok(None),
        (Some(Outcome::Verified { matched: true, .. }), Some(pw)) => submit_check(ctx, pw, hash),
        // A wrong password: the token taken when its check was submitted stays spent.
        (Some(_), _) => Err(bad_password()),
        // An empty password is a missing one: no room has it, so it is not worth a hash.
        (None, Some("")) | (None, None) => {
            // A missing password spends one failure from the source's allowance.
            ctx.password_failures
                .allow(rate::source(ctx.peer), ctx.now, rate, burst);
            Err(bad_password())
        }
        (None, Some(pw)) => submit_check(ctx, pw, hash),
    }
}

/// Gives back the failure token a password check took, when the password was right: called
/// with the check's outcome by `handle_frame`, or by the loop when the connection that asked
/// for the check closed before the outcome came.
pub fn give_back_check(
    failures: &mut KeyedLimiter<IpAddr>,
    peer: IpAddr,
    now: Instant,
    limits: &RequestLimits,
) {
    failures.give_back(
        rate::source(peer),
        now,
        limits.password_failure_rate,
        limits.password_failure_burst,
    );
}

/// Takes one failure token from the source (see [`check_password`]) and asks for `password`
/// to be verified against `hash`, or refuses with `rate_limited` if the source has none left.
fn submit_check(
    ctx: &mut Context<'_>,
    password: &str,
    hash: String,
) -> Result<Option<password::Job>, Refusal> {
    if !ctx.password_failures.allow(
        rate::source(ctx.peer),
        ctx.now,
        ctx.limits.password_failure_rate,
        ctx.limits.password_failure_burst,
    ) {
        return Err((
            ErrorCode::RateLimited,
            "too many wrong passwords; try again later".into(),
        ));
    }
    Ok(Some(password::Job::Verify {
        password: password.to_owned(),
        hash,
    }))
}
