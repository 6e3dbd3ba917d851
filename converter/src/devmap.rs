//! Mapping source-hypervisor device names (`/dev/xvda1`, `/dev/sda2`, `/dev/nvme0n1p1`, `LABEL=`, ...)
//! to the filesystems found in the input images, so they can be referred to by `UUID=`.

use crate::fsprobe::FsKind;
use serde::Serialize;

/// A filesystem (or swap) found on one of the input disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Index of the input disk (0 = boot disk).
    pub disk: usize,
    /// Partition number (0 = whole disk).
    pub part: u32,
    pub kind: FsKind,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub partuuid: Option<String>,
    /// `vg/lv` for a logical volume (whose `part` is then its volume number, not a partition).
    pub lv: Option<String>,
}

#[cfg(test)]
impl Volume {
    /// Test data: partition `part` of disk `disk` holding `kind` with `uuid` (no label).
    pub(crate) fn test_part(disk: usize, part: u32, kind: FsKind, uuid: &str) -> Self {
        Volume {
            disk,
            part,
            kind,
            uuid: Some(uuid.into()),
            label: None,
            partuuid: None,
            lv: None,
        }
    }

    /// Test data: logical volume `vg/lv` of the boot disk; with `uuid`, an ext4 attached as
    /// volume 10001, without, one the converter could not attach.
    pub(crate) fn test_lv(vg_lv: &str, uuid: Option<&str>) -> Self {
        Volume {
            disk: 0,
            part: if uuid.is_some() { 10_001 } else { 0 },
            kind: if uuid.is_some() {
                FsKind::Ext4
            } else {
                FsKind::Unknown
            },
            uuid: uuid.map(String::from),
            label: None,
            partuuid: None,
            lv: Some(vg_lv.into()),
        }
    }
}

/// What a device spec from fstab or the kernel command line refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A volume with this UUID.
    Uuid(String),
    /// A logical volume of the input, named by a stable LVM name (`/dev/mapper/VG-LV`, `/dev/VG/LV`);
    /// with its filesystem UUID when it can be attached.
    Lv(Option<String>),
    /// A block-device reference that matches nothing in the input images.
    NoMatch,
    /// Not a block device reference we understand (tmpfs, proc, nfs, /dev/mapper/...).
    NotADevice,
}

/// Disk index of a name like `sda`, `xvdb`, `vdaa` (letters a..z, aa..).
fn letters_index(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut n = 0usize;
    for b in s.bytes() {
        n = n * 26 + usize::from(b - b'a') + 1;
    }
    Some(n - 1)
}

/// Parse a kernel block device path into (disk index, partition number; 0 = whole disk).
pub fn parse_dev(dev: &str) -> Option<(usize, u32)> {
    let name = dev.strip_prefix("/dev/")?;
    if let Some(rest) = name.strip_prefix("nvme") {
        let (ctrl, rest) = rest.split_once('n')?;
        let ctrl: usize = ctrl.parse().ok()?;
        let (ns, part) = match rest.split_once('p') {
            Some((ns, p)) => (ns, p.parse().ok()?),
            None => (rest, 0),
        };
        let _: u32 = ns.parse().ok()?;
        return Some((ctrl, part));
    }
    for prefix in ["xvd", "sd", "vd", "hd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let split = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (letters, digits) = rest.split_at(split);
            let disk = letters_index(letters)?;
            let part = if digits.is_empty() {
                0
            } else {
                digits.parse().ok()?
            };
            return Some((disk, part));
        }
    }
    None
}

/// The `vg/lv` a device path names by LVM's stable names, if the VG is one of `volumes`.
fn lv_of_spec(spec: &str, volumes: &[Volume]) -> Option<String> {
    let dm = spec
        .strip_prefix("/dev/mapper/")
        .or_else(|| spec.strip_prefix("/dev/disk/by-id/dm-name-"));
    let (vg, lv) = match dm {
        Some(name) => crate::lvm::split_dm_name(name)?,
        None => {
            let (vg, lv) = spec.strip_prefix("/dev/")?.split_once('/')?;
            if lv.contains('/') {
                return None;
            }
            (vg.to_string(), lv.to_string())
        }
    };
    let name = format!("{vg}/{lv}");
    let known_vg = volumes.iter().any(|v| {
        v.lv.as_deref()
            .and_then(|l| l.split_once('/'))
            .is_some_and(|(g, _)| g == vg)
    });
    known_vg.then_some(name)
}

/// Resolve a device spec against the volumes found.
pub fn resolve(spec: &str, volumes: &[Volume]) -> Resolution {
    if let Some(name) = lv_of_spec(spec, volumes) {
        return match volumes.iter().find(|v| v.lv.as_deref() == Some(&name)) {
            Some(v) => Resolution::Lv(v.uuid.clone()),
            None => Resolution::NoMatch,
        };
    }
    let by = |f: &dyn Fn(&Volume) -> bool| {
        volumes
            .iter()
            .find(|v| f(v))
            .and_then(|v| v.uuid.clone())
            .map_or(Resolution::NoMatch, Resolution::Uuid)
    };
    let eq_ci =
        |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    if let Some(u) = spec
        .strip_prefix("UUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
    {
        return by(&|v| eq_ci(&v.uuid, u));
    }
    if let Some(l) = spec
        .strip_prefix("LABEL=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-label/"))
    {
        return by(&|v| v.label.as_deref() == Some(l));
    }
    if let Some(p) = spec
        .strip_prefix("PARTUUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-partuuid/"))
    {
        return by(&|v| eq_ci(&v.partuuid, p));
    }
    match parse_dev(spec) {
        Some((disk, part)) => by(&|v| v.disk == disk && v.part == part && v.lv.is_none()),
        None if spec.starts_with("/dev/") => Resolution::NoMatch,
        None => Resolution::NotADevice,
    }
}

/// True when `spec` is already a UUID reference.
pub fn is_uuid_spec(spec: &str) -> bool {
    spec.starts_with("UUID=")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vols() -> Vec<Volume> {
        vec![
            Volume {
                label: Some("rootfs".into()),
                ..Volume::test_part(0, 1, FsKind::Ext4, "aaaa")
            },
            Volume::test_part(0, 2, FsKind::Swap, "bbbb"),
            Volume::test_part(1, 0, FsKind::Xfs, "cccc"),
        ]
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_dev("/dev/xvda1"), Some((0, 1)));
        assert_eq!(parse_dev("/dev/sdb"), Some((1, 0)));
        assert_eq!(parse_dev("/dev/sdaa3"), Some((26, 3)));
        assert_eq!(parse_dev("/dev/nvme0n1p2"), Some((0, 2)));
        assert_eq!(parse_dev("/dev/nvme1n1"), Some((1, 0)));
        assert_eq!(parse_dev("/dev/mapper/vg-root"), None);
        assert_eq!(parse_dev("/dev/sd"), None);
        assert_eq!(parse_dev("/dev/sda99999999999"), None);
    }

    #[test]
    fn resolution() {
        let v = vols();
        assert_eq!(resolve("/dev/xvda1", &v), Resolution::Uuid("aaaa".into()));
        assert_eq!(resolve("/dev/sda2", &v), Resolution::Uuid("bbbb".into()));
        assert_eq!(resolve("/dev/xvdb", &v), Resolution::Uuid("cccc".into()));
        assert_eq!(resolve("/dev/xvdb1", &v), Resolution::NoMatch);
        assert_eq!(resolve("LABEL=rootfs", &v), Resolution::Uuid("aaaa".into()));
        assert_eq!(resolve("UUID=AAAA", &v), Resolution::Uuid("aaaa".into()));
        assert_eq!(resolve("UUID=dead", &v), Resolution::NoMatch);
        assert_eq!(resolve("tmpfs", &v), Resolution::NotADevice);
        assert_eq!(resolve("/dev/mapper/x", &v), Resolution::NoMatch);
    }

    #[test]
    fn logical_volumes_by_their_lvm_names() {
        let mut v = vols();
        v.push(Volume::test_lv("my-vg/root", Some("dddd")));
        v.push(Volume::test_lv("my-vg/striped", None));
        let root = Resolution::Lv(Some("dddd".into()));
        assert_eq!(resolve("/dev/mapper/my--vg-root", &v), root);
        assert_eq!(resolve("/dev/my-vg/root", &v), root);
        assert_eq!(resolve("/dev/disk/by-id/dm-name-my--vg-root", &v), root);
        assert_eq!(resolve("UUID=dddd", &v), Resolution::Uuid("dddd".into()));
        assert_eq!(resolve("/dev/my-vg/striped", &v), Resolution::Lv(None));
        assert_eq!(resolve("/dev/my-vg/gone", &v), Resolution::NoMatch);
        // A volume number is not a partition: /dev/sda10001 names nothing.
        assert_eq!(resolve("/dev/sda10001", &v), Resolution::NoMatch);
        // Unknown VG: not taken for an LV.
        assert_eq!(resolve("/dev/other/root", &v), Resolution::NoMatch);
    }
}
