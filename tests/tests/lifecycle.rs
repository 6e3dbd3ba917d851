//! The agent's life on a source machine: `uninstall` leaves nothing behind and tells the server,
//! a freeze in progress blocks it and outlives a stop of the agent, an upgraded agent (a rebuilt
//! binary with a newer version) resumes without a rescan, and the service unit passes
//! `systemd-analyze`. The tests that need root (loop devices, tracefs, fsfreeze) skip without
//! it, and fail instead under `CI=true`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A loop device over a file of random data (no filesystem), or with ext4 mounted.
struct Loop {
    dev: PathBuf,
    mnt: Option<PathBuf>,
}

impl Loop {
    fn raw(dir: &Path, mib: usize, seed: u64) -> Self {
        let img = dir.join(format!("loop-{seed}.img"));
        std::fs::write(&img, random_bytes(seed, mib << 20)).unwrap();
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        Loop {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
            mnt: None,
        }
    }

    fn ext4(dir: &Path, mib: u64) -> Self {
        let img = dir.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        let mut l = Loop {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
            mnt: None,
        };
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&l.dev));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run_ok(Command::new("mount").arg(&l.dev).arg(&mnt));
        l.mnt = Some(mnt);
        l
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(m) = &self.mnt {
            let _ = Command::new("fsfreeze").arg("-u").arg(m).output();
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn uninstall(agent: &Agent) -> std::process::Output {
    Command::new(&agent.exe)
        .args(["uninstall", "--stop-timeout", "30", "--state-dir"])
        .arg(&agent.state)
        .output()
        .expect("run rehost-agent uninstall")
}

fn instances(machine: &str) -> Vec<String> {
    std::fs::read_dir("/sys/kernel/tracing/instances")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("rehost-{machine}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// `rehost-agent status` as an operator reads it, from the agent's own binary.
fn human_status(agent: &Agent) -> String {
    text(&run_ok(
        Command::new(&agent.exe)
            .args(["status", "--state-dir"])
            .arg(&agent.state),
    ))
}

/// An agent installed (not started) for `device` under `name`, and its machine id.
fn installed(
    server: &Server,
    token: &str,
    dir: &Path,
    device: &Path,
    name: &str,
) -> (Agent, String) {
    let agent = Agent::new(dir, name);
    let out = agent.install(server, token, &[device], name);
    assert!(out.status.success(), "{}", text(&out));
    let mid = agent.state_json()["machine_id"]
        .as_str()
        .unwrap()
        .to_string();
    (agent, mid)
}

/// The agent's status once it shows its disk continuous (the status file is written once a
/// second, so it can lag the server's view).
fn continuous(agent: &Agent) -> serde_json::Value {
    wait_until(
        "the agent's status to show its disk continuous",
        LIMIT,
        || {
            let st = agent.status();
            (st["disks"][0]["state"] == "continuous").then_some(st)
        },
    )
}

#[test]
fn uninstall_leaves_nothing_behind_and_the_server_shows_why() {
    if !require_root("uninstall of an agent tracking a loop device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let disk = Loop::raw(dir.path(), 16, 31);
    let (mut agent, mid) = installed(&server, &token, dir.path(), &disk.dev, "to-remove");
    let _cleanup = TraceCleanup(Some(mid.clone()));
    agent.run(&[]);
    let (_, did) = wait_replicated(&server, &disk.dev, LIMIT);
    let st = continuous(&agent);
    assert_eq!(st["disks"][0]["tracker"], "tracepoint", "{st}");
    assert_eq!(instances(&mid).len(), 1, "the agent's trace instance");
    let pid = agent.pid().unwrap();

    // Another machine's trace instance on this host is not touched.
    let other = "/sys/kernel/tracing/instances/rehost-m-00000000000000aa-1";
    std::fs::create_dir(other).unwrap();
    let _other_cleanup = TraceCleanup(Some("m-00000000000000aa".into()));

    let out = uninstall(&agent);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for line in [
        format!("Stopped the agent (pid {pid})"),
        "Told the server".into(),
        format!("Removed the kernel trace instance /sys/kernel/tracing/instances/rehost-{mid}-"),
        format!(
            "Removed {} (agent state and credential)",
            agent.state.display()
        ),
        "The rehost agent is uninstalled.".into(),
    ] {
        assert!(said.contains(&line), "missing {line:?} in:\n{said}");
    }
    // No process, no trace instance of this machine, no state.
    let gone = agent.wait(Duration::from_secs(5));
    assert!(
        gone.success(),
        "the agent stopped cleanly on SIGTERM: {gone}"
    );
    assert!(instances(&mid).is_empty(), "{:?}", instances(&mid));
    assert!(
        Path::new(other).is_dir(),
        "another machine's instance stays"
    );
    assert!(!agent.state.exists());
    // The server keeps the replica and shows why the machine is disconnected.
    let m = server.machine(&mid);
    assert_eq!(m["connected"], false, "{m}");
    assert_eq!(m["disconnected_reason"], "agent uninstalled", "{m}");
    assert_eq!(m["disks"][0]["state"], "disconnected", "{m}");
    assert!(server.volume(&mid, did).exists());
    let human = server.ok(&["machines"]);
    assert!(human.contains("agent uninstalled"), "{human}");

    // Again: nothing to do, and it says so.
    let out = uninstall(&agent);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Nothing to remove"), "{}", text(&out));
}

#[test]
fn a_freeze_in_progress_blocks_uninstall_and_its_guard_outlives_a_stop() {
    if !require_root("freezing a loop-mounted ext4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Loop::ext4(dir.path(), 64);
    let mnt = fs.mnt.clone().unwrap();
    let state = dir.path().join("agent-state");
    std::fs::create_dir_all(&state).unwrap();
    let marker = state.join("freeze.json");
    // What the agent does for an app-consistent point: start the guard, then freeze.
    let mut guard = Command::new(bin("rehost-agent"))
        .args(["thaw-guard", "--max-ms", "120000", "--marker"])
        .arg(&marker)
        .arg("--")
        .arg(&mnt)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(guard.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    run_ok(Command::new("fsfreeze").arg("-f").arg(&mnt));

    let mut agent = Agent::new(dir.path(), "f");
    agent.state = state.clone();
    let out = uninstall(&agent);
    assert!(!out.status.success(), "refused while frozen");
    assert!(
        text(&out).contains("a filesystem freeze is in progress"),
        "{}",
        text(&out)
    );
    assert!(state.exists());

    // A service stop signals the guard too (systemd's default KillMode): it stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guard.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        guard.try_wait().unwrap().is_none(),
        "the thaw guard must outlive SIGTERM"
    );
    // The agent goes away (its pipe closes): the guard thaws, removes its marker and ends.
    drop(guard.stdin.take());
    let st = wait_until("the guard to end", Duration::from_secs(10), || {
        guard.try_wait().unwrap()
    });
    assert!(st.success(), "{st}");
    let again = Command::new("fsfreeze")
        .arg("-u")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "the guard thawed the filesystem, so it cannot be thawed again"
    );
    assert!(!marker.exists());
    std::fs::write(mnt.join("after"), b"writable").unwrap();

    let out = uninstall(&agent);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!state.exists());
}

/// Builds the agent again with a newer version stamp, in a target dir of its own (kept between
/// runs, so only the first build is slow).
fn newer_agent() -> (PathBuf, String) {
    let v: Vec<u64> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    let newer = format!("{}.{}.{}", v[0], v[1], v[2] + 1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = root.join("target").join("upgrade-test");
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--offline",
            "--locked",
            "-p",
            "rehost-agent",
            "--bin",
            "rehost-agent",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env("REHOST_AGENT_VERSION", &newer)
        .current_dir(root)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "build the newer agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (target.join("debug").join("rehost-agent"), newer)
}

#[test]
fn an_upgraded_agent_resumes_without_a_rescan() {
    if !require_root("upgrading an agent tracking a loop device") {
        return;
    }
    let (new_exe, newer) = newer_agent();
    let v = run_ok(Command::new(&new_exe).arg("--version"));
    assert!(String::from_utf8_lossy(&v.stdout).contains(&newer));

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let disk = Loop::raw(dir.path(), 16, 32);
    let (mut agent, mid) = installed(&server, &token, dir.path(), &disk.dev, "to-upgrade");
    let _cleanup = TraceCleanup(Some(mid.clone()));
    agent.run(&[]);
    wait_replicated(&server, &disk.dev, LIMIT);
    assert_eq!(
        server.machine(&mid)["agent_version"],
        env!("CARGO_PKG_VERSION")
    );
    // A clean stop, as a service stop or the installer's restart makes; the disk changes while
    // no agent runs (the kernel trace instance keeps recording).
    agent.kill(Signal::SIGTERM);
    write_at(&disk.dev, 5 << 20, &random_bytes(33, 1 << 20));

    // The newer installer over the running installation: same machine, no registration.
    agent.exe = new_exe;
    let out = agent.install(&server, &token, &[&disk.dev], "to-upgrade");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Upgrading in place"), "{}", text(&out));
    assert_eq!(agent.state_json()["machine_id"], mid.as_str());
    agent.run(&[]);
    wait_replicated(&server, &disk.dev, LIMIT);
    let st = continuous(&agent);
    assert_eq!(st["agent_version"], newer.as_str(), "{st}");
    assert_eq!(
        st["disks"][0]["start"]["kind"], "resume",
        "no rescan after an upgrade: {st}"
    );
    assert_eq!(
        st["disks"][0]["last_rescan"],
        serde_json::Value::Null,
        "{st}"
    );
    assert_eq!(server.machine(&mid)["agent_version"], newer.as_str());
    let table = server.ok(&["machines"]);
    assert!(
        table.contains(&format!("agent {newer} connected from")),
        "{table}"
    );
    let human = human_status(&agent);
    assert!(human.contains(&format!("agent {newer}")), "{human}");
    // A newer agent is not "outdated"; the machines count is unchanged.
    let outdated = server.ok(&["machines", "--outdated", "--json"]);
    assert!(!outdated.contains(&mid), "{outdated}");
    assert_eq!(server.machines()["machines"].as_array().unwrap().len(), 1);
}

#[test]
fn the_service_unit_passes_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = run_ok(
        Command::new(bin("rehost-agent"))
            .args(["service-unit", "--binary"])
            .arg(bin("rehost-agent"))
            .arg("--state-dir")
            .arg(&state),
    );
    let unit = String::from_utf8(out.stdout).unwrap();
    for line in [
        "KillMode=mixed",
        "Restart=on-failure",
        "RestartPreventExitStatus=3",
        "LimitNOFILE=65536",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        &format!("ReadWritePaths={}", state.display()),
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in:\n{unit}");
    }
    let path = dir.path().join("rehost-agent.service");
    std::fs::write(&path, &unit).unwrap();
    let Ok(verify) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing and CI=true (scripts/install-deps.sh installs systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    let sec = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let report = text(&sec);
    let level: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for rehost-agent.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(
        level <= 6.5,
        "exposure {level} (it was 9.6 before the hardening options):\n{report}"
    );
}

#[test]
fn after_its_replication_ends_the_agent_offers_to_uninstall_and_can() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    std::fs::write(&img, random_bytes(34, 4 << 20)).unwrap();
    let (mut agent, mid) = installed(&server, &token, dir.path(), &img, "old-source");
    agent.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    // The operator ends this machine's replication (as a cutover does): the agent is refused,
    // stops with the status a restart cannot fix, and says what to do.
    server.ok(&["mark", &mid, "archived"]);
    let st = agent.wait(LIMIT);
    assert_eq!(st.code(), Some(3), "{st}");
    let status = agent.status();
    let offer = status["uninstall_offer"].as_str().unwrap_or_default();
    assert!(
        offer.contains("is archived") && offer.contains("rehost-agent uninstall"),
        "{status}"
    );
    let human = human_status(&agent);
    assert!(human.contains("replication ended:"), "{human}");
    let out = uninstall(&agent);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Told the server"), "{}", text(&out));
    assert!(!agent.state.exists());
    let m = server.machine(&mid);
    assert_eq!(m["lifecycle"], "archived", "{m}");
    assert_eq!(m["disconnected_reason"], "agent uninstalled", "{m}");
}

#[test]
fn uninstall_is_safe_on_a_half_installed_machine() {
    let dir = tempfile::tempdir().unwrap();
    // An install that stopped after creating its state dir, with a damaged state file.
    let mut agent = Agent::new(dir.path(), "half");
    std::fs::create_dir_all(&agent.state).unwrap();
    std::fs::write(agent.state.join("agent.json"), b"{\"version\": 1, \"ser").unwrap();
    let out = uninstall(&agent);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("cannot be read"), "{said}");
    assert!(said.contains("Removed"), "{said}");
    assert!(!agent.state.exists());
    // No state dir at all: nothing to do.
    agent.state = dir.path().join("never-installed");
    let out = uninstall(&agent);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Nothing to remove"), "{}", text(&out));
}

/// Kills a child process that a failing test leaves behind.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the unit's `ProtectSystem=strict`, `ReadWritePaths=STATE` and `NoNewPrivileges` leave the
/// agent, made by hand (systemd does not run here): a private mount namespace where `/` is
/// read-only but the state dir, and no_new_privs. The agent must still replicate a mounted disk,
/// track it by tracepoints and freeze it for an app-consistent point (its thaw guard included).
#[test]
fn the_agent_works_in_the_units_sandbox() {
    if !require_root("the agent in a read-only mount namespace") {
        return;
    }
    for tool in ["unshare", "setpriv"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} (util-linux) is missing"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let fs = Loop::ext4(dir.path(), 64);
    let (agent, mid) = installed(&server, &token, dir.path(), &fs.dev, "sandboxed");
    let _cleanup = TraceCleanup(Some(mid.clone()));
    let log = std::fs::File::create(dir.path().join("sandboxed.log")).unwrap();
    let script = r#"mount --bind "$STATE" "$STATE" && mount -o remount,bind,ro / &&
        exec setpriv --no-new-privs "$AGENT" run --state-dir "$STATE""#;
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("STATE", &agent.state)
        .env("AGENT", &agent.exe)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    std::fs::write(
        fs.mnt.as_ref().unwrap().join("data"),
        random_bytes(35, 1 << 20),
    )
    .unwrap();
    run_ok(&mut Command::new("sync"));
    // The filesystem stays mounted (to be frozen), so the replica is not compared byte for byte
    // here (continuous.rs does that after unmounting): the initial sync completes and the disk
    // replicates continuously.
    wait_until("the initial sync in the sandbox", LIMIT, || {
        server
            .disk(&fs.dev)
            .filter(|d| d["sync_complete"] == true && d["state"] == "continuous")
    });
    let st = continuous(&agent);
    assert_eq!(st["disks"][0]["tracker"], "tracepoint", "{st}");
    let point = server.snapshot(&mid);
    assert_eq!(
        point["consistency"],
        "app",
        "{point}\n{}",
        std::fs::read_to_string(dir.path().join("sandboxed.log")).unwrap_or_default()
    );
    let mut c = child.0.take().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
    assert!(c.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("sandboxed.log")).unwrap();
    assert!(!log.contains("Read-only file system"), "{log}");
    // The thaw guard removed its freeze marker once the point's freeze ended.
    assert!(!agent.state.join("freeze.json").exists());
}
