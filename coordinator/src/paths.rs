//! What each agent last reported of its paths to its peers (direct or relayed, RTT), for
//! operators (`meshctl node show`). Kept in memory by the coordinator that holds the node's
//! session: a report is a snapshot, not state the mesh depends on, and is replaced by the next.

use std::collections::HashMap;
use std::sync::Mutex;

use meshlink_proto::control::{PathReport, MAX_PATH_REPORTS, MAX_RELAY_NAME};
use meshlink_proto::NodeId;

use crate::store::UnixTime;

/// One node's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// When it arrived, by the service's clock.
    pub at: UnixTime,
    /// Its entries (at most [`MAX_PATH_REPORTS`]).
    pub paths: Vec<PathReport>,
}

/// The last report of every node that sent one here.
#[derive(Debug, Default)]
pub struct PathBook {
    reports: Mutex<HashMap<NodeId, Reported>>,
}

impl PathBook {
    /// An empty book.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Reported>> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `node`'s report, keeping at most [`MAX_PATH_REPORTS`] entries, and of each
    /// relay name at most [`MAX_RELAY_NAME`] bytes.
    pub fn record(&self, node: NodeId, mut paths: Vec<PathReport>, at: UnixTime) {
        paths.truncate(MAX_PATH_REPORTS);
        for p in &mut paths {
            if let Some(name) = &mut p.relay {
                if name.len() > MAX_RELAY_NAME {
                    let mut end = MAX_RELAY_NAME;
                    while !name.is_char_boundary(end) {
                        end -= 1;
                    }
                    name.truncate(end);
                }
            }
        }
        self.lock().insert(node, Reported { at, paths });
    }

    /// `node`'s last report.
    #[must_use]
    pub fn get(&self, node: NodeId) -> Option<Reported> {
        self.lock().get(&node).cloned()
    }

    /// Forgets `node` (removed from the mesh).
    pub fn forget(&self, node: NodeId) {
        self.lock().remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::control::PathKind;

    fn entry(peer: NodeId) -> PathReport {
        PathReport {
            relay: None,
            peer,
            kind: PathKind::Direct,
            via: Some("198.18.0.2:51820".parse().unwrap()),
            over: None,
            rtt_us: Some(1200),
            changed_secs_ago: Some(3),
        }
    }

    #[test]
    fn a_report_replaces_the_last_and_is_bounded() {
        let book = PathBook::new();
        let t = 0;
        book.record(1, vec![entry(2), entry(3)], t);
        book.record(1, vec![entry(4)], t);
        assert_eq!(book.get(1).unwrap().paths, vec![entry(4)]);
        book.record(5, (0..10_000).map(entry).collect(), t);
        assert_eq!(book.get(5).unwrap().paths.len(), MAX_PATH_REPORTS);
        book.forget(1);
        assert_eq!(book.get(1), None);
        // A relay's name is kept to MAX_RELAY_NAME bytes, on a character boundary.
        let long = PathReport {
            relay: Some("é".repeat(MAX_RELAY_NAME)),
            ..entry(2)
        };
        book.record(6, vec![long], t);
        let kept = book.get(6).unwrap().paths[0].relay.clone().unwrap();
        assert_eq!(kept, "é".repeat(MAX_RELAY_NAME / 2));
    }
}
