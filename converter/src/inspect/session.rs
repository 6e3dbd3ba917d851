//! The guest session: the root filesystem found among the boot disk's volumes and mounted (with a
//! separate /boot named in its fstab) inside a private work directory, over loop devices.

use super::{DiskInfo, InspectError, PartFs};
use crate::devmap::{resolve, Resolution, Volume};
use crate::fsprobe::FsKind;
use crate::fstab;
use crate::guestfs::{EntryKind, GuestRoot};
use crate::sys::{LoopDevice, Mount, WorkDir};
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

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
                let (lo, mut m) = match attach_mount(&images[0], p, &root_mount, read_only, None) {
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
                    // The root is the `@` subvolume: mounted again with it.
                    drop(m);
                    m = Mount::new(
                        &lo.dev,
                        &root_mount,
                        Some("btrfs"),
                        flags(read_only),
                        Some(&mount_data(k, read_only, Some("@"))),
                    )?;
                    g = GuestRoot::open(&root_mount)?;
                    subvol = Some("@".to_string());
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
