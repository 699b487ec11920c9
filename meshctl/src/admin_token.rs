//! The admin token: the bearer secret that every admin request carries.
//!
//! It comes either inline (`--admin-token`, `MESHLINK_ADMIN_TOKEN`) or, preferably, from a file
//! (`--admin-token-file`, `MESHLINK_ADMIN_TOKEN_FILE`). Surrounding whitespace is ignored, so a
//! file written by `echo TOKEN > FILE` works. A token must be printable ASCII without spaces,
//! because it travels in an HTTP header.
//!
//! # Security
//!
//! A token file is refused when its mode grants any permission to group or others, exactly as
//! the agent treats its key files: it must be `0600` or stricter. The check is made on the
//! opened file, so the file that is checked is the file that is read. `Debug` never shows the
//! token and no error message echoes it.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The most a token file may hold; real tokens are well under a hundred bytes.
const TOKEN_FILE_LIMIT: u64 = 4096;

/// Permission bits for group and others; none may be set on a secret file.
const GROUP_OTHER_BITS: u32 = 0o077;

/// An admin token that is safe to put in an `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Checks a token given inline; `origin` names where it came from for error messages
    /// (for example `--admin-token`).
    ///
    /// # Errors
    ///
    /// [`AdminTokenError::Empty`] or [`AdminTokenError::Malformed`].
    pub fn new(text: &str, origin: &str) -> Result<Self, AdminTokenError> {
        let token = text.trim();
        if token.is_empty() {
            return Err(AdminTokenError::Empty {
                origin: origin.to_owned(),
            });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AdminTokenError::Malformed {
                origin: origin.to_owned(),
            });
        }
        Ok(Self(token.to_owned()))
    }

    /// Reads a token from a file that only its owner may access.
    ///
    /// # Errors
    ///
    /// Any [`AdminTokenError`]; every one names the file.
    pub fn from_file(path: &Path) -> Result<Self, AdminTokenError> {
        let read_error = |source: io::Error| AdminTokenError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(AdminTokenError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(AdminTokenError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        file.take(TOKEN_FILE_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > TOKEN_FILE_LIMIT {
            return Err(AdminTokenError::TooLarge {
                path: path.to_owned(),
                limit: TOKEN_FILE_LIMIT,
            });
        }
        let origin = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| AdminTokenError::Malformed {
            origin: origin.clone(),
        })?;
        Self::new(&text, &origin)
    }

    /// The token text, for the `Authorization` header and nothing else.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why no usable admin token could be had. Every message names where the token came from and
/// none contains the token.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The token file cannot be opened or read.
    #[error("cannot read the admin token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// The token file grants some permission to group or others.
    #[error(
        "the admin token file {path} has mode {mode:04o}, which lets group or others read a \
         secret; run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path names a directory, device or other non-regular file.
    #[error("the admin token file {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is far larger than a token.
    #[error("the admin token file {path} is larger than {limit} bytes; it cannot be a token")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The size limit in bytes.
        limit: u64,
    },
    /// The token is empty or only whitespace.
    #[error("the admin token from {origin} is empty")]
    Empty {
        /// Where the token came from: a flag name or a file.
        origin: String,
    },
    /// The token holds spaces, control characters or non-ASCII text.
    #[error(
        "the admin token from {origin} is malformed: it must be printable ASCII without spaces"
    )]
    Malformed {
        /// Where the token came from: a flag name or a file.
        origin: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_file(name: &str, content: &str, mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshctl-token-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn inline_token_is_trimmed_and_checked() {
        let token = AdminToken::new("  secret-123\n", "--admin-token").unwrap();
        assert_eq!(token.secret(), "secret-123");
        assert!(matches!(
            AdminToken::new(" \n", "--admin-token"),
            Err(AdminTokenError::Empty { .. })
        ));
        assert!(matches!(
            AdminToken::new("two words", "--admin-token"),
            Err(AdminTokenError::Malformed { .. })
        ));
    }

    #[test]
    fn debug_hides_the_token() {
        let token = AdminToken::new("hunter2", "test").unwrap();
        assert!(!format!("{token:?}").contains("hunter2"));
    }

    #[test]
    fn private_file_is_read() {
        let path = temp_file("private", "file-token\n", 0o600);
        assert_eq!(AdminToken::from_file(&path).unwrap().secret(), "file-token");
        let path = temp_file("read-only", "ro-token", 0o400);
        assert_eq!(AdminToken::from_file(&path).unwrap().secret(), "ro-token");
    }

    #[test]
    fn group_or_world_readable_file_is_refused() {
        for mode in [0o640, 0o604, 0o660] {
            let path = temp_file(&format!("open-{mode:o}"), "leaky", mode);
            let err = AdminToken::from_file(&path).unwrap_err();
            assert!(
                matches!(err, AdminTokenError::Permissions { .. }),
                "{mode:o}"
            );
            let message = err.to_string();
            assert!(message.contains("chmod 600"), "{message}");
            assert!(!message.contains("leaky"), "{message}");
        }
    }

    #[test]
    fn missing_file_and_directory_are_named() {
        let missing = std::env::temp_dir().join("meshctl-no-such-token-file");
        let err = AdminToken::from_file(&missing).unwrap_err();
        assert!(err.to_string().contains("meshctl-no-such-token-file"));
        let dir = temp_file("dir-probe", "", 0o600);
        let dir = dir.parent().unwrap();
        assert!(matches!(
            AdminToken::from_file(dir),
            Err(AdminTokenError::NotAFile { .. })
        ));
    }

    #[test]
    fn empty_file_is_refused() {
        let path = temp_file("empty", "\n", 0o600);
        assert!(matches!(
            AdminToken::from_file(&path),
            Err(AdminTokenError::Empty { .. })
        ));
    }
}
