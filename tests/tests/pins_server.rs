//! Pins of the server's documented JSON: one real server and agent (a small ext4 image), a
//! recovery point, a blueprint with launch method `none`, a test launch (which fails: the image
//! holds no OS) and a recovery plan, then every `--json` output of the operator commands checked
//! against its example in `tests/pins/` (field names, JSON types, the documented value sets). One
//! setup for all of them: the pins cost one replication, not one each.
//!
//! Needs root (as the launch tests do): without root it skips with a message, and under
//! `CI=true` it fails instead.

use std::process::Command;
use std::time::Duration;

use rehost_tests::pins::check;
use rehost_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn json(server: &Server, args: &[&str]) -> Value {
    let out = server.ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
}

#[test]
fn the_documented_json_of_the_server_commands_keeps_its_shape() {
    if !require_root("pins of the server's JSON (a test launch)") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("rehost-pins")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    std::fs::write(files.join("etc/hostname"), "pin-host\n").unwrap();
    let img = dir.join("pin.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&files)
            .arg(&img)
            .arg("16M"),
    );
    let server = Server::start(dir);
    server.ok(&["retention", "set", "off"]);
    let created = json(&server, &["token", "create", "--json", "--expires", "1d"]);
    check("token-create", &created);
    let token = created["token"].as_str().unwrap().to_string();
    let mut agent = Agent::new(dir, "pin");
    let out = agent.install(&server, &token, &[&img], "pin-host");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.run(&[]);
    let (machine, _) = wait_replicated(&server, &img, LIMIT);
    wait_until("ready-for-testing", LIMIT, || {
        (server.machine(&machine)["lifecycle"] == "ready-for-testing").then_some(())
    });

    // `--outdated` first: blessing writes the last output checked, and this one lists none.
    check(
        "machines",
        &json(&server, &["machines", "--outdated", "--json"]),
    );
    check("machines", &json(&server, &["machines", "--json"]));
    check("tokens", &json(&server, &["token", "list", "--json"]));

    let point = json(
        &server,
        &["snapshot", "create", "pin-host", "--wait", "--json"],
    );
    check("snapshot", &point);
    check(
        "snapshot-requested",
        &json(&server, &["snapshot", "create", "pin-host", "--json"]),
    );
    wait_until("the requested point", LIMIT, || {
        let l = json(&server, &["snapshots", "pin-host", "--json"]);
        let snaps = l["snapshots"].as_array()?;
        (snaps.len() == 2 && snaps.iter().all(|s| s["state"] == "complete")).then_some(())
    });
    check(
        "snapshots",
        &json(&server, &["snapshots", "pin-host", "--json"]),
    );
    check(
        "verify",
        &json(
            &server,
            &["snapshot", "verify", "pin-host", "latest", "--json"],
        ),
    );
    check("gc", &json(&server, &["gc", "--json"]));

    let targets = dir.join("targets");
    server.ok(&[
        "blueprint",
        "set",
        "pin-host",
        "--launch",
        "none",
        "--target-dir",
        targets.to_str().unwrap(),
    ]);
    check(
        "blueprint",
        &json(&server, &["blueprint", "show", "pin-host", "--json"]),
    );
    let job = json(&server, &["launch", "pin-host", "--mode", "test", "--json"]);
    check("launch", &job);
    let id = job["id"].as_i64().unwrap().to_string();
    let ended = wait_until("the test launch to end", LIMIT, || {
        let v = json(&server, &["jobs", &id, "--json"]);
        (v["job"]["state"] != "running").then_some(v)
    });
    check("job", &ended);
    check(
        "jobs",
        &json(&server, &["jobs", "--machine", "pin-host", "--json"]),
    );
    check("jobs", &json(&server, &["jobs", "--json"]));
    check(
        "history",
        &json(&server, &["machine", "history", "pin-host", "--json"]),
    );

    // A recovery plan: a machine in step 1 with a pre hook, and step 2 with only a post hook.
    let hook = dir.join("hook.sh");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hook = hook.to_str().unwrap();
    server.ok(&["plan", "create", "pin-plan", "--description", "pinned"]);
    server.ok(&["plan", "add", "pin-plan", "pin-host", "--step", "1"]);
    server.ok(&["plan", "hook", "pin-plan", "--step", "1", "--pre", hook]);
    server.ok(&["plan", "hook", "pin-plan", "--step", "2", "--post", hook]);
    check(
        "plan",
        &json(&server, &["plan", "show", "pin-plan", "--json"]),
    );
    check("plans", &json(&server, &["plan", "list", "--json"]));
}
