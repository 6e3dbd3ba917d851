//! End-to-end recovery points: the real `rehost-server` and `rehost-agent` binaries, snapshots
//! taken while the agent streams changes, exports compared byte for byte with copies of the
//! source saved at the same points, dedup between machines, SIGKILL (failpoints) during snapshot
//! creation and GC, and verify finding a flipped byte.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rehost_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);
const BS: u64 = 65536;

/// The server run by hand on `server`'s data dir and ports, with extra flags and environment
/// (failpoints); `server` itself must be stopped meanwhile.
struct Custom(Option<Child>);

impl Custom {
    fn start(server: &Server, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .unwrap();
        let child = Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), server.data.as_os_str()])
            .args(["--admin", &server.admin, "serve", "--listen", &server.addr])
            .args(args)
            .envs(env.iter().copied())
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
        Custom(Some(child))
    }

    /// Waits for the process to end on its own (a failpoint abort).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.0.take().unwrap();
        wait_until("the server to abort at its failpoint", LIMIT, || {
            c.try_wait().unwrap()
        })
    }
}

impl Drop for Custom {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ok(server: &Server, args: &[&str]) -> String {
    server.ok(args)
}

fn snapshot(server: &Server, machine: &str) -> Value {
    server.snapshot(machine)
}

fn snapshots(server: &Server, machine: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&ok(server, &["snapshots", machine, "--json"])).unwrap();
    v["snapshots"].as_array().unwrap().clone()
}

/// Exports to `out`, overwriting it (`--force`): the tests reuse one output file.
fn export(server: &Server, machine: &str, id: &str, disk: &Path, out: &Path) {
    ok(
        server,
        &[
            "snapshot",
            "export",
            machine,
            id,
            "--disk",
            &disk.display().to_string(),
            "--output",
            &out.display().to_string(),
            "--force",
        ],
    );
}

fn copy(src: &Path, to: &Path) -> PathBuf {
    std::fs::copy(src, to).unwrap();
    to.to_path_buf()
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn store_bytes(server: &Server) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        let m = e.metadata().unwrap();
                        if m.is_dir() {
                            walk(&e.path())
                        } else {
                            m.len()
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&server.data.join("store"))
}

/// Starts a server whose scheduler takes no points (the tests take them by hand).
fn quiet_server(dir: &Path) -> Server {
    let server = Server::start(dir);
    ok(&server, &["retention", "set", "off"]);
    server
}

#[test]
fn snapshots_taken_while_changes_stream_in_match_the_stream_point() {
    let dir = tempfile::tempdir().unwrap();
    let server = quiet_server(dir.path());
    let token = server.token();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, random_bytes(1, (20 << 20) + 1000)).unwrap();
    mixed_image(&b, 9 << 20, 2);
    let mut agent = Agent::new(dir.path(), "s");
    assert!(agent
        .install(&server, &token, &[&a, &b], "snap-stream")
        .status
        .success());
    // 40 Mbit/s: a 16 MiB change takes about 3 s to stream, so a snapshot lands in the middle.
    agent.run(&["--scan-interval", "1", "--max-mbps", "40"]);
    // No recovery point before the initial sync is complete.
    let early = server.cli(&["snapshot", "create", "snap-stream", "--wait"]);
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("has not finished its initial sync"),
        "{early:?}"
    );
    let (m, _) = wait_replicated(&server, &a, LIMIT);
    wait_replicated(&server, &b, LIMIT);

    let s0 = snapshot(&server, &m);
    assert_eq!(s0["state"], "complete");
    assert_eq!(
        s0["disks"].as_array().unwrap().len(),
        2,
        "a snapshot covers all of the machine's disks"
    );
    let (a0, b0) = (
        copy(&a, &dir.path().join("a0")),
        copy(&b, &dir.path().join("b0")),
    );

    // A 16 MiB change on disk a and a small one on disk b, then a snapshot while it streams.
    let region = (2u64 << 20, 18u64 << 20);
    write_at(
        &a,
        region.0,
        &random_bytes(99, (region.1 - region.0) as usize),
    );
    write_at(&b, 3 << 20, b"changed on disk b");
    let (a1, b1) = (
        copy(&a, &dir.path().join("a1")),
        copy(&b, &dir.path().join("b1")),
    );
    let vol = server.volume(&m, s0["disks"][0]["disk_id"].as_u64().unwrap());
    let first_new =
        std::fs::read(&a1).unwrap()[region.0 as usize..(region.0 + BS) as usize].to_vec();
    wait_until("the change to start arriving", LIMIT, || {
        let mut buf = vec![0u8; BS as usize];
        std::fs::File::open(&vol)
            .unwrap()
            .read_exact_at(&mut buf, region.0)
            .ok()?;
        (buf == first_new).then_some(())
    });
    // A point where the stream stands, without the agent's drain: mid-change.
    let s1: Value = serde_json::from_str(&ok(
        &server,
        &[
            "snapshot",
            "create",
            &m,
            "--wait",
            "--json",
            "--stream-point",
        ],
    ))
    .unwrap();
    wait_replicated(&server, &a, LIMIT);
    wait_replicated(&server, &b, LIMIT);
    let s2 = snapshot(&server, &m);

    let out = |name: &str| dir.path().join(name);
    for (s, img, want) in [
        (&s0, &a, &a0),
        (&s0, &b, &b0),
        (&s2, &a, &a1),
        (&s2, &b, &b1),
    ] {
        let id = s["id"].to_string();
        export(&server, &m, &id, img, &out("x"));
        assert!(
            same(&out("x"), want),
            "snapshot {id} of {} differs from the source at that point",
            img.display()
        );
    }
    // The mid-stream snapshot: every block is the old or the new version, and it is neither all old
    // nor all new (it really was taken while the change streamed in).
    export(&server, &m, &s1["id"].to_string(), &a, &out("mid"));
    let (mid, old, new) = (
        std::fs::read(out("mid")).unwrap(),
        std::fs::read(&a0).unwrap(),
        std::fs::read(&a1).unwrap(),
    );
    assert_eq!(mid.len(), old.len());
    let (mut n_old, mut n_new) = (0, 0);
    for (i, blk) in mid.chunks(BS as usize).enumerate() {
        let r = i * BS as usize..(i * BS as usize + blk.len());
        if blk == &new[r.clone()] {
            n_new += 1;
        } else {
            assert_eq!(
                blk, &old[r],
                "block {i} of the mid-stream snapshot is neither the old nor the new data"
            );
            n_old += 1;
        }
    }
    let changed = ((region.1 - region.0) / BS) as usize;
    let total = mid.len().div_ceil(BS as usize);
    assert!(
        n_new >= 1 && n_old > total - changed,
        "mid-stream snapshot: {n_new} new, {n_old} old blocks"
    );
    eprintln!("mid-stream snapshot: {n_new} of {changed} changed blocks had arrived");

    // Incremental: the snapshot after the change stored about the changed data, not the disk.
    let added = s2["bytes_added"].as_u64().unwrap() + s1["bytes_added"].as_u64().unwrap();
    assert!(
        added <= (region.1 - region.0) + 3 * BS + 8 * 33_000,
        "added {added} bytes for a 16 MiB change"
    );
    let log = server.log_text();
    let pauses: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replication stream paused"))
        .filter_map(|l| l.split("pause_ms=").nth(1)?.split_whitespace().next())
        .collect();
    eprintln!("replication stream pauses (ms) for the 3 snapshots: {pauses:?}");
    assert!(
        log.contains("replication stream paused for a recovery point") && log.contains("pause_ms"),
        "pause is logged"
    );

    // Selection by hostname and `latest`, and qcow2 output when qemu-img is there.
    let latest = out("latest");
    export(&server, "snap-stream", "latest", &a, &latest);
    assert!(same(&latest, &a1));
    if Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let q = out("a.qcow2");
        ok(
            &server,
            &[
                "snapshot",
                "export",
                &m,
                "latest",
                "--disk",
                &a.display().to_string(),
                "--output",
                &q.display().to_string(),
                "--format",
                "qcow2",
            ],
        );
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&q)
                .arg(out("back.raw")),
        );
        // qcow2 sizes are whole 512-byte sectors: the same bytes, then zero padding.
        let (back, want) = (
            std::fs::read(out("back.raw")).unwrap(),
            std::fs::read(&a1).unwrap(),
        );
        assert_eq!(back.len(), want.len().div_ceil(512) * 512);
        assert!(
            back[..want.len()] == want[..] && back[want.len()..].iter().all(|&x| x == 0),
            "qcow2 export converts back"
        );
    }
}

#[test]
fn identical_machines_share_chunks_and_snapshots_are_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let server = quiet_server(dir.path());
    let token = server.token();
    let (a, b) = (dir.path().join("one.img"), dir.path().join("two.img"));
    std::fs::write(&a, random_bytes(5, 12 << 20)).unwrap();
    std::fs::copy(&a, &b).unwrap();
    let (mut ag1, mut ag2) = (Agent::new(dir.path(), "one"), Agent::new(dir.path(), "two"));
    assert!(ag1
        .install(&server, &token, &[&a], "dedup-one")
        .status
        .success());
    assert!(ag2
        .install(&server, &token, &[&b], "dedup-two")
        .status
        .success());
    ag1.run(&["--scan-interval", "1"]);
    ag2.run(&["--scan-interval", "1"]);
    let (m1, _) = wait_replicated(&server, &a, LIMIT);
    let (m2, _) = wait_replicated(&server, &b, LIMIT);
    assert_ne!(m1, m2);

    let s1 = snapshot(&server, "dedup-one");
    let after1 = store_bytes(&server);
    assert!(
        s1["bytes_added"].as_u64().unwrap() >= 12 << 20,
        "the first snapshot stores the disk: {s1}"
    );
    let s2 = snapshot(&server, "dedup-two");
    let after2 = store_bytes(&server);
    eprintln!("store after machine one: {after1} bytes; after machine two: {after2}");
    assert_eq!(
        s2["bytes_added"], 0,
        "identical data, pages and roots are all shared: {s2}"
    );
    assert_eq!(after2, after1);

    // A few changed blocks cost about their size.
    ag1.kill(nix::sys::signal::Signal::SIGTERM);
    wait_until("machine one to be disconnected", LIMIT, || {
        (server.disk(&a)?["state"] == "disconnected").then_some(())
    });
    // Without a session the snapshot is taken from the volumes; nothing changed, nothing added.
    let offline = snapshot(&server, &m1);
    assert_eq!(offline["bytes_added"], 0, "{offline}");
    for (i, off) in [0u64, 5 << 20, (12 << 20) - 10].iter().enumerate() {
        write_at(&a, *off, &random_bytes(50 + i as u64, 10));
    }
    ag1.run(&["--scan-interval", "1"]);
    wait_replicated(&server, &a, LIMIT);
    let s3 = snapshot(&server, &m1);
    let added = s3["bytes_added"].as_u64().unwrap();
    eprintln!("3 changed blocks added {added} bytes");
    assert!(
        (3 * BS..=3 * (BS + 200) + 33_000 + 1000).contains(&added),
        "3 changed blocks added {added} bytes"
    );

    let text = server.metrics();
    assert!(
        text.contains(&format!("rehost_recovery_points{{machine=\"{m1}\"}} 3")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "rehost_recovery_point_age_seconds{{machine=\"{m2}\"}}"
        )),
        "{text}"
    );

    let x = dir.path().join("x");
    export(&server, &m2, &s2["id"].to_string(), &b, &x);
    assert!(same(&x, &b));
    export(&server, &m1, &s1["id"].to_string(), &a, &x);
    assert!(
        same(&x, &b),
        "machine one's first snapshot is the original data"
    );
    export(&server, &m1, &offline["id"].to_string(), &a, &x);
    assert!(
        same(&x, &b),
        "the offline snapshot is the replica as the agent left it"
    );
    export(&server, &m1, &s3["id"].to_string(), &a, &x);
    assert!(same(&x, &a));
}

#[test]
fn sigkill_during_snapshot_and_gc_keeps_finished_snapshots_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = quiet_server(dir.path());
    let token = server.token();
    let img = dir.path().join("c.img");
    mixed_image(&img, (16 << 20) + 333, 4);
    let mut agent = Agent::new(dir.path(), "c");
    assert!(agent
        .install(&server, &token, &[&img], "crash")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(&server, &img, LIMIT);
    let s1 = snapshot(&server, &m)["id"].to_string();
    let c1 = copy(&img, &dir.path().join("c1"));
    write_at(&img, 1 << 20, &random_bytes(7, 300_000));
    wait_replicated(&server, &img, LIMIT);
    let s2 = snapshot(&server, &m)["id"].to_string();
    let c2 = copy(&img, &dir.path().join("c2"));
    write_at(&img, 9 << 20, &random_bytes(8, 200_000));
    wait_replicated(&server, &img, LIMIT);

    // SIGKILL-equivalent (abort) after the snapshot's objects are durable, before it is complete.
    server.kill();
    let mut crashing = Custom::start(
        &server,
        &[],
        &[("REHOST_FAILPOINT", "snapshot-after-chunks")],
    );
    let out = server.cli(&["snapshot", "create", &m, "--wait"]);
    assert!(
        !out.status.success(),
        "the server must abort mid-snapshot: failpoints exist in debug builds \
         (or with the `failpoints` feature)"
    );
    assert!(!crashing.wait_exit().success());
    assert!(
        server
            .log_text()
            .contains("failpoint snapshot-after-chunks"),
        "server built with failpoints"
    );
    server.restart();
    let list = snapshots(&server, &m);
    let ids: Vec<String> = list.iter().map(|s| s["id"].to_string()).collect();
    assert_eq!(
        ids,
        [s1.clone(), s2.clone()],
        "the unfinished snapshot is absent: {list:?}"
    );
    assert!(list.iter().all(|s| s["state"] == "complete"));
    let x = dir.path().join("x");
    export(&server, &m, &s1, &img, &x);
    assert!(same(&x, &c1));
    export(&server, &m, &s2, &img, &x);
    assert!(same(&x, &c2));
    let s3 = snapshot(&server, &m)["id"].to_string();
    let c3 = copy(&img, &dir.path().join("c3"));

    // Abort in the middle of the sweep that follows deleting s1.
    server.kill();
    let mut crashing = Custom::start(
        &server,
        &["--snapshot-tick", "0"],
        &[("REHOST_FAILPOINT", "gc-mid-sweep")],
    );
    let _ = server.cli(&["snapshot", "delete", &m, &s1]);
    assert!(!crashing.wait_exit().success());
    assert!(server.log_text().contains("failpoint gc-mid-sweep"));
    // Without the scheduler, whose first round would finish the GC before we look.
    let _after = Custom::start(&server, &["--snapshot-tick", "0"], &[]);
    let ids: Vec<String> = snapshots(&server, &m)
        .iter()
        .map(|s| s["id"].to_string())
        .collect();
    assert_eq!(ids, [s2.clone(), s3.clone()]);
    for (s, want) in [(&s2, &c2), (&s3, &c3)] {
        export(&server, &m, s, &img, &x);
        assert!(same(&x, want), "snapshot {s} after a GC crash");
        assert!(ok(&server, &["snapshot", "verify", &m, s]).contains("OK"));
    }
    let gc: Value = serde_json::from_str(&ok(&server, &["gc", "--json"])).unwrap();
    eprintln!("gc after the crash: {gc}");
    assert!(
        gc["removed_objects"].as_u64() >= Some(1),
        "the crashed sweep left work for this one: {gc}"
    );
    for (s, want) in [(&s2, &c2), (&s3, &c3)] {
        export(&server, &m, s, &img, &x);
        assert!(same(&x, want), "snapshot {s} after GC finished");
    }
    // Nothing unreferenced is left: a second GC removes nothing.
    let again: Value = serde_json::from_str(&ok(&server, &["gc", "--json"])).unwrap();
    assert_eq!(again["removed_objects"], 0, "{again}");
}

#[test]
fn verify_finds_a_flipped_byte_and_names_the_affected_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let server = quiet_server(dir.path());
    let token = server.token();
    let img = dir.path().join("v.img");
    std::fs::write(&img, random_bytes(21, 6 << 20)).unwrap();
    let mut agent = Agent::new(dir.path(), "v");
    assert!(agent
        .install(&server, &token, &[&img], "verify")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(&server, &img, LIMIT);
    let s1 = snapshot(&server, &m)["id"].to_string();
    let s2 = snapshot(&server, &m)["id"].to_string();
    assert!(ok(&server, &["snapshot", "verify", &m, &s1]).contains("OK"));

    // Flip one byte in the chunk of block 5 (shared by both snapshots).
    let data = std::fs::read(&img).unwrap();
    let id = blake3::hash(&data[5 * BS as usize..6 * BS as usize])
        .to_hex()
        .to_string();
    let chunk = server.data.join("store/chunks").join(&id[..2]).join(&id);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&chunk)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, len / 2).unwrap();
    f.write_all_at(&[byte[0] ^ 1], len / 2).unwrap();

    let out = server.cli(&["snapshot", "verify", &m, &s1]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(!out.status.success(), "verify must fail on damage");
    assert!(text.contains(&format!("DAMAGED chunk {id}")), "{text}");
    assert!(text.contains("checksum"), "{text}");
    let range = format!("bytes {}..{}", 5 * BS, 6 * BS);
    for s in [&s1, &s2] {
        assert!(
            text.contains(&format!(
                "snapshot {s} of {m} disk {} {range}",
                img.display()
            )),
            "{text}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let bad = server.cli(&[
        "snapshot",
        "export",
        &m,
        &s2,
        "--output",
        &dir.path().join("x").display().to_string(),
    ]);
    assert!(!bad.status.success(), "export refuses damaged data");
    assert!(String::from_utf8_lossy(&bad.stderr).contains(&id));
}

#[test]
fn scheduler_takes_points_and_expires_them_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let token = server.token();
    ok(&server, &["retention", "set", "2s:4s"]);
    assert!(ok(&server, &["retention", "show"]).contains("2s:4s (server)"));
    let img = dir.path().join("r.img");
    mixed_image(&img, 4 << 20, 9);
    let mut agent = Agent::new(dir.path(), "r");
    assert!(agent
        .install(&server, &token, &[&img], "sched")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(&server, &img, LIMIT);
    server.kill();
    let _fast = Custom::start(&server, &["--snapshot-tick", "1"], &[]);
    let list = wait_until("old scheduled points to expire", LIMIT, || {
        let l = snapshots(&server, &m);
        (l.first().is_some_and(|s| s["id"].as_i64() > Some(2)) && l.len() >= 2).then_some(l)
    });
    assert!(
        list.iter()
            .all(|s| s["reason"] == "scheduled" && s["consistency"] == "crash"),
        "{list:?}"
    );
    assert!(
        list.len() <= 4,
        "2s:4s keeps at most 3 points plus the newest: {list:?}"
    );
    // A per-machine override turns them off for that machine.
    assert!(
        ok(&server, &["retention", "set", "off", "--machine", "sched"]).contains("off (machine)")
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = snapshots(&server, &m).last().unwrap()["id"].clone();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        snapshots(&server, &m).last().unwrap()["id"],
        before,
        "no new point with retention off"
    );
}

#[test]
fn sigkill_at_any_moment_of_snapshot_creation_leaves_only_whole_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = quiet_server(dir.path());
    let token = server.token();
    let img = dir.path().join("k.img");
    std::fs::write(&img, random_bytes(31, 40 << 20)).unwrap();
    let mut agent = Agent::new(dir.path(), "k");
    assert!(agent
        .install(&server, &token, &[&img], "kill")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(&server, &img, LIMIT);
    // Snapshot id -> the source as it was when that snapshot was requested.
    let mut expected: Vec<(String, PathBuf)> = Vec::new();
    let mut seen = 0;
    for round in 0..5u64 {
        write_at(
            &img,
            (round * 7 + 1) << 20,
            &random_bytes(100 + round, 12 << 20),
        );
        wait_replicated(&server, &img, LIMIT);
        let copy_path = copy(&img, &dir.path().join(format!("k{round}")));
        let mut req = Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), server.data.as_os_str()])
            .args(["--admin", &server.admin, "snapshot", "create", &m, "--wait"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // From "just requested" to "done": the kill lands in every phase over the rounds.
        // The last round kills only once the snapshot is reported complete.
        let delay = [30, 250, 600, 1200, 0][round as usize];
        if delay == 0 {
            assert!(
                req.wait().unwrap().success(),
                "round {round}: snapshot without a kill"
            );
        }
        std::thread::sleep(Duration::from_millis(delay));
        server.kill();
        let _ = req.wait();
        server.restart();
        let list = snapshots(&server, &m);
        assert!(
            list.iter().all(|s| s["state"] == "complete"),
            "round {round}: {list:?}"
        );
        assert!(
            list.len() >= seen && list.len() <= seen + 1,
            "round {round}: {list:?}"
        );
        if list.len() == seen + 1 {
            expected.push((list[seen]["id"].to_string(), copy_path));
        }
        seen = list.len();
        let x = dir.path().join("x");
        for (id, want) in &expected {
            export(&server, &m, id, &img, &x);
            assert!(same(&x, want), "round {round}: snapshot {id} after SIGKILL");
        }
        eprintln!("round {round}: killed {delay} ms after the request (0: once complete); {seen} complete snapshots");
    }
    assert!(
        !expected.is_empty() && expected.len() < 5,
        "some kills must interrupt a snapshot and some come after one: {seen} of 5 completed"
    );
}
