//! The agent's state directory: its identity (private key, node credentials) and the last
//! network map it received, so it can come back up while the coordinator is away.
//!
//! Files, all mode 0600 in a 0700 directory:
//! - `private.key`: the WireGuard private key in use, made here and never sent anywhere;
//! - `private.key.next`: during a key rotation, the next private key, made here too; the
//!   switch renames it over `private.key` (one atomic step, which also deletes the old key),
//!   so `private.key` always names the key in use, across a restart at any point;
//! - `node.json`: node id, node secret, coordinator address and certificate pin, and what the
//!   coordinator said about the node (name, network, addresses);
//! - `netmap.json`: the cached map, with when a coordinator last confirmed it
//!   ([`CachedMap`]).
//!
//! Writes go to a temporary file that is renamed into place, so a crash leaves the old file or
//! the new one, never half of one.
//!
//! How long a map is trusted without a coordinator confirming it is [`MapTrust`]'s decision
//! (pure: it is given the time).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// The network's IPv6 prefix, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_cidr6: Option<IpNet>,
    /// This node's overlay addresses.
    pub addresses: Vec<IpNet>,
    /// The UDP port the node used last: peers keep it while the coordinator is away, so a
    /// restarted node keeps it too. Absent: not yet chosen.
    #[serde(default)]
    pub listen_port: Option<u16>,
}

impl NodeState {
    /// The network's prefixes: IPv4, then IPv6 if any (as the welcome said, or for a node
    /// that joined with an older agent, the /48 of its IPv6 address).
    pub fn networks(&self) -> Vec<IpNet> {
        let v6 = self.network_cidr6.or_else(|| {
            self.addresses
                .iter()
                .find(|a| a.addr().is_ipv6())
                .map(IpNet::trunc)
        });
        std::iter::once(self.network_cidr).chain(v6).collect()
    }

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

/// The cached network map as `netmap.json` holds it: the map's own fields, plus when a
/// coordinator last confirmed it.
///
/// An agent from before 2026-12 wrote the map alone and reads this file as a map (it ignores
/// `received_at`); a file without `received_at` counts as confirmed at no known time, that is
/// too long ago to be trusted when a maximum age is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedMap {
    /// The map.
    #[serde(flatten)]
    pub map: Netmap,
    /// Unix seconds when this map arrived from a coordinator, or when a control session last
    /// showed it current (it is refreshed while one is up). Absent: unknown (an older agent
    /// wrote the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<u64>,
}

impl CachedMap {
    /// How long ago, at `now`, a coordinator last confirmed the map; `None` when unknown. A
    /// time ahead of `now` (the clock went back) counts as now.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        let at = UNIX_EPOCH + Duration::from_secs(self.received_at?);
        Some(now.duration_since(at).unwrap_or_default())
    }
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    /// Held while `netmap.json` is written, so that refreshing its date (a read, then a write)
    /// never puts back an older map that the control loop replaced meanwhile. Shared by clones.
    map_lock: Arc<Mutex<()>>,
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
            map_lock: Arc::new(Mutex::new(())),
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

    /// The next private key's path (during a rotation).
    pub fn next_key_path(&self) -> PathBuf {
        self.dir.join("private.key.next")
    }

    /// The next private key made for a rotation and not switched to yet, if any.
    ///
    /// # Errors
    /// [`StateError::Key`] when the file exists but is unusable (wrong mode, damaged).
    pub fn next_key(&self) -> Result<Option<PrivateKey>, StateError> {
        let path = self.next_key_path();
        if path.symlink_metadata().is_err() {
            return Ok(None);
        }
        Ok(Some(keyfile::read_private_key(&path)?))
    }

    /// The next private key for a rotation: the one made before and not used yet, else a new
    /// one, generated here and written 0600 beside the key in use.
    ///
    /// # Errors
    /// [`StateError::Key`] when the file cannot be written or read back.
    pub fn make_next_key(&self) -> Result<PrivateKey, StateError> {
        if let Some(k) = self.next_key()? {
            return Ok(k);
        }
        let key = PrivateKey::generate();
        keyfile::write_private_key(&self.next_key_path(), &key)?;
        Ok(keyfile::read_private_key(&self.next_key_path())?)
    }

    /// Switches to the next private key, which must have `public`: `private.key.next` is
    /// renamed over `private.key` (atomically: a crash leaves one key or the other in use,
    /// and the old key is gone from the directory), and the directory synced. Returns the key
    /// now in use.
    ///
    /// # Errors
    /// [`StateError::Damaged`] when no next key with that public key is there;
    /// [`StateError::Io`] when the rename fails.
    pub fn switch_to_next_key(
        &self,
        public: &meshlink_proto::PublicKey,
    ) -> Result<PrivateKey, StateError> {
        let next = self.next_key()?.ok_or_else(|| StateError::Damaged {
            path: self.next_key_path(),
            reason: "no next key to switch to".into(),
        })?;
        if next.public_key() != *public {
            return Err(StateError::Damaged {
                path: self.next_key_path(),
                reason: format!(
                    "it holds the key of {}, not {}",
                    next.public_key().short(),
                    public.short()
                ),
            });
        }
        let io = |source| StateError::Io {
            path: self.key_path(),
            source,
        };
        fs::rename(self.next_key_path(), self.key_path()).map_err(io)?;
        if let Ok(dir) = fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(next)
    }

    /// When the key in use was made (its file's modification time), if known.
    pub fn key_made_at(&self) -> Option<SystemTime> {
        fs::metadata(self.key_path())
            .and_then(|m| m.modified())
            .ok()
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

    /// The cached network map and when it was last confirmed.
    ///
    /// # Errors
    /// [`StateError`] when the file is unreadable or damaged.
    pub fn netmap(&self) -> Result<Option<CachedMap>, StateError> {
        self.read_json("netmap.json")
    }

    /// Caches the network map, which just arrived from a coordinator.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save_netmap(&self, map: &Netmap) -> Result<(), StateError> {
        self.save_netmap_at(map, SystemTime::now())
    }

    /// Caches the network map, received at `at`.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save_netmap_at(&self, map: &Netmap, at: SystemTime) -> Result<(), StateError> {
        let _writing = self.map_lock.lock().unwrap_or_else(|p| p.into_inner());
        let cached = CachedMap {
            map: map.clone(),
            received_at: Some(unix_secs(at)),
        };
        self.write_json("netmap.json", &cached)
    }

    /// Records that a coordinator showed the map of `version` current at `at` (a control
    /// session is up). A cached map of another version (the newer one is still on its way to
    /// the cache), or none: nothing to do. Returns whether the date was written.
    ///
    /// # Errors
    /// [`StateError`] when the file is unreadable, damaged or cannot be written.
    pub fn confirm_netmap(&self, at: SystemTime, version: u64) -> Result<bool, StateError> {
        let _writing = self.map_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut cached) = self.read_json::<CachedMap>("netmap.json")? else {
            return Ok(false);
        };
        if cached.map.version != version {
            return Ok(false);
        }
        cached.received_at = Some(unix_secs(at));
        self.write_json("netmap.json", &cached)?;
        Ok(true)
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Whether the network map may still be used, given when a coordinator last confirmed it and
/// whether a control session is up: the map is trusted while a session is up, and for
/// `max_age` after the last instant one was (or after the cached map's date, at start).
///
/// Inputs are instants; it reads no clock. The shell asks [`MapTrust::expired`] at the
/// instant [`MapTrust::poll_timeout`] names, and tells it when sessions come and go.
#[derive(Debug, Clone)]
pub struct MapTrust {
    max_age: Option<Duration>,
    /// When the map stops being trusted unless a session comes up; `None`: never.
    deadline: Option<Instant>,
    connected: bool,
}

impl MapTrust {
    /// Trust in a map last confirmed `age` before `now` (`None`: at an unknown time, which is
    /// too long ago unless `max_age` is `None`, no limit).
    pub fn new(max_age: Option<Duration>, age: Option<Duration>, now: Instant) -> Self {
        let deadline = max_age.map(|max| match age {
            Some(age) if age < max => now + (max - age),
            _ => now,
        });
        MapTrust {
            max_age,
            deadline,
            connected: false,
        }
    }

    /// A control session came up (`true`) or went away (`false`) at `now`. While one is up,
    /// the map is current; after it went away, the map ages from that instant.
    pub fn set_connected(&mut self, connected: bool, now: Instant) {
        if self.connected && !connected {
            self.confirmed(now);
        }
        self.connected = connected;
    }

    /// A coordinator confirmed the map at `now` (a new map arrived).
    pub fn confirmed(&mut self, now: Instant) {
        self.deadline = self.max_age.map(|max| now + max);
    }

    /// Whether the map is too old to be trusted at `now`: no session is up and none has
    /// confirmed the map for `max_age`.
    pub fn expired(&self, now: Instant) -> bool {
        !self.connected && self.deadline.is_some_and(|d| now >= d)
    }

    /// The instant the map will expire if nothing changes; `None` when it will not (a session
    /// is up, there is no limit, or it already expired).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if self.connected || self.expired(now) {
            return None;
        }
        self.deadline
    }

    /// The longest trust in an unconfirmed map (`None`: no limit).
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
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
            network_cidr6: None,
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

    fn sample_map() -> Netmap {
        let peer = meshlink_proto::netmap::PeerInfo {
            node_id: 2,
            name: "vm-b".into(),
            public_key: meshlink_proto::PublicKey([2; 32]),
            next_key: None,
            addresses: vec!["100.64.0.2/32".parse().unwrap()],
            allowed_ips: Vec::new(),
            endpoints: vec!["198.18.2.10:51820".parse().unwrap()],
            labels: Default::default(),
            tags: Vec::new(),
            via: None,
        };
        Netmap {
            version: 7,
            peers: [(2, peer)].into_iter().collect(),
            workloads: Default::default(),
            policy: None,
        }
    }

    #[test]
    fn the_cached_map_says_when_it_was_confirmed_and_stays_readable_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let map = sample_map();
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        s.save_netmap_at(&map, at).unwrap();
        let cached = s.netmap().unwrap().unwrap();
        assert_eq!(cached.map, map);
        assert_eq!(cached.received_at, Some(1_800_000_000));
        assert_eq!(
            cached.age(at + Duration::from_secs(90)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            cached.age(at - Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        // An agent from before the date reads the file as a map.
        let text = fs::read(d.path().join("netmap.json")).unwrap();
        let old_reader: Netmap = serde_json::from_slice(&text).unwrap();
        assert_eq!(old_reader, map);

        // Confirming moves the date and keeps the map; not for another version.
        assert!(!s.confirm_netmap(at + Duration::from_secs(60), 8).unwrap());
        assert_eq!(
            s.netmap().unwrap().unwrap().received_at,
            Some(1_800_000_000)
        );
        assert!(s.confirm_netmap(at + Duration::from_secs(3600), 7).unwrap());
        let cached = s.netmap().unwrap().unwrap();
        assert_eq!(
            (cached.map, cached.received_at),
            (map.clone(), Some(1_800_003_600))
        );
        assert_eq!(
            fs::metadata(d.path().join("netmap.json"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        // A file an older agent wrote has no date: its age is unknown.
        fs::write(
            d.path().join("netmap.json"),
            serde_json::to_vec(&map).unwrap(),
        )
        .unwrap();
        let cached = s.netmap().unwrap().unwrap();
        assert_eq!(cached.age(at), None);
        assert_eq!((cached.map, cached.received_at), (map, None));

        // Nothing cached: nothing to confirm.
        s.forget_node();
        assert!(!s.confirm_netmap(at, 7).unwrap());
        assert!(s.netmap().unwrap().is_none());
    }

    #[test]
    fn map_trust_lasts_max_age_after_the_last_confirmation() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let week = Some(s(7 * 24 * 3600));

        // A cached map from 6 days ago: trusted for one more day without a coordinator.
        let trust = MapTrust::new(week, Some(s(6 * 24 * 3600)), t0);
        assert!(!trust.expired(t0));
        assert_eq!(trust.poll_timeout(t0), Some(t0 + s(24 * 3600)));
        assert!(trust.expired(t0 + s(24 * 3600)));
        assert_eq!(trust.poll_timeout(t0 + s(24 * 3600)), None);

        // Older than the limit, or of unknown age: not trusted at all.
        assert!(MapTrust::new(week, Some(s(8 * 24 * 3600)), t0).expired(t0));
        assert!(MapTrust::new(week, None, t0).expired(t0));
        // No limit: always trusted.
        let never = MapTrust::new(None, None, t0);
        assert!(!never.expired(t0 + s(10 * 365 * 24 * 3600)));
        assert_eq!(never.poll_timeout(t0), None);

        // While a session is up the map is current, however long it lasts; after it goes,
        // the map ages from that instant.
        let max = Some(s(10));
        let mut trust = MapTrust::new(max, Some(s(9)), t0);
        trust.set_connected(true, t0 + s(1));
        assert!(!trust.expired(t0 + s(100)));
        assert_eq!(trust.poll_timeout(t0 + s(100)), None);
        trust.set_connected(false, t0 + s(100));
        assert!(!trust.expired(t0 + s(109)));
        assert_eq!(trust.poll_timeout(t0 + s(101)), Some(t0 + s(110)));
        assert!(trust.expired(t0 + s(110)));
        // A map that expired is trusted again once a session is up.
        trust.set_connected(true, t0 + s(200));
        assert!(!trust.expired(t0 + s(200)));
        // A new map restarts the count.
        trust.set_connected(false, t0 + s(201));
        trust.confirmed(t0 + s(205));
        assert!(!trust.expired(t0 + s(214)));
        assert!(trust.expired(t0 + s(215)));
        assert_eq!(trust.max_age(), max);
    }

    #[test]
    fn a_rotation_keeps_one_key_in_use_and_the_next_beside_it_both_private() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let old = s.private_key().unwrap();
        assert!(s.next_key().unwrap().is_none());
        let next = s.make_next_key().unwrap();
        assert_ne!(next.public_key(), old.public_key());
        // Made once: asked again (a restart, a repeated request), the same key.
        assert_eq!(s.make_next_key().unwrap().public_key(), next.public_key());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&s.next_key_path()), 0o600);
        // The key in use is untouched until the switch.
        assert_eq!(s.private_key().unwrap().public_key(), old.public_key());
        // A switch to another key is refused and changes nothing.
        assert!(s.switch_to_next_key(&old.public_key()).is_err());
        assert_eq!(s.private_key().unwrap().public_key(), old.public_key());
        let now = s.switch_to_next_key(&next.public_key()).unwrap();
        assert_eq!(now.public_key(), next.public_key());
        assert_eq!(s.private_key().unwrap().public_key(), next.public_key());
        assert!(s.next_key().unwrap().is_none());
        assert_eq!(mode(&s.key_path()), 0o600);
        assert!(s.key_made_at().is_some());
        // The old private key is nowhere in the directory.
        let old_text = old.to_key().to_base64();
        for entry in fs::read_dir(d.path()).unwrap() {
            let text = fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            assert!(!text.contains(&old_text));
        }
        // Nothing to switch to now.
        assert!(s.switch_to_next_key(&next.public_key()).is_err());
        // A next key readable by others is refused, naming the file.
        let k = s.make_next_key().unwrap();
        fs::set_permissions(s.next_key_path(), fs::Permissions::from_mode(0o644)).unwrap();
        let e = s.next_key().unwrap_err().to_string();
        assert!(e.contains("private.key.next"), "{e}");
        let _ = k;
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
