//! Safe access to files inside a mounted guest root.
//!
//! Every path is resolved by the kernel with `openat2(RESOLVE_IN_ROOT)`: `..` stops at the guest root and
//! absolute symlink targets are taken relative to it, so a hostile image (`/etc/fstab -> /../../host-file`,
//! `/etc -> /root/../..`) can never make the converter read or write a host file. Magic links are refused,
//! reads are capped, and removals and renames act on the final name itself (`unlinkat`/`renameat` on a
//! parent resolved in the root), never on what it points to.

use nix::errno::Errno;
use nix::fcntl::{openat2, readlinkat, renameat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Default cap for a configuration file read from the guest.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Errors from guest file access; each names the guest path.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("open guest root {0}")]
    OpenRoot(PathBuf, #[source] Errno),
    #[error("guest path {path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("guest file {path} is {size} bytes, larger than the {cap} byte limit")]
    TooLarge { path: String, size: u64, cap: u64 },
    #[error("guest path {0} is not a plain relative path name")]
    BadPath(String),
    #[error("guest path {0} contains a symlink where a real directory is required")]
    SymlinkInPath(String),
}

/// Kind of a directory entry, without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A mounted guest filesystem tree.
#[derive(Debug)]
pub struct GuestRoot {
    host: PathBuf,
    root: OwnedFd,
}

fn io_err(path: &str, op: &'static str, e: impl Into<std::io::Error>) -> GuestError {
    GuestError::Io {
        path: path.to_string(),
        op,
        source: e.into(),
    }
}

/// The status of the file open at `fd`, or an error for `op` on `path` when it is not a regular file.
fn regular_file(fd: &OwnedFd, path: &str, op: &'static str) -> Result<FileStat, GuestError> {
    let st = fstat(fd).map_err(|e| io_err(path, "stat", e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(io_err(
            path,
            op,
            std::io::Error::other("not a regular file"),
        ));
    }
    Ok(st)
}

impl GuestRoot {
    /// Open the guest tree mounted at `host`.
    pub fn open(host: &Path) -> Result<Self, GuestError> {
        let root = nix::fcntl::open(
            host,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| GuestError::OpenRoot(host.to_path_buf(), e))?;
        Ok(Self {
            host: host.to_path_buf(),
            root,
        })
    }

    /// Where the tree is mounted on the host.
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    fn open_with(&self, path: &str, flags: OFlag, resolve: ResolveFlag) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(resolve | ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        openat2(self.root.as_fd(), rel, how)
    }

    fn open_in(&self, path: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        self.open_with(path, flags, ResolveFlag::empty())
    }

    /// Split into (parent, final name); the final name must be a real name (not `.`/`..`).
    fn split<'a>(&self, path: &'a str) -> Result<(&'a str, &'a str), GuestError> {
        let trimmed = path.trim_end_matches('/');
        let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
        if name.is_empty() || name == "." || name == ".." {
            return Err(GuestError::BadPath(path.to_string()));
        }
        Ok((if parent.is_empty() { "/" } else { parent }, name))
    }

    fn parent_fd(&self, path: &str) -> Result<(OwnedFd, String), GuestError> {
        let (parent, name) = self.split(path)?;
        let fd = self
            .open_in(parent, OFlag::O_DIRECTORY | OFlag::O_RDONLY)
            .map_err(|e| io_err(path, "open parent directory", e))?;
        Ok((fd, name.to_string()))
    }

    /// Read a file (following symlinks inside the root), at most `cap` bytes; `None` if it does not exist.
    pub fn read_capped(&self, path: &str, cap: u64) -> Result<Option<Vec<u8>>, GuestError> {
        let fd = match self.open_in(path, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(io_err(path, "open", e)),
        };
        let st = regular_file(&fd, path, "read")?;
        let mut buf = Vec::new();
        File::from(fd)
            .take(cap + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err(path, "read", e))?;
        if buf.len() as u64 > cap {
            return Err(GuestError::TooLarge {
                path: path.to_string(),
                size: st.st_size as u64,
                cap,
            });
        }
        Ok(Some(buf))
    }

    /// Read a text configuration file (capped at [`MAX_CONFIG_BYTES`]), lossily decoded.
    pub fn read_text(&self, path: &str) -> Result<Option<String>, GuestError> {
        Ok(self
            .read_capped(path, MAX_CONFIG_BYTES)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Open a file for streaming reads (following symlinks inside the root); `None` if absent.
    pub fn open_read(&self, path: &str) -> Result<Option<File>, GuestError> {
        match self.open_in(path, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK) {
            Ok(fd) => {
                let st = fstat(&fd).map_err(|e| io_err(path, "stat", e))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                    return Err(io_err(
                        path,
                        "read",
                        std::io::Error::other("not a regular file"),
                    ));
                }
                Ok(Some(File::from(fd)))
            }
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => Ok(None),
            Err(e) => Err(io_err(path, "open", e)),
        }
    }

    /// Kind of the entry at `path` itself (a final symlink is not followed); `None` if absent.
    pub fn kind(&self, path: &str) -> Result<Option<EntryKind>, GuestError> {
        let (dir, name) = match self.parent_fd(path) {
            Ok(x) => x,
            Err(GuestError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(GuestError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match nix::sys::stat::fstatat(
            &dir,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => {
                let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                Ok(Some(match fmt {
                    SFlag::S_IFREG => EntryKind::File,
                    SFlag::S_IFDIR => EntryKind::Dir,
                    SFlag::S_IFLNK => EntryKind::Symlink,
                    _ => EntryKind::Other,
                }))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io_err(path, "stat", e)),
        }
    }

    /// Whether a path exists (following symlinks inside the root).
    pub fn exists(&self, path: &str) -> bool {
        self.open_in(path, OFlag::O_PATH).is_ok()
    }

    /// Entries of a directory (sorted by name), `None` if it does not exist.
    pub fn list_dir(&self, path: &str) -> Result<Option<Vec<(String, EntryKind)>>, GuestError> {
        let fd = match self.open_in(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(io_err(path, "open directory", e)),
        };
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| io_err(path, "read directory", e))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| io_err(path, "read directory", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                Some(nix::dir::Type::File) => EntryKind::File,
                Some(nix::dir::Type::Directory) => EntryKind::Dir,
                Some(nix::dir::Type::Symlink) => EntryKind::Symlink,
                _ => EntryKind::Other,
            };
            out.push((name, kind));
            if out.len() > 100_000 {
                return Err(io_err(
                    path,
                    "read directory",
                    std::io::Error::other("more than 100000 entries"),
                ));
            }
        }
        out.sort();
        Ok(Some(out))
    }

    /// Target of the symlink at `path` (the link itself, not followed).
    pub fn readlink(&self, path: &str) -> Result<String, GuestError> {
        let (dir, name) = self.parent_fd(path)?;
        let t = readlinkat(&dir, name.as_str()).map_err(|e| io_err(path, "readlink", e))?;
        Ok(t.to_string_lossy().into_owned())
    }

    /// Replace the content of an existing file (its mode and owner are kept) or create a new one (0644).
    pub fn write(&self, path: &str, data: &[u8]) -> Result<(), GuestError> {
        let fd = match self.open_in(
            path,
            OFlag::O_WRONLY | OFlag::O_TRUNC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                let (dir, name) = self.parent_fd(path)?;
                nix::fcntl::openat(
                    &dir,
                    name.as_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .map_err(|e| io_err(path, "create", e))?
            }
            Err(e) => return Err(io_err(path, "open for writing", e)),
        };
        regular_file(&fd, path, "write")?;
        let mut f = File::from(fd);
        f.write_all(data).map_err(|e| io_err(path, "write", e))?;
        f.sync_all().map_err(|e| io_err(path, "fsync", e))
    }

    /// Keep a copy of `path` as `path.rehost-orig` unless one exists already (a second conversion of an
    /// already converted image keeps the first original). Returns the backup's guest path.
    pub fn backup(&self, path: &str) -> Result<Option<String>, GuestError> {
        let backup = format!("{path}.rehost-orig");
        if self.kind(&backup)?.is_some() {
            return Ok(None);
        }
        let data = self.read_capped(path, MAX_CONFIG_BYTES)?.ok_or_else(|| {
            io_err(
                path,
                "back up",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        self.write(&backup, &data)?;
        Ok(Some(backup))
    }

    /// Remove the entry at `path` itself (a symlink is removed, not its target).
    pub fn remove(&self, path: &str) -> Result<(), GuestError> {
        let (dir, name) = self.parent_fd(path)?;
        unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| io_err(path, "remove", e))
    }

    /// Rename `from` to `to` (both resolved inside the root; the entries themselves are moved).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), GuestError> {
        let (fd1, n1) = self.parent_fd(from)?;
        let (fd2, n2) = self.parent_fd(to)?;
        renameat(&fd1, n1.as_str(), &fd2, n2.as_str()).map_err(|e| io_err(from, "rename", e))
    }

    /// The host path of a guest directory that must contain no symlink at all (used for mount points and
    /// other places where the host kernel or a host tool follows the path).
    pub fn host_dir_no_symlinks(&self, path: &str) -> Result<PathBuf, GuestError> {
        match self.open_with(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            ResolveFlag::RESOLVE_NO_SYMLINKS,
        ) {
            Ok(_) => Ok(self.host.join(path.trim_start_matches('/'))),
            Err(Errno::ELOOP) => Err(GuestError::SymlinkInPath(path.to_string())),
            Err(e) => Err(io_err(path, "open directory", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, tempfile::TempDir, GuestRoot) {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-file"), "HOST SECRET").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hostname"), "guest\n").unwrap();
        let g = GuestRoot::open(root.path()).unwrap();
        (outside, root, g)
    }

    #[test]
    fn escaping_symlinks_stay_inside_the_root() {
        let (outside, root, g) = tree();
        let host_file = outside.path().join("host-file");
        symlink(&host_file, root.path().join("etc/abs")).unwrap();
        symlink(
            "../../../../../../../../".to_string() + host_file.to_str().unwrap(),
            root.path().join("etc/rel"),
        )
        .unwrap();
        assert_eq!(g.read_text("/etc/abs").unwrap(), None);
        assert_eq!(g.read_text("/etc/rel").unwrap(), None);
        assert_eq!(
            g.read_text("/../../etc/hostname").unwrap().as_deref(),
            Some("guest\n")
        );
        // Writing through the symlink creates nothing on the host.
        let _ = g.write("/etc/abs", b"PWNED");
        assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "HOST SECRET");
        // Removing the link removes the link only.
        g.remove("/etc/abs").unwrap();
        assert!(host_file.exists());
    }

    #[test]
    fn symlinked_directory_is_resolved_in_root() {
        let (outside, root, g) = tree();
        symlink(outside.path(), root.path().join("evil")).unwrap();
        assert_eq!(g.read_text("/evil/host-file").unwrap(), None);
        assert!(matches!(
            g.host_dir_no_symlinks("/evil"),
            Err(GuestError::SymlinkInPath(_))
        ));
        assert!(g.host_dir_no_symlinks("/etc").is_ok());
    }

    #[test]
    fn reads_are_capped() {
        let (_o, root, g) = tree();
        std::fs::write(root.path().join("big"), vec![b'x'; 5000]).unwrap();
        assert!(matches!(
            g.read_capped("/big", 4096),
            Err(GuestError::TooLarge { .. })
        ));
        assert_eq!(g.read_capped("/big", 5000).unwrap().unwrap().len(), 5000);
    }

    #[test]
    fn backup_write_rename_list() {
        let (_o, root, g) = tree();
        assert_eq!(
            g.backup("/etc/hostname").unwrap().as_deref(),
            Some("/etc/hostname.rehost-orig")
        );
        g.write("/etc/hostname", b"new\n").unwrap();
        assert_eq!(g.backup("/etc/hostname").unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/hostname.rehost-orig")).unwrap(),
            "guest\n"
        );
        g.rename("/etc/hostname", "/etc/hn2").unwrap();
        let names: Vec<String> = g
            .list_dir("/etc")
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["hn2", "hostname.rehost-orig"]);
        assert!(g.write("/etc/..", b"").is_err());
        assert!(matches!(g.remove("/etc/.."), Err(GuestError::BadPath(_))));
    }
}
