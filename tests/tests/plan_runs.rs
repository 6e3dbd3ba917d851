//! Running recovery plans, the refusals and the failure path: three machines on loop devices
//! (plain ext4 disks: the converter refuses them, there is no Linux root on them), replicated by
//! real agents. Every bad run is refused before anything launches; a drill whose step-1 machine
//! fails stops there (step 2 never launches), its target is removed, its pre hook ran with the
//! documented environment, and `plan status`, `jobs` and `jobs P<id>` say which machine failed
//! and why; a machine added `--continue-on-error` lets the run go on. A planned failover stops db's services and powers app off (a `systemctl` stand-in
//! records it) around one final group point, then stops at db. A plan's schedule takes and
//! expires group points, and a machine follows one plan's schedule. (The drill and failover that
//! boot are in `plan_boot.rs`.)
//!
//! Root only (loop devices, mount, tracefs): without it the test skips with a message, and under
//! `CI=true` it fails instead.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::loopfs::LoopFs;
use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(180);

fn refused(server: &Server, args: &[&str], want: &str) -> String {
    let out = server.cli(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} was not refused: {err}");
    assert!(err.contains(want), "{args:?}: want `{want}` in: {err}");
    err
}

#[test]
fn bad_runs_launch_nothing_and_a_failed_machine_stops_the_drill_at_its_step() {
    if !require_root("plan runs over loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(dir);
    let targets = dir.join("targets");
    let (path, calls) = systemctl_stand_in(dir);
    let mut machines = Vec::new();
    for host in ["db", "app", "plain"] {
        let fs = LoopFs::named(dir, host, 64);
        let (agent, id, cleanup) =
            replicate(&server, dir, host, &[&fs.dev], &[("PATH", path.clone())]);
        server.ok(&[
            "blueprint",
            "set",
            host,
            "--launch",
            "none",
            "--target-dir",
            targets.to_str().unwrap(),
        ]);
        machines.push((host, id, fs, agent, cleanup));
    }
    for (host, _, _, agent, _) in &machines {
        wait_until(&format!("{host} continuous"), LIMIT, || {
            (agent.status()["disks"][0]["state"] == "continuous").then_some(())
        });
    }
    let id = |host: &str| machines.iter().find(|m| m.0 == host).unwrap().1.clone();
    let jobs_now = || server.json(&["jobs", "--json"]);

    // Bad input: nothing launches.
    refused(
        &server,
        &["plan", "drill", "nope"],
        "no recovery plan `nope`",
    );
    server.ok(&["plan", "create", "empty"]);
    refused(&server, &["plan", "drill", "empty"], "has no machines");
    server.ok(&["plan", "create", "shop"]);
    server.ok(&["plan", "add", "shop", "db", "--step", "1"]);
    server.ok(&["plan", "add", "shop", "app", "--step", "2"]);
    server.ok(&[
        "plan", "add", "shop", "plain", "--step", "2", "--wait", "none",
    ]);
    let pre_env = dir.join("pre1.env");
    let post_env = dir.join("post1.env");
    let pre = env_hook(
        dir,
        "pre1.sh",
        &pre_env,
        "echo hook pre1.sh ran\necho to stderr >&2\n",
    );
    let post = env_hook(dir, "post1.sh", &post_env, "");
    server.ok(&[
        "plan",
        "hook",
        "shop",
        "--step",
        "1",
        "--pre",
        pre.to_str().unwrap(),
    ]);
    server.ok(&[
        "plan",
        "hook",
        "shop",
        "--step",
        "1",
        "--post",
        post.to_str().unwrap(),
    ]);
    std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&server, &["plan", "drill", "shop"], "not executable");
    std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused(
        &server,
        &["plan", "failover", "shop", "--unplanned"],
        "is ready-for-testing, and a failover-unplanned needs testing or ready-for-cutover",
    );
    refused(&server, &["plan", "failover", "shop"], "--planned");
    refused(
        &server,
        &["plan", "failover", "shop", "--planned", "--point", "latest"],
        "cannot be used with",
    );
    refused(
        &server,
        &["plan", "drill", "shop", "--cleanup-after", "8d"],
        "not within 1s..=7d",
    );
    // No point of any machine yet.
    refused(
        &server,
        &["plan", "drill", "shop"],
        "no recovery point yet: take one with `rehost-server snapshot create --plan shop`",
    );
    // A machine with a job running: its test launch waits for a point its stopped agent owes.
    let db_pid = nix::unistd::Pid::from_raw(machines[0].3.pid().unwrap() as i32);
    nix::sys::signal::kill(db_pid, Signal::SIGSTOP).unwrap();
    let job = server.json(&["launch", "db", "--mode", "test", "--json"]);
    let err = refused(&server, &["plan", "drill", "shop"], "has job");
    nix::sys::signal::kill(db_pid, Signal::SIGCONT).unwrap();
    assert!(err.contains("nothing launched"), "{err}");
    assert!(
        jobs_now()["plan_runs"].as_array().is_none(),
        "a refused run was recorded: {}",
        jobs_now()
    );
    let jid = job["id"].to_string();
    wait_until("the lone launch to end", LIMIT, || {
        (server.json(&["jobs", &jid, "--json"])["job"]["state"] != "running").then_some(())
    });
    assert_eq!(jobs_now()["jobs"].as_array().unwrap().len(), 1);
    assert!(!pre_env.exists(), "a refused run ran a hook");

    // A group point, then a drill whose step-1 machine cannot be converted.
    let g = server.json(&["snapshot", "create", "--plan", "shop", "--json"]);
    assert_eq!(g["consistency"], "app", "{g:#}");
    let out = server.cli(&["plan", "drill", "shop", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "a failed drill exits 1: {text}");
    for want in [
        "drill of plan shop: 3 machines in 2 steps, network none (the plan's test network)",
        &format!("from group point {}", g["id"]),
        "step 1 pre hook succeeded",
        "hook pre1.sh ran",
        "stderr: to stderr",
        "step 1 start: db (wait boot)",
        "no Linux root filesystem found",
        &format!("step 1: db ({}) failed", id("db")),
        "drill failed after",
    ] {
        assert!(
            text.contains(want),
            "want `{want}` in the run's log:\n{text}"
        );
    }
    assert!(!text.contains("step 2 start"), "step 2 launched:\n{text}");
    assert!(!text.contains("post hook"), "the post hook ran:\n{text}");
    assert!(!post_env.exists());
    // The pre hook saw the documented environment.
    let env = env_of(&pre_env);
    let want = [
        ("REHOST_PLAN", "shop".to_string()),
        ("REHOST_RUN", "P1".to_string()),
        ("REHOST_MODE", "drill".to_string()),
        ("REHOST_STEP", "1".to_string()),
        ("REHOST_HOOK", "pre".to_string()),
        ("REHOST_MACHINE_IDS", id("db")),
        ("REHOST_HOSTNAMES", "db".to_string()),
    ];
    for (k, v) in &want {
        assert_eq!(env.get(*k), Some(v), "{k} in {env:?}");
    }
    assert!(!env.contains_key("REHOST_TARGET_DIRS"), "{env:?}");

    // Status, jobs and the run's log say who failed and why; nothing is left of the target.
    let st = server.json(&["plan", "status", "shop", "--json"]);
    let d = &st["last_drill"];
    assert_eq!(d["state"], "failed", "{st:#}");
    assert_eq!(d["failed_machine"], "db", "{st:#}");
    assert_eq!(d["group_id"], g["id"], "{st:#}");
    assert!(
        d["error"].as_str().unwrap().contains("no Linux root"),
        "{st:#}"
    );
    assert!(st["last_failover"].is_null());
    let ms = st["machines"].as_array().unwrap();
    assert_eq!(ms.len(), 3);
    assert_eq!(ms[0]["hostname"], "db");
    assert_eq!(ms[0]["drill"]["state"], "failed");
    assert!(ms[0]["drill"]["target"].is_null(), "{st:#}");
    assert_eq!(ms[0]["lifecycle"], "ready-for-testing");
    for m in &ms[1..] {
        assert!(m["drill"].is_null(), "never launched: {m:#}");
        assert_eq!(m["step"], 2);
    }
    let status_text = server.ok(&["plan", "status", "shop"]);
    assert!(
        status_text.contains("last drill     P1 drill") && status_text.contains("(machine db)"),
        "{status_text}"
    );
    let all = jobs_now();
    let runs = all["plan_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{all:#}");
    let child = runs[0]["jobs"][0].as_i64().unwrap();
    let cj = server.json(&["jobs", &child.to_string(), "--json"]);
    assert_eq!(cj["job"]["plan_run"], 1);
    assert_eq!(cj["job"]["state"], "failed");
    let snap = cj["job"]["snapshot_id"].clone();
    assert!(
        group_holds(&g, &snap),
        "the drill launched from the group point: {snap} {g:#}"
    );
    let target = cj["job"]["target_dir"].as_str().unwrap();
    assert!(!Path::new(target).exists(), "{target} was not removed");
    let listing = server.ok(&["jobs"]);
    assert!(
        listing.contains("P1") && listing.contains("drill"),
        "{listing}"
    );
    let view = server.json(&["jobs", "P1", "--json"]);
    assert!(
        view["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["machine"] == "db" && l["step"] == "convert"),
        "{view:#}"
    );
    refused(&server, &["jobs", "P99"], "no plan run P99");
    refused(&server, &["jobs", "Px"], "neither a job id nor a plan run");
    // A planned failover: db's services stopped and app powered off by their agents around one
    // final group point; db cannot be converted, so the run stops at step 1.
    server.ok(&[
        "plan",
        "add",
        "shop",
        "db",
        "--step",
        "1",
        "--source-action",
        "stop-services:dbsvc.service",
    ]);
    server.ok(&[
        "plan",
        "add",
        "shop",
        "app",
        "--step",
        "2",
        "--source-action",
        "poweroff",
    ]);
    refused(
        &server,
        &[
            "plan",
            "add",
            "shop",
            "app",
            "--step",
            "2",
            "--source-action",
            "reboot",
        ],
        "--source-action",
    );
    for host in ["db", "app", "plain"] {
        server.ok(&["mark", host, "ready-for-cutover"]);
    }
    let out = server.cli(&["plan", "failover", "shop", "--planned", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let groups = server.json(&["snapshots", "--plan", "shop", "--json"]);
    let last = groups["points"].as_array().unwrap().last().unwrap().clone();
    assert_ne!(last["id"], g["id"], "no final group point: {groups:#}");
    for want in [
        "failover-planned of plan shop: 3 machines in 2 steps, network user (the plan's production network)",
        "stopping dbsvc.service on the source",
        &format!("final group point {} (app", last["id"]),
        "powering off the source after the final point",
        &format!("step 1: db ({}) failed", id("db")),
    ] {
        assert!(text.contains(want), "want `{want}` in the run's log:
{text}");
    }
    // The agent answers a poweroff first and powers off 2 s later.
    let asked = wait_until("the agent's poweroff", LIMIT, || {
        let a = std::fs::read_to_string(&calls).unwrap_or_default();
        a.contains("poweroff").then_some(a)
    });
    let lines: Vec<&str> = asked.lines().collect();
    let stop = lines
        .iter()
        .position(|l| l.contains("stop") && l.contains("dbsvc.service"));
    let off = lines.iter().position(|l| l.contains("poweroff"));
    assert!(
        matches!((stop, off), (Some(s), Some(o)) if s < o),
        "{asked}"
    );
    let st = server.json(&["plan", "status", "shop", "--json"]);
    assert_eq!(st["last_failover"]["mode"], "failover-planned", "{st:#}");
    assert_eq!(st["last_failover"]["group_id"], last["id"], "{st:#}");
    assert_eq!(st["last_failover"]["failed_machine"], "db", "{st:#}");
    for m in st["machines"].as_array().unwrap() {
        assert_eq!(m["lifecycle"], "ready-for-cutover", "{m:#}");
    }

    // db may fail without stopping the run: step 2 then runs, and app's failure stops it.
    server.ok(&[
        "plan",
        "add",
        "shop",
        "db",
        "--step",
        "1",
        "--continue-on-error",
    ]);
    let p = server.json(&["plan", "show", "shop", "--json"]);
    assert_eq!(
        p["steps"][0]["machines"][0]["continue_on_error"], true,
        "{p:#}"
    );
    // (With a clean-up deadline: the server cleans it up by itself.)
    let out = server.cli(&["plan", "drill", "shop", "--cleanup-after", "1s", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "step 1: db failed (",
        "the run goes on (continue-on-error)",
        "step 2 start: app (wait boot), plain (wait none)",
        &format!("step 2: app ({}) failed", id("app")),
    ] {
        assert!(
            text.contains(want),
            "want `{want}` in the run's log:\n{text}"
        );
    }
    let st = server.json(&["plan", "status", "shop", "--json"]);
    assert_eq!(st["last_drill"]["id"], 3, "{st:#}");
    assert_eq!(st["last_drill"]["failed_machine"], "app", "{st:#}");
    assert_eq!(
        st["last_drill"]["jobs"].as_array().unwrap().len(),
        3,
        "{st:#}"
    );
    wait_until("the drill's clean-up deadline", LIMIT, || {
        let st = server.json(&["plan", "status", "shop", "--json"]);
        st["last_drill"]["cleaned_at"].is_i64().then_some(())
    });
    let p3 = server.json(&["jobs", "P3", "--json"]);
    assert!(
        p3["log"]
            .to_string()
            .contains("its --cleanup-after deadline"),
        "{p3:#}"
    );

    // The failed drills left no target: the cleanup has none to remove, and the plan can go.
    let c = server.ok(&["plan", "cleanup", "shop"]);
    assert!(
        c.contains("cleaned up drill P1") && !c.contains("P3"),
        "{c}"
    );
    assert!(server
        .ok(&["plan", "cleanup", "shop"])
        .contains("no drill to clean up"));
    server.ok(&["plan", "delete", "shop"]);
}

#[test]
fn a_plan_schedule_takes_and_expires_group_points_and_a_machine_follows_one_plan() {
    if !require_root("plan schedules over loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start_with(dir, &["--snapshot-tick", "1"], None);
    let mut machines = Vec::new();
    for host in ["a", "b", "c"] {
        let fs = LoopFs::named(dir, host, 32);
        let (agent, _, cleanup) = replicate(&server, dir, host, &[&fs.dev], &[]);
        machines.push((agent, cleanup, fs));
    }
    for (agent, ..) in &machines {
        wait_until("continuous replication", LIMIT, || {
            (agent.status()["disks"][0]["state"] == "continuous").then_some(())
        });
    }
    server.ok(&["plan", "create", "s1"]);
    server.ok(&["plan", "add", "s1", "a", "--step", "1"]);
    server.ok(&["plan", "add", "s1", "b", "--step", "2"]);
    refused(
        &server,
        &["plan", "schedule", "s1", "1h:10m"],
        "less than their interval",
    );
    let set_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let set = server.ok(&["plan", "schedule", "s1", "2s:6s"]);
    assert!(set.contains("retention 2s:6s"), "{set}");
    assert_eq!(
        server.json(&["plan", "show", "s1", "--json"])["policy"],
        "2s:6s"
    );
    // A machine's scheduled points follow one plan.
    server.ok(&["plan", "create", "s2"]);
    server.ok(&["plan", "add", "s2", "c", "--step", "1"]);
    server.ok(&["plan", "schedule", "s2", "1m:1h"]);
    refused(
        &server,
        &["plan", "add", "s2", "a", "--step", "1"],
        "follow one plan",
    );
    server.ok(&["plan", "schedule", "s2", "--clear"]);
    server.ok(&["plan", "add", "s2", "a", "--step", "1"]);
    refused(
        &server,
        &["plan", "schedule", "s2", "1m:1h"],
        "is in plan `s1`",
    );
    assert!(server.json(&["plan", "show", "s2", "--json"])["policy"].is_null());

    // Scheduled group points of both machines, the old ones expired.
    let points = wait_until("scheduled group points to expire", LIMIT, || {
        let v = server.json(&["snapshots", "--plan", "s1", "--json"]);
        let p = v["points"].as_array().unwrap().clone();
        (p.len() >= 2 && p[0]["id"].as_i64() > Some(2)).then_some(p)
    });
    assert!(
        points.len() <= 4,
        "2s:6s keeps at most 3 groups and the newest: {points:#?}"
    );
    for g in &points {
        let snaps = g["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 2, "{g:#}");
        assert!(snaps.iter().all(|s| s["reason"] == "scheduled"), "{g:#}");
    }
    // The machines of the plan have no scheduled points of their own since (the machines' first
    // scheduled points came at their sync's end; a scheduler round reads the plans as it
    // begins, so one under way within the second of the change may still take one).
    for host in ["a", "b"] {
        let l = server.json(&["snapshots", host, "--json"]);
        for s in l["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["created_at"].as_i64().unwrap() > set_at + 1)
        {
            assert!(
                s["group_id"].is_i64(),
                "{host}: a point outside the plan's groups: {s:#}"
            );
        }
    }
}
