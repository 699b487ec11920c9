//! Interface names: the one check every entry point applies (the agent's configuration and
//! flags, its socket, the wg-quick hook, meshctl's `--interface`).
//!
//! The rule is Linux's (at most 15 bytes, IFNAMSIZ less its NUL) narrowed to the characters
//! that are safe in a file name, in a shell line and in a log: ASCII letters, digits, `_`, `.`
//! and `-`, and neither `.` nor `..`. So a name is always a plain file name in the socket
//! directory and never needs quoting.

/// The longest interface name, in bytes: Linux's IFNAMSIZ (16) less the terminating NUL.
pub const MAX_INTERFACE_LEN: usize = 15;

/// Why a text is not an interface name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceNameError {
    /// The name is empty.
    #[error("the interface name is empty")]
    Empty,
    /// The name is longer than [`MAX_INTERFACE_LEN`] bytes.
    #[error("interface name {name:?} is {} bytes long; the limit is {MAX_INTERFACE_LEN}", .name.len())]
    TooLong {
        /// The name given.
        name: String,
    },
    /// The name holds a character other than an ASCII letter, a digit, `_`, `.` or `-`.
    #[error(
        "interface name {name:?} holds {character:?}; only letters, digits, `_`, `.` and `-` are allowed"
    )]
    Character {
        /// The name given.
        name: String,
        /// The first character not allowed.
        character: char,
    },
    /// The name is `.` or `..`, which name directories.
    #[error("{name:?} is not a valid interface name")]
    Dots {
        /// The name given.
        name: String,
    },
}

/// Checks that `name` may name an interface (see the module documentation for the rule).
///
/// # Errors
/// The first rule `name` breaks, in the order: empty, too long, a character not allowed, `.`
/// or `..`.
pub fn check_interface_name(name: &str) -> Result<(), InterfaceNameError> {
    if name.is_empty() {
        return Err(InterfaceNameError::Empty);
    }
    if name.len() > MAX_INTERFACE_LEN {
        return Err(InterfaceNameError::TooLong {
            name: name.to_owned(),
        });
    }
    if let Some(character) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(InterfaceNameError::Character {
            name: name.to_owned(),
            character,
        });
    }
    if name == "." || name == ".." {
        return Err(InterfaceNameError::Dots {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// `name`, owned, if it may name an interface: [`check_interface_name`] in the shape of a parser
/// (a clap `value_parser`, a configuration value).
///
/// # Errors
/// As [`check_interface_name`].
pub fn parse_interface_name(name: &str) -> Result<String, InterfaceNameError> {
    check_interface_name(name)?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accepted() {
        for name in [
            "mesh0",
            "wg0",
            "wg-test.0",
            "a",
            "...",
            ".hidden",
            "UPPER_lower-9",
            "fifteen_bytes_x",
        ] {
            assert_eq!(check_interface_name(name), Ok(()), "{name:?}");
            assert_eq!(parse_interface_name(name).as_deref(), Ok(name));
        }
    }

    #[test]
    fn names_refused() {
        use InterfaceNameError as E;
        let character = |name: &str, character| E::Character {
            name: name.into(),
            character,
        };
        let cases = [
            ("", E::Empty),
            (
                "sixteen_bytes_xx",
                E::TooLong {
                    name: "sixteen_bytes_xx".into(),
                },
            ),
            (
                "waytoolonginterface",
                E::TooLong {
                    name: "waytoolonginterface".into(),
                },
            ),
            (".", E::Dots { name: ".".into() }),
            ("..", E::Dots { name: "..".into() }),
            ("a/b", character("a/b", '/')),
            ("../x", character("../x", '/')),
            ("a\0b", character("a\0b", '\0')),
            ("a b", character("a b", ' ')),
            ("a\tb", character("a\tb", '\t')),
            ("a\nb", character("a\nb", '\n')),
            ("wg+1", character("wg+1", '+')),
            ("wg=1", character("wg=1", '=')),
            ("wg:1", character("wg:1", ':')),
            ("é0", character("é0", 'é')),
        ];
        for (name, expected) in cases {
            assert_eq!(
                parse_interface_name(name),
                Err(expected.clone()),
                "{name:?}"
            );
            assert_eq!(check_interface_name(name), Err(expected), "{name:?}");
        }
    }

    #[test]
    fn messages_name_the_rule() {
        let text = |name| check_interface_name(name).unwrap_err().to_string();
        assert_eq!(text(""), "the interface name is empty");
        assert_eq!(
            text("sixteen_bytes_xx"),
            "interface name \"sixteen_bytes_xx\" is 16 bytes long; the limit is 15"
        );
        assert_eq!(
            text("a/b"),
            "interface name \"a/b\" holds '/'; only letters, digits, `_`, `.` and `-` are allowed"
        );
        assert_eq!(text(".."), "\"..\" is not a valid interface name");
    }
}
