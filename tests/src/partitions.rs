//! Partition nodes of a whole-disk loop device, for tests whose source disk must have its
//! partitions seen by the kernel as partitions of that disk (the agent traces writes to the whole
//! disk, and the test writes files through a filesystem mounted from a partition node).
//!
//! Why not a bare `partx -a`: its BLKPG_ADD_PARTITION fails with EBUSY for every partition number
//! the device already has. A loop device attached without LO_FLAGS_PARTSCAN (loop's `max_part` is
//! 0 here, so `losetup -P` finds no partitions) keeps BLKPG-added partitions after it is detached;
//! `partx -d` of a partition that someone holds open at that moment (a prober such as blkid, which
//! opens every node in /proc/partitions, or a lazily unmounted filesystem) fails with EBUSY, and the
//! next `losetup -f` that recycles the loop number inherits the stale partitions. So attaching runs
//! `partx -u` (deletes partitions that are not in the table, adds or resizes the others) until the
//! kernel's view equals the table, with every failed attempt shown, a bounded number of times; and
//! removing retries `partx -d` until no partition of the device is left.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ATTEMPTS: u32 = 50;
const PAUSE: Duration = Duration::from_millis(200);

/// (number, start sector, sectors) of each partition in the device's partition table.
fn table(dev: &Path) -> Vec<(u32, u64, u64)> {
    let out = Command::new("partx")
        .args(["-g", "-o", "NR,START,SECTORS"])
        .arg(dev)
        .output()
        .expect("run partx -g");
    assert!(
        out.status.success(),
        "partx -g {}: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (v.len() == 3).then(|| (v[0] as u32, v[1], v[2]))
        })
        .collect()
}

/// (number, start sector, sectors) of each partition the kernel has for the device.
fn kernel_view(dev: &Path) -> Vec<(u32, u64, u64)> {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let sys = Path::new("/sys/block").join(&name);
    let mut v: Vec<(u32, u64, u64)> = std::fs::read_dir(&sys)
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let nr: u32 = n.strip_prefix(&format!("{name}p"))?.parse().ok()?;
            let read = |f: &str| -> Option<u64> {
                std::fs::read_to_string(e.path().join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            Some((nr, read("start")?, read("size")?))
        })
        .collect();
    v.sort();
    v
}

/// Give the kernel the partitions of `dev`'s table (replacing stale ones); panics with every
/// attempt's error when the kernel's view still differs after the bounded retries.
pub fn add_partitions(dev: &Path) {
    let want = table(dev);
    let mut errors = Vec::new();
    for _ in 0..ATTEMPTS {
        let out = Command::new("partx")
            .arg("-u")
            .arg(dev)
            .output()
            .expect("run partx -u");
        let have = kernel_view(dev);
        if have == want {
            return;
        }
        let msg = format!(
            "partx -u {}: {} (kernel has {have:?}, table has {want:?})",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        eprintln!("{msg}; retrying");
        errors.push(msg);
        std::thread::sleep(PAUSE);
    }
    panic!(
        "the kernel does not take the partitions of {} after {ATTEMPTS} attempts (a partition \
         node still open by another process?):\n{}",
        dev.display(),
        errors.join("\n")
    );
}

/// Delete every partition the kernel has for `dev`, retrying while one is busy. Returns false
/// (after saying which remain) if some are still there; never panics (used in `Drop`).
pub fn remove_partitions(dev: &Path) -> bool {
    for _ in 0..ATTEMPTS {
        if kernel_view(dev).is_empty() {
            return true;
        }
        let out = Command::new("partx").arg("-d").arg(dev).output();
        if kernel_view(dev).is_empty() {
            return true;
        }
        if let Ok(o) = out {
            eprintln!(
                "partx -d {}: {}; retrying",
                dev.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        std::thread::sleep(PAUSE);
    }
    // Straight to stderr (not eprintln!, which the test harness captures for a passing test):
    // a stale partition is left for the next user of this loop number, say so.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "partitions {:?} of {} are still in the kernel (busy) after {ATTEMPTS} attempts",
        kernel_view(dev),
        dev.display()
    );
    false
}
