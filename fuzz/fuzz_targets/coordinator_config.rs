//! Coordinator configuration: `meshlink_coordinator::config::load`, which reads the TOML file
//! and merges flags and environment variables (`Overrides`, as clap gives them), and the value
//! parsers it uses (`StoreLocation::parse`, `ReflectListen::parse`, `validate_advertise`).
//!
//! Input: `overrides set | values | file`: the file is written to a scratch directory and
//! loaded with overrides chosen from small menus of good and bad values.
//!
//! Checked: settings that load are valid as `Settings` documents them (admin API on loopback
//! unless insecure is asked for, limits at least 1, lease and grace within range, addresses in
//! the form `validate_advertise` gives, which it gives back unchanged); every error is one
//! line; a store URL's password is never in its redacted form.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlink_coordinator::config::{load, validate_advertise, Overrides, StoreLocation};

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| meshlink_fuzz::scratch_dir("coordinator-config"))
}

fuzz_target!(|data: &[u8]| {
    let [set, values, file @ ..] = data else {
        return;
    };
    let path = dir().join("coordinator.toml");
    meshlink_fuzz::write_private(&path, file);
    let o = |bit: u8| set & (1 << bit) != 0;
    let v = |bit: u8| values & (1 << bit) != 0;
    let over = Overrides {
        state_dir: o(0).then(|| PathBuf::from(if v(0) { "state" } else { "" })),
        listen: o(1).then(|| {
            if v(1) { "127.0.0.1:65535" } else { "[::]:0" }
                .parse()
                .unwrap()
        }),
        admin_listen: o(2).then(|| {
            if v(2) { "0.0.0.0:7444" } else { "[::1]:7444" }
                .parse()
                .unwrap()
        }),
        admin_insecure: o(3).then_some(v(3)),
        advertise: o(4).then(|| {
            if v(4) {
                "c.example:7443"
            } else {
                "c.example:0"
            }
            .to_string()
        }),
        coordinators: o(5).then(|| if v(5) { "a:1,,[::1]:2" } else { "a:1,b" }.to_string()),
        store: o(6).then(|| {
            if v(6) {
                "postgres://u:pw@db/m"
            } else {
                "mysql://x"
            }
            .to_string()
        }),
        relay: o(7).then(|| if v(7) { "On" } else { "maybe" }.to_string()),
        ..Overrides::default()
    };
    match load(Some(&path), over) {
        Ok(s) => {
            assert!(!s.state_dir.as_os_str().is_empty());
            assert!(s.limits.message_rate >= 1 && s.limits.message_burst >= 1);
            assert!(s.limits.session_queue >= 1 && s.limits.max_connections >= 1);
            assert!(s.limits.relay_rate >= 1);
            assert!(s.limits.hello_timeout.as_secs() >= 1);
            assert!(s.limits.idle_timeout.as_secs() >= 3);
            for d in [s.limits.workload_lease, s.limits.workload_grace] {
                assert!((100..=600_000).contains(&d.as_millis()));
            }
            for a in s.advertise.iter().chain(&s.coordinators) {
                assert_eq!(validate_advertise(a).as_deref(), Ok(a.as_str()));
            }
            check_store(&s.store);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.contains('\n'),
                "an error of more than one line: {message:?}"
            );
        }
    }
    // The value parsers on their own, on the file's text.
    let text = String::from_utf8_lossy(file);
    if let Ok(store) = StoreLocation::parse(&text) {
        check_store(&store);
    }
    if let Ok(a) = validate_advertise(&text) {
        assert_eq!(validate_advertise(&a).as_deref(), Ok(a.as_str()));
    }
    let _ = meshlink_coordinator::config::ReflectListen::parse(&text);
});

/// The redacted form of a store URL holds no password given in its user part.
fn check_store(store: &StoreLocation) {
    let shown = store.redacted();
    let StoreLocation::Postgres(url) = store else {
        return;
    };
    let authority = |u: &str| -> Option<String> {
        let (_, rest) = u.split_once("://")?;
        Some(rest.split('/').next().unwrap_or("").to_string())
    };
    let Some(authority) = authority(url) else {
        return;
    };
    if let Some((userinfo, host)) = authority.rsplit_once('@') {
        if let Some((user, _)) = userinfo.split_once(':') {
            assert_eq!(
                authority_of(&shown),
                format!("{user}:***@{host}"),
                "a password shown in {shown:?}"
            );
        }
    }
}

fn authority_of(url: &str) -> String {
    url.split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or("").to_string())
        .unwrap_or_default()
}
