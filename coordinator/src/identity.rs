//! The coordinator's state directory and the secrets in it: the TLS identity agents pin
//! (`coordinator.crt`, `coordinator.key`) and the admin token (`admin.token`).
//!
//! All are made on first start and reused afterwards, so the fingerprint in join tokens stays
//! valid across restarts. The directory is created `0700` and secret files `0600`; a secret
//! file that group or others may read is refused rather than used.
//!
//! # Security
//! The admin token is random (32 bytes, base64url) and compared in constant time (by its
//! SHA-256) by [`crate::admin`]. Node and join-token secrets are drawn here too
//! ([`random_secret`]); only their hashes are stored.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub use meshlink_proto::control::SERVER_NAME;
/// Certificate file (PEM) in the state directory.
pub const CERT_FILE: &str = "coordinator.crt";
/// Private key file (PEM, 0600) in the state directory.
pub const KEY_FILE: &str = "coordinator.key";
/// Admin token file (0600) in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Database file in the state directory.
pub const DATABASE_FILE: &str = "coordinator.db";

/// Why the state directory or a secret in it cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// A secret file is readable by group or others.
    #[error("{path} has mode {mode:o}; secrets must not be readable by group or others (chmod 600 {path})")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file does not hold what it should (damaged, or one of the pair is missing).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Making the certificate failed.
    #[error("cannot generate the TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The coordinator's TLS identity.
#[derive(Debug)]
pub struct Identity {
    /// The self-signed certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// Lowercase hex SHA-256 of `cert`: what join tokens carry and agents pin.
    pub fingerprint: String,
    /// Whether it was made by this call.
    pub created: bool,
}

/// The admin API's bearer token.
#[derive(Clone)]
pub struct AdminToken {
    /// The token text.
    pub value: String,
    /// Where it is stored.
    pub path: PathBuf,
    /// Whether it was made by this call (and should be shown once).
    pub created: bool,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// Creates the state directory (mode 0700) when missing.
///
/// # Errors
/// [`IdentityError::Io`].
pub fn prepare_state_dir(dir: &Path) -> Result<(), IdentityError> {
    let io_err = |source| IdentityError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    } else if !dir.is_dir() {
        return Err(io_err(io::Error::other("not a directory")));
    }
    Ok(())
}

/// Loads the TLS identity from `dir`, or makes one (ECDSA P-256, self-signed, SAN
/// [`SERVER_NAME`]) when neither file exists.
///
/// # Errors
/// [`IdentityError`]; also when only one of the two files exists (making a new pair would
/// silently change the fingerprint every agent pinned).
pub fn load_or_create_identity(dir: &Path) -> Result<Identity, IdentityError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let (cert_pem, key_pem, created) = match (cert_path.exists(), key_path.exists()) {
        (false, false) => {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, SERVER_NAME);
            let cert = params.self_signed(&key)?;
            let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
            write_file(&key_path, key_pem.as_bytes(), 0o600)?;
            write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
            (cert_pem.into_bytes(), key_pem.into_bytes(), true)
        }
        (true, true) => (read(&cert_path)?, read_secret(&key_path)?, false),
        (true, false) => return Err(missing_pair(&key_path, &cert_path)),
        (false, true) => return Err(missing_pair(&cert_path, &key_path)),
    };
    let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| IdentityError::Invalid {
        path: cert_path.clone(),
        message: format!("not a PEM certificate: {e}"),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::Invalid {
        path: key_path.clone(),
        message: format!("not a PEM private key: {e}"),
    })?;
    let fingerprint = fingerprint(&cert);
    Ok(Identity {
        cert,
        key,
        fingerprint,
        created,
    })
}

/// Loads the admin token from `dir`, or makes and stores one.
///
/// # Errors
/// [`IdentityError`].
pub fn load_or_create_admin_token(dir: &Path) -> Result<AdminToken, IdentityError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        let bytes = read_secret(&path)?;
        let value = String::from_utf8(bytes)
            .map(|s| s.trim().to_string())
            .map_err(|_| IdentityError::Invalid {
                path: path.clone(),
                message: "not text".into(),
            })?;
        if value.len() < 16 {
            return Err(IdentityError::Invalid {
                path,
                message: "the admin token is shorter than 16 characters".into(),
            });
        }
        return Ok(AdminToken {
            value,
            path,
            created: false,
        });
    }
    let value = random_secret();
    write_file(&path, format!("{value}\n").as_bytes(), 0o600)?;
    Ok(AdminToken {
        value,
        path,
        created: true,
    })
}

/// Lowercase hex SHA-256 of a certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// 32 random bytes from the operating system, as unpadded base64url (43 characters).
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn missing_pair(missing: &Path, present: &Path) -> IdentityError {
    IdentityError::Invalid {
        path: missing.to_path_buf(),
        message: format!(
            "missing while {} exists; restore it, or remove both to make a new identity (agents must then be given new join tokens)",
            present.display()
        ),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_secret(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let meta = fs::metadata(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read(path)
}

/// Writes a file atomically (a temporary file renamed into place) with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let io_err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(contents).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "meshlink-coord-identity-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn identity_and_token_are_made_once_and_reused() {
        let dir = scratch("reuse").join("state");
        prepare_state_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let a = load_or_create_identity(&dir).unwrap();
        assert!(a.created);
        assert_eq!(a.fingerprint.len(), 64);
        let b = load_or_create_identity(&dir).unwrap();
        assert!(!b.created);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        let t1 = load_or_create_admin_token(&dir).unwrap();
        assert!(t1.created);
        assert_eq!(t1.value.len(), 43);
        assert_eq!(
            fs::metadata(&t1.path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let t2 = load_or_create_admin_token(&dir).unwrap();
        assert!(!t2.created);
        assert_eq!(t1.value, t2.value);
        assert!(!format!("{t2:?}").contains(&t2.value));

        fs::set_permissions(&t1.path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_admin_token(&dir),
            Err(IdentityError::Permissions { .. })
        ));
        fs::remove_file(dir.join(CERT_FILE)).unwrap();
        assert!(load_or_create_identity(&dir)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }
}
