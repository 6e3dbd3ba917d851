//! A loop device holding a mounted ext4 filesystem, for the tests of continuous replication and
//! consistency points (root only).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{file_hash, run_ok};

/// A loop device over an image file, with an ext4 filesystem mounted from it.
pub struct LoopFs {
    pub dev: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// `source.img` and `mnt` in `dir`.
    pub fn new(dir: &Path, size_mib: u64) -> Self {
        Self::named(dir, "source", size_mib)
    }

    /// `NAME.img` and `NAME-mnt` in `dir` (`source` is `source.img` and `mnt`).
    pub fn named(dir: &Path, name: &str, size_mib: u64) -> Self {
        let img = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size_mib << 20).unwrap();
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mnt = if name == "source" {
            dir.join("mnt")
        } else {
            dir.join(format!("{name}-mnt"))
        };
        std::fs::create_dir_all(&mnt).unwrap();
        let mut fs = LoopFs {
            dev,
            mnt,
            mounted: false,
        };
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&fs.dev),
        );
        run_ok(Command::new("mount").arg(&fs.dev).arg(&fs.mnt));
        fs.mounted = true;
        fs
    }

    pub fn umount(&mut self) {
        if self.mounted {
            run_ok(Command::new("umount").arg(&self.mnt));
            self.mounted = false;
        }
    }

    /// blake3 of the whole device, bypassing any stale page cache.
    pub fn hash(&self) -> String {
        run_ok(Command::new("blockdev").arg("--flushbufs").arg(&self.dev));
        file_hash(&self.dev)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Asserts that the last `n` of `files` (fsynced under `mnt`, with their blake3) are in the ext4
/// image `img`, read back with debugfs; `what` names the image in the message.
pub fn assert_files_in_image(
    img: &Path,
    mnt: &Path,
    files: &[(PathBuf, String)],
    n: usize,
    what: &str,
) {
    for (p, h) in files.iter().rev().take(n) {
        let rel = p.strip_prefix(mnt).unwrap();
        let out = run_ok(
            Command::new("debugfs")
                .args(["-R", &format!("cat /{}", rel.display())])
                .arg(img),
        );
        assert_eq!(
            blake3::hash(&out.stdout).to_hex().to_string(),
            *h,
            "{} is not in {what}",
            rel.display()
        );
    }
}
