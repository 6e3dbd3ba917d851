//! The data dir is private whatever the umask: the real server started under umask 022 and 000
//! replicates, snapshots and exports, and every directory of its data dir is then 0700 and
//! every file 0600 (exports too, unless `--mode` asks otherwise); a data dir made too open is
//! fixed at the next start, with one warning naming how many and an example.
//!
//! One test in its own binary: it sets the process umask, which the server inherits.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

fn ok(server: &Server, args: &[&str]) -> String {
    server.ok(args)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every directory and regular file under `root` (itself included) with its mode.
fn walk(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            out.push((p.clone(), true, m.permissions().mode() & 0o7777));
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        } else if m.is_file() {
            out.push((p, false, m.permissions().mode() & 0o7777));
        }
    }
    out
}

fn assert_private(root: &Path, what: &str) -> usize {
    let all = walk(root);
    let bad: Vec<String> = all
        .iter()
        .filter(|(_, dir, m)| *m != if *dir { 0o700 } else { 0o600 })
        .map(|(p, _, m)| format!("{:04o} {}", m, p.display()))
        .collect();
    assert!(bad.is_empty(), "{what}: too open:\n{}", bad.join("\n"));
    all.len()
}

fn replicate_and_snapshot(dir: &Path, server: &Server) {
    ok(server, &["retention", "set", "off"]);
    let token = server.token();
    let img = dir.join("m.img");
    std::fs::write(&img, random_bytes(5, 3 << 20)).unwrap();
    let mut agent = Agent::new(dir, "m");
    assert!(agent
        .install(server, &token, &[&img], "modes")
        .status
        .success());
    agent.run(&["--scan-interval", "1"]);
    let (m, _) = wait_replicated(server, &img, LIMIT);
    ok(server, &["snapshot", "create", &m, "--wait"]);
    ok(server, &["snapshot", "create", &m, "--wait"]);
    let s = ok(server, &["snapshot", "verify", &m, "latest"]);
    assert!(s.contains("OK"), "{s}");
    let out = dir.join("export.raw");
    ok(
        server,
        &[
            "snapshot",
            "export",
            &m,
            "latest",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(mode(&out), 0o600, "an export is private by default");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let shared = dir.join("export-group.raw");
    ok(
        server,
        &[
            "snapshot",
            "export",
            &m,
            "latest",
            "--output",
            shared.to_str().unwrap(),
            "--mode",
            "0640",
        ],
    );
    assert_eq!(mode(&shared), 0o640, "--mode is what the operator asked");
    ok(server, &["gc"]);
    agent.kill(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn data_dir_is_private_whatever_the_umask_and_a_too_open_one_is_fixed_at_start() {
    for mask in [0o022, 0o000] {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only sets the process's file creation mask; this binary has one test.
        unsafe { libc::umask(mask) };
        let server = Server::start(dir.path());
        replicate_and_snapshot(dir.path(), &server);
        let n = assert_private(&server.data, &format!("umask {mask:03o}"));
        for want in [
            "catalog.sqlite",
            "store/chunks",
            "volumes",
            "ca.key",
            "ca.crt",
        ] {
            assert!(server.data.join(want).exists(), "{want} exists");
        }
        assert!(n > 20, "walked {n} entries");
        assert!(
            !server.log_text().contains("readable by other users"),
            "a fresh data dir needs no fixing"
        );
    }

    // A data dir left too open (an older server, a copy): fixed at start, one warning.
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    replicate_and_snapshot(dir.path(), &server);
    server.kill();
    let all = walk(&server.data);
    for (p, is_dir, _) in &all {
        let m = if *is_dir { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    server.restart();
    assert_private(&server.data, "after the start-up check");
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("readable by other users"))
        .unwrap_or_else(|| panic!("no warning in the server log:\n{log}"));
    assert_eq!(
        log.matches("readable by other users").count(),
        1,
        "warned once: {log}"
    );
    assert!(
        line.contains("fixed=") && line.contains("example="),
        "{line}"
    );
    let fixed: usize = line
        .split("fixed=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        fixed >= all.len() - 2 && fixed <= all.len() + 4,
        "fixed {fixed} of {} entries: {line}",
        all.len()
    );
    // And the server works on it.
    assert!(ok(&server, &["token", "list"]).lines().count() >= 1);
}
