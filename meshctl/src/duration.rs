//! Human durations: `--expires 90s|30m|1h|2d|1w` in, `3d4h` out.
//!
//! Both ways go through [`jiff`]'s friendly duration format. It reads `90s`, `30m`, `1h30m`,
//! `2d` and `1w`, and also `1h 30m`, `90 seconds`, `1.5h` and ISO 8601 (`PT1H30M`); its units
//! are written largest first (`30m1h` is refused). A day is 24 hours and a week 7 days here.
//!
//! What stays ours is policy, which no crate decides for us: a duration of zero is refused (a
//! token that expires at once is always a mistake), and so are negative ones (`-1h`,
//! `1h ago`), parts of a second (the coordinator counts whole seconds), and years or months
//! (they have no fixed length). [`format`] keeps the two largest units, which is a choice of
//! precision rather than of notation; `jiff` balances, truncates and writes them.

use std::time::Duration;

use jiff::fmt::friendly::{Designator, Spacing, SpanPrinter};
use jiff::{RoundMode, SignedDuration, Span, SpanRelativeTo, SpanRound, Unit};

/// Why a duration argument cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing was given.
    #[error("empty duration; write it like 90s, 30m, 1h or 2d")]
    Empty,
    /// The text is not a duration; `reason` is the parser's account of where it went wrong
    /// (an unknown unit, a number without a unit, a number out of range).
    #[error("{text:?} is not a duration ({reason}); write it like 90s, 30m, 1h or 2d")]
    Malformed {
        /// The text given.
        text: String,
        /// What the parser found wrong.
        reason: String,
    },
    /// Years or months, which have no fixed length.
    #[error("{text:?} counts years or months, which have no fixed length; use d or w")]
    Calendar {
        /// The text given.
        text: String,
    },
    /// The duration is negative (`-1h`, `1h ago`).
    #[error("the duration {text:?} is negative")]
    Negative {
        /// The text given.
        text: String,
    },
    /// The duration has a part of a second (`1.5s`, `500ms`).
    #[error("the duration {text:?} is not a whole number of seconds")]
    Fraction {
        /// The text given.
        text: String,
    },
    /// The duration adds up to zero.
    #[error("the duration {text:?} is zero")]
    Zero {
        /// The text given.
        text: String,
    },
}

/// Reads a duration such as `90s`, `30m`, `1h30m`, `2d` or `1w`.
///
/// # Errors
///
/// A [`DurationError`] saying what is wrong with `text`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let text = || trimmed.to_owned();
    let malformed = |e: jiff::Error| DurationError::Malformed {
        text: text(),
        reason: e.to_string(),
    };
    let span: Span = trimmed.parse().map_err(malformed)?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(DurationError::Calendar { text: text() });
    }
    if span.is_negative() {
        return Err(DurationError::Negative { text: text() });
    }
    let exact = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(malformed)?;
    if exact.subsec_nanos() != 0 {
        return Err(DurationError::Fraction { text: text() });
    }
    if exact.is_zero() {
        return Err(DurationError::Zero { text: text() });
    }
    Duration::try_from(exact).map_err(malformed)
}

/// Writes a number of seconds compactly with its two largest units: `45s`, `1m30s`, `3d4h`.
/// The second unit is the one right below the first, so a day and a minute is `1d`.
pub fn format(seconds: u64) -> String {
    compact(seconds).unwrap_or_else(|| format!("{seconds}s"))
}

/// [`format`], or `None` past the longest span `jiff` holds (about 20,000 years), which only a
/// wrong clock or a hostile answer can send.
fn compact(seconds: u64) -> Option<String> {
    let exact = SignedDuration::from_secs(i64::try_from(seconds).ok()?);
    let in_days = SpanRound::new()
        .largest(Unit::Day)
        .days_are_24_hours()
        .mode(RoundMode::Trunc);
    let balanced = Span::try_from(exact).ok()?.round(in_days).ok()?;
    let second_unit = if balanced.get_days() != 0 {
        Unit::Hour
    } else if balanced.get_hours() != 0 {
        Unit::Minute
    } else {
        Unit::Second
    };
    let kept = balanced.round(in_days.smallest(second_unit)).ok()?;
    let printer = SpanPrinter::new()
        .designator(Designator::Compact)
        .spacing(Spacing::None);
    Some(printer.span_to_string(&kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_and_longer_forms_are_read() {
        let cases = [
            // The forms the flags' help and the README show.
            ("90s", 90),
            ("30m", 1_800),
            ("1h", 3_600),
            ("1h30m", 5_400),
            ("2d", 172_800),
            ("30d", 2_592_000),
            ("1w", 604_800),
            (" 5m ", 300),
            ("1d2h3m4s", 93_784),
            ("1w1d", 691_200),
            // What jiff reads besides.
            ("1h 30m", 5_400),
            ("90 seconds", 90),
            ("2 days", 172_800),
            ("1.5h", 5_400),
            ("PT1H30M", 5_400),
        ];
        for (text, seconds) in cases {
            assert_eq!(parse(text), Ok(Duration::from_secs(seconds)), "{text}");
        }
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("  "), Err(DurationError::Empty));
        for text in ["90", "h", "soon", "3x", "1h1h", "30m1h", "1h;rm"] {
            assert!(
                matches!(parse(text), Err(DurationError::Malformed { text: t, .. }) if t == text),
                "{text}: {:?}",
                parse(text)
            );
        }
        assert!(matches!(parse("3y"), Err(DurationError::Calendar { .. })));
        assert!(matches!(parse("1mo"), Err(DurationError::Calendar { .. })));
        assert!(matches!(parse("-1h"), Err(DurationError::Negative { .. })));
        assert!(matches!(
            parse("1h ago"),
            Err(DurationError::Negative { .. })
        ));
        assert!(matches!(parse("1.5s"), Err(DurationError::Fraction { .. })));
        assert!(matches!(
            parse("500ms"),
            Err(DurationError::Fraction { .. })
        ));
        assert!(matches!(parse("0s"), Err(DurationError::Zero { .. })));
        assert!(matches!(parse("0h0m"), Err(DurationError::Zero { .. })));
    }

    #[test]
    fn overflow_is_refused() {
        for text in ["99999999999999999999s", "18446744073709551615w"] {
            assert!(
                matches!(parse(text), Err(DurationError::Malformed { .. })),
                "{text}: {:?}",
                parse(text)
            );
        }
    }

    #[test]
    fn errors_name_the_text_and_explain_the_form() {
        let message = parse("soon").unwrap_err().to_string();
        assert!(message.contains("\"soon\""), "{message}");
        assert!(message.contains("90s"), "{message}");
        let message = parse("0s").unwrap_err().to_string();
        assert!(message.contains("\"0s\""), "{message}");
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

    #[test]
    fn format_survives_any_number() {
        assert_eq!(format(u64::MAX), "18446744073709551615s");
        assert_eq!(format(i64::MAX as u64), "9223372036854775807s");
    }

    #[test]
    fn format_reads_back() {
        for seconds in [1, 59, 90, 3_600, 5_400, 86_400, 93_600, 40 * 86_400] {
            assert_eq!(
                parse(&format(seconds)),
                Ok(Duration::from_secs(seconds)),
                "{seconds}"
            );
        }
    }
}
