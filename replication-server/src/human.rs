//! How the operator commands and the job log write sizes and times for people: `2.0 GiB`, not
//! `2147483648` or `2048 mib`; `2026-12-02 06:52:10 (3 min ago)` in local time, not `@1796180312`.
//! `--json` output keeps the raw numbers (bytes, seconds since the epoch).

pub use rehost_proto::human::{bytes, duration_secs, period_secs, DurationError};

/// Seconds since the epoch as a local date-time, `2026-12-02 06:52:10`.
pub fn datetime(t: i64) -> String {
    // 64-bit Linux: time_t is i64.
    let tt: libc::time_t = t;
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers are valid for the call,
    // and localtime_r (unlike localtime) keeps no shared result buffer.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&tt, &mut tm).is_null() {
            return format!("{t} s after the epoch");
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// How long before `now` the time `t` was: `just now`, `42 s ago`, `3 min ago`, `5 h ago`,
/// `2 d ago`; a time after `now` reads `in 3 min`.
pub fn ago(t: i64, now: i64) -> String {
    let d = now.saturating_sub(t);
    let n = d.unsigned_abs();
    let span = if n < 60 {
        format!("{n} s")
    } else if n < 3600 {
        format!("{} min", n / 60)
    } else if n < 86_400 {
        format!("{} h", n / 3600)
    } else {
        format!("{} d", n / 86_400)
    };
    match d {
        0..=4 => "just now".into(),
        d if d < 0 => format!("in {span}"),
        _ => format!("{span} ago"),
    }
}

/// Both: `2026-12-02 06:52:10 (3 min ago)`.
pub fn when(t: i64, now: i64) -> String {
    format!("{} ({})", datetime(t), ago(t, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_units_with_one_decimal() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(2048 << 20), "2.0 GiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn times_are_dates_not_epoch_seconds() {
        let d = datetime(1_796_180_312);
        // Local time: only the shape is fixed (the zone is the machine's).
        assert_eq!(d.len(), 19, "{d}");
        assert!(d.starts_with("2026-"), "{d}");
        assert!(!d.contains('@'));
        assert_eq!(ago(100, 100), "just now");
        assert_eq!(ago(100, 142), "42 s ago");
        assert_eq!(ago(0, 185), "3 min ago");
        assert_eq!(ago(0, 5 * 3600 + 10), "5 h ago");
        assert_eq!(ago(0, 2 * 86_400), "2 d ago");
        assert_eq!(ago(400, 200), "in 3 min");
        assert!(when(0, 60).ends_with("(1 min ago)"));
    }
}
