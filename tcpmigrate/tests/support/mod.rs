//! What the loopback tests share.

/// Whether the tests run as root (TCP repair mode needs it). Without root a test fails
/// under `CI=true` and is skipped otherwise, saying so.
pub fn root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("1");
    if euid == "0" {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "TCP repair mode needs root, and CI forbids skipping"
    );
    eprintln!("skipped: TCP repair mode needs root");
    false
}
