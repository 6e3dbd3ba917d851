//! The agent's life cycle on the server (issue 18), with the real server and a hand-made client
//! speaking the protocol over TLS: an uninstalled agent detaches its machine (recorded, shown by
//! `machines`, in the history, cleared by a reinstall; also for an archived machine, never for a
//! revoked one), `machines --outdated` lists old agents, a version mismatch names the side to
//! upgrade, and `machine delete` removes a machine's volumes, points and rows (the store shrinks,
//! another machine's points still verify) but never under a connected agent.

use rehost_agent::conn::connect;
use rehost_proto::frame::{read_message, write_message};
use rehost_proto::msg::{Auth, DiskInfo, ErrorCode, Hello};
use rehost_proto::token::InstallToken;
use rehost_proto::{MachineId, Message};
use rehost_tests::*;
use serde_json::Value;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A hand-made agent: the server's address and pin, and (once registered) its credential.
struct RawAgent {
    addr: String,
    pin: [u8; 32],
    id: MachineId,
    secret: [u8; 32],
    rt: tokio::runtime::Runtime,
}

fn disk() -> Vec<DiskInfo> {
    vec![DiskInfo {
        device: "/dev/raw-test".into(),
        size_bytes: 1 << 20,
    }]
}

fn hello(auth: Auth, agent_version: &str, detach: Option<&str>, disks: Vec<DiskInfo>) -> Hello {
    Hello {
        min_version: rehost_proto::MIN_PROTOCOL_VERSION,
        max_version: rehost_proto::PROTOCOL_VERSION,
        agent_version: agent_version.into(),
        detach: detach.map(str::to_string),
        auth,
        disks,
    }
}

/// Sends `h` on a new connection; the connection and the server's first answer.
async fn send(addr: &str, pin: [u8; 32], h: Hello) -> (Tls, Message) {
    let mut tls = connect(addr, pin).await.expect("connect");
    write_message(&mut tls, Message::Hello(h))
        .await
        .expect("send hello");
    let reply = read_message(&mut tls)
        .await
        .expect("read the answer")
        .expect("an answer before the close");
    (tls, reply)
}

impl RawAgent {
    /// Registers a new machine with `token` (one disk), as `agent_version`, and hangs up.
    fn register(server: &Server, token: &str, hostname: &str, agent_version: &str) -> Self {
        let t = InstallToken::parse(token).expect("install token");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut source_id = [0u8; 32];
        source_id[..hostname.len()].copy_from_slice(hostname.as_bytes());
        let auth = Auth::Register {
            token_id: t.id,
            token_secret: t.secret,
            hostname: hostname.into(),
            source_id,
        };
        let (_, reply) = rt.block_on(send(
            &server.addr,
            t.server_pin,
            hello(auth, agent_version, None, disk()),
        ));
        let Message::Welcome(w) = reply else {
            panic!("registration answered {reply:?}")
        };
        RawAgent {
            addr: server.addr.clone(),
            pin: t.server_pin,
            id: w.machine_id,
            secret: w.machine_secret.expect("a new machine gets its credential"),
            rt,
        }
    }

    fn auth(&self) -> Auth {
        Auth::Machine {
            machine_id: self.id.clone(),
            secret: self.secret,
        }
    }

    /// A Hello with the machine's credential: the open connection and the first answer.
    fn hello(
        &self,
        agent_version: &str,
        detach: Option<&str>,
        disks: Vec<DiskInfo>,
    ) -> (Tls, Message) {
        self.rt.block_on(send(
            &self.addr,
            self.pin,
            hello(self.auth(), agent_version, detach, disks),
        ))
    }

    /// Detaches as an uninstalled agent does: the server's answer, and whether it then closed.
    fn detach(&self) -> (Message, bool) {
        let (mut tls, reply) = self.hello("0.0.1", Some("agent uninstalled"), Vec::new());
        let closed = self
            .rt
            .block_on(async { matches!(read_message(&mut tls).await, Ok(None) | Err(_)) });
        (reply, closed)
    }

    /// Reads frames of a live session until its Error (the session was ended): its message.
    fn ended(&self, tls: &mut Tls) -> String {
        self.rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    match read_message(tls).await {
                        Ok(Some(Message::Error { message, .. })) => return message,
                        Ok(Some(_)) => continue,
                        other => panic!("session closed without an error: {other:?}"),
                    }
                }
            })
            .await
            .expect("the live session is ended")
        })
    }
}

fn machine(server: &Server, id: &MachineId) -> Value {
    server.machines()["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine_id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("machine {id} is listed"))
}

#[test]
fn an_uninstalled_agent_detaches_its_machine_until_a_reinstall() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let a = RawAgent::register(&server, &server.token(), "web-1", "0.0.1");

    // A live session of the machine (the agent's service) is ended by the detach.
    let (mut live, welcome) = a.hello("0.0.1", None, disk());
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    assert_eq!(machine(&server, &a.id)["connected"], true);

    let (reply, closed) = a.detach();
    assert_eq!(
        reply,
        Message::Detach {
            reason: "agent uninstalled".into()
        }
    );
    assert!(closed, "the server closes after its Detach");
    let why = a.ended(&mut live);
    assert!(
        why.contains("detached by its agent (agent uninstalled)"),
        "{why}"
    );

    let m = wait_until("the detached machine shows disconnected", LIMIT, || {
        let m = machine(&server, &a.id);
        (m["connected"] == false).then_some(m)
    });
    assert_eq!(m["disconnected_reason"], "agent uninstalled");
    assert!(m["detached_at"].as_i64().is_some(), "{m}");
    assert_eq!(m["agent_version"], "0.0.1", "kept while disconnected");
    assert_eq!(m["disks"][0]["state"], "disconnected");
    let table = server.ok(&["machines"]);
    assert!(
        table.contains("agent 0.0.1 disconnected (agent uninstalled) since"),
        "{table}"
    );
    let history = server.ok(&["machine", "history", a.id.as_str()]);
    assert!(history.contains("(agent uninstalled)"), "{history}");
    assert!(server.log_text().contains("agent detached its machine"));

    // The reinstalled agent connects normally: the mark is gone and its version is the new one.
    let (_again, welcome) = a.hello("0.0.2", None, disk());
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    let m = wait_until("the reinstalled agent shows connected", LIMIT, || {
        let m = machine(&server, &a.id);
        (m["connected"] == true).then_some(m)
    });
    assert_eq!(m["disconnected_reason"], Value::Null);
    assert_eq!(m["detached_at"], Value::Null);
    assert_eq!(m["agent_version"], "0.0.2");
}

#[test]
fn an_archived_machine_detaches_and_a_revoked_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let archived = RawAgent::register(&server, &token, "old-1", "0.0.1");
    let revoked = RawAgent::register(&server, &token, "bad-1", "0.0.1");

    server.ok(&["mark", archived.id.as_str(), "archived"]);
    let (_c, normal) = archived.hello("0.0.1", None, disk());
    let Message::Error { code, message } = normal else {
        panic!("{normal:?}")
    };
    assert_eq!(code, ErrorCode::Forbidden);
    assert!(message.contains("is archived"), "{message}");
    let (reply, _) = archived.detach();
    assert_eq!(
        reply,
        Message::Detach {
            reason: "agent uninstalled".into()
        }
    );
    let m = machine(&server, &archived.id);
    assert_eq!(m["disconnected_reason"], "agent uninstalled");
    assert_eq!(
        m["lifecycle"], "archived",
        "a detach leaves the lifecycle alone"
    );

    server.ok(&["machine", "revoke", revoked.id.as_str()]);
    let (reply, _) = revoked.detach();
    let Message::Error { code, message } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(code, ErrorCode::Revoked);
    assert!(message.contains("revoked"), "{message}");
    assert_eq!(
        machine(&server, &revoked.id)["disconnected_reason"],
        Value::Null,
        "a refused detach records nothing"
    );

    // A Detach frame in a live session is still a protocol violation.
    let a = RawAgent::register(&server, &token, "web-2", "0.0.1");
    let (mut live, _) = a.hello("0.0.1", None, disk());
    a.rt.block_on(write_message(
        &mut live,
        Message::Detach {
            reason: "agent uninstalled".into(),
        },
    ))
    .unwrap();
    let why = a.ended(&mut live);
    assert!(why.contains("unexpected detach from an agent"), "{why}");
}

#[test]
fn outdated_lists_the_machines_whose_agent_is_older_than_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let server_version = server.machines()["server_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!server_version.is_empty());
    let old = RawAgent::register(&server, &token, "old-1", "0.0.1");
    let current = RawAgent::register(&server, &token, "new-1", &server_version);

    let v: Value = serde_json::from_str(&server.ok(&["machines", "--outdated", "--json"])).unwrap();
    let ids: Vec<&str> = v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["machine_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [old.id.as_str()], "{v}");
    assert_eq!(v["machines"][0]["agent_version"], "0.0.1");
    let text = server.ok(&["machines", "--outdated"]);
    assert!(
        text.contains(&format!(
            "{}  old-1  agent 0.0.1 (server {server_version})",
            old.id
        )),
        "{text}"
    );
    assert!(!text.contains(current.id.as_str()), "{text}");
    // Without --outdated, both.
    assert_eq!(server.machines()["machines"].as_array().unwrap().len(), 2);
}

/// A raw Hello with the range `min..=max` (registration with a fresh token): the refusal.
fn version_refusal(server: &Server, min: u32, max: u32) -> (ErrorCode, String) {
    let t = InstallToken::parse(&server.token()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut h = hello(
        Auth::Register {
            token_id: t.id,
            token_secret: t.secret,
            hostname: "v".into(),
            source_id: [7; 32],
        },
        "9.9.9",
        None,
        disk(),
    );
    (h.min_version, h.max_version) = (min, max);
    match rt.block_on(send(&server.addr, t.server_pin, h)).1 {
        Message::Error { code, message } => (code, message),
        m => panic!("{m:?}"),
    }
}

#[test]
fn a_version_mismatch_says_which_side_to_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (lo, hi) = (
        rehost_proto::MIN_PROTOCOL_VERSION,
        rehost_proto::PROTOCOL_VERSION,
    );
    let (code, message) = version_refusal(&server, 99, 99);
    assert_eq!(code, ErrorCode::Version);
    assert_eq!(
        message,
        format!("this agent speaks protocol 99..=99, newer than this server ({lo}..={hi}): upgrade the server")
    );
    let (code, message) = version_refusal(&server, 0, 0);
    assert_eq!(code, ErrorCode::Version);
    assert_eq!(
        message,
        format!("this agent speaks protocol 0..=0, older than this server supports ({lo}..={hi}): upgrade the agent")
    );
    // Nothing was registered by either.
    assert_eq!(server.machines()["machines"].as_array().unwrap().len(), 0);
}

/// Files and bytes under the store's `chunks/`.
fn chunks(server: &Server) -> (u64, u64) {
    let mut out = (0, 0);
    let mut dirs = vec![server.data.join("store/chunks")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                dirs.push(e.path());
            } else {
                out = (out.0 + 1, out.1 + md.len());
            }
        }
    }
    out
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn machine_delete_removes_volumes_points_and_rows_and_frees_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    mixed_image(&img_a, 4 << 20, 41);
    mixed_image(&img_b, 4 << 20, 42);
    let mut a = Agent::new(dir.path(), "a");
    let mut b = Agent::new(dir.path(), "b");
    assert!(a
        .install(&server, &token, &[&img_a], "gone-1")
        .status
        .success());
    assert!(b
        .install(&server, &token, &[&img_b], "kept-1")
        .status
        .success());
    a.run(&[]);
    b.run(&[]);
    let (ma, da) = wait_replicated(&server, &img_a, LIMIT);
    let (mb, _) = wait_replicated(&server, &img_b, LIMIT);
    server.snapshot(&ma);
    let pb = server.snapshot(&mb)["id"].to_string();
    let before = chunks(&server);
    assert!(server.volume(&ma, da).exists());

    // While its agent is connected: refused, with the way out.
    let out = server.cli(&["machine", "delete", &ma, "--yes"]);
    assert!(!out.status.success());
    let why = output(&out);
    assert!(
        why.contains("is connected") && why.contains("machine revoke"),
        "{why}"
    );

    // The server refuses on its own too, whatever the client checked first.
    let (status, body) = admin_post(&server, &format!("/v1/machines/{ma}/delete"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("is connected"), "{body}");
    assert!(server.volume(&ma, da).exists());

    a.kill(nix::sys::signal::Signal::SIGTERM);
    wait_until("the stopped agent shows disconnected", LIMIT, || {
        (server.machine(&ma)["connected"] == false).then_some(())
    });
    // Not on a terminal (the test's stdin is none) and no --yes: refused, nothing removed.
    let out = server.cli(&["machine", "delete", "gone-1"]);
    assert!(!out.status.success());
    let why = output(&out);
    assert!(
        why.contains(&format!(
            "machine {ma} (gone-1): 1 disks, 1 recovery points"
        )) && why.contains("pass --yes"),
        "{why}"
    );
    assert!(server.volume(&ma, da).exists());

    let done = server.ok(&["machine", "delete", "gone-1", "--yes"]);
    assert!(
        done.contains(&format!("machine {ma} (gone-1) deleted: 1 disks")),
        "{done}"
    );
    assert!(done.contains("1 recovery points"), "{done}");
    let listed: Vec<String> = server.machines()["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["machine_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [mb.as_str()]);
    assert!(!server.volume(&ma, da).exists());
    assert!(!server.data.join("volumes").join(&ma).exists());
    let after = chunks(&server);
    assert!(
        after.0 < before.0 && after.1 < before.1,
        "the store shrinks: {before:?} -> {after:?}"
    );
    assert!(server.ok(&["snapshot", "verify", &mb, &pb]).contains("OK"));
    let out = server.cli(&["snapshots", &ma]);
    assert!(!out.status.success(), "{}", output(&out));
    // The other machine's session went on throughout.
    assert_eq!(server.machine(&mb)["connected"], true);
    assert!(!b.log_text().contains("disconnected"), "{}", b.log_text());
    b.kill(nix::sys::signal::Signal::SIGTERM);
}

/// A bare POST to the admin API (plain HTTP on loopback) with the admin credential: the status
/// and the body.
fn admin_post(server: &Server, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let token = std::fs::read_to_string(server.data.join("admin.token")).unwrap();
    let mut tcp = std::net::TcpStream::connect(&server.admin).unwrap();
    write!(
        tcp,
        "POST {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
        token.trim()
    )
    .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
