//! A recovery plan run end to end: two bootable Debian disks (the converter's Xen-style fixture)
//! on loop devices, root filesystems mounted with writers fsyncing files on both, replicated by
//! real agents; a plan with "db" in step 1 and "app" in step 2. A group point under that load
//! holds, on each machine, every file fsynced before it; a drill launches db, waits for its boot
//! marker, then launches app, both on the plan's test network (none: no NIC in the QEMU command
//! line or the domain XML); the hooks ran with the documented environment; `plan cleanup` leaves
//! no VM, loop device, mount or file of the targets. Then an unplanned failover, one agent
//! stopped (SIGSTOP), launches both from that group point, says so, and leaves them
//! cutover-complete.
//!
//! Needs root, QEMU and debootstrap (the fixture): without root it skips with a message, and
//! under `CI=true` it fails instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::*;
use serde_json::Value;

mod launch_env;
use launch_env::{
    assert_files_in_target, processes_mentioning, tcg_blueprint, tools_ready, Source,
};

const SYNC_LIMIT: Duration = Duration::from_secs(300);

/// The first line of the run's log about `machine` whose message contains `text`.
fn line<'a>(log: &'a [Value], machine: &str, text: &str) -> &'a Value {
    log.iter()
        .find(|l| l["machine"] == machine && l["message"].as_str().unwrap_or("").contains(text))
        .unwrap_or_else(|| panic!("no line of {machine} with `{text}` in {log:#?}"))
}

fn by_host(server: &Server, host: &str) -> Value {
    server.machines()["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["hostname"] == host)
        .cloned()
        .unwrap_or_else(|| panic!("no machine {host}"))
}

fn mentions(file: &str, needle: &str) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[test]
fn a_drill_boots_db_before_app_on_the_test_network_and_an_unplanned_failover_uses_the_group_point()
{
    if !tools_ready() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("rehost-planboot")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let server = Server::start(dir);
    let hosts = ["db", "app"];
    let mut m = Vec::new();
    for host in hosts {
        let d = dir.join(host);
        std::fs::create_dir_all(&d).unwrap();
        let source = Source::new(&d);
        let (agent, id, trace) = replicate(&server, dir, host, &[&source.dev], &[]);
        let writer = Writer::paced(&source.mnt, Duration::from_millis(300));
        let targets = d.join("targets");
        tcg_blueprint(&server, host, "qemu", &targets);
        // Dropped in this order: the writer stops before its filesystem is unmounted.
        m.push((host, id, writer, agent, trace, source, targets));
    }
    for (host, ..) in &m {
        wait_until(&format!("the initial sync of {host}"), SYNC_LIMIT, || {
            let v = by_host(&server, host);
            (v["lifecycle"] == "ready-for-testing" && v["disks"][0]["state"] == "continuous")
                .then_some(())
        });
    }
    server.ok(&[
        "plan",
        "create",
        "shop",
        "--description",
        "db first, then app",
    ]);
    server.ok(&["plan", "add", "shop", "db", "--step", "1"]);
    server.ok(&["plan", "add", "shop", "app", "--step", "2"]);
    let (pre_env, post_env) = (dir.join("pre1.env"), dir.join("post2.env"));
    let pre = env_hook(dir, "pre1.sh", &pre_env, "");
    let post = env_hook(dir, "post2.sh", &post_env, "");
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
        "2",
        "--post",
        post.to_str().unwrap(),
    ]);
    assert_eq!(
        server.json(&["plan", "show", "shop", "--json"])["networks"]["test"],
        "none"
    );

    // A group point under load.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<_> = m.iter().map(|x| x.2.done()).collect();
    let g = server.json(&["snapshot", "create", "--plan", "shop", "--json"]);
    assert_eq!(g["consistency"], "app", "{g:#}");
    let kept: Vec<_> = m
        .iter()
        .zip(&before)
        .map(|(x, b)| unchanged_across(b, &x.2.done()))
        .collect();

    // The drill.
    let out = server.cli(&["plan", "drill", "shop", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the drill failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    // Each step says what the plan added beyond its slowest launch and beyond the guest's boot.
    for n in 1..=2 {
        assert!(
            text.contains(&format!("step {n} done in")) && text.contains("its guest's boot"),
            "{text}"
        );
    }
    let view = server.json(&["jobs", "P1", "--json"]);
    let log = view["log"].as_array().unwrap();
    let run = &view["run"];
    assert_eq!(run["state"], "succeeded", "{run:#}");
    assert_eq!(run["group_id"], g["id"]);
    // db booted before app's launch began (the run's timestamps).
    let db_up = line(log, "db", "target booted")["at_ms"].as_i64().unwrap();
    let app_start = line(log, "app", "test launch of app")["at_ms"]
        .as_i64()
        .unwrap();
    assert!(
        db_up < app_start,
        "app started at {app_start}, db booted at {db_up}"
    );
    let mut jobs = BTreeMap::new();
    for id in run["jobs"].as_array().unwrap() {
        let j = server.json(&["jobs", &id.to_string(), "--json"]);
        jobs.insert(j["job"]["hostname"].as_str().unwrap().to_string(), j);
    }
    let mut boots = Vec::new();
    for (i, (host, ..)) in m.iter().enumerate() {
        let j = &jobs[*host];
        assert_eq!(j["job"]["plan_run"], 1);
        assert!(
            group_holds(&g, &j["job"]["snapshot_id"]),
            "{host} did not launch from the group point"
        );
        let t = PathBuf::from(j["job"]["target_dir"].as_str().unwrap());
        let serial = std::fs::read_to_string(t.join("serial.log")).unwrap();
        assert!(serial.contains("REHOST-BOOT-OK"), "{host}: {serial}");
        // The test network: no NIC at all.
        let pid = std::fs::read_to_string(t.join("qemu.pid")).unwrap();
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains(&t.display().to_string()), "{cmdline}");
        assert!(
            !cmdline.contains("-netdev") && !cmdline.contains("-nic"),
            "{host}: {cmdline}"
        );
        let xml = std::fs::read_to_string(t.join("domain.xml")).unwrap();
        assert!(!xml.contains("<interface"), "{host}: {xml}");
        assert!(
            j["log"]
                .to_string()
                .contains("network none (the test network of plan shop)"),
            "{host}: {}",
            j["log"]
        );
        assert_files_in_target(&t.join(format!("{host}.raw")), &m[i].5.mnt, &kept[i]);
        boots.push(t);
    }
    // The serial logs agree: app's console (made when its QEMU started) began after db's marker.
    let born = std::fs::metadata(boots[1].join("serial.log"))
        .and_then(|m| m.created())
        .expect("the birth time of app's serial log (statx)");
    let born_ms = born
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        born_ms > db_up,
        "app's console began at {born_ms}, db booted at {db_up}"
    );
    // Hooks: the documented environment.
    let pre = env_of(&pre_env);
    for (k, v) in [
        ("REHOST_PLAN", "shop"),
        ("REHOST_RUN", "P1"),
        ("REHOST_MODE", "drill"),
        ("REHOST_STEP", "1"),
        ("REHOST_HOOK", "pre"),
        ("REHOST_HOSTNAMES", "db"),
        ("REHOST_MACHINE_IDS", m[0].1.as_str()),
    ] {
        assert_eq!(pre.get(k).map(String::as_str), Some(v), "{k}: {pre:?}");
    }
    let post = env_of(&post_env);
    let app_job = jobs["app"]["job"]["id"].to_string();
    for (k, v) in [
        ("REHOST_STEP", "2"),
        ("REHOST_HOOK", "post"),
        ("REHOST_HOSTNAMES", "app"),
        ("REHOST_MACHINE_IDS", m[1].1.as_str()),
        ("REHOST_JOB_IDS", app_job.as_str()),
        ("REHOST_TARGET_DIRS", boots[1].to_str().unwrap()),
        // No network on the test network: no address.
        ("REHOST_TARGET_ADDRESSES", "-"),
    ] {
        assert_eq!(post.get(k).map(String::as_str), Some(v), "{k}: {post:?}");
    }
    let st = server.json(&["plan", "status", "shop", "--json"]);
    assert_eq!(st["last_drill"]["state"], "succeeded", "{st:#}");
    for ms in st["machines"].as_array().unwrap() {
        assert_eq!(ms["lifecycle"], "testing", "{ms:#}");
        assert!(ms["drill"]["target"].is_string(), "{ms:#}");
    }
    let err = server.cli(&["plan", "delete", "shop"]);
    assert!(
        !err.status.success(),
        "a plan with a drill running was deleted"
    );

    // The cleanup leaves nothing of the targets.
    let c = server.ok(&["plan", "cleanup", "shop"]);
    assert!(c.contains("cleaned up drill P1"), "{c}");
    for (i, (host, ..)) in m.iter().enumerate() {
        let t = &boots[i];
        assert!(!t.exists(), "{host}: {} is still there", t.display());
        let targets = m[i].6.display().to_string();
        assert!(
            processes_mentioning(&targets).is_empty(),
            "{host}: a VM runs"
        );
        assert!(
            mentions("/proc/mounts", &targets).is_empty(),
            "{host}: mounted"
        );
        let loops = run_ok(Command::new("losetup").arg("-a"));
        let loops = String::from_utf8_lossy(&loops.stdout).into_owned();
        assert!(!loops.contains(&targets), "{host}: a loop device: {loops}");
        assert_eq!(by_host(&server, host)["lifecycle"], "ready-for-testing");
    }
    let st = server.json(&["plan", "status", "shop", "--json"]);
    assert!(st["last_drill"]["cleaned_at"].is_i64(), "{st:#}");

    // An unplanned failover, app's agent stopped: from the group point, no source contacted.
    for (host, ..) in &m {
        server.ok(&["blueprint", "set", host, "--launch", "none"]);
        server.ok(&["mark", host, "ready-for-cutover"]);
    }
    let app_pid = nix::unistd::Pid::from_raw(m[1].3.pid().unwrap() as i32);
    nix::sys::signal::kill(app_pid, Signal::SIGSTOP).unwrap();
    let out = server.cli(&["plan", "failover", "shop", "--unplanned", "--wait"]);
    nix::sys::signal::kill(app_pid, Signal::SIGCONT).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the failover failed:\n{text}");
    assert!(
        text.contains(&format!("from group point {}", g["id"]))
            && text.contains("network user (the plan's production network)"),
        "{text}"
    );
    let view = server.json(&["jobs", "P2", "--json"]);
    assert_eq!(view["run"]["mode"], "failover-unplanned");
    for id in view["run"]["jobs"].as_array().unwrap() {
        let j = server.json(&["jobs", &id.to_string(), "--json"]);
        assert_eq!(j["job"]["mode"], "cutover");
        assert!(group_holds(&g, &j["job"]["snapshot_id"]), "{j:#}");
        assert!(
            !j["log"].to_string().contains("asking the agent"),
            "a source was contacted: {j:#}"
        );
    }
    for (host, ..) in &m {
        assert_eq!(by_host(&server, host)["lifecycle"], "cutover-complete");
    }
    let st = server.json(&["plan", "status", "shop", "--json"]);
    assert_eq!(st["last_failover"]["state"], "succeeded", "{st:#}");
    let text = server.ok(&["plan", "status", "shop"]);
    assert!(
        text.contains("last failover  P2 failover-unplanned"),
        "{text}"
    );
}
