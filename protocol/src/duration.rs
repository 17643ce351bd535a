//! Window lengths as people write them: `500ms`, `1s`, `10m`, `1h`, `1d`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

/// Milliseconds as people write them, in the largest unit that holds them whole: `90s`,
/// `1m`, `1500ms`, `0s`. [`parse_millis_or_zero`] reads it back.
pub fn format_millis(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    if ms == 0 {
        return "0s".to_owned();
    }
    UNITS.iter().find(|(size, _)| ms % size == 0).map_or_else(
        || format!("{ms}ms"),
        |(size, unit)| format!("{}{unit}", ms / size),
    )
}

/// Parses a positive duration into milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, DurationError> {
    match parse_millis_or_zero(text)? {
        0 => Err(DurationError(format!(
            "`{}` must be longer than zero",
            text.trim()
        ))),
        ms => Ok(ms),
    }
}

/// Parses a duration that may be zero (`0s`) into milliseconds.
pub fn parse_millis_or_zero(text: &str) -> Result<u64, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let amount: u64 = digits.parse().map_err(|_| {
        DurationError(format!(
            "`{text}` is not a duration like 500ms, 1s, 10m, 1h or 1d"
        ))
    })?;
    let scale: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(DurationError(format!(
                "`{text}` has no known unit (ms, s, m, h or d)"
            )))
        }
    };
    amount
        .checked_mul(scale)
        .ok_or_else(|| DurationError(format!("`{text}` is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_in_their_largest_whole_unit_and_read_back() {
        for (ms, text) in [
            (0, "0s"),
            (1_500, "1500ms"),
            (90_000, "90s"),
            (60_000, "1m"),
            (7_200_000, "2h"),
            (86_400_000, "1d"),
        ] {
            assert_eq!(format_millis(ms), text);
            assert_eq!(parse_millis_or_zero(text), Ok(ms));
        }
    }

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_millis("250ms"), Ok(250));
        assert_eq!(parse_millis("1s"), Ok(1_000));
        assert_eq!(parse_millis("10m"), Ok(600_000));
        assert_eq!(parse_millis("2h"), Ok(7_200_000));
        assert_eq!(parse_millis("1d"), Ok(86_400_000));
    }

    #[test]
    fn zero_is_allowed_only_where_asked_for() {
        assert_eq!(parse_millis_or_zero("0s"), Ok(0));
        assert!(parse_millis("0ms").is_err());
    }

    #[test]
    fn refuses_zero_missing_unit_and_garbage() {
        for bad in [
            "0s",
            "10",
            "s",
            "1w",
            "-1s",
            "",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert!(parse_millis(bad).is_err(), "{bad} should be refused");
        }
    }
}
