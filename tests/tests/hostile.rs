//! Bad input from the network: a registered machine that sends frames it must not. Each case gets
//! an `Error` frame naming the problem and a closed connection; no volume changes; the server
//! keeps serving.

use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rehost_agent::conn::{connect, handshake};
use rehost_proto::frame::{encode, read_message};
use rehost_proto::msg::{Auth, Block, Compression, DiskInfo, ErrorCode, Hello, Zero};
use rehost_proto::{DiskId, MachineId, Message};
use rehost_tests::*;
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(120);

struct Creds {
    machine: MachineId,
    secret: [u8; 32],
    pin: [u8; 32],
    device: String,
    size: u64,
}

fn creds(agent: &Agent, img: &Path) -> Creds {
    let s = agent.state_json();
    let hex32 = |v: &serde_json::Value| -> [u8; 32] {
        let s = v.as_str().unwrap();
        (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap()
    };
    Creds {
        machine: MachineId::parse(s["machine_id"].as_str().unwrap()).unwrap(),
        secret: hex32(&s["machine_secret"]),
        pin: hex32(&s["server_pin"]),
        device: img.display().to_string(),
        size: std::fs::metadata(img).unwrap().len(),
    }
}

/// Connects as `c`, sends `raw` after the handshake, and returns the server's error (code, text)
/// and whether the connection was then closed.
fn attack(server: &Server, c: &Creds, raw: Vec<u8>) -> (ErrorCode, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tls = connect(&server.addr, c.pin).await.expect("connect");
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "attacker".into(),
            detach: None,
            auth: Auth::Machine {
                machine_id: c.machine.clone(),
                secret: c.secret,
            },
            disks: vec![DiskInfo {
                device: c.device.clone(),
                size_bytes: c.size,
            }],
        };
        let welcome = match handshake(&mut tls, hello).await {
            Ok(w) => w,
            Err(rehost_agent::conn::ConnError::Refused { code, message }) => {
                return (code, message)
            }
            Err(e) => panic!("handshake: {e}"),
        };
        assert_eq!(welcome.disks.len(), 1);
        tls.write_all(&raw).await.unwrap();
        tls.flush().await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match read_message(&mut tls).await {
                    Ok(Some(Message::Error { code, message })) => return (code, message),
                    Ok(Some(
                        Message::Ack { .. } | Message::Settings { .. } | Message::Ping { .. },
                    )) => continue,
                    other => panic!("expected an error frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("server answers");
        let closed = tokio::time::timeout(Duration::from_secs(10), read_message(&mut tls))
            .await
            .expect("closes");
        assert!(
            matches!(closed, Ok(None) | Err(_)),
            "connection must be closed after an error: {closed:?}"
        );
        reply
    })
}

fn frame(m: Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(m, &mut b);
    b.to_vec()
}

fn block(seq: u64, disk: DiskId, offset: u64, data: &[u8], hash: [u8; 32]) -> Vec<u8> {
    frame(Message::Block(Block {
        seq,
        disk_id: disk,
        offset,
        length: data.len() as u32,
        hash,
        compression: Compression::None,
        payload: Bytes::copy_from_slice(data),
    }))
}

#[test]
fn hostile_frames_are_refused_and_volumes_stay_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    mixed_image(&img_a, 4 << 20, 5);
    mixed_image(&img_b, 4 << 20, 6);
    let mut a = Agent::new(dir.path(), "a");
    let mut b = Agent::new(dir.path(), "b");
    assert!(a
        .install(&server, &token, &[&img_a], "victim-a")
        .status
        .success());
    assert!(b
        .install(&server, &token, &[&img_b], "victim-b")
        .status
        .success());
    a.run(&[]);
    b.run(&[]);
    let (ma, da) = wait_replicated(&server, &img_a, LIMIT);
    let (mb, db) = wait_replicated(&server, &img_b, LIMIT);
    a.kill(nix::sys::signal::Signal::SIGTERM);
    b.kill(nix::sys::signal::Signal::SIGTERM);
    let (vol_a, vol_b) = (server.volume(&ma, da), server.volume(&mb, db));
    let (ha, hb) = (file_hash(&vol_a), file_hash(&vol_b));
    let c = creds(&a, &img_a);
    let data = vec![0xabu8; 65536];
    let good = *blake3::hash(&data).as_bytes();

    let cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "write to another machine's disk",
            block(1, DiskId(db), 0, &data, good),
            ErrorCode::Forbidden,
            "does not belong",
        ),
        (
            "offset beyond the disk",
            block(1, DiskId(da), 64 << 20, &data, good),
            ErrorCode::OutOfRange,
            "does not fit",
        ),
        (
            "unaligned offset",
            block(1, DiskId(da), 4096, &data, good),
            ErrorCode::OutOfRange,
            "does not fit",
        ),
        (
            "hash mismatch",
            block(1, DiskId(da), 0, &data, [9; 32]),
            ErrorCode::HashMismatch,
            "does not match",
        ),
        (
            "oversized frame",
            vec![0x7f, 0xff, 0xff, 0xff, 0, 0],
            ErrorCode::TooLarge,
            "exceeds",
        ),
        (
            "malformed frame",
            {
                let mut v = vec![0, 0, 0, 8];
                v.extend_from_slice(&[0xff; 8]);
                v
            },
            ErrorCode::Protocol,
            "malformed",
        ),
        (
            "sequence gap",
            block(5, DiskId(da), 0, &data, good),
            ErrorCode::Protocol,
            "sequence",
        ),
        (
            "zero range past the end",
            frame(Message::Zero(Zero {
                seq: 1,
                disk_id: DiskId(da),
                offset: 0,
                length: 1 << 40,
            })),
            ErrorCode::OutOfRange,
            "does not fit",
        ),
    ];
    for (what, raw, code, text) in cases {
        let (got, msg) = attack(&server, &c, raw);
        assert_eq!(got, code, "{what}: {msg}");
        assert!(
            msg.contains(text),
            "{what}: `{msg}` should mention `{text}`"
        );
    }
    assert_eq!(file_hash(&vol_a), ha, "machine A's volume changed");
    assert_eq!(file_hash(&vol_b), hb, "machine B's volume changed");

    // A wrong credential and a revoked machine are refused at the handshake.
    let wrong = Creds {
        secret: [1; 32],
        ..creds(&a, &img_a)
    };
    assert_eq!(attack(&server, &wrong, vec![]).0, ErrorCode::Unauthorized);
    assert!(server
        .cli(&["machine", "revoke", ma.as_str()])
        .status
        .success());
    let (code, msg) = attack(&server, &c, vec![]);
    assert_eq!(code, ErrorCode::Revoked, "{msg}");
    a.run(&[]);
    let st = a.wait(LIMIT);
    assert!(
        !st.success(),
        "an agent whose machine was revoked stops with an error"
    );
    assert!(a.log_text().contains("revoked"));

    let log = server.log_text();
    for needle in ["does not belong", "does not match", "exceeds", "revoked"] {
        assert!(log.contains(needle), "server log should record `{needle}`");
    }
    // Still serving the other machine.
    b.run(&[]);
    wait_replicated(&server, &img_b, LIMIT);
}
