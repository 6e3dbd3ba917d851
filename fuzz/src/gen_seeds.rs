//! Writes the seed corpora of the targets that need the crates' own encoders: frames of every
//! message kind (`frame`), a freshly generated install token (`token`), dirty bitmaps written by the
//! agent's own `cleanstop::save` (`bitmap`) and the LVM metadata text of `converter/src/lvm_tests.rs`
//! (`lvm`). Usage: `gen-seeds DIR` (writes `DIR/<target>/<name>`).

use std::path::Path;

use bytes::{Bytes, BytesMut};
use rehost_agent::cleanstop::{self, Saved};
use rehost_agent::tracker::DirtySet;
use rehost_proto::frame::encode;
use rehost_proto::msg::{
    Auth, Block, Compression, DiskGrant, DiskInfo, DiskState, ErrorCode, Hello, MarkKind,
    PointConsistency, Progress, SourceActionKind, Welcome,
};
use rehost_proto::token::InstallToken;
use rehost_proto::{DiskId, MachineId, Message};

fn messages() -> Vec<Message> {
    let mid = MachineId::parse("m-0123456789abcdef").unwrap();
    let payload = vec![7u8; 4096];
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "0.1.0".into(),
            detach: None,
            auth: Auth::Register {
                token_id: [1; 8],
                token_secret: [2; 24],
                hostname: "web-1".into(),
                source_id: [3; 32],
            },
            disks: vec![DiskInfo {
                device: "/dev/vda".into(),
                size_bytes: 8 << 30,
            }],
        }),
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "0.1.0".into(),
            detach: None,
            auth: Auth::Machine {
                machine_id: mid.clone(),
                secret: [4; 32],
            },
            disks: vec![],
        }),
        Message::Welcome(Welcome {
            version: 1,
            server_version: "0.1.0".into(),
            machine_id: mid,
            machine_secret: Some([5; 32]),
            disks: vec![DiskGrant {
                disk_id: DiskId(1),
                device: "/dev/vda".into(),
                size_bytes: 8 << 30,
                block_size: 65536,
                durable_bytes: 1 << 20,
                sync_complete: false,
                clean_stop_generation: 9,
            }],
        }),
        Message::IndexRequest {
            disk_id: DiskId(1),
            start_block: 16,
            count: 4,
        },
        Message::IndexChunk {
            disk_id: DiskId(1),
            start_block: 16,
            hashes: vec![[0; 32], *blake3::hash(b"x").as_bytes()],
        },
        Message::Block(Block {
            seq: 1,
            disk_id: DiskId(1),
            offset: 65536,
            length: 4096,
            hash: *blake3::hash(&payload).as_bytes(),
            compression: Compression::None,
            payload: Bytes::from(payload),
        }),
        Message::Block(Block {
            seq: 2,
            disk_id: DiskId(1),
            offset: 0,
            length: 65536,
            hash: rehost_proto::zero_hash(65536),
            compression: Compression::Zstd,
            payload: Bytes::from_static(b"\x28\xb5\x2f\xfd\x00\x58\x01\x00\x00"),
        }),
        Message::Zero {
            seq: 3,
            disk_id: DiskId(1),
            offset: 1 << 20,
            length: 1 << 20,
        },
        Message::Mark {
            seq: 4,
            disk_id: DiskId(1),
            kind: MarkKind::InitialSyncDone,
            generation: 0,
        },
        Message::Mark {
            seq: 5,
            disk_id: DiskId(1),
            kind: MarkKind::CleanStop,
            generation: 9,
        },
        Message::Ack { seq: 5 },
        Message::Progress(Progress {
            disk_id: DiskId(1),
            state: DiskState::Continuous,
            done_bytes: 8 << 30,
            backlog_bytes: 4096,
            sent_bytes: 9 << 30,
            lag_ms: 250,
            backlog_lower_bound: true,
        }),
        Message::Error {
            code: ErrorCode::Protocol,
            message: "bad frame".into(),
        },
        Message::Ping { nonce: 42 },
        Message::PointRequest {
            id: 7,
            max_freeze_ms: 2000,
        },
        Message::Point {
            seq: 6,
            id: 7,
            consistency: PointConsistency::App,
            freeze_ms: 30,
            note: "froze / and /var".into(),
        },
        Message::Settings { max_mbps: 100 },
        Message::SourceAction {
            id: 8,
            kind: SourceActionKind::StopServices,
            units: vec!["nginx.service".into(), "postgresql@15-main.service".into()],
        },
        Message::SourceActionResult {
            id: 8,
            ok: true,
            message: "stopped".into(),
        },
        Message::Detach {
            reason: "agent uninstalled".into(),
        },
    ]
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn main() {
    let dir = std::env::args_os().nth(1).expect("usage: gen-seeds DIR");
    let dir = Path::new(&dir);

    let mut all = BytesMut::new();
    for (i, m) in messages().into_iter().enumerate() {
        let mut one = BytesMut::new();
        encode(m.clone(), &mut one);
        write(
            dir,
            "frame",
            &format!("{i:02}-{}", m.kind().replace(' ', "-")),
            &one,
        );
        encode(m, &mut all);
    }
    write(dir, "frame", "stream", &all);

    let token = InstallToken::generate(*blake3::hash(b"a server CA certificate").as_bytes());
    write(dir, "token", "token", token.encode().as_bytes());

    let tmp = std::env::temp_dir().join(format!("rehost-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (disk_id, size, block_size) in [(1u64, 5u64 << 20, 65536u32), (2, (64 << 20) + 4096, 4096)]
    {
        let mut dirty = DirtySet::new(size, block_size);
        dirty.mark_bytes(0, 1);
        dirty.mark_bytes(size / 2, 200_000);
        dirty.mark_bytes(size - 1, 1);
        let saved = Saved {
            disk_id,
            generation: 0xfeed + disk_id,
            size,
            block_size,
            dirty,
        };
        cleanstop::save(&tmp, &saved).unwrap();
        let p = cleanstop::path(&tmp, disk_id);
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        write(dir, "bitmap", &name, &std::fs::read(&p).unwrap());
    }
    std::fs::remove_dir_all(&tmp).unwrap();

    write(dir, "lvm", "vg-linear", LVM_TEXT.as_bytes());
    write(
        dir,
        "lvm",
        "vg-snapshot",
        LVM_TEXT
            .replace(
                "\n}\n}\n\n}\n# Generated",
                "\n}\nsnap {\nid = \"x\"\nstatus = [\"READ\"]\nsegment_count = 1\nsegment1 {\nstart_extent = 0\nextent_count = 2\ntype = \"snapshot\"\norigin = \"root\"\ncow_store = \"snap\"\n}\n}\n}\n\n}\n# Generated",
            )
            .as_bytes(),
    );
}

/// The metadata text of `converter/src/lvm_tests.rs` (from a real `vgcreate`/`lvcreate` run) with
/// one linear logical volume.
const LVM_TEXT: &str = r#"vgt {
id = "WdCeft-tQx7-ns6n-AMfH-Zbtf-SPcT-CMMmcQ"
seqno = 4
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
max_lv = 0
max_pv = 0
metadata_copies = 0

physical_volumes {

pv0 {
id = "u00zcg-vqqg-ES9K-KQeQ-2w3u-BMNg-HLclmB"
device = "/dev/loop0p1"	# Hint only

status = ["ALLOCATABLE"]
flags = []
dev_size = 202752
pe_start = 2048
pe_count = 24
}
}

logical_volumes {

root {
id = "mBi0j3-wgEc-9rNT-182G-p2Ec-Jvbf-JTP8BH"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 1

segment1 {
start_extent = 0
extent_count = 4

type = "striped"
stripe_count = 1	# linear

stripes = [
"pv0", 0
]
}
}
}

}
# Generated by LVM2 version 2.03.16(2) (2022-05-18): Tue Dec  1 06:46:04 2026

contents = "Text Format Volume Group"
version = 1

description = "Write from lvcreate -n \"root\"."

creation_host = "vm"	# Linux vm 6.18.44 #1 SMP x86_64
creation_time = 1796107564	# Tue Dec  1 06:46:04 2026
"#;
