//! Key files (in progress).
