//! A job's target on the staging host: its dir (exported sources, converter work dir, converted
//! images, `qemu.sh`, `domain.xml`, serial log), the QEMU process or libvirt domain started from
//! it, and removing all of it again (a failed job, a replaced test, `test revert`, or a job a
//! server crash interrupted).
//!
//! Processes are found again through files in the dir (`qemu.pid`, `domain.name`) and are only
//! signalled when their command line names the dir, so a recycled pid is never killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const PIDFILE: &str = "qemu.pid";
pub const DOMAIN_FILE: &str = "domain.name";
pub const SERIAL_LOG: &str = "serial.log";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Command(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TargetError {
    let what = what.into();
    move |source| TargetError::Io { what, source }
}

/// Whether process `pid` runs and its command line mentions `needle`.
pub fn process_mentions(pid: u32, needle: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => String::from_utf8_lossy(&c).contains(needle),
        Err(_) => false,
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace`, to `pid` if its command line mentions `needle`.
/// Returns whether a process was stopped.
pub fn stop_process(pid: u32, needle: &str, grace: Duration) -> bool {
    if pid <= 1 || !process_mentions(pid, needle) {
        return false;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    true
}

/// The VM started from `dir` (its pidfile), if it still runs.
pub fn vm_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PIDFILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    process_mentions(pid, &dir.display().to_string()).then_some(pid)
}

/// Mount points at or under `dir` (deepest first), from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()).starts_with(dir) {
                out.push(format!("/dev/{name}"));
            }
        }
    }
    out
}

/// Stops whatever runs from `dir` and removes it: the libvirt domain, the QEMU process, mounts
/// and loop devices left under it (a converter killed mid-way), then the files. Returns what it
/// did, for the job log. A dir that does not exist is fine.
pub fn remove(dir: &Path) -> Result<Vec<String>, TargetError> {
    let mut done = Vec::new();
    if !dir.exists() {
        return Ok(done);
    }
    if let Ok(name) = std::fs::read_to_string(dir.join(DOMAIN_FILE)) {
        let name = name.trim();
        if !name.is_empty() {
            let destroyed = Command::new("virsh")
                .args(["destroy", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let undefined = Command::new("virsh")
                .args(["undefine", "--nvram", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            done.push(format!(
                "libvirt domain {name}: {}{}",
                if destroyed { "destroyed, " } else { "" },
                if undefined {
                    "undefined"
                } else {
                    "not defined"
                }
            ));
        }
    }
    if let Some(pid) = vm_pid(dir) {
        if stop_process(pid, &dir.display().to_string(), Duration::from_secs(10)) {
            done.push(format!("VM (qemu pid {pid}) stopped"));
        }
    }
    for m in mounts_under(dir) {
        match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => done.push(format!("unmounted {}", m.display())),
            Err(e) => {
                return Err(TargetError::Command(format!(
                    "unmount {} (left by an interrupted conversion): {e}",
                    m.display()
                )))
            }
        }
    }
    for l in loops_under(dir) {
        let ok = Command::new("losetup")
            .args(["-d", &l])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            done.push(format!("detached {l}"));
        } else {
            return Err(TargetError::Command(format!(
                "detach loop device {l} backed by a file in {}",
                dir.display()
            )));
        }
    }
    std::fs::remove_dir_all(dir).map_err(io(format!("remove {}", dir.display())))?;
    done.push(format!("removed {}", dir.display()));
    Ok(done)
}

/// Starts QEMU daemonized with `args` (which hold `-pidfile` and `-daemonize`); returns its pid.
pub fn start_qemu(dir: &Path, args: &[String]) -> Result<u32, TargetError> {
    let out = Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(
            "start qemu-system-x86_64 (is the qemu-system-x86 package installed?)",
        ))?;
    if !out.status.success() {
        return Err(TargetError::Command(format!(
            "qemu-system-x86_64 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    vm_pid(dir).ok_or_else(|| {
        TargetError::Command("qemu-system-x86_64 started but left no running process".into())
    })
}

/// `virsh define` and `virsh start` of `xml`; the domain's name is kept in the dir for removal.
pub fn start_libvirt(dir: &Path, xml: &Path, name: &str) -> Result<(), TargetError> {
    let run = |args: &[&str]| -> Result<(), TargetError> {
        let out = Command::new("virsh").args(args).output().map_err(io(
            "run virsh (launch method libvirt needs libvirt: apt-get install libvirt-clients libvirt-daemon-system)",
        ))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(TargetError::Command(format!(
                "virsh {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    crate::private::create(&dir.join(DOMAIN_FILE))
        .and_then(|mut f| std::io::Write::write_all(&mut f, name.as_bytes()))
        .map_err(io("record the domain name"))?;
    run(&["define", &xml.display().to_string()])?;
    run(&["start", name])
}

/// Waits until the serial log shows a boot marker, a known failure, the VM's end (`running`
/// turns false), or `timeout` (the converter's boot check, on a VM the server started).
pub fn watch_boot(
    serial: &Path,
    markers: &[String],
    timeout: Duration,
    running: &dyn Fn() -> bool,
) -> Result<rehost_converter::bootcheck::Watched, String> {
    let mut exited = || (!running()).then(|| "the VM stopped before its boot marker".to_string());
    let w = rehost_converter::bootcheck::watch(serial, markers, timeout, &mut exited)
        .map_err(|e| format!("{e}"))?;
    if w.booted {
        Ok(w)
    } else {
        Err(format!("{} (see {})", w.evidence, serial.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_dir_stops_only_its_own_processes() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("job-1");
        std::fs::create_dir(&t).unwrap();
        // A process whose command line names the dir, recorded as the VM.
        let mut own = Command::new("bash")
            .arg("-c")
            .arg(format!("exec -a 'qemu {}' sleep 300", t.display()))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_mentions(own.id(), &t.display().to_string()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(t.join(PIDFILE), own.id().to_string()).unwrap();
        // Another process whose pid is then written in place of the VM's: never signalled.
        let mut other = Command::new("sleep").arg("300").spawn().unwrap();
        let done = remove(&t).unwrap();
        assert!(done.iter().any(|d| d.contains("stopped")), "{done:?}");
        assert!(own.wait().is_ok());
        assert!(!t.exists());
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join(PIDFILE), other.id().to_string()).unwrap();
        let done = remove(&t).unwrap();
        assert!(!done.iter().any(|d| d.contains("stopped")), "{done:?}");
        assert!(
            other.try_wait().unwrap().is_none(),
            "an unrelated process was killed"
        );
        let _ = other.kill();
        let _ = other.wait();
        assert!(remove(&t).unwrap().is_empty());
    }

    #[test]
    fn a_boot_that_fails_names_its_evidence_and_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let markers = vec!["login:".to_string()];
        std::fs::write(&log, "Booting").unwrap();
        let e = watch_boot(&log, &markers, Duration::from_secs(5), &|| false).unwrap_err();
        assert!(
            e.starts_with("the VM stopped before its boot marker (see "),
            "{e}"
        );
        std::fs::write(&log, "web-1 login: ").unwrap();
        assert!(watch_boot(&log, &markers, Duration::from_secs(5), &|| true).is_ok());
    }
}
