//! Harness for the end-to-end tests: starts the real `rehost-server` and `rehost-agent` binaries
//! (built by `cargo build --workspace --bins`, which `./test.sh` runs first) on 127.0.0.1 with free ports,
//! drives them through their command lines, and builds test disk images.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub mod flood;
pub mod loopfs;
pub mod partitions;
pub mod pins;

/// Path of a workspace binary: target/<profile>/NAME, next to target/<profile>/deps/<test>.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`), or run ./test.sh",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Polls `f` until it returns Some, or panics after `limit` with `what`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stop(child: &mut Option<Child>, signal: nix::sys::signal::Signal) {
    if let Some(mut c) = child.take() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        let _ = c.wait();
    }
}

pub struct Server {
    child: Option<Child>,
    pub data: PathBuf,
    pub addr: String,
    pub admin: String,
    pub log: PathBuf,
    /// Extra `serve` arguments, and the open-file limit (soft, hard) the server starts under.
    serve_args: Vec<String>,
    nofile: Option<(u64, u64)>,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[], None)
    }

    /// [`Server::start`] with extra `serve` arguments and, if given, the open-file limit
    /// (soft, hard) the process starts under.
    pub fn start_with(dir: &Path, serve_args: &[&str], nofile: Option<(u64, u64)>) -> Self {
        let mut s = Server {
            child: None,
            data: dir.join("server"),
            addr: format!("127.0.0.1:{}", free_port()),
            admin: format!("127.0.0.1:{}", free_port()),
            log: dir.join("server.log"),
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            nofile,
        };
        s.spawn();
        s
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let mut cmd = Command::new(bin("rehost-server"));
        cmd.args(["--data-dir".as_ref(), self.data.as_os_str()])
            .args(["--admin", &self.admin, "serve", "--listen", &self.addr])
            .args(&self.serve_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((soft, hard)) = self.nofile {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits; `lim`
            // is a plain value moved into the closure.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start rehost-server");
        self.child = Some(child);
        wait_until("the server's admin API", Duration::from_secs(30), || {
            self.cli(&["token", "list"]).status.success().then_some(())
        });
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), self.data.as_os_str()])
            .args(["--admin", &self.admin])
            .args(args)
            .output()
            .expect("run rehost-server")
    }

    /// Runs an operator command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// [`Server::ok`] of a `--json` command: its reply.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Takes a recovery point of `machine` and waits for it; `snapshot create --json`'s reply.
    pub fn snapshot(&self, machine: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["snapshot", "create", machine, "--wait", "--json"]))
            .unwrap()
    }

    pub fn token(&self) -> String {
        let out = self.cli(&["token", "create"]);
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }

    pub fn machines(&self) -> Value {
        let out = self.cli(&["machines", "--json"]);
        assert!(
            out.status.success(),
            "machines: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("machines JSON")
    }

    /// One machine of `machines --json`, by id; panics when it is not listed.
    pub fn machine(&self, id: &str) -> Value {
        self.machines()["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .find(|m| m["machine_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("machine {id} is not listed"))
    }

    /// The JSON of one machine's disk, by device path.
    pub fn disk(&self, device: &Path) -> Option<Value> {
        let m = self.machines();
        let dev = device.display().to_string();
        m["machines"]
            .as_array()?
            .iter()
            .flat_map(|m| m["disks"].as_array().cloned().unwrap_or_default())
            .find(|d| d["device"] == dev.as_str())
    }

    pub fn kill(&mut self) {
        stop(&mut self.child, nix::sys::signal::Signal::SIGKILL);
    }

    /// The Prometheus text of the admin API's `/metrics`, read with the metrics token.
    pub fn metrics(&self) -> String {
        let token =
            std::fs::read_to_string(self.data.join("metrics.token")).expect("metrics token");
        let mut c = std::net::TcpStream::connect(&self.admin).expect("connect to the admin API");
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: rehost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        );
        c.write_all(req.as_bytes())
            .expect("send the metrics request");
        let mut text = String::new();
        c.read_to_string(&mut text).expect("read the metrics");
        text
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The staging volume file of a disk.
    pub fn volume(&self, machine_id: &str, disk_id: u64) -> PathBuf {
        self.data
            .join("volumes")
            .join(machine_id)
            .join(format!("disk-{disk_id}.vol"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Agent {
    child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
    /// The agent binary `install` and `run` start (the workspace's unless a test sets another).
    pub exe: PathBuf,
}

impl Agent {
    pub fn new(dir: &Path, name: &str) -> Self {
        Agent {
            child: None,
            state: dir.join(format!("agent-{name}")),
            log: dir.join(format!("agent-{name}.log")),
            exe: bin("rehost-agent"),
        }
    }

    pub fn install(
        &self,
        server: &Server,
        token: &str,
        devices: &[&Path],
        hostname: &str,
    ) -> Output {
        let devs = devices
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        Command::new(&self.exe)
            .args([
                "install",
                "--server",
                &server.addr,
                "--token",
                token,
                "--devices",
                &devs,
            ])
            .args([
                "--no-prompt",
                "--no-service",
                "--hostname",
                hostname,
                "--state-dir",
            ])
            .arg(&self.state)
            .output()
            .expect("run rehost-agent install")
    }

    /// Starts `rehost-agent run`; its log level is `info`, or `REHOST_TEST_AGENT_LOG` (a
    /// `RUST_LOG` filter such as `rehost_agent=debug`) when a failing test needs more.
    pub fn run(&mut self, extra: &[&str]) {
        self.run_with_env(extra, &[]);
    }

    /// [`Agent::run`] with extra environment variables.
    pub fn run_with_env(&mut self, extra: &[&str], env: &[(&str, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(&self.exe)
            .args(["run", "--state-dir"])
            .arg(&self.state)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("REHOST_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start rehost-agent");
        self.child = Some(child);
    }

    /// The process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn status(&self) -> Value {
        let out = Command::new(bin("rehost-agent"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "agent status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn state_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state.join("agent.json")).expect("agent.json"))
            .expect("agent.json JSON")
    }

    pub fn kill(&mut self, signal: nix::sys::signal::Signal) {
        stop(&mut self.child, signal);
    }

    /// Exit status once the agent ends on its own.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("agent running");
        let st = wait_until("the agent to exit", limit, || {
            c.try_wait().expect("wait agent")
        });
        self.child = None;
        st
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    /// Kills the agent, then removes its machine's kernel trace instances: only once no agent
    /// holds an instance's pipe open can it be removed (a [`TraceCleanup`] dropped before the
    /// agent it covers would fail with EBUSY and leave the instance in the kernel).
    fn drop(&mut self) {
        self.kill(nix::sys::signal::Signal::SIGKILL);
        let machine = std::fs::read(self.state.join("agent.json"))
            .ok()
            .and_then(|raw| serde_json::from_slice::<Value>(&raw).ok())
            .and_then(|v| v["machine_id"].as_str().map(String::from));
        drop(TraceCleanup(machine));
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible for zstd.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image of `size` bytes: random, compressible text and zero regions in turn, so the
/// replication sees every kind of block. `size` need not be a multiple of any block size.
pub fn mixed_image(path: &Path, size: u64, seed: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let region = 8u64 << 20;
    let mut off = 0u64;
    let mut kind = 0u64;
    while off < size {
        let len = region.min(size - off) as usize;
        match kind % 3 {
            0 => f
                .write_all_at(&random_bytes(seed + off, len), off)
                .expect("write"),
            1 => {
                let text: Vec<u8> = format!("rehost block {off} compressible line\n")
                    .bytes()
                    .cycle()
                    .take(len)
                    .collect();
                f.write_all_at(&text, off).expect("write")
            }
            _ => {} // a hole: reads as zeros
        }
        off += len as u64;
        kind += 1;
    }
    f.sync_all().expect("sync image");
}

pub fn file_hash(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Writes `data` at `offset` of an existing file.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

/// Waits until the server shows `device` in continuous replication with a replica identical to
/// the source file, and returns the machine id and disk id.
pub fn wait_replicated(server: &Server, device: &Path, limit: Duration) -> (String, u64) {
    let want = file_hash(device);
    wait_until(
        &format!("{} to be replicated", device.display()),
        limit,
        || {
            let m = server.machines();
            for mm in m["machines"].as_array()? {
                for d in mm["disks"].as_array()? {
                    if d["device"] == device.display().to_string().as_str()
                        && d["sync_complete"] == true
                        && d["state"] == "continuous"
                    {
                        let mid = mm["machine_id"].as_str()?.to_string();
                        let did = d["disk_id"].as_u64()?;
                        if file_hash(&server.volume(&mid, did)) == want {
                            return Some((mid, did));
                        }
                    }
                }
            }
            None
        },
    )
}

/// Whether a test that needs root can run. Without root it prints why it skips; under `CI=true`
/// it fails instead, since CI runs as root and must run every test.
pub fn require_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} needs root, and CI=true: failing instead of skipping"
    );
    eprintln!("SKIPPED: {what} needs root (loop devices, mount, tracefs); run the tests as root");
    false
}

/// Removes the kernel trace instances a test's agent left behind.
pub struct TraceCleanup(pub Option<String>);

impl Drop for TraceCleanup {
    fn drop(&mut self) {
        let Some(machine) = &self.0 else { return };
        let Ok(dir) = std::fs::read_dir("/sys/kernel/tracing/instances") else {
            return;
        };
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("rehost-{machine}-"))
            {
                let _ = std::fs::write(e.path().join("events/block/block_rq_complete/enable"), "0");
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// Writes files with fsync in a loop, and rewrites earlier ones in place, until stopped.
/// Records each fsynced file's content digest.
pub struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(PathBuf, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(dir: &Path) -> Self {
        Self::paced(dir, Duration::from_millis(10))
    }

    /// Like [`Writer::start`], one file every `pace` (a bounded amount of data over a long test).
    pub fn paced(dir: &Path, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (s, d, dir) = (stop.clone(), done.clone(), dir.join("data"));
        std::fs::create_dir_all(&dir).unwrap();
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let len = 4096 + (n as usize * 7919) % (256 << 10);
                let data = random_bytes(n + 1, len);
                // Every fourth write rewrites an earlier file, so blocks get dirty again; at most
                // FILES names (about 20 MiB), so that a long run never fills the filesystem.
                const FILES: u64 = 160;
                let name = if n % 4 == 3 {
                    format!("f-{}", (n / 2) % FILES)
                } else {
                    format!("f-{}", n % FILES)
                };
                let p = dir.join(&name);
                let mut f = std::fs::File::create(&p).unwrap();
                f.write_all(&data).unwrap();
                f.sync_all().unwrap();
                let h = blake3::hash(&data).to_hex().to_string();
                let mut d = d.lock().unwrap();
                d.retain(|(q, _)| q != &p);
                d.push((p, h));
                drop(d);
                n += 1;
                std::thread::sleep(pace);
            }
        });
        Writer {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// The files fsynced so far, each with the digest of its latest content.
    pub fn done(&self) -> Vec<(PathBuf, String)> {
        self.done.lock().unwrap().clone()
    }

    pub fn stop(&mut self) -> Vec<(PathBuf, String)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.done.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    /// Stops the writer and waits for its thread: a write still under way would keep the
    /// filesystem busy for whatever is dropped next (an unmount).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The files of `before` (taken before some point) whose content `after` (taken after it) still
/// shows: not rewritten around the point, so a copy at the point must hold exactly that content.
pub fn unchanged_across(
    before: &[(PathBuf, String)],
    after: &[(PathBuf, String)],
) -> Vec<(PathBuf, String)> {
    before
        .iter()
        .filter(|b| after.contains(b))
        .cloned()
        .collect()
}

/// systemd's `systemctl`, as the agent sees it: a stand-in in `dir/bin` that records what the
/// agent asks for a planned failover in `dir/systemctl.calls` (stopping this host's services or
/// powering it off is not for a test to do), and fails for units named `broken*`. Returns the
/// PATH to run the agent with, and the calls file.
pub fn systemctl_stand_in(dir: &Path) -> (String, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.join("systemctl.calls");
    std::fs::write(
        bin.join("systemctl"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *broken*) echo \"Failed to stop $3: Unit not loaded.\" >&2; exit 5;; esac\n",
            calls.display()
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(bin.join("systemctl")));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, calls)
}

/// Installs an agent for `host` over `devices` and starts it with `env`; returns it, its
/// machine id, and the clean-up of its tracepoints.
pub fn replicate(
    server: &Server,
    dir: &Path,
    host: &str,
    devices: &[&Path],
    env: &[(&str, String)],
) -> (Agent, String, TraceCleanup) {
    let mut agent = Agent::new(dir, host);
    let token = server.token();
    let out = agent.install(server, &token, devices, host);
    assert!(
        out.status.success(),
        "install {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = agent.state_json()["machine_id"]
        .as_str()
        .expect("machine id")
        .to_string();
    let cleanup = TraceCleanup(Some(id.clone()));
    agent.run_with_env(&[], env);
    (agent, id, cleanup)
}

/// An executable hook at `dir/name` that writes its `REHOST_*` environment to `out` (one
/// `K=V` a line, sorted), then runs the shell lines of `then`.
pub fn env_hook(dir: &Path, name: &str, out: &Path, then: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nenv | grep '^REHOST_' | sort > {}\n{then}",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The `K=V` lines an [`env_hook`] wrote.
pub fn env_of(file: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether the group point `group` (`snapshots --plan --json`) holds the snapshot `id`.
pub fn group_holds(group: &Value, id: &Value) -> bool {
    group["snapshots"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["id"] == *id))
}
