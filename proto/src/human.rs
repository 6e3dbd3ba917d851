//! Sizes and durations written for people, the same in every binary: `512 B`, `1.5 KiB`,
//! `2.0 GiB`; `10m`, `1h`, `7d`.

/// A size in binary units with one decimal: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn bytes(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// How a duration did not read.
#[derive(Debug, PartialEq, Eq)]
pub enum DurationError {
    /// It does not start with a count of digits.
    NotANumber,
    /// The text after the count is not one of `s`, `m`, `h`, `d` (empty: no unit where one is
    /// needed).
    Unit(String),
    /// The seconds do not fit.
    TooLong,
}

/// Seconds of a duration: a count with a unit (`90s`, `30m`, `24h`, `7d`), or a bare count of
/// seconds unless `unit_needed`. The one reader of durations: `token create --expires`,
/// retention policies and `serve --scrub-interval`, each with its own words for a mistake.
pub fn duration_secs(s: &str, unit_needed: bool) -> Result<u64, DurationError> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| DurationError::NotANumber)?;
    let mult = match unit {
        "" if !unit_needed => 1,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(DurationError::Unit(unit.to_string())),
    };
    n.checked_mul(mult).ok_or(DurationError::TooLong)
}

/// A retention period or scrub interval: a unit is needed, and zero is no period.
pub fn period_secs(s: &str) -> Result<u64, String> {
    match duration_secs(s, true) {
        Ok(v) if v > 0 => Ok(v),
        Ok(_) | Err(DurationError::TooLong) => Err(format!("`{s}` is not a usable duration")),
        Err(DurationError::NotANumber) => {
            Err(format!("`{s}` is not a duration like 10m, 1h or 7d"))
        }
        Err(DurationError::Unit(_)) => Err(format!("`{s}` needs a unit: s, m, h or d")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(2 << 30), "2.0 GiB");
    }

    #[test]
    fn durations_read_with_or_without_a_unit() {
        use super::{duration_secs, period_secs, DurationError};
        assert_eq!(duration_secs("90", false), Ok(90));
        assert_eq!(duration_secs("30m", false), Ok(1800));
        assert_eq!(duration_secs("7d", true), Ok(7 * 86400));
        assert_eq!(
            duration_secs("90", true),
            Err(DurationError::Unit(String::new()))
        );
        assert_eq!(
            duration_secs("3w", false),
            Err(DurationError::Unit("w".into()))
        );
        assert_eq!(duration_secs("m", false), Err(DurationError::NotANumber));
        assert_eq!(
            duration_secs("99999999999999999999d", false),
            Err(DurationError::NotANumber)
        );
        assert_eq!(
            duration_secs("999999999999999d", false),
            Err(DurationError::TooLong)
        );
        assert_eq!(period_secs("1h"), Ok(3600));
        assert!(period_secs("0m")
            .unwrap_err()
            .contains("not a usable duration"));
        assert!(period_secs("10").unwrap_err().contains("needs a unit"));
    }
}
