//! meshlink's pure core: the types and logic that the agent, the coordinator and `meshctl`
//! share: keys, network maps and their deltas, the control protocol and its framing, join
//! tokens, address allocation.
//!
//! Architecture invariant: this crate does no I/O. It has no tokio, no sockets, no clock, no
//! filesystem and no random-number reads; callers pass those in.

pub mod agent_session;
pub mod control;
pub mod disco;
pub mod ipam;
pub mod key;
pub mod key_rotation;
pub mod netmap;
pub mod policy;
pub mod reconnect;
pub mod relay;
pub mod session_map;
pub mod token;
pub mod toml_error;
pub mod workload;

pub use key::{Key, KeyError, PublicKey};
pub use netmap::{DeltaError, Gap, Netmap, NetmapDelta, NodeId, PeerInfo, PolicyChange};
pub use policy::Policy;
pub use workload::WorkloadInfo;
