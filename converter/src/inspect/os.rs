//! The installed OS: its os-release, and each installed kernel with the drivers the target needs,
//! built in, in its initramfs, or missing.

use crate::guestfs::{EntryKind, GuestError, GuestRoot};
use crate::initramfs::{self, REQUIRED};
use serde::Serialize;
use std::collections::BTreeSet;

/// An installed kernel.
#[derive(Debug, Clone, Serialize)]
pub struct KernelInfo {
    pub version: String,
    pub image: String,
    pub initramfs: Option<String>,
    /// Required drivers built into the kernel.
    pub builtin: Vec<String>,
    /// Required drivers present in the initramfs.
    pub in_initramfs: Vec<String>,
    /// Required drivers neither built in nor in the initramfs.
    pub missing: Vec<String>,
    /// Required drivers this kernel does not have at all.
    pub unavailable: Vec<String>,
    /// Error reading the initramfs, if any.
    pub initramfs_error: Option<String>,
    /// The initramfs carries LVM's tool (`lvm`), so it can activate a volume group.
    pub initramfs_has_lvm: bool,
}

impl KernelInfo {
    /// Whether the kernel can drive a virtio disk at all.
    pub fn can_boot_virtio(&self) -> bool {
        !self
            .unavailable
            .iter()
            .any(|m| m == "virtio_blk" || m == "virtio_pci")
    }
}

/// os-release fields.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OsInfo {
    pub id: String,
    pub version_id: String,
    pub pretty_name: String,
}

pub(super) fn os_release(g: &GuestRoot) -> Result<OsInfo, GuestError> {
    let text = match g.read_text("/etc/os-release")? {
        Some(t) => t,
        None => g.read_text("/usr/lib/os-release")?.unwrap_or_default(),
    };
    let mut o = OsInfo::default();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            match k.trim() {
                "ID" => o.id = v,
                "VERSION_ID" => o.version_id = v,
                "PRETTY_NAME" => o.pretty_name = v,
                _ => {}
            }
        }
    }
    Ok(o)
}

/// Modules of a kernel: (built in, available as modules), by module name.
fn kernel_modules(
    g: &GuestRoot,
    version: &str,
) -> Result<(BTreeSet<String>, BTreeSet<String>), GuestError> {
    let dir = ["/lib/modules", "/usr/lib/modules"]
        .iter()
        .map(|d| format!("{d}/{version}"))
        .find(|d| g.exists(d));
    let Some(dir) = dir else {
        return Ok((BTreeSet::new(), BTreeSet::new()));
    };
    let names = |text: Option<Vec<u8>>, dep: bool| -> BTreeSet<String> {
        let text = String::from_utf8_lossy(&text.unwrap_or_default()).into_owned();
        text.lines()
            .filter_map(|l| {
                let f = if dep { l.split(':').next()? } else { l.trim() };
                initramfs::module_name(f)
            })
            .collect()
    };
    let builtin = names(
        g.read_capped(&format!("{dir}/modules.builtin"), 8 << 20)?,
        false,
    );
    let available = names(
        g.read_capped(&format!("{dir}/modules.dep"), 32 << 20)?,
        true,
    );
    Ok((builtin, available))
}

/// Module an LVM root needs on top of [`REQUIRED`].
pub const LVM_REQUIRED: &[&str] = &["dm_mod"];

pub(super) fn kernels(g: &GuestRoot, extra: &[&str]) -> Result<Vec<KernelInfo>, GuestError> {
    let mut out = Vec::new();
    let entries = g.list_dir("/boot")?.unwrap_or_default();
    for (name, kind) in &entries {
        let Some(version) = name
            .strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
        else {
            continue;
        };
        if *kind != EntryKind::File || version.ends_with(".rehost-orig") {
            continue;
        }
        let initramfs = [
            format!("initrd.img-{version}"),
            format!("initramfs-{version}.img"),
            format!("initrd-{version}"),
        ]
        .into_iter()
        .find(|n| entries.iter().any(|(e, k)| e == n && *k == EntryKind::File))
        .map(|n| format!("/boot/{n}"));
        let (builtin, available) = kernel_modules(g, version)?;
        let (mut present, mut initramfs_error) = (BTreeSet::new(), None);
        let mut initramfs_has_lvm = false;
        if let Some(path) = &initramfs {
            if let Some(f) = g.open_read(path)? {
                match initramfs::list_names(f) {
                    Ok(names) => {
                        initramfs_has_lvm = names
                            .iter()
                            .any(|n| matches!(n.as_str(), "sbin/lvm" | "usr/sbin/lvm"));
                        present = names
                            .iter()
                            .filter_map(|n| initramfs::module_name(n))
                            .collect();
                    }
                    Err(e) => initramfs_error = Some(format!("{e:#}")),
                }
            }
        }
        let req = |f: &dyn Fn(&str) -> bool| {
            REQUIRED
                .iter()
                .chain(extra)
                .filter(|m| f(m))
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
        };
        out.push(KernelInfo {
            version: version.to_string(),
            image: format!("/boot/{name}"),
            initramfs,
            builtin: req(&|m| builtin.contains(m)),
            in_initramfs: req(&|m| present.contains(m)),
            missing: req(&|m| !builtin.contains(m) && !present.contains(m)),
            unavailable: req(&|m| !builtin.contains(m) && !available.contains(m)),
            initramfs_error,
            initramfs_has_lvm,
        });
    }
    Ok(out)
}
