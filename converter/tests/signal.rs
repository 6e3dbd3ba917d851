//! A conversion interrupted by SIGTERM (or SIGINT) in the middle of the initramfs rebuild releases every
//! mount and loop device and kills the chroot'd tool.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn interrupt_during_rebuild(signal: nix::sys::signal::Signal) {
    let img = fixture("xen");
    let dir = scratch();
    let work = dir.path().join("work");
    let out = dir.path().join("out.raw");
    let mut child = Command::new(BIN)
        .args([
            "--work-dir",
            work.to_str().unwrap(),
            "convert",
            "--input",
            img.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    // Wait until the chroot mounts exist: the rebuild is running.
    let start = Instant::now();
    let marker = format!("{}/rehost-converter.", work.display());
    loop {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if mi
            .lines()
            .any(|l| l.contains(&marker) && l.contains("/root/proc"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the rebuild never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "converter ended before the rebuild"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + signal as i32));
    // Give lazily detached loop devices a moment to go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers(dir.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:#?}",
        leftovers(dir.path())
    );
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mi.contains(&marker),
        "a mount in the work directory is left"
    );
    // No process is left chroot'ed in the guest.
    let chrooted: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path().join("root")).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.contains(&marker))
        .collect();
    assert!(
        chrooted.is_empty(),
        "processes left in the guest chroot: {chrooted:?}"
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "the work directory is not empty"
    );
}

#[test]
fn sigterm_during_rebuild_releases_everything() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    interrupt_during_rebuild(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn sigint_during_rebuild_releases_everything() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    interrupt_during_rebuild(nix::sys::signal::Signal::SIGINT);
}
