//! WireGuard userspace API (in progress).
