//! Inspection: partitions, filesystems, the root filesystem (and a separate /boot), the OS, kernels and
//! their initramfs images, the bootloader, and whatever makes the image impossible to convert.
//!
//! [`GuestSession`] attaches the partitions as loop devices (offset + size limit) and mounts the root
//! (read-only for inspection, read-write on the output copy for conversion) inside the work directory;
//! everything is released when the session is dropped.
//!
//! LVM without device-mapper: the metadata of each PV partition is read in userspace ([`lvm`]); a
//! logical volume that is one linear segment on a PV of the same disk is a byte range of the disk, so it
//! is attached like a partition (a loop device at its offset) and listed in `filesystems` with a volume
//! number above [`LV_NUMBER_BASE`]. Other volumes are listed in `logical_volumes` with the reason they
//! cannot be attached; if the root is among them, the image is refused (exit 3) with that reason.

use crate::devmap::{resolve, Resolution, Volume};
use crate::fsprobe::{self, FsInfo, FsKind};
use crate::fstab;
use crate::guestfs::{EntryKind, GuestError, GuestRoot};
use crate::initramfs::{self, REQUIRED};
use crate::lvm;
use crate::partition::{self, FileDisk, PartitionError, PartitionTable, ReadAt};
use crate::sys::{LoopDevice, Mount, SysError, WorkDir};
use nix::mount::MsFlags;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Why an image could not be inspected or cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("open disk image {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("partition table of {0}")]
    Partitions(PathBuf, #[source] PartitionError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("no Linux root filesystem found on {0}{1}")]
    NoRoot(PathBuf, String),
    #[error("the root filesystem is on LUKS-encrypted volume {0}: it cannot be converted without its key")]
    EncryptedRoot(String),
    #[error("no root filesystem found outside LVM, and LVM gives none that can be attached without device-mapper: {0}")]
    LvmRoot(String),
}

impl InspectError {
    /// True when the image was read fine but holds nothing this converter can make bootable.
    pub fn is_not_convertible(&self) -> bool {
        matches!(
            self,
            InspectError::NoRoot(..) | InspectError::EncryptedRoot(_) | InspectError::LvmRoot(_)
        )
    }
}

/// One input disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub path: String,
    /// The input's format ("raw", or "qcow2" read through a temporary raw copy).
    pub format: &'static str,
    pub size: u64,
    pub table: PartitionTable,
    /// Partitions, then the logical volumes that can be attached (numbered from [`LV_NUMBER_BASE`] + 1).
    pub filesystems: Vec<PartFs>,
    /// Every visible logical volume of the volume groups whose PVs are on this disk.
    pub logical_volumes: Vec<LvInfo>,
    /// LVM physical volumes whose label or metadata was refused (partition and reason).
    pub lvm_errors: Vec<String>,
}

/// Logical volumes that can be attached get volume numbers above this (partitions stay below it), so
/// that `(disk, number)` names partitions and logical volumes alike.
pub const LV_NUMBER_BASE: u32 = 10_000;
const _: () = assert!(LV_NUMBER_BASE > partition::MAX_GPT_ENTRIES + 4);

/// A logical volume found in LVM metadata.
#[derive(Debug, Clone, Serialize)]
pub struct LvInfo {
    pub vg: String,
    pub name: String,
    pub uuid: String,
    /// `/dev/mapper/...` name the guest knows it by.
    pub dm_name: String,
    /// Its volume number in `filesystems` when it can be attached (one linear segment on a PV here).
    pub number: Option<u32>,
    /// Partition holding its PV.
    pub pv_part: Option<u32>,
    /// Why it cannot be attached without device-mapper.
    pub refused: Option<String>,
}

/// A partition and what it holds.
#[derive(Debug, Clone, Serialize)]
pub struct PartFs {
    pub part: u32,
    pub start: u64,
    pub len: u64,
    pub fs: FsInfo,
    /// `vg/lv` when this is a logical volume rather than a partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
}

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

/// The whole inspection.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub disks: Vec<DiskInfo>,
    /// (disk, partition) of the root filesystem.
    pub root: (usize, u32),
    pub root_fs: FsInfo,
    pub root_subvol: Option<String>,
    /// `vg/lv` when the root filesystem is on a logical volume.
    pub root_lv: Option<String>,
    /// (disk, partition) of a separate /boot.
    pub boot: Option<(usize, u32)>,
    pub os: OsInfo,
    pub kernels: Vec<KernelInfo>,
    /// "grub2" or none.
    pub bootloader: Option<String>,
    pub grub_cfg: Option<String>,
    /// update-initramfs, dracut, mkinitrd.
    pub initramfs_tool: Option<String>,
    /// Reasons the image cannot be made bootable on the target.
    pub blockers: Vec<String>,
    pub warnings: Vec<String>,
}

impl Inspection {
    /// All volumes of all disks, for device mapping.
    pub fn volumes(&self) -> Vec<Volume> {
        self.disks
            .iter()
            .enumerate()
            .flat_map(|(d, disk)| {
                let attached = disk.filesystems.iter().map(move |p| Volume {
                    disk: d,
                    part: p.part,
                    kind: p.fs.kind,
                    uuid: p.fs.uuid.clone(),
                    label: p.fs.label.clone(),
                    partuuid: None,
                    lv: p.lv.clone(),
                });
                // Logical volumes that cannot be attached are still known by name.
                let refused = disk
                    .logical_volumes
                    .iter()
                    .filter(|l| l.number.is_none())
                    .map(move |l| Volume {
                        disk: d,
                        part: 0,
                        kind: FsKind::Unknown,
                        uuid: None,
                        label: None,
                        partuuid: None,
                        lv: Some(format!("{}/{}", l.vg, l.name)),
                    });
                attached.chain(refused)
            })
            .collect()
    }

    /// The guest's name for the root device: `/dev/mapper/VG-LV` for a logical volume (a stable name
    /// that the guest's LVM initramfs activates), `UUID=...` otherwise.
    pub fn root_spec(&self) -> String {
        match &self.root_lv {
            Some(vl) => {
                let (vg, lv) = vl.split_once('/').unwrap_or((vl, ""));
                format!("/dev/mapper/{}", lvm::dm_name(vg, lv))
            }
            None => format!("UUID={}", self.root_fs.uuid.as_deref().unwrap_or_default()),
        }
    }

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

/// Read the partition table and probe every partition of one disk.
pub fn probe_disk(path: &Path) -> Result<DiskInfo, InspectError> {
    let disk = FileDisk::open(path).map_err(|e| InspectError::Open(path.to_path_buf(), e))?;
    let table =
        partition::parse(&disk).map_err(|e| InspectError::Partitions(path.to_path_buf(), e))?;
    let mut filesystems: Vec<PartFs> = table
        .partitions
        .iter()
        .map(|p| PartFs {
            part: p.number,
            start: p.start,
            len: p.len,
            fs: fsprobe::probe(&disk, p.start, p.len),
            lv: None,
        })
        .collect();
    let (logical_volumes, lvm_errors, lv_fs) = probe_lvm(&disk, &filesystems);
    filesystems.extend(lv_fs);
    Ok(DiskInfo {
        path: path.display().to_string(),
        format: "raw",
        size: disk.size(),
        table,
        filesystems,
        logical_volumes,
        lvm_errors,
    })
}

/// Read the LVM metadata of every PV partition of a disk; locate each visible logical volume, and
/// probe the filesystem of those that are one linear segment on a PV of this disk.
fn probe_lvm(
    disk: &(impl ReadAt + ?Sized),
    parts: &[PartFs],
) -> (Vec<LvInfo>, Vec<String>, Vec<PartFs>) {
    let mut errors = Vec::new();
    // PV UUID -> partition; VG UUID -> the newest metadata seen on any of its PVs.
    let mut pvs: Vec<(String, &PartFs)> = Vec::new();
    let mut vgs: Vec<lvm::VolumeGroup> = Vec::new();
    for p in parts.iter().filter(|p| p.fs.kind == FsKind::Lvm) {
        match lvm::read_pv(disk, p.start, p.len) {
            Ok(pv) => {
                pvs.push((pv.uuid.clone(), p));
                if let Some(vg) = pv.vg {
                    match vgs.iter_mut().find(|v| v.uuid == vg.uuid) {
                        Some(old) if old.seqno >= vg.seqno => {}
                        Some(old) => *old = vg,
                        None => vgs.push(vg),
                    }
                }
            }
            Err(e) => errors.push(format!("partition {}: {e}", p.part)),
        }
    }
    let mut lvs = Vec::new();
    let mut fs = Vec::new();
    for vg in &vgs {
        for lv in vg.lvs.iter().filter(|l| l.visible) {
            let mut info = LvInfo {
                vg: vg.name.clone(),
                name: lv.name.clone(),
                uuid: lv.uuid.clone(),
                dm_name: lvm::dm_name(&vg.name, &lv.name),
                number: None,
                pv_part: None,
                refused: None,
            };
            let placed = vg.placement(lv).and_then(|pl| {
                let (_, part) = pvs.iter().find(|(u, _)| *u == pl.pv.uuid).ok_or_else(|| {
                    format!(
                        "its physical volume {} ({}) is not on this disk",
                        pl.pv.name, pl.pv.uuid
                    )
                })?;
                info.pv_part = Some(part.part);
                if pl.offset.checked_add(pl.len).is_none_or(|e| e > part.len) {
                    return Err(format!(
                        "its extents ({}+{} bytes) lie past the end of partition {}",
                        pl.offset, pl.len, part.part
                    ));
                }
                Ok((part.start + pl.offset, pl.len))
            });
            match placed {
                Ok((start, len)) => {
                    let number = LV_NUMBER_BASE + 1 + fs.len() as u32;
                    info.number = Some(number);
                    fs.push(PartFs {
                        part: number,
                        start,
                        len,
                        fs: fsprobe::probe(disk, start, len),
                        lv: Some(format!("{}/{}", vg.name, lv.name)),
                    });
                }
                Err(why) => info.refused = Some(why),
            }
            lvs.push(info);
        }
    }
    (lvs, errors, fs)
}

/// Loop devices and mounts of one opened guest; released (in reverse order) on drop.
#[derive(Debug)]
pub struct GuestSession {
    pub root: GuestRoot,
    // Field order = drop order: mounts before loops before the work directory.
    mounts: Vec<Mount>,
    loops: Vec<LoopDevice>,
    pub work: WorkDir,
    pub root_mount: PathBuf,
}

impl GuestSession {
    /// Mount a further filesystem at a guest directory (must be a real directory, no symlinks).
    pub fn mount_in_guest(
        &mut self,
        source: &str,
        guest_dir: &str,
        fstype: Option<&str>,
        flags: MsFlags,
    ) -> Result<(), InspectError> {
        let target = self.root.host_dir_no_symlinks(guest_dir)?;
        self.mounts
            .push(Mount::new(source, &target, fstype, flags, None)?);
        Ok(())
    }

    /// Unmount everything mounted after the root filesystem, newest first.
    pub fn unmount_extras(&mut self, keep: usize) {
        while self.mounts.len() > keep {
            self.mounts.pop();
        }
    }

    /// Number of mounts held.
    pub fn mount_count(&self) -> usize {
        self.mounts.len()
    }
}

fn mount_data(kind: FsKind, read_only: bool, subvol: Option<&str>) -> String {
    let mut opts: Vec<String> = Vec::new();
    if read_only {
        match kind {
            FsKind::Xfs => opts.push("norecovery".into()),
            FsKind::Btrfs => opts.push("rescue=nologreplay".into()),
            FsKind::Ext3 | FsKind::Ext4 => opts.push("noload".into()),
            _ => {}
        }
    }
    if let Some(s) = subvol {
        opts.push(format!("subvol={s}"));
    }
    opts.join(",")
}

fn flags(read_only: bool) -> MsFlags {
    let f = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        f | MsFlags::MS_RDONLY
    } else {
        f
    }
}

/// Attach a partition and mount it at `target`.
fn attach_mount(
    image: &Path,
    p: &PartFs,
    target: &Path,
    read_only: bool,
    subvol: Option<&str>,
) -> Result<(LoopDevice, Mount), InspectError> {
    let lo = LoopDevice::attach(image, p.start, p.len, read_only)?;
    let kind = p.fs.kind;
    let data = mount_data(kind, read_only, subvol);
    let m = Mount::new(
        &lo.dev,
        target,
        kind.mount_type(),
        flags(read_only),
        (!data.is_empty()).then_some(data.as_str()),
    )?;
    Ok((lo, m))
}

fn looks_like_root(g: &GuestRoot) -> bool {
    (g.exists("/etc/os-release") || g.exists("/usr/lib/os-release"))
        && g.kind("/etc").ok().flatten().is_some()
}

/// An opened guest: the session, (disk, partition) of the root, and its btrfs subvolume if any.
pub type OpenedGuest = (GuestSession, (usize, u32), Option<String>);

/// Find the root filesystem on the boot disk and mount it (and a separate /boot) in a new work directory.
pub fn open_guest(
    images: &[PathBuf],
    disks: &[DiskInfo],
    work_parent: &Path,
    read_only: bool,
) -> Result<OpenedGuest, InspectError> {
    let mut work = WorkDir::create(work_parent)?;
    let root_mount = work.subdir("root")?;
    let boot_disk = &disks[0];
    let mut luks = None;
    for p in &boot_disk.filesystems {
        match p.fs.kind {
            FsKind::Luks => luks = Some(format!("partition {}", p.part)),
            k if k.can_be_root() => {
                let (lo, m) = match attach_mount(&images[0], p, &root_mount, read_only, None) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(part = p.part, error = %crate::error::chain(&e), "could not mount candidate root");
                        continue;
                    }
                };
                let mut g = GuestRoot::open(&root_mount)?;
                let mut subvol = None;
                if !looks_like_root(&g)
                    && k == FsKind::Btrfs
                    && g.kind("/@/etc")? == Some(EntryKind::Dir)
                {
                    drop(m);
                    let m2 = Mount::new(
                        &lo.dev,
                        &root_mount,
                        Some("btrfs"),
                        flags(read_only),
                        Some(&mount_data(k, read_only, Some("@"))),
                    )?;
                    g = GuestRoot::open(&root_mount)?;
                    subvol = Some("@".to_string());
                    if looks_like_root(&g) {
                        let s = GuestSession {
                            root: g,
                            mounts: vec![m2],
                            loops: vec![lo],
                            work,
                            root_mount,
                        };
                        return Ok((s, (0, p.part), subvol));
                    }
                    continue;
                }
                if looks_like_root(&g) {
                    let s = GuestSession {
                        root: g,
                        mounts: vec![m],
                        loops: vec![lo],
                        work,
                        root_mount,
                    };
                    return Ok((s, (0, p.part), subvol));
                }
            }
            _ => {}
        }
    }
    if let Some(l) = luks {
        return Err(InspectError::EncryptedRoot(l));
    }
    let mut lvm: Vec<String> = boot_disk.lvm_errors.clone();
    lvm.extend(boot_disk.logical_volumes.iter().filter_map(|l| {
        l.refused
            .as_ref()
            .map(|why| format!("logical volume {}/{}: {why}", l.vg, l.name))
    }));
    if !lvm.is_empty() {
        return Err(InspectError::LvmRoot(lvm.join("; ")));
    }
    if boot_disk
        .filesystems
        .iter()
        .any(|p| p.fs.kind == FsKind::Lvm)
    {
        return Err(InspectError::LvmRoot(
            "the LVM physical volumes hold no logical volume with a Linux root filesystem".into(),
        ));
    }
    Err(InspectError::NoRoot(images[0].clone(), String::new()))
}

/// Mount a separate /boot (from the guest's fstab) into the session. Returns its (disk, part).
pub fn mount_boot(
    s: &mut GuestSession,
    images: &[PathBuf],
    disks: &[DiskInfo],
    volumes: &[Volume],
    read_only: bool,
) -> Result<Option<(usize, u32)>, InspectError> {
    let Some(text) = s.root.read_text("/etc/fstab")? else {
        return Ok(None);
    };
    let Some(entry) = fstab::parse(&text)
        .into_iter()
        .find(|e| e.mountpoint == "/boot")
    else {
        return Ok(None);
    };
    let u = match resolve(&entry.spec, volumes) {
        Resolution::Uuid(u) | Resolution::Lv(Some(u)) => u,
        _ => return Ok(None),
    };
    let Some(v) = volumes
        .iter()
        .find(|v| v.uuid.as_deref() == Some(u.as_str()))
    else {
        return Ok(None);
    };
    let Some(pf) = disks[v.disk].filesystems.iter().find(|p| p.part == v.part) else {
        return Ok(None);
    };
    let target = s.root.host_dir_no_symlinks("/boot")?;
    let (lo, m) = attach_mount(&images[v.disk], pf, &target, read_only, None)?;
    s.loops.push(lo);
    s.mounts.push(m);
    Ok(Some((v.disk, v.part)))
}

fn os_release(g: &GuestRoot) -> Result<OsInfo, GuestError> {
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

fn kernels(g: &GuestRoot, extra: &[&str]) -> Result<Vec<KernelInfo>, GuestError> {
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

/// Inspect an opened guest.
pub fn inspect_guest(
    g: &GuestRoot,
    disks: Vec<DiskInfo>,
    root: (usize, u32),
    root_subvol: Option<String>,
    boot: Option<(usize, u32)>,
) -> Result<Inspection, InspectError> {
    let root_fs = disks[root.0]
        .filesystems
        .iter()
        .find(|p| p.part == root.1)
        .map(|p| p.fs.clone())
        .unwrap_or(FsInfo {
            kind: FsKind::Unknown,
            uuid: None,
            label: None,
        });
    let root_lv = disks[root.0]
        .filesystems
        .iter()
        .find(|p| p.part == root.1)
        .and_then(|p| p.lv.clone());
    let os = os_release(g)?;
    let kernels = kernels(g, if root_lv.is_some() { LVM_REQUIRED } else { &[] })?;
    let grub_cfg = ["/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"]
        .into_iter()
        .find(|p| g.exists(p))
        .map(String::from);
    let bootloader = grub_cfg.as_ref().map(|_| "grub2".to_string());
    let initramfs_tool = [
        ("/usr/sbin/update-initramfs", "update-initramfs"),
        ("/usr/bin/dracut", "dracut"),
        ("/usr/sbin/dracut", "dracut"),
        ("/sbin/mkinitrd", "mkinitrd"),
    ]
    .iter()
    .find(|(p, _)| g.exists(p))
    .map(|(_, n)| n.to_string());
    let mut blockers = Vec::new();
    let mut warnings = Vec::new();
    if root_fs.uuid.is_none() {
        blockers.push("the root filesystem has no UUID".into());
    }
    if bootloader.is_none() {
        let other = ["/boot/extlinux", "/boot/loader/entries", "/boot/syslinux"]
            .iter()
            .find(|p| g.exists(p));
        blockers.push(match other {
            Some(p) => format!("unsupported bootloader ({p} found, no GRUB 2 config)"),
            None => "unknown bootloader: no /boot/grub/grub.cfg or /boot/grub2/grub.cfg".into(),
        });
    }
    if kernels.is_empty() {
        blockers.push("no kernel found in /boot".into());
    } else if !kernels.iter().any(KernelInfo::can_boot_virtio) {
        blockers.push("no installed kernel has the virtio_blk/virtio_pci drivers".into());
    }
    let needs_rebuild = kernels
        .iter()
        .any(|k| k.can_boot_virtio() && !k.missing.is_empty());
    if let Some(lv) = &root_lv {
        if !["/usr/sbin/lvm", "/sbin/lvm"].iter().any(|p| g.exists(p)) {
            blockers.push(format!(
                "the root filesystem is on logical volume {lv} but the guest has no lvm2 (/sbin/lvm): its initramfs cannot activate the volume group"
            ));
        }
    }
    let needs_rebuild = needs_rebuild
        || (root_lv.is_some()
            && kernels
                .iter()
                .any(|k| k.can_boot_virtio() && !k.initramfs_has_lvm));
    if needs_rebuild && initramfs_tool.is_none() {
        blockers.push("the initramfs lacks what the target needs (virtio drivers, or LVM for an LVM root) and no update-initramfs/dracut is installed to rebuild it".into());
    }
    for k in &kernels {
        if k.initramfs.is_none() {
            warnings.push(format!("kernel {} has no initramfs", k.version));
        }
        if let Some(e) = &k.initramfs_error {
            warnings.push(format!("initramfs of {} could not be read: {e}", k.version));
        }
        if !k.can_boot_virtio() {
            warnings.push(format!(
                "kernel {} has no virtio_blk/virtio_pci driver and will not boot on the target",
                k.version
            ));
        }
    }
    if disks[0].table.scheme == partition::Scheme::Gpt
        && disks[0]
            .filesystems
            .iter()
            .any(|p| p.fs.kind == FsKind::Vfat)
    {
        warnings.push("GPT disk with an EFI system partition: the boot check uses BIOS; UEFI firmware is not set up".into());
    }
    Ok(Inspection {
        disks,
        root,
        root_fs,
        root_subvol,
        root_lv,
        boot,
        os,
        kernels,
        bootloader,
        grub_cfg,
        initramfs_tool,
        blockers,
        warnings,
    })
}

/// Probe all disks, open the guest read-only, inspect it, and release everything.
pub fn inspect_images(images: &[PathBuf], work_parent: &Path) -> Result<Inspection, InspectError> {
    crate::progress::step("inspecting partitions, filesystems and LVM metadata");
    let disks = images
        .iter()
        .map(|p| probe_disk(p))
        .collect::<Result<Vec<_>, _>>()?;
    crate::progress::step("looking for the root filesystem (mounted read-only)");
    let (mut session, root, subvol) = open_guest(images, &disks, work_parent, true)?;
    let volumes = volumes_of(&disks);
    let boot = mount_boot(&mut session, images, &disks, &volumes, true)?;
    crate::progress::step("reading the OS release, kernels, initramfs and bootloader");
    inspect_guest(&session.root, disks, root, subvol, boot)
}

pub(crate) fn empty_inspection() -> Inspection {
    Inspection {
        disks: Vec::new(),
        root: (0, 0),
        root_fs: FsInfo {
            kind: FsKind::Unknown,
            uuid: None,
            label: None,
        },
        root_subvol: None,
        root_lv: None,
        boot: None,
        os: OsInfo::default(),
        kernels: Vec::new(),
        bootloader: None,
        grub_cfg: None,
        initramfs_tool: None,
        blockers: Vec::new(),
        warnings: Vec::new(),
    }
}

/// Volumes of probed disks (without a full inspection).
pub fn volumes_of(disks: &[DiskInfo]) -> Vec<Volume> {
    Inspection {
        disks: disks.to_vec(),
        ..empty_inspection()
    }
    .volumes()
}
