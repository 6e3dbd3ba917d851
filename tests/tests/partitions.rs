//! The partition helpers of the test harness on a real loop device: stale partitions (as a
//! recycled loop number inherits them when its last user's `partx -d` met a busy partition) are
//! replaced by the table's, where a bare `partx -a` fails; removal waits out a partition that
//! someone holds open for a moment.

use rehost_tests::partitions::{add_partitions, remove_partitions};
use rehost_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        remove_partitions(&self.0);
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn sysfs_partitions(dev: &Path) -> Vec<String> {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let mut v: Vec<String> = std::fs::read_dir(Path::new("/sys/block").join(&name))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{name}p")))
        .map(|n| {
            let start =
                std::fs::read_to_string(Path::new("/sys/block").join(&name).join(&n).join("start"))
                    .unwrap();
            format!("{n}@{}", start.trim())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn stale_partitions_are_replaced_and_busy_ones_waited_for() {
    if !require_root("partition helper test (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2MiB, size=8MiB\nstart=10MiB\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
    let lo = Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()));
    let name = lo.0.file_name().unwrap().to_string_lossy().into_owned();

    // A stale partition 1 with another geometry, as a previous user of the number left it (or
    // the ones a previous user really left: then this device already has them).
    let inherited = sysfs_partitions(&lo.0);
    if inherited.is_empty() {
        run_ok(
            Command::new("addpart")
                .arg(&lo.0)
                .args(["1", "2048", "32768"]),
        );
    } else {
        eprintln!(
            "{} came with stale partitions {inherited:?}",
            lo.0.display()
        );
    }
    let bare = Command::new("partx").arg("-a").arg(&lo.0).output().unwrap();
    assert!(
        !bare.status.success(),
        "partx -a succeeded over a stale partition"
    );
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("error adding partition"),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );
    add_partitions(&lo.0);
    assert_eq!(
        sysfs_partitions(&lo.0),
        [format!("{name}p1@4096"), format!("{name}p2@20480")]
    );

    // Partition 1 held open for a second: removal retries until it is free.
    let p1 = PathBuf::from(format!("{}p1", lo.0.display()));
    let holder = std::thread::spawn(move || {
        let f = std::fs::File::open(&p1).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        drop(f);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(remove_partitions(&lo.0));
    holder.join().unwrap();
    assert!(sysfs_partitions(&lo.0).is_empty());
}
