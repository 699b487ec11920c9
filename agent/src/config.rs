//! Configuration loading (in progress).
