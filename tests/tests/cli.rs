//! The operator's command line against the real server and agent: output people can read (dates,
//! not `@1796180312`; `2.0 GiB`, not byte counts), safe defaults (no silent overwrite, no
//! relative target dir, a clear word before the server ever ran), and a quiet end when the reader
//! of a listing goes away (`token list | head -3`).

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

fn text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `@` followed by a digit: how epoch seconds used to be printed.
fn has_epoch(s: &str) -> bool {
    s.as_bytes()
        .windows(2)
        .any(|w| w[0] == b'@' && w[1].is_ascii_digit())
}

/// A local date-time `YYYY-MM-DD HH:MM:SS` somewhere in `s`.
fn has_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(19).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
    })
}

/// Runs `cmd` with its stdout a pipe whose reading end is already closed, so that its first
/// write fails with EPIPE; returns how it ended and what it said on stderr.
fn into_closed_pipe(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = cmd
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run the command");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_quiet_end(what: &str, (status, stderr): (std::process::ExitStatus, String)) {
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{what} into a closed pipe ended with {status}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{what} into a closed pipe: {stderr}"
    );
}

#[test]
fn listings_show_dates_and_sizes_and_end_quietly_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    text(&server.cli(&["token", "create", "--expires", "7d", "--description", "x"]));
    let img = dir.path().join("source.img");
    mixed_image(&img, 24 << 20, 3);
    let mut agent = Agent::new(dir.path(), "a");
    text(&agent.install(&server, &token, &[&img], "cli-host"));
    agent.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    text(&server.cli(&["snapshot", "create", "cli-host", "--wait"]));

    let machines = text(&server.cli(&["machines"]));
    assert!(machines.contains("24.0 MiB"), "{machines}");
    assert!(!has_epoch(&machines), "{machines}");
    let tokens = text(&server.cli(&["token", "list"]));
    assert!(
        has_datetime(&tokens) && !has_epoch(&tokens) && tokens.contains("never"),
        "{tokens}"
    );
    let snaps = text(&server.cli(&["snapshots", "cli-host"]));
    assert!(has_datetime(&snaps) && !has_epoch(&snaps), "{snaps}");
    assert!(snaps.contains(" B") || snaps.contains("iB"), "{snaps}");
    let history = text(&server.cli(&["machine", "history", "cli-host"]));
    assert!(
        has_datetime(&history)
            && !has_epoch(&history)
            && history.contains("not-ready -> ready-for-testing"),
        "{history}"
    );
    // --json keeps the raw numbers.
    let m = server.machines();
    assert_eq!(m["machines"][0]["disks"][0]["size_bytes"], 24 << 20);
    assert!(m["machines"][0]["last_seen"].is_i64() || m["machines"][0]["last_seen"].is_null());

    // A disconnected machine says since when, in words.
    agent.kill(nix::sys::signal::Signal::SIGTERM);
    let since = wait_until("the machine to show disconnected", LIMIT, || {
        let t = text(&server.cli(&["machines"]));
        t.contains("disconnected since").then_some(t)
    });
    assert!(
        has_datetime(&since)
            && (since.contains(" ago)") || since.contains("(just now)"))
            && !has_epoch(&since),
        "{since}"
    );

    // Listings whose reader went away end quietly: no panic, no error message.
    for args in [
        &["token", "list"][..],
        &["machines"],
        &["snapshots", "cli-host"],
        &["machine", "history", "cli-host"],
    ] {
        assert_quiet_end(
            &args.join(" "),
            into_closed_pipe(
                Command::new(bin("rehost-server"))
                    .arg("--data-dir")
                    .arg(&server.data)
                    .args(["--admin", &server.admin])
                    .args(args),
            ),
        );
    }
    assert_quiet_end(
        "rehost-agent checksum",
        into_closed_pipe(Command::new(bin("rehost-agent")).arg("checksum").arg(&img)),
    );
    assert_quiet_end(
        "rehost-agent status",
        into_closed_pipe(
            Command::new(bin("rehost-agent"))
                .args(["status", "--state-dir"])
                .arg(&agent.state),
        ),
    );
}

#[test]
fn export_does_not_overwrite_and_target_dirs_are_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("source.img");
    mixed_image(&img, 8 << 20, 5);
    let mut agent = Agent::new(dir.path(), "a");
    text(&agent.install(&server, &token, &[&img], "cli-export"));
    agent.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    text(&server.cli(&["snapshot", "create", "cli-export", "--wait"]));

    let out = dir.path().join("export.raw");
    std::fs::write(&out, b"precious").unwrap();
    let export = |force: bool| {
        let mut a = vec!["snapshot", "export", "cli-export", "latest", "--output"];
        let o = out.to_str().unwrap();
        a.push(o);
        if force {
            a.push("--force");
        }
        server.cli(&a)
    };
    let err = refused(&export(false));
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    text(&export(true));
    assert_eq!(file_hash(&out), file_hash(&img));

    let err = refused(&server.cli(&["blueprint", "set", "cli-export", "--target-dir", "rel/dir"]));
    assert!(
        err.contains("relative") && err.contains("absolute"),
        "{err}"
    );
    let bp: serde_json::Value = serde_json::from_str(&text(&server.cli(&[
        "blueprint",
        "show",
        "cli-export",
        "--json",
    ])))
    .unwrap();
    assert!(bp["blueprint"]["target_dir"].is_null(), "{bp}");
}

#[test]
fn operator_commands_before_the_server_ever_ran_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-served");
    for args in [
        &["token", "list"][..],
        &["machines"],
        &[
            "snapshot",
            "export",
            "m",
            "latest",
            "--output",
            "/nonexistent/x",
        ],
    ] {
        let out = Command::new(bin("rehost-server"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .args(args)
            .output()
            .unwrap();
        let err = refused(&out);
        assert!(
            err.contains(&data.display().to_string())
                && err.contains("has `rehost-server serve` run with this --data-dir?"),
            "{}: {err}",
            args.join(" ")
        );
    }
    assert!(!Path::new(&data).exists(), "nothing is created");
}

#[test]
fn the_converter_ends_quietly_on_a_closed_pipe_and_releases_its_loop_device() {
    if !require_root("the converter's manifest (loop device, mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    for i in 0..200 {
        std::fs::write(files.join(format!("etc/f{i}")), format!("{i}\n")).unwrap();
    }
    let img = dir.path().join("plain.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&files)
            .arg(&img)
            .arg("32M"),
    );
    assert_quiet_end(
        "rehost-converter manifest",
        into_closed_pipe(
            Command::new(bin("rehost-converter"))
                .arg("--work-dir")
                .arg(dir.path())
                .arg("manifest")
                .arg(&img),
        ),
    );
    let loops = text(
        Command::new("losetup")
            .arg("-j")
            .arg(&img)
            .output()
            .as_ref()
            .unwrap(),
    );
    assert!(loops.trim().is_empty(), "left attached: {loops}");
}
