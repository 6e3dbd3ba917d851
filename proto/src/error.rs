//! Error helpers shared by the binaries.

/// An error with its sources, `: `-separated: `error: cause: cause` (for logs and for messages
/// that carry an error as text, such as the `Error` frame and job logs).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("open volume")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_source_follows_its_error() {
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(super::chain(&e), "open volume: disk gone");
    }
}
