//! The agent's state directory: its identity (private key, node credentials) and the last
//! network map it received, so it can come back up while the coordinator is away.
//!
//! Files, all mode 0600 in a 0700 directory:
//! - `private.key`: the WireGuard private key, made here and never sent anywhere;
//! - `node.json`: node id, node secret, coordinator address and certificate pin, and what the
//!   coordinator said about the node (name, network, addresses);
//! - `netmap.json`: the cached map.
//!
//! Writes go to a temporary file that is renamed into place, so a crash leaves the old file or
//! the new one, never half of one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use meshlink_proto::{Netmap, NodeId};
use serde::{Deserialize, Serialize};

use crate::keyfile;
use crate::settings::PrivateKey;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshlink";

/// What the agent keeps about its membership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// The first coordinator's QUIC address ([`NodeState::coordinators`]' first). Kept so
    /// that an agent from before 2026-12 (which reads only this) can still use the file.
    pub coordinator: String,
    /// Every coordinator address of the mesh, in the order to try them: from the join token,
    /// then from the latest welcome that listed them. Absent in files written before 2026-12:
    /// then [`NodeState::coordinator`] is the only one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
    /// Hex SHA-256 of the coordinator's certificate.
    pub fingerprint: String,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's secret (a credential: the file is 0600).
    pub node_secret: String,
    /// This node's name.
    pub name: String,
    /// The network's name.
    pub network: String,
    /// The network's prefix.
    pub network_cidr: IpNet,
    /// This node's overlay addresses.
    pub addresses: Vec<IpNet>,
    /// The UDP port the node used last: peers keep it while the coordinator is away, so a
    /// restarted node keeps it too. Absent: not yet chosen.
    #[serde(default)]
    pub listen_port: Option<u16>,
}

impl NodeState {
    /// Every known coordinator address, in order, each once (at least
    /// [`NodeState::coordinator`]).
    pub fn coordinators(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        let listed = if self.coordinators.is_empty() {
            std::slice::from_ref(&self.coordinator)
        } else {
            &self.coordinators[..]
        };
        for a in listed {
            if !a.is_empty() && !all.contains(a) {
                all.push(a.clone());
            }
        }
        all
    }

    /// Replaces the known coordinator addresses (an empty list changes nothing); returns
    /// whether they changed.
    pub fn set_coordinators(&mut self, addresses: &[String]) -> bool {
        let Some(first) = addresses.first() else {
            return false;
        };
        if self.coordinators() == addresses {
            return false;
        }
        self.coordinator = first.clone();
        self.coordinators = addresses.to_vec();
        true
    }
}

/// A problem with the state directory, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// A file holds something unexpected.
    #[error("{path}: damaged ({reason}); remove it to start over")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating with mode 0700 if needed) the directory.
    ///
    /// # Errors
    /// [`StateError::Io`] when it cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The private key file's path.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("private.key")
    }

    /// The node's private key, made on first use.
    ///
    /// # Errors
    /// [`StateError::Key`] when the file exists but is unusable (wrong mode, damaged).
    pub fn private_key(&self) -> Result<PrivateKey, StateError> {
        let path = self.key_path();
        if !path.exists() {
            keyfile::write_private_key(&path, &PrivateKey::generate())?;
        }
        Ok(keyfile::read_private_key(&path)?)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StateError::Damaged {
                path,
                reason: e.to_string(),
            })
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(value).map_err(|e| StateError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)
    }

    /// The stored membership, if the node has joined.
    ///
    /// # Errors
    /// [`StateError`] when the file is unreadable or damaged.
    pub fn node(&self) -> Result<Option<NodeState>, StateError> {
        self.read_json("node.json")
    }

    /// Stores the membership.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save_node(&self, node: &NodeState) -> Result<(), StateError> {
        self.write_json("node.json", node)
    }

    /// Forgets the membership (after revocation); the cached map goes too.
    pub fn forget_node(&self) {
        let _ = fs::remove_file(self.dir.join("node.json"));
        let _ = fs::remove_file(self.dir.join("netmap.json"));
    }

    /// The cached network map.
    ///
    /// # Errors
    /// [`StateError`] when the file is unreadable or damaged.
    pub fn netmap(&self) -> Result<Option<Netmap>, StateError> {
        self.read_json("netmap.json")
    }

    /// Caches the network map.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save_netmap(&self, map: &Netmap) -> Result<(), StateError> {
        self.write_json("netmap.json", map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("meshlink-state-{tag}-{}", std::process::id()))
    }

    #[test]
    fn key_is_made_once_and_files_are_private() {
        let d = tmp("key");
        let _ = fs::remove_dir_all(&d);
        let s = StateDir::open(&d).unwrap();
        let k1 = s.private_key().unwrap();
        let k2 = s.private_key().unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
        let mode = fs::metadata(s.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let node = NodeState {
            coordinator: "198.18.1.1:7443".into(),
            coordinators: vec!["198.18.1.1:7443".into(), "198.18.2.1:7443".into()],
            fingerprint: "00".repeat(32),
            node_id: 3,
            node_secret: "s".into(),
            name: "vm-a".into(),
            network: "prod".into(),
            network_cidr: "100.64.0.0/16".parse().unwrap(),
            addresses: vec!["100.64.0.3/16".parse().unwrap()],
            listen_port: Some(51820),
        };
        assert!(s.node().unwrap().is_none());
        s.save_node(&node).unwrap();
        assert_eq!(s.node().unwrap(), Some(node));
        assert_eq!(
            fs::metadata(d.join("node.json"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        fs::write(d.join("netmap.json"), b"{nope").unwrap();
        assert!(matches!(s.netmap(), Err(StateError::Damaged { .. })));
        s.forget_node();
        assert!(s.node().unwrap().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_node_file_from_before_the_coordinator_list_still_loads() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let old = format!(
            r#"{{"coordinator":"198.18.1.1:7443","fingerprint":"{}","node_id":3,
                "node_secret":"s","name":"vm-a","network":"prod",
                "network_cidr":"100.64.0.0/16","addresses":["100.64.0.3/16"],
                "listen_port":51820}}"#,
            "00".repeat(32)
        );
        fs::write(d.path().join("node.json"), old).unwrap();
        let mut node = s.node().unwrap().unwrap();
        assert!(node.coordinators.is_empty());
        assert_eq!(node.coordinators(), vec!["198.18.1.1:7443".to_string()]);
        // The same list again is no change; a new one is, and is stored with its first as
        // `coordinator` for older agents.
        assert!(!node.set_coordinators(&["198.18.1.1:7443".to_string()]));
        assert!(!node.set_coordinators(&[]));
        let two = vec!["198.18.2.1:7443".to_string(), "198.18.1.1:7443".to_string()];
        assert!(node.set_coordinators(&two));
        assert_eq!(node.coordinator, "198.18.2.1:7443");
        s.save_node(&node).unwrap();
        let back = s.node().unwrap().unwrap();
        assert_eq!(back.coordinators(), two);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join("node.json")).unwrap()).unwrap();
        assert_eq!(json["coordinator"], "198.18.2.1:7443");
        assert_eq!(json["coordinators"], serde_json::json!(two));
    }
}
