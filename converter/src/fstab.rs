//! /etc/fstab parsing and rewriting: device names to `UUID=`, `nofail` where nothing matches.
//!
//! Lines are edited in place (only the changed field is replaced), so comments, spacing and unknown
//! entries survive untouched.

use crate::devmap::{is_uuid_spec, resolve, Resolution, Volume};

/// One edited line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineEdit {
    pub old: String,
    pub new: String,
    pub detail: String,
}

/// An fstab entry (the fields that matter here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: String,
    pub mountpoint: String,
    pub fstype: String,
    pub options: String,
}

/// Byte spans of the whitespace-separated fields of a line.
pub(crate) fn field_spans(line: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, line.len()));
    }
    spans
}

fn is_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// Decode fstab's octal escapes (`\040` for a space) in a field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            out.push((v & 0xFF) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the entries of an fstab (comments and short lines skipped).
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter(|l| !is_comment(l))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2).then(|| Entry {
                spec: unescape(f[0]),
                mountpoint: unescape(f[1]),
                fstype: f.get(2).copied().unwrap_or("auto").to_string(),
                options: f.get(3).copied().unwrap_or("defaults").to_string(),
            })
        })
        .collect()
}

/// Rewrite device names to `UUID=` where they match a volume; add `nofail` to entries whose device
/// matches nothing (except `/`, which `root_spec` — `UUID=...` or `/dev/mapper/VG-LV` — always names).
/// Stable LVM names (`/dev/mapper/VG-LV`, `/dev/VG/LV`) of logical volumes in the input are kept.
/// Returns the new text and the edits.
pub fn rewrite(text: &str, volumes: &[Volume], root_spec: &str) -> (String, Vec<LineEdit>) {
    let mut out = String::with_capacity(text.len() + 64);
    let mut edits = Vec::new();
    for piece in text.split_inclusive('\n') {
        let (line, nl) = piece.strip_suffix('\n').map_or((piece, ""), |l| (l, "\n"));
        let new = rewrite_line(line, volumes, root_spec);
        if let Some((new_line, detail)) = new {
            edits.push(LineEdit {
                old: line.to_string(),
                new: new_line.clone(),
                detail,
            });
            out.push_str(&new_line);
        } else {
            out.push_str(line);
        }
        out.push_str(nl);
    }
    (out, edits)
}

fn rewrite_line(line: &str, volumes: &[Volume], root_spec: &str) -> Option<(String, String)> {
    if is_comment(line) {
        return None;
    }
    let spans = field_spans(line);
    if spans.len() < 2 {
        return None;
    }
    let spec = unescape(&line[spans[0].0..spans[0].1]);
    let mountpoint = unescape(&line[spans[1].0..spans[1].1]);
    let resolution = resolve(&spec, volumes);
    if mountpoint == "/"
        && !is_uuid_spec(&spec)
        && spec != root_spec
        && !matches!(resolution, Resolution::Lv(_))
    {
        let new = format!(
            "{}{}{}",
            &line[..spans[0].0],
            root_spec,
            &line[spans[0].1..]
        );
        return Some((new, format!("{spec} -> {root_spec}")));
    }
    match resolution {
        Resolution::Uuid(u) if is_uuid_spec(&spec) => {
            let _ = u;
            None
        }
        Resolution::Uuid(u) => {
            let new = format!("{}UUID={}{}", &line[..spans[0].0], u, &line[spans[0].1..]);
            Some((new, format!("{spec} -> UUID={u}")))
        }
        Resolution::NoMatch if mountpoint != "/" => {
            let opts_span = spans.get(3).copied();
            let opts = opts_span.map_or("defaults", |(a, b)| &line[a..b]);
            if opts.split(',').any(|o| o == "nofail") {
                return None;
            }
            let new = match opts_span {
                Some((a, b)) => format!("{}{},nofail{}", &line[..a], &line[a..b], &line[b..]),
                None => {
                    let fstype = if spans.len() >= 3 { "" } else { "\tauto" };
                    format!("{line}{fstype}\tdefaults,nofail")
                }
            };
            Some((
                new,
                format!("{spec} matches no disk of the input: added nofail"),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsprobe::FsKind;
    use proptest::prelude::*;

    fn vols() -> Vec<Volume> {
        vec![
            Volume::test_part(0, 1, FsKind::Ext4, "r-uuid"),
            Volume::test_part(0, 2, FsKind::Swap, "s-uuid"),
        ]
    }

    const XEN: &str = "# static\n/dev/xvda1\t/\text4\terrors=remount-ro\t0\t1\n/dev/xvda2 none swap sw 0 0\n/dev/xvdb1\t/data\text4\tdefaults\t0\t2\nproc /proc proc defaults 0 0\nUUID=r-uuid /x ext4 ro 0 0\n";

    #[test]
    fn xen_fstab_rewritten() {
        let (new, edits) = rewrite(XEN, &vols(), "UUID=r-uuid");
        assert_eq!(
            new,
            "# static\nUUID=r-uuid\t/\text4\terrors=remount-ro\t0\t1\nUUID=s-uuid none swap sw 0 0\n/dev/xvdb1\t/data\text4\tdefaults,nofail\t0\t2\nproc /proc proc defaults 0 0\nUUID=r-uuid /x ext4 ro 0 0\n"
        );
        assert_eq!(edits.len(), 3);
        assert_eq!(edits[2].old, "/dev/xvdb1\t/data\text4\tdefaults\t0\t2");
        let (again, e2) = rewrite(&new, &vols(), "UUID=r-uuid");
        assert_eq!(again, new);
        assert!(e2.is_empty());
    }

    #[test]
    fn lvm_names_are_kept() {
        let mut v = vols();
        v.push(Volume::test_lv("vg0/root", Some("lv-uuid")));
        v.push(Volume::test_lv("vg0/home", None));
        let text = "/dev/mapper/vg0-root / ext4 defaults 0 1\n/dev/vg0/home /home ext4 defaults 0 2\n/dev/vg0/gone /x ext4 defaults 0 2\n";
        let (new, edits) = rewrite(text, &v, "/dev/mapper/vg0-root");
        assert_eq!(edits.len(), 1, "{edits:?}");
        assert_eq!(edits[0].old, "/dev/vg0/gone /x ext4 defaults 0 2");
        assert!(new.starts_with("/dev/mapper/vg0-root / ext4 defaults 0 1\n/dev/vg0/home /home"));
        // A root named by a source device name becomes the LV's stable name.
        let (new, _) = rewrite(
            "/dev/sda2 / ext4 defaults 0 1\n",
            &v,
            "/dev/mapper/vg0-root",
        );
        assert_eq!(new, "/dev/mapper/vg0-root / ext4 defaults 0 1\n");
    }

    #[test]
    fn short_entry_gets_options() {
        let (new, _) = rewrite("/dev/sdc1 /mnt\n", &vols(), "UUID=r-uuid");
        assert_eq!(new, "/dev/sdc1 /mnt\tauto\tdefaults,nofail\n");
    }

    #[test]
    fn parse_entries() {
        let e = parse("/dev/a\\040b /my\\040dir ext4\n#x\n\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].spec, "/dev/a b");
        assert_eq!(e[0].mountpoint, "/my dir");
        assert_eq!(e[0].options, "defaults");
    }

    proptest! {
        #[test]
        fn random_text_never_panics_and_is_idempotent(text in "[ -~\\t\\n\\\\]{0,300}") {
            let (once, _) = rewrite(&text, &vols(), "UUID=r-uuid");
            let (twice, edits) = rewrite(&once, &vols(), "UUID=r-uuid");
            prop_assert_eq!(once, twice);
            prop_assert!(edits.is_empty());
            let _ = parse(&text);
        }

        #[test]
        fn random_unicode_never_panics(text in "\\PC{0,200}") {
            let _ = rewrite(&text, &vols(), "UUID=r-uuid");
            let _ = parse(&text);
        }
    }
}
