//! Connections that never log in (issue 11, findings 2 and 3), against the real server binary:
//! the caps on unauthenticated connections close a flood's surplus at once, the server's memory
//! stays bounded under it, the open-file limit is raised at start, and near that limit the oldest
//! unauthenticated connections are shed so that a real agent still registers and replicates.
//! The flood comes from 127.0.0.2, the agent from 127.0.0.1.

use std::path::Path;
use std::time::{Duration, Instant};

use rehost_tests::flood::{rss_kib, Attack, Flood};
use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);
/// The server's default per-address cap on unauthenticated connections.
const PER_ADDRESS: usize = 64;

fn flood_source() -> std::net::IpAddr {
    "127.0.0.2".parse().unwrap()
}

/// Installs and runs an agent for a fresh 8 MiB image; returns it once the replica is identical,
/// with how long the install took.
fn replicate_one(dir: &Path, server: &Server, name: &str) -> (Agent, Duration) {
    let img = dir.join(format!("{name}.img"));
    mixed_image(&img, 8 << 20, 11);
    let token = server.token();
    let mut agent = Agent::new(dir, name);
    let t = Instant::now();
    let out = agent.install(server, &token, &[&img], name);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "install during the flood failed after {took:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    agent.run(&[]);
    wait_replicated(server, &img, LIMIT);
    (agent, took)
}

fn log_lines(server: &Server, what: &str) -> usize {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

#[test]
fn a_flood_before_login_is_capped_and_an_agent_still_replicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let pid = server.pid().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid).unwrap();

    // 200 connections, each declaring a 64 KiB Hello and sending all of it but a few bytes, then
    // waiting: the most a connection can make the server hold before login.
    let started = Instant::now();
    let flood = Flood::start(
        &server.addr,
        flood_source(),
        &server.data,
        200,
        Attack::Frame {
            declare: 65536,
            send: 65000,
        },
        Duration::from_millis(500),
    );
    wait_until(
        "the flood to fill the per-address cap",
        Duration::from_secs(30),
        || (flood.delivered() >= PER_ADDRESS && flood.closed() >= 200 - PER_ADDRESS).then_some(()),
    );
    let mut peak = idle;
    let mut held = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(pid).unwrap());
        held = held.max(flood.holding());
    }
    eprintln!(
        "idle {idle} KiB, peak under the flood {peak} KiB, held {held}, closed {}",
        flood.closed()
    );
    assert!(
        held <= PER_ADDRESS,
        "{held} unauthenticated connections from one address are open; the cap is {PER_ADDRESS}"
    );
    assert!(
        peak <= idle + (64 << 10),
        "the server grew from {idle} KiB to {peak} KiB under 200 connections that never logged in"
    );

    // A real agent, from another address, registers and replicates while the flood goes on.
    let (_agent, took) = replicate_one(dir.path(), &server, "during-flood");
    eprintln!("install during the flood took {took:?}");
    assert!(flood.holding() <= PER_ADDRESS);
    let closed = flood.closed();
    drop(flood);

    // Every refusal is not a log line: one per 10 s (and a count of those held back).
    let lines = log_lines(&server, "connection closed at once");
    let budget = started.elapsed().as_secs() as usize / 10 + 2;
    assert!(
        lines >= 1 && lines <= budget,
        "{lines} log lines for {closed} refused connections in {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid).unwrap();
    eprintln!("after the flood: {after} KiB");
}

#[test]
fn the_server_raises_its_open_file_limit_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], Some((256, 4096)));
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", server.pid().unwrap())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
    let log = server.log_text();
    assert!(
        log.lines().any(|l| l.contains("raised the open-file limit")
            && l.contains("from=256")
            && l.contains("to=4096")),
        "{log}"
    );
}

#[test]
fn near_the_open_file_limit_unauthenticated_connections_make_room_for_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    // Caps out of the way: only the open-file limit (256, soft and hard) holds this flood back.
    let server = Server::start_with(
        dir.path(),
        &[
            "--max-unauthenticated",
            "100000",
            "--max-unauthenticated-per-address",
            "100000",
        ],
        Some((256, 256)),
    );
    let flood = Flood::start(
        &server.addr,
        flood_source(),
        &server.data,
        400,
        Attack::IdleTcp,
        Duration::from_millis(500),
    );
    // Idle connections would stay 15 s (the handshake timeout); these are shed long before.
    wait_until(
        "the server to shed idle connections",
        Duration::from_secs(12),
        || (flood.closed() >= 100).then_some(()),
    );
    let (_agent, took) = replicate_one(dir.path(), &server, "near-fd-limit");
    eprintln!(
        "install near the open-file limit took {took:?}; the flood was closed {} times",
        flood.closed()
    );
    // The logged-in agent is never shed: it stays connected while the flood goes on.
    std::thread::sleep(Duration::from_secs(3));
    let m = server.machines();
    assert_eq!(m["machines"][0]["connected"], true, "{m}");
    drop(flood);
    let log = server.log_text();
    assert!(
        log.contains("closing the oldest connections that have not logged in"),
        "{log}"
    );
    // Two sessions: the install's and the running agent's, never shed and reconnected.
    assert_eq!(log_lines(&server, "agent connected"), 2, "{log}");
}

/// Issue 12: a peer that hangs up without a TLS close_notify is at most a DEBUG line.
#[test]
fn a_peer_closing_without_close_notify_is_not_a_warning() {
    use rehost_agent::conn::{connect, handshake};
    use rehost_proto::msg::{Auth, DiskInfo, Hello};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let img = dir.path().join("src.img");
    mixed_image(&img, 1 << 20, 3);
    let agent = Agent::new(dir.path(), "a");
    assert!(agent
        .install(&server, &server.token(), &[&img], "no-close-notify")
        .status
        .success());
    let s = agent.state_json();
    let hex32 = |v: &serde_json::Value| -> [u8; 32] {
        let v = v.as_str().unwrap();
        (0..32)
            .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap()
    };
    let before = log_lines(&server, "agent disconnected");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tls = connect(&server.addr, hex32(&s["server_pin"]))
            .await
            .unwrap();
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "test".into(),
            detach: None,
            auth: Auth::Machine {
                machine_id: rehost_proto::MachineId::parse(s["machine_id"].as_str().unwrap())
                    .unwrap(),
                secret: hex32(&s["machine_secret"]),
            },
            disks: vec![DiskInfo {
                device: img.display().to_string(),
                size_bytes: 1 << 20,
            }],
        };
        handshake(&mut tls, hello).await.unwrap();
        // TCP FIN with no close_notify before it, then read until the server hangs up too.
        let (mut tcp, _) = tls.into_inner();
        tcp.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink)).await;
    });
    wait_until("the server to see the agent go", LIMIT, || {
        (log_lines(&server, "agent disconnected") > before).then_some(())
    });
    let log = server.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("close_notify") && (l.contains("WARN") || l.contains("ERROR"))),
        "{log}"
    );
}
