//! Human durations: `--expires 90s|30m|1h|2d` in, `3d4h` out.
//!
//! The accepted form is one or more `<number><unit>` pairs, largest first or not, without
//! spaces: `90s`, `1h30m`, `2d`. Units are `s`, `m`, `h`, `d` and `w`. A duration of zero is
//! refused: a token that expires at once is always a mistake.

use std::time::Duration;

/// Why a duration argument cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing was given.
    #[error("empty duration; write it like 90s, 30m, 1h or 2d")]
    Empty,
    /// A number is not followed by a unit, or a unit by no number.
    #[error("{text:?} is not a duration; write it like 90s, 30m, 1h or 2d")]
    Malformed {
        /// The text given.
        text: String,
    },
    /// The unit is none of `s`, `m`, `h`, `d`, `w`.
    #[error("unknown unit {unit:?} in {text:?}; use s, m, h, d or w")]
    UnknownUnit {
        /// The unit found.
        unit: String,
        /// The text given.
        text: String,
    },
    /// The duration adds up to zero.
    #[error("the duration {text:?} is zero")]
    Zero {
        /// The text given.
        text: String,
    },
    /// The duration does not fit in 64 bits of seconds.
    #[error("the duration {text:?} is too long")]
    TooLong {
        /// The text given.
        text: String,
    },
}

/// Seconds per unit letter.
fn unit_seconds(unit: &str) -> Option<u64> {
    match unit {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(60 * 60),
        "d" => Some(24 * 60 * 60),
        "w" => Some(7 * 24 * 60 * 60),
        _ => None,
    }
}

/// Reads a duration such as `90s`, `30m`, `1h30m` or `2d`.
///
/// # Errors
///
/// A [`DurationError`] saying what is wrong with `text`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed {
        text: trimmed.to_owned(),
    };
    let too_long = || DurationError::TooLong {
        text: trimmed.to_owned(),
    };
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(malformed());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let letters = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        if letters == 0 {
            return Err(malformed());
        }
        let unit = &rest[..letters];
        let per_unit = unit_seconds(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.to_owned(),
            text: trimmed.to_owned(),
        })?;
        rest = &rest[letters..];
        total = number
            .checked_mul(per_unit)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(too_long)?;
    }
    if total == 0 {
        return Err(DurationError::Zero {
            text: trimmed.to_owned(),
        });
    }
    Ok(Duration::from_secs(total))
}

/// Writes a number of seconds compactly with its two largest units: `45s`, `1m30s`, `3d4h`.
pub fn format(seconds: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    if seconds == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = seconds;
    let mut parts = 0;
    for (size, letter) in UNITS {
        if parts == 2 {
            break;
        }
        let count = rest / size;
        if count > 0 {
            out.push_str(&format!("{count}{letter}"));
            rest -= count * size;
            parts += 1;
        } else if parts > 0 {
            // The second unit is the one right below the first, so `1d0h` is written `1d`.
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse(" 5m "), Ok(Duration::from_secs(300)));
    }

    #[test]
    fn combined_units() {
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("1d2h3m4s"), Ok(Duration::from_secs(93_784)));
        assert_eq!(parse("30m1h"), Ok(Duration::from_secs(5_400)));
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(parse("90"), Err(DurationError::Malformed { .. })));
        assert!(matches!(parse("h"), Err(DurationError::Malformed { .. })));
        assert!(matches!(parse("-1h"), Err(DurationError::Malformed { .. })));
        assert!(matches!(
            parse("1.5h"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("1 h"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("3y"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("1H"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse("0s"), Err(DurationError::Zero { .. })));
        assert!(matches!(parse("0h0m"), Err(DurationError::Zero { .. })));
    }

    #[test]
    fn overflow_is_refused() {
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse("18446744073709551615w"),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn errors_explain_the_form() {
        let message = parse("soon").unwrap_err().to_string();
        assert!(message.contains("90s"), "{message}");
    }

    #[test]
    fn format_uses_two_largest_units() {
        assert_eq!(format(0), "0s");
        assert_eq!(format(45), "45s");
        assert_eq!(format(90), "1m30s");
        assert_eq!(format(3_600), "1h");
        assert_eq!(format(3_661), "1h1m");
        assert_eq!(format(86_400 + 7_200 + 5), "1d2h");
        assert_eq!(format(86_400 + 60), "1d");
        assert_eq!(format(40 * 86_400), "40d");
    }
}
