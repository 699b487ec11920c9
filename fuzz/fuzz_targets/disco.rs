//! Discovery datagrams (`meshlink_proto::disco`), as they arrive on the WireGuard socket from
//! anyone: `is_disco`, `Reflect::decode`, `probe_sender` and `PairKey::open`.
//!
//! Input: `mode | bytes`.
//! - mode 0: the bytes are a datagram. A reflect message that decodes must encode to the same
//!   bytes; a probe that opens must seal back to the same bytes.
//! - mode 1: the bytes are `nonce (24) | body`, sealed here for the pair (a, b) exactly as a
//!   peer holding a's key would seal them, so that the parser behind the seal is reached with
//!   any body. b opens it (or refuses it as malformed, never as forged); a opens it the same.
//! - mode 2: `tx (12) | family | IP | port`: a reflect response and a pong built from fields
//!   must survive encoding.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use libfuzzer_sys::fuzz_target;
use meshlink_proto::disco::{
    is_disco, probe_sender, DiscoError, PairKey, Probe, Reflect, PROBE_MAGIC, REFLECT_MAGIC, TX_LEN,
};
use meshlink_proto::PublicKey;

/// `disco.rs`'s KDF label (private there). `fixture` checks that sealing here matches.
const KDF_LABEL: &[u8] = b"meshlink disco v1";

struct Fixture {
    a_pub: PublicKey,
    /// a's pair key with b, and b's with a (the same key, derived from either side).
    ab: PairKey,
    ba: PairKey,
    /// The same key, for sealing arbitrary bodies.
    raw: XChaCha20Poly1305,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (a_sec, b_sec) = ([1u8; 32], [2u8; 32]);
        let a_pub = PublicKey(meshlink_fuzz::public_of(a_sec));
        let b_pub = PublicKey(meshlink_fuzz::public_of(b_sec));
        let ab = PairKey::derive(&a_sec, &b_pub).unwrap();
        let ba = PairKey::derive(&b_sec, &a_pub).unwrap();
        let shared = x25519_dalek::StaticSecret::from(a_sec)
            .diffie_hellman(&x25519_dalek::PublicKey::from(b_pub.0));
        let (lo, hi) = if a_pub.0 <= b_pub.0 {
            (a_pub.0, b_pub.0)
        } else {
            (b_pub.0, a_pub.0)
        };
        let mut h = Blake2s256::new();
        h.update(KDF_LABEL);
        h.update(shared.as_bytes());
        h.update(lo);
        h.update(hi);
        let raw = XChaCha20Poly1305::new(&h.finalize());
        let f = Fixture { a_pub, ab, ba, raw };
        let ping = Probe::Ping { tx: [7; TX_LEN] };
        let mut body = vec![1u8];
        body.extend_from_slice(&[7; TX_LEN]);
        assert_eq!(
            seal_raw(&f, [9; 24], &body),
            f.ab.seal(&f.a_pub, &ping, [9; 24]),
            "the fuzz target's sealing no longer matches disco.rs (KDF label or layout changed)"
        );
        f
    })
}

/// Seals any body as a probe from a, with disco.rs's layout.
fn seal_raw(f: &Fixture, nonce: [u8; 24], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&PROBE_MAGIC);
    out.extend_from_slice(&f.a_pub.0);
    out.extend_from_slice(&nonce);
    let aad = out.clone();
    let sealed = f
        .raw
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: body,
                aad: &aad,
            },
        )
        .expect("sealing cannot fail");
    out.extend_from_slice(&sealed);
    out
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => datagram(f, rest),
        1 => sealed(f, rest),
        _ => fields(f, rest),
    }
});

fn datagram(f: &Fixture, d: &[u8]) {
    let disco = is_disco(d);
    assert_eq!(
        disco,
        d.starts_with(&PROBE_MAGIC) || d.starts_with(&REFLECT_MAGIC)
    );
    if let Ok(r) = Reflect::decode(d) {
        assert!(disco);
        assert_eq!(
            r.encode(),
            d,
            "a reflect message that decodes is not canonical"
        );
    }
    let sender = probe_sender(d);
    if let Some(s) = sender {
        assert_eq!(&s.0[..], &d[6..38]);
    }
    for key in [&f.ab, &f.ba] {
        if let Ok(p) = key.open(d) {
            let nonce: [u8; 24] = d[38..62].try_into().unwrap();
            let sender = sender.expect("an opened probe names its sender");
            assert_eq!(
                f.ab.seal(&sender, &p, nonce),
                d,
                "an opened probe is not canonical"
            );
        }
    }
}

fn sealed(f: &Fixture, rest: &[u8]) {
    let Some((nonce, body)) = rest.split_first_chunk::<24>() else {
        return;
    };
    let d = seal_raw(f, *nonce, body);
    assert!(is_disco(&d));
    assert_eq!(probe_sender(&d), Some(f.a_pub));
    let opened = f.ba.open(&d);
    assert_eq!(
        f.ab.open(&d),
        opened,
        "the two ends of a pair open differently"
    );
    match opened {
        Ok(p) => {
            assert_eq!(
                f.ab.seal(&f.a_pub, &p, *nonce),
                d,
                "an opened probe is not canonical"
            );
        }
        Err(DiscoError::Malformed) => {}
        Err(e) => panic!("a probe sealed with the pair's key was refused as {e:?}"),
    }
}

fn fields(f: &Fixture, rest: &[u8]) {
    let Some((tx, rest)) = rest.split_first_chunk::<TX_LEN>() else {
        return;
    };
    let Some((family, rest)) = rest.split_first() else {
        return;
    };
    let ip: IpAddr = if family & 1 == 0 {
        let Some((o, _)) = rest.split_first_chunk::<4>() else {
            return;
        };
        Ipv4Addr::from(*o).into()
    } else {
        let Some((o, _)) = rest.split_first_chunk::<16>() else {
            return;
        };
        Ipv6Addr::from(*o).into()
    };
    let port = u16::from_be_bytes([rest.first().copied().unwrap_or(0), *family]);
    let observed = SocketAddr::new(ip, port);
    for r in [
        Reflect::Request { tx: *tx },
        Reflect::Response { tx: *tx, observed },
    ] {
        assert_eq!(Reflect::decode(&r.encode()), Ok(r));
    }
    for p in [Probe::Ping { tx: *tx }, Probe::Pong { tx: *tx, observed }] {
        let d = f.ab.seal(&f.a_pub, &p, [family.wrapping_mul(3); 24]);
        assert_eq!(f.ba.open(&d), Ok(p));
    }
}
