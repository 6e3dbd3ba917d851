//! /etc/fstab: parsing and the rewrite (device names to `UUID=`, `nofail` for unknown devices),
//! which must be idempotent: rewriting its own output changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_converter::devmap::Volume;
use rehost_converter::fsprobe::FsKind;
use rehost_converter::fstab::{parse, rewrite};

fn volumes() -> Vec<Volume> {
    let v = |part, kind, uuid: &str, label: Option<&str>, lv: Option<&str>| Volume {
        disk: 0,
        part,
        kind,
        uuid: Some(uuid.into()),
        label: label.map(Into::into),
        partuuid: Some(format!("1234abcd-0{part}")),
        lv: lv.map(Into::into),
    };
    vec![
        v(1, FsKind::Ext4, "r-uuid", Some("root"), None),
        v(2, FsKind::Swap, "s-uuid", None, None),
        v(10_001, FsKind::Ext4, "lv-uuid", None, Some("vg-sys/root")),
    ]
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse(&text);
    let vols = volumes();
    for root in ["UUID=r-uuid", "/dev/mapper/vg--sys-root"] {
        let (once, _) = rewrite(&text, &vols, root);
        let (twice, edits) = rewrite(&once, &vols, root);
        assert_eq!(once, twice, "rewrite is not idempotent");
        assert!(edits.is_empty(), "second rewrite edited: {edits:?}");
    }
});
