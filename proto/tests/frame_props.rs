//! Property tests for the frame decoder: arbitrary bytes never panic, valid messages round-trip,
//! and size limits are enforced before allocation.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rehost_proto::frame::{decode, encode, split_frame};
use rehost_proto::msg::{
    Auth, Block, Compression, DiskInfo, Hello, Mark, MarkKind, PointConsistency, SourceActionKind,
    Zero,
};
use rehost_proto::{DiskId, FrameError, MachineId, Message, MAX_FRAME};

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            proptest::collection::vec("[a-z][a-z0-9@._-]{0,30}\\.service", 0..5)
        )
            .prop_map(|(id, units)| Message::SourceAction {
                id,
                kind: if units.is_empty() {
                    SourceActionKind::PowerOff
                } else {
                    SourceActionKind::StopServices
                },
                units,
            }),
        (any::<u64>(), any::<bool>(), "[ -~]{0,200}")
            .prop_map(|(id, ok, message)| { Message::SourceActionResult { id, ok, message } }),
        "[ -~]{0,256}".prop_map(|reason| Message::Detach { reason }),
        (
            any::<u64>(),
            1u64..,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(d, done, backlog, sent, lag, lower)| {
                Message::Progress(rehost_proto::msg::Progress {
                    disk_id: DiskId(d),
                    state: rehost_proto::msg::DiskState::Continuous,
                    done_bytes: done,
                    backlog_bytes: backlog,
                    sent_bytes: sent,
                    lag_ms: lag,
                    backlog_lower_bound: lower,
                })
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            1u32..=65536,
            any::<[u8; 32]>(),
            any::<bool>()
        )
            .prop_map(|(seq, disk, offset, length, hash, zstd)| {
                let plen = if zstd {
                    (length as usize / 3).max(1)
                } else {
                    length as usize
                };
                Message::Block(Block {
                    seq,
                    disk_id: DiskId(disk),
                    offset,
                    length,
                    hash,
                    compression: if zstd {
                        Compression::Zstd
                    } else {
                        Compression::None
                    },
                    payload: Bytes::from(vec![7u8; plen]),
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u64>(), 1u64..).prop_map(|(seq, d, offset, length)| {
            Message::Zero(Zero {
                seq,
                disk_id: DiskId(d),
                offset,
                length,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, d)| Message::Mark(Mark {
            seq,
            disk_id: DiskId(d),
            kind: MarkKind::InitialSyncDone,
            generation: 0
        })),
        (any::<u64>(), any::<u64>(), 1..u64::MAX).prop_map(|(seq, d, generation)| Message::Mark(
            Mark {
                seq,
                disk_id: DiskId(d),
                kind: MarkKind::CleanStop,
                generation
            }
        )),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        any::<u64>().prop_map(|max_mbps| Message::Settings { max_mbps }),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(id, max_freeze_ms, hold)| {
            Message::PointRequest {
                id,
                max_freeze_ms,
                hold,
            }
        }),
        any::<u64>().prop_map(|id| Message::PointRelease { id }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            "[a-z0-9 /()-]{0,60}"
        )
            .prop_map(|(seq, id, app, freeze_ms, note)| {
                Message::Point {
                    seq,
                    id,
                    consistency: if app {
                        PointConsistency::App
                    } else {
                        PointConsistency::Crash
                    },
                    freeze_ms,
                    note,
                }
            }),
        (
            "[a-z0-9.-]{1,40}",
            any::<[u8; 8]>(),
            any::<[u8; 24]>(),
            any::<[u8; 32]>(),
            1u64..
        )
            .prop_map(
                |(hostname, token_id, token_secret, source_id, size)| Message::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    agent_version: "0.1.0".into(),
                    detach: None,
                    auth: Auth::Register {
                        token_id,
                        token_secret,
                        hostname,
                        source_id
                    },
                    disks: vec![DiskInfo {
                        device: "/dev/vdb".into(),
                        size_bytes: size
                    }],
                })
            ),
        (any::<[u8; 32]>(), proptest::option::of("[ -~]{0,256}")).prop_map(|(secret, detach)| {
            Message::Hello(Hello {
                min_version: 1,
                max_version: 2,
                agent_version: "x".into(),
                detach,
                auth: Auth::Machine {
                    machine_id: MachineId::parse("m-0123456789abcdef").unwrap(),
                    secret,
                },
                disks: vec![],
            })
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(Bytes::from(data.clone()));
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = split_frame(&mut buf) {}
    }

    #[test]
    fn valid_messages_round_trip(msg in arb_message()) {
        let mut buf = BytesMut::new();
        encode(msg.clone(), &mut buf);
        let back = split_frame(&mut buf).unwrap().unwrap();
        prop_assert_eq!(back, msg);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn truncated_frames_wait_for_more(msg in arb_message(), cut in 0usize..64) {
        let mut buf = BytesMut::new();
        encode(msg, &mut buf);
        let keep = buf.len().saturating_sub(cut + 1);
        let mut part = BytesMut::from(&buf[..keep]);
        prop_assert!(split_frame(&mut part).unwrap().is_none());
    }
}

#[test]
fn oversized_length_is_refused_before_reading_the_body() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
    assert!(matches!(
        split_frame(&mut buf),
        Err(FrameError::TooLarge(_))
    ));
}

#[test]
fn zero_enums_and_short_hashes_are_rejected() {
    use prost::Message as _;
    use rehost_proto::wire;
    let mut f = wire::Frame {
        body: Some(wire::frame::Body::Block(wire::Block {
            seq: 1,
            disk_id: 1,
            offset: 0,
            length: 4,
            hash: vec![0; 32],
            compression: 0,
            payload: Bytes::from_static(b"abcd"),
        })),
    };
    assert!(decode(Bytes::from(f.encode_to_vec())).is_err());
    if let Some(wire::frame::Body::Block(b)) = &mut f.body {
        b.compression = Compression::None as i32;
        b.hash = vec![0; 31];
    }
    assert!(decode(Bytes::from(f.encode_to_vec())).is_err());
    assert!(decode(Bytes::from(wire::Frame { body: None }.encode_to_vec())).is_err());
}

#[test]
fn source_actions_name_only_unit_names() {
    use prost::Message as _;
    use rehost_proto::wire;
    let frame = |kind: SourceActionKind, units: &[&str]| {
        let f = wire::Frame {
            body: Some(wire::frame::Body::SourceAction(wire::SourceAction {
                id: 7,
                kind: kind as i32,
                units: units.iter().map(|u| u.to_string()).collect(),
            })),
        };
        decode(Bytes::from(f.encode_to_vec()))
    };
    assert!(frame(
        SourceActionKind::StopServices,
        &["nginx.service", "getty@tty1.service"]
    )
    .is_ok());
    assert!(frame(SourceActionKind::PowerOff, &[]).is_ok());
    // An option smuggled as a unit, a shell word, a stop with nothing to stop, a poweroff with units.
    assert!(frame(SourceActionKind::StopServices, &["--force"]).is_err());
    assert!(frame(SourceActionKind::StopServices, &["a b"]).is_err());
    assert!(frame(SourceActionKind::StopServices, &["x;reboot"]).is_err());
    assert!(frame(SourceActionKind::StopServices, &[]).is_err());
    assert!(frame(SourceActionKind::PowerOff, &["nginx"]).is_err());
    assert!(frame(SourceActionKind::Invalid, &[]).is_err());
    let many: Vec<String> = (0..65).map(|i| format!("u{i}.service")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(frame(SourceActionKind::StopServices, &many).is_err());
}

#[tokio::test]
async fn async_reader_rejects_oversized_frames() {
    let mut data: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = rehost_proto::frame::read_message(&mut data)
        .await
        .unwrap_err();
    assert!(matches!(err, FrameError::TooLarge(_)));
    let mut empty: &[u8] = &[];
    assert!(rehost_proto::frame::read_message(&mut empty)
        .await
        .unwrap()
        .is_none());
}

#[test]
fn token_round_trip_and_damage() {
    use rehost_proto::token::{InstallToken, TokenError};
    let t = InstallToken::generate([9; 32]);
    let s = t.encode();
    assert_eq!(InstallToken::parse(&s).unwrap(), t);
    let mut damaged = s.clone().into_bytes();
    let i = damaged.len() - 10;
    damaged[i] = if damaged[i] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        InstallToken::parse(std::str::from_utf8(&damaged).unwrap()),
        Err(TokenError::Damaged)
    );
    assert_eq!(InstallToken::parse("hello"), Err(TokenError::Prefix));
}
