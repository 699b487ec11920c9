//! Which coordinator the agent talks to, and when it gives up on one: pure decisions, given
//! time, tested without I/O. [`super::MeshControl`] does the connecting.
//!
//! - [`Coordinators`]: the mesh's coordinator addresses (seeded from the join token, replaced
//!   by every welcome that names them) and the one the next attempt goes to. A failed attempt
//!   or a session that ended moves on to the next address, round robin, so a dead coordinator
//!   costs one attempt and not a backoff on the same address. The pauses between attempts are
//!   [`meshlink_proto::reconnect::Reconnect`]'s, whatever the address.
//! - [`renewal_overdue`]: a holder whose lease is not being renewed leaves its coordinator
//!   while half of the lease is still left, whatever QUIC thinks of the connection (a
//!   coordinator that stopped answering, or a node that became a holder on a connection
//!   opened with a quiet node's timeouts, see `tls::Liveness`).
//! - [`Coordinators::patience`]: with several coordinators, a handshake to one that does not
//!   answer is given up sooner during the first round, since another may.

use std::time::{Duration, Instant};

use meshlink_proto::workload::{Holdings, HEARTBEATS_PER_LEASE};

/// The longest a handshake may take, during the first round through several coordinators,
/// before the next one is tried (after a whole round failed, the policy's patience applies:
/// every coordinator may just be slow).
pub const FIRST_ROUND_PATIENCE: Duration = Duration::from_secs(3);

/// The coordinator addresses of the mesh, and where the next attempt goes. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinators {
    addresses: Vec<String>,
    /// The index in `addresses` of the address the next attempt goes to.
    next: usize,
    /// The address the open session was made to, if one is open. It need not be in
    /// `addresses`: a welcome may list the coordinators under other names than the one the
    /// agent reached.
    session: Option<String>,
}

impl Coordinators {
    /// The list `addresses` in order (blank and repeated addresses left out), the first one
    /// to be tried first; `None` when no address is left.
    pub fn new(addresses: impl IntoIterator<Item = String>) -> Option<Self> {
        let addresses = unique(addresses);
        (!addresses.is_empty()).then_some(Coordinators {
            addresses,
            next: 0,
            session: None,
        })
    }

    /// Every known address, in order.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The address the next attempt goes to.
    pub fn target(&self) -> &str {
        &self.addresses[self.next]
    }

    /// The address of the open session, if one is open.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// A session to `address` opened (usually [`Coordinators::target`]; after a join, the
    /// address the join went to). When it ends, the next attempt goes to the address after it.
    pub fn connected(&mut self, address: &str) {
        if let Some(i) = self.position(address) {
            self.next = i;
        }
        self.session = Some(address.to_string());
    }

    /// The attempt on [`Coordinators::target`] failed, or the open session ended: the next
    /// attempt goes to the following address (round robin).
    pub fn failed(&mut self) {
        let from = match self.session.take() {
            None => self.next,
            Some(s) => match self.position(&s) {
                Some(i) => i,
                // The session's address is no longer listed: `next` already points to where
                // the list says to go.
                None => return,
            },
        };
        self.next = (from + 1) % self.addresses.len();
    }

    /// A welcome listed `addresses` (all of the mesh's coordinators, as the coordinator knows
    /// them): they replace the known list, unless there are none (the coordinator does not
    /// know; the list is kept). Returns whether the list changed (and so should be stored).
    /// The next attempt after the open session ends goes to the address after the session's
    /// in the new list, or to the new list's first when the session's address is not in it.
    pub fn learn(&mut self, addresses: &[String]) -> bool {
        let addresses = unique(addresses.iter().cloned());
        if addresses.is_empty() || addresses == self.addresses {
            return false;
        }
        let keep = self
            .session
            .clone()
            .unwrap_or_else(|| self.target().to_string());
        self.addresses = addresses;
        self.next = self.position(&keep).unwrap_or(0);
        true
    }

    /// How long the next handshake may take, given the policy's `patience` and the attempts
    /// that failed since the last working session: during the first round through several
    /// coordinators at most [`FIRST_ROUND_PATIENCE`].
    pub fn patience(&self, patience: Duration, failures: u32) -> Duration {
        let first_round = usize::try_from(failures).is_ok_and(|f| f < self.addresses.len());
        if self.addresses.len() > 1 && first_round {
            patience.min(FIRST_ROUND_PATIENCE)
        } else {
            patience
        }
    }

    fn position(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| a == address)
    }
}

/// Trimmed, non-blank addresses in order, each once.
fn unique(addresses: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addresses {
        let a = a.trim();
        if !a.is_empty() && !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    out
}

/// Whether a holder should leave the session opened at `opened`: its lease is still valid
/// but less than half of it is left, and the session has had a third of a lease to renew it.
/// A live coordinator renews it every `lease / HEARTBEATS_PER_LEASE`, so a valid lease with
/// less than half left means no heartbeat was answered for well over a heartbeat interval;
/// leaving now leaves half a lease to renew it through another coordinator. A lease that has
/// run out, or was refused (a failover away from this node), is no reason to leave.
pub fn renewal_overdue(holdings: &Holdings, opened: Instant, now: Instant) -> bool {
    if !holdings.is_holder() {
        return false;
    }
    let lease = holdings.heartbeat_interval() * HEARTBEATS_PER_LEASE;
    now.saturating_duration_since(opened) >= lease / 3
        && holdings.lease_valid(now)
        && !holdings.lease_valid(now + lease / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::netmap::Netmap;
    use meshlink_proto::workload::{WorkloadInfo, DEFAULT_LEASE};

    fn list(c: &Coordinators) -> Vec<&str> {
        c.addresses().iter().map(String::as_str).collect()
    }

    fn three() -> Coordinators {
        Coordinators::new(["a:1", "b:2", "c:3"].map(String::from)).unwrap()
    }

    #[test]
    fn failures_go_round_the_list() {
        let mut c = three();
        let mut tried = Vec::new();
        for _ in 0..5 {
            tried.push(c.target().to_string());
            c.failed();
        }
        assert_eq!(tried, ["a:1", "b:2", "c:3", "a:1", "b:2"]);
    }

    #[test]
    fn a_session_that_ends_moves_on_from_its_own_address() {
        let mut c = three();
        c.failed();
        assert_eq!(c.target(), "b:2");
        c.connected("b:2");
        assert_eq!(c.session(), Some("b:2"));
        c.failed();
        assert_eq!(c.session(), None);
        assert_eq!(c.target(), "c:3");
        // After a join through c:3 (not the target), the next attempt goes after c:3.
        let mut c = three();
        c.connected("c:3");
        c.failed();
        assert_eq!(c.target(), "a:1");
    }

    #[test]
    fn one_address_is_always_the_target() {
        let mut c = Coordinators::new(["a:1".to_string()]).unwrap();
        c.failed();
        c.connected("a:1");
        c.failed();
        assert_eq!(c.target(), "a:1");
        assert_eq!(Coordinators::new(Vec::new()), None);
        assert_eq!(Coordinators::new([" ".to_string()]), None);
    }

    #[test]
    fn repeated_and_blank_addresses_are_left_out() {
        let c = Coordinators::new(["a:1", "", "b:2", "a:1", " b:2 "].map(String::from)).unwrap();
        assert_eq!(list(&c), ["a:1", "b:2"]);
    }

    #[test]
    fn a_welcome_replaces_the_list_and_the_session_keeps_its_place() {
        let mut c = three();
        c.failed();
        c.connected("b:2");
        // An empty list is "unknown": nothing changes.
        assert!(!c.learn(&[]));
        assert!(!c.learn(&["a:1", "b:2", "c:3"].map(String::from)));
        assert!(c.learn(&["d:4", "b:2", "e:5"].map(String::from)));
        assert_eq!(list(&c), ["d:4", "b:2", "e:5"]);
        assert_eq!(c.session(), Some("b:2"));
        c.failed();
        assert_eq!(c.target(), "e:5");
        c.failed();
        assert_eq!(c.target(), "d:4");
    }

    #[test]
    fn a_welcome_not_naming_the_session_sends_the_next_attempt_to_its_first() {
        let mut c = Coordinators::new(["coord.example.net:7443".to_string()]).unwrap();
        c.connected("coord.example.net:7443");
        assert!(c.learn(&["198.18.0.1:7443", "198.18.0.2:7443"].map(String::from)));
        assert_eq!(c.session(), Some("coord.example.net:7443"));
        c.failed();
        assert_eq!(c.target(), "198.18.0.1:7443");
        c.failed();
        assert_eq!(c.target(), "198.18.0.2:7443");
    }

    #[test]
    fn a_list_learnt_between_sessions_keeps_the_target_if_listed() {
        let mut c = three();
        c.failed();
        assert!(c.learn(&["c:3", "b:2"].map(String::from)));
        assert_eq!(c.target(), "b:2");
        assert!(c.learn(&["x:9".to_string()]));
        assert_eq!(c.target(), "x:9");
    }

    #[test]
    fn the_first_round_through_several_is_impatient() {
        let ten = Duration::from_secs(10);
        let one = Duration::from_secs(1);
        let c = three();
        assert_eq!(c.patience(ten, 0), FIRST_ROUND_PATIENCE);
        assert_eq!(c.patience(ten, 2), FIRST_ROUND_PATIENCE);
        assert_eq!(c.patience(ten, 3), ten);
        assert_eq!(c.patience(one, 0), one);
        let alone = Coordinators::new(["a:1".to_string()]).unwrap();
        assert_eq!(alone.patience(ten, 0), ten);
    }

    /// Node 1 holding `chat` with a lease granted for a heartbeat sent at `t0`.
    fn leased_holder(t0: Instant) -> Holdings {
        let mut map = Netmap {
            version: 1,
            ..Netmap::default()
        };
        map.workloads.insert(
            "chat".into(),
            WorkloadInfo {
                id: 1,
                name: "chat".into(),
                address: "100.64.50.10/32".parse().unwrap(),
                holder: Some(1),
                generation: 1,
                previous: None,
                candidates: vec![1],
                grace_ms: None,
                tags: Vec::new(),
                address6: None,
            },
        );
        let mut h = Holdings::new(1);
        h.on_map(&map, t0);
        let seq = h.heartbeat_now(t0);
        h.on_lease(seq, DEFAULT_LEASE, 1);
        assert!(h.lease_valid(t0));
        h
    }

    #[test]
    fn a_holder_leaves_a_coordinator_that_stopped_renewing_with_half_a_lease_left() {
        let t0 = Instant::now();
        let h = leased_holder(t0);
        let half = DEFAULT_LEASE / 2;
        let ms = Duration::from_millis;
        // A session as old as the lease: only the lease's remainder decides.
        let opened = t0;
        assert!(!renewal_overdue(&h, opened, t0 + half - ms(1)));
        assert!(renewal_overdue(&h, opened, t0 + half));
        assert!(renewal_overdue(&h, opened, t0 + DEFAULT_LEASE - ms(1)));
        // Once the lease has run out, leaving helps nothing.
        assert!(!renewal_overdue(&h, opened, t0 + DEFAULT_LEASE));
    }

    #[test]
    fn a_new_session_gets_a_third_of_a_lease_to_renew() {
        let t0 = Instant::now();
        let h = leased_holder(t0);
        let third = DEFAULT_LEASE / 3;
        // Reconnected late: less than half the lease left already when the session opened.
        let opened = t0 + Duration::from_millis(900);
        assert!(!renewal_overdue(&h, opened, opened));
        assert!(!renewal_overdue(
            &h,
            opened,
            opened + third - Duration::from_millis(1)
        ));
        assert!(renewal_overdue(&h, opened, opened + third));
    }

    #[test]
    fn a_node_that_holds_nothing_never_leaves_for_its_lease() {
        let t0 = Instant::now();
        let mut h = leased_holder(t0);
        let map = Netmap {
            version: 2,
            ..Netmap::default()
        };
        h.on_map(&map, t0);
        assert!(!renewal_overdue(&h, t0, t0 + DEFAULT_LEASE / 2));
        let fresh = Holdings::new(1);
        assert!(!renewal_overdue(&fresh, t0, t0 + DEFAULT_LEASE));
    }
}
