//! GRUB: kernel command lines of grub.cfg and /etc/default/grub. Both rewrites must be idempotent,
//! and every `linux` line of a rewritten grub.cfg carries the required arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_converter::devmap::Volume;
use rehost_converter::fsprobe::FsKind;
use rehost_converter::grub::{linux_lines, rewrite_default_grub, rewrite_grub_cfg, CmdlinePolicy};

const ENSURE: &[&str] = &["console=ttyS0,115200", "net.ifnames=0"];

/// The key an ensured argument is matched by (as `grub::rewrite_args` documents it).
fn key_of(arg: &str) -> &str {
    if let Some(rest) = arg.strip_prefix("console=") {
        return &arg[..8 + rest.find(',').unwrap_or(rest.len())];
    }
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

fn volumes() -> Vec<Volume> {
    let v = |part, kind, uuid: &str, lv: Option<&str>| Volume {
        disk: 0,
        part,
        kind,
        uuid: Some(uuid.into()),
        label: None,
        partuuid: None,
        lv: lv.map(Into::into),
    };
    vec![
        v(1, FsKind::Ext4, "r", None),
        v(2, FsKind::Swap, "s", None),
        v(10_001, FsKind::Ext4, "lv", Some("vg-sys/root")),
    ]
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let vols = volumes();
    let _ = linux_lines(&text);
    for root_spec in ["UUID=r", "/dev/mapper/vg--sys-root"] {
        let p = CmdlinePolicy {
            volumes: &vols,
            root_spec,
            ensure: ENSURE,
        };
        let (a, _) = rewrite_grub_cfg(&text, &p);
        let (b, e) = rewrite_grub_cfg(&a, &p);
        assert_eq!(a, b, "grub.cfg rewrite is not idempotent");
        assert!(e.is_empty(), "second grub.cfg rewrite edited: {e:?}");
        for (_, args) in linux_lines(&a) {
            for want in ENSURE {
                assert!(
                    args.split_whitespace().any(|x| key_of(x) == key_of(want)),
                    "{want} missing from {args:?}"
                );
            }
        }
        let (c, _) = rewrite_default_grub(&text, &p);
        let (d, e) = rewrite_default_grub(&c, &p);
        assert_eq!(c, d, "default/grub rewrite is not idempotent");
        assert!(e.is_empty(), "second default/grub rewrite edited: {e:?}");
    }
});
