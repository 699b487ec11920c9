//! The token bucket, shared with the relays (`meshlink_relay::ratelimit`): the per-session cap
//! on messages from an agent, the relay's per-node cap on bytes and the reflexive address
//! responder's per-source cap on answers.

pub use meshlink_relay::ratelimit::TokenBucket;
