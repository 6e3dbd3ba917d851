//! Group points of a recovery plan: three machines on loop devices with mounted ext4 filesystems
//! and writers fsyncing files on each, one point of all of them at one instant. Root only (loop
//! devices, mount, tracefs, fsfreeze): without it the test skips with a message, and under
//! `CI=true` it fails instead.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::loopfs::{assert_files_in_image, LoopFs};
use rehost_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);
const HOSTS: [&str; 3] = ["db", "app", "plain"];

fn wait_continuous(agent: &Agent) {
    wait_until("continuous replication", LIMIT, || {
        let d = agent.status()["disks"][0].clone();
        (d["state"] == "continuous" && agent.status()["running"] == true).then_some(())
    });
}

/// Exports `snapshot` of `host`'s disk and checks its filesystem and the files fsynced before.
fn check_point(
    server: &Server,
    dir: &Path,
    fs: &LoopFs,
    host: &str,
    snapshot: &Value,
    before: &[(std::path::PathBuf, String)],
) {
    let img = dir.join(format!("{host}-point.img"));
    server.ok(&[
        "snapshot",
        "export",
        host,
        &snapshot["id"].to_string(),
        "--output",
        &img.display().to_string(),
    ]);
    run_ok(Command::new("e2fsck").arg("-fn").arg(&img));
    assert!(
        before.len() > 5,
        "{host}: the writer wrote {} files",
        before.len()
    );
    assert_files_in_image(&img, &fs.mnt, before, 20, &format!("{host}'s group point"));
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn a_group_point_under_load_holds_every_fsynced_file_and_a_stopped_agent_makes_it_crash_consistent()
{
    if !require_root("group points of loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(dir);
    let mut machines = Vec::new();
    for host in HOSTS {
        let fs = LoopFs::named(dir, host, 64);
        let agent = Agent::new(dir, host);
        let token = server.token();
        let out = agent.install(&server, &token, &[&fs.dev], host);
        assert!(
            out.status.success(),
            "install {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cleanup = TraceCleanup(agent.state_json()["machine_id"].as_str().map(String::from));
        machines.push((host, fs, agent, cleanup));
    }
    server.ok(&["plan", "create", "shop"]);
    for (host, step) in [("db", "1"), ("app", "2"), ("plain", "2")] {
        server.ok(&["plan", "add", "shop", host, "--step", step]);
    }
    let mut writers = Vec::new();
    for (_, fs, agent, _) in &mut machines {
        writers.push(Writer::start(&fs.mnt));
        agent.run(&[]);
    }
    for (_, _, agent, _) in &machines {
        wait_continuous(agent);
    }

    // Under load, every agent freezes together.
    let mut windows = Vec::new();
    for round in 0..2 {
        // Over a second apart, so each round's points are told apart by their time.
        std::thread::sleep(Duration::from_millis(1100));
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let before: Vec<_> = writers.iter().map(|w| w.done()).collect();
        let g = server.json(&["snapshot", "create", "--plan", "shop", "--json"]);
        assert_eq!(g["consistency"], "app", "round {round}: {g:#}");
        assert_eq!(g["group"], "shop");
        let snaps = g["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 3, "{g:#}");
        let window = g["window_ms"].as_u64().unwrap();
        let skew = g["skew_ms"].as_u64().unwrap();
        assert!(window <= 1500, "the window is capped: {g:#}");
        assert!(skew <= window, "{g:#}");
        windows.push((window, skew));
        for (((host, fs, _, _), w), b) in machines.iter().zip(&writers).zip(&before) {
            let s = snaps
                .iter()
                .find(|s| {
                    let out = server.machines();
                    out["machines"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|m| m["hostname"] == *host && m["machine_id"] == s["machine_id"])
                })
                .unwrap_or_else(|| panic!("no point of {host}: {g:#}"));
            assert_eq!(s["consistency"], "app", "{host}: {s:#}");
            assert_eq!(s["group_id"], g["id"], "{s:#}");
            // A file rewritten between the two reads may hold either version at the point.
            let kept = unchanged_across(b, &w.done());
            check_point(&server, dir, fs, host, s, &kept);
        }
        // Every agent reports the point it made, thawed after the release.
        for (host, _, agent, _) in &machines {
            // The status file is written every second.
            let p = wait_until("the agent to report its point", LIMIT, || {
                let p = agent.status()["last_point"].clone();
                (p["at"].as_i64() >= Some(t0)).then_some(p)
            });
            assert_eq!(p["consistency"], "app", "{host}: {p}");
            assert!(
                p["note"]
                    .as_str()
                    .unwrap_or("")
                    .contains("held for the group"),
                "{host}: {p}"
            );
        }
    }
    eprintln!("group point (window ms, mark skew ms): {windows:?}");

    // One agent stopped: nobody can freeze together, and the group says why.
    let stopped = machines[1].2.pid().unwrap();
    let pid = nix::unistd::Pid::from_raw(stopped as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let out = server.cli(&["snapshot", "create", "--plan", "shop", "--json"]);
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["consistency"], "crash", "{g:#}");
    let note = g["note"].as_str().unwrap();
    assert!(
        note.contains("crash-consistent at one instant") && note.contains("no mark within"),
        "{note}"
    );
    let app_id = machines[1].2.state_json()["machine_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        note.contains(&app_id),
        "the note names the stopped machine: {note}"
    );
    assert_eq!(g["snapshots"].as_array().unwrap().len(), 3, "{g:#}");
    // The held points of the machines that did freeze were removed, not left behind.
    for (host, _, _, _) in &machines {
        let l = server.json(&["snapshots", host, "--json"]);
        let ungrouped: Vec<_> = l["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["group_id"].is_null())
            .collect();
        assert!(
            ungrouped.is_empty(),
            "{host}: points outside any group: {ungrouped:?}"
        );
    }

    // One agent stopped for good: its point comes from its volumes, the others' from their
    // streams, all crash-consistent.
    machines[2].2.kill(Signal::SIGTERM);
    let plain_id = machines[2].2.state_json()["machine_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the server to see plain disconnected", LIMIT, || {
        let m = server.machines();
        m["machines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["machine_id"] == plain_id.as_str() && m["connected"] == false)
            .then_some(())
    });
    let g = server.json(&["snapshot", "create", "--plan", "shop", "--json"]);
    assert_eq!(g["consistency"], "crash", "{g:#}");
    let note = g["note"].as_str().unwrap();
    assert!(
        note.contains(&plain_id) && note.contains("not connected"),
        "{note}"
    );
    assert_eq!(g["snapshots"].as_array().unwrap().len(), 3, "{g:#}");

    let l = server.json(&["snapshots", "--plan", "shop", "--json"]);
    let points = l["points"].as_array().unwrap();
    assert_eq!(points.len(), 4, "{l:#}");
    let text = server.ok(&["snapshots", "--plan", "shop"]);
    assert!(
        text.contains("group point") && text.contains("crash"),
        "{text}"
    );

    // Bad input: an unknown plan, and a plan with no machines.
    let out = server.cli(&["snapshot", "create", "--plan", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.ok(&["plan", "create", "empty"]);
    let out = server.cli(&["snapshot", "create", "--plan", "empty"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no machines"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in &mut writers {
        w.stop();
    }
}
