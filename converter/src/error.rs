//! Error helpers shared by the modules: the text of an error with its sources.

/// An error with its sources, `: `-separated (for logs; the binary prints chains with anyhow).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
