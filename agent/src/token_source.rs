//! Where `meshlink-agent up` finds its join token, and reading it into a [`JoinToken`].
//!
//! A join token lets whoever holds it enroll a node, so it is kept off the command line, which
//! every local user can read in `/proc/PID/cmdline` for as long as the agent runs. It comes
//! from, flags first:
//!
//! - `--token-file PATH` (or `MESHLINK_TOKEN_FILE`): a file holding the token; a warning when
//!   group or others may read it.
//! - `--token -`: standard input (`meshctl token create ... | meshlink-agent up --token -`).
//! - `MESHLINK_TOKEN`: the environment, which only the agent's user and root can read (a
//!   systemd `EnvironmentFile=` of mode 0600).
//! - `--token TOKEN`: still works, with a warning.
//!
//! Surrounding whitespace is ignored, so `echo TOKEN > FILE` works. Choosing the source
//! ([`TokenSource::choose`]) and reading a token out of bytes ([`TokenSource::parse`]) are pure;
//! [`TokenSource::read`] adds the file or standard input.
//!
//! # Security
//!
//! No error or warning contains the token's text: they name its source only. A file's mode is
//! checked on the opened file, so the file checked is the file read.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use meshlink_proto::token::{JoinToken, TokenError};

/// The most a token file or standard input may hold; a token naming a dozen coordinators is
/// well under a kilobyte.
pub const TOKEN_LIMIT: u64 = 16 * 1024;

/// Read permission for group and others: a token file with either set is warned about.
const GROUP_OTHER_READ: u32 = 0o044;

/// `--token` value that means standard input.
const STDIN: &str = "-";

/// Where the join token is to be read from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file, named by `--token-file` or `MESHLINK_TOKEN_FILE` (`via`).
    File {
        /// The file.
        path: PathBuf,
        /// The flag or variable that named it.
        via: &'static str,
    },
    /// Standard input (`--token -`).
    Stdin,
    /// The `MESHLINK_TOKEN` variable's value.
    Env(String),
    /// The `--token` flag's value, on the command line.
    Argv(String),
}

/// Something to tell the operator about a token that was read anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenWarning {
    /// The token came from the command line.
    OnCommandLine,
    /// The token file may be read by group or others.
    FileReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Why no join token could be had. Every message names where the token was to come from; none
/// contains it.
#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    /// Two sources at the same level were given.
    #[error("{0} and {1} are both given: pass the join token one way only")]
    Ambiguous(&'static str, &'static str),
    /// The file or standard input cannot be read.
    #[error("cannot read the join token from {origin}: {source}")]
    Read {
        /// Where from.
        origin: String,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// The path names a directory or a device, not a file.
    #[error("{origin}: not a regular file")]
    NotAFile {
        /// Where from.
        origin: String,
    },
    /// More than [`TOKEN_LIMIT`] bytes.
    #[error("{origin}: more than {TOKEN_LIMIT} bytes; a join token is one line")]
    TooLarge {
        /// Where from.
        origin: String,
    },
    /// Nothing but whitespace.
    #[error("{origin}: empty; expected a join token (mlj1_...) from `meshctl token create`")]
    Empty {
        /// Where from.
        origin: String,
    },
    /// Not UTF-8, or not a join token.
    #[error("{origin}: {reason}")]
    Invalid {
        /// Where from.
        origin: String,
        /// What is wrong with it.
        #[source]
        reason: TokenError,
    },
}

impl TokenSource {
    /// The source the flags and the environment (`env`, a variable's value by name) name, or
    /// `None` when they name none. Flags beat variables; two flags, or two variables, are
    /// [`TokenSourceError::Ambiguous`]. An empty variable counts as unset.
    ///
    /// # Errors
    /// [`TokenSourceError::Ambiguous`].
    pub fn choose(
        token: Option<String>,
        token_file: Option<PathBuf>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TokenSourceError> {
        match (token, token_file) {
            (Some(_), Some(_)) => Err(TokenSourceError::Ambiguous("--token", "--token-file")),
            (Some(text), None) if text == STDIN => Ok(Some(Self::Stdin)),
            (Some(text), None) => Ok(Some(Self::Argv(text))),
            (None, Some(path)) => Ok(Some(Self::File {
                path,
                via: "--token-file",
            })),
            (None, None) => {
                let set = |name| env(name).filter(|v| !v.is_empty());
                match (set("MESHLINK_TOKEN"), set("MESHLINK_TOKEN_FILE")) {
                    (Some(_), Some(_)) => Err(TokenSourceError::Ambiguous(
                        "MESHLINK_TOKEN",
                        "MESHLINK_TOKEN_FILE",
                    )),
                    (Some(text), None) => Ok(Some(Self::Env(text))),
                    (None, Some(path)) => Ok(Some(Self::File {
                        path: PathBuf::from(path),
                        via: "MESHLINK_TOKEN_FILE",
                    })),
                    (None, None) => Ok(None),
                }
            }
        }
    }

    /// Reads the token: the file or standard input (`stdin`) when that is the source. What
    /// deserves a warning goes to `warn` as soon as it is known, also when the token then
    /// proves bad.
    ///
    /// # Errors
    /// Any [`TokenSourceError`] but `Ambiguous`.
    pub fn read(
        &self,
        stdin: impl Read,
        warn: &mut dyn FnMut(TokenWarning),
    ) -> Result<JoinToken, TokenSourceError> {
        match self {
            Self::File { path, .. } => {
                let (bytes, mode) = self.read_file(path)?;
                self.parse(&bytes, Some(mode), warn)
            }
            Self::Stdin => {
                let bytes = self.read_limited(stdin)?;
                self.parse(&bytes, None, warn)
            }
            Self::Env(text) | Self::Argv(text) => self.parse(text.as_bytes(), None, warn),
        }
    }

    /// The token in `bytes` read from this source; `mode` is the permission bits of the file
    /// it came from. What deserves a warning goes to `warn` first.
    ///
    /// # Errors
    /// [`TokenSourceError::TooLarge`], [`TokenSourceError::Empty`] or
    /// [`TokenSourceError::Invalid`].
    pub fn parse(
        &self,
        bytes: &[u8],
        mode: Option<u32>,
        warn: &mut dyn FnMut(TokenWarning),
    ) -> Result<JoinToken, TokenSourceError> {
        if let Self::Argv(_) = self {
            warn(TokenWarning::OnCommandLine);
        }
        if let (Self::File { path, .. }, Some(mode)) = (self, mode) {
            if mode & GROUP_OTHER_READ != 0 {
                warn(TokenWarning::FileReadable {
                    path: path.clone(),
                    mode,
                });
            }
        }
        if bytes.len() as u64 > TOKEN_LIMIT {
            return Err(TokenSourceError::TooLarge {
                origin: self.to_string(),
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| TokenSourceError::Invalid {
            origin: self.to_string(),
            reason: TokenError::Prefix,
        })?;
        if text.trim().is_empty() {
            return Err(TokenSourceError::Empty {
                origin: self.to_string(),
            });
        }
        JoinToken::decode(text).map_err(|reason| TokenSourceError::Invalid {
            origin: self.to_string(),
            reason,
        })
    }

    fn read_file(&self, path: &Path) -> Result<(Vec<u8>, u32), TokenSourceError> {
        let read_error = |source| TokenSourceError::Read {
            origin: self.to_string(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(TokenSourceError::NotAFile {
                origin: self.to_string(),
            });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        Ok((self.read_limited(file)?, mode))
    }

    /// Up to one byte past [`TOKEN_LIMIT`], so that [`Self::parse`] can tell it is too much.
    fn read_limited(&self, from: impl Read) -> Result<Vec<u8>, TokenSourceError> {
        let mut bytes = Vec::new();
        from.take(TOKEN_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| TokenSourceError::Read {
                origin: self.to_string(),
                source,
            })?;
        Ok(bytes)
    }
}

/// Where the token came from, for messages: never the token itself.
impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, via } => write!(f, "{} ({via})", path.display()),
            Self::Stdin => f.write_str("standard input (--token -)"),
            Self::Env(_) => f.write_str("MESHLINK_TOKEN"),
            Self::Argv(_) => f.write_str("--token"),
        }
    }
}

/// Like `Display`: the token's text is not shown.
impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSource({self})")
    }
}

impl fmt::Display for TokenWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OnCommandLine => f.write_str(
                "the join token is on the command line (--token), where every local user can \
                 read it in /proc/PID/cmdline while the agent runs; pass it with \
                 --token-file FILE, --token - (standard input) or MESHLINK_TOKEN instead",
            ),
            Self::FileReadable { path, mode } => write!(
                f,
                "{} has mode {mode:04o}: group or others can read the join token in it, and \
                 join the mesh with it; chmod 600 it",
                path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token that decodes, as `meshctl token create` prints it.
    fn good() -> String {
        JoinToken::new(
            ["198.51.100.7:7443".to_string()],
            "ab".repeat(32),
            "s3cret-s3cret-s3cret".into(),
        )
        .expect("a token")
        .encode()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// [`TokenSource::parse`], with the warnings collected.
    fn parse(
        source: &TokenSource,
        bytes: &[u8],
        mode: Option<u32>,
    ) -> (Result<JoinToken, TokenSourceError>, Vec<TokenWarning>) {
        let mut warnings = Vec::new();
        let token = source.parse(bytes, mode, &mut |w| warnings.push(w));
        (token, warnings)
    }

    /// [`TokenSource::read`], with the warnings collected.
    fn read(
        source: &TokenSource,
        stdin: impl Read,
    ) -> (Result<JoinToken, TokenSourceError>, Vec<TokenWarning>) {
        let mut warnings = Vec::new();
        let token = source.read(stdin, &mut |w| warnings.push(w));
        (token, warnings)
    }

    fn choose(
        token: Option<&str>,
        file: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Option<TokenSource>, TokenSourceError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        TokenSource::choose(token.map(Into::into), file.map(PathBuf::from), &lookup)
    }

    fn file(path: &str, via: &'static str) -> TokenSource {
        TokenSource::File {
            path: path.into(),
            via,
        }
    }

    #[test]
    fn flags_beat_variables_and_two_of_a_kind_are_refused() {
        let env = [
            ("MESHLINK_TOKEN", "from-env"),
            ("MESHLINK_TOKEN_FILE", "/env/file"),
        ];
        assert_eq!(choose(None, None, &[]).unwrap(), None);
        assert_eq!(
            choose(Some("-"), None, &env).unwrap(),
            Some(TokenSource::Stdin)
        );
        assert_eq!(
            choose(Some("mlj1_x"), None, &env).unwrap(),
            Some(TokenSource::Argv("mlj1_x".into()))
        );
        assert_eq!(
            choose(None, Some("/etc/t"), &env).unwrap(),
            Some(file("/etc/t", "--token-file"))
        );
        assert!(matches!(
            choose(Some("-"), Some("/etc/t"), &[]),
            Err(TokenSourceError::Ambiguous("--token", "--token-file"))
        ));
        assert!(matches!(
            choose(None, None, &env),
            Err(TokenSourceError::Ambiguous(..))
        ));
        assert_eq!(
            choose(None, None, &env[..1]).unwrap(),
            Some(TokenSource::Env("from-env".into()))
        );
        assert_eq!(
            choose(None, None, &env[1..]).unwrap(),
            Some(file("/env/file", "MESHLINK_TOKEN_FILE"))
        );
        // An empty variable is unset (a systemd `Environment=MESHLINK_TOKEN=`).
        assert_eq!(
            choose(
                None,
                None,
                &[("MESHLINK_TOKEN", ""), ("MESHLINK_TOKEN_FILE", "/f")]
            )
            .unwrap(),
            Some(file("/f", "MESHLINK_TOKEN_FILE"))
        );
        assert_eq!(TokenSource::choose(None, None, &no_env).unwrap(), None);
    }

    #[test]
    fn a_token_is_read_with_whitespace_around_it() {
        let good = good();
        let expected = JoinToken::decode(&good).unwrap();
        for source in [
            file("/t", "--token-file"),
            TokenSource::Stdin,
            TokenSource::Env(String::new()),
        ] {
            let (token, warnings) = parse(&source, format!("  {good}\n").as_bytes(), Some(0o600));
            assert_eq!(token.unwrap(), expected, "{source}");
            assert_eq!(warnings, [], "{source}");
        }
        let (token, _) = read(&TokenSource::Stdin, format!("{good}\n").as_bytes());
        assert_eq!(token.unwrap(), expected);
        let (token, _) = read(&TokenSource::Env(good.clone()), io::empty());
        assert_eq!(token.unwrap(), expected);
    }

    #[test]
    fn the_command_line_and_readable_files_are_warned_about() {
        let good = good();
        let (token, warnings) = read(&TokenSource::Argv(good.clone()), io::empty());
        assert!(token.is_ok(), "--token still works");
        assert_eq!(warnings, [TokenWarning::OnCommandLine]);
        assert!(warnings[0].to_string().contains("/proc/PID/cmdline"));
        for (mode, warned) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true)] {
            let (token, warnings) = parse(&file("/t", "--token-file"), good.as_bytes(), Some(mode));
            assert!(token.is_ok());
            assert_eq!(!warnings.is_empty(), warned, "{mode:o}");
            if warned {
                let text = warnings[0].to_string();
                assert!(text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"));
            }
        }
        // Warned about even when the token then proves bad.
        let (token, warnings) = parse(&file("/t", "--token-file"), b"junk", Some(0o644));
        assert!(token.is_err());
        assert_eq!(warnings.len(), 1);
        let (token, warnings) = parse(&TokenSource::Argv("junk".into()), b"junk", None);
        assert!(token.is_err());
        assert_eq!(warnings, [TokenWarning::OnCommandLine]);
    }

    #[test]
    fn bad_input_names_its_source_and_never_the_token() {
        let damaged = "mlj1_c2VjcmV0LWJ1dC1icm9rZW4";
        for (source, bytes, names, says) in [
            (
                file("/etc/meshlink/join.token", "--token-file"),
                damaged.as_bytes().to_vec(),
                "/etc/meshlink/join.token (--token-file)",
                "damaged",
            ),
            (
                file("/e", "MESHLINK_TOKEN_FILE"),
                b"secret-without-prefix".to_vec(),
                "/e (MESHLINK_TOKEN_FILE)",
                "mlj1_",
            ),
            (
                TokenSource::Stdin,
                b" \n".to_vec(),
                "standard input (--token -)",
                "empty",
            ),
            (
                TokenSource::Env(damaged.into()),
                damaged.as_bytes().to_vec(),
                "MESHLINK_TOKEN",
                "damaged",
            ),
            (
                TokenSource::Argv(damaged.into()),
                damaged.as_bytes().to_vec(),
                "--token",
                "damaged",
            ),
            (
                TokenSource::Stdin,
                vec![0xff, 0xfe],
                "standard input",
                "not a meshlink join token",
            ),
            (
                TokenSource::Stdin,
                vec![b'a'; TOKEN_LIMIT as usize + 1],
                "standard input",
                "more than",
            ),
        ] {
            let e = parse(&source, &bytes, Some(0o600))
                .0
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(names) && e.contains(says), "{e}");
            assert!(!e.contains(damaged) && !e.contains("secret-without"), "{e}");
            assert!(!format!("{source:?}").contains(damaged));
        }
    }

    #[test]
    fn files_are_read_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join.token");
        std::fs::write(&path, format!("{}\n", good())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let source = TokenSource::File {
            path: path.clone(),
            via: "--token-file",
        };
        let (token, warnings) = read(&source, io::empty());
        assert!(token.is_ok());
        assert_eq!(
            warnings,
            [TokenWarning::FileReadable {
                path: path.clone(),
                mode: 0o644
            }]
        );
        let missing = TokenSource::File {
            path: dir.path().join("nowhere"),
            via: "--token-file",
        };
        let e = read(&missing, io::empty()).0.unwrap_err().to_string();
        assert!(e.starts_with("cannot read the join token from ") && e.contains("nowhere"));
        let directory = TokenSource::File {
            path: dir.path().to_owned(),
            via: "--token-file",
        };
        let e = read(&directory, io::empty()).0.unwrap_err();
        assert!(matches!(e, TokenSourceError::NotAFile { .. }), "{e}");
    }
}
