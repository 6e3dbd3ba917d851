//! The launch test's environment: its tools, the source disk (the converter's fixture on a loop
//! device, root filesystem mounted), processes found by what their command line names, and the
//! host's libvirt daemon.
//!
//! Shared by `launch.rs` and `plan_boot.rs`; each uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::*;

pub fn tools_ready() -> bool {
    if !require_root("launch end-to-end test (loop devices, mount, QEMU)") {
        return false;
    }
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "qemu-img",
        "partx",
        "debootstrap",
        "libvirtd",
        "virsh",
        "debugfs",
    ]
    .into_iter()
    .filter(|t| {
        !Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "launch test needs {missing:?}, and CI=true: failing instead of skipping (run scripts/install-deps.sh)"
    );
    eprintln!("SKIPPED: launch test needs {missing:?} (run scripts/install-deps.sh)");
    false
}

/// The converter's Xen-like Debian image (built once, then cached).
fn fixture() -> PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../converter/fixtures/build-debian-image.sh");
    let out = run_ok(Command::new("bash").arg(script).arg("xen"));
    PathBuf::from(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim(),
    )
}

/// The source disk: a loop device over a copy of the fixture, its root partition mounted.
/// Dropping it stops everything the test started from its dir (VMs, converters), unmounts and
/// detaches.
pub struct Source {
    dir: PathBuf,
    pub dev: PathBuf,
    pub mnt: PathBuf,
}

impl Source {
    pub fn new(dir: &Path) -> Self {
        let img = dir.join("source.img");
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(fixture())
                .arg(&img),
        );
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let src = Source {
            dir: dir.to_path_buf(),
            dev,
            mnt: dir.join("mnt"),
        };
        partitions::add_partitions(&src.dev);
        std::fs::create_dir_all(&src.mnt).unwrap();
        run_ok(
            Command::new("mount")
                .arg(format!("{}p1", src.dev.display()))
                .arg(&src.mnt),
        );
        src
    }
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// The host's libvirt daemon, for the launch method `libvirt`: the one already running, or one this
/// test starts as an init system would (and stops when done). Domains the test defined are
/// removed at the end whatever happened.
pub struct Libvirtd {
    started: Vec<std::process::Child>,
}

fn virsh_ok(args: &[&str]) -> bool {
    Command::new("virsh")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn domains() -> String {
    Command::new("virsh")
        .args(["list", "--all", "--name"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl Libvirtd {
    pub fn ensure() -> Self {
        let mut d = Libvirtd {
            started: Vec::new(),
        };
        if virsh_ok(&["list"]) {
            return d;
        }
        std::fs::create_dir_all("/var/log/libvirt").unwrap();
        std::fs::create_dir_all("/run/libvirt").unwrap();
        for daemon in ["virtlogd", "libvirtd"] {
            let child = Command::new(daemon)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {daemon}: {e}"));
            d.started.push(child);
        }
        wait_until("libvirtd to answer", Duration::from_secs(60), || {
            virsh_ok(&["list"]).then_some(())
        });
        d
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for name in domains()
            .lines()
            .filter(|n| n.starts_with("rehost-deb-src-"))
        {
            let _ = virsh_ok(&["destroy", name]);
            let _ = virsh_ok(&["undefine", "--nvram", name]);
        }
        for c in self.started.iter_mut().rev() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.dir.join("targets").display().to_string()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // Not lazy: a lazily unmounted filesystem keeps its partition open, and `partx -d` of a
        // busy partition fails, leaving it to the next user of this loop number.
        if Command::new("umount")
            .arg(&self.mnt)
            .status()
            .map_or(true, |s| !s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        partitions::remove_partitions(&self.dev);
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Checks that the last 40 of `files` (written under `mnt` on the source) hold their hashes in
/// the target image, read through a read-only loop device over its first partition.
pub fn assert_files_in_target(image: &Path, mnt: &Path, files: &[(PathBuf, String)]) {
    // The root is the first partition; read it through a read-only loop device at its offset.
    let out = run_ok(
        Command::new("partx")
            .args(["-g", "-o", "START", "-n", "1"])
            .arg(image),
    );
    let start: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = run_ok(
        Command::new("losetup")
            .args(["-f", "--show", "-r", "-o", &(start * 512).to_string()])
            .arg(image),
    );
    let part = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let check = || {
        for (p, h) in files.iter().rev().take(40) {
            let rel = p.strip_prefix(mnt).unwrap();
            // -c: the guest runs on this filesystem; its bitmaps on disk lag behind its memory.
            let out = run_ok(
                Command::new("debugfs")
                    .args(["-c", "-R", &format!("cat /{}", rel.display())])
                    .arg(&part),
            );
            if blake3::hash(&out.stdout).to_hex().to_string() != *h {
                let stat = Command::new("debugfs")
                    .args(["-c", "-R", &format!("stat /{}", rel.display())])
                    .arg(&part)
                    .output()
                    .unwrap();
                panic!(
                    "/{} (fsynced before the point) differs in the target {}: {} bytes read ({}); stat: {}",
                    rel.display(),
                    image.display(),
                    out.stdout.len(),
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&stat.stdout)
                );
            }
        }
    };
    let r = std::panic::catch_unwind(check);
    let _ = Command::new("losetup").arg("-d").arg(&part).status();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// The blueprint the boot tests give a machine: launch method `launch`, TCG, 1 vCPU, 1 GiB, a raw
/// image, 300 s to boot, targets under `targets`.
pub fn tcg_blueprint(server: &Server, host: &str, launch: &str, targets: &Path) {
    server.ok(&[
        "blueprint",
        "set",
        host,
        "--launch",
        launch,
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "1024",
        "--format",
        "raw",
        "--boot-timeout",
        "300",
        "--target-dir",
        targets.to_str().unwrap(),
    ]);
}
