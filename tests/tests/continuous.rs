//! Continuous replication of a real block device: a loop device holding a mounted ext4
//! filesystem with a writer busy on it, tracked through the kernel's block tracepoints.
//! These tests need root (loop devices, mount, tracefs): without it they skip with a message,
//! and under `CI=true` they fail instead.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::loopfs::{assert_files_in_image, LoopFs};
use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

fn disk_status(agent: &Agent) -> serde_json::Value {
    agent.status()["disks"][0].clone()
}

/// Waits for the agent to report continuous replication by the tracepoint tracker, and returns
/// how this run began (`initial-sync`, `resume` or `rescan`) and why.
fn wait_continuous(agent: &Agent) -> (String, String) {
    let d = wait_until("continuous replication", LIMIT, || {
        let d = disk_status(agent);
        (d["state"] == "continuous" && agent.status()["running"] == true).then_some(d)
    });
    assert_eq!(
        d["tracker"], "tracepoint",
        "block devices are tracked by kernel tracepoints: {d}"
    );
    (
        d["start"]["kind"].as_str().unwrap_or("").into(),
        d["start"]["reason"].as_str().unwrap_or("").into(),
    )
}

/// Stops the writer, unmounts (everything reaches the device), and waits for the replica to
/// become byte-identical; then checks the replica's filesystem and the files the writer fsynced.
fn converge(fs: &mut LoopFs, writer: &mut Writer, server: &Server, dir: &Path) {
    let files = writer.stop();
    assert!(
        files.len() > 20,
        "the writer wrote only {} files",
        files.len()
    );
    fs.umount();
    let want = fs.hash();
    let m = server.machines();
    let mid = m["machines"][0]["machine_id"].as_str().unwrap().to_string();
    let did = m["machines"][0]["disks"][0]["disk_id"].as_u64().unwrap();
    let vol = server.volume(&mid, did);
    let deadline = std::time::Instant::now() + LIMIT;
    while file_hash(&vol) != want {
        if std::time::Instant::now() > deadline {
            let (a, b) = (
                std::fs::read(&fs.dev).unwrap(),
                std::fs::read(&vol).unwrap(),
            );
            let differ: Vec<usize> = (0..a.len().div_ceil(65536))
                .filter(|i| {
                    let r = i * 65536..((i + 1) * 65536).min(a.len());
                    a[r.clone()] != b[r]
                })
                .collect();
            panic!("the replica still differs from the source in 64 KiB blocks {differ:?}\nagent log:\n{}", agent_log_tail(dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let copy = dir.join("replica-copy.img");
    std::fs::copy(&vol, &copy).unwrap();
    run_ok(Command::new("e2fsck").arg("-fn").arg(&copy));
    // Every fsynced file, read back from the replica with debugfs.
    let mnt = fs.mnt.clone();
    assert_files_in_image(&copy, &mnt, &files, 30, "the replica");
}

/// Dropped in reverse order: the agent stops before its trace instance is removed.
fn agent_log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("agent-a.log")).unwrap_or_default();
    log.lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

fn setup(dir: &Path) -> Option<(TraceCleanup, LoopFs, Server, Agent)> {
    if !require_root("continuous replication of a loop device") {
        return None;
    }
    let fs = LoopFs::new(dir, 96);
    let server = Server::start(dir);
    let token = server.token();
    let agent = Agent::new(dir, "a");
    let out = agent.install(&server, &token, &[&fs.dev], "loop-host");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let machine = agent.state_json()["machine_id"].as_str().map(String::from);
    Some((TraceCleanup(machine), fs, server, agent))
}

#[test]
fn clean_restart_resumes_without_rescan_and_the_replica_converges() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_cleanup, mut fs, server, mut agent)) = setup(dir.path()) else {
        return;
    };
    let mut writer = Writer::start(&fs.mnt);
    agent.run(&[]);
    let (kind, _) = wait_continuous(&agent);
    assert_eq!(kind, "initial-sync");
    std::thread::sleep(Duration::from_secs(2));
    let lag = wait_until("the lag to be reported", LIMIT, || {
        disk_status(&agent)["lag_seconds"].as_u64()
    });
    assert!(lag <= 2, "lag {lag}s with a light writer");

    agent.kill(Signal::SIGTERM);
    assert!(
        agent.log_text().contains("clean stop recorded"),
        "{}",
        agent.log_text()
    );
    // Writes while the agent is down are recorded by the kernel trace instance.
    std::thread::sleep(Duration::from_secs(1));
    agent.run(&[]);
    let (kind, reason) = wait_continuous(&agent);
    assert_eq!(kind, "resume", "a clean restart must not rescan: {reason}");
    assert!(
        disk_status(&agent)["last_rescan"].is_null(),
        "no rescan after a clean stop"
    );
    std::thread::sleep(Duration::from_secs(1));
    converge(&mut fs, &mut writer, &server, dir.path());
}

#[test]
fn crash_restart_rescans_and_the_replica_converges() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_cleanup, mut fs, server, mut agent)) = setup(dir.path()) else {
        return;
    };
    let mut writer = Writer::start(&fs.mnt);
    agent.run(&[]);
    wait_continuous(&agent);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill(Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    agent.run(&[]);
    let (kind, reason) = wait_continuous(&agent);
    assert_eq!(kind, "rescan");
    assert!(reason.contains("did not stop cleanly"), "{reason}");
    let r = &disk_status(&agent)["last_rescan"];
    assert_eq!(r["finished"], true, "{r}");
    std::thread::sleep(Duration::from_secs(1));
    converge(&mut fs, &mut writer, &server, dir.path());
}

fn cli_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_consistency_point_while_the_writer_runs_is_a_clean_filesystem_with_every_fsynced_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_cleanup, fs, server, mut agent)) = setup(dir.path()) else {
        return;
    };
    let mut writer = Writer::start(&fs.mnt);
    agent.run(&[]);
    wait_continuous(&agent);
    let mut freezes = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        // Everything the writer fsynced before the request must be in the point.
        let before = writer.done();
        let snap: serde_json::Value = serde_json::from_str(&cli_ok(
            &server,
            &["snapshot", "create", "loop-host", "--wait", "--json"],
        ))
        .unwrap();
        assert_eq!(
            snap["consistency"], "app",
            "a mounted ext4 is frozen for the point: {snap}"
        );
        // A file rewritten between the two reads may hold either version at the point.
        let before = unchanged_across(&before, &writer.done());
        let point = wait_until("the agent to report its point", LIMIT, || {
            let p = agent.status()["last_point"].clone();
            (p["consistency"] == "app" && p["at"].as_i64().is_some()).then_some(p)
        });
        freezes.push(point["freeze_ms"].as_u64().unwrap());
        let id = snap["id"].to_string();
        let img = dir.path().join(format!("point-{round}.img"));
        cli_ok(
            &server,
            &[
                "snapshot",
                "export",
                "loop-host",
                &id,
                "--disk",
                &fs.dev.display().to_string(),
                "--output",
                &img.display().to_string(),
            ],
        );
        run_ok(Command::new("e2fsck").arg("-fn").arg(&img));
        assert_files_in_image(&img, &fs.mnt, &before, 25, &format!("point {round}"));
        std::fs::remove_file(&img).unwrap();
    }
    eprintln!("freeze windows: {freezes:?} ms");
    assert!(
        freezes.iter().all(|f| *f < 2000),
        "freezes stay under the cap: {freezes:?}"
    );
    writer.stop();
}

#[test]
fn a_killed_agent_leaves_no_frozen_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_cleanup, fs, server, mut agent)) = setup(dir.path()) else {
        return;
    };
    // A slow link, so draining under the freeze takes long enough to kill the agent meanwhile.
    agent.run(&["--max-mbps", "1"]);
    wait_continuous(&agent);
    std::fs::write(fs.mnt.join("big"), random_bytes(5, 24 << 20)).unwrap();
    let pid = agent.pid().unwrap();
    let mut create = std::process::Command::new(bin("rehost-server"))
        .args(["--data-dir".as_ref(), server.data.as_os_str()])
        .args([
            "--admin",
            &server.admin,
            "snapshot",
            "create",
            "loop-host",
            "--wait",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The thaw guard runs exactly while filesystems are frozen.
    let guard = wait_until("the agent to freeze the filesystem", LIMIT, || {
        let out = Command::new("pgrep")
            .args(["-P", &pid.to_string(), "-f", "thaw-guard"])
            .output()
            .ok()?;
        let pids = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!pids.is_empty()).then_some(pids)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL),
        Ok(())
    );
    // A write to the filesystem completes: the guard thawed it when the agent died (the cap timer
    // died with the agent).
    let probe = fs.mnt.join("probe");
    let mut w = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo ok > {} && sync -f {}",
            probe.display(),
            probe.display()
        ))
        .spawn()
        .unwrap();
    let st = wait_until(
        "a write to the formerly frozen filesystem",
        Duration::from_secs(10),
        || w.try_wait().unwrap(),
    );
    assert!(st.success());
    let guard = guard.lines().next().unwrap().to_string();
    wait_until("the thaw guard to exit", Duration::from_secs(10), || {
        (!Path::new(&format!("/proc/{guard}")).exists()).then_some(())
    });
    let _ = create.kill();
    let _ = create.wait();
}
