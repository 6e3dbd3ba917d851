//! Pins `rehost-agent status --json` (documented in the README) against the example in
//! `tests/pins/agent-status.json`: its field names, their JSON types and the value sets of its
//! state fields, so that a change of the agent's code cannot change the output unnoticed.

use std::time::Duration;

use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn agent_status_json_matches_its_pin() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    std::fs::write(&img, random_bytes(13, 8 << 20)).unwrap();
    let mut agent = Agent::new(dir.path(), "pin");
    let out = agent.install(&server, &token, &[&img], "pin-status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = agent.status();
    assert_eq!(before["connection"], "never started", "{before}");
    assert_eq!(before["disks"], serde_json::json!([]), "{before}");

    agent.run(&["--scan-interval", "2"]);
    let (machine, _) = wait_replicated(&server, &img, LIMIT);
    // A crash: the next start cannot vouch for the server's copy and rescans, which fills in
    // `last_rescan` and a `start` of kind `rescan`.
    agent.kill(nix::sys::signal::Signal::SIGKILL);
    write_at(&img, 1 << 20, &random_bytes(14, 1 << 20));
    agent.run(&["--scan-interval", "2"]);
    wait_replicated(&server, &img, LIMIT);
    // A recovery point: `last_point`.
    server.snapshot(&machine);
    let status = wait_until("a status with the rescan and the point", LIMIT, || {
        let s = agent.status();
        let d = &s["disks"][0];
        (s["connection"] == "connected"
            && s["last_point"].is_object()
            && d["state"] == "continuous"
            && d["lag_seconds"].is_u64()
            && d["last_rescan"]["finished"] == true
            && d["start"]["kind"] == "rescan")
            .then_some(s)
    });
    rehost_tests::pins::check("agent-status", &status);

    // A clean stop: the status left behind says so for the connection and every disk.
    agent.kill(nix::sys::signal::Signal::SIGTERM);
    let stopped = agent.status();
    assert_eq!(stopped["connection"], "stopped", "{stopped}");
    assert_eq!(stopped["running"], false, "{stopped}");
    assert_eq!(stopped["disks"][0]["state"], "disconnected", "{stopped}");
    assert!(stopped["disks"][0]["lag_seconds"].is_null(), "{stopped}");
}
