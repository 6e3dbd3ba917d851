//! GRUB 2 configuration: kernel command lines in `grub.cfg` (`linux` lines) and `/etc/default/grub`.
//!
//! `root=` and `resume=` are rewritten to `UUID=` (an unmatched `resume=` is dropped: the initramfs would
//! otherwise wait for a device that no longer exists), and required arguments such as
//! `console=ttyS0,115200` are appended where missing. Rewriting is idempotent.

use crate::devmap::{resolve, Resolution, Volume};
use crate::fstab::{field_spans, LineEdit};

/// What to do to every kernel command line.
#[derive(Debug, Clone)]
pub struct CmdlinePolicy<'a> {
    pub volumes: &'a [Volume],
    /// What `root=` must name: `UUID=...` of the root filesystem found in the image, or the stable
    /// `/dev/mapper/VG-LV` name of its logical volume.
    pub root_spec: &'a str,
    /// Arguments to append when no argument with the same key (text before `=`, or the whole word for
    /// `console=ttyS0...`: the key is `console=ttyS0`) is present.
    pub ensure: &'a [&'a str],
}

fn key_of(arg: &str) -> &str {
    if let Some(rest) = arg.strip_prefix("console=") {
        let dev_len = rest.find(',').unwrap_or(rest.len());
        return &arg[..8 + dev_len];
    }
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

/// Rewrite a kernel argument list (space separated). Returns the new list and a note per change.
pub fn rewrite_args(args: &str, p: &CmdlinePolicy<'_>) -> (String, Vec<String>) {
    let mut out: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for arg in args.split_whitespace() {
        if let Some(dev) = arg.strip_prefix("root=") {
            let keep = dev.starts_with("UUID=")
                || dev.starts_with("ZFS=")
                || dev == p.root_spec
                || matches!(resolve(dev, p.volumes), Resolution::Lv(_));
            if !keep {
                let new = format!("root={}", p.root_spec);
                notes.push(format!("{arg} -> {new}"));
                out.push(new);
                continue;
            }
        }
        if let Some(dev) = arg.strip_prefix("resume=") {
            if !dev.starts_with("UUID=") {
                match resolve(dev, p.volumes) {
                    Resolution::Uuid(u) => {
                        let new = format!("resume=UUID={u}");
                        notes.push(format!("{arg} -> {new}"));
                        out.push(new);
                    }
                    // A logical volume's LVM name is stable: kept.
                    Resolution::Lv(_) => out.push(arg.to_string()),
                    _ => notes.push(format!("{arg} removed: no such device in the input")),
                }
                continue;
            }
        }
        out.push(arg.to_string());
    }
    for want in p.ensure {
        let k = key_of(want);
        if !out.iter().any(|a| key_of(a) == k) {
            notes.push(format!("added {want}"));
            out.push((*want).to_string());
        }
    }
    (out.join(" "), notes)
}

/// Rewrite every `linux`/`linux16`/`linuxefi` line of a grub.cfg.
pub fn rewrite_grub_cfg(text: &str, p: &CmdlinePolicy<'_>) -> (String, Vec<LineEdit>) {
    let mut out = String::with_capacity(text.len() + 256);
    let mut edits = Vec::new();
    for piece in text.split_inclusive('\n') {
        let (line, nl) = piece.strip_suffix('\n').map_or((piece, ""), |l| (l, "\n"));
        let spans = field_spans(line);
        let is_linux = spans
            .first()
            .is_some_and(|&(a, b)| matches!(&line[a..b], "linux" | "linux16" | "linuxefi"));
        if is_linux && spans.len() >= 2 {
            let args_start = spans[1].1;
            let (args, notes) = rewrite_args(&line[args_start..], p);
            if !notes.is_empty() {
                let new = format!("{} {}", &line[..args_start], args);
                edits.push(LineEdit {
                    old: line.to_string(),
                    new: new.clone(),
                    detail: notes.join("; "),
                });
                out.push_str(&new);
                out.push_str(nl);
                continue;
            }
        }
        out.push_str(line);
        out.push_str(nl);
    }
    (out, edits)
}

/// Parse a shell-style `KEY="value"` assignment line of /etc/default/grub.
fn assignment(line: &str) -> Option<(&str, char, &str)> {
    let t = line.trim_start();
    let (k, v) = t.split_once('=')?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let q = v.chars().next().filter(|c| *c == '"' || *c == '\'');
    match q {
        Some(q) => {
            let inner = v[1..].strip_suffix(q)?;
            (!inner.contains(q)).then_some((k, q, inner))
        }
        // Rewritten inside double quotes: a quote or backslash in a bare value would change meaning
        // (or leave an unterminated quote), so such a line is not taken for an assignment.
        None => (!v.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\')))
            .then_some((k, '"', v)),
    }
}

/// Rewrite /etc/default/grub: `root=`/`resume=` in both command-line variables, required arguments
/// appended to `GRUB_CMDLINE_LINUX` (added if absent), and `GRUB_DISABLE_LINUX_UUID` set to false so
/// that a later `update-grub` in the guest also writes `root=UUID=`.
pub fn rewrite_default_grub(text: &str, p: &CmdlinePolicy<'_>) -> (String, Vec<LineEdit>) {
    let mut out = String::with_capacity(text.len() + 128);
    let mut edits = Vec::new();
    let mut saw_cmdline = false;
    let no_ensure = CmdlinePolicy {
        ensure: &[],
        ..p.clone()
    };
    for piece in text.split_inclusive('\n') {
        let (line, nl) = piece.strip_suffix('\n').map_or((piece, ""), |l| (l, "\n"));
        let mut new_line = None;
        if let Some((k, q, v)) = assignment(line) {
            match k {
                "GRUB_CMDLINE_LINUX" | "GRUB_CMDLINE_LINUX_DEFAULT" => {
                    let pol = if k == "GRUB_CMDLINE_LINUX" {
                        p
                    } else {
                        &no_ensure
                    };
                    saw_cmdline |= k == "GRUB_CMDLINE_LINUX";
                    let (args, notes) = rewrite_args(v, pol);
                    if !notes.is_empty() {
                        new_line = Some((format!("{k}={q}{args}{q}"), notes.join("; ")));
                    }
                }
                "GRUB_DISABLE_LINUX_UUID" if v == "true" => {
                    new_line = Some((
                        format!("{k}=false"),
                        "let update-grub write root=UUID=".to_string(),
                    ));
                }
                _ => {}
            }
        }
        match new_line {
            Some((n, detail)) => {
                edits.push(LineEdit {
                    old: line.to_string(),
                    new: n.clone(),
                    detail,
                });
                out.push_str(&n);
            }
            None => out.push_str(line),
        }
        out.push_str(nl);
    }
    if !saw_cmdline && !p.ensure.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let n = format!("GRUB_CMDLINE_LINUX=\"{}\"", p.ensure.join(" "));
        edits.push(LineEdit {
            old: String::new(),
            new: n.clone(),
            detail: "added".into(),
        });
        out.push_str(&n);
        out.push('\n');
    }
    (out, edits)
}

/// Kernel command lines of the `linux` lines of a grub.cfg (kernel path, arguments).
pub fn linux_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 2 && matches!(f[0], "linux" | "linux16" | "linuxefi"))
                .then(|| (f[1].to_string(), f[2..].join(" ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsprobe::FsKind;
    use proptest::prelude::*;

    fn vols() -> Vec<Volume> {
        vec![
            Volume::test_part(0, 1, FsKind::Ext4, "r"),
            Volume::test_part(0, 2, FsKind::Swap, "s"),
        ]
    }

    /// The policy of a conversion whose root is `UUID=r`, ensuring [`ENSURE`].
    fn policy(volumes: &[Volume]) -> CmdlinePolicy<'_> {
        CmdlinePolicy {
            volumes,
            root_spec: "UUID=r",
            ensure: ENSURE,
        }
    }

    const ENSURE: &[&str] = &["console=ttyS0,115200", "net.ifnames=0"];

    #[test]
    fn linux_line_rewritten() {
        let v = vols();
        let p = policy(&v);
        let cfg = "menuentry 'Debian' {\n\tsearch --fs-uuid r\n\tlinux\t/boot/vmlinuz-6.1 root=/dev/xvda1 ro resume=/dev/xvda2 console=ttyS0,115200 quiet\n\tinitrd\t/boot/initrd.img-6.1\n}\n";
        let (new, edits) = rewrite_grub_cfg(cfg, &p);
        assert!(new.contains("\tlinux\t/boot/vmlinuz-6.1 root=UUID=r ro resume=UUID=s console=ttyS0,115200 quiet net.ifnames=0\n"));
        assert_eq!(edits.len(), 1);
        let (again, e2) = rewrite_grub_cfg(&new, &p);
        assert_eq!(again, new);
        assert!(e2.is_empty());
        assert_eq!(linux_lines(&new)[0].0, "/boot/vmlinuz-6.1");
    }

    #[test]
    fn lvm_root_and_resume_names_are_kept() {
        let mut v = vols();
        v.push(Volume {
            lv: Some("vg0/root".into()),
            ..Volume::test_part(0, 10_001, FsKind::Ext4, "lv")
        });
        v.push(Volume {
            lv: Some("vg0/swap".into()),
            ..Volume::test_part(0, 10_002, FsKind::Swap, "sw")
        });
        let p = CmdlinePolicy {
            volumes: &v,
            root_spec: "/dev/mapper/vg0-root",
            ensure: ENSURE,
        };
        let (args, _) = rewrite_args("root=/dev/mapper/vg0-root ro resume=/dev/vg0/swap", &p);
        assert_eq!(
            args,
            "root=/dev/mapper/vg0-root ro resume=/dev/vg0/swap console=ttyS0,115200 net.ifnames=0"
        );
        // A source device name for the root becomes the LV's stable name.
        let (args, _) = rewrite_args("root=/dev/xvda2", &p);
        assert!(args.starts_with("root=/dev/mapper/vg0-root "), "{args}");
    }

    #[test]
    fn unmatched_resume_is_dropped() {
        let v = vols();
        let p = CmdlinePolicy {
            volumes: &v,
            root_spec: "UUID=r",
            ensure: &[],
        };
        let (args, notes) = rewrite_args("root=UUID=r resume=/dev/xvdc1 ro", &p);
        assert_eq!(args, "root=UUID=r ro");
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn default_grub_rewritten() {
        let v = vols();
        let p = policy(&v);
        let text = "GRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"resume=/dev/xvda2\"\nGRUB_DISABLE_LINUX_UUID=true\n";
        let (new, edits) = rewrite_default_grub(text, &p);
        assert_eq!(
            new,
            "GRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"resume=UUID=s console=ttyS0,115200 net.ifnames=0\"\nGRUB_DISABLE_LINUX_UUID=false\n"
        );
        assert_eq!(edits.len(), 2);
        let (new2, _) = rewrite_default_grub("GRUB_TIMEOUT=5", &p);
        assert_eq!(
            new2,
            "GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX=\"console=ttyS0,115200 net.ifnames=0\"\n"
        );
    }

    #[test]
    fn other_console_does_not_count() {
        let v = vols();
        let p = policy(&v);
        let (args, _) = rewrite_args("console=hvc0 console=ttyS0", &p);
        assert_eq!(args, "console=hvc0 console=ttyS0 net.ifnames=0");
    }

    /// Found by `fuzz/run.sh grub`: a bare value with a quote in it (`X=a"b`) was rewritten into
    /// `X="a"b console=..."`, an unterminated shell string that the next run did not recognise (and
    /// so appended a second `GRUB_CMDLINE_LINUX`).
    #[test]
    fn bare_value_with_a_quote_is_left_alone() {
        let v = vols();
        let p = policy(&v);
        let text = "GRUB_CMDLINE_LINUX=quiet\"x\n";
        let (once, _) = rewrite_default_grub(text, &p);
        assert_eq!(
            once,
            "GRUB_CMDLINE_LINUX=quiet\"x\nGRUB_CMDLINE_LINUX=\"console=ttyS0,115200 net.ifnames=0\"\n"
        );
        let (twice, edits) = rewrite_default_grub(&once, &p);
        assert_eq!(twice, once);
        assert!(edits.is_empty());
    }

    proptest! {
        #[test]
        fn random_text_never_panics_and_is_idempotent(text in "[ -~\\t\\n]{0,400}") {
            let v = vols();
            let p = policy(&v);
            let (a, _) = rewrite_grub_cfg(&text, &p);
            let (b, e) = rewrite_grub_cfg(&a, &p);
            prop_assert_eq!(a, b);
            prop_assert!(e.is_empty());
            let (c, _) = rewrite_default_grub(&text, &p);
            let (d, e) = rewrite_default_grub(&c, &p);
            prop_assert_eq!(c, d);
            prop_assert!(e.is_empty());
        }

        #[test]
        fn grub_lines_with_random_args(args in proptest::collection::vec("[a-z=/0-9,.]{1,12}", 0..8)) {
            let v = vols();
            let p = policy(&v);
            let line = format!("linux /vmlinuz {}\n", args.join(" "));
            let (a, _) = rewrite_grub_cfg(&line, &p);
            prop_assert!(a.contains("console=ttyS0"));
            prop_assert!(!a.contains("root=/"));
        }
    }
}
