//! Path discovery datagrams, carried on the WireGuard UDP socket beside WireGuard's own.
//!
//! Two kinds, told apart from WireGuard messages (whose first byte is 1 to 4) by a magic
//! prefix:
//!
//! - **Peer probes** ([`Probe`]): a ping from one node to a candidate address of another and
//!   the pong that answers it, sealed with the two nodes' WireGuard keys (X25519 between the
//!   static keys, a key derived with BLAKE2s under this protocol's own label, then
//!   XChaCha20-Poly1305 with a random nonce). Only the holder of a node's private key can make
//!   a probe that the other node accepts, and a failed probe costs nothing: no WireGuard
//!   handshake is started. A pong names the transaction of its ping and is accepted once, so a
//!   replayed pong matches nothing.
//! - **Relayed probes** ([`Probe::RelayedPing`], [`Probe::RelayedPong`]): the same, sent
//!   through the relay the two nodes' WireGuard datagrams take (kinds of their own, 2026-12),
//!   to measure the round trip of a relayed path end to end. They are answered only as they
//!   came, through the relay, and an address they come from is never tried as a candidate.
//!   An older agent cannot open them (its `open` finds the kind malformed): it answers and
//!   learns nothing, and the asker sees no round trip for that peer.
//! - **Reflexive address queries** ([`Reflect`]): a request from the WireGuard socket to the
//!   coordinator's discovery port, answered with the source address the coordinator saw, i.e.
//!   the address a NAT mapped the socket to. Not authenticated (like STUN): the answer is only a
//!   candidate, and a candidate is used only after a sealed probe through it succeeded.
//!
//! Wire formats (all integers big-endian):
//!
//! ```text
//! probe:   "MLdsc" 0x01 | sender public key (32) | nonce (24) | sealed body (+16 tag)
//!          body: kind (1: ping, 2: pong, 3: relayed ping, 4: relayed pong) | transaction (12)
//!                | pong only: address
//! reflect: "MLstn" 0x01 | kind (1: request, 2: response) | transaction (12) | response: address
//! address: family (4 or 6) | IP (4 or 16) | port (2)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::key::PublicKey;

/// The prefix of a sealed peer probe.
pub const PROBE_MAGIC: [u8; 6] = *b"MLdsc\x01";
/// The prefix of a reflexive address query or answer.
pub const REFLECT_MAGIC: [u8; 6] = *b"MLstn\x01";
/// Bytes of a transaction id.
pub const TX_LEN: usize = 12;
/// The longest datagram of this module (a pong with an IPv6 address).
pub const MAX_LEN: usize = 6 + 32 + 24 + 1 + TX_LEN + 19 + 16;

const KDF_LABEL: &[u8] = b"meshlink disco v1";

/// A transaction id: random, chosen by whoever asks.
pub type TxId = [u8; TX_LEN];

/// Whether a datagram received on the WireGuard socket is one of this module's (and not
/// WireGuard's).
#[must_use]
pub fn is_disco(datagram: &[u8]) -> bool {
    datagram.starts_with(&PROBE_MAGIC) || datagram.starts_with(&REFLECT_MAGIC)
}

/// Why a datagram was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    /// Too short, a wrong prefix, or a malformed body.
    #[error("malformed discovery datagram")]
    Malformed,
    /// The seal did not verify: not from the key it names, or altered.
    #[error("discovery datagram failed authentication")]
    Forged,
    /// The peer's key is a low-order point: no shared secret.
    #[error("the peer's key gives no shared secret")]
    WeakKey,
}

/// A peer probe, once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// "Can you hear me at the address this came to?"
    Ping {
        /// The asker's transaction.
        tx: TxId,
    },
    /// "Yes; your ping came from `observed`."
    Pong {
        /// The ping's transaction.
        tx: TxId,
        /// The source address of the ping as the answering node saw it.
        observed: SocketAddr,
    },
    /// "Can you hear me through the relay?" (sent through the relay).
    RelayedPing {
        /// The asker's transaction.
        tx: TxId,
    },
    /// "Yes", sent back through the relay. No address: the one a relayed ping comes from
    /// says nothing of the asker's NAT.
    RelayedPong {
        /// The ping's transaction.
        tx: TxId,
    },
}

/// The key two nodes share for probes, from one's private key and the other's public key.
/// The same on both sides. `Debug` hides it.
#[derive(Clone)]
pub struct PairKey {
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// Derives the pair key of `own_private` (32 bytes, a WireGuard private key) and `peer`.
    ///
    /// # Errors
    /// [`DiscoError::WeakKey`] when `peer` is a low-order point.
    pub fn derive(own_private: &[u8; 32], peer: &PublicKey) -> Result<Self, DiscoError> {
        let own = x25519_dalek::StaticSecret::from(*own_private);
        let own_public = x25519_dalek::PublicKey::from(&own);
        let shared = own.diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        if !shared.was_contributory() {
            return Err(DiscoError::WeakKey);
        }
        let (lo, hi) = if own_public.as_bytes() <= &peer.0 {
            (*own_public.as_bytes(), peer.0)
        } else {
            (peer.0, *own_public.as_bytes())
        };
        let mut h = Blake2s256::new();
        h.update(KDF_LABEL);
        h.update(shared.as_bytes());
        h.update(lo);
        h.update(hi);
        let key = h.finalize();
        Ok(Self {
            aead: XChaCha20Poly1305::new(&key),
        })
    }

    /// Seals `probe` from `sender` (the caller's own public key) with a fresh random `nonce`.
    #[must_use]
    pub fn seal(&self, sender: &PublicKey, probe: &Probe, nonce: [u8; 24]) -> Vec<u8> {
        let mut body = Vec::with_capacity(1 + TX_LEN + 19);
        match probe {
            Probe::Ping { tx } => {
                body.push(1);
                body.extend_from_slice(tx);
            }
            Probe::Pong { tx, observed } => {
                body.push(2);
                body.extend_from_slice(tx);
                put_addr(&mut body, *observed);
            }
            Probe::RelayedPing { tx } => {
                body.push(3);
                body.extend_from_slice(tx);
            }
            Probe::RelayedPong { tx } => {
                body.push(4);
                body.extend_from_slice(tx);
            }
        }
        let mut out = Vec::with_capacity(MAX_LEN);
        out.extend_from_slice(&PROBE_MAGIC);
        out.extend_from_slice(&sender.0);
        out.extend_from_slice(&nonce);
        let aad = out.clone();
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &body,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a probe sealed for this pair (after [`probe_sender`] named the sender).
    ///
    /// # Errors
    /// [`DiscoError::Malformed`] or [`DiscoError::Forged`].
    pub fn open(&self, datagram: &[u8]) -> Result<Probe, DiscoError> {
        const HEAD: usize = 6 + 32 + 24;
        if datagram.len() < HEAD + 16 + 1 + TX_LEN || !datagram.starts_with(&PROBE_MAGIC) {
            return Err(DiscoError::Malformed);
        }
        let (aad, sealed) = datagram.split_at(HEAD);
        let body = self
            .aead
            .decrypt(
                XNonce::from_slice(&aad[38..HEAD]),
                Payload { msg: sealed, aad },
            )
            .map_err(|_| DiscoError::Forged)?;
        let tx: TxId = body
            .get(1..=TX_LEN)
            .and_then(|t| t.try_into().ok())
            .ok_or(DiscoError::Malformed)?;
        match body[0] {
            1 if body.len() == 1 + TX_LEN => Ok(Probe::Ping { tx }),
            2 => {
                let (observed, rest) = get_addr(&body[1 + TX_LEN..])?;
                if rest.is_empty() {
                    Ok(Probe::Pong { tx, observed })
                } else {
                    Err(DiscoError::Malformed)
                }
            }
            3 if body.len() == 1 + TX_LEN => Ok(Probe::RelayedPing { tx }),
            4 if body.len() == 1 + TX_LEN => Ok(Probe::RelayedPong { tx }),
            _ => Err(DiscoError::Malformed),
        }
    }
}

/// The public key a probe claims to come from (checked only by [`PairKey::open`]).
#[must_use]
pub fn probe_sender(datagram: &[u8]) -> Option<PublicKey> {
    if !datagram.starts_with(&PROBE_MAGIC) {
        return None;
    }
    let key: [u8; 32] = datagram.get(6..38)?.try_into().ok()?;
    Some(PublicKey(key))
}

/// A reflexive address query or its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflect {
    /// "From which address do you see this?"
    Request {
        /// The asker's transaction.
        tx: TxId,
    },
    /// "From `observed`."
    Response {
        /// The request's transaction.
        tx: TxId,
        /// The request's source address as the answering side saw it.
        observed: SocketAddr,
    },
}

impl Reflect {
    /// The datagram.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + 1 + TX_LEN + 19);
        out.extend_from_slice(&REFLECT_MAGIC);
        match self {
            Self::Request { tx } => {
                out.push(1);
                out.extend_from_slice(tx);
            }
            Self::Response { tx, observed } => {
                out.push(2);
                out.extend_from_slice(tx);
                put_addr(&mut out, *observed);
            }
        }
        out
    }

    /// Parses a datagram.
    ///
    /// # Errors
    /// [`DiscoError::Malformed`] for anything but a well-formed query or answer.
    pub fn decode(datagram: &[u8]) -> Result<Self, DiscoError> {
        let body = datagram
            .strip_prefix(&REFLECT_MAGIC)
            .ok_or(DiscoError::Malformed)?;
        let tx: TxId = body
            .get(1..=TX_LEN)
            .and_then(|t| t.try_into().ok())
            .ok_or(DiscoError::Malformed)?;
        match body[0] {
            1 if body.len() == 1 + TX_LEN => Ok(Self::Request { tx }),
            2 => {
                let (observed, rest) = get_addr(&body[1 + TX_LEN..])?;
                if rest.is_empty() {
                    Ok(Self::Response { tx, observed })
                } else {
                    Err(DiscoError::Malformed)
                }
            }
            _ => Err(DiscoError::Malformed),
        }
    }
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Result<(SocketAddr, &[u8]), DiscoError> {
    let (ip, rest): (IpAddr, &[u8]) = match b.first() {
        Some(4) => {
            let o: [u8; 4] = b
                .get(1..5)
                .ok_or(DiscoError::Malformed)?
                .try_into()
                .map_err(|_| DiscoError::Malformed)?;
            (Ipv4Addr::from(o).into(), &b[5..])
        }
        Some(6) => {
            let o: [u8; 16] = b
                .get(1..17)
                .ok_or(DiscoError::Malformed)?
                .try_into()
                .map_err(|_| DiscoError::Malformed)?;
            (Ipv6Addr::from(o).into(), &b[17..])
        }
        _ => return Err(DiscoError::Malformed),
    };
    let port: [u8; 2] = rest
        .get(..2)
        .ok_or(DiscoError::Malformed)?
        .try_into()
        .map_err(|_| DiscoError::Malformed)?;
    Ok((SocketAddr::new(ip, u16::from_be_bytes(port)), &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(seed: u8) -> ([u8; 32], PublicKey) {
        let secret = [seed; 32];
        let s = x25519_dalek::StaticSecret::from(secret);
        (
            secret,
            PublicKey(*x25519_dalek::PublicKey::from(&s).as_bytes()),
        )
    }

    #[test]
    fn a_probe_opens_on_the_other_side_and_nowhere_else() {
        let (a_sec, a_pub) = keypair(1);
        let (b_sec, b_pub) = keypair(2);
        let (c_sec, _) = keypair(3);
        let ab = PairKey::derive(&a_sec, &b_pub).unwrap();
        let ba = PairKey::derive(&b_sec, &a_pub).unwrap();
        let pong = Probe::Pong {
            tx: [7; TX_LEN],
            observed: "[2001:db8::1]:51820".parse().unwrap(),
        };
        let d = ab.seal(&a_pub, &pong, [9; 24]);
        assert!(is_disco(&d) && d.len() <= MAX_LEN);
        assert_eq!(probe_sender(&d), Some(a_pub));
        assert_eq!(ba.open(&d), Ok(pong));
        // A third node, even knowing a's public key, cannot open or forge it.
        let cb = PairKey::derive(&c_sec, &b_pub).unwrap();
        assert_eq!(cb.open(&d), Err(DiscoError::Forged));
        let forged = cb.seal(&a_pub, &Probe::Ping { tx: [1; TX_LEN] }, [0; 24]);
        assert_eq!(ba.open(&forged), Err(DiscoError::Forged));
        // Any flipped bit, header included, fails.
        for i in 0..d.len() {
            let mut x = d.clone();
            x[i] ^= 0x20;
            assert!(ba.open(&x).is_err(), "byte {i}");
        }
    }

    #[test]
    fn every_kind_of_probe_opens_as_itself_and_nothing_longer_opens() {
        let (a_sec, a_pub) = keypair(1);
        let (b_sec, b_pub) = keypair(2);
        let ab = PairKey::derive(&a_sec, &b_pub).unwrap();
        let ba = PairKey::derive(&b_sec, &a_pub).unwrap();
        let tx = [5; TX_LEN];
        for p in [
            Probe::Ping { tx },
            Probe::Pong {
                tx,
                observed: "198.51.100.7:40000".parse().unwrap(),
            },
            Probe::RelayedPing { tx },
            Probe::RelayedPong { tx },
        ] {
            let d = ab.seal(&a_pub, &p, [2; 24]);
            assert!(d.len() <= MAX_LEN);
            assert_eq!(ba.open(&d), Ok(p));
        }
        // A relayed probe's body is its kind and transaction, nothing more.
        let raw = |body: &[u8]| {
            let mut out = PROBE_MAGIC.to_vec();
            out.extend_from_slice(&a_pub.0);
            out.extend_from_slice(&[2; 24]);
            let aad = out.clone();
            let sealed = ab
                .aead
                .encrypt(
                    XNonce::from_slice(&[2; 24]),
                    Payload {
                        msg: body,
                        aad: &aad,
                    },
                )
                .unwrap();
            out.extend_from_slice(&sealed);
            out
        };
        for kind in [3u8, 4] {
            let mut body = vec![kind];
            body.extend_from_slice(&tx);
            assert!(ba.open(&raw(&body)).is_ok());
            body.push(0);
            assert_eq!(ba.open(&raw(&body)), Err(DiscoError::Malformed));
        }
        assert_eq!(ba.open(&raw(&[5; 1 + TX_LEN])), Err(DiscoError::Malformed));
    }

    #[test]
    fn a_low_order_peer_key_gives_no_pair_key() {
        let (a_sec, _) = keypair(1);
        assert_eq!(
            PairKey::derive(&a_sec, &PublicKey([0; 32])).err(),
            Some(DiscoError::WeakKey)
        );
    }

    #[test]
    fn reflect_round_trips_and_garbage_is_refused() {
        for r in [
            Reflect::Request { tx: [3; TX_LEN] },
            Reflect::Response {
                tx: [4; TX_LEN],
                observed: "198.51.100.7:40000".parse().unwrap(),
            },
        ] {
            let d = r.encode();
            assert!(is_disco(&d));
            assert_eq!(Reflect::decode(&d), Ok(r));
            for cut in 0..d.len() {
                assert!(Reflect::decode(&d[..cut]).is_err());
            }
        }
        assert!(!is_disco(&[1, 0, 0, 0, 5, 6, 7, 8]));
        assert!(Reflect::decode(b"MLstn\x01\x09").is_err());
    }
}
