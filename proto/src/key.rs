//! WireGuard keys as they appear in configuration and on the wire: 32 bytes, written as
//! standard base64 with padding (44 characters), exactly as `wg genkey` and `wg pubkey` print them.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Why a string is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not base64.
    #[error("not valid base64")]
    NotBase64,
    /// The text decodes, but not to 32 bytes.
    #[error("a key is 32 bytes (44 base64 characters), this one is {0} bytes")]
    WrongLength(usize),
}

/// 32 bytes of key material: a public, private or preshared key.
///
/// `Debug` does not print the bytes, so a secret held in a `Key` never lands in a log by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Parses base64 text (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`KeyError`] when the text is not base64 or not 32 bytes long.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::NotBase64)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        Ok(Key(arr))
    }

    /// Parses the lowercase hex form used by the WireGuard userspace API.
    ///
    /// # Errors
    /// [`KeyError`] when the text is not 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(KeyError::WrongLength(text.len() / 2));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).map_err(|_| KeyError::NotBase64)?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| KeyError::NotBase64)?;
        }
        Ok(Key(out))
    }

    /// The base64 text of the key.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The lowercase hex text of the key, as the WireGuard userspace API writes it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// True when every byte is zero (the userspace API's way of saying "no key").
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// A peer's public key. Unlike [`Key`], it prints itself in base64, since it is not a secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The base64 text of the key.
    pub fn to_base64(&self) -> String {
        Key(self.0).to_base64()
    }

    /// A short form for logs: the first 8 characters of the base64 text.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_string()
    }

    /// Whether the key is one of the Curve25519 points of small order (or an encoding of
    /// one: the top bit is ignored by X25519): Diffie-Hellman with it gives a result anyone can
    /// predict, so no tunnel with such a peer would be private. The list is the usual one
    /// (0, 1, the two points of order 8, and p - 1, p, p + 1).
    pub fn has_small_order(&self) -> bool {
        const SMALL_ORDER: [[u8; 32]; 7] = [
            [0; 32],
            [
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0,
            ],
            [
                0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
                0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
                0x5f, 0x49, 0xb8, 0x00,
            ],
            [
                0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
                0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
                0xd0, 0x9f, 0x11, 0x57,
            ],
            [
                0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0x7f,
            ],
            [
                0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0x7f,
            ],
            [
                0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0x7f,
            ],
        ];
        let mut k = self.0;
        k[31] &= 0x7f;
        SMALL_ORDER.contains(&k)
    }
}

impl From<Key> for PublicKey {
    fn from(k: Key) -> Self {
        PublicKey(k.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Key::from_base64(s).map(PublicKey::from)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        let k = Key([7u8; 32]);
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(k.to_base64().len(), 44);
    }

    #[test]
    fn hex_round_trip() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8 * 7;
        }
        let k = Key(b);
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert!(Key::from_hex("zz").is_err());
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(Key::from_base64("not base64!"), Err(KeyError::NotBase64));
        assert_eq!(Key::from_base64("AAAA"), Err(KeyError::WrongLength(3)));
    }

    #[test]
    fn debug_hides_secret() {
        assert_eq!(format!("{:?}", Key([1; 32])), "Key(..)");
    }

    #[test]
    fn small_order_points_are_known_with_either_top_bit() {
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(PublicKey([0; 32]).has_small_order());
        assert!(PublicKey(one).has_small_order());
        let mut top = one;
        top[31] |= 0x80;
        assert!(
            PublicKey(top).has_small_order(),
            "X25519 ignores the top bit"
        );
        let mut ordinary = [7u8; 32];
        ordinary[31] = 0x40;
        assert!(!PublicKey(ordinary).has_small_order());
    }
}
