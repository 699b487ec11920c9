//! Control frames: the length-prefixed JSON records of a control stream, read by
//! `meshlink_proto::control::Decoder` as the coordinator reads an agent (`ClientMessage`) and an
//! agent reads the coordinator (`ServerMessage`), with relay records among them.
//!
//! Input: `mode | chunk pattern | stream`. The stream is decoded twice, whole and in the pieces
//! the pattern gives; the two must yield the same records and the same first error. Every
//! record decoded must come back unchanged through `encode`/`encode_relay` and a new decoder.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use meshlink_proto::control::{
    encode, encode_relay, ClientMessage, CodecError, Decoder, Record, ServerMessage,
    MAX_CLIENT_MESSAGE, MAX_RELAY_RECORD, MAX_SERVER_MESSAGE,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A cap small enough that the fuzzer meets it (the real caps are 64 KiB and 64 MiB).
const SMALL_CAP: usize = 48;
/// The largest length a message prefix can state (the top bit marks relay records).
const NO_CAP: usize = 0x7fff_ffff;

fuzz_target!(|data: &[u8]| {
    let [mode, pattern, stream @ ..] = data else {
        return;
    };
    let small = mode & 4 != 0;
    let records = mode & 2 != 0;
    if mode & 1 == 0 {
        let cap = if small { SMALL_CAP } else { MAX_CLIENT_MESSAGE };
        check::<ClientMessage>(stream, *pattern, cap, records, |_| {});
    } else {
        let cap = if small { SMALL_CAP } else { MAX_SERVER_MESSAGE };
        check::<ServerMessage>(stream, *pattern, cap, records, |m| {
            let _ = m.kind();
        });
    }
});

type Outcome<T> = Vec<Result<Record<T>, CodecError>>;

fn check<T>(stream: &[u8], pattern: u8, cap: usize, records: bool, each: impl Fn(&T))
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let whole = decode_all::<T>(&[stream], cap, records);
    let pieces = decode_all::<T>(&meshlink_fuzz::chunks(pattern, stream), cap, records);
    assert_eq!(whole, pieces, "decoding depends on how the stream was cut");

    for record in whole.iter().filter_map(|r| r.as_ref().ok()) {
        match record {
            Record::Message(m) => {
                each(m);
                let bytes = encode(m);
                let mut d = Decoder::new(NO_CAP);
                d.push(&bytes)
                    .expect("an encoded message fits its own prefix");
                let back = d.decode::<T>().expect("an encoded message decodes");
                assert_eq!(back.as_ref(), Some(m), "message changed in a round trip");
                assert_eq!(d.buffered(), 0);
            }
            Record::Relay(frame) => {
                assert!(frame.len() <= MAX_RELAY_RECORD);
                let bytes = encode_relay(frame).expect("a decoded relay record re-encodes");
                let mut d = Decoder::new(cap);
                d.push(&bytes).expect("a relay record fits its own cap");
                match d.decode_record::<T>() {
                    Ok(Some(Record::Relay(back))) => assert_eq!(&back, frame),
                    other => panic!("relay record came back as {other:?}"),
                }
            }
        }
    }
}

/// Feeds `pieces` one after the other, taking every whole record after each, up to and
/// including the first error (after which a stream is unusable).
fn decode_all<T: DeserializeOwned>(pieces: &[&[u8]], cap: usize, records: bool) -> Outcome<T> {
    let mut d = Decoder::new(cap);
    let mut out = Vec::new();
    for piece in pieces {
        if let Err(e) = d.push(piece) {
            out.push(Err(e));
            return out;
        }
        loop {
            let next = if records {
                d.decode_record::<T>()
            } else {
                d.decode::<T>().map(|m| m.map(Record::Message))
            };
            match next {
                Ok(Some(r)) => out.push(Ok(r)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
        // Whatever is held is less than one record: its prefix, if whole, is within the cap.
        assert!(d.buffered() < 4 + cap.max(MAX_RELAY_RECORD));
    }
    out
}
