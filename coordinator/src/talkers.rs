//! Who talks to each workload: what holders last reported ([`ClientMessage::Talkers`]), so that
//! the destination of a move warms up sessions with those peers only (and the holder), not
//! with every peer of the network, which at thousands of peers is a burst of thousands of
//! handshakes for nothing.
//!
//! Kept in memory by the coordinator that holds the reporting node's session, like path
//! reports: a move handled by another coordinator of the same database finds no report and
//! asks for every peer, as before. Bounded: a report is kept only from the workload's holder,
//! at most [`MAX_TALKERS`] peers, and a node's reports are forgotten with the node.
//!
//! [`ClientMessage::Talkers`]: meshlink_proto::control::ClientMessage::Talkers

use std::collections::HashMap;
use std::sync::Mutex;

use meshlink_proto::control::MAX_TALKERS;
use meshlink_proto::NodeId;

/// Every holder's last report, per workload.
#[derive(Debug, Default)]
pub struct TalkerBook {
    /// Reporting node -> workload name -> its peers.
    reports: Mutex<HashMap<NodeId, HashMap<String, Vec<NodeId>>>>,
}

impl TalkerBook {
    /// An empty book.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, HashMap<String, Vec<NodeId>>>> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `node`'s report for `workload`, if `holds(workload)` says `node` holds it now;
    /// the node's reports of workloads it no longer holds are dropped. Keeps at most
    /// [`MAX_TALKERS`] peers, never the node itself, each once. Returns whether it was kept.
    pub fn record(
        &self,
        node: NodeId,
        workload: &str,
        mut nodes: Vec<NodeId>,
        holds: impl Fn(&str) -> bool,
    ) -> bool {
        let mut reports = self.lock();
        let mine = reports.entry(node).or_default();
        mine.retain(|name, _| holds(name));
        if !holds(workload) {
            if mine.is_empty() {
                reports.remove(&node);
            }
            return false;
        }
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|n| *n != node && seen.insert(*n));
        nodes.truncate(MAX_TALKERS);
        mine.insert(workload.to_string(), nodes);
        true
    }

    /// What a move of `workload` from `holder` (its holder now, `None` when detached) to
    /// `to` should warm: the holder and the peers of its last report, without `to`, at most
    /// [`MAX_TALKERS`]; `None` (every peer) without a report from the holder.
    #[must_use]
    pub fn warm_list(
        &self,
        workload: &str,
        holder: Option<NodeId>,
        to: NodeId,
    ) -> Option<Vec<NodeId>> {
        let holder = holder?;
        let reports = self.lock();
        let talkers = reports.get(&holder)?.get(workload)?;
        let list: Vec<NodeId> = std::iter::once(holder)
            .chain(talkers.iter().copied())
            .filter(|n| *n != to)
            .take(MAX_TALKERS)
            .collect();
        Some(list)
    }

    /// Forgets `node`'s reports (removed from the mesh).
    pub fn forget(&self, node: NodeId) {
        self.lock().remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_holders_report_is_kept_and_used() {
        let book = TalkerBook::new();
        let holds_chat = |w: &str| w == "chat";
        assert!(book.record(1, "chat", vec![5, 6, 1, 5], holds_chat));
        // Another node's report of the same workload: not the holder, not kept.
        assert!(!book.record(2, "chat", vec![7], |_| false));
        assert_eq!(book.warm_list("chat", Some(1), 9), Some(vec![1, 5, 6]));
        // The destination is not asked to warm itself.
        assert_eq!(book.warm_list("chat", Some(1), 5), Some(vec![1, 6]));
        // No report from this holder, or no holder: every peer.
        assert_eq!(book.warm_list("chat", Some(2), 9), None);
        assert_eq!(book.warm_list("chat", None, 9), None);
        assert_eq!(book.warm_list("web", Some(1), 9), None);
    }

    #[test]
    fn reports_are_bounded_and_go_with_the_holding() {
        let book = TalkerBook::new();
        let many: Vec<NodeId> = (10..10 + 3 * MAX_TALKERS as u64).collect();
        assert!(book.record(1, "chat", many, |_| true));
        let list = book.warm_list("chat", Some(1), 0).unwrap();
        assert_eq!(list.len(), MAX_TALKERS);
        assert_eq!(list[0], 1);
        // Node 1 no longer holds chat: its next report (of anything) drops the old one.
        assert!(book.record(1, "web", vec![3], |w| w == "web"));
        assert_eq!(book.warm_list("chat", Some(1), 0), None);
        assert_eq!(book.warm_list("web", Some(1), 0), Some(vec![1, 3]));
        book.forget(1);
        assert_eq!(book.warm_list("web", Some(1), 0), None);
    }
}
