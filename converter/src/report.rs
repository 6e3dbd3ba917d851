//! The conversion report: every change with its file, old and new text, plus what was found; written as
//! JSON (`--report`) and printed as a human summary.

use serde::Serialize;

/// One change made (or, for `inspect`, planned) in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// fstab, grub-cfg, default-grub, initramfs, network, udev, hypervisor-tools, ...
    pub kind: String,
    /// Guest path of the file.
    pub file: String,
    /// Old text (a line, or a whole small file); None when the file is new.
    pub old: Option<String>,
    /// New text; None when the file was removed.
    pub new: Option<String>,
    /// Why, in a few words.
    pub detail: String,
}

impl Change {
    pub fn new(
        kind: &str,
        file: &str,
        old: Option<String>,
        new: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.to_string(),
            file: file.to_string(),
            old,
            new,
            detail: detail.into(),
        }
    }
}

/// Result of the optional boot check.
#[derive(Debug, Clone, Serialize)]
pub struct BootCheckResult {
    pub booted: bool,
    pub seconds: f64,
    /// The text seen on the serial console that decided the outcome.
    pub evidence: String,
    /// IPv4 address the guest printed (marker unit output), if any.
    pub guest_ipv4: Option<String>,
    pub serial_log: String,
}

/// The full report of a conversion.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub target: String,
    pub format: String,
    pub inspection: crate::inspect::Inspection,
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
    pub boot_check: Option<BootCheckResult>,
    pub seconds: f64,
}

fn one_line(s: &Option<String>) -> String {
    match s {
        None => "(none)".into(),
        Some(s) if s.is_empty() => "(empty)".into(),
        Some(s) => {
            let first = s.lines().next().unwrap_or("");
            let more = s.lines().count().saturating_sub(1);
            if more > 0 {
                format!("{first} (+{more} lines)")
            } else {
                first.to_string()
            }
        }
    }
}

/// Human-readable summary of changes.
pub fn changes_summary(changes: &[Change]) -> String {
    let mut s = String::new();
    for c in changes {
        s.push_str(&format!("  [{}] {}: {}\n", c.kind, c.file, c.detail));
        s.push_str(&format!(
            "      - {}\n      + {}\n",
            one_line(&c.old),
            one_line(&c.new)
        ));
    }
    s
}

impl Report {
    /// Human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = self.inspection.summary();
        s.push_str(&format!("changes ({}):\n", self.changes.len()));
        s.push_str(&changes_summary(&self.changes));
        for w in &self.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        for o in &self.outputs {
            s.push_str(&format!("output: {o} ({})\n", self.format));
        }
        if let Some(b) = &self.boot_check {
            s.push_str(&format!(
                "boot check: {} in {:.0} s ({}){}\n",
                if b.booted { "BOOTED" } else { "FAILED" },
                b.seconds,
                b.evidence,
                b.guest_ipv4
                    .as_ref()
                    .map(|a| format!(", guest address {a}"))
                    .unwrap_or_default()
            ));
        }
        s.push_str(&format!("converted in {:.1} s\n", self.seconds));
        s
    }
}
