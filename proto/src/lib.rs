//! meshlink's pure core: the types and logic that the agent and the coordinator share.
//!
//! Architecture invariant: this crate does no I/O. It has no tokio, no sockets, no clock, no
//! filesystem and no random-number reads; callers pass those in.

pub mod key;

pub use key::{Key, KeyError, PublicKey};
