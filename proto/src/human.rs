//! Sizes written for people, the same in every binary: `512 B`, `1.5 KiB`, `2.0 GiB`.

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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(2 << 30), "2.0 GiB");
    }
}
