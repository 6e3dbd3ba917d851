//! Continuous-replication benchmark (not run in CI; root): a loop device with a mounted ext4
//! filesystem, the release agent tracking it through kernel tracepoints, and a steady random-write
//! load on the filesystem. It measures, end to end:
//! - **lag**: a probe writer stamps a 4 KiB record with a sequence number every 50 ms and
//!   `fdatasync`s it; a monitor reads the replica volume at the record's physical offset and notes
//!   when each stamp arrives. Lag = arrival − the moment `fdatasync` returned.
//! - agent CPU (% of one core, from /proc/PID/stat) and peak RSS (VmHWM);
//! - the freeze window of consistency points taken under the load (p50/p99).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p rehost-tests --bench continuous                # 20 MB/s and the highest rate
//! REHOST_BENCH_RATES=20,40 REHOST_BENCH_SECS=20 cargo bench -p rehost-tests --bench continuous
//! ```
//! Rate 0 means "as fast as the writer goes".

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rehost_tests::*;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; after the comm they are 12 and 13.
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Physical byte offset of a file's first extent, which must cover the whole file.
fn physical_offset(file: &Path, len: u64) -> u64 {
    let out = run_ok(Command::new("filefrag").args(["-e", "-b4096"]).arg(file));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("0:"))
        .expect("filefrag extent 0");
    let f: Vec<&str> = line.split(':').map(str::trim).collect();
    let logical_end: u64 = f[1].split("..").nth(1).unwrap().trim().parse().unwrap();
    assert!(
        (logical_end + 1) * 4096 >= len,
        "the probe file must be one extent: {line}"
    );
    let phys: u64 = f[2].split("..").next().unwrap().trim().parse().unwrap();
    phys * 4096
}

struct Run {
    rate: u64,
    written_mb: f64,
    secs: f64,
    lags: Vec<f64>,
    cpu_pct: f64,
    rss_mib: f64,
    freezes: Vec<f64>,
    probes_sent: usize,
}

fn measure(dir: &Path, rate_mb: u64, secs: u64) -> Run {
    let img = dir.join("source.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
    );
    run_ok(Command::new("mount").arg(&dev).arg(&mnt));
    // The load's target file and the probe file exist before replication starts.
    let load = mnt.join("load.bin");
    std::fs::write(&load, random_bytes(1, 256 << 20)).unwrap();
    let probe_path = mnt.join("probe.bin");
    std::fs::write(&probe_path, vec![0u8; 64 * 4096]).unwrap();
    run_ok(&mut Command::new("sync"));
    let probe_phys = physical_offset(&probe_path, 64 * 4096);

    let server = Server::start(dir);
    let token = server.token();
    let mut agent = Agent::new(dir, "bench");
    assert!(agent
        .install(&server, &token, &[&dev], "bench-host")
        .status
        .success());
    agent.run(&[]);
    let (mid, did) = wait_replicated_device(&server, &dev);
    let vol = server.volume(&mid, did);
    let pid = agent.pid().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    // The load: random 64 KiB writes into load.bin at `rate_mb` MB/s, fdatasync every 50 ms.
    let loader = {
        let (stop, written, load) = (stop.clone(), written.clone(), load.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&load).unwrap();
            let chunk = random_bytes(9, 64 << 10);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let start = Instant::now();
            let mut last_sync = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (4096 - 1)) * (64 << 10);
                f.write_all_at(&chunk, off).unwrap();
                let n = written.fetch_add(64 << 10, Ordering::Relaxed) + (64 << 10);
                if last_sync.elapsed() >= Duration::from_millis(50) {
                    f.sync_data().unwrap();
                    last_sync = Instant::now();
                }
                if rate_mb > 0 {
                    let due = Duration::from_secs_f64(n as f64 / (rate_mb as f64 * 1e6));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        })
    };
    // The probes: (sequence, when fdatasync returned).
    let stamps: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let prober = {
        let (stop, stamps) = (stop.clone(), stamps.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&probe_path)
                .unwrap();
            let mut seq = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let mut rec = vec![0u8; 4096];
                rec[..8].copy_from_slice(&seq.to_le_bytes());
                rec[8..16].copy_from_slice(b"REHOSTPR");
                f.write_all_at(&rec, (seq % 64) * 4096).unwrap();
                f.sync_data().unwrap();
                stamps.lock().unwrap().push((seq, Instant::now()));
                seq += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // The monitor: when each stamp shows up in the replica.
    let arrivals: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let monitor = {
        let (stop, arrivals, vol) = (stop.clone(), arrivals.clone(), vol.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&vol).unwrap();
            let mut seen = std::collections::HashSet::new();
            let mut buf = vec![0u8; 64 * 4096];
            while !stop.load(Ordering::Relaxed) {
                if f.read_exact_at(&mut buf, probe_phys).is_ok() {
                    let now = Instant::now();
                    for rec in buf.chunks(4096) {
                        if &rec[8..16] == b"REHOSTPR" {
                            let seq = u64::from_le_bytes(rec[..8].try_into().unwrap());
                            if seen.insert(seq) {
                                arrivals.lock().unwrap().push((seq, now));
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    // Consistency points under load, one every few seconds.
    let mut freezes = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(3));
        let out = server.cli(&["snapshot", "create", "bench-host", "--wait", "--json"]);
        if out.status.success() {
            let p = agent.status()["last_point"].clone();
            if let Some(ms) = p["freeze_ms"].as_f64() {
                freezes.push(ms);
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid) - c0;
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    prober.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    monitor.join().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_pct = ticks as f64 / hz / wall * 100.0;
    let rss_mib = vm_hwm_kib(pid) as f64 / 1024.0;

    let stamps = stamps.lock().unwrap().clone();
    let arrivals = arrivals.lock().unwrap().clone();
    let mut lags = Vec::new();
    for (seq, at) in &stamps {
        // Sequence numbers are unique; the monitor records each one's first appearance.
        if let Some((_, arr)) = arrivals.iter().find(|(s, _)| s == seq) {
            lags.push(arr.saturating_duration_since(*at).as_secs_f64());
        }
    }
    agent.kill(nix::sys::signal::Signal::SIGTERM);
    drop(server);
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    if let Ok(d) = std::fs::read_dir("/sys/kernel/tracing/instances") {
        for e in d.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("rehost-{mid}-"))
            {
                let _ = std::fs::write(e.path().join("events/block/block_rq_complete/enable"), "0");
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    Run {
        rate: rate_mb,
        written_mb: written.load(Ordering::Relaxed) as f64 / 1e6,
        secs: wall,
        probes_sent: stamps.len(),
        lags,
        cpu_pct,
        rss_mib,
        freezes,
    }
}

fn wait_replicated_device(server: &Server, dev: &Path) -> (String, u64) {
    wait_until("the initial sync", Duration::from_secs(600), || {
        let d = server.disk(dev)?;
        if d["state"] != "continuous" {
            return None;
        }
        let m = server.machines();
        Some((
            m["machines"][0]["machine_id"].as_str()?.to_string(),
            d["disk_id"].as_u64()?,
        ))
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this benchmark needs root (loop devices, mount, tracefs)"
    );
    let rates: Vec<u64> = std::env::var("REHOST_BENCH_RATES")
        .unwrap_or_else(|_| "20,0".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs: u64 = std::env::var("REHOST_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!("tracker: tracepoint (block_rq_complete via tracefs); {secs} s per rate; 1 GiB ext4 on a loop device");
    println!(
        "{:>10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9}",
        "target",
        "achieved",
        "lag p50",
        "lag p99",
        "lag max",
        "probes",
        "CPU %",
        "CPU%/10MB",
        "RSS MiB",
        "freeze p99"
    );
    for rate in rates {
        let dir = tempfile::Builder::new()
            .prefix("rehost-cbench-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut r = measure(dir.path(), rate, secs);
        let achieved = r.written_mb / r.secs;
        let (p50, p99, max) = (
            percentile(&mut r.lags, 0.5),
            percentile(&mut r.lags, 0.99),
            percentile(&mut r.lags, 1.0),
        );
        let fz = percentile(&mut r.freezes, 0.99);
        let target = if r.rate == 0 {
            "max".to_string()
        } else {
            format!("{} MB/s", r.rate)
        };
        println!(
            "{target:>10} {:>6.1} MB/s {:>6.3} s {:>6.3} s {:>6.3} s {:>5}/{:<4} {:>7.1} {:>9.2} {:>9.1} {:>6.0} ms",
            achieved,
            p50,
            p99,
            max,
            r.lags.len(),
            r.probes_sent,
            r.cpu_pct,
            r.cpu_pct / (achieved / 10.0),
            r.rss_mib,
            fz
        );
        let _ = std::io::stdout().flush();
    }
}
