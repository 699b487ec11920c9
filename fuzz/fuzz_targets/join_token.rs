//! Join tokens: `JoinToken::decode`, the parser of what `meshlink-agent up --token` takes (from
//! argv, a file, stdin or `MESHLINK_TOKEN`).
//!
//! Input: the token text (lossily UTF-8). A token that decodes must hold what the decoder
//! promises (a secret, a 64-character pin, non-empty addresses) and survive `encode`. The same
//! bytes, cut at NUL bytes into `addresses.. | fingerprint | secret`, also go through
//! `JoinToken::new`; a token made with a 64-character pin and a secret must decode to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlink_proto::token::JoinToken;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = JoinToken::decode(&text) {
        assert!(!t.secret.is_empty());
        assert_eq!(t.fingerprint.len(), 64);
        check_addresses(&t);
        let again = JoinToken::decode(&t.encode()).expect("an encoded token decodes");
        assert_eq!(again, t, "token changed in a round trip");
    }

    let parts: Vec<&str> = text.split('\0').collect();
    if let [addresses @ .., fingerprint, secret] = parts.as_slice() {
        let made = JoinToken::new(
            addresses.iter().map(|a| (*a).to_string()),
            (*fingerprint).to_string(),
            (*secret).to_string(),
        );
        let Some(t) = made else {
            assert!(addresses.iter().all(|a| a.trim().is_empty()));
            return;
        };
        check_addresses(&t);
        match JoinToken::decode(&t.encode()) {
            Ok(back) => assert_eq!(back, t, "a new token changed in a round trip"),
            Err(e) => assert!(
                fingerprint.len() != 64 || secret.is_empty(),
                "a token made with a pin and a secret does not decode: {e}"
            ),
        }
    }
});

fn check_addresses(t: &JoinToken) {
    let all = t.coordinators();
    assert_eq!(all.first(), Some(&t.coordinator));
    for (i, a) in all.iter().enumerate() {
        assert!(!a.trim().is_empty(), "an empty coordinator address");
        assert!(!all[..i].contains(a), "a coordinator address twice");
    }
}
