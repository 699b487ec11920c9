//! Durable state: networks, join tokens and nodes, behind the [`Store`] trait.
//!
//! The trait speaks in records ([`NetworkRecord`], [`TokenRecord`], [`NodeRecord`]) and knows
//! no policy: validation, refusals and address choice live in [`crate::handlers`]. Each method
//! is one transaction, so a change and the version bump it causes land together or not at all.
//!
//! Secrets never reach the store: join tokens and node credentials are kept as SHA-256 hashes
//! (lowercase hex), compared by the handlers.
//!
//! [`SqlStore`] is the only implementation, on two databases ([`Backend`]): SQLite, the
//! embedded default for one coordinator, and PostgreSQL, which several coordinators share.
//! Every version bump also writes a row of the change log ([`ChangeRecord`]) in the same
//! transaction, so a coordinator that did not make a change (or missed its notification)
//! reads what changed, in version order, with [`Store::changes_since`].
//!
//! Architecture invariant: node ids and token ids are never reused (SQLite `AUTOINCREMENT`,
//! PostgreSQL identity columns), and a network's version only grows, across restarts too.

mod audit;
mod shared;
mod sql;
mod timed;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use ipnet::{Ipv4Net, Ipv6Net};
use meshlink_proto::{NodeId, PublicKey};

pub use shared::{Leadership, LeaseFence, Renewal};
pub use sql::{LeaseClock, SqlStore, CHANGES_KEPT};
pub use timed::TimedStore;

/// Seconds since the Unix epoch, the only time unit of the store and of the admin API.
pub type UnixTime = i64;

/// A join token's identifier, never reused.
pub type TokenId = u64;

/// The future every [`Store`] method returns: boxed, so that `dyn Store` works.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The PostgreSQL notification channel on which every commit that changes a network's map
/// sends the network's name.
pub const CHANGES_CHANNEL: &str = "meshlink_changes";

/// The PostgreSQL notification channel on which a coordinator asks the others to pass a
/// `Prepare` to a node whose session they have ([`PrepareNote`], JSON).
pub const PREPARE_CHANNEL: &str = "meshlink_prepare";

/// The channel on which a coordinator passes on a node's `Prepared` ([`PrepareNote`], JSON).
pub const PREPARED_CHANNEL: &str = "meshlink_prepared";

/// A move's destination asked to prepare, or reporting it did, between coordinators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrepareNote {
    /// The destination node.
    pub node: NodeId,
    /// Its network.
    pub network: String,
    /// The workload.
    pub workload: String,
    /// The generation it is to take.
    pub generation: u64,
    /// The peers it is to warm up sessions with (`Prepare::warm`). Absent: every peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<Vec<NodeId>>,
    /// On [`PREPARE_CHANNEL`]: not a `Prepare` but a live migration's `Handover`, to `node`
    /// (the holder), towards this node. Absent: a `Prepare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_to: Option<NodeId>,
    /// The live migration's attempt (with `handover_to`, `abort` or `handed_over`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// On [`PREPARE_CHANNEL`]: not a `Prepare` but a `HandoverAborted` for `attempt`, to
    /// `node` (the holder).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort: bool,
    /// On [`PREPARED_CHANNEL`]: not a `Prepared` but the holder's answer to a `Handover`
    /// (`Err`: why the application could not hand over). Absent: a `Prepared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_over: Option<Result<(), String>>,
}

/// Which database a [`SqlStore`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file, for one coordinator.
    Sqlite,
    /// A PostgreSQL server, shared by any number of coordinators.
    Postgres,
}

/// What one version of a network changed: the entity whose current record the map must
/// show from that version on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node: added, its endpoints changed, revoked or deleted.
    Node(NodeId),
    /// A workload, by name: added, moved or deleted.
    Workload(String),
    /// The network's policy: set, rolled back or cleared.
    Policy,
}

impl Change {
    fn to_columns(&self) -> (&'static str, String) {
        match self {
            Change::Node(id) => ("node", id.to_string()),
            Change::Workload(name) => ("workload", name.clone()),
            Change::Policy => ("policy", String::new()),
        }
    }

    fn from_columns(kind: &str, reference: &str) -> Result<Change, StoreError> {
        match kind {
            "node" => reference
                .parse()
                .map(Change::Node)
                .map_err(|_| StoreError::Corrupt(format!("changes.ref: node id {reference:?}"))),
            "workload" => Ok(Change::Workload(reference.to_string())),
            "policy" => Ok(Change::Policy),
            other => Err(StoreError::Corrupt(format!("changes.kind: {other:?}"))),
        }
    }
}

/// One row of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// The network's version this change made.
    pub version: u64,
    /// What changed.
    pub change: Change,
}

/// Why the store did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (a name, address or key already taken); the text names it.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The overlay address asked for is taken in its network (by a node or a workload).
    #[error("address {0} is already taken")]
    AddressTaken(Ipv4Addr),
    /// The network's prefix has no free address left.
    #[error("the network has no free address")]
    NetworkFull,
    /// The record the change refers to does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// The join token can no longer be used (revoked, expired or used up) at the moment of use.
    #[error("the join token can no longer be used")]
    TokenUnusable,
    /// A stored value does not parse: the database was edited by hand or is damaged.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database was brought to a schema version this coordinator does not know: a newer
    /// coordinator has used it. Upgrade this one.
    #[error(
        "the database has schema version {found}, newer than this coordinator knows ({known}); \
         upgrade meshlink-coordinator"
    )]
    NewerSchema {
        /// A version found in the database.
        found: i64,
        /// The newest version this coordinator knows.
        known: i64,
    },
    /// The database itself failed (I/O, locking, migrations).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether the database could not be reached at all (down, restarting, unreachable):
    /// nothing was changed, and the same request may succeed once it is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::WorkerCrashed
                ) || matches!(
                    e,
                    // PostgreSQL's "admin shutdown", "cannot connect now" and the like (class 57).
                    sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57"))
                )
            }
            _ => false,
        }
    }
}

/// Which overlay address a new node or workload gets. The store applies the choice inside its
/// write transaction, so that two coordinators sharing it never give one address twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressChoice {
    /// This one ([`StoreError::AddressTaken`] when a node or workload of the network has it).
    Exact(Ipv4Addr),
    /// The lowest free address of this prefix (`meshlink_proto::ipam::allocate_v4`;
    /// [`StoreError::NetworkFull`] when none is left).
    LowestFree(Ipv4Net),
}

/// One overlay network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRecord {
    /// Unique name (`[a-z0-9-]{1,63}`).
    pub name: String,
    /// The overlay prefix nodes get their addresses from.
    pub cidr: Ipv4Net,
    /// Its IPv6 ULA /48, if it has one: every node and workload then also has the IPv6
    /// address [`meshlink_proto::ipam::ipv6_of`] gives.
    pub cidr6: Option<Ipv6Net>,
    /// The version of the network's map; bumped by every change to it, never lowered.
    pub version: u64,
    /// When it was created.
    pub created_at: UnixTime,
}

/// A new network, as [`Store::create_network`] takes it.
#[derive(Debug, Clone)]
pub struct NewNetwork {
    /// Name.
    pub name: String,
    /// Prefix.
    pub cidr: Ipv4Net,
    /// IPv6 prefix (checked: a ULA /48).
    pub cidr6: Option<Ipv6Net>,
    /// Creation time.
    pub created_at: UnixTime,
}

/// One join token. The secret is not here, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Identifier.
    pub id: TokenId,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// The network a node joining with it lands in.
    pub network: String,
    /// Tags given to every node that joins with it.
    pub tags: Vec<String>,
    /// After this time it no longer works; `None`: never expires.
    pub expires_at: Option<UnixTime>,
    /// How many joins it allows; `None`: unlimited.
    pub max_uses: Option<u64>,
    /// How many joins it was used for.
    pub used: u64,
    /// Revoked by an operator.
    pub revoked: bool,
    /// When it was created.
    pub created_at: UnixTime,
}

/// A new join token, as [`Store::create_token`] takes it.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Network.
    pub network: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Expiry.
    pub expires_at: Option<UnixTime>,
    /// Use limit.
    pub max_uses: Option<u64>,
    /// Creation time.
    pub created_at: UnixTime,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Identifier, never reused.
    pub id: NodeId,
    /// The network it belongs to.
    pub network: String,
    /// Name, unique in its network.
    pub name: String,
    /// WireGuard public key.
    pub public_key: PublicKey,
    /// Overlay address, unique in its network; freed only when the node is deleted.
    pub address: Ipv4Addr,
    /// Hex SHA-256 of the node secret.
    pub secret_hash: String,
    /// Labels the agent gave at join.
    pub labels: BTreeMap<String, String>,
    /// Tags of the token it joined with.
    pub tags: Vec<String>,
    /// Endpoints the agent reported, in its order.
    pub endpoints: Vec<SocketAddr>,
    /// The endpoint the coordinator derived from the agent's QUIC source address, when it
    /// differs from the reported ones.
    pub observed: Option<SocketAddr>,
    /// Revoked: refused at authentication and absent from maps.
    pub revoked: bool,
    /// When it joined.
    pub created_at: UnixTime,
    /// When a session of it was last opened or closed.
    pub last_seen: Option<UnixTime>,
    /// Its next WireGuard public key while it rotates: peers accept both. `None`: one key.
    pub next_key: Option<PublicKey>,
    /// When `public_key` became its key: the join, or the end of its last rotation.
    pub key_since: UnixTime,
    /// When a rotation was asked for (by an operator or the network's schedule) that no next
    /// key has answered yet; `None`: none asked.
    pub rotation_asked: Option<UnixTime>,
    /// When it was revoked for not checking in for the configured time (`node_expiry`);
    /// `None`: it did not expire (it may still be revoked by an operator).
    pub expired_at: Option<UnixTime>,
    /// An external node (stock WireGuard, no agent, no session): the node it reaches the mesh
    /// through. `None`: a node with an agent.
    pub via: Option<NodeId>,
    /// Its IPv6 address, when its network has an IPv6 prefix (derived from `address`, never
    /// stored: see [`NodeRecord::with_cidr6`]).
    pub address6: Option<Ipv6Addr>,
}

impl NodeRecord {
    /// With the IPv6 address its network's prefix `cidr6` gives it.
    pub fn with_cidr6(self, cidr6: Option<Ipv6Net>) -> NodeRecord {
        NodeRecord {
            address6: cidr6.map(|c| meshlink_proto::ipam::ipv6_of(c, self.address)),
            ..self
        }
    }
}

/// A new node, as [`Store::insert_node`] takes it.
#[derive(Debug, Clone)]
pub struct NewNode {
    /// Network.
    pub network: String,
    /// Name; `None`: `node-<id>` (with a suffix in the unlikely case that is taken).
    pub name: Option<String>,
    /// Public key.
    pub public_key: PublicKey,
    /// Its overlay address.
    pub address: AddressChoice,
    /// Hex SHA-256 of the node secret.
    pub secret_hash: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Observed endpoint.
    pub observed: Option<SocketAddr>,
    /// Creation time, also the first `last_seen`.
    pub created_at: UnixTime,
    /// An external node's gateway (see [`NodeRecord::via`]); `None`: a node with an agent.
    pub via: Option<NodeId>,
}

/// One workload: an overlay address that belongs to a workload, not to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRecord {
    /// Identifier, never reused.
    pub id: u64,
    /// The network it belongs to.
    pub network: String,
    /// Name, unique in its network.
    pub name: String,
    /// Its overlay address, unique in its network among nodes and workloads.
    pub address: Ipv4Addr,
    /// The node holding it; `None`: detached.
    pub holder: Option<NodeId>,
    /// Bumped by every change of holder.
    pub generation: u64,
    /// The holder before the last change.
    pub previous: Option<NodeId>,
    /// Failover candidates, in order.
    pub standby: Vec<NodeId>,
    /// Nodes that may claim it from their own agent.
    pub allowed: Vec<NodeId>,
    /// Tags, which policies select by.
    pub tags: Vec<String>,
    /// When it was created.
    pub created_at: UnixTime,
    /// When its holder last changed.
    pub moved_at: Option<UnixTime>,
    /// Its IPv6 address, when its network has an IPv6 prefix (derived, never stored).
    pub address6: Option<Ipv6Addr>,
}

impl WorkloadRecord {
    /// With the IPv6 address its network's prefix `cidr6` gives it.
    pub fn with_cidr6(self, cidr6: Option<Ipv6Net>) -> WorkloadRecord {
        WorkloadRecord {
            address6: cidr6.map(|c| meshlink_proto::ipam::ipv6_of(c, self.address)),
            ..self
        }
    }
}

/// The state a planned move was decided on, checked again as it commits
/// ([`Store::set_holder`]): the workload by its id (ids are never reused, so a workload deleted
/// and created again under the same name is another one) at a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The workload's id.
    pub id: u64,
    /// Its generation.
    pub generation: u64,
}

impl WorkloadRecord {
    /// This workload as it is now, for a move decided on it.
    pub fn expected(&self) -> Expected {
        Expected {
            id: self.id,
            generation: self.generation,
        }
    }
}

/// A new workload, as [`Store::create_workload`] takes it.
#[derive(Debug, Clone)]
pub struct NewWorkload {
    /// Network.
    pub network: String,
    /// Name.
    pub name: String,
    /// Its address.
    pub address: AddressChoice,
    /// Failover candidates.
    pub standby: Vec<NodeId>,
    /// Nodes that may claim it.
    pub allowed: Vec<NodeId>,
    /// Tags.
    pub tags: Vec<String>,
    /// Creation time.
    pub created_at: UnixTime,
}

/// One version of a network's policy. Versions are never rewritten: the latest is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    /// The network.
    pub network: String,
    /// The policy's version in its network: 1, 2, ...
    pub version: u64,
    /// The policy file as it was set; `None`: from this version on the network has no
    /// policy (it is open).
    pub source: Option<String>,
    /// Who set it: the name of the admin token used.
    pub author: String,
    /// When.
    pub created_at: UnixTime,
    /// For a rollback, the version whose source it restored.
    pub restored: Option<u64>,
}

/// A new version of a network's policy, as [`Store::put_policy`] takes it.
#[derive(Debug, Clone)]
pub struct NewPolicy {
    /// The network.
    pub network: String,
    /// The policy file, validated by the caller; `None`: no policy.
    pub source: Option<String>,
    /// Who sets it.
    pub author: String,
    /// When.
    pub created_at: UnixTime,
    /// For a rollback, the version restored.
    pub restored: Option<u64>,
}

/// What an admin token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Lists and status.
    Read,
    /// Also moves, attaches, detaches and claims workloads, and join tokens.
    Operator,
    /// Everything: networks, nodes, workloads, policies, tags, admin tokens.
    Admin,
}

impl Role {
    /// The role as stored and shown: `read`, `operator`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?}: read, operator or admin")),
        }
    }
}

/// One admin token besides the bootstrap one. The secret is not here, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRecord {
    /// Identifier, never reused.
    pub id: u64,
    /// Unique name; the audit log names the token by it.
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// What it may do.
    pub role: Role,
    /// The one network it may act on; `None`: every network.
    pub network: Option<String>,
    /// When it was made.
    pub created_at: UnixTime,
    /// Who made it.
    pub created_by: String,
    /// When it was revoked; `None`: it works.
    pub revoked_at: Option<UnixTime>,
}

/// A new admin token, as [`Store::create_admin_token`] takes it.
#[derive(Debug, Clone)]
pub struct NewAdminToken {
    /// Name.
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Role.
    pub role: Role,
    /// Network scope.
    pub network: Option<String>,
    /// Creation time.
    pub created_at: UnixTime,
    /// Who makes it.
    pub created_by: String,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Identifier, in order of recording.
    pub id: u64,
    /// When.
    pub at: UnixTime,
    /// Who: `admin:NAME`, `node:NAME` or `unauthenticated`.
    pub actor: String,
    /// What: `POST /v1/workloads/chat/move`, `claim chat`, ...
    pub action: String,
    /// The network concerned, when known.
    pub network: Option<String>,
    /// The node concerned, as the request named it, when there is one.
    pub node: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The outcome in one line.
    pub result: String,
    /// The client's address.
    pub source: Option<String>,
}

/// Which audit entries [`Store::audit`] returns: the newest `limit` matching, oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only entries at or after this time.
    pub since: Option<UnixTime>,
    /// Only entries concerning this node (as named) or made by it.
    pub node: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// Durable state of the coordinator. Every method is atomic. Methods that change a network's
/// map return the network's new version.
///
/// # Errors
/// Every method fails with [`StoreError::Database`] when the database does; the others are
/// named per method.
pub trait Store: Send + Sync {
    /// Adds a network at version 0. [`StoreError::Conflict`] when the name is taken.
    fn create_network(&self, network: NewNetwork) -> StoreFuture<'_, NetworkRecord>;

    /// Every network, by name.
    fn networks(&self) -> StoreFuture<'_, Vec<NetworkRecord>>;

    /// One network.
    fn network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<NetworkRecord>>;

    /// Adds a join token. [`StoreError::NotFound`] when the network does not exist.
    fn create_token(&self, token: NewToken) -> StoreFuture<'_, TokenRecord>;

    /// Every join token, by id.
    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>>;

    /// The token with this secret hash.
    fn token_by_hash<'a>(&'a self, secret_hash: &'a str) -> StoreFuture<'a, Option<TokenRecord>>;

    /// Marks a token revoked. `false` when no such token exists.
    fn revoke_token(&self, id: TokenId) -> StoreFuture<'_, bool>;

    /// Adds a node and bumps its network's version; with `token`, also counts one use of that
    /// token, refusing with [`StoreError::TokenUnusable`] when at `now` it is revoked, expired
    /// or used up. [`StoreError::Conflict`] when the name, address or public key is taken.
    fn insert_node(
        &self,
        node: NewNode,
        token: Option<(TokenId, UnixTime)>,
    ) -> StoreFuture<'_, (NodeRecord, u64)>;

    /// Every node, or those of one network, by id.
    fn nodes<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<NodeRecord>>;

    /// One node.
    fn node(&self, id: NodeId) -> StoreFuture<'_, Option<NodeRecord>>;

    /// The nodes with this name, in any network, by id.
    fn nodes_named<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<NodeRecord>>;

    /// The node of a network with this public key, as its key or its next key.
    fn node_with_key<'a>(
        &'a self,
        network: &'a str,
        key: &'a PublicKey,
    ) -> StoreFuture<'a, Option<NodeRecord>>;

    /// Replaces a node's endpoints and bumps its network's version.
    /// [`StoreError::NotFound`] when the node does not exist.
    fn set_endpoints(
        &self,
        id: NodeId,
        endpoints: Vec<SocketAddr>,
        observed: Option<SocketAddr>,
    ) -> StoreFuture<'_, u64>;

    /// Records that a node was seen at `now`. Does not change any map.
    fn touch_node(&self, id: NodeId, now: UnixTime) -> StoreFuture<'_, ()>;

    /// Marks a node revoked and bumps its network's version.
    /// [`StoreError::NotFound`] when the node does not exist.
    fn revoke_node(&self, id: NodeId) -> StoreFuture<'_, u64>;

    /// Deletes a node, freeing its name and address. With `bump`, also bumps its network's
    /// version and returns the new one. [`StoreError::NotFound`] when the node does not exist.
    fn delete_node(&self, id: NodeId, bump: bool) -> StoreFuture<'_, Option<u64>>;

    /// Adds a workload (detached, generation 0) and bumps its network's version.
    /// [`StoreError::Conflict`] when the name or address is taken (by a workload or a node),
    /// [`StoreError::NotFound`] when the network does not exist.
    fn create_workload(&self, w: NewWorkload) -> StoreFuture<'_, (WorkloadRecord, u64)>;

    /// Every workload, or those of one network, by id.
    fn workloads<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<WorkloadRecord>>;

    /// One workload of a network, by name.
    fn workload<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
    ) -> StoreFuture<'a, Option<WorkloadRecord>>;

    /// Gives a workload to `holder` (`None`: detaches it) at generation `expected.generation +
    /// 1`, only if it is still the workload `expected.id` at that generation (fencing: two
    /// racing moves cannot both win, nor a move planned on a workload since deleted and created
    /// again under its name); the old holder becomes `previous`. Bumps the network's version.
    /// [`StoreError::Conflict`] when the generation moved on or the workload is another one,
    /// [`StoreError::NotFound`] when no workload has the name.
    fn set_holder<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        holder: Option<NodeId>,
        expected: Expected,
        now: UnixTime,
    ) -> StoreFuture<'a, (WorkloadRecord, u64)>;

    /// The change log of a network after version `after`, oldest first, at most `limit`
    /// rows. Only the last [`CHANGES_KEPT`] versions are kept: when the first row returned is
    /// not `after + 1`, the versions between are gone and the caller reloads the whole map.
    fn changes_since<'a>(
        &'a self,
        network: &'a str,
        after: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<ChangeRecord>>;

    /// Deletes a workload and bumps its network's version. [`StoreError::NotFound`] when it
    /// does not exist.
    fn delete_workload<'a>(&'a self, network: &'a str, name: &'a str) -> StoreFuture<'a, u64>;

    /// Replaces a node's tags and bumps its network's version. [`StoreError::NotFound`] when
    /// the node does not exist.
    fn set_node_tags(&self, id: NodeId, tags: Vec<String>) -> StoreFuture<'_, u64>;

    /// Replaces a workload's tags and bumps its network's version. [`StoreError::NotFound`]
    /// when the workload does not exist.
    fn set_workload_tags<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        tags: Vec<String>,
    ) -> StoreFuture<'a, u64>;

    /// Adds the next version of a network's policy and bumps the network's version.
    /// [`StoreError::NotFound`] when the network does not exist.
    fn put_policy(&self, policy: NewPolicy) -> StoreFuture<'_, (PolicyRecord, u64)>;

    /// Every version of a network's policy, oldest first (the last is in force).
    fn policies<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Vec<PolicyRecord>>;

    /// The version of a network's policy in force, if it ever had one.
    fn policy<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Option<PolicyRecord>>;

    /// Adds an admin token. [`StoreError::Conflict`] when the name is taken.
    fn create_admin_token(&self, token: NewAdminToken) -> StoreFuture<'_, AdminTokenRecord>;

    /// Every admin token, revoked ones too, by id.
    fn admin_tokens(&self) -> StoreFuture<'_, Vec<AdminTokenRecord>>;

    /// The admin token with this secret hash, revoked or not.
    fn admin_token_by_hash<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, Option<AdminTokenRecord>>;

    /// Revokes an admin token at `now`. `false` when no such token exists or it already was.
    fn revoke_admin_token(&self, id: u64, now: UnixTime) -> StoreFuture<'_, bool>;

    /// Appends an entry to the audit log (its `id` is ignored).
    fn record_audit(&self, entry: AuditRecord) -> StoreFuture<'_, ()>;

    /// Audit entries, see [`AuditQuery`].
    fn audit(&self, query: AuditQuery) -> StoreFuture<'_, Vec<AuditRecord>>;

    /// Deletes audit entries older than `before`, and the oldest beyond `keep` entries;
    /// returns how many went.
    fn prune_audit(&self, before: UnixTime, keep: u64) -> StoreFuture<'_, u64>;

    /// Records that node `id` is asked to rotate its key since `at` (`None`: no longer
    /// asked). Changes no map. `false` when the node does not exist.
    fn ask_rotation(&self, id: NodeId, at: Option<UnixTime>) -> StoreFuture<'_, bool>;

    /// Stores `key` as node `id`'s next key, ends its request for a rotation and bumps its
    /// network's version. [`StoreError::Conflict`] when a node of the network has `key` as its
    /// key or next key (the node itself as its key included); [`StoreError::NotFound`] when
    /// the node does not exist or is revoked.
    fn set_next_key(&self, id: NodeId, key: PublicKey) -> StoreFuture<'_, u64>;

    /// Makes `key`, node `id`'s next key, its only key from `now` on and bumps its network's
    /// version; `None` (nothing changed) when `key` is not its next key.
    fn promote_next_key(
        &self,
        id: NodeId,
        key: PublicKey,
        now: UnixTime,
    ) -> StoreFuture<'_, Option<u64>>;

    /// Revokes node `id` as expired at `now` and bumps its network's version; `None`
    /// (nothing changed) when it is revoked already or does not exist, or when it was seen at
    /// or after `seen_before` (a session came up meanwhile).
    fn expire_node(
        &self,
        id: NodeId,
        now: UnixTime,
        seen_before: UnixTime,
    ) -> StoreFuture<'_, Option<u64>>;
}
