//! File modes of the data dir: replicas are other servers' whole disks, so nothing in the data
//! dir is for other local users. The data dir and every directory in it are created 0700 and
//! every file 0600, with explicit modes (so whatever the umask), and [`check_tree`] at start
//! finds and fixes anything more open (an older server, a copy, a hand-made file).
//!
//! The one exception is a directory that only grants *search* (x) to group or others: a libvirt
//! launch adds it on the path to its target dir, because libvirt runs QEMU as its own user (see
//! [`crate::launch`]). Search without read lists nothing and opens nothing that is not itself
//! readable, and every file is 0600, so the check accepts it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// `create_dir_all` with every directory it creates 0700 (existing ones are left alone).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Options that create a file 0600 (an existing file keeps its mode).
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates (or truncates) `path` for writing, 0600 unless it exists.
pub fn create(path: &Path) -> io::Result<File> {
    options().write(true).create(true).truncate(true).open(path)
}

/// Creates a file for writing with `mode` (with `new`, only if it does not exist yet), and sets
/// that mode even if the file existed or the
/// umask took bits away (an operator's explicit choice, e.g. `snapshot export --mode`).
pub fn create_with_mode(path: &Path, mode: u32, new: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .create_new(new)
        .mode(mode)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(f)
}

/// Adds search permission for group and others (no read, no write) to `dir` and each of its
/// parents up to and including `top` (when `dir` is inside it): what libvirt's QEMU, which runs
/// as its own user, needs to open an image in `dir`. Returns the directories it changed.
pub fn allow_search(dir: &Path, top: &Path) -> io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    if !dir.starts_with(top) {
        return Ok(changed);
    }
    let mut d = Some(dir);
    while let Some(p) = d {
        let mode = std::fs::metadata(p)?.permissions().mode() & 0o7777;
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o011))?;
            changed.push(p.to_path_buf());
        }
        if p == top {
            break;
        }
        d = p.parent();
    }
    Ok(changed)
}

/// Whether `mode` (of a file or, with `dir`, a directory) lets group or others in.
pub fn too_open(mode: u32, dir: bool) -> bool {
    if dir {
        mode & 0o066 != 0
    } else {
        mode & 0o077 != 0
    }
}

/// What [`check_tree`] found and fixed.
#[derive(Debug, Default, Clone)]
pub struct TreeCheck {
    pub checked: u64,
    pub fixed: u64,
    /// The first path it fixed, and its mode before.
    pub example: Option<(PathBuf, u32)>,
    /// Paths it could not fix (with why), at most a few.
    pub failed: Vec<(PathBuf, String)>,
}

/// Walks `root` (not following symlinks, not crossing into other filesystems: a converter's
/// guest filesystem a crash left mounted under a target dir is not ours to change) and makes
/// every too-open directory 0700 and every too-open regular file 0600. Sockets, symlinks and
/// devices are left alone.
pub fn check_tree(root: &Path) -> io::Result<TreeCheck> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = TreeCheck::default();
    let dev = std::fs::symlink_metadata(root)?.dev();
    let mut stack = vec![root.to_path_buf()];
    let mut first = true;
    while let Some(p) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            // Removed meanwhile (a finished object's .partial, a test target).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !first => continue,
            Err(e) => return Err(e),
        };
        first = false;
        let ft = meta.file_type();
        if !(ft.is_dir() || ft.is_file()) || meta.dev() != dev {
            continue;
        }
        out.checked += 1;
        let mode = meta.permissions().mode() & 0o7777;
        if too_open(mode, ft.is_dir()) {
            let want = if ft.is_dir() { DIR_MODE } else { FILE_MODE };
            match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want)) {
                Ok(()) => {
                    out.fixed += 1;
                    if out.example.is_none() {
                        out.example = Some((p.clone(), mode));
                    }
                }
                Err(e) if out.failed.len() < 5 => out.failed.push((p.clone(), e.to_string())),
                Err(_) => {}
            }
        }
        if ft.is_dir() {
            match std::fs::read_dir(&p) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        stack.push(e.path());
                    }
                }
                Err(e) if out.failed.len() < 5 => out.failed.push((p.clone(), e.to_string())),
                Err(_) => {}
            }
        }
    }
    Ok(out)
}

/// [`check_tree`] on the data dir at start, logged once: a warning with the count and an example
/// when something was too open.
pub fn check_data_dir(root: &Path) -> io::Result<TreeCheck> {
    let start = std::time::Instant::now();
    let c = check_tree(root)?;
    if let Some((path, mode)) = &c.example {
        tracing::warn!(
            fixed = c.fixed,
            checked = c.checked,
            example = %path.display(),
            example_mode = format!("{mode:04o}"),
            "data dir files were readable by other users; made them private (dirs 0700, files 0600)"
        );
    } else {
        tracing::debug!(
            checked = c.checked,
            ms = start.elapsed().as_millis() as u64,
            "data dir modes checked"
        );
    }
    for (p, e) in &c.failed {
        tracing::warn!(path = %p.display(), error = %e, "could not make private");
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn fixes_what_is_too_open_and_leaves_search_only_dirs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("data");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("lv")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        std::fs::write(root.join("ok"), b"x").unwrap();
        for (p, m) in [
            ("", 0o755),
            ("a", 0o777),
            ("a/b", 0o750),
            ("a/b/f", 0o644),
            ("ok", 0o600),
            ("lv", 0o711),
        ] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let before = mode(Path::new("/etc/passwd"));
        let c = check_tree(&root).unwrap();
        assert_eq!(c.fixed, 4, "{c:?}");
        assert_eq!((mode(&root), mode(&root.join("a"))), (0o700, 0o700));
        assert_eq!(mode(&root.join("a/b")), 0o700);
        assert_eq!(mode(&root.join("a/b/f")), 0o600);
        assert_eq!(mode(&root.join("lv")), 0o711, "search-only is kept");
        assert_eq!(
            mode(Path::new("/etc/passwd")),
            before,
            "symlinks not followed"
        );
        assert!(c.example.is_some());
        assert_eq!(check_tree(&root).unwrap().fixed, 0);
    }

    /// Needs root (a tmpfs mount); skips without it, fails under `CI=true`.
    #[test]
    fn does_not_cross_into_a_filesystem_mounted_inside() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root and CI=true"
            );
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let mnt = t.path().join("targets/m/job-1-test/work/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m,mode=0755"),
        )
        .unwrap();
        std::fs::write(mnt.join("guest-file"), b"x").unwrap();
        std::fs::set_permissions(
            mnt.join("guest-file"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let c = check_tree(t.path());
        let guest = (mode(&mnt), mode(&mnt.join("guest-file")));
        nix::mount::umount(&mnt).unwrap();
        c.unwrap();
        assert_eq!(
            guest,
            (0o755, 0o644),
            "the mounted filesystem is left alone"
        );
        assert_eq!(mode(&t.path().join("targets")), 0o700);
    }

    #[test]
    fn creates_private_whatever_the_umask() {
        let t = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let d = t.path().join("x/y");
        create_dir_all(&d).unwrap();
        create(&d.join("f")).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&t.path().join("x")), 0o700);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join("f")), 0o600);
    }
}
