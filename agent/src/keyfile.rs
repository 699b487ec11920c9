//! Key files: reading and writing the private and preshared keys that live on disk.
//!
//! A key file holds one key as base64 text (44 characters) followed by a newline, exactly as
//! `wg genkey > FILE` writes it. Because it is a secret, a key file is refused when its mode
//! grants any permission to group or others: it must be `0600` or stricter (`0400` is fine).
//! The check is made on the opened file, so the file that is checked is the file that is read.
//!
//! Errors always name the file and never echo its content.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use meshlink_proto::{Key, KeyError};

use crate::settings::PrivateKey;

/// The most a key file may hold: one key, generous room for whitespace around it.
const KEY_FILE_LIMIT: u64 = 4096;

/// Permission bits for group and others; none may be set on a secret file.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Why a key file cannot be read or written. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// The file grants some permission to group or others.
    #[error(
        "{path} has mode {mode:04o}, which lets group or others access a secret; \
         run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// The path names a directory, device or other non-regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is much larger than any file it could be.
    #[error("{path} is larger than {limit} bytes, too large for what it should hold")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The size limit in bytes.
        limit: u64,
    },
    /// The content is not one base64 key of 32 bytes. The content itself is not reported.
    #[error("{path} does not hold one base64 WireGuard key: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with the content.
        #[source]
        reason: KeyError,
    },
    /// Writing refused: a file already exists at the path, and it may hold a key in use.
    #[error("{path} already exists; refusing to overwrite a key file (remove it first)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
}

/// Reads a private key from `path`, a file of mode `0600` or stricter holding one base64 key.
///
/// # Errors
/// [`KeyFileError`] when the file cannot be read, grants access to group or others, or does
/// not hold exactly one base64 key of 32 bytes (surrounding whitespace is allowed).
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    read_key(path).map(|key| PrivateKey::from_bytes(key.0))
}

/// Reads a preshared key from `path`, under the same rules as [`read_private_key`].
///
/// # Errors
/// [`KeyFileError`] as for [`read_private_key`].
pub fn read_preshared_key(path: &Path) -> Result<Key, KeyFileError> {
    read_key(path)
}

/// Writes `key` to a new file at `path` as base64 and a newline, with mode `0600`.
///
/// The key is written to a temporary file in the same directory, created with mode `0600`
/// from the start (so there is no moment when it is readable by others), flushed to disk,
/// and then linked into place. Readers see either no file or the whole key. An existing
/// file at `path` is never overwritten.
///
/// # Errors
/// [`KeyFileError::Exists`] when `path` exists; [`KeyFileError::Write`] when the file
/// cannot be created or written.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    let write_err = |source: io::Error| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        return Err(KeyFileError::Exists {
            path: path.to_path_buf(),
        });
    }
    let tmp = temporary_sibling(path).map_err(write_err)?;
    let result = write_new_file(&tmp, format!("{}\n", key.to_key().to_base64()).as_bytes())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    // The temporary name goes away whether or not the link succeeded.
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(KeyFileError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(write_err(e)),
    }
}

/// Reads a whole secret file of at most `limit` bytes, after checking that it is a regular
/// file with no permission for group or others. Used for key files and wg-quick files.
pub(crate) fn read_secret_file(path: &Path, limit: u64) -> Result<Vec<u8>, KeyFileError> {
    let read_err = |source: io::Error| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(KeyFileError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

/// Reads and parses one key file.
fn read_key(path: &Path) -> Result<Key, KeyFileError> {
    let bytes = read_secret_file(path, KEY_FILE_LIMIT)?;
    let malformed = |reason: KeyError| KeyFileError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    // Non-UTF-8 content cannot be base64 either.
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed(KeyError::NotBase64))?;
    Key::from_base64(text).map_err(malformed)
}

/// Creates `path` (which must not exist) with mode 0600, writes `content` and syncs it.
fn write_new_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// A fresh name next to `path` for a temporary file: `.NAME.PID.N.tmp`.
fn temporary_sibling(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Helpers for tests of this crate: a temporary directory removed on drop, and secret files.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A fresh directory under the system temporary directory, removed (with its content)
    /// when dropped.
    pub(crate) struct TempDir(tempfile::TempDir);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            let dir = tempfile::Builder::new()
                .prefix(&format!("meshlink-test-{tag}-"))
                .tempdir()
                .expect("create temporary directory");
            TempDir(dir)
        }

        /// The directory itself.
        pub(crate) fn dir(&self) -> &Path {
            self.0.path()
        }

        /// `name` inside it.
        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
    }

    /// Writes `content` to `path` and sets its mode to `mode`.
    pub(crate) fn write_with_mode(path: &Path, content: &str, mode: u32) {
        std::fs::write(path, content).expect("write test file");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .expect("chmod test file");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{write_with_mode, TempDir};
    use super::*;

    const SAMPLE: &str = "DiXZd2cIPaM8KhyhuH4uMDVB2qAYwGNXfqRltJgMUZo=";

    #[test]
    fn accepts_0600_and_0400() {
        let dir = TempDir::new("keyfile");
        for mode in [0o600, 0o400] {
            let path = dir.path(&format!("key-{mode:o}"));
            write_with_mode(&path, &format!("  {SAMPLE}\n\n"), mode);
            let key = read_private_key(&path).expect("key accepted");
            let sample = Key::from_base64(SAMPLE).expect("sample key");
            assert_eq!(key, PrivateKey::from_bytes(sample.0));
            assert_eq!(
                read_preshared_key(&path).expect("psk accepted"),
                Key::from_base64(SAMPLE).expect("sample key")
            );
        }
    }

    #[test]
    fn refuses_group_or_other_access() {
        let dir = TempDir::new("keyfile");
        for mode in [0o644, 0o640, 0o604, 0o610] {
            let path = dir.path("key");
            write_with_mode(&path, SAMPLE, mode);
            let err = read_private_key(&path).expect_err("mode refused");
            assert!(matches!(err, KeyFileError::Permissions { mode: m, .. } if m == mode));
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(read_preshared_key(&path).is_err());
        }
    }

    #[test]
    fn refuses_malformed_without_echoing() {
        let dir = TempDir::new("keyfile");
        let path = dir.path("key");
        for content in [
            "secretsecretsecret",
            "AAAA",
            "",
            &format!("{SAMPLE}\n{SAMPLE}\n"),
        ] {
            write_with_mode(&path, content, 0o600);
            let err = read_private_key(&path).expect_err("malformed refused");
            assert!(matches!(err, KeyFileError::Malformed { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(content.is_empty() || !msg.contains(content), "{msg}");
        }
        std::fs::write(&path, [0xff, 0xfe, 0x00]).expect("write");
        assert!(matches!(
            read_private_key(&path),
            Err(KeyFileError::Malformed { .. })
        ));
    }

    #[test]
    fn missing_file_names_file_and_reason() {
        let dir = TempDir::new("keyfile");
        let path = dir.path("absent.key");
        let msg = read_private_key(&path).expect_err("missing").to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        let msg = read_private_key(dir.dir())
            .expect_err("directory")
            .to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    #[test]
    fn refuses_huge_file() {
        let dir = TempDir::new("keyfile");
        let path = dir.path("big");
        write_with_mode(&path, &" ".repeat(10_000), 0o600);
        assert!(matches!(
            read_private_key(&path),
            Err(KeyFileError::TooLarge { .. })
        ));
    }

    #[test]
    fn write_then_read_round_trip() {
        let dir = TempDir::new("keyfile");
        let path = dir.path("private.key");
        let key = PrivateKey::generate();
        write_private_key(&path, &key).expect("written");
        let meta = std::fs::metadata(&path).expect("exists");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{}\n", key.to_key().to_base64()));
        // Reading clamps the scalar, which `generate` may not have done: compare clamped forms.
        let back = read_private_key(&path).expect("read back");
        assert_eq!(back, PrivateKey::from_bytes(key.to_key().0));
        assert_eq!(back.public_key(), key.public_key());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.dir())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("private.key")]);
    }

    #[test]
    fn write_refuses_to_overwrite() {
        let dir = TempDir::new("keyfile");
        let path = dir.path("private.key");
        write_with_mode(&path, SAMPLE, 0o600);
        let err = write_private_key(&path, &PrivateKey::generate()).expect_err("exists");
        assert!(matches!(err, KeyFileError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), SAMPLE);
        let err = write_private_key(&dir.path("no/such/dir/key"), &PrivateKey::generate())
            .expect_err("no directory");
        assert!(matches!(err, KeyFileError::Write { .. }), "{err}");
    }
}
