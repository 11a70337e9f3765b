//! Whether to believe a datagram saying that the room closed or that we timed out.
//!
//! Nothing in such a datagram shows that it came from the server: anyone who can forge the
//! server's address can send one (docs/SECURITY.md). Before believing it, `ocm` asks the
//! server over TCP for a page of the room's history with its token ([`check`]), which only
//! a member may read. [`Policy`] decides when to ask, so that a flood of forged notices
//! costs the server at most one request per [`COOL_DOWN`], and a request refused for the
//! server's rate limit is asked again instead of taken as an answer. The chat loop runs each
//! check on a thread of its own and goes on meanwhile (keepalives, signals), but holds the
//! chat's lines while a notice is being confirmed ([`Policy::confirming`]), for at most the
//! chat's `HOLD_LIMIT`: a server that accepts the connection but never answers holds up no
//! more than that.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use tcrp::ErrorCode;

use crate::error::ClientError;
use crate::handshake::Token;
use crate::query;

/// After a notice turned out forged, later notices wait this long for the next check, and
/// are answered by that one check together.
pub const COOL_DOWN: Duration = Duration::from_secs(2);
/// How long to wait before asking again when the server refused for its rate limit.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long to keep asking while the server refuses for its rate limit; the notice is then
/// believed.
pub const BUSY_FOR: Duration = Duration::from_secs(30);

/// What the server says of a notice that ended our membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The room is gone, or we are no longer in it.
    Confirmed,
    /// We are still a member: the notice did not come from the server.
    Forged,
    /// The server refused for its rate limit: ask again later.
    Busy,
    /// No answer that tells (the server unreachable, or a refusal of another kind).
    Unknown,
}

/// Asks the server over TCP whether our token still opens the room's history. The TCP
/// handshake shows that the answer comes from the server.
pub fn check(tcp: SocketAddr, room_name: &str, token: &Token) -> Verdict {
    let verdict = verdict_of(&ask(tcp, room_name, token));
    if verdict == Verdict::Unknown {
        debug!("cannot check the closure");
    }
    verdict
}

/// Asks the server over TCP for one message of the room's history with our token: `Ok` while
/// we are a member. [`verdict_of`] reads the answer.
pub fn ask(tcp: SocketAddr, room_name: &str, token: &Token) -> Result<(), ClientError> {
    query::history_at(tcp, room_name, token, None, 1).map(drop)
}

/// What an answer of [`ask`] says of our membership.
pub fn verdict_of(answer: &Result<(), ClientError>) -> Verdict {
    match answer {
        Ok(()) => Verdict::Forged,
        Err(e) if is_gone(e) => Verdict::Confirmed,
        Err(ClientError::QueryRefused {
            code: Some(ErrorCode::RateLimited),
            ..
        }) => Verdict::Busy,
        Err(e) => {
            debug!("no telling answer from the server: {e}");
            Verdict::Unknown
        }
    }
}

/// Whether `error` is the server's word that our membership is over: the room is gone
/// (`room_not_found`) or we are no longer in it (`not_member`).
pub fn is_gone(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::QueryRefused {
            code: Some(ErrorCode::RoomNotFound | ErrorCode::NotMember),
            ..
        }
    )
}

/// What to do next about a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask the server now ([`check`]), then tell [`Policy::verdict`].
    Check,
    /// Keep holding what came since the notice: the check in flight settles it.
    Wait,
    /// Stay in the room, showing chat again; say that a notice was forged when `forged`.
    Stay {
        /// The server has just said so of the last notice, whose lines are then dropped.
        /// Otherwise they are kept for a check to come.
        forged: bool,
    },
    /// Believe the notice: the session ends. Unless the server `confirmed` it, we say
    /// `__LEAVE__` first: the room may still hold us.
    Close {
        /// The server said the room is gone or we are no longer in it.
        confirmed: bool,
    },
}

/// When to ask the server about closure notices (see the module docs).
#[derive(Debug)]
pub struct Policy {
    /// Ask at all (not with `--original`: the original server cannot answer).
    enabled: bool,
    /// When a notice last turned out forged.
    last_forged: Option<Instant>,
    /// A check to make then, for notices that came meanwhile.
    recheck_at: Option<Instant>,
    /// While the server refuses for its rate limit: when to stop asking and believe.
    busy_until: Option<Instant>,
    /// A check is in flight: its verdict is awaited.
    checking: bool,
    /// A notice came while checking, after the check had started: a forged verdict does
    /// not answer for it.
    noticed_while_checking: bool,
}

impl Policy {
    /// A policy that asks when `enabled`, and otherwise believes every notice.
    pub fn new(enabled: bool) -> Policy {
        Policy {
            enabled,
            last_forged: None,
            recheck_at: None,
            busy_until: None,
            checking: false,
            noticed_while_checking: false,
        }
    }

    /// A notice arrived.
    pub fn notice(&mut self, now: Instant) -> Action {
        if !self.enabled {
            return Action::Close { confirmed: false };
        }
        if self.checking {
            self.noticed_while_checking = true;
            return Action::Wait;
        }
        if let Some(at) = self.recheck_at {
            if now < at {
                return Action::Stay { forged: false };
            }
            // Overdue: this notice is the recheck.
            return self.start_check();
        }
        match self.last_forged {
            Some(at) if now < at + COOL_DOWN => {
                self.recheck_at = Some(at + COOL_DOWN);
                Action::Stay { forged: false }
            }
            _ => self.start_check(),
        }
    }

    /// A check starts: nothing more is planned until its verdict.
    fn start_check(&mut self) -> Action {
        self.recheck_at = None;
        self.checking = true;
        self.noticed_while_checking = false;
        Action::Check
    }

    /// The server's answer to a [`Action::Check`].
    pub fn verdict(&mut self, now: Instant, verdict: Verdict) -> Action {
        self.checking = false;
        let noticed_meanwhile = std::mem::take(&mut self.noticed_while_checking);
        match verdict {
            Verdict::Forged => {
                self.last_forged = Some(now);
                // A notice that came while the server was being asked may have been sent
                // after it answered: it waits for the next check, like any within the
                // cool-down, and the screen keeps its lines for that check (this answer is
                // not about it).
                self.recheck_at = noticed_meanwhile.then_some(now + COOL_DOWN);
                self.busy_until = None;
                Action::Stay {
                    forged: !noticed_meanwhile,
                }
            }
            Verdict::Busy => {
                let until = *self.busy_until.get_or_insert(now + BUSY_FOR);
                if now >= until {
                    return Action::Close { confirmed: false };
                }
                self.recheck_at = Some(now + RETRY_AFTER);
                Action::Stay { forged: false }
            }
            Verdict::Confirmed => Action::Close { confirmed: true },
            Verdict::Unknown => Action::Close { confirmed: false },
        }
    }

    /// Whether a notice is being confirmed: a check is in flight, or the server refused one
    /// for its rate limit and is asked again. Not while a notice waits out the
    /// [`COOL_DOWN`] after one found forged: a flood of forged notices would then hold the
    /// chat for good.
    pub fn confirming(&self) -> bool {
        self.checking || self.busy_until.is_some()
    }

    /// When the next check is due, if one is.
    pub fn recheck_at(&self) -> Option<Instant> {
        self.recheck_at
    }

    /// At `now`: [`Action::Check`] if a check is due (it is then no longer pending).
    pub fn due(&mut self, now: Instant) -> Option<Action> {
        let at = self.recheck_at?;
        if now < at {
            return None;
        }
        Some(self.start_check())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy whose first notice, at the returned instant, was checked and found forged.
    fn after_a_forged_notice() -> (Policy, Instant) {
        let mut policy = Policy::new(true);
        let start = Instant::now();
        assert_eq!(policy.notice(start), Action::Check);
        assert_eq!(
            policy.verdict(start, Verdict::Forged),
            Action::Stay { forged: true }
        );
        (policy, start)
    }

    #[test]
    fn without_checks_every_notice_is_believed() {
        let mut policy = Policy::new(false);
        assert_eq!(
            policy.notice(Instant::now()),
            Action::Close { confirmed: false }
        );
    }

    #[test]
    fn a_flood_of_forged_notices_costs_one_check_per_cool_down() {
        let (mut policy, start) = after_a_forged_notice();
        // Two hundred more notices within the cool-down: no check, one recheck planned.
        for i in 1..=200 {
            let now = start + COOL_DOWN * i / 201;
            assert_eq!(policy.notice(now), Action::Stay { forged: false });
        }
        assert_eq!(policy.recheck_at(), Some(start + COOL_DOWN));
        assert_eq!(policy.due(start + COOL_DOWN / 2), None);
        assert_eq!(policy.due(start + COOL_DOWN), Some(Action::Check));
        assert_eq!(policy.recheck_at(), None);
        // That check finds the room really closed: believed.
        assert_eq!(
            policy.verdict(start + COOL_DOWN, Verdict::Confirmed),
            Action::Close { confirmed: true }
        );
    }

    #[test]
    fn a_notice_once_the_planned_check_is_due_is_that_check() {
        let (mut policy, start) = after_a_forged_notice();
        assert_eq!(policy.notice(start), Action::Stay { forged: false });
        assert_eq!(policy.notice(start + COOL_DOWN), Action::Check);
        assert_eq!(policy.recheck_at(), None);
    }

    #[test]
    fn after_the_cool_down_a_notice_is_checked_at_once() {
        let (mut policy, start) = after_a_forged_notice();
        assert_eq!(policy.notice(start + COOL_DOWN), Action::Check);
    }

    #[test]
    fn a_busy_server_is_asked_again_until_it_answers_or_for_long() {
        let mut policy = Policy::new(true);
        let start = Instant::now();
        assert_eq!(policy.notice(start), Action::Check);
        assert_eq!(
            policy.verdict(start, Verdict::Busy),
            Action::Stay { forged: false }
        );
        assert_eq!(policy.recheck_at(), Some(start + RETRY_AFTER));
        // Notices meanwhile wait for that check.
        assert_eq!(policy.notice(start), Action::Stay { forged: false });
        let mut now = start;
        while now < start + BUSY_FOR {
            now += RETRY_AFTER;
            assert_eq!(policy.due(now), Some(Action::Check));
            if now < start + BUSY_FOR {
                assert_eq!(
                    policy.verdict(now, Verdict::Busy),
                    Action::Stay { forged: false }
                );
            }
        }
        // Busy for BUSY_FOR: believed.
        assert_eq!(
            policy.verdict(now, Verdict::Busy),
            Action::Close { confirmed: false }
        );
        // An answer in time settles it, and a later busy spell starts its own count.
        let mut policy = Policy::new(true);
        policy.notice(start);
        policy.verdict(start, Verdict::Busy);
        assert_eq!(
            policy.verdict(start + RETRY_AFTER, Verdict::Forged),
            Action::Stay { forged: true }
        );
        let later = start + BUSY_FOR * 2;
        assert_eq!(policy.notice(later), Action::Check);
        assert_eq!(
            policy.verdict(later, Verdict::Busy),
            Action::Stay { forged: false }
        );
    }

    #[test]
    fn a_notice_while_a_check_is_in_flight_waits_for_it_then_for_a_recheck() {
        let mut policy = Policy::new(true);
        let start = Instant::now();
        assert_eq!(policy.notice(start), Action::Check);
        // The check is on its way: nothing else starts, nothing is planned.
        assert_eq!(policy.notice(start), Action::Wait);
        assert_eq!(policy.due(start + BUSY_FOR), None);
        assert_eq!(policy.recheck_at(), None);
        // Forged: but the second notice may postdate the server's answer, so it gets a
        // check of its own after the cool-down, and is not called forged meanwhile.
        let answered = start + RETRY_AFTER;
        assert_eq!(
            policy.verdict(answered, Verdict::Forged),
            Action::Stay { forged: false }
        );
        assert_eq!(policy.recheck_at(), Some(answered + COOL_DOWN));
        assert_eq!(policy.due(answered + COOL_DOWN), Some(Action::Check));
        assert_eq!(policy.notice(answered + COOL_DOWN), Action::Wait);
        assert_eq!(
            policy.verdict(answered + COOL_DOWN, Verdict::Confirmed),
            Action::Close { confirmed: true }
        );
    }

    #[test]
    fn a_forged_verdict_alone_plans_no_recheck() {
        let (mut policy, start) = after_a_forged_notice();
        assert_eq!(policy.recheck_at(), None);
        assert_eq!(policy.due(start + BUSY_FOR), None);
    }

    /// Lines are held while a check is in flight or a busy server is asked again, not while
    /// a notice waits out the cool-down after a forged one.
    #[test]
    fn a_notice_is_being_confirmed_only_while_the_server_is_asked() {
        let mut policy = Policy::new(true);
        let start = Instant::now();
        assert!(!policy.confirming());
        assert_eq!(policy.notice(start), Action::Check);
        assert!(policy.confirming(), "a check in flight");
        policy.verdict(start, Verdict::Busy);
        assert!(policy.confirming(), "asked again after a busy answer");
        assert_eq!(policy.due(start + RETRY_AFTER), Some(Action::Check));
        policy.verdict(start + RETRY_AFTER, Verdict::Forged);
        assert!(!policy.confirming(), "found forged");
        assert_eq!(
            policy.notice(start + RETRY_AFTER),
            Action::Stay { forged: false }
        );
        assert!(!policy.confirming(), "waiting out the cool-down");
    }

    #[test]
    fn no_telling_answer_believes_the_notice() {
        let mut policy = Policy::new(true);
        let now = Instant::now();
        assert_eq!(policy.notice(now), Action::Check);
        assert_eq!(
            policy.verdict(now, Verdict::Unknown),
            Action::Close { confirmed: false }
        );
    }

    /// The figures docs/CLIENT.md and docs/SECURITY.md give: a flood of forged notices costs one
    /// check per 2 s, and a `rate_limited` answer is asked again every second for up to 30 s.
    /// The tests above use the constants, so they would move with them.
    #[test]
    fn the_checks_keep_the_documented_pace() {
        assert_eq!(COOL_DOWN, Duration::from_secs(2));
        assert_eq!(RETRY_AFTER, Duration::from_secs(1));
        assert_eq!(BUSY_FOR, Duration::from_secs(30));
    }
}
