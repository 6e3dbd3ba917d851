//! The main job end to end: a bootable Debian disk (the converter's fixture, configured as on a
//! Xen host) on a loop device, its root filesystem mounted with a writer busy on it, replicated
//! by the real agent to the real server; test launches that boot from the latest recovery point
//! (the second replacing the first); a server killed mid-job; and the cutover, which boots and
//! ends replication.
//!
//! The first test launch runs as a libvirt domain (the test starts the host's libvirtd if it is
//! not running, and stops it again), the others as QEMU processes the server starts; the second
//! uses launch method `none`.
//!
//! Needs root, QEMU, libvirt and debootstrap (the fixture): without root it skips with a message,
//! and under `CI=true` it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rehost_tests::*;
use serde_json::Value;

mod launch_env;
use launch_env::{
    assert_files_in_target, domains, processes_mentioning, tcg_blueprint, tools_ready, Libvirtd,
    Source,
};

const SYNC_LIMIT: Duration = Duration::from_secs(300);
/// Export, conversion (the guest's initramfs is rebuilt in a chroot) and a boot under TCG.
const JOB_LIMIT: Duration = Duration::from_secs(600);

fn cli(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "rehost-server {}: {}\n{}\nserver log tail:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        tail(&server.log_text(), 40)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn machine(server: &Server) -> Value {
    server.machines()["machines"][0].clone()
}

fn job(server: &Server, id: i64) -> Value {
    serde_json::from_str(&cli(server, &["jobs", &id.to_string(), "--json"])).unwrap()
}

fn last_job_id(server: &Server) -> i64 {
    let v: Value = serde_json::from_str(&cli(server, &["jobs", "--json"])).unwrap();
    v["jobs"].as_array().unwrap().last().unwrap()["id"]
        .as_i64()
        .unwrap()
}

/// Runs `launch --wait` and returns the job's JSON and how long the command took.
fn launch(server: &Server, mode_and_args: &[&str]) -> (Value, Duration) {
    let mode = mode_and_args[0];
    let mut args = vec!["launch", "deb-src", "--wait", "--mode"];
    args.extend_from_slice(mode_and_args);
    let t = Instant::now();
    let out = server.cli(&args);
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("$ rehost-server {}\n{stdout}", args.join(" "));
    let id = last_job_id(server);
    let j = job(server, id);
    assert!(
        out.status.success() && j["job"]["state"] == "succeeded",
        "{mode} launch failed: {}\n{stdout}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&server.log_text(), 60)
    );
    assert!(took < JOB_LIMIT, "{mode} launch took {took:?}");
    (j, took)
}

fn target_of(j: &Value) -> PathBuf {
    PathBuf::from(j["job"]["target_dir"].as_str().expect("job target dir"))
}

fn vm_running(target: &Path) -> bool {
    std::fs::read_to_string(target.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&target.display().to_string()))
        })
}

/// Seconds per step of a job's log: from each step's first line to the next step's.
fn breakdown(j: &Value) -> String {
    let log = j["log"].as_array().unwrap();
    let mut steps: Vec<(String, i64)> = Vec::new();
    for l in log {
        let step = l["step"].as_str().unwrap().to_string();
        if steps.last().map(|s| &s.0) != Some(&step) {
            steps.push((step, l["at_ms"].as_i64().unwrap()));
        }
    }
    let end = log.last().unwrap()["at_ms"].as_i64().unwrap();
    steps
        .iter()
        .enumerate()
        .map(|(i, (s, t))| {
            let next = steps.get(i + 1).map(|n| n.1).unwrap_or(end);
            format!("{s} {:.1}s", (next - t) as f64 / 1000.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn test_launches_and_cutover_boot_from_recovery_points_and_a_killed_server_leaves_no_orphans() {
    if !tools_ready() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("rehost-launch")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let _libvirtd = Libvirtd::ensure();
    let source = Source::new(dir);
    let mut server = Server::start(dir);
    let token = server.token();
    let mut agent = Agent::new(dir, "a");
    let out = agent.install(&server, &token, &[&source.dev], "deb-src");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _trace = TraceCleanup(agent.state_json()["machine_id"].as_str().map(String::from));
    let (path, calls) = systemctl_stand_in(dir);
    agent.run_with_env(&[], &[("PATH", path)]);
    let mut writer = Writer::paced(&source.mnt, Duration::from_millis(300));

    wait_until("the initial sync", SYNC_LIMIT, || {
        let m = machine(&server);
        (m["lifecycle"] == "ready-for-testing" && m["disks"][0]["state"] == "continuous")
            .then_some(())
    });
    // Nothing can cut over before a test (or a mark).
    let out = server.cli(&["launch", "deb-src", "--mode", "cutover"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ready-for-testing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let targets = dir.join("targets");
    tcg_blueprint(&server, "deb-src", "libvirt", &targets);

    // A recovery point while the writer runs; the test launch boots from the latest point.
    std::thread::sleep(Duration::from_secs(2));
    let before_point = writer.done();
    assert!(!before_point.is_empty(), "the writer has written nothing");
    let point: Value = serde_json::from_str(&cli(
        &server,
        &["snapshot", "create", "deb-src", "--wait", "--json"],
    ))
    .unwrap();
    assert_eq!(point["consistency"], "app", "{point}");
    let before_point = unchanged_across(&before_point, &writer.done());
    let (j1, took) = launch(&server, &["test"]);
    eprintln!("test launch 1: {took:?}; {}", breakdown(&j1));
    assert_eq!(j1["job"]["snapshot_id"], point["id"]);
    let t1 = target_of(&j1);
    // The first test runs as a libvirt domain.
    let d1 = "rehost-deb-src-test-1";
    assert!(domains().contains(d1), "{}", domains());
    let state = Command::new("virsh")
        .args(["domstate", d1])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&state.stdout).contains("running"));
    assert!(j1["log"]
        .to_string()
        .contains("domain rehost-deb-src-test-1 started"));
    let serial = std::fs::read_to_string(t1.join("serial.log")).unwrap();
    assert!(serial.contains("REHOST-BOOT-OK"), "{serial}");
    let log1 = j1["log"].to_string();
    for want in [
        "job-start",
        "snapshot",
        "export",
        "conversion start",
        "conversion end",
        "boot-check",
        "target booted",
        "job-end",
    ] {
        assert!(log1.contains(want), "job log lacks {want}: {log1}");
    }
    assert!(
        log1.contains("guest address 10.0.2."),
        "no DHCP address: {log1}"
    );
    assert_files_in_target(&t1.join("deb-src.raw"), &source.mnt, &before_point);
    assert!(t1.join("qemu.sh").is_file() && t1.join("domain.xml").is_file());
    assert_eq!(machine(&server)["lifecycle"], "testing");
    // Replication went on during the test.
    assert_eq!(machine(&server)["connected"], true);

    // A second test replaces the first: its VM and images are gone. (This one uses launch
    // method `none`: the converted image, `qemu.sh` and `domain.xml`, nothing started.)
    cli(
        &server,
        &["blueprint", "set", "deb-src", "--launch", "none"],
    );
    let (j2, took) = launch(&server, &["test"]);
    eprintln!("test launch 2: {took:?}; {}", breakdown(&j2));
    assert!(!t1.exists(), "the first test's target was not removed");
    assert!(processes_mentioning(&t1.display().to_string()).is_empty());
    assert!(!domains().contains(d1), "domain {d1} is still defined");
    let t2 = target_of(&j2);
    assert!(!vm_running(&t2));
    assert!(t2.join("deb-src.raw").is_file());
    let script = std::fs::read_to_string(t2.join("qemu.sh")).unwrap();
    assert!(script.contains("deb-src.raw"), "{script}");
    match Command::new("virt-xml-validate")
        .arg(t2.join("domain.xml"))
        .arg("domain")
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "virt-xml-validate: {e} (CI=true; scripts/install-deps.sh installs it)"
        ),
    }
    assert!(j2["log"]
        .to_string()
        .contains("not started (launch method none)"));
    cli(
        &server,
        &["blueprint", "set", "deb-src", "--launch", "qemu"],
    );
    let all: Value = serde_json::from_str(&cli(&server, &["jobs", "--json"])).unwrap();
    let active: Vec<i64> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["active"] == true)
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(active, vec![j2["job"]["id"].as_i64().unwrap()]);

    // `test revert` removes the test target and puts the machine back to ready-for-testing.
    let out = cli(&server, &["test", "revert", "deb-src"]);
    assert!(out.contains("test reverted, ready-for-testing"), "{out}");
    assert!(!t2.exists(), "test revert left {}", t2.display());
    assert_eq!(machine(&server)["lifecycle"], "ready-for-testing");
    let j2_after = job(&server, j2["job"]["id"].as_i64().unwrap());
    assert_eq!(j2_after["job"]["active"], false);
    assert!(j2_after["log"].to_string().contains("test reverted"));
    let out = server.cli(&["test", "revert", "deb-src"]);
    assert!(
        !out.status.success(),
        "a second revert has nothing to revert"
    );

    // One job at a time; and a server killed mid-job leaves it failed, with its log, and nothing
    // behind: no VM, converter, mount, loop device or file.
    cli(&server, &["launch", "deb-src", "--mode", "test"]);
    let id3 = last_job_id(&server);
    let out = server.cli(&["launch", "deb-src", "--mode", "test"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still running"));
    wait_until("job 3 to reach the conversion", JOB_LIMIT, || {
        job(&server, id3)["log"]
            .to_string()
            .contains("conversion start")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let t3 = PathBuf::from(job(&server, id3)["job"]["target_dir"].as_str().unwrap());
    assert!(t3.exists());
    server.kill();
    server.restart();
    let j3 = job(&server, id3);
    assert_eq!(j3["job"]["state"], "failed", "{j3}");
    assert!(j3["job"]["error"].as_str().unwrap().contains("interrupted"));
    assert!(
        j3["log"]
            .to_string()
            .contains("the server stopped while this job ran"),
        "{j3}"
    );
    assert!(!t3.exists(), "job 3's target dir is still there");
    assert!(
        processes_mentioning(&t3.display().to_string()).is_empty(),
        "a process of job 3 survived"
    );
    let loops = run_ok(Command::new("losetup").arg("-a")).stdout;
    assert!(
        !String::from_utf8_lossy(&loops).contains(&t3.display().to_string()),
        "a loop device of job 3 survived"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&t3.display().to_string()),
        "a mount of job 3 survived"
    );
    assert_eq!(machine(&server)["lifecycle"], "ready-for-testing");

    // A step that fails (here: no boot marker in time) says why and leaves no VM and no files.
    cli(
        &server,
        &[
            "blueprint",
            "set",
            "deb-src",
            "--boot-timeout",
            "5",
            "--boot-marker",
            "NEVER-PRINTED",
        ],
    );
    let out = server.cli(&["launch", "deb-src", "--mode", "test", "--wait"]);
    assert!(!out.status.success());
    let failed = job(&server, last_job_id(&server));
    let err = failed["job"]["error"].as_str().unwrap();
    assert!(
        err.contains("boot check failed: no boot marker (NEVER-PRINTED) within 5 s"),
        "{failed}"
    );
    let tf = PathBuf::from(failed["job"]["target_dir"].as_str().unwrap());
    assert!(!tf.exists(), "the failed job's target dir is still there");
    assert!(
        processes_mentioning(&tf.display().to_string()).is_empty(),
        "its VM still runs"
    );
    assert!(
        failed["log"].to_string().contains("VM (qemu pid"),
        "{failed}"
    );
    assert_eq!(machine(&server)["lifecycle"], "ready-for-testing");
    cli(
        &server,
        &[
            "blueprint",
            "set",
            "deb-src",
            "--boot-timeout",
            "300",
            "--boot-marker",
            "REHOST-BOOT-OK",
            "--boot-marker",
            "login:",
        ],
    );

    // Cutover: a final consistency point from the agent, then the target boots and replication
    // of the machine stops.
    cli(&server, &["mark", "deb-src", "ready-for-cutover"]);
    wait_until("the agent to reconnect", SYNC_LIMIT, || {
        (machine(&server)["disks"][0]["state"] == "continuous").then_some(())
    });
    // A planned failover whose services cannot be stopped makes no cutover at all.
    let out = server.cli(&[
        "launch",
        "deb-src",
        "--mode",
        "cutover",
        "--source-action",
        "stop-services:broken.service",
        "--wait",
    ]);
    assert!(!out.status.success());
    let failed = job(&server, last_job_id(&server));
    assert!(
        failed["job"]["error"]
            .as_str()
            .unwrap()
            .contains("Unit not loaded"),
        "{failed}"
    );
    assert!(failed["job"]["snapshot_id"].is_null(), "{failed}");
    assert_eq!(machine(&server)["lifecycle"], "ready-for-cutover");

    std::thread::sleep(Duration::from_secs(2));
    let before_cutover = writer.done();
    let (jc, rto) = launch(
        &server,
        &[
            "cutover",
            "--source-action",
            "stop-services:demo-app.service",
        ],
    );
    let before_cutover = unchanged_across(&before_cutover, &writer.done());
    let breakdown = breakdown(&jc);
    eprintln!(
        "RTO (launch --mode cutover to the boot marker): {:.1} s; {breakdown}",
        rto.as_secs_f64()
    );
    let logc = jc["log"].to_string();
    assert!(
        logc.contains("the agent says: stopped demo-app.service"),
        "{logc}"
    );
    let asked = std::fs::read_to_string(&calls).unwrap();
    assert!(asked.contains("stop -- demo-app.service"), "{asked}");
    assert!(
        logc.contains("snapshot end: final recovery point"),
        "{logc}"
    );
    assert!(
        logc.contains("(app,"),
        "the final point is not app-consistent: {logc}"
    );
    let tc = target_of(&jc);
    assert!(vm_running(&tc));
    assert_files_in_target(&tc.join("deb-src.raw"), &source.mnt, &before_cutover);
    assert_eq!(machine(&server)["lifecycle"], "cutover-complete");
    let status = agent.wait(Duration::from_secs(120));
    assert!(!status.success(), "the agent should stop once refused");
    assert!(
        agent.log_text().contains("cutover-complete"),
        "{}",
        tail(&agent.log_text(), 20)
    );
    let metrics = server.metrics();
    assert!(
        metrics.contains("lifecycle=\"cutover-complete\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rehost_launch_jobs{mode=\"test\",state=\"failed\"} 2"),
        "{metrics}"
    );
    let history = cli(&server, &["machine", "history", "deb-src"]);
    for want in [
        "not-ready -> ready-for-testing",
        "ready-for-testing -> testing",
        "testing -> ready-for-testing",
        "ready-for-testing -> ready-for-cutover",
        "ready-for-cutover -> cutting-over",
        "cutting-over -> cutover-complete",
    ] {
        assert!(history.contains(want), "history lacks {want}:\n{history}");
    }
    writer.stop();
    drop(source);
}

/// A cutover whose agent gives no final point within the bound (here: the agent is stopped with
/// SIGSTOP, its connection still open) falls back to the latest recovery point and says so; a
/// conversion that fails (a disk of plain files holds no OS) ends the job with its reason, the
/// machine where it was, and nothing left in the target dir. Then a cutover with `--source-action
/// poweroff` takes the agent's own final point and has the agent power the source off (through a
/// `systemctl` stand-in). No QEMU and no root needed.
#[test]
fn a_cutover_without_a_final_point_uses_the_previous_one_and_a_failed_conversion_leaves_nothing() {
    let tmp = tempfile::Builder::new()
        .prefix("rehost-fallback")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    std::fs::write(files.join("etc/hostname"), "plain-host\n").unwrap();
    let img = dir.join("plain.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&files)
            .arg(&img)
            .arg("32M"),
    );
    let server = Server::start(dir);
    let token = server.token();
    let mut agent = Agent::new(dir, "p");
    let out = agent.install(&server, &token, &[&img], "plain-host");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (path, calls) = systemctl_stand_in(dir);
    agent.run_with_env(&[], &[("PATH", path)]);
    wait_until("the initial sync", SYNC_LIMIT, || {
        let m = machine(&server);
        (m["lifecycle"] == "ready-for-testing" && m["disks"][0]["state"] == "continuous")
            .then_some(())
    });
    let targets = dir.join("targets");
    cli(
        &server,
        &[
            "blueprint",
            "set",
            "plain-host",
            "--launch",
            "none",
            "--target-dir",
            targets.to_str().unwrap(),
        ],
    );
    cli(&server, &["mark", "plain-host", "ready-for-cutover"]);
    let point: Value = serde_json::from_str(&cli(
        &server,
        &["snapshot", "create", "plain-host", "--wait", "--json"],
    ))
    .unwrap();

    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let out = server.cli(&[
        "launch",
        "plain-host",
        "--mode",
        "cutover",
        "--final-point-timeout",
        "3",
        "--wait",
    ]);
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let j = job(&server, last_job_id(&server));
    let log = j["log"].to_string();
    assert!(
        log.contains(&format!(
            "no final point (the agent gave no consistency point within 3 s); using previous snapshot: recovery point {}",
            point["id"]
        )),
        "{log}"
    );
    assert_eq!(j["job"]["snapshot_id"], point["id"]);
    assert!(
        j["job"]["error"]
            .as_str()
            .unwrap()
            .contains("conversion fail"),
        "{j}"
    );
    let target = PathBuf::from(j["job"]["target_dir"].as_str().unwrap());
    assert!(!target.exists(), "the failed job left {}", target.display());
    // The converter's error is said once, and names no path in the dir that was removed.
    let err = j["job"]["error"].as_str().unwrap();
    assert!(
        !err.contains("rehost-converter: ") && !err.contains(&target.display().to_string()),
        "{err}"
    );
    assert_eq!(machine(&server)["lifecycle"], "ready-for-cutover");
    // Replication goes on after a failed cutover.
    wait_until("the agent to be back", SYNC_LIMIT, || {
        (machine(&server)["disks"][0]["state"] == "continuous").then_some(())
    });

    // A planned failover that powers the source off: asked once the final point is taken (the
    // agent's own point this time), answered before the machine goes down.
    let out = server.cli(&[
        "launch",
        "plain-host",
        "--mode",
        "cutover",
        "--source-action",
        "poweroff",
        "--wait",
    ]);
    assert!(
        !out.status.success(),
        "a disk with no OS cannot be converted"
    );
    let j = job(&server, last_job_id(&server));
    let log = j["log"].to_string();
    assert!(log.contains("snapshot end: final recovery point"), "{log}");
    assert!(log.contains("the agent says: powering off"), "{log}");
    wait_until(
        "the agent to call systemctl poweroff",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&calls)
                .is_ok_and(|c| c.contains("poweroff --"))
                .then_some(())
        },
    );

    // An archived machine's live session is ended at once (and the agent refused from then on):
    // the agent stops.
    cli(&server, &["mark", "plain-host", "archived"]);
    let status = agent.wait(Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        agent
            .log_text()
            .contains("is archived: its replication has stopped"),
        "{}",
        tail(&agent.log_text(), 20)
    );
    assert_eq!(machine(&server)["lifecycle"], "archived");
}
