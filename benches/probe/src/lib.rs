//! `meshlink-probe`: the data-plane side of the workload-move benchmark. A steady UDP probe
//! (one datagram per millisecond, say) goes to a workload address while the address moves
//! between VMs; an echo responder on each VM answers with its name. The per-probe records
//! tell how many probes each move lost and when the new holder first answered.
//!
//! - [`wire`]: the datagrams.
//! - [`echo`]: the responder.
//! - [`prober`]: the sender and its records.
//!
//! `main.rs` parses arguments, handles signals and writes the output.

pub mod echo;
pub mod prober;
pub mod wire;
