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
//!
//! Submodules: `disks` reads the partition tables, filesystems and LVM metadata of each disk;
//! `session` finds the root filesystem and mounts it (and a separate /boot); `os` reads the
//! OS release and the installed kernels with their drivers; `summary` writes the human summary.
//! [`inspect_guest`] puts them together and says what blocks a conversion.

mod disks;
mod os;
mod session;
mod summary;

pub use disks::{probe_disk, DiskInfo, LvInfo, PartFs, LV_NUMBER_BASE};
use os::{kernels, os_release};
pub use os::{KernelInfo, OsInfo, LVM_REQUIRED};
pub use session::{mount_boot, open_guest, GuestSession, OpenedGuest};

use crate::devmap::Volume;
use crate::fsprobe::{FsInfo, FsKind};
use crate::guestfs::{GuestError, GuestRoot};
use crate::lvm;
use crate::partition::{self, PartitionError};
use crate::sys::SysError;
use serde::Serialize;
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
