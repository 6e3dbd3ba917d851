//! A damaged store chunk never poisons later recovery points: the real server and agent, a byte
//! flipped in a chunk, `snapshot verify` quarantining it, the next `snapshot create` storing it
//! again from the volume (and counting it as added), `snapshot verify --repair` restoring a
//! chunk from the volume or naming the points that stay damaged when the volume's block changed
//! since, and the scheduled scrub (`serve --scrub-interval`) finding and repairing a damaged
//! chunk, with its result in `/metrics`.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rehost_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);
const BS: usize = 65536;

fn ok(server: &Server, args: &[&str]) -> String {
    server.ok(args)
}

fn snapshot(server: &Server, machine: &str) -> Value {
    server.snapshot(machine)
}

fn verify(server: &Server, m: &str, s: &str, repair: bool) -> (bool, String) {
    let mut args = vec!["snapshot", "verify", m, s];
    if repair {
        args.push("--repair");
    }
    let out: Output = server.cli(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "verify {s}{}: {text}",
        if repair { " --repair" } else { "" }
    );
    (out.status.success(), text)
}

fn chunk_path(server: &Server, data: &[u8]) -> (String, PathBuf) {
    let id = blake3::hash(data).to_hex().to_string();
    let p = server.data.join("store/chunks").join(&id[..2]).join(&id);
    (id, p)
}

/// Flips one byte in the middle of the chunk holding `data`; returns its id.
fn flip(server: &Server, data: &[u8]) -> String {
    let (id, p) = chunk_path(server, data);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("open chunk {}: {e}", p.display()));
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 2).unwrap();
    f.write_all_at(&[b[0] ^ 1], len / 2).unwrap();
    id
}

/// The server run by hand on `server`'s data dir and ports with extra flags (`server` itself
/// is stopped meanwhile).
struct Custom(Child);

impl Custom {
    fn start(server: &Server, args: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&server.log)
            .unwrap();
        let child = Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), server.data.as_os_str()])
            .args(["--admin", &server.admin, "serve", "--listen", &server.addr])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until("the server's admin API", Duration::from_secs(30), || {
            server
                .cli(&["token", "list"])
                .status
                .success()
                .then_some(())
        });
        Custom(child)
    }
}

impl Drop for Custom {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_damaged_chunk_is_quarantined_rewritten_repaired_and_scrubbed() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    ok(&server, &["retention", "set", "off"]);
    let token = server.token();
    let img = dir.path().join("d.img");
    let image = random_bytes(33, 4 << 20);
    std::fs::write(&img, &image).unwrap();
    let block = |b: usize| image[b * BS..(b + 1) * BS].to_vec();
    let mut agent = Agent::new(dir.path(), "d");
    assert!(agent
        .install(&server, &token, &[&img], "damage")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, disk) = wait_replicated(&server, &img, LIMIT);
    let s1 = snapshot(&server, &m)["id"].to_string();
    let s2 = snapshot(&server, &m)["id"].to_string();

    // verify finds the flipped chunk, names both points, and quarantines it.
    let c5 = flip(&server, &block(5));
    let (good, text) = verify(&server, &m, &s1, false);
    assert!(!good, "verify fails on damage");
    assert!(text.contains(&format!("DAMAGED chunk {c5}")), "{text}");
    assert!(text.contains(&format!("QUARANTINED chunk {c5}")), "{text}");
    assert!(
        !chunk_path(&server, &block(5)).1.exists(),
        "no longer present"
    );
    assert!(server.data.join("store/quarantine").join(&c5).exists());
    // A second verify says it is quarantined, and does not quarantine it again.
    let (good, text) = verify(&server, &m, &s2, false);
    assert!(
        !good && text.contains("quarantined (found damaged earlier"),
        "{text}"
    );
    assert!(!text.contains("QUARANTINED chunk"), "{text}");

    // The next point stores the chunk again from the volume, counts it, and is whole; so are
    // the older points that share it.
    let s3v = snapshot(&server, &m);
    let s3 = s3v["id"].to_string();
    assert_eq!(s3v["state"], "complete", "{s3v}");
    assert!(
        s3v["bytes_added"].as_u64().unwrap() >= BS as u64,
        "the rewritten chunk is added: {s3v}"
    );
    for s in [&s3, &s1, &s2] {
        let (good, text) = verify(&server, &m, s, false);
        assert!(good && text.contains("OK"), "snapshot {s}: {text}");
    }
    assert!(!server.data.join("store/quarantine").join(&c5).exists());

    // verify --repair restores a damaged chunk from the volume at once.
    let c7 = flip(&server, &block(7));
    let (good, text) = verify(&server, &m, &s1, true);
    assert!(good, "{text}");
    assert!(
        text.contains(&format!(
            "REPAIRED chunk {c7} from {} of {m} at byte {}",
            img.display(),
            7 * BS
        )),
        "{text}"
    );
    assert!(text.contains("OK"), "{text}");
    assert!(verify(&server, &m, &s2, false).0);

    // A block written since its points: the volume no longer has the old chunk, so repair
    // names every point that stays damaged; the next point has the new data and is whole.
    let old9 = block(9);
    let new9 = random_bytes(99, BS);
    write_at(&img, 9 * BS as u64, &new9);
    let vol = server.volume(&m, disk);
    wait_until("block 9 to be replicated", LIMIT, || {
        let f = std::fs::File::open(&vol).ok()?;
        let mut b = vec![0u8; BS];
        f.read_exact_at(&mut b, 9 * BS as u64).ok()?;
        (b == new9).then_some(())
    });
    let c9 = flip(&server, &old9);
    let (good, text) = verify(&server, &m, &s1, true);
    assert!(!good, "{text}");
    assert!(text.contains(&format!("DAMAGED chunk {c9}")), "{text}");
    for s in [&s1, &s2, &s3] {
        assert!(
            text.contains(&format!(
                "STAYS DAMAGED snapshot {s} of {m}: no volume holds chunk {c9}"
            )),
            "snapshot {s}: {text}"
        );
    }
    let s4 = snapshot(&server, &m)["id"].to_string();
    assert!(verify(&server, &m, &s4, false).0);
    // GC keeps what the damaged points use (and the quarantine record of the lost chunk).
    ok(&server, &["gc"]);
    assert!(server.data.join("store/quarantine").join(&c9).exists());
    assert!(verify(&server, &m, &s4, false).0);

    // The scrub finds and repairs a damaged chunk on its own; /metrics shows it.
    server.kill();
    let _scrubbing = Custom::start(&server, &["--scrub-interval", "2s"]);
    let c11 = flip(&server, &block(11));
    let text = wait_until("the scrub to repair the chunk", LIMIT, || {
        let t = server.metrics();
        (metric(&t, "rehost_scrub_chunks_repaired_total")? >= 1).then_some(t)
    });
    eprintln!("{text}");
    assert!(metric(&text, "rehost_scrub_last_run_timestamp_seconds").unwrap() > 0);
    assert_eq!(metric(&text, "rehost_snapshots_damaged"), Some(3), "{text}");
    assert!(
        metric(&text, "rehost_scrub_damaged_chunks").unwrap() >= 1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "rehost_store_quarantined_chunks"),
        Some(1),
        "{text}"
    );
    assert!(
        chunk_path(&server, &block(11)).1.exists(),
        "chunk {c11} is back"
    );
    let log = server.log_text();
    assert!(log.contains("scrub found damage"), "{log}");
    assert!(
        log.contains("damaged chunk restored from the volume"),
        "{log}"
    );
    assert!(verify(&server, &m, &s4, false).0);
    let (good, text) = verify(&server, &m, &s1, false);
    assert!(
        !good && text.contains(&c9) && !text.contains(&c11),
        "{text}"
    );
}

#[test]
fn a_verify_killed_while_quarantining_leaves_every_chunk_either_in_place_or_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    ok(&server, &["retention", "set", "off"]);
    let token = server.token();
    let img = dir.path().join("k.img");
    let image = random_bytes(44, 2 << 20);
    std::fs::write(&img, &image).unwrap();
    let block = |b: usize| image[b * BS..(b + 1) * BS].to_vec();
    let mut agent = Agent::new(dir.path(), "k");
    assert!(agent
        .install(&server, &token, &[&img], "killed")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(&server, &img, LIMIT);
    let s1 = snapshot(&server, &m)["id"].to_string();
    let bad = [flip(&server, &block(2)), flip(&server, &block(3))];

    // The verify aborts right after quarantining the first damaged chunk.
    let out = Command::new(bin("rehost-server"))
        .args(["--data-dir".as_ref(), server.data.as_os_str()])
        .args(["--admin", &server.admin, "snapshot", "verify", &m, &s1])
        .env("REHOST_FAILPOINT", "quarantine-mid-way")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint quarantine-mid-way"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = server.data.join("store/quarantine");
    let moved: Vec<bool> = bad.iter().map(|id| q.join(id).exists()).collect();
    assert_eq!(moved.iter().filter(|m| **m).count(), 1, "{moved:?}");
    for (id, moved) in bad.iter().zip(&moved) {
        let p = server.data.join("store/chunks").join(&id[..2]).join(id);
        assert_eq!(
            p.exists(),
            !moved,
            "chunk {id} is at exactly one of its two names"
        );
    }
    // No partial leftovers in the quarantine; the next verify finishes the job.
    let names: Vec<String> = std::fs::read_dir(&q)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| bad.contains(n)), "{names:?}");
    let (good, text) = verify(&server, &m, &s1, false);
    assert!(!good, "{text}");
    for id in &bad {
        assert!(q.join(id).exists(), "{id} quarantined: {text}");
    }
    // The next point stores both again and every point is whole.
    let s2 = snapshot(&server, &m);
    assert!(s2["bytes_added"].as_u64().unwrap() >= 2 * BS as u64, "{s2}");
    for s in [s1.clone(), s2["id"].to_string()] {
        let (good, text) = verify(&server, &m, &s, false);
        assert!(good, "snapshot {s}: {text}");
    }
}
