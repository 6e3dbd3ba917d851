//! Filesystem freezes for consistency points (`FIFREEZE`/`FITHAW` on the mount points of the
//! filesystems that sit on a replicated disk or its partitions).
//!
//! A freeze must never outlive its purpose. Three things end it: the agent thaws as soon as the
//! point is marked (and on every exit path: [`Frozen`] thaws on drop); a timer thread thaws when
//! the hard cap passes; and a **thaw guard** — a separate process (`rehost-agent thaw-guard`)
//! started before the freeze, reading a pipe from the agent — thaws when the agent dies (the pipe
//! closes) or the cap passes, whichever comes first. A SIGKILLed agent therefore leaves no frozen
//! filesystem behind.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("freeze {0}")]
    Freeze(PathBuf, #[source] std::io::Error),
    #[error("start the thaw guard")]
    Guard(#[source] std::io::Error),
}

/// `major:minor` of a block device.
fn dev_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path).ok()?.rdev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// The device numbers of a disk and its partitions.
fn disk_and_partitions(disk: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(dev) = dev_of(disk) else { return out };
    if let Ok(entries) = std::fs::read_dir(format!("/sys/dev/block/{dev}")) {
        for e in entries.flatten() {
            if e.path().join("partition").exists() {
                if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                    out.insert(d.trim().to_string());
                }
            }
        }
    }
    out.insert(dev);
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One mount point (and its filesystem type) per filesystem on the given devices, from
/// `/proc/self/mountinfo` text.
pub fn mounts_in(mountinfo: &str, devs: &BTreeSet<String>) -> Vec<(PathBuf, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < 5 || sep + 1 >= f.len() {
            continue;
        }
        let (dev, mnt, fstype) = (f[2], f[4], f[sep + 1]);
        if devs.contains(dev) && seen.insert(dev.to_string()) {
            out.push((PathBuf::from(unescape(mnt)), fstype.to_string()));
        }
    }
    out
}

/// The filesystems mounted from any of `disks`.
pub fn mounts_on(disks: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let mut devs = BTreeSet::new();
    for d in disks {
        devs.extend(disk_and_partitions(d));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts_in(&info, &devs)
}

fn ioctl_on(path: &Path, thaw: bool) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument the kernel ignores; `f` is an open descriptor
    // of the mount point for the duration of the call.
    let r = unsafe {
        if thaw {
            fithaw(f.as_raw_fd(), &mut arg)
        } else {
            fifreeze(f.as_raw_fd(), &mut arg)
        }
    };
    r.map(drop).map_err(std::io::Error::from)
}

/// Thaws `path`; a filesystem that is not frozen (EINVAL) is fine.
pub fn thaw(path: &Path) -> std::io::Result<()> {
    match ioctl_on(path, true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// Filesystems frozen for a point; thawed by [`Frozen::thaw`], on drop, by the cap timer, or by
/// the guard process.
pub struct Frozen {
    mounts: Vec<PathBuf>,
    guard: Option<Child>,
    thawed: Arc<AtomicBool>,
    pub started: Instant,
}

/// `freeze.json` in the state dir while filesystems are frozen, written by the thaw guard as it
/// starts and removed as it ends: `rehost-agent uninstall` refuses to run meanwhile.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FreezeMarker {
    pub agent_pid: u32,
    pub guard_pid: u32,
    pub mounts: Vec<PathBuf>,
    /// Unix seconds.
    pub started_at: i64,
    pub cap_ms: u64,
}

pub const FREEZE_FILE: &str = "freeze.json";

impl FreezeMarker {
    /// The marker in `dir` if the freeze it describes may still be in progress (its guard or
    /// agent is alive); a stale one (both gone) is `None`.
    pub fn in_progress(dir: &Path) -> Option<Self> {
        let raw = rehost_proto::fsutil::read_capped(&dir.join(FREEZE_FILE), 1 << 16).ok()?;
        let m: Self = serde_json::from_slice(&raw).ok()?;
        let alive = |pid: u32| {
            pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        };
        (alive(m.guard_pid) || alive(m.agent_pid)).then_some(m)
    }
}

impl Frozen {
    /// Freezes `mounts` with a hard cap of `max`. `exe` is this agent's binary (for the guard);
    /// `marker`, where the guard keeps a [`FreezeMarker`] while the freeze lasts.
    pub fn freeze(
        mounts: &[PathBuf],
        max: Duration,
        exe: &Path,
        marker: Option<&Path>,
    ) -> Result<Self, FreezeError> {
        let mut cmd = Command::new(exe);
        cmd.arg("thaw-guard")
            .arg("--max-ms")
            .arg(max.as_millis().to_string());
        if let Some(m) = marker {
            cmd.arg("--marker").arg(m);
        }
        let mut guard = cmd
            .arg("--")
            .args(mounts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(FreezeError::Guard)?;
        // The guard says it is ready (its pipe is read) before anything is frozen.
        let ready = guard.stdout.take().map(|mut o| {
            let mut b = [0u8; 6];
            std::io::Read::read_exact(&mut o, &mut b).map(|_| b == *b"ready\n")
        });
        if !matches!(ready, Some(Ok(true))) {
            let _ = guard.kill();
            let _ = guard.wait();
            return Err(FreezeError::Guard(std::io::Error::other(
                "the thaw guard did not start",
            )));
        }
        let thawed = Arc::new(AtomicBool::new(false));
        let mut frozen = Frozen {
            mounts: Vec::new(),
            guard: Some(guard),
            thawed: thawed.clone(),
            started: Instant::now(),
        };
        for m in mounts {
            if let Err(e) = ioctl_on(m, false) {
                frozen.thaw();
                return Err(FreezeError::Freeze(m.clone(), e));
            }
            frozen.mounts.push(m.clone());
        }
        frozen.started = Instant::now();
        let (list, flag) = (frozen.mounts.clone(), thawed);
        std::thread::spawn(move || {
            std::thread::sleep(max);
            if !flag.swap(true, Ordering::SeqCst) {
                for m in &list {
                    let _ = thaw(m);
                }
                tracing::warn!(
                    cap_ms = max.as_millis() as u64,
                    "freeze cap reached: filesystems thawed"
                );
            }
        });
        Ok(frozen)
    }

    /// Whether the cap timer already thawed (the point can then not be app-consistent).
    /// How long the filesystems have been frozen.
    pub fn held(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn expired(&self) -> bool {
        self.thawed.load(Ordering::SeqCst)
    }

    /// Thaws everything now; returns how long the freeze lasted.
    pub fn thaw(&mut self) -> Duration {
        let held = self.started.elapsed();
        if !self.thawed.swap(true, Ordering::SeqCst) {
            for m in self.mounts.iter().rev() {
                if let Err(e) = thaw(m) {
                    tracing::error!(mount = %m.display(), error = %e, "thaw failed");
                }
            }
        }
        if let Some(mut g) = self.guard.take() {
            if let Some(mut stdin) = g.stdin.take() {
                let _ = stdin.write_all(b"thawed\n");
            }
            let _ = g.wait();
        }
        held
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// `rehost-agent thaw-guard`: waits for the agent's word on stdin; thaws `mounts` if it does
/// not come within `max` or the agent goes away.
///
/// SIGTERM, SIGINT and SIGHUP are ignored: a stop of the service (all its processes get
/// SIGTERM under systemd's default `KillMode=control-group`; only the agent under the unit's
/// `KillMode=mixed`) must not end the guard before the filesystems are thawed. It ends when the
/// agent says so, when the agent is gone (its pipe closes), or at the cap — thawing in the last two.
pub fn guard_main(max: Duration, mounts: &[PathBuf], marker: Option<&Path>) -> std::io::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code; called before any other thread exists.
        unsafe { signal(s, SigHandler::SigIgn) }.map_err(std::io::Error::from)?;
    }
    if let Some(path) = marker {
        let m = FreezeMarker {
            agent_pid: std::os::unix::process::parent_id(),
            guard_pid: std::process::id(),
            mounts: mounts.to_vec(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            cap_ms: max.as_millis() as u64,
        };
        let data = serde_json::to_vec(&m).expect("marker serialises");
        rehost_proto::fsutil::write_atomic(path, &data, 0o600)?;
    }
    let r = guard_wait(max, mounts);
    if let Some(path) = marker {
        let _ = std::fs::remove_file(path);
    }
    r
}

fn guard_wait(max: Duration, mounts: &[PathBuf]) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    println!("ready");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + max;
    let stdin = std::io::stdin();
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&stdin),
            PollFlags::POLLIN,
        )];
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => {
                let mut b = [0u8; 64];
                let n = stdin.lock().read(&mut b)?;
                if n == 0 {
                    break; // the agent is gone
                }
                got.extend_from_slice(&b[..n]);
                if got.ends_with(b"thawed\n") {
                    return Ok(());
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    for m in mounts {
        if let Err(e) = thaw(m) {
            eprintln!("rehost-agent thaw-guard: thaw {}: {e}", m.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_picks_one_mount_per_filesystem_on_the_disk() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 7:0 / /mnt/a\\040b rw,relatime shared:2 - ext4 /dev/loop0 rw
41 22 7:0 / /srv/bind rw,relatime shared:2 - ext4 /dev/loop0 rw
42 22 259:1 / /data rw - xfs /dev/loop0p1 rw
43 22 0:5 / /proc rw - proc proc rw
garbage line
";
        let devs: BTreeSet<String> = ["7:0".to_string(), "259:1".to_string()].into();
        let m = mounts_in(info, &devs);
        assert_eq!(
            m,
            vec![
                (PathBuf::from("/mnt/a b"), "ext4".into()),
                (PathBuf::from("/data"), "xfs".into())
            ]
        );
    }
}
