//! A content manifest of an image, used to define and check "the same output".
//!
//! Byte-identical output is not achievable for a filesystem mounted read-write (ext4 writes mount
//! times, inode generation numbers are random, block allocation may differ), so two outputs are "the
//! same" when: the bytes outside every partition (MBR, boot loader gap) are identical, partitions without
//! a mountable filesystem (swap, unknown) are byte-identical, and every mountable filesystem holds the
//! same tree — same paths, types, modes, owners, sizes, file contents (blake3), symlink targets and device
//! numbers. Timestamps (atime/mtime/ctime) are excluded. Filesystems are mounted read-only without
//! journal replay, and symlinks are never followed.

use crate::inspect::{self, InspectError};
use crate::sys::{LoopDevice, Mount, WorkDir};
use nix::mount::MsFlags;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn hash_range(path: &Path, start: u64, len: u64) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(start))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f.take(len), &mut h)?;
    Ok(h.finalize().to_hex().to_string())
}

fn walk(base: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    let dir = base.join(rel.trim_start_matches('/'));
    let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = format!("{rel}/{name}");
        let md = std::fs::symlink_metadata(e.path())?;
        let ft = md.file_type();
        let common = format!("{:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
        if ft.is_dir() {
            out.push(format!("{path} dir {common}"));
            walk(base, &path, out)?;
        } else if ft.is_symlink() {
            out.push(format!(
                "{path} link {common} -> {}",
                std::fs::read_link(e.path())?.display()
            ));
        } else if ft.is_file() {
            let mut h = blake3::Hasher::new();
            std::io::copy(&mut File::open(e.path())?, &mut h)?;
            out.push(format!(
                "{path} file {common} {} {}",
                md.len(),
                h.finalize().to_hex()
            ));
        } else if ft.is_block_device() || ft.is_char_device() {
            out.push(format!("{path} dev {common} {:x}", md.rdev()));
        } else {
            out.push(format!("{path} other {common}"));
        }
    }
    Ok(())
}

/// Errors building a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Sys(#[from] crate::sys::SysError),
    #[error("read {0}")]
    Io(String, #[source] std::io::Error),
}

/// The manifest lines of a raw image (see the module docs for what is compared).
pub fn manifest(image: &Path, work_parent: &Path) -> Result<Vec<String>, ManifestError> {
    let disk = inspect::probe_disk(image)?;
    let io = |what: String| move |e| ManifestError::Io(what, e);
    let mut out = Vec::new();
    let mut covered: Vec<(u64, u64)> = disk
        .filesystems
        .iter()
        .map(|p| (p.start, p.start + p.len))
        .collect();
    covered.sort();
    let mut pos = 0;
    for (s, e) in covered
        .iter()
        .chain(std::iter::once(&(disk.size, disk.size)))
    {
        if *s > pos {
            out.push(format!(
                "raw {pos}..{s} {}",
                hash_range(image, pos, s - pos).map_err(io(format!("{pos}..{s}")))?
            ));
        }
        pos = pos.max(*e);
    }
    let mut work = WorkDir::create(work_parent)?;
    let mnt = work.subdir("m")?;
    for p in &disk.filesystems {
        let Some(fstype) = p.fs.kind.mount_type() else {
            out.push(format!(
                "part {} {:?} raw {}",
                p.part,
                p.fs.kind,
                hash_range(image, p.start, p.len).map_err(io(format!("part {}", p.part)))?
            ));
            continue;
        };
        let lo = LoopDevice::attach(image, p.start, p.len, true)?;
        let data = match fstype {
            "ext4" => "noload",
            "xfs" => "norecovery",
            "btrfs" => "rescue=nologreplay",
            _ => "",
        };
        let m = Mount::new(
            &lo.dev,
            &mnt,
            Some(fstype),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            (!data.is_empty()).then_some(data),
        )?;
        out.push(format!(
            "part {} {:?} uuid={}",
            p.part,
            p.fs.kind,
            p.fs.uuid.as_deref().unwrap_or("-")
        ));
        let mut lines = Vec::new();
        walk(&mnt, "", &mut lines).map_err(io(format!("files of partition {}", p.part)))?;
        out.extend(lines.into_iter().map(|l| format!("p{}:{l}", p.part)));
        drop(m);
        drop(lo);
    }
    Ok(out)
}
