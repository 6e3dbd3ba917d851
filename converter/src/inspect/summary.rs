//! The human summary of an inspection (`rehost-converter inspect` without `--json`).

use super::Inspection;

impl Inspection {
    /// Human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.disks.iter().enumerate() {
            s.push_str(&format!(
                "disk {i}: {} ({} MiB, {:?}{})\n",
                d.path,
                d.size >> 20,
                d.table.scheme,
                if d.format == "raw" {
                    String::new()
                } else {
                    format!(", {} input", d.format)
                }
            ));
            for p in &d.filesystems {
                let what = match &p.lv {
                    Some(l) => format!("LV {l}"),
                    None => format!("part {}", p.part),
                };
                s.push_str(&format!(
                    "  {what}: {} MiB {:?} uuid={} label={}\n",
                    p.len >> 20,
                    p.fs.kind,
                    p.fs.uuid.as_deref().unwrap_or("-"),
                    p.fs.label.as_deref().unwrap_or("-")
                ));
            }
            for l in d.logical_volumes.iter().filter(|l| l.refused.is_some()) {
                s.push_str(&format!(
                    "  LV {}/{}: not attachable: {}\n",
                    l.vg,
                    l.name,
                    l.refused.as_deref().unwrap_or_default()
                ));
            }
            for e in &d.lvm_errors {
                s.push_str(&format!("  LVM: {e}\n"));
            }
        }
        s.push_str(&format!(
            "os: {} ({} {})\nroot: disk {} volume {}{} ({:?}, UUID={})\n",
            self.os.pretty_name,
            self.os.id,
            self.os.version_id,
            self.root.0,
            self.root.1,
            self.root_lv
                .as_ref()
                .map(|l| format!(" = LV {l}"))
                .unwrap_or_default(),
            self.root_fs.kind,
            self.root_fs.uuid.as_deref().unwrap_or("-")
        ));
        if let Some((d, p)) = self.boot {
            s.push_str(&format!("/boot: disk {d} part {p}\n"));
        }
        s.push_str(&format!(
            "bootloader: {} ({})\ninitramfs tool: {}\n",
            self.bootloader.as_deref().unwrap_or("none found"),
            self.grub_cfg.as_deref().unwrap_or("-"),
            self.initramfs_tool.as_deref().unwrap_or("none found")
        ));
        for k in &self.kernels {
            s.push_str(&format!(
                "kernel {}: initramfs {} — virtio drivers missing from it: {}\n",
                k.version,
                k.initramfs.as_deref().unwrap_or("(none)"),
                if k.missing.is_empty() {
                    "none".to_string()
                } else {
                    k.missing.join(", ")
                }
            ));
        }
        for w in &self.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        for b in &self.blockers {
            s.push_str(&format!("CANNOT CONVERT: {b}\n"));
        }
        s
    }
}
