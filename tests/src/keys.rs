//! WireGuard keys for test hosts, made by the stock `wg` tool so that they are independent of
//! the code under test.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// A Curve25519 key pair in WireGuard's base64 form.
#[derive(Clone, PartialEq, Eq)]
pub struct Keypair {
    /// The private key, base64.
    pub private: String,
    /// The public key, base64.
    pub public: String,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Test keys are throwaway, but a habit of never printing private keys is cheap.
        write!(f, "Keypair(public {})", self.public)
    }
}

impl Keypair {
    /// A fresh pair from `wg genkey` and `wg pubkey`.
    ///
    /// # Panics
    /// When `wg` is missing or fails.
    pub fn generate() -> Keypair {
        let private = wg(&["genkey"], None);
        let public = wg(&["pubkey"], Some(&private));
        Keypair { private, public }
    }

    /// Writes the private key to `path` with mode 0600.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_private(&self, path: &Path) {
        write_secret(path, &format!("{}\n", self.private));
    }
}

/// A fresh preshared key from `wg genpsk`.
///
/// # Panics
/// When `wg` is missing or fails.
pub fn preshared_key() -> String {
    wg(&["genpsk"], None)
}

/// Writes `contents` to a new file at `path` created with mode 0600 (replacing any old file),
/// as key files must be.
///
/// # Panics
/// When the file cannot be written.
pub fn write_secret(path: &Path, contents: &str) {
    let _ = std::fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs `wg ARGS`, feeding `stdin`, and returns its trimmed stdout.
fn wg(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run wg (apt-get install wireguard-tools): {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to wg");
    }
    drop(input);
    let output = child.wait_with_output().expect("wait for wg");
    assert!(
        output.status.success(),
        "wg {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("wg prints ASCII")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("ml-secret-test-{}", std::process::id()));
        write_secret(&path, "x\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mode & 0o777, 0o600);
    }
}
