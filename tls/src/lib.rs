//! The client side of trust in the coordinator: a rustls certificate verifier that accepts
//! exactly the certificate whose SHA-256 is pinned (the fingerprint in a join token), and a
//! QUIC client configuration using it. The agent uses it for its control channel; the
//! coordinator's tests and the load generator use it as clients. And the server side both the
//! coordinator and the standalone relay serve with ([`server_config`]).
//!
//! # Security
//! Pinning replaces the CA chain and name checks, not the handshake: the TLS 1.3
//! `CertificateVerify` signature is still verified against the pinned certificate's key
//! (rustls's `verify_tls13_signature` with the ring provider), so a peer must hold the
//! private key, not just a copy of the certificate. TLS 1.2 is refused.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, PeerIncompatible, SignatureScheme};
use sha2::{Digest, Sha256};

pub use meshlink_proto::control::{ALPN, SERVER_NAME};

/// Compares without an early exit, so timing does not tell how much of a pin matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hex SHA-256 of a certificate (DER): the form join tokens carry.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Why a pinned client configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The fingerprint is not 64 hex digits.
    #[error("a certificate fingerprint is 64 hex digits (SHA-256)")]
    Fingerprint,
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Accepts only the certificate with the pinned SHA-256. See the module documentation.
#[derive(Debug)]
pub struct PinnedServerCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServerCert {
    /// A verifier for the certificate whose SHA-256 is `fingerprint` (hex, either case).
    ///
    /// # Errors
    /// [`PinError::Fingerprint`].
    pub fn new(fingerprint: &str) -> Result<Self, PinError> {
        let bytes = hex::decode(fingerprint.trim()).map_err(|_| PinError::Fingerprint)?;
        let pin: [u8; 32] = bytes.try_into().map_err(|_| PinError::Fingerprint)?;
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Ok(PinnedServerCert { pin, algorithms })
    }
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let digest = Sha256::digest(end_entity.as_ref());
        if constant_time_eq(&digest, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A QUIC client configuration for talking to the coordinator whose certificate has
/// `fingerprint`: TLS 1.3 only, ring, ALPN [`ALPN`], the pinned verifier.
///
/// # Errors
/// [`PinError`].
pub fn client_config(fingerprint: &str) -> Result<quinn::ClientConfig, PinError> {
    let tls = rustls_client_config(fingerprint)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PinError::Tls(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The TLS client configuration under [`client_config`], for the control channel over TCP
/// (networks that block UDP): the same pin, TLS 1.3 only, ALPN [`ALPN`].
///
/// # Errors
/// [`PinError`].
pub fn rustls_client_config(fingerprint: &str) -> Result<rustls::ClientConfig, PinError> {
    let verifier = Arc::new(PinnedServerCert::new(fingerprint)?);
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PinError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A server's TLS configuration (QUIC and TLS/TCP alike): its certificate and key, TLS 1.3
/// only, the ring provider, and `alpn` as the one protocol it speaks.
///
/// # Errors
/// rustls's, when the key does not fit the certificate.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_must_be_sha256_hex() {
        assert!(PinnedServerCert::new(&"ab".repeat(32)).is_ok());
        assert!(PinnedServerCert::new("abcd").is_err());
        assert!(PinnedServerCert::new(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn only_the_pinned_certificate_passes() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        let good = PinnedServerCert::new(&hex::encode(Sha256::digest(&der))).unwrap();
        let name = ServerName::try_from("meshlink-coordinator").unwrap();
        assert!(good
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .is_ok());
        let bad = PinnedServerCert::new(&"00".repeat(32)).unwrap();
        assert!(bad
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .is_err());
    }
}
