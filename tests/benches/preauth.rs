//! Pre-login flood benchmark (issue 11, not run in CI): the server's resident memory while 1,000
//! connections that never log in are held open, and after they close.
//!
//! ```text
//! cargo build --release -p rehost-server -p rehost-tests --bins
//! cargo bench -p rehost-tests --bench preauth
//! REHOST_BENCH_CONNS=600 cargo bench -p rehost-tests --bench preauth
//! ```
//! For each attack it starts a fresh release server twice: with the pre-login caps lifted to the
//! flood's size (so every connection is admitted: the cost of one connection times 1,000), and
//! with the default caps. It prints idle RSS, the peak RSS sampled while the flood holds its
//! connections (before the server's 15 s handshake timeout closes them), and RSS 5 s after the
//! flood has closed them. The flood comes from 127.0.0.2 (one address).

use std::time::{Duration, Instant};

use rehost_tests::flood::{rss_kib, Attack, Flood};
use rehost_tests::*;

struct Row {
    idle: u64,
    peak: u64,
    held: usize,
    closed: usize,
    after: u64,
}

fn measure(conns: usize, attack: Attack, caps: Option<usize>) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let caps_s = caps.map(|c| c.to_string());
    let args: Vec<&str> = match &caps_s {
        Some(c) => vec![
            "--max-unauthenticated",
            c,
            "--max-unauthenticated-per-address",
            c,
        ],
        None => vec![],
    };
    let server = Server::start_with(dir.path(), &args, None);
    let pid = server.pid().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(pid).unwrap();
    let mut flood = Flood::start(
        &server.addr,
        "127.0.0.2".parse().unwrap(),
        &server.data,
        conns,
        attack,
        Duration::from_millis(500),
    );
    let start = Instant::now();
    let (mut peak, mut held) = (idle, 0);
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(rss_kib(pid).unwrap());
        held = held.max(flood.holding());
    }
    let closed = flood.closed();
    flood.stop();
    std::thread::sleep(Duration::from_secs(5));
    let after = rss_kib(pid).unwrap();
    Row {
        idle,
        peak,
        held,
        closed,
        after,
    }
}

fn main() {
    let conns: usize = std::env::var("REHOST_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let attacks = [
        (
            "2 MiB length + 2 MB",
            Attack::Frame {
                declare: 2 << 20,
                send: 2_000_000,
            },
        ),
        (
            "64 KiB hello, all but 1 byte",
            Attack::Frame {
                declare: 65536,
                send: 65535,
            },
        ),
        ("TLS, then silence", Attack::IdleTls),
        ("TCP, then silence", Attack::IdleTcp),
    ];
    println!("{conns} connections from 127.0.0.2; RSS in MiB");
    println!(
        "{:<30} {:<16} {:>6} {:>6} {:>7} {:>6} {:>8} {:>9}",
        "attack", "caps", "idle", "peak", "+peak", "after", "held max", "closed"
    );
    for (name, attack) in attacks {
        for caps in [Some(conns), None] {
            let r = measure(conns, attack, caps);
            let mib = |k: u64| k as f64 / 1024.0;
            println!(
                "{:<30} {:<16} {:>6.1} {:>6.1} {:>7.1} {:>6.1} {:>8} {:>9}",
                name,
                if caps.is_some() {
                    "lifted to flood"
                } else {
                    "default"
                },
                mib(r.idle),
                mib(r.peak),
                mib(r.peak.saturating_sub(r.idle)),
                mib(r.after),
                r.held,
                r.closed
            );
        }
    }
}
