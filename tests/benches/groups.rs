//! Group-point benchmark (not run in CI; root): three machines on loop devices, each a mounted
//! ext4 with a writer fsyncing files, all in one recovery plan. It takes group points under that
//! load and prints the window (request to release, measured by the server) and the skew between
//! the machines' marks, p50/p99, against a baseline taken in the same run: the freeze of a
//! single machine's consistency point under the same load (the agent's own `freeze_ms`).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p rehost-tests --bench groups            # 30 group points
//! REHOST_BENCH_POINTS=100 cargo bench -p rehost-tests --bench groups
//! ```

use std::time::Duration;

use rehost_tests::loopfs::LoopFs;
use rehost_tests::*;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if !require_root("the group-point benchmark") {
        return;
    }
    let points: usize = std::env::var("REHOST_BENCH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(dir);
    let hosts = ["db", "app", "web"];
    let mut machines = Vec::new();
    for host in hosts {
        let fs = LoopFs::named(dir, host, 256);
        let agent = Agent::new(dir, host);
        let out = agent.install(&server, &server.token(), &[&fs.dev], host);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cleanup = TraceCleanup(agent.state_json()["machine_id"].as_str().map(String::from));
        machines.push((fs, agent, cleanup));
    }
    let ok = |args: &[&str]| {
        let out = server.cli(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["plan", "create", "bench"]);
    for (i, host) in hosts.iter().enumerate() {
        ok(&["plan", "add", "bench", host, "--step", &(i + 1).to_string()]);
    }
    let mut writers = Vec::new();
    for (fs, agent, _) in &mut machines {
        writers.push(Writer::start(&fs.mnt));
        agent.run(&[]);
    }
    for (_, agent, _) in &machines {
        wait_until("continuous replication", Duration::from_secs(300), || {
            (agent.status()["disks"][0]["state"] == "continuous").then_some(())
        });
    }

    // Baseline: one machine's own consistency point under the same load.
    let mut single = Vec::new();
    for _ in 0..points {
        std::thread::sleep(Duration::from_millis(300));
        let s = server.json(&["snapshot", "create", "db", "--wait", "--json"]);
        assert_eq!(s["consistency"], "app", "{s}");
        std::thread::sleep(Duration::from_millis(1100));
        let p = machines[0].1.status()["last_point"].clone();
        single.push(p["freeze_ms"].as_f64().unwrap_or(f64::NAN));
    }

    let (mut windows, mut skews, mut crash) = (Vec::new(), Vec::new(), 0);
    for _ in 0..points {
        std::thread::sleep(Duration::from_millis(300));
        let g = server.json(&["snapshot", "create", "--plan", "bench", "--json"]);
        match (g["window_ms"].as_f64(), g["skew_ms"].as_f64()) {
            (Some(w), Some(k)) => {
                windows.push(w);
                skews.push(k);
            }
            _ => {
                crash += 1;
                eprintln!("crash-consistent group point: {}", g["note"]);
            }
        }
    }
    for w in &mut writers {
        w.stop();
    }
    let (s50, s99) = (percentile(&mut single, 0.5), percentile(&mut single, 0.99));
    let (w50, w99) = (
        percentile(&mut windows, 0.5),
        percentile(&mut windows, 0.99),
    );
    let (k50, k99) = (percentile(&mut skews, 0.5), percentile(&mut skews, 0.99));
    println!("group points of 3 machines under write load ({points} each):");
    println!("  single-machine freeze (baseline): p50 {s50:.0} ms, p99 {s99:.0} ms");
    println!(
        "  group window: p50 {w50:.0} ms, p99 {w99:.0} ms  (p99 {:.2}x the single freeze)",
        w99 / s99
    );
    println!("  mark skew:    p50 {k50:.0} ms, p99 {k99:.0} ms");
    println!("  fell back to crash-consistent: {crash} of {points}");
}
