//! What both ends of the WireGuard cross-platform userspace API share: the socket an interface is
//! served on, which interface names may name one, the framing limits, the `errno=N` lines that
//! end every response, and one blocking client for a request/response exchange.
//!
//! The server (`meshlink_agent::uapi`) and its users (`meshlink-agent status`, the wg-quick hook,
//! `meshctl workload claim`) all take these from here, so a socket path, a name check or a limit
//! has one definition. Nothing here touches the socket directory's permissions or needs an async
//! runtime; that stays with the server.
//!
//! # Framing
//!
//! A request is `key=value` lines ending with an empty line; its first line names the operation.
//! A response is lines ending with `errno=N` and an empty line, where `N` is 0 on success and
//! otherwise an `errno.h` value, sent negated (`errno=-22`) by wireguard-go and meshlink.
//! See <https://www.wireguard.com/xplatform/>.

mod client;
pub mod handover;
mod interface;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

use std::path::{Path, PathBuf};

pub use client::{Client, ClientError, Response};
pub use interface::{
    check_interface_name, parse_interface_name, InterfaceNameError, MAX_INTERFACE_LEN,
};

/// The directory of userspace API sockets where `wg(8)` looks for them.
pub const DEFAULT_DIR: &str = "/var/run/wireguard";

/// The largest request a server accepts, in bytes (all lines, newlines included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The longest request line a server accepts, in bytes, newline excluded.
pub const MAX_LINE_BYTES: usize = 4096;
/// The largest response a [`Client`] accepts by default, in bytes: `get=1` on a device with
/// a hundred thousand peers is about 40 MiB.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The socket of the userspace API serving `interface`: `dir/INTERFACE.sock`.
///
/// `interface` should have passed [`check_interface_name`]; a name with `/` would point
/// elsewhere.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

/// The end of a response: `errno=0`, or `errno=-N` for the positive errno `N`, then the empty
/// line.
pub fn errno_response(errno: i32) -> String {
    if errno == 0 {
        "errno=0\n\n".to_string()
    } else {
        format!("errno=-{}\n\n", errno.unsigned_abs())
    }
}

/// The positive errno of a response's last `errno=N` line (0 for success), if it has one.
/// Both `errno=-22` (wireguard-go and meshlink) and `errno=22` read as 22.
pub fn response_errno(response: &str) -> Option<i32> {
    response
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|n| n.parse::<i32>().ok())
        .and_then(i32::checked_abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_named_after_the_interface() {
        assert_eq!(
            socket_path(Path::new(DEFAULT_DIR), "mesh0"),
            Path::new("/var/run/wireguard/mesh0.sock")
        );
        assert_eq!(
            socket_path(Path::new("run/uapi"), "wg-test.0"),
            Path::new("run/uapi/wg-test.0.sock")
        );
    }

    #[test]
    fn errno_lines() {
        assert_eq!(errno_response(0), "errno=0\n\n");
        assert_eq!(errno_response(22), "errno=-22\n\n");
        assert_eq!(
            errno_response(-22),
            "errno=-22\n\n",
            "a negated errno is not doubled"
        );
        assert_eq!(response_errno(&errno_response(71)), Some(71));
    }

    #[test]
    fn response_errno_parses() {
        assert_eq!(response_errno("a=1\nerrno=0\n\n"), Some(0));
        assert_eq!(response_errno("errno=22\n\n"), Some(22));
        assert_eq!(response_errno("errno=-22\n\n"), Some(22));
        assert_eq!(response_errno("nothing\n"), None);
        assert_eq!(
            response_errno("errno=-2147483648\n\n"),
            None,
            "no positive value"
        );
    }
}
