//! Showing text from a file or a socket in an error message without repeating a secret: a
//! line that should have been `Key = value` may hold a private key where the key name was
//! expected (`PrivateKey <base64>` without its `=`, a hex key on a UAPI line).

/// The names of keys whose values are secrets, in UAPI and wg-quick spelling (compared
/// without regard to case).
const SECRET_KEYS: [&str; 4] = ["private_key", "preshared_key", "privatekey", "presharedkey"];

/// `text` when it looks like a key name (letters, digits, `_`, `-`; at most 32 characters),
/// otherwise a placeholder that shows nothing of it. A name that begins with the name of a
/// secret's key and goes on (`private_key0123abcd`) is not shown either: that is the start of
/// the secret, glued to its key's name where the `=` was left out.
#[must_use]
pub fn key_name(text: &str) -> String {
    let glued = SECRET_KEYS.iter().any(|k| {
        text.len() > k.len()
            && text
                .get(..k.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(k))
    });
    let plain = !text.is_empty()
        && !glued
        && text.len() <= 32
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        text.to_string()
    } else {
        "(a key name that is not one; not shown)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pass_and_anything_like_a_key_does_not() {
        assert_eq!(key_name("PersistentKeepalive"), "PersistentKeepalive");
        assert_eq!(key_name("private_key"), "private_key");
        let b64 = "PrivateKey IV7qqsBi/ViVTOQOqwUkrFpG1qrLDDQ8B2Gju/JnSVY";
        assert!(!key_name(b64).contains("IV7q"));
        let hex = "3f".repeat(32);
        assert!(!key_name(&hex).contains("3f3f"));
        assert!(!key_name("").is_empty());
        assert_eq!(key_name("PresharedKey"), "PresharedKey");
        assert!(!key_name("PrivateKeyIV7qqsBi").contains("IV7q"));
    }
}
