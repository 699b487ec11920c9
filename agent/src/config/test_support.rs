//! Helpers shared by the configuration tests: keys, a resolver without DNS, environments,
//! and a directory holding a key file and the configuration files a test writes.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use meshlink_proto::{Key, PublicKey};

use super::{load_with, ConfigError, Overrides};
use crate::keyfile::test_support::{write_with_mode, TempDir};
use crate::settings::{PrivateKey, Settings};

/// Base64 of 32 bytes of `b`.
pub(super) fn b64(b: u8) -> String {
    Key([b; 32]).to_base64()
}

/// A peer public key derived from a private key made of `b` bytes.
pub(super) fn pubkey(b: u8) -> PublicKey {
    PrivateKey::from_bytes([b; 32]).public_key()
}

/// Resolves `peer.example` to 192.0.2.7 and refuses every other name, without DNS.
pub(super) fn fake_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    match host {
        "peer.example" => Ok(vec![SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(192, 0, 2, 7),
            port,
        ))]),
        "empty.example" => Ok(Vec::new()),
        _ => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
    }
}

pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

/// A temporary directory with a private key file `private.key` (key of bytes 1).
pub(super) struct Fixture {
    pub(super) dir: TempDir,
    pub(super) key_path: PathBuf,
}

impl Fixture {
    pub(super) fn new() -> Fixture {
        let dir = TempDir::new("config");
        let key_path = dir.path("private.key");
        write_with_mode(&key_path, &b64(1), 0o600);
        Fixture { dir, key_path }
    }

    pub(super) fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.dir.path(name);
        write_with_mode(&path, text, mode);
        path
    }

    /// Loads a TOML file whose text may use `KEY` for the key file path.
    pub(super) fn toml(
        &self,
        text: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let text = text.replace("KEY", &self.key_path.display().to_string());
        let path = self.write("agent.toml", &text, 0o644);
        load_with(Some(&path), None, overrides, env, &fake_resolve)
    }

    pub(super) fn toml_err(&self, text: &str) -> String {
        self.toml(text, &Overrides::default(), &no_env)
            .expect_err("configuration refused")
            .to_string()
    }

    pub(super) fn wg(&self, name: &str, text: &str) -> Result<Settings, ConfigError> {
        let path = self.write(name, text, 0o600);
        load_with(
            None,
            Some(&path),
            &Overrides::default(),
            &no_env,
            &fake_resolve,
        )
    }
}
