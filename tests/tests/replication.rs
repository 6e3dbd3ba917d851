//! End-to-end replication: the real `rehost-server` and `rehost-agent` binaries on 127.0.0.1,
//! disk images as sources, replicas compared byte for byte.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

fn random_image(path: &Path, size: u64, seed: u64) {
    std::fs::write(path, random_bytes(seed, size as usize)).unwrap();
}

fn disk_u64(server: &Server, dev: &Path, field: &str) -> u64 {
    server
        .disk(dev)
        .and_then(|d| d[field].as_u64())
        .unwrap_or(0)
}

#[test]
fn initial_sync_gives_an_identical_replica_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    let size = (40 << 20) + 12345; // not a multiple of the block size
    mixed_image(&img, size, 7);

    let mut agent = Agent::new(dir.path(), "a");
    let out = agent.install(&server, &token, &[&img], "e2e-initial");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "install failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Disks to replicate:") && stdout.contains(&img.display().to_string()),
        "{stdout}"
    );
    let mode = std::fs::metadata(agent.state.join("agent.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the machine credential must be private"
    );

    agent.run(&[]);
    let (machine_id, disk_id) = wait_replicated(&server, &img, LIMIT);

    // The lag is known once the agent has reported after its first pass (it reports every second).
    let m = wait_until("the lag to be reported", LIMIT, || {
        let m = server.machines();
        m["machines"][0]["disks"][0]["lag_seconds"]
            .is_u64()
            .then_some(m)
    });
    let mm = &m["machines"][0];
    assert_eq!(mm["machine_id"], machine_id.as_str());
    assert!(machine_id.starts_with("m-"));
    assert_eq!(mm["hostname"], "e2e-initial");
    assert_eq!(mm["lifecycle"], "ready-for-testing");
    assert_eq!(mm["connected"], true);
    let d = &mm["disks"][0];
    assert_eq!(d["size_bytes"], size);
    assert_eq!(d["replicated_bytes"], size);
    assert_eq!(d["backlog_bytes"], 0);
    assert_eq!(d["progress_percent"], 100.0);
    assert!(
        d["lag_seconds"].is_u64(),
        "lag is known once continuous: {d}"
    );

    // The replica stays sparse where the source is zero.
    let vol = std::fs::metadata(server.volume(&machine_id, disk_id)).unwrap();
    assert!(
        vol.blocks() * 512 < size - (8 << 20),
        "zero regions must not be allocated ({} bytes)",
        vol.blocks() * 512
    );

    let st = wait_until("agent status to show continuous", LIMIT, || {
        let st = agent.status();
        (st["disks"][0]["state"] == "continuous").then_some(st)
    });
    assert_eq!(st["running"], true);
    assert_eq!(st["machine_id"], machine_id.as_str());
    assert_eq!(st["disks"][0]["replicated_bytes"], size);
    let sent = st["disks"][0]["sent_bytes"].as_u64().unwrap();
    assert!(
        sent < size,
        "zero and compressible regions shrink on the wire: sent {sent} of {size}"
    );

    let human = String::from_utf8(server.cli(&["machines"]).stdout).unwrap();
    assert!(
        human.contains("continuous") && human.contains("e2e-initial"),
        "{human}"
    );

    // A clean stop is reported as such.
    agent.kill(Signal::SIGTERM);
    let st = agent.status();
    assert_eq!(st["running"], false);
    assert_eq!(st["connection"], "stopped");
}

#[test]
fn resume_after_server_and_agent_are_killed_mid_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("big.img");
    let size = (96 << 20) + 4097;
    random_image(&img, size, 11);
    let mut agent = Agent::new(dir.path(), "r");
    assert!(agent
        .install(&server, &token, &[&img], "e2e-resume")
        .status
        .success());
    // 200 Mbit/s: about 4 s for the image, so the kills land mid-sync.
    agent.run(&["--max-mbps", "200"]);

    wait_until("a quarter of the disk to be durable", LIMIT, || {
        (disk_u64(&server, &img, "replicated_bytes") >= size / 4).then_some(())
    });
    server.kill();
    server.restart();
    let log = wait_until("the agent to resume", LIMIT, || {
        let log = agent.log_text();
        log.contains("resuming initial sync").then_some(log)
    });
    let from: u64 = log
        .lines()
        .find(|l| l.contains("resuming initial sync"))
        .and_then(|l| l.split("from=").nth(1))
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("resume offset in the agent log");
    assert!(
        from >= size / 4,
        "resumed from {from}, but at least {} was durable before the kill",
        size / 4
    );

    wait_until("60% of the disk to be durable", LIMIT, || {
        (disk_u64(&server, &img, "replicated_bytes") >= size * 6 / 10).then_some(())
    });
    agent.kill(Signal::SIGKILL);
    wait_until("the server to see the agent gone", LIMIT, || {
        (server.disk(&img)?["state"] == "disconnected").then_some(())
    });
    let durable = disk_u64(&server, &img, "replicated_bytes");
    let log_before = agent.log_text().len();
    agent.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    let sent = wait_until("the restarted agent's status", LIMIT, || {
        let st = agent.status();
        (st["disks"][0]["state"] == "continuous")
            .then(|| st["disks"][0]["sent_bytes"].as_u64())
            .flatten()
    });
    eprintln!("resume after agent SIGKILL: durable {durable} of {size}, restarted agent sent {sent} bytes");
    assert!(
        sent <= size - durable + 65536,
        "restarted agent sent {sent}, more than the {} bytes left",
        size - durable
    );
    assert!(sent < size / 2, "well under a full copy: {sent} of {size}");
    let new_log = agent.log_text()[log_before..].to_string();
    assert!(new_log.contains("resuming initial sync"), "{new_log}");
    assert!(
        !new_log.contains("rescan"),
        "an agent restart mid-sync resumes, it does not rescan: {new_log}"
    );
}

#[test]
fn rescan_after_losing_agent_state_sends_only_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("src.img");
    let size = (48 << 20) + 777;
    mixed_image(&img, size, 3);
    let mut agent = Agent::new(dir.path(), "s");
    assert!(agent
        .install(&server, &token, &[&img], "e2e-rescan")
        .status
        .success());
    agent.run(&[]);
    let (machine_id, _) = wait_replicated(&server, &img, LIMIT);
    agent.kill(Signal::SIGTERM);

    // Change a few blocks while the agent is gone, then lose its state entirely.
    let writes = [
        (1u64 << 20) + 100,
        9 << 20,
        (20 << 20) + 5,
        (24 << 20) + 65530,
        size - 300,
    ];
    let mut touched = std::collections::BTreeSet::new();
    for (i, off) in writes.iter().enumerate() {
        let data = random_bytes(100 + i as u64, 200);
        write_at(&img, *off, &data);
        for b in (*off / 65536)..=((*off + 199) / 65536) {
            touched.insert(b);
        }
    }
    std::fs::remove_dir_all(&agent.state).unwrap();

    // Without its state dir the machine is reinstalled with an operator's reinstall token (an
    // install token would make a new machine).
    let out = server.cli(&["token", "create", "--reinstall", &machine_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reinstall = out.stdout;
    let reinstall = String::from_utf8(reinstall).unwrap();
    let out = agent.install(&server, reinstall.trim(), &[&img], "e2e-rescan");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&machine_id),
        "a reinstalled source keeps its machine id: {stdout}"
    );
    assert!(stdout.contains("will rescan"), "{stdout}");
    agent.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    let st = wait_until("the rescan report", LIMIT, || {
        let st = agent.status();
        (st["disks"][0]["last_rescan"]["finished"] == true).then_some(st)
    });
    let r = &st["disks"][0]["last_rescan"];
    eprintln!("rescan report: {r}");
    assert_eq!(r["scanned_bytes"], size);
    assert_eq!(
        r["differing_blocks"].as_u64().unwrap(),
        touched.len() as u64
    );
    assert!(r["sent_bytes"].as_u64().unwrap() <= touched.len() as u64 * 65536);
    assert!(agent.log_text().contains("rescan complete"));
}

#[test]
fn revoked_expired_unknown_and_mispinned_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let img = dir.path().join("d.img");
    mixed_image(&img, 1 << 20, 1);
    let agent = Agent::new(dir.path(), "t");
    let refused = |token: &str, want: &str| {
        let out = agent.install(&server, token, &[&img], "e2e-token");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "install with a bad token must fail");
        assert!(err.contains(want), "expected `{want}` in: {err}");
        assert!(
            !agent.state.join("agent.json").exists(),
            "nothing saved after a refusal"
        );
    };

    let created: serde_json::Value = serde_json::from_slice(
        &run_ok(
            std::process::Command::new(bin("rehost-server"))
                .args(["--data-dir"])
                .arg(&server.data)
                .args(["--admin", &server.admin, "token", "create", "--json"]),
        )
        .stdout,
    )
    .unwrap();
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    assert!(server.cli(&["token", "revoke", id]).status.success());
    refused(token, "revoked");
    let list = String::from_utf8(server.cli(&["token", "list"]).stdout).unwrap();
    assert!(list.contains(id) && list.contains("revoked"), "{list}");

    let expiring =
        String::from_utf8(server.cli(&["token", "create", "--expires", "1s"]).stdout).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    refused(expiring.trim(), "expired");

    let good = rehost_proto::token::InstallToken::parse(&server.token()).unwrap();
    let unknown = rehost_proto::token::InstallToken::generate(good.server_pin);
    refused(&unknown.encode(), "unknown install token");
    let mispinned = rehost_proto::token::InstallToken {
        server_pin: [7; 32],
        ..good.clone()
    };
    refused(&mispinned.encode(), "pinned");
    refused("rh1_garbage", "damaged");

    let log = server.log_text();
    assert!(
        log.contains("was revoked") && log.contains("unknown install token"),
        "refusals are logged"
    );
    // The server is still serving.
    assert!(server.cli(&["machines"]).status.success());
}

#[test]
fn the_server_changes_the_bandwidth_cap_at_runtime_and_keeps_it_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("t.img");
    mixed_image(&img, 16 << 20, 21);
    let mut agent = Agent::new(dir.path(), "t");
    assert!(agent
        .install(&server, &token, &[&img], "throttled")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    wait_replicated(&server, &img, LIMIT);
    let cap = |agent: &Agent| agent.status()["max_mbps"].as_u64();
    assert_eq!(cap(&agent), None);

    let out = server.cli(&["machine", "throttle", "throttled", "--mbps", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("8 Mbit/s (applied now)"));
    wait_until("the agent to apply the cap", LIMIT, || {
        (cap(&agent) == Some(8)).then_some(())
    });
    // 3 MiB of incompressible data at 8 Mbit/s needs at least 3 s (less a 0.25 s burst).
    let t = std::time::Instant::now();
    write_at(&img, 4 << 20, &random_bytes(77, 3 << 20));
    wait_replicated(&server, &img, LIMIT);
    assert!(
        t.elapsed() >= Duration::from_millis(2700),
        "3 MiB at 8 Mbit/s took only {:?}",
        t.elapsed()
    );

    // The cap is kept in the catalog: a restarted server hands it to the reconnecting agent.
    server.restart();
    wait_until("the agent to reconnect with the cap", LIMIT, || {
        (agent.status()["connection"] == "connected" && cap(&agent) == Some(8)).then_some(())
    });
    assert!(server
        .cli(&["machine", "throttle", "throttled", "--mbps", "0"])
        .status
        .success());
    wait_until("the cap to be lifted", LIMIT, || {
        (cap(&agent).is_none()).then_some(())
    });
}
