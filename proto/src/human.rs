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

/// A duration with its unit (`s`, `m`, `h` or `d`), in seconds; zero is refused.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 10m, 1h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}` needs a unit: s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}` is not a usable duration"))
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
    fn durations_need_a_unit_and_a_length() {
        assert_eq!(super::parse_secs("10m"), Ok(600));
        assert_eq!(super::parse_secs("7d"), Ok(7 * 86400));
        assert!(super::parse_secs("10")
            .unwrap_err()
            .contains("needs a unit"));
        assert!(super::parse_secs("0h").is_err());
    }
}
