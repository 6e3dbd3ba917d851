//! `rehost-flood`: opens many connections to a rehost server's agent port that never log in, and
//! keeps them open (reopening each a moment after the server closes it) until interrupted. For
//! measuring what a pre-login flood costs the server (see `tests/benches/preauth.rs`).
//!
//! ```text
//! rehost-flood --server 127.0.0.1:1500 --data-dir /var/lib/rehost --count 1000 \
//!     --attack frame:2097152:2000000 [--source 127.0.0.2] [--seconds 30]
//! ```
//! Attacks: `idle-tcp` (TCP only), `idle-tls` (TLS handshake, then silence), `frame:DECLARE:SEND`
//! (TLS, a frame length of DECLARE bytes, then SEND bytes of its body, then silence). It prints
//! every second how many connections it holds, and in total how many the server closed.

use std::time::{Duration, Instant};

use rehost_tests::flood::{Attack, Flood};

fn main() {
    let mut server = None;
    let mut data_dir = None;
    let mut count = 1000usize;
    let mut attack = Attack::Frame {
        declare: 2 << 20,
        send: 2_000_000,
    };
    let mut source: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut seconds: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    let usage = "usage: rehost-flood --server ADDR --data-dir DIR [--count N] \
                 [--attack idle-tcp|idle-tls|frame:DECLARE:SEND] [--source IP] [--seconds S]";
    while let Some(a) = args.next() {
        let mut val = || {
            args.next().unwrap_or_else(|| {
                eprintln!("rehost-flood: {a} needs a value\n{usage}");
                std::process::exit(2)
            })
        };
        let bad = |what: &str| -> ! {
            eprintln!("rehost-flood: bad {what}\n{usage}");
            std::process::exit(2)
        };
        match a.as_str() {
            "--server" => server = Some(val()),
            "--data-dir" => data_dir = Some(std::path::PathBuf::from(val())),
            "--count" => count = val().parse().unwrap_or_else(|_| bad("--count")),
            "--attack" => attack = val().parse().unwrap_or_else(|_| bad("--attack")),
            "--source" => source = val().parse().unwrap_or_else(|_| bad("--source")),
            "--seconds" => seconds = Some(val().parse().unwrap_or_else(|_| bad("--seconds"))),
            "--help" | "-h" => {
                println!("{usage}\n\nOpens COUNT connections that never log in and holds them (see the source's docs).");
                return;
            }
            _ => bad(&format!("argument `{a}`")),
        }
    }
    let (Some(server), Some(data_dir)) = (server, data_dir) else {
        eprintln!("rehost-flood: --server and --data-dir are required\n{usage}");
        std::process::exit(2)
    };
    let flood = Flood::start(
        &server,
        source,
        &data_dir,
        count,
        attack,
        Duration::from_millis(500),
    );
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "{:>4}s holding {} delivered {} closed by the server {}",
            start.elapsed().as_secs(),
            flood.holding(),
            flood.delivered(),
            flood.closed()
        );
        if seconds.is_some_and(|s| start.elapsed().as_secs() >= s) {
            break;
        }
    }
}
