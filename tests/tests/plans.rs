//! Recovery plans' definitions through the operator's command line, against the real server:
//! machines by step with their wait and delay, the production and test networks, the pre and post
//! hooks of a step, `plan list` and `plan show` (text and `--json`); every bad input refused with a
//! clear word and nothing changed; a deleted machine leaves every plan; a deleted plan leaves
//! nothing behind. Machines are registered by `rehost-agent install` of a file image (no agent
//! runs, no root needed).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;

use rehost_tests::*;
use serde_json::{json, Value};

fn text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The error of a command that must fail (exit status non-zero).
fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(server: &Server, args: &[&str]) -> Value {
    let out = server.ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
}

fn show(server: &Server, plan: &str) -> Value {
    json_of(server, &["plan", "show", plan, "--json"])
}

fn list(server: &Server) -> Value {
    json_of(server, &["plan", "list", "--json"])
}

/// Registers a machine named `hostname` with install token `token` (an install of a 1 MiB file
/// image); its id.
fn register(server: &Server, dir: &Path, token: &str, hostname: &str) -> String {
    let img = dir.join(format!("{hostname}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let agent = Agent::new(dir, hostname);
    text(&agent.install(server, token, &[&img], hostname));
    agent.state_json()["machine_id"]
        .as_str()
        .expect("machine id in agent.json")
        .to_string()
}

/// One plain HTTP/1.1 request with a JSON body and the admin credential; (status, body).
fn http(server: &Server, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let admin = std::fs::read_to_string(server.data.join("admin.token")).unwrap();
    let mut c = std::net::TcpStream::connect(&server.admin).unwrap();
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: rehost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        admin.trim(),
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn executable(path: &Path, mode: u32) {
    std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn plans_are_defined_shown_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let web = register(&server, dir.path(), &token, "web-1");
    let db = register(&server, dir.path(), &token, "db-1");
    let app = register(&server, dir.path(), &token, "app-1");

    let empty = text(&server.cli(&["plan", "list"]));
    assert!(empty.contains("no recovery plans yet"), "{empty}");
    assert_eq!(list(&server), json!({ "plans": [] }));

    // Create, and the names a plan may not have.
    let out = text(&server.cli(&["plan", "create", "tier", "--description", "the web tier"]));
    assert!(out.contains("plan tier created"), "{out}");
    let err = refused(&server.cli(&["plan", "create", "tier"]));
    assert!(
        err.contains("a recovery plan named `tier` exists already"),
        "{err}"
    );
    let long = "x".repeat(65);
    for bad in ["bad name", "a/b", "..", "", &long] {
        let err = refused(&server.cli(&["plan", "create", bad]));
        assert!(
            err.contains("is not 1-64 of A-Z a-z 0-9 . _ -"),
            "{bad}: {err}"
        );
    }
    let fresh = show(&server, "tier");
    assert_eq!(fresh["description"], "the web tier");
    assert_eq!(
        fresh["networks"],
        json!({"production": "user", "test": "none"})
    );
    assert_eq!(fresh["steps"], json!([]));
    assert_eq!(list(&server)["plans"].as_array().unwrap().len(), 1);

    // Machines by id or hostname, in steps.
    let out = text(&server.cli(&["plan", "add", "tier", "db-1", "--step", "1"]));
    assert!(
        out.contains(&format!(
            "plan tier: step 1: {db} (db-1), wait boot, delay 0 s"
        )),
        "{out}"
    );
    text(&server.cli(&[
        "plan", "add", "tier", "web-1", "--step", "2", "--wait", "none", "--delay", "30",
    ]));
    text(&server.cli(&["plan", "add", "tier", &app, "--step", "2"]));
    let p = show(&server, "tier");
    assert_eq!(p["name"], "tier");
    assert!(p["created_at"].is_i64(), "{p}");
    let steps = p["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{p}");
    assert_eq!(steps[0]["step"], 1);
    assert_eq!(
        steps[0]["machines"],
        json!([{ "machine_id": db, "hostname": "db-1", "lifecycle": "not-ready",
                 "wait": "boot", "delay_s": 0 }])
    );
    assert_eq!(steps[0]["pre_hook"], Value::Null);
    assert_eq!(steps[0]["post_hook"], Value::Null);
    let second: Vec<_> = steps[1]["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["hostname"].clone(),
                m["wait"].clone(),
                m["delay_s"].clone(),
            )
        })
        .collect();
    assert_eq!(
        second,
        [
            (json!("web-1"), json!("none"), json!(30)),
            (json!("app-1"), json!("boot"), json!(0))
        ]
    );
    let human = text(&server.cli(&["plan", "show", "tier"]));
    for want in [
        "plan tier — the web tier (created ",
        "production network  user",
        "test network        none",
        "step 1",
        "step 2",
        &format!("{db}   db-1"),
        "none     30s  not-ready",
        "LIFECYCLE",
    ] {
        assert!(human.contains(want), "no {want:?} in\n{human}");
    }
    assert_eq!(
        list(&server)["plans"],
        json!([{ "name": "tier", "description": "the web tier", "created_at": p["created_at"],
                 "machine_count": 3, "step_count": 2 }])
    );
    let table = text(&server.cli(&["plan", "list"]));
    let line = table.lines().find(|l| l.starts_with("tier ")).unwrap();
    let cols: Vec<_> = line.split_whitespace().collect();
    assert_eq!((cols[1], cols[2]), ("3", "2"), "{table}");
    assert!(line.ends_with("the web tier"), "{table}");
    assert!(table.starts_with("NAME "), "{table}");

    // Adding it again to its own step sets wait and delay; to another step is refused.
    text(&server.cli(&[
        "plan", "add", "tier", "web-1", "--step", "2", "--wait", "none", "--delay", "30",
    ]));
    assert_eq!(show(&server, "tier"), p);
    let before = show(&server, "tier");
    let err = refused(&server.cli(&["plan", "add", "tier", "web-1", "--step", "3"]));
    assert!(
        err.contains(&format!(
            "machine {web} is already in step 2 of plan `tier`"
        )) && err.contains("plan remove"),
        "{err}"
    );
    let err = refused(&server.cli(&["plan", "add", "nope", "web-1", "--step", "1"]));
    assert!(err.contains("no recovery plan `nope`"), "{err}");
    let err = refused(&server.cli(&["plan", "add", "tier", "ghost", "--step", "1"]));
    assert!(
        err.contains("no machine with id or hostname `ghost`"),
        "{err}"
    );
    for step in ["0", "21", "x"] {
        let err = refused(&server.cli(&["plan", "add", "tier", "db-1", "--step", step]));
        assert!(err.contains("--step"), "{step}: {err}");
    }
    let err = refused(&server.cli(&["plan", "add", "tier", "db-1", "--step", "21"]));
    assert!(err.contains("not within 1..=20"), "{err}");
    let err = refused(&server.cli(&[
        "plan", "add", "tier", "db-1", "--step", "1", "--delay", "3601",
    ]));
    assert!(err.contains("--delay"), "{err}");
    let err = refused(&server.cli(&[
        "plan", "add", "tier", "db-1", "--step", "1", "--wait", "forever",
    ]));
    assert!(err.contains("--wait"), "{err}");
    // The API checks the same, for any caller.
    let (status, body) = http(
        &server,
        "PUT",
        &format!("/v1/plans/tier/machines/{db}"),
        &json!({"step": 21}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not within 1..=20"),
        "{body}"
    );
    let (status, body) = http(
        &server,
        "PUT",
        &format!("/v1/plans/tier/machines/{db}"),
        &json!({"step": 1, "delay_s": 3601}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(
        &server,
        "PUT",
        &format!("/v1/plans/tier/machines/{db}"),
        &json!({"step": 0}),
    );
    assert_eq!(status, 400);
    let (status, body) = http(&server, "POST", "/v1/plans", &json!({"name": "tier"}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(show(&server, "tier"), before, "nothing changed");

    // Networks: either or both; bad ones are refused whole.
    let out = text(&server.cli(&[
        "plan",
        "network",
        "tier",
        "--production",
        "bridge:br-prod",
        "--test",
        "user",
    ]));
    assert!(
        out.contains("production network bridge:br-prod, test network user"),
        "{out}"
    );
    let out = text(&server.cli(&["plan", "network", "tier"]));
    assert!(
        out.contains("production network bridge:br-prod, test network user"),
        "{out}"
    );
    text(&server.cli(&["plan", "network", "tier", "--test", "none"]));
    let nets = json!({"production": "bridge:br-prod", "test": "none"});
    assert_eq!(show(&server, "tier")["networks"], nets);
    for bad in [
        "bridge:a/b",
        "bridge:sixteen-chars-xx",
        "bridge:",
        "bridge:a b",
        "nat",
    ] {
        let err = refused(&server.cli(&[
            "plan",
            "network",
            "tier",
            "--production",
            "user",
            "--test",
            bad,
        ]));
        assert!(err.contains("--test"), "{bad}: {err}");
    }
    let (status, body) = http(
        &server,
        "PUT",
        "/v1/plans/tier/network",
        &json!({"production": "user", "test": "bridge:a b"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("test network: bridge name"),
        "{body}"
    );
    let err = refused(&server.cli(&["plan", "network", "nope", "--test", "user"]));
    assert!(err.contains("no recovery plan `nope`"), "{err}");
    assert_eq!(show(&server, "tier")["networks"], nets, "nothing changed");

    // Hooks: absolute, existing, regular, executable.
    let hook = dir.path().join("pre-step-1.sh");
    executable(&hook, 0o755);
    let hook = hook.to_str().unwrap();
    let out = text(&server.cli(&["plan", "hook", "tier", "--step", "1", "--pre", hook]));
    assert!(
        out.contains(&format!(
            "step 1: pre hook {hook} (timeout 300 s, stop on error)"
        )),
        "{out}"
    );
    text(&server.cli(&[
        "plan",
        "hook",
        "tier",
        "--step",
        "2",
        "--post",
        hook,
        "--timeout",
        "60",
        "--continue-on-error",
    ]));
    let p = show(&server, "tier");
    assert_eq!(
        p["steps"][0]["pre_hook"],
        json!({"path": hook, "timeout_s": 300, "continue_on_error": false})
    );
    assert_eq!(
        p["steps"][1]["post_hook"],
        json!({"path": hook, "timeout_s": 60, "continue_on_error": true})
    );
    assert_eq!(p["steps"][1]["pre_hook"], Value::Null);
    let human = text(&server.cli(&["plan", "show", "tier"]));
    assert!(
        human.contains(&format!(
            "post hook  {hook} (timeout 60 s, continue on error)"
        )),
        "{human}"
    );
    let plain = dir.path().join("not-executable.sh");
    executable(&plain, 0o644);
    let missing = dir.path().join("missing.sh");
    let here = dir.path().to_str().unwrap();
    for (path, why) in [
        (plain.to_str().unwrap(), "not executable"),
        (
            missing.to_str().unwrap(),
            "no such file on the staging host",
        ),
        ("hooks/pre.sh", "a relative path"),
        (here, "not a regular file"),
    ] {
        let err = refused(&server.cli(&["plan", "hook", "tier", "--step", "3", "--post", path]));
        assert!(
            err.contains(&format!("hook {path}: {why}")),
            "{path}: {err}"
        );
    }
    for args in [
        &["plan", "hook", "tier", "--step", "21", "--pre", hook][..],
        &[
            "plan",
            "hook",
            "tier",
            "--step",
            "1",
            "--pre",
            hook,
            "--timeout",
            "0",
        ],
        &[
            "plan", "hook", "tier", "--step", "1", "--pre", "--post", hook,
        ],
        &["plan", "hook", "tier", "--step", "1", hook],
        &["plan", "hook", "tier", "--step", "1", "--pre"],
        &[
            "plan", "hook", "tier", "--step", "1", "--pre", hook, "--remove",
        ],
    ] {
        refused(&server.cli(args));
    }
    let (status, body) = http(
        &server,
        "PUT",
        "/v1/plans/tier/hooks/1/pre",
        &json!({"path": hook, "timeout_s": 3601}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(
        &server,
        "PUT",
        "/v1/plans/tier/hooks/1/during",
        &json!({"path": hook}),
    );
    assert_eq!(status, 404);
    assert_eq!(show(&server, "tier"), p, "nothing changed");
    let out = text(&server.cli(&["plan", "hook", "tier", "--step", "2", "--post", "--remove"]));
    assert!(out.contains("step 2: post hook removed"), "{out}");
    let err = refused(&server.cli(&["plan", "hook", "tier", "--step", "2", "--post", "--remove"]));
    assert!(
        err.contains("step 2 of plan `tier` has no post hook"),
        "{err}"
    );
    assert_eq!(show(&server, "tier")["steps"][1]["post_hook"], Value::Null);

    // Remove a machine; a machine not in the plan is refused.
    let out = text(&server.cli(&["plan", "remove", "tier", "web-1"]));
    assert!(
        out.contains(&format!("plan tier: {web} removed (it was in step 2)")),
        "{out}"
    );
    let err = refused(&server.cli(&["plan", "remove", "tier", "web-1"]));
    assert!(
        err.contains(&format!("machine {web} is not in plan `tier`")),
        "{err}"
    );
    let err = refused(&server.cli(&["plan", "remove", "tier", "ghost"]));
    assert!(
        err.contains("no machine with id or hostname `ghost`"),
        "{err}"
    );

    // A machine in two plans: deleting it takes it out of both.
    text(&server.cli(&["plan", "create", "other"]));
    text(&server.cli(&["plan", "add", "other", "db-1", "--step", "5"]));
    text(&server.cli(&["machine", "delete", "db-1", "--yes"]));
    let p = show(&server, "tier");
    assert_eq!(p["steps"][0]["step"], 1);
    assert_eq!(p["steps"][0]["machines"], json!([]), "{p}");
    assert!(
        p["steps"][0]["pre_hook"].is_object(),
        "the step keeps its hook: {p}"
    );
    assert_eq!(show(&server, "other")["steps"], json!([]));
    let human = text(&server.cli(&["plan", "show", "tier"]));
    assert!(
        human.contains("no machines") && !human.contains("db-1"),
        "{human}"
    );
    assert_eq!(list(&server)["plans"][1]["machine_count"], 1);

    // Delete a plan: its members and hooks go; the machines stay.
    let out = text(&server.cli(&["plan", "delete", "tier"]));
    assert!(
        out.contains("plan tier deleted (1 machines, 1 hooks"),
        "{out}"
    );
    let err = refused(&server.cli(&["plan", "show", "tier"]));
    assert!(err.contains("no recovery plan `tier`"), "{err}");
    let err = refused(&server.cli(&["plan", "delete", "tier"]));
    assert!(err.contains("no recovery plan `tier`"), "{err}");
    let names: Vec<_> = list(&server)["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("other")]);
    assert_eq!(server.machines()["machines"].as_array().unwrap().len(), 2);
    // A name the API cannot route is still only "no such plan".
    let err = refused(&server.cli(&["plan", "show", "a/b c"]));
    assert!(err.contains("no recovery plan `a/b c`"), "{err}");
}

#[test]
fn a_plan_holds_at_most_100_machines() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    text(&server.cli(&["plan", "create", "big"]));
    let token = server.token();
    let ids: Vec<String> = (0..101)
        .map(|i| register(&server, dir.path(), &token, &format!("host-{i}")))
        .collect();
    for (i, id) in ids[..100].iter().enumerate() {
        let step = (1 + i % 20).to_string();
        text(&server.cli(&["plan", "add", "big", id, "--step", &step]));
    }
    let before = show(&server, "big");
    let err = refused(&server.cli(&["plan", "add", "big", &ids[100], "--step", "1"]));
    assert!(
        err.contains("plan `big` holds 100 machines already, the most a plan may hold"),
        "{err}"
    );
    assert_eq!(show(&server, "big"), before, "nothing changed");
    assert_eq!(list(&server)["plans"][0]["machine_count"], 100);
    assert_eq!(list(&server)["plans"][0]["step_count"], 20);
    // One out, and the last one fits.
    text(&server.cli(&["plan", "remove", "big", &ids[0]]));
    text(&server.cli(&["plan", "add", "big", &ids[100], "--step", "1"]));
}
