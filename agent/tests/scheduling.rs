//! `MESHLINK_SCHEDULING`: a value other than `realtime` or `normal` stops the real binary with
//! one line naming the variable, before anything is set up.

use std::process::Command;

#[test]
fn an_unknown_scheduling_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("ml-scheduling-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_meshlink-agent"))
        .args(["up", "--config"])
        .arg(dir.join("agent.toml"))
        .env_remove("MESHLINK_LOG_FORMAT")
        .env("MESHLINK_SCHEDULING", "fifo")
        .output()
        .expect("the agent binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 log");
    assert_eq!(
        stderr.trim(),
        "meshlink-agent: MESHLINK_SCHEDULING: \"fifo\" is not a scheduling (realtime or normal)"
    );
}
