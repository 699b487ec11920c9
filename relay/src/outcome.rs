//! How the standalone relay's hellos and sessions end, as types, and their counts since start
//! (for the metrics and the periodic log line; see [`crate::metrics`]).
//!
//! The reasons are fixed sets with fixed labels ([`HELLO_REFUSALS`], [`SESSION_ENDS`]), so
//! that nothing an agent sends can add a label, and each is counted once, where the server
//! decides it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ticket::Refused;

/// The labels of [`HelloRefusal::reason`], in counting order.
pub const HELLO_REFUSALS: [&str; 8] = [
    "protocol",
    "malformed",
    "bad_signature",
    "expired",
    "implausible",
    "no_proof_key",
    "bad_proof",
    "max_sessions_per_ip",
];

/// The labels of [`SessionEnd::reason`], in counting order.
pub const SESSION_ENDS: [&str; 7] = [
    "agent_closed",
    "connection_lost",
    "protocol_error",
    "stalled",
    "ticket_expired",
    "displaced",
    "shutdown",
];

/// Why a hello was refused: its text goes to the agent (`RelayAnswer::Refused`), its
/// [`reason`](HelloRefusal::reason) to the counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    /// The hello speaks a relay protocol this relay does not.
    #[error("relay protocol {0} is not spoken here")]
    Protocol(u32),
    /// The ticket, or the hello's proof of it.
    #[error(transparent)]
    Ticket(#[from] Refused),
    /// The source address already holds `max_sessions_per_ip` sessions.
    #[error("too many sessions from this address (max_sessions_per_ip)")]
    SessionsPerSource,
}

impl HelloRefusal {
    /// Its label, one of [`HELLO_REFUSALS`].
    pub fn reason(&self) -> &'static str {
        HELLO_REFUSALS[self.slot()]
    }

    fn slot(&self) -> usize {
        match self {
            HelloRefusal::Protocol(_) => 0,
            HelloRefusal::Ticket(Refused::Malformed) => 1,
            HelloRefusal::Ticket(Refused::BadSignature) => 2,
            HelloRefusal::Ticket(Refused::Expired { .. }) => 3,
            HelloRefusal::Ticket(Refused::Implausible { .. }) => 4,
            HelloRefusal::Ticket(Refused::NoProofKey) => 5,
            HelloRefusal::Ticket(Refused::BadProof) => 6,
            HelloRefusal::SessionsPerSource => 7,
        }
    }
}

/// Why a session (a connection whose hello was accepted) ended: logged with its detail,
/// counted by [`reason`](SessionEnd::reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionEnd {
    /// The agent closed its stream or connection.
    #[error("the agent closed")]
    AgentClosed,
    /// The connection failed (a QUIC error: timed out, reset).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The agent sent what a session may not (a message after the hello, a malformed or
    /// oversized record).
    #[error("{0}")]
    ProtocolError(&'static str),
    /// The agent did not read what it was sent (a TLS/TCP session's write timed out).
    #[error("the agent stopped reading")]
    Stalled,
    /// Its ticket expired (the agent opens a session with a fresh one before that, when it has
    /// one).
    #[error("the ticket expired")]
    TicketExpired,
    /// Two newer sessions of the node took over.
    #[error("newer sessions of the node took over")]
    Displaced,
    /// The relay is stopping.
    #[error("shutting down")]
    Shutdown,
}

impl SessionEnd {
    /// Its label, one of [`SESSION_ENDS`].
    pub fn reason(&self) -> &'static str {
        SESSION_ENDS[self.slot()]
    }

    fn slot(&self) -> usize {
        match self {
            SessionEnd::AgentClosed => 0,
            SessionEnd::ConnectionLost(_) => 1,
            SessionEnd::ProtocolError(_) => 2,
            SessionEnd::Stalled => 3,
            SessionEnd::TicketExpired => 4,
            SessionEnd::Displaced => 5,
            SessionEnd::Shutdown => 6,
        }
    }
}

/// The counts since start: hellos accepted and refused, sessions ended. Shared by every
/// session; rare events, so plain atomic adds.
#[derive(Debug, Default)]
pub struct Outcomes {
    accepted: AtomicU64,
    refused: [AtomicU64; HELLO_REFUSALS.len()],
    ended: [AtomicU64; SESSION_ENDS.len()],
}

impl Outcomes {
    /// Counts a hello accepted (its session opens).
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a hello refused.
    pub fn refused(&self, why: &HelloRefusal) {
        self.refused[why.slot()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session ended.
    pub fn ended(&self, why: &SessionEnd) {
        self.ended[why.slot()].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> OutcomeCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OutcomeCounts {
            accepted: get(&self.accepted),
            refused: std::array::from_fn(|i| (HELLO_REFUSALS[i], get(&self.refused[i]))),
            ended: std::array::from_fn(|i| (SESSION_ENDS[i], get(&self.ended[i]))),
        }
    }
}

/// A copy of [`Outcomes`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// Hellos accepted.
    pub accepted: u64,
    /// Hellos refused, by reason (every reason of [`HELLO_REFUSALS`], in its order).
    pub refused: [(&'static str, u64); HELLO_REFUSALS.len()],
    /// Sessions ended, by reason (every reason of [`SESSION_ENDS`], in its order).
    pub ended: [(&'static str, u64); SESSION_ENDS.len()],
}

impl Default for OutcomeCounts {
    fn default() -> Self {
        Outcomes::default().counts()
    }
}

impl OutcomeCounts {
    /// Hellos refused, over every reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|(_, n)| n).sum()
    }

    /// Hellos refused for `reason` (a label of [`HELLO_REFUSALS`]; 0 for any other).
    pub fn refused(&self, reason: &str) -> u64 {
        count_of(&self.refused, reason)
    }

    /// Sessions ended for `reason` (a label of [`SESSION_ENDS`]; 0 for any other).
    pub fn ended(&self, reason: &str) -> u64 {
        count_of(&self.ended, reason)
    }
}

fn count_of(counts: &[(&'static str, u64)], reason: &str) -> u64 {
    counts
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label_and_count() {
        let refusals = [
            HelloRefusal::Protocol(9),
            HelloRefusal::Ticket(Refused::Malformed),
            HelloRefusal::Ticket(Refused::BadSignature),
            HelloRefusal::Ticket(Refused::Expired { expires: 1, now: 2 }),
            HelloRefusal::Ticket(Refused::Implausible {
                issued: 3,
                expires: 2,
                now: 1,
            }),
            HelloRefusal::Ticket(Refused::NoProofKey),
            HelloRefusal::Ticket(Refused::BadProof),
            HelloRefusal::SessionsPerSource,
        ];
        let ends = [
            SessionEnd::AgentClosed,
            SessionEnd::ConnectionLost("timed out".into()),
            SessionEnd::ProtocolError("a malformed record"),
            SessionEnd::Stalled,
            SessionEnd::TicketExpired,
            SessionEnd::Displaced,
            SessionEnd::Shutdown,
        ];
        let outcomes = Outcomes::default();
        // The i-th reason counted i + 1 times: each lands in its own slot.
        for (i, r) in refusals.iter().enumerate() {
            assert_eq!(r.reason(), HELLO_REFUSALS[i]);
            for _ in 0..=i {
                outcomes.refused(r);
            }
        }
        for (i, e) in ends.iter().enumerate() {
            assert_eq!(e.reason(), SESSION_ENDS[i]);
            for _ in 0..=i {
                outcomes.ended(e);
            }
        }
        outcomes.accepted();
        let c = outcomes.counts();
        assert_eq!(c.accepted, 1);
        for (i, (label, n)) in c.refused.iter().enumerate() {
            assert_eq!((*label, *n), (HELLO_REFUSALS[i], i as u64 + 1));
        }
        for (i, (label, n)) in c.ended.iter().enumerate() {
            assert_eq!((*label, *n), (SESSION_ENDS[i], i as u64 + 1));
        }
        assert_eq!(c.refused_total(), (1..=8).sum::<u64>());
        assert_eq!((c.refused("expired"), c.ended("ticket_expired")), (4, 5));
        assert_eq!(c.refused("no such reason"), 0);
        // The agent reads the ticket's own reason.
        assert!(refusals[3].to_string().contains("expired at 1"));
    }
}
