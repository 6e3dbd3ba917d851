//! Disk discovery: whole disks from `/sys/block` with sizes from the `BLKGETSIZE64` ioctl.
//! Partitions never appear there; loop, ram, zram, optical, floppy, device-mapper, md and nbd
//! devices are skipped unless named explicitly with `--devices`, which also accepts image files.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{0} is neither a block device nor a regular file")]
    NotADisk(PathBuf),
    #[error("read the size of {0}")]
    Size(PathBuf, #[source] std::io::Error),
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("list /sys/block")]
    Sysfs(#[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Path the agent reads (`/dev/vdb`, or an image file).
    pub path: PathBuf,
    pub size_bytes: u64,
    pub model: String,
    pub is_file: bool,
    /// Why discovery would not replicate it unless named (None: replicated by default).
    pub skipped: Option<String>,
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// The size of an open block device or regular file.
pub fn size_of(file: &File, path: &Path) -> Result<(u64, bool), DiskError> {
    let meta = file
        .metadata()
        .map_err(|e| DiskError::Size(path.into(), e))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok((meta.len(), true));
    }
    if !ft.is_block_device() {
        return Err(DiskError::NotADisk(path.into()));
    }
    let mut size = 0u64;
    use std::os::fd::AsRawFd;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }
        .map_err(|e| DiskError::Size(path.into(), e.into()))?;
    Ok((size, false))
}

/// Opens a device or image named by the user and reads its size.
pub fn probe(path: &Path) -> Result<Disk, DiskError> {
    let f = File::open(path).map_err(|e| DiskError::Open(path.into(), e))?;
    let (size, is_file) = size_of(&f, path)?;
    if size == 0 {
        return Err(DiskError::Empty(path.into()));
    }
    let model = if is_file {
        "image file".into()
    } else {
        sys_model(path.file_name().and_then(|n| n.to_str()).unwrap_or(""))
    };
    Ok(Disk {
        path: path.into(),
        size_bytes: size,
        model,
        is_file,
        skipped: None,
    })
}

fn sys_model(name: &str) -> String {
    let base = Path::new("/sys/block").join(name).join("device");
    let read = |f: &str| {
        std::fs::read_to_string(base.join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let (vendor, model) = (read("vendor"), read("model"));
    match (vendor.is_empty(), model.is_empty()) {
        (true, true) => "-".into(),
        (false, true) => vendor,
        (true, false) => model,
        (false, false) => format!("{vendor} {model}"),
    }
}

fn skip_reason(name: &str) -> Option<&'static str> {
    const SKIP: [(&str, &str); 9] = [
        ("loop", "loop device"),
        ("ram", "RAM disk"),
        ("zram", "compressed RAM disk"),
        ("sr", "optical drive"),
        ("fd", "floppy drive"),
        ("dm-", "device-mapper volume (its disks are replicated)"),
        ("md", "software RAID (its disks are replicated)"),
        ("nbd", "network block device"),
        ("zd", "ZFS volume"),
    ];
    SKIP.iter()
        .find(|(p, _)| name.starts_with(p))
        .map(|(_, why)| *why)
}

/// Every whole disk in `/sys/block`, with the reason it is skipped by default where there is one.
pub fn discover() -> Result<Vec<Disk>, DiskError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(DiskError::Sysfs)?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let path = Path::new("/dev").join(&name);
        let sys_size = std::fs::read_to_string(Path::new("/sys/block").join(&name).join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 512;
        let mut skipped = skip_reason(&name).map(String::from);
        let size = match File::open(&path)
            .map_err(|e| DiskError::Open(path.clone(), e))
            .and_then(|f| size_of(&f, &path))
        {
            Ok((s, _)) => s,
            Err(e) => {
                let why = match &e {
                    DiskError::Open(_, io) => format!("cannot be opened: {io}"),
                    DiskError::Size(_, io) => format!("cannot read its size: {io}"),
                    other => other.to_string(),
                };
                skipped = skipped.or(Some(why));
                sys_size
            }
        };
        if size == 0 {
            skipped = skipped.or(Some("no medium / empty".into()));
        }
        out.push(Disk {
            path,
            size_bytes: size,
            model: sys_model(&name),
            is_file: false,
            skipped,
        });
    }
    Ok(out)
}

pub use rehost_proto::human::bytes as human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_virtual_devices_keeps_disks() {
        assert!(skip_reason("loop0").is_some());
        assert!(skip_reason("zram0").is_some());
        assert!(skip_reason("sr0").is_some());
        assert!(skip_reason("dm-1").is_some());
        assert!(skip_reason("vda").is_none());
        assert!(skip_reason("nvme0n1").is_none());
        assert!(skip_reason("sda").is_none());
        assert!(skip_reason("xvda").is_none());
    }

    #[test]
    fn probes_image_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![1u8; 12345]).unwrap();
        let d = probe(&p).unwrap();
        assert_eq!(d.size_bytes, 12345);
        assert!(d.is_file);
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(probe(&p), Err(DiskError::Empty(_))));
        assert!(matches!(probe(dir.path()), Err(DiskError::NotADisk(_))));
    }

    #[test]
    fn discovery_lists_sys_block() {
        // Every machine has /sys/block; whatever it lists must have a name under /dev.
        for d in discover().unwrap() {
            assert!(d.path.starts_with("/dev"));
        }
    }
}
