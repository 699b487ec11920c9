//! Relay frames (`meshlink_proto::relay`): what an agent receives as QUIC datagrams (or relay
//! records) from the coordinator's relay, read with `parse` and put back together with
//! `Reassembler::push`.
//!
//! Input: `mode | bytes`.
//! - mode 0: a sequence of frames, each `delay | peer | id | index | count | len | payload`
//!   (peer one of three keys, id one of eight, index and count as given, so that most headers
//!   are wrong), parsed and pushed at a clock moved by the delays (20 ms steps, across the 2 s
//!   window). Every datagram the reassembler gives back must be the sender's latest fragments
//!   of that datagram, in order.
//! - mode 1: the bytes are one frame: `parse` and `readdress` must agree with the layout.
//! - mode 2: `max frame (2) | id (2) | order seed | datagram`: `frames` cuts the datagram, and
//!   the frames, parsed and pushed in a shuffled order, give it back once, whole.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshlink_proto::relay::{
    frames, parse, readdress, Header, Reassembler, RelayError, HEADER_LEN, MAX_FRAGMENTS,
};
use meshlink_proto::PublicKey;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => sequence(rest),
        1 => one_frame(rest),
        _ => cut_and_join(rest),
    }
});

const PEERS: [PublicKey; 3] = [PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32])];

fn sequence(mut rest: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let mut r = Reassembler::new();
    // The latest payload per (peer, id, count, index).
    let mut latest: HashMap<(PublicKey, u16, u8, u8), Vec<u8>> = HashMap::new();
    let mut expired = 0;
    while let [delay, peer, id, index, count, len, tail @ ..] = rest {
        let n = usize::from(*len % 64).min(tail.len());
        let (payload, tail) = tail.split_at(n);
        rest = tail;
        now += Duration::from_millis(20 * u64::from(*delay));
        let peer = PEERS[usize::from(*peer) % PEERS.len()];
        let id = u16::from(*id % 8);
        let mut frame = peer.0.to_vec();
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&[*index, *count]);
        frame.extend_from_slice(payload);

        let Ok((h, bytes)) = parse(&frame) else {
            assert!(*count == 0 || usize::from(*count) > MAX_FRAGMENTS || index >= count);
            continue;
        };
        assert_eq!(
            h,
            Header {
                peer,
                id,
                index: *index,
                count: *count
            }
        );
        assert_eq!(bytes, payload);
        latest.insert((peer, id, h.count, h.index), payload.to_vec());
        let got = r.push(h, bytes, now);
        assert!(r.expired() >= expired, "the expired count went down");
        expired = r.expired();
        let Some((from, whole)) = got else {
            continue;
        };
        assert_eq!(from, peer, "a datagram came back under another sender");
        let want: Vec<u8> = (0..h.count)
            .flat_map(|i| {
                latest
                    .get(&(peer, id, h.count, i))
                    .expect("a datagram came back with a fragment never sent")
                    .clone()
            })
            .collect();
        assert_eq!(
            whole, want,
            "a datagram came back other than its latest fragments"
        );
    }
}

fn one_frame(frame: &[u8]) {
    match parse(frame) {
        Ok((h, bytes)) => {
            assert!(frame.len() >= HEADER_LEN);
            assert_eq!(&h.peer.0[..], &frame[..32]);
            assert_eq!(h.id, u16::from_be_bytes([frame[32], frame[33]]));
            assert!(h.count >= 1 && usize::from(h.count) <= MAX_FRAGMENTS && h.index < h.count);
            assert_eq!(bytes, &frame[HEADER_LEN..]);
            let mut copy = frame.to_vec();
            readdress(&mut copy, &PEERS[0]).expect("a frame that parses can be readdressed");
            let (h2, bytes2) = parse(&copy).expect("a readdressed frame parses");
            assert_eq!(h2.peer, PEERS[0]);
            assert_eq!((h2.id, h2.index, h2.count), (h.id, h.index, h.count));
            assert_eq!(bytes2, bytes);
        }
        Err(e) => {
            assert_eq!(e, RelayError::Malformed);
            let mut copy = frame.to_vec();
            if frame.len() < HEADER_LEN {
                assert!(readdress(&mut copy, &PEERS[0]).is_err());
            }
        }
    }
}

fn cut_and_join(rest: &[u8]) {
    let [m0, m1, i0, i1, seed, datagram @ ..] = rest else {
        return;
    };
    let max_frame = usize::from(u16::from_be_bytes([*m0, *m1]) % 2048);
    let id = u16::from_be_bytes([*i0, *i1]);
    let peer = PEERS[usize::from(*seed) % PEERS.len()];
    let cut = match frames(&peer, id, datagram, max_frame) {
        Ok(f) => f,
        Err(RelayError::TooLarge { len, max }) => {
            assert_eq!((len, max), (datagram.len(), max_frame));
            let room = max_frame.saturating_sub(HEADER_LEN);
            assert!(room == 0 || datagram.len() > MAX_FRAGMENTS * room);
            return;
        }
        Err(e) => panic!("frames failed with {e:?}"),
    };
    assert!(!cut.is_empty() && cut.len() <= MAX_FRAGMENTS);
    let mut joined = Vec::new();
    for (i, f) in cut.iter().enumerate() {
        assert!(f.len() <= max_frame, "a frame over the path's size");
        let (h, bytes) = parse(f).expect("a frame made by frames parses");
        assert_eq!(
            (h.peer, h.id, usize::from(h.index), usize::from(h.count)),
            (peer, id, i, cut.len())
        );
        joined.extend_from_slice(bytes);
    }
    assert_eq!(joined, datagram);

    // Push in an order drawn from the seed: the datagram comes back once, at the last frame.
    let mut order: Vec<usize> = (0..cut.len()).collect();
    let mut s = *seed;
    for i in (1..order.len()).rev() {
        s = s.wrapping_mul(33).wrapping_add(7);
        order.swap(i, usize::from(s) % (i + 1));
    }
    let mut r = Reassembler::new();
    let now = Instant::now();
    for (k, i) in order.iter().enumerate() {
        let (h, bytes) = parse(&cut[*i]).unwrap();
        let got = r.push(h, bytes, now);
        if k + 1 == order.len() {
            assert_eq!(
                got,
                Some((peer, datagram.to_vec())),
                "the datagram did not come back whole"
            );
        } else {
            assert_eq!(got, None, "a datagram came back before its last fragment");
        }
    }
}
