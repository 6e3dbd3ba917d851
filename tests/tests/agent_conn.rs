//! The agent's connection under faults: a relay between agent and server that stops forwarding
//! without closing (the agent must notice, say `stalled` and why, reconnect and finish), and an
//! agent pointed at the admin port (it must say so).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A TCP relay on 127.0.0.1 in front of the server. Once armed, it stops forwarding (in both
/// directions, on every connection, new ones too) as soon as `freeze_after` bytes went from an
/// agent to the server on one connection; it keeps every socket open meanwhile, as a stuck proxy
/// or a dead link does. `thaw` makes it forward again.
struct Relay {
    addr: String,
    frozen: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    frozen_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Relay {
    fn start(server: &str, freeze_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let relay = Relay {
            addr,
            frozen: Arc::new(AtomicBool::new(false)),
            armed: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(AtomicUsize::new(0)),
            frozen_at: Arc::new(std::sync::Mutex::new(None)),
        };
        let (frozen, armed, conns, at) = (
            relay.frozen.clone(),
            relay.armed.clone(),
            relay.connections.clone(),
            relay.frozen_at.clone(),
        );
        let server = server.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(&server) else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let up_bytes = Arc::new(AtomicU64::new(0));
                let trigger = Trigger {
                    frozen: frozen.clone(),
                    armed: armed.clone(),
                    at: at.clone(),
                    bytes: up_bytes,
                    after: freeze_after,
                };
                pump(
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    frozen.clone(),
                    Some(trigger),
                );
                pump(upstream, client, frozen.clone(), None);
            }
        });
        relay
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Stops forwarding now.
    fn freeze(&self) {
        *self.frozen_at.lock().unwrap() = Some(Instant::now());
        self.frozen.store(true, Ordering::SeqCst);
    }

    fn thaw(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
    }
}

struct Trigger {
    frozen: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
    at: Arc<std::sync::Mutex<Option<Instant>>>,
    bytes: Arc<AtomicU64>,
    after: u64,
}

/// Copies `from` to `to` on a thread; holds what it read while `frozen`.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>, trigger: Option<Trigger>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(t) = &trigger {
                let total = t.bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if t.armed.load(Ordering::SeqCst)
                    && total >= t.after
                    && !t.frozen.swap(true, Ordering::SeqCst)
                {
                    *t.at.lock().unwrap() = Some(Instant::now());
                }
            }
            while frozen.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// `rehost-agent install` against `addr` (the relay, or any port).
fn install_via(
    agent: &Agent,
    addr: &str,
    token: &str,
    img: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new(bin("rehost-agent"))
        .args(["install", "--server", addr, "--token", token, "--devices"])
        .arg(img)
        .args([
            "--no-prompt",
            "--no-service",
            "--hostname",
            "conn-test",
            "--state-dir",
        ])
        .arg(&agent.state)
        .output()
        .expect("run rehost-agent install")
}

#[test]
fn a_relay_that_stops_forwarding_mid_sync_is_reported_stalled_and_the_agent_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    std::fs::write(&img, random_bytes(11, 48 << 20)).unwrap();

    // Install and run through the relay, so the agent's state names the relay as its server.
    let relay = Relay::start(&server.addr, 4 << 20);
    let agent = Agent::new(dir.path(), "a");
    let out = install_via(&agent, &relay.addr, &token, &img);
    assert!(
        out.status.success(),
        "install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut agent = agent;
    relay.arm();
    let stall_timeout = 4;
    agent.run(&[
        "--keepalive",
        "1",
        "--stall-timeout",
        &stall_timeout.to_string(),
    ]);

    // The relay freezes after 4 MiB of the initial sync; the agent must say so and why.
    let start = Instant::now();
    let st = loop {
        let st = agent.status();
        let frozen = relay.frozen_at.lock().unwrap().is_some();
        if frozen && st["disks"][0]["state"] == "stalled" {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no stall reported (relay frozen: {frozen}): {st}\nagent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let frozen_at = relay.frozen_at.lock().unwrap().expect("frozen");
    let detected_after = frozen_at.elapsed();
    let reason = st["stall"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("no acknowledgement from the server for"),
        "the stall names its reason: {st}"
    );
    assert!(
        detected_after < Duration::from_secs(stall_timeout + 10),
        "stall noticed only after {detected_after:?} (timeout {stall_timeout} s)"
    );
    let human = std::process::Command::new(bin("rehost-agent"))
        .args(["status", "--state-dir"])
        .arg(&agent.state)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(
        human.contains("stalled: no acknowledgement from the server for"),
        "{human}"
    );
    eprintln!("stall reported {detected_after:?} after the relay froze: {reason}");

    // Traffic flows again: the agent's next connection gets through and the sync finishes.
    relay.thaw();
    wait_replicated(&server, &img, LIMIT);
    // The status file is rewritten every second.
    let st = wait_until("the stall to clear once replicating", LIMIT, || {
        let st = agent.status();
        (st["stall"].is_null() && st["connection"] == "connected").then_some(st)
    });
    assert_eq!(st["last_stall"]["reconnected"], true, "{st}");
    assert!(
        relay.connections.load(Ordering::SeqCst) >= 3,
        "install, the first run connection and a reconnection went through the relay"
    );
    let log = agent.log_text();
    assert!(
        log.contains("connection stalled: no acknowledgement from the server"),
        "the agent log says why it reconnected:\n{log}"
    );

    // Idle (nothing in flight until the next scan pass): the unanswered keepalive tells.
    relay.freeze();
    let start = Instant::now();
    let st = loop {
        let st = agent.status();
        if st["disks"][0]["state"] == "stalled" {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no idle stall reported: {st}\nagent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let idle_after = relay.frozen_at.lock().unwrap().expect("frozen").elapsed();
    assert!(
        st["stall"]
            .as_str()
            .is_some_and(|r| r.contains("no answer to keepalives from the server")),
        "{st}"
    );
    eprintln!(
        "idle stall reported {idle_after:?} after the relay froze: {}",
        st["stall"]
    );
    relay.thaw();
    wait_until("the agent to reconnect after the idle stall", LIMIT, || {
        let st = agent.status();
        (st["stall"].is_null() && st["connection"] == "connected").then_some(())
    });
    wait_replicated(&server, &img, LIMIT);
}

#[test]
fn an_agent_pointed_at_the_admin_port_says_it_is_not_a_replication_port() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    std::fs::write(&img, random_bytes(3, 1 << 20)).unwrap();
    let want = "is not a rehost replication port: it answers in HTTP (is it the admin port? the replication port defaults to 1500)";

    let agent = Agent::new(dir.path(), "a");
    let out = install_via(&agent, &server.admin, &token, &img);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "install against the admin port must fail"
    );
    assert!(
        stderr.contains(want),
        "install says what the port is: {stderr}"
    );

    // A daemon whose state names the admin port stops with the same words.
    let out = install_via(&agent, &server.addr, &token, &img);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = agent.state.join("agent.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["server"] = server.admin.clone().into();
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let mut agent = agent;
    agent.run(&[]);
    let st = agent.wait(Duration::from_secs(60));
    assert!(!st.success(), "a wrong port is not retried forever");
    let log = agent.log_text();
    assert!(log.contains(want), "{log}");
}
