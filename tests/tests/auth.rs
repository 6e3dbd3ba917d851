//! Who may connect as which machine, with the real binaries: an install token never takes over an
//! existing machine, a revoked machine stays revoked until `machine unrevoke`, a reinstall token
//! works once and only for its machine, a declared disk is capped and its registration leaves
//! nothing behind when its volume cannot be made, a revoked session is told so, and two agents
//! sharing one credential are named on both sides.

use std::path::Path;
use std::time::Duration;

use rehost_agent::conn::{connect, handshake, ConnError};
use rehost_proto::msg::{Auth, DiskInfo, ErrorCode, Hello, Welcome};
use rehost_proto::MachineId;
use rehost_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn hex32(v: &Value) -> [u8; 32] {
    let s = v.as_str().expect("hex string");
    (0..32)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap()
}

/// A hand-made Hello with `agent`'s machine credential and `disks`: the server's Welcome, or its
/// refusal (code, message).
fn hello_as(
    server: &Server,
    agent: &Agent,
    disks: Vec<DiskInfo>,
) -> Result<Welcome, (ErrorCode, String)> {
    let s = agent.state_json();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tls = connect(&server.addr, hex32(&s["server_pin"]))
            .await
            .expect("connect");
        let hello = Hello {
            min_version: 1,
            max_version: rehost_proto::PROTOCOL_VERSION,
            agent_version: "test".into(),
            detach: None,
            auth: Auth::Machine {
                machine_id: MachineId::parse(s["machine_id"].as_str().unwrap()).unwrap(),
                secret: hex32(&s["machine_secret"]),
            },
            disks,
        };
        match handshake(&mut tls, hello).await {
            Ok(w) => Ok(w),
            Err(ConnError::Refused { code, message }) => Err((code, message)),
            Err(e) => panic!("handshake: {e}"),
        }
    })
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn machine_count(server: &Server) -> usize {
    server.machines()["machines"].as_array().unwrap().len()
}

#[test]
fn a_valid_token_and_the_victims_name_make_a_new_machine_and_the_victim_keeps_replicating() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let (img_v, img_x) = (dir.path().join("v.img"), dir.path().join("x.img"));
    mixed_image(&img_v, 4 << 20, 1);
    mixed_image(&img_x, 4 << 20, 2);
    let mut victim = Agent::new(dir.path(), "victim");
    assert!(victim
        .install(&server, &token, &[&img_v], "web-1")
        .status
        .success());
    victim.run(&[]);
    let (vid, _) = wait_replicated(&server, &img_v, LIMIT);

    // Same host (so the same /etc/machine-id), same hostname: the same source id as the victim.
    let attacker = Agent::new(dir.path(), "attacker");
    let out = attacker.install(&server, &token, &[&img_x], "web-1");
    assert!(out.status.success(), "{}", text(&out));
    let xid = attacker.state_json()["machine_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(xid, vid, "the attacker must not get the victim's machine");
    assert_eq!(machine_count(&server), 2);
    let x = server.machine(&xid);
    assert_eq!(x["duplicate_of"], vid.as_str());
    assert_eq!(x["disks"].as_array().unwrap().len(), 1);
    assert_eq!(
        server.machine(&vid)["disks"].as_array().unwrap().len(),
        1,
        "the attacker's disk is not added to the victim"
    );
    let listing = text(&server.cli(&["machines"]));
    assert!(
        listing.contains(&format!("duplicate of {vid}")),
        "{listing}"
    );
    assert!(server.log_text().contains(&format!("duplicate of {vid}")));

    // The victim is not cut off: a new write still reaches its replica.
    write_at(&img_v, 1 << 20, &random_bytes(77, 256 << 10));
    wait_replicated(&server, &img_v, LIMIT);
    assert!(!victim.log_text().contains("wrong credential"));
    assert_eq!(victim.status()["connection"], "connected");
}

#[test]
fn a_revoked_machine_stays_revoked_until_unrevoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("a.img");
    mixed_image(&img, 4 << 20, 3);
    let mut a = Agent::new(dir.path(), "a");
    assert!(a.install(&server, &token, &[&img], "db-1").status.success());
    a.run(&[]);
    let (mid, _) = wait_replicated(&server, &img, LIMIT);

    // Revoking kicks the live session, which is told why; the agent stops.
    assert!(server.cli(&["machine", "revoke", &mid]).status.success());
    assert!(!a.wait(LIMIT).success());
    let log = a.log_text();
    assert!(log.contains("revoked by the operator"), "{log}");
    assert!(!log.contains("replaced by a newer connection"), "{log}");
    let st = a.status();
    assert_eq!(st["connection"], "failed");
    assert!(st["last_error"].as_str().unwrap().contains("revoked"));

    // Installing again over its state dir uses its own credential: refused, still revoked.
    let out = a.install(&server, &token, &[&img], "db-1");
    assert!(!out.status.success());
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    // A fresh install with a valid token and the same name is a new machine; the old stays revoked.
    let fresh = Agent::new(dir.path(), "fresh");
    assert!(fresh
        .install(&server, &token, &[&img], "db-1")
        .status
        .success());
    assert_ne!(fresh.state_json()["machine_id"], mid.as_str());
    assert_eq!(server.machine(&mid)["revoked"], true);
    // A reinstall token for a revoked machine is refused with the way out.
    let out = server.cli(&["token", "create", "--reinstall", &mid]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unrevoke"), "{}", text(&out));

    // The operator un-revokes: the agent connects again with the credential it has.
    let out = server.cli(&["machine", "unrevoke", &mid]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unrevoked"));
    assert_eq!(server.machine(&mid)["revoked"], false);
    a.run(&[]);
    write_at(&img, 0, &random_bytes(5, 64 << 10));
    wait_replicated(&server, &img, LIMIT);
    // The agent writes its status file once a second: the replica can converge before the
    // restarted agent's first status write says more than "connecting".
    wait_until("the agent's status to say connected", LIMIT, || {
        (a.status()["connection"] == "connected").then_some(())
    });
}

#[test]
fn a_reinstall_token_works_once_and_only_for_its_machine() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    mixed_image(&img_a, 4 << 20, 4);
    mixed_image(&img_b, 4 << 20, 5);
    let mut a = Agent::new(dir.path(), "a");
    let mut b = Agent::new(dir.path(), "b");
    assert!(a
        .install(&server, &token, &[&img_a], "app-a")
        .status
        .success());
    assert!(b
        .install(&server, &token, &[&img_b], "app-b")
        .status
        .success());
    a.run(&[]);
    let (ma, da) = wait_replicated(&server, &img_a, LIMIT);
    a.kill(nix::sys::signal::Signal::SIGTERM);
    let mb = b.state_json()["machine_id"].as_str().unwrap().to_string();

    // Installing over an intact state dir with the same disks replaces the agent in place: the
    // same machine, its own credential, no new registration.
    let out = a.install(&server, &token, &[&img_a], "app-a");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Upgrading in place"), "{}", text(&out));
    assert_eq!(a.state_json()["machine_id"], ma.as_str());
    assert_eq!(machine_count(&server), 2);

    // The state dir is lost: the operator's reinstall token re-registers machine A, keeping its
    // id and disk, even when the installer claims B's name.
    let out = server.cli(&["token", "create", "--reinstall", &ma]);
    assert!(out.status.success(), "{}", text(&out));
    let reinstall = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut a2 = Agent::new(dir.path(), "a2");
    let out = a2.install(&server, &reinstall, &[&img_a], "app-b");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(a2.state_json()["machine_id"], ma.as_str());
    assert_eq!(machine_count(&server), 2);
    let disks = server.machine(&ma)["disks"].clone();
    assert_eq!(disks.as_array().unwrap().len(), 1);
    assert_eq!(disks[0]["disk_id"], da);
    assert_eq!(disks[0]["sync_complete"], true, "the replica is kept");
    assert!(server.log_text().contains("reinstall token"));

    // Used once.
    let again = Agent::new(dir.path(), "again");
    let out = again.install(&server, &reinstall, &[&img_a], "app-a");
    assert!(!out.status.success());
    assert!(text(&out).contains("already used"), "{}", text(&out));
    assert_eq!(machine_count(&server), 2);
    let list = text(&server.cli(&["token", "list"]));
    assert!(
        list.lines()
            .any(|l| l.contains(" used ") && l.contains(&format!("reinstall {ma}"))),
        "{list}"
    );

    // A's old credential is replaced; the new agent replicates A; B is untouched.
    a.run(&[]);
    assert!(!a.wait(LIMIT).success());
    assert!(a.log_text().contains("wrong credential"));
    a2.run(&[]);
    write_at(&img_a, 2 << 20, &random_bytes(9, 128 << 10));
    wait_replicated(&server, &img_a, LIMIT);
    b.run(&[]);
    let (got_b, _) = wait_replicated(&server, &img_b, LIMIT);
    assert_eq!(got_b, mb);
}

#[test]
fn declared_disks_are_capped_and_a_failed_volume_leaves_no_row_and_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("a.img");
    mixed_image(&img, 4 << 20, 6);
    let a = Agent::new(dir.path(), "a");
    assert!(a
        .install(&server, &token, &[&img], "big-1")
        .status
        .success());
    let mid = a.state_json()["machine_id"].as_str().unwrap().to_string();
    let first = server.machine(&mid)["disks"][0]["disk_id"]
        .as_u64()
        .unwrap();
    let own = DiskInfo {
        device: img.display().to_string(),
        size_bytes: 4 << 20,
    };
    let extra = |size: u64| DiskInfo {
        device: "/dev/extra".into(),
        size_bytes: size,
    };

    // Over the default cap of 64 TiB: refused, nothing recorded.
    let (code, msg) = hello_as(&server, &a, vec![own.clone(), extra(1 << 50)]).unwrap_err();
    assert_eq!(code, ErrorCode::OutOfRange, "{msg}");
    assert!(msg.contains("max-disk-size"), "{msg}");
    assert_eq!(server.machine(&mid)["disks"].as_array().unwrap().len(), 1);

    // A volume that cannot be made (its index path is taken by a directory): no row, no file.
    let next = first + 1;
    let vol = server.volume(&mid, next);
    let idx = vol.with_extension("idx");
    std::fs::create_dir_all(&idx).unwrap();
    let (code, msg) = hello_as(&server, &a, vec![own.clone(), extra(1 << 20)]).unwrap_err();
    assert_eq!(code, ErrorCode::Internal, "{msg}");
    assert!(msg.contains("staging volume"), "{msg}");
    assert_eq!(server.machine(&mid)["disks"].as_array().unwrap().len(), 1);
    assert!(!vol.exists(), "{} is left behind", vol.display());
    assert!(
        server.volume(&mid, first).exists(),
        "the existing disk's volume stays"
    );

    // Once the obstacle is gone the same disk registers normally.
    std::fs::remove_dir(&idx).unwrap();
    let w = hello_as(&server, &a, vec![own, extra(1 << 20)]).expect("welcome");
    assert_eq!(w.disks.len(), 2);
    assert_eq!(server.machine(&mid)["disks"].as_array().unwrap().len(), 2);
    assert!(vol.exists() && idx.is_file());
}

#[test]
fn two_agents_sharing_one_credential_are_named_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let img = dir.path().join("a.img");
    mixed_image(&img, 4 << 20, 7);
    let mut a = Agent::new(dir.path(), "a");
    assert!(a.install(&server, &token, &[&img], "twin").status.success());
    a.run(&[]);
    wait_replicated(&server, &img, LIMIT);
    // A copy of A's state dir: a second agent with the same credential.
    let mut b = Agent::new(dir.path(), "b");
    copy_dir(&a.state, &b.state);
    b.run(&[]);

    let needle = rehost_proto::msg::SHARED_CREDENTIAL;
    wait_until("the server to warn of a shared credential", LIMIT, || {
        server.log_text().contains(needle).then_some(())
    });
    let conflict = |agent: &Agent| {
        agent.status()["credential_conflict"]["message"]
            .as_str()
            .filter(|m| m.contains(&format!("{needle} from 127.0.0.1:")))
            .map(str::to_string)
    };
    let ma = wait_until("agent a to report the conflict", LIMIT, || conflict(&a));
    let mb = wait_until("agent b to report the conflict", LIMIT, || conflict(&b));
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(needle)),
        "{log}"
    );
    let shown = String::from_utf8_lossy(
        &std::process::Command::new(bin("rehost-agent"))
            .args(["status", "--state-dir"])
            .arg(&a.state)
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(shown.contains(needle), "{shown}");
    eprintln!("agent a: {ma}\nagent b: {mb}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
