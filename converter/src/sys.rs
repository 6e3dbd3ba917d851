//! Host resources the converter holds (loop devices, mounts, child processes, its work directory), each
//! behind a guard that releases it on drop, and a registry so that a SIGINT/SIGTERM releases them too.
//!
//! The signal handling thread waits for SIGINT/SIGTERM (blocked in every other thread), kills registered
//! children, unmounts registered mounts (lazily if busy) in reverse order, detaches loop devices, removes
//! the (by then empty) work directory tree, and exits with 128+signal.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Errors from host operations; each names its operation.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("attach loop device for {path} (offset {offset}, size {size}): {msg}")]
    Loop {
        path: PathBuf,
        offset: u64,
        size: u64,
        msg: String,
    },
    #[error("mount {source_dev} on {target} ({fstype})")]
    Mount {
        source_dev: String,
        target: PathBuf,
        fstype: String,
        source: nix::Error,
    },
    #[error("create work directory {0}")]
    WorkDir(PathBuf, #[source] std::io::Error),
    #[error("run {0}")]
    Spawn(String, #[source] std::io::Error),
}

#[derive(Debug, Clone)]
enum Res {
    Loop(String),
    Mount(PathBuf),
    Child(u32),
    Dir(PathBuf),
    File(PathBuf),
}

static REGISTRY: Mutex<Vec<(u64, Res)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn register(r: Res) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, r));
    id
}

/// Remove `id` from the registry; true if it was still there. Whoever removes an entry releases it, so a
/// guard dropped after the signal handler released its resource does not release it a second time (a
/// loop device number may already belong to someone else by then).
fn unregister(id: u64) -> bool {
    let mut r = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let before = r.len();
    r.retain(|(i, _)| *i != id);
    r.len() != before
}

static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The signal that interrupted the converter, if any. The signal thread is then releasing everything
/// and will exit the process; the main thread must not exit on its own.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn detach_loop(dev: &str) {
    for _ in 0..20 {
        match Command::new("losetup").arg("-d").arg(dev).status() {
            Ok(s) if s.success() => return wait_released(dev),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    tracing::warn!(dev, "could not detach loop device");
}

/// `losetup -d` of a device someone else still holds open (udev probing a partition node) only
/// marks it for autoclear; the kernel lets go at the last close. Waits (up to 5 s) for that, so
/// that nothing is still attached when the converter exits.
fn wait_released(dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let backing = format!("/sys/block/{name}/loop/backing_file");
    for _ in 0..100 {
        if !Path::new(&backing).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    tracing::warn!(dev, "loop device still attached 5 s after its detach");
}

fn unmount(target: &Path) {
    for _ in 0..20 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return,
            Err(nix::errno::Errno::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "unmount failed");
                break;
            }
        }
    }
    if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
        tracing::warn!(target = %target.display(), error = %e, "lazy unmount failed");
    }
}

/// Release everything still registered, newest first (used by the signal handler).
pub fn release_all() {
    let items: Vec<(u64, Res)> =
        std::mem::take(&mut *REGISTRY.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, r) in items.iter().rev() {
        if let Res::Child(pid) = r {
            // Children run in their own process group: kill the whole group (a chroot'd
            // update-initramfs has its own children that keep the guest mount busy).
            let _ = kill(Pid::from_raw(-(*pid as i32)), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for (_, r) in items.into_iter().rev() {
        match r {
            Res::Loop(dev) => detach_loop(&dev),
            Res::Mount(t) => unmount(&t),
            // Only empty directories are removed: never recurse into what might still be a mount.
            Res::Dir(d) => {
                let _ = std::fs::remove_dir(&d);
            }
            Res::File(f) => {
                let _ = std::fs::remove_file(&f);
            }
            Res::Child(_) => {}
        }
    }
}

/// Block SIGINT/SIGTERM/SIGHUP in this (the main) thread and start a thread that cleans up and exits
/// when one arrives. Call once, before any other thread is started.
pub fn install_signal_cleanup() -> Result<(), nix::Error> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                INTERRUPTED.store(sig as i32, Ordering::SeqCst);
                eprintln!("rehost-converter: {sig:?} received, releasing mounts and loop devices");
                release_all();
                std::process::exit(128 + sig as i32);
            }
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
}

/// A loop device, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub dev: String,
    id: u64,
}

impl LoopDevice {
    /// Attach `path[offset..offset+size]`.
    pub fn attach(path: &Path, offset: u64, size: u64, read_only: bool) -> Result<Self, SysError> {
        let err = |msg: String| SysError::Loop {
            path: path.to_path_buf(),
            offset,
            size,
            msg,
        };
        let mut cmd = Command::new("losetup");
        cmd.args([
            "--find",
            "--show",
            "--offset",
            &offset.to_string(),
            "--sizelimit",
            &size.to_string(),
        ]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = cmd.arg(path).output().map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/loop") {
            return Err(err(format!("unexpected losetup output {dev:?}")));
        }
        let id = register(Res::Loop(dev.clone()));
        Ok(Self { dev, id })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if unregister(self.id) {
            detach_loop(&self.dev);
        }
    }
}

/// A mount, unmounted on drop.
#[derive(Debug)]
pub struct Mount {
    pub target: PathBuf,
    id: u64,
}

impl Mount {
    /// Mount `source` on `target`. `target` must be a directory the caller resolved safely.
    pub fn new(
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<Self, SysError> {
        mount(Some(source), target, fstype, flags, data).map_err(|e| SysError::Mount {
            source_dev: source.to_string(),
            target: target.to_path_buf(),
            fstype: fstype.unwrap_or("bind").to_string(),
            source: e,
        })?;
        let id = register(Res::Mount(target.to_path_buf()));
        Ok(Self {
            target: target.to_path_buf(),
            id,
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if unregister(self.id) {
            unmount(&self.target);
        }
    }
}

/// The converter's own work directory; its (empty) subdirectories and itself are removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    pub path: PathBuf,
    dirs: Vec<(PathBuf, u64)>,
}

impl WorkDir {
    /// Create a fresh work directory under `parent`.
    pub fn create(parent: &Path) -> Result<Self, SysError> {
        std::fs::create_dir_all(parent).map_err(|e| SysError::WorkDir(parent.to_path_buf(), e))?;
        let path = nix::unistd::mkdtemp(&parent.join("rehost-converter.XXXXXX"))
            .map_err(|e| SysError::WorkDir(parent.to_path_buf(), e.into()))?;
        let id = register(Res::Dir(path.clone()));
        Ok(Self {
            dirs: vec![(path.clone(), id)],
            path,
        })
    }

    /// Create (and track) a subdirectory.
    pub fn subdir(&mut self, name: &str) -> Result<PathBuf, SysError> {
        let p = self.path.join(name);
        std::fs::create_dir(&p).map_err(|e| SysError::WorkDir(p.clone(), e))?;
        let id = register(Res::Dir(p.clone()));
        self.dirs.push((p.clone(), id));
        Ok(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for (d, id) in self.dirs.iter().rev() {
            if !unregister(*id) {
                continue;
            }
            if let Err(e) = std::fs::remove_dir(d) {
                // A leftover file (a serial log the user asked to keep elsewhere is never here) or a mount
                // that could not be released: leave it rather than delete through it.
                tracing::warn!(dir = %d.display(), error = %e, "work directory not removed");
            }
        }
    }
}

/// A temporary file of the converter's (a raw copy of a qcow2 input), removed on drop and on a signal.
#[derive(Debug)]
pub struct TempFile {
    pub path: PathBuf,
    id: u64,
}

impl TempFile {
    /// Track `path` (which need not exist yet) for removal.
    pub fn new(path: PathBuf) -> Self {
        let id = register(Res::File(path.clone()));
        Self { path, id }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if unregister(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A child process registered for kill-on-signal while it runs.
#[derive(Debug)]
pub struct ChildGuard {
    id: u64,
}

impl ChildGuard {
    pub fn new(pid: u32) -> Self {
        Self {
            id: register(Res::Child(pid)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        unregister(self.id);
    }
}

/// Run a command to completion (registered for kill-on-signal); returns (success, stdout+stderr tail).
pub fn run(cmd: &mut Command, what: &str) -> Result<(bool, String), SysError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| SysError::Spawn(what.to_string(), e))?;
    let _g = ChildGuard::new(child.id());
    let mut err = child.stderr.take().expect("piped stderr");
    let errt = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut out = Vec::new();
    let _ = child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_end(&mut out);
    let status = child
        .wait()
        .map_err(|e| SysError::Spawn(what.to_string(), e))?;
    out.extend(errt.join().unwrap_or_default());
    let text = String::from_utf8_lossy(&out);
    let tail: String = text
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Ok((status.success(), tail))
}
