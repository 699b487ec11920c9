//! Operating-system effects: the TUN device, the UDP socket, netlink and thread priority.
//!
//! Everything that talks to the kernel lives here, behind small types that the I/O loops in
//! `crate::run` drive; the pure decisions (which routes to add or remove) are plain functions
//! tested without a kernel.

pub mod netlink;
pub mod sched;
pub mod sysctl;
pub mod tun;
pub mod udp;
