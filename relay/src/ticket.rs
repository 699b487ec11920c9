//! Tickets: how a coordinator vouches for a node at a standalone relay.
//!
//! The coordinator signs [`TicketBody`] (the node's key, network and id, issued and expiry
//! times) with its identity's private key, the key of the certificate agents pin, which every
//! coordinator of a mesh shares (`meshlink-coordinator init`). A relay is given that
//! certificate (a file, not a secret) at start and checks tickets offline: no call to a
//! coordinator per session, and relays keep serving while coordinators restart.
//!
//! # Security
//! - A ticket is not a bearer credential: every listed relay sees it, so it names a fresh
//!   Ed25519 *proof key* ([`TicketBody::proof_key`]) whose secret the coordinator gives only to
//!   the node, in the grant on the pinned control session ([`Issued::proof_secret`]). A relay
//!   serves a ticket only on a connection whose hello signs that connection's TLS exporter
//!   value with the proof key ([`check_proof`]). A relay that saw a ticket, or anyone who
//!   copied it, cannot present it elsewhere: the exporter differs per connection and the
//!   signature needs the secret. What a ticket names is one key in one network, so the worst a
//!   stolen grant (ticket and secret: the node itself compromised) does before it expires is
//!   act as that node at the relays (its traffic is WireGuard ciphertext the thief cannot read).
//! - Revocation is by expiry: a revoked node's ticket stays good at standalone relays until it
//!   expires ([`DEFAULT_TTL`], 10 minutes; sessions are ended at expiry). Its peers drop its
//!   key from their maps at once, so what it relays meanwhile is refused by every receiver; the
//!   window only bounds bandwidth.
//! - The signature covers [`meshlink_proto::relay::TICKET_CONTEXT`] followed by the body, so a
//!   signature the key made for anything else (a TLS handshake) is never a ticket's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use meshlink_proto::relay::{
    session_proof_message, ProofSecret, Ticket, TicketBody, EXPORTER_LEN, PROOF_KEY_LEN,
};
use meshlink_proto::{NodeId, PublicKey};
use ring::rand::SecureRandom;
use ring::signature::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;

/// How long a ticket is good for by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);
/// The longest ticket a relay accepts (`expires - issued`): a coordinator configured for more
/// is refused rather than trusted for days.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The clock difference tolerated between coordinator and relay.
pub const CLOCK_SKEW: u64 = 60;

/// The signature schemes tickets are signed with, in order of preference (those of the keys
/// `rcgen` makes, and RSA-PSS for an operator's own RSA key).
const SCHEMES: [SignatureScheme; 4] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// Why tickets cannot be issued or checked with the key or certificate given.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The private key is of no supported type.
    #[error("the coordinator key cannot sign tickets: {0}")]
    UnsupportedKey(String),
    /// The certificate file cannot be read or holds no certificate.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why a ticket was refused. Grouped for the relay's counters; the text goes to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a ticket's form.
    #[error("malformed ticket")]
    Malformed,
    /// The signature does not verify with the coordinator's key (forged, altered, another
    /// mesh's coordinator, or a scheme not supported).
    #[error("the ticket's signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("the ticket expired at {expires} (now {now})")]
    Expired {
        /// Its expiry (Unix seconds).
        expires: u64,
        /// The relay's time.
        now: u64,
    },
    /// The ticket names no proof key (an older coordinator's), or a malformed one.
    #[error("the ticket names no proof key (is the coordinator older than this relay?)")]
    NoProofKey,
    /// The hello's proof is missing, or does not verify with the ticket's proof key over this
    /// connection: a ticket presented by someone other than the node it was granted to.
    #[error("the hello does not prove the ticket's key over this connection")]
    BadProof,
    /// Issued in the future or valid for longer than [`MAX_TTL`].
    #[error("the ticket's times are implausible (issued {issued}, expires {expires}, now {now})")]
    Implausible {
        /// When it says it was issued.
        issued: u64,
        /// When it says it expires.
        expires: u64,
        /// The relay's time.
        now: u64,
    },
}

/// A ticket as issued: its text, its expiry, and the secret of its proof key (for the grant
/// only).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The ticket's text.
    pub ticket: String,
    /// Its expiry (Unix seconds).
    pub expires: u64,
    /// The secret of the proof key the ticket names: the node signs its hellos with it.
    pub proof_secret: ProofSecret,
}

/// Issues tickets with the coordinator identity's key.
pub struct Issuer {
    key: Arc<dyn SigningKey>,
    ttl: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issuer").field("ttl", &self.ttl).finish()
    }
}

impl Issuer {
    /// An issuer of tickets good for `ttl`, signing with `key`.
    ///
    /// # Errors
    /// [`KeyError::UnsupportedKey`].
    pub fn new(key: &PrivateKeyDer<'_>, ttl: Duration) -> Result<Self, KeyError> {
        let key = rustls::crypto::ring::sign::any_supported_type(key)
            .map_err(|e| KeyError::UnsupportedKey(e.to_string()))?;
        if key.choose_scheme(&SCHEMES).is_none() {
            return Err(KeyError::UnsupportedKey(format!(
                "{:?} keys sign with none of {SCHEMES:?}",
                key.algorithm()
            )));
        }
        Ok(Issuer { key, ttl })
    }

    /// How long tickets are good for.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A ticket for `key`, node `node` of `network`, issued at `now` (Unix seconds), naming a
    /// fresh proof key.
    ///
    /// # Errors
    /// [`KeyError::UnsupportedKey`] when signing fails (it does not with a key [`Issuer::new`]
    /// took) or the system has no randomness.
    pub fn issue(
        &self,
        key: PublicKey,
        network: &str,
        node: NodeId,
        now: u64,
    ) -> Result<Issued, KeyError> {
        let expires = now + self.ttl.as_secs().max(1);
        let mut seed = [0u8; PROOF_KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::UnsupportedKey("no randomness for a proof key".into()))?;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| KeyError::UnsupportedKey(format!("proof key: {e}")))?;
        let body = TicketBody {
            key,
            network: network.to_string(),
            node,
            issued: now,
            expires,
            proof_key: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        };
        let json = serde_json::to_vec(&body)
            .map_err(|e| KeyError::UnsupportedKey(format!("cannot encode a ticket: {e}")))?;
        let signer = self
            .key
            .choose_scheme(&SCHEMES)
            .ok_or_else(|| KeyError::UnsupportedKey("no scheme".into()))?;
        let signature = signer
            .sign(&Ticket::signed_message(&json))
            .map_err(|e| KeyError::UnsupportedKey(e.to_string()))?;
        Ok(Issued {
            ticket: Ticket::encode(&json, u16::from(signer.scheme()), &signature),
            expires,
            proof_secret: ProofSecret::from_seed(&seed),
        })
    }
}

/// The proof of a hello on a connection whose TLS exporter value ([`EXPORTER_LEN`] bytes under
/// [`meshlink_proto::relay::EXPORTER_LABEL`]) is `exporter`, signed with `secret` (what an
/// agent sends as [`meshlink_proto::relay::RelayHello::proof`]); `None` for a secret that is
/// not an Ed25519 seed.
#[must_use]
pub fn prove(secret: &ProofSecret, exporter: &[u8; EXPORTER_LEN]) -> Option<String> {
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&secret.seed()?).ok()?;
    let signature = pair.sign(&session_proof_message(exporter));
    Some(URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// Checks that `proof` signs this connection's `exporter` value with the proof key `body`
/// names.
///
/// # Errors
/// [`Refused::NoProofKey`], [`Refused::BadProof`].
pub fn check_proof(
    body: &TicketBody,
    exporter: &[u8; EXPORTER_LEN],
    proof: &str,
) -> Result<(), Refused> {
    let key = body.proof_key().ok_or(Refused::NoProofKey)?;
    let signature = URL_SAFE_NO_PAD
        .decode(proof)
        .map_err(|_| Refused::BadProof)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&session_proof_message(exporter), &signature)
        .map_err(|_| Refused::BadProof)
}

/// Checks tickets against the coordinator's certificate.
#[derive(Debug, Clone)]
pub struct Verifier {
    cert: CertificateDer<'static>,
}

impl Verifier {
    /// A verifier of tickets signed with the key of `cert` (DER).
    ///
    /// # Errors
    /// [`KeyError::Certificate`] when `cert` is not a certificate webpki can read.
    pub fn new(cert: CertificateDer<'static>) -> Result<Self, KeyError> {
        webpki::EndEntityCert::try_from(&cert).map_err(|e| KeyError::Certificate {
            path: "(certificate)".into(),
            reason: format!("{e:?}"),
        })?;
        Ok(Verifier { cert })
    }

    /// A verifier of tickets signed by the coordinator whose certificate is in `path` (PEM, as
    /// `coordinator.crt` in its state directory).
    ///
    /// # Errors
    /// [`KeyError::Certificate`].
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let fail = |reason: String| KeyError::Certificate {
            path: path.to_path_buf(),
            reason,
        };
        let cert = CertificateDer::from_pem_file(path).map_err(|e| fail(e.to_string()))?;
        Verifier::new(cert).map_err(|e| match e {
            KeyError::Certificate { reason, .. } => fail(reason),
            other => other,
        })
    }

    /// The SHA-256 fingerprint of the certificate (as join tokens carry it).
    #[must_use]
    pub fn fingerprint(&self) -> String {
        meshlink_tls::fingerprint(&self.cert)
    }

    /// Checks `text` at `now` (Unix seconds): what it vouches for.
    ///
    /// # Errors
    /// [`Refused`].
    pub fn verify(&self, text: &str, now: u64) -> Result<TicketBody, Refused> {
        let ticket = Ticket::parse(text).map_err(|_| Refused::Malformed)?;
        let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm =
            match SignatureScheme::from(ticket.scheme) {
                SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
                SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
                SignatureScheme::ED25519 => webpki::ring::ED25519,
                SignatureScheme::RSA_PSS_SHA256 => {
                    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY
                }
                _ => return Err(Refused::BadSignature),
            };
        let cert =
            webpki::EndEntityCert::try_from(&self.cert).map_err(|_| Refused::BadSignature)?;
        cert.verify_signature(
            alg,
            &Ticket::signed_message(&ticket.body_json),
            &ticket.signature,
        )
        .map_err(|_| Refused::BadSignature)?;
        let TicketBody {
            issued, expires, ..
        } = ticket.body;
        if issued > now + CLOCK_SKEW || expires < issued || expires - issued > MAX_TTL.as_secs() {
            return Err(Refused::Implausible {
                issued,
                expires,
                now,
            });
        }
        if now >= expires + CLOCK_SKEW {
            return Err(Refused::Expired { expires, now });
        }
        Ok(ticket.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let c = rcgen::generate_simple_self_signed(vec!["meshlink-coordinator".into()]).unwrap();
        (
            c.cert.der().clone(),
            PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into()),
        )
    }

    #[test]
    fn a_ticket_vouches_for_its_key_until_it_expires() {
        let (cert, key) = identity();
        let issuer = Issuer::new(&key, Duration::from_secs(600)).unwrap();
        let verifier = Verifier::new(cert).unwrap();
        let t0 = 1_800_000_000;
        let Issued {
            ticket: text,
            expires,
            ..
        } = issuer.issue(PublicKey([4; 32]), "prod", 9, t0).unwrap();
        assert_eq!(expires, t0 + 600);
        let body = verifier.verify(&text, t0 + 10).unwrap();
        assert_eq!(
            (body.key, body.network.as_str(), body.node),
            (PublicKey([4; 32]), "prod", 9)
        );
        // Good up to the expiry and the tolerated skew, not after.
        assert!(verifier.verify(&text, expires + CLOCK_SKEW - 1).is_ok());
        assert_eq!(
            verifier.verify(&text, expires + CLOCK_SKEW),
            Err(Refused::Expired {
                expires,
                now: expires + CLOCK_SKEW
            })
        );
        // Issued well after the relay's time: its clock or the ticket is wrong.
        assert!(matches!(
            verifier.verify(&text, t0 - CLOCK_SKEW - 1),
            Err(Refused::Implausible { .. })
        ));
    }

    #[test]
    fn forged_altered_and_foreign_tickets_are_refused() {
        let (cert, key) = identity();
        let (_, other_key) = identity();
        let verifier = Verifier::new(cert).unwrap();
        let t0 = 1_800_000_000;
        // Signed by another mesh's coordinator.
        let foreign = Issuer::new(&other_key, DEFAULT_TTL).unwrap();
        let text = foreign
            .issue(PublicKey([4; 32]), "prod", 9, t0)
            .unwrap()
            .ticket;
        assert_eq!(verifier.verify(&text, t0), Err(Refused::BadSignature));
        // The body changed (another network), the signature kept.
        let issuer = Issuer::new(&key, DEFAULT_TTL).unwrap();
        let text = issuer
            .issue(PublicKey([4; 32]), "prod", 9, t0)
            .unwrap()
            .ticket;
        let t = Ticket::parse(&text).unwrap();
        let mut body = t.body.clone();
        body.network = "staging".into();
        let json = serde_json::to_vec(&body).unwrap();
        let altered = Ticket::encode(&json, t.scheme, &t.signature);
        assert_eq!(verifier.verify(&altered, t0), Err(Refused::BadSignature));
        // A valid signature over the same bytes without the ticket context (a signature made
        // for something else) is no ticket.
        let signer = Issuer::new(&key, DEFAULT_TTL).unwrap();
        let raw = signer
            .key
            .choose_scheme(&SCHEMES)
            .unwrap()
            .sign(&t.body_json)
            .unwrap();
        let out_of_context = Ticket::encode(&t.body_json, t.scheme, &raw);
        assert_eq!(
            verifier.verify(&out_of_context, t0),
            Err(Refused::BadSignature)
        );
        // A scheme not offered, garbage, and a ticket for longer than MAX_TTL.
        let odd = Ticket::encode(&t.body_json, 0x0201, &t.signature);
        assert_eq!(verifier.verify(&odd, t0), Err(Refused::BadSignature));
        assert_eq!(verifier.verify("x.y", t0), Err(Refused::Malformed));
        let long = Issuer::new(&key, MAX_TTL + Duration::from_secs(1)).unwrap();
        let text = long
            .issue(PublicKey([4; 32]), "prod", 9, t0)
            .unwrap()
            .ticket;
        assert!(matches!(
            verifier.verify(&text, t0),
            Err(Refused::Implausible { .. })
        ));
    }

    /// A ticket serves only with a proof of its own key over the connection it is presented
    /// on: another connection's proof, another ticket's key, or none, is refused.
    #[test]
    fn a_ticket_serves_only_with_a_proof_of_its_key_over_the_connection() {
        let (cert, key) = identity();
        let issuer = Issuer::new(&key, DEFAULT_TTL).unwrap();
        let verifier = Verifier::new(cert).unwrap();
        let t0 = 1_800_000_000;
        let mine = issuer.issue(PublicKey([4; 32]), "prod", 9, t0).unwrap();
        let other = issuer.issue(PublicKey([5; 32]), "prod", 10, t0).unwrap();
        assert_ne!(
            mine.proof_secret, other.proof_secret,
            "a fresh key per ticket"
        );
        let body = verifier.verify(&mine.ticket, t0).unwrap();
        let (here, there) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        let proof = prove(&mine.proof_secret, &here).unwrap();
        assert_eq!(check_proof(&body, &here, &proof), Ok(()));
        // Replayed on another connection (what a relay that saw the hello could try).
        assert_eq!(check_proof(&body, &there, &proof), Err(Refused::BadProof));
        // Signed with another ticket's key, or no proof at all.
        let foreign = prove(&other.proof_secret, &here).unwrap();
        assert_eq!(check_proof(&body, &here, &foreign), Err(Refused::BadProof));
        assert_eq!(check_proof(&body, &here, ""), Err(Refused::BadProof));
        // A ticket that names no proof key is refused whatever the proof.
        let mut bare = body.clone();
        bare.proof_key.clear();
        assert_eq!(check_proof(&bare, &here, &proof), Err(Refused::NoProofKey));
        // The secret never shows in the issued ticket's debug output.
        let seed = mine.proof_secret.seed().unwrap();
        assert!(!format!("{mine:?}").contains(&URL_SAFE_NO_PAD.encode(seed)));
    }
}
