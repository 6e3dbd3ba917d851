//! Initial-sync benchmark (not run in CI): replicates a mixed-content image through the real
//! release binaries on loopback and prints the time as a ratio to the physical floor measured in
//! the same run on the same filesystem: `dd if=IMG of=COPY bs=4M conv=fsync`.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p rehost-tests --bench replication            # 2 GiB by default
//! REHOST_BENCH_MIB=512 cargo bench -p rehost-tests --bench replication
//! ```
//! It runs twice: with a cold page cache before each step, and with the image cached for both.
//! It also samples the agent's peak RSS (VmHWM) while it replicates. The work directory is
//! REHOST_BENCH_DIR (default: a temporary directory under /var/tmp, so it is on a real disk).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rehost_tests::*;

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn drop_caches() {
    // Best effort: as root, start each measured step from a cold page cache, so neither side is
    // favoured by what the previous step left behind.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

struct Run {
    floor: Duration,
    sync: Duration,
    sent: u64,
    peak_kib: u64,
    identical: bool,
}

fn warm(img: &Path) {
    let _ = Command::new("sync").status();
    let st = Command::new("cat")
        .arg(img)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("cat");
    assert!(st.success());
}

/// One measurement: `dd` of the image, then an initial sync by a fresh server and agent.
/// `cold`: each step starts from an empty page cache; otherwise the image is cached for both.
fn measure(dir: &Path, img: &Path, cold: bool) -> Run {
    let prepare = || if cold { drop_caches() } else { warm(img) };
    prepare();
    let copy = dir.join("copy.img");
    let t = Instant::now();
    let st = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", copy.display()))
        .args(["bs=4M", "conv=fsync", "status=none"])
        .status()
        .expect("run dd");
    assert!(st.success(), "dd failed");
    let floor = t.elapsed();
    std::fs::remove_file(&copy).expect("remove copy");

    prepare();
    let server = Server::start(dir);
    let token = server.token();
    let mut agent = Agent::new(dir, "bench");
    let out = agent.install(&server, &token, &[img], "bench");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    agent.run(&["--scan-interval", "3600"]);
    let pid = agent.pid().expect("agent pid");
    let mut peak_kib = 0;
    wait_until("the initial sync", Duration::from_secs(3600), || {
        peak_kib = peak_kib.max(vm_hwm_kib(pid).unwrap_or(0));
        let d = server.disk(img)?;
        (d["sync_complete"] == true).then_some(())
    });
    let sync = t.elapsed();
    peak_kib = peak_kib.max(vm_hwm_kib(pid).unwrap_or(0));
    let sent = agent.status()["disks"][0]["sent_bytes"]
        .as_u64()
        .unwrap_or(0);
    let m = server.machines();
    let mid = m["machines"][0]["machine_id"]
        .as_str()
        .expect("machine id")
        .to_string();
    let did = m["machines"][0]["disks"][0]["disk_id"]
        .as_u64()
        .expect("disk id");
    let identical = file_hash(img) == file_hash(&server.volume(&mid, did));
    agent.kill(nix::sys::signal::Signal::SIGTERM);
    drop(server);
    let _ = std::fs::remove_dir_all(dir.join("server"));
    let _ = std::fs::remove_dir_all(&agent.state);
    Run {
        floor,
        sync,
        sent,
        peak_kib,
        identical,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks harness-less benches what they hold.
    }
    let mib: u64 = std::env::var("REHOST_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let base = std::env::var("REHOST_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("rehost-bench-")
        .tempdir_in(&base)
        .expect("bench dir");
    let img = dir.path().join("source.img");
    let size = mib << 20;
    eprintln!(
        "bench: building a {mib} MiB mixed image (random, text, zero regions) in {}",
        dir.path().display()
    );
    mixed_image(&img, size, 42);

    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    println!("image                 {mib} MiB mixed (1/3 random, 1/3 text, 1/3 zero)");
    for (name, cold) in [("cold cache", true), ("warm cache", false)] {
        let r = measure(dir.path(), &img, cold);
        println!("-- {name}");
        println!(
            "dd bs=4M conv=fsync   {:>8.2} s  {:>7.1} MB/s  (floor)",
            r.floor.as_secs_f64(),
            mbps(r.floor)
        );
        println!(
            "rehost initial sync   {:>8.2} s  {:>7.1} MB/s",
            r.sync.as_secs_f64(),
            mbps(r.sync)
        );
        println!(
            "ratio sync / floor    {:>8.2}   (target <= 1.5)",
            r.sync.as_secs_f64() / r.floor.as_secs_f64()
        );
        println!(
            "bytes on the wire     {:>8.1} MiB of {mib} MiB",
            r.sent as f64 / f64::from(1 << 20)
        );
        println!(
            "agent peak RSS        {:>8.1} MiB  (target < 64)",
            r.peak_kib as f64 / 1024.0
        );
        println!("replica identical     {}", r.identical);
        assert!(r.identical, "the replica differs from the source");
    }
}
