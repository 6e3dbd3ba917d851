//! Checked domain types. A [`Message`] is built from a [`wire::Frame`] by `TryFrom`, which rejects
//! missing bodies, invalid enums, wrong hash lengths and sizes above the protocol limits. Past this
//! boundary required fields are not `Option` and ids are newtypes.

use bytes::Bytes;

use crate::wire::{self, frame::Body};
use crate::{DecodeError, MAX_BLOCK_SIZE, MAX_INDEX_CHUNK, MIN_BLOCK_SIZE};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// A disk, as numbered by the server's catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u64);

impl std::fmt::Display for DiskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "disk-{}", self.0)
    }
}

/// A registered machine: `m-` followed by 16 lowercase hex digits (random, never derived from
/// hardware addresses).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineId(String);

impl MachineId {
    pub fn parse(s: &str) -> Result<Self, DecodeError> {
        let hex = s
            .strip_prefix("m-")
            .ok_or(DecodeError::Field("machine_id"))?;
        if hex.len() != 16
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DecodeError::Field("machine_id"));
        }
        Ok(Self(s.to_string()))
    }

    /// A fresh random id.
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        getrandom_fill(&mut b);
        Self(format!(
            "m-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for MachineId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn getrandom_fill(buf: &mut [u8]) {
    // Randomness comes from the kernel; a failure here means the host is unusable.
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}

pub use wire::{Compression, DiskState, ErrorCode, MarkKind, PointConsistency, SourceActionKind};

pub use crate::state::ReplicationState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub device: String,
    pub size_bytes: u64,
}

/// How the server's refusal of a machine that was cut over or archived ends (agents recognise it
/// and offer to be uninstalled).
pub const REPLICATION_ENDED: &str = "its replication has stopped (the agent can be uninstalled)";

/// How the server's `Error` frame begins when a session ends because another agent keeps
/// connecting with the same machine credential (agents show it in their status).
pub const SHARED_CREDENTIAL: &str = "another agent is using this machine's credential";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// First contact: an install token and who the source is.
    Register {
        token_id: [u8; 8],
        token_secret: [u8; 24],
        hostname: String,
        source_id: Hash,
    },
    /// A registered machine reconnecting with its own credential.
    Machine {
        machine_id: MachineId,
        secret: [u8; 32],
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u32,
    pub max_version: u32,
    pub agent_version: String,
    pub auth: Auth,
    pub disks: Vec<DiskInfo>,
    /// `Some(reason)`: the agent is being uninstalled (see [`wire::Hello::detach`]).
    pub detach: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskGrant {
    pub disk_id: DiskId,
    pub device: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Initial sync watermark: every byte below it is durable on the server.
    pub durable_bytes: u64,
    pub sync_complete: bool,
    /// See [`wire::DiskGrant::clean_stop_generation`]; 0: none.
    pub clean_stop_generation: u64,
}

impl DiskGrant {
    pub fn block_count(&self) -> u64 {
        self.size_bytes.div_ceil(u64::from(self.block_size))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u32,
    pub server_version: String,
    pub machine_id: MachineId,
    /// Set only in answer to a registration.
    pub machine_secret: Option<[u8; 32]>,
    pub disks: Vec<DiskGrant>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub seq: u64,
    pub disk_id: DiskId,
    pub offset: u64,
    pub length: u32,
    pub hash: Hash,
    pub compression: Compression,
    pub payload: Bytes,
}

/// `length` bytes at `offset` that read as zeros (the agent skips sending them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zero {
    pub seq: u64,
    pub disk_id: DiskId,
    pub offset: u64,
    pub length: u64,
}

/// A point in one disk's stream; `generation` is non-zero exactly for [`MarkKind::CleanStop`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub disk_id: DiskId,
    pub kind: MarkKind,
    pub generation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub disk_id: DiskId,
    pub state: DiskState,
    pub done_bytes: u64,
    pub backlog_bytes: u64,
    pub sent_bytes: u64,
    /// How far behind the source a launch now would be (continuous state only).
    pub lag_ms: u64,
    /// `backlog_bytes` is a lower bound: a scanned disk does not know what changed since its
    /// last pass until the next pass reads it.
    pub backlog_lower_bound: bool,
}

/// Every message of the protocol, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    IndexRequest {
        disk_id: DiskId,
        start_block: u64,
        count: u32,
    },
    /// `hashes[i]` is the digest of block `start_block + i`; all-zero means "never written".
    IndexChunk {
        disk_id: DiskId,
        start_block: u64,
        hashes: Vec<Hash>,
    },
    Block(Block),
    Zero(Zero),
    Mark(Mark),
    Ack {
        seq: u64,
    },
    Progress(Progress),
    Error {
        code: ErrorCode,
        message: String,
    },
    Ping {
        nonce: u64,
    },
    /// `hold`: keep the freeze after the mark until [`Message::PointRelease`] (a group point).
    PointRequest {
        id: u64,
        max_freeze_ms: u32,
        hold: bool,
    },
    /// Every machine of a group point marked: thaw.
    PointRelease {
        id: u64,
    },
    Point {
        seq: u64,
        id: u64,
        consistency: PointConsistency,
        freeze_ms: u32,
        note: String,
    },
    /// `max_mbps` 0: no server-side cap.
    Settings {
        max_mbps: u64,
    },
    /// `units` is non-empty exactly for [`SourceActionKind::StopServices`], each a systemd unit
    /// name (see [`valid_unit`]).
    SourceAction {
        id: u64,
        kind: SourceActionKind,
        units: Vec<String>,
    },
    SourceActionResult {
        id: u64,
        ok: bool,
        message: String,
    },
    /// Server → agent (protocol [`crate::DETACH_VERSION`]), the answer to a `Hello` with
    /// `detach`: the uninstall is recorded (durable) with this reason; the server then closes.
    Detach {
        reason: String,
    },
}

/// Longest reason a [`Message::Detach`] may carry.
pub const MAX_DETACH_REASON: usize = 256;

/// Most units a [`Message::SourceAction`] may name.
pub const MAX_SOURCE_UNITS: usize = 64;

/// A systemd unit name: 1-255 of `A-Za-z0-9:-_.\@`, not starting with `-` (never an option).
pub fn valid_unit(u: &str) -> bool {
    (1..=255).contains(&u.len())
        && !u.starts_with('-')
        && u.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.\\@".contains(&c))
}

impl Message {
    /// Name used in logs and protocol errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::IndexRequest { .. } => "index-request",
            Message::IndexChunk { .. } => "index-chunk",
            Message::Block(_) => "block",
            Message::Zero(_) => "zero",
            Message::Mark(_) => "mark",
            Message::Ack { .. } => "ack",
            Message::Progress(_) => "progress",
            Message::Error { .. } => "error",
            Message::Ping { .. } => "ping",
            Message::PointRequest { .. } => "point request",
            Message::PointRelease { .. } => "point release",
            Message::Point { .. } => "point",
            Message::Settings { .. } => "settings",
            Message::SourceAction { .. } => "source action",
            Message::SourceActionResult { .. } => "source action result",
            Message::Detach { .. } => "detach",
        }
    }
}

fn fixed<const N: usize>(v: &[u8], field: &'static str) -> Result<[u8; N], DecodeError> {
    v.try_into().map_err(|_| DecodeError::Field(field))
}

fn enum_field<T: TryFrom<i32>>(v: i32, field: &'static str) -> Result<T, DecodeError> {
    match v {
        0 => Err(DecodeError::Field(field)),
        v => T::try_from(v).map_err(|_| DecodeError::Field(field)),
    }
}

fn text(s: String, field: &'static str, max: usize) -> Result<String, DecodeError> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(DecodeError::Field(field));
    }
    Ok(s)
}

fn disk_info(d: wire::DiskInfo) -> Result<DiskInfo, DecodeError> {
    if d.size_bytes == 0 {
        return Err(DecodeError::Field("disk size"));
    }
    Ok(DiskInfo {
        device: text(d.device, "device", 4096)?,
        size_bytes: d.size_bytes,
    })
}

fn check_block_size(bs: u32) -> Result<u32, DecodeError> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(DecodeError::Field("block_size"));
    }
    Ok(bs)
}

const MAX_DISKS: usize = 256;

impl TryFrom<wire::Frame> for Message {
    type Error = DecodeError;

    fn try_from(f: wire::Frame) -> Result<Self, DecodeError> {
        let body = f.body.ok_or(DecodeError::Field("frame body"))?;
        Ok(match body {
            Body::Hello(h) => {
                let auth = match h.auth.ok_or(DecodeError::Field("auth"))? {
                    wire::hello::Auth::Register(r) => Auth::Register {
                        token_id: fixed(&r.token_id, "token_id")?,
                        token_secret: fixed(&r.token_secret, "token_secret")?,
                        hostname: text(r.hostname, "hostname", 255)?,
                        source_id: fixed(&r.source_id, "source_id")?,
                    },
                    wire::hello::Auth::Machine(m) => Auth::Machine {
                        machine_id: MachineId::parse(&m.machine_id)?,
                        secret: fixed(&m.secret, "machine secret")?,
                    },
                };
                if h.disks.len() > MAX_DISKS {
                    return Err(DecodeError::Field("disks"));
                }
                Message::Hello(Hello {
                    min_version: h.min_version,
                    max_version: h.max_version,
                    agent_version: text(h.agent_version, "agent_version", 64)?,
                    auth,
                    detach: h
                        .detach
                        .map(|r| text(r, "detach reason", MAX_DETACH_REASON))
                        .transpose()?,
                    disks: h
                        .disks
                        .into_iter()
                        .map(disk_info)
                        .collect::<Result<_, _>>()?,
                })
            }
            Body::Welcome(w) => {
                if w.disks.len() > MAX_DISKS {
                    return Err(DecodeError::Field("disks"));
                }
                let disks = w
                    .disks
                    .into_iter()
                    .map(|d| {
                        if d.size_bytes == 0 || d.durable_bytes > d.size_bytes {
                            return Err(DecodeError::Field("disk grant"));
                        }
                        Ok(DiskGrant {
                            disk_id: DiskId(d.disk_id),
                            device: text(d.device, "device", 4096)?,
                            size_bytes: d.size_bytes,
                            block_size: check_block_size(d.block_size)?,
                            durable_bytes: d.durable_bytes,
                            sync_complete: d.sync_complete,
                            clean_stop_generation: d.clean_stop_generation,
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Message::Welcome(Welcome {
                    version: w.version,
                    server_version: text(w.server_version, "server_version", 64)?,
                    machine_id: MachineId::parse(&w.machine_id)?,
                    machine_secret: if w.machine_secret.is_empty() {
                        None
                    } else {
                        Some(fixed(&w.machine_secret, "machine_secret")?)
                    },
                    disks,
                })
            }
            Body::IndexRequest(r) => {
                if r.count == 0 || r.count > MAX_INDEX_CHUNK {
                    return Err(DecodeError::Field("index count"));
                }
                Message::IndexRequest {
                    disk_id: DiskId(r.disk_id),
                    start_block: r.start_block,
                    count: r.count,
                }
            }
            Body::IndexChunk(c) => {
                if c.hashes.len() % 32 != 0 || c.hashes.len() / 32 > MAX_INDEX_CHUNK as usize {
                    return Err(DecodeError::Field("index hashes"));
                }
                let hashes = c
                    .hashes
                    .chunks_exact(32)
                    .map(|h| h.try_into().expect("32-byte chunk"))
                    .collect();
                Message::IndexChunk {
                    disk_id: DiskId(c.disk_id),
                    start_block: c.start_block,
                    hashes,
                }
            }
            Body::Block(b) => {
                let compression: Compression = enum_field(b.compression, "compression")?;
                if b.length == 0 || b.length > MAX_BLOCK_SIZE {
                    return Err(DecodeError::Field("block length"));
                }
                // Agents send a block raw when zstd would not make it smaller, so a payload is
                // never longer than the block it carries.
                let bad_len = match compression {
                    Compression::None => b.payload.len() != b.length as usize,
                    _ => b.payload.is_empty() || b.payload.len() > b.length as usize,
                };
                if bad_len {
                    return Err(DecodeError::Field("payload length"));
                }
                Message::Block(Block {
                    seq: b.seq,
                    disk_id: DiskId(b.disk_id),
                    offset: b.offset,
                    length: b.length,
                    hash: fixed(&b.hash, "hash")?,
                    compression,
                    payload: b.payload,
                })
            }
            Body::Zero(z) => {
                if z.length == 0 {
                    return Err(DecodeError::Field("zero length"));
                }
                Message::Zero(Zero {
                    seq: z.seq,
                    disk_id: DiskId(z.disk_id),
                    offset: z.offset,
                    length: z.length,
                })
            }
            Body::Mark(m) => {
                let kind = enum_field(m.kind, "mark kind")?;
                if (kind == MarkKind::CleanStop) != (m.generation != 0) {
                    return Err(DecodeError::Field("mark generation"));
                }
                Message::Mark(Mark {
                    seq: m.seq,
                    disk_id: DiskId(m.disk_id),
                    kind,
                    generation: m.generation,
                })
            }
            Body::Ack(a) => Message::Ack { seq: a.seq },
            Body::Progress(p) => Message::Progress(Progress {
                disk_id: DiskId(p.disk_id),
                state: enum_field(p.state, "disk state")?,
                done_bytes: p.done_bytes,
                backlog_bytes: p.backlog_bytes,
                sent_bytes: p.sent_bytes,
                lag_ms: p.lag_ms,
                backlog_lower_bound: p.backlog_lower_bound,
            }),
            Body::Error(e) => Message::Error {
                code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Invalid),
                message: e
                    .message
                    .chars()
                    .take(1024)
                    .filter(|c| !c.is_control())
                    .collect(),
            },
            Body::Ping(p) => Message::Ping { nonce: p.nonce },
            Body::Settings(x) => Message::Settings {
                max_mbps: x.max_mbps,
            },
            Body::PointRequest(r) => Message::PointRequest {
                id: r.id,
                max_freeze_ms: r.max_freeze_ms,
                hold: r.hold,
            },
            Body::PointRelease(r) => Message::PointRelease { id: r.id },
            Body::Point(p) => Message::Point {
                seq: p.seq,
                id: p.id,
                consistency: enum_field(p.consistency, "point consistency")?,
                freeze_ms: p.freeze_ms,
                note: text(p.note, "note", 1024)?,
            },
            Body::SourceAction(a) => {
                let kind = enum_field(a.kind, "source action kind")?;
                let units_ok = a.units.len() <= MAX_SOURCE_UNITS
                    && a.units.iter().all(|u| valid_unit(u))
                    && (kind == SourceActionKind::StopServices) != a.units.is_empty();
                if !units_ok {
                    return Err(DecodeError::Field("source action units"));
                }
                Message::SourceAction {
                    id: a.id,
                    kind,
                    units: a.units,
                }
            }
            Body::SourceActionResult(r) => Message::SourceActionResult {
                id: r.id,
                ok: r.ok,
                message: text(r.message, "source action message", 4096)?,
            },
            Body::Detach(d) => Message::Detach {
                reason: text(d.reason, "detach reason", MAX_DETACH_REASON)?,
            },
        })
    }
}

impl From<Message> for wire::Frame {
    fn from(m: Message) -> Self {
        let body = match m {
            Message::Hello(h) => Body::Hello(wire::Hello {
                min_version: h.min_version,
                max_version: h.max_version,
                agent_version: h.agent_version,
                auth: Some(match h.auth {
                    Auth::Register {
                        token_id,
                        token_secret,
                        hostname,
                        source_id,
                    } => wire::hello::Auth::Register(wire::Register {
                        token_id: token_id.to_vec(),
                        token_secret: token_secret.to_vec(),
                        hostname,
                        source_id: source_id.to_vec(),
                    }),
                    Auth::Machine { machine_id, secret } => {
                        wire::hello::Auth::Machine(wire::MachineAuth {
                            machine_id: machine_id.0,
                            secret: secret.to_vec(),
                        })
                    }
                }),
                disks: h
                    .disks
                    .into_iter()
                    .map(|d| wire::DiskInfo {
                        device: d.device,
                        size_bytes: d.size_bytes,
                    })
                    .collect(),
                detach: h.detach,
            }),
            Message::Welcome(w) => Body::Welcome(wire::Welcome {
                version: w.version,
                server_version: w.server_version,
                machine_id: w.machine_id.0,
                machine_secret: w.machine_secret.map(|s| s.to_vec()).unwrap_or_default(),
                disks: w
                    .disks
                    .into_iter()
                    .map(|d| wire::DiskGrant {
                        disk_id: d.disk_id.0,
                        device: d.device,
                        size_bytes: d.size_bytes,
                        block_size: d.block_size,
                        durable_bytes: d.durable_bytes,
                        sync_complete: d.sync_complete,
                        clean_stop_generation: d.clean_stop_generation,
                    })
                    .collect(),
            }),
            Message::IndexRequest {
                disk_id,
                start_block,
                count,
            } => Body::IndexRequest(wire::IndexRequest {
                disk_id: disk_id.0,
                start_block,
                count,
            }),
            Message::IndexChunk {
                disk_id,
                start_block,
                hashes,
            } => Body::IndexChunk(wire::IndexChunk {
                disk_id: disk_id.0,
                start_block,
                hashes: hashes.concat(),
            }),
            Message::Block(b) => Body::Block(wire::Block {
                seq: b.seq,
                disk_id: b.disk_id.0,
                offset: b.offset,
                length: b.length,
                hash: b.hash.to_vec(),
                compression: b.compression as i32,
                payload: b.payload,
            }),
            Message::Zero(Zero {
                seq,
                disk_id,
                offset,
                length,
            }) => Body::Zero(wire::Zero {
                seq,
                disk_id: disk_id.0,
                offset,
                length,
            }),
            Message::Mark(Mark {
                seq,
                disk_id,
                kind,
                generation,
            }) => Body::Mark(wire::Mark {
                seq,
                disk_id: disk_id.0,
                kind: kind as i32,
                generation,
            }),
            Message::Ack { seq } => Body::Ack(wire::Ack { seq }),
            Message::Progress(p) => Body::Progress(wire::Progress {
                disk_id: p.disk_id.0,
                state: p.state as i32,
                done_bytes: p.done_bytes,
                backlog_bytes: p.backlog_bytes,
                sent_bytes: p.sent_bytes,
                lag_ms: p.lag_ms,
                backlog_lower_bound: p.backlog_lower_bound,
            }),
            Message::Error { code, message } => Body::Error(wire::Error {
                code: code as i32,
                message,
            }),
            Message::Ping { nonce } => Body::Ping(wire::Ping { nonce }),
            Message::Settings { max_mbps } => Body::Settings(wire::Settings { max_mbps }),
            Message::PointRequest {
                id,
                max_freeze_ms,
                hold,
            } => Body::PointRequest(wire::PointRequest {
                id,
                max_freeze_ms,
                hold,
            }),
            Message::PointRelease { id } => Body::PointRelease(wire::PointRelease { id }),
            Message::Point {
                seq,
                id,
                consistency,
                freeze_ms,
                note,
            } => Body::Point(wire::Point {
                seq,
                id,
                consistency: consistency as i32,
                freeze_ms,
                note,
            }),
            Message::SourceAction { id, kind, units } => Body::SourceAction(wire::SourceAction {
                id,
                kind: kind as i32,
                units,
            }),
            Message::SourceActionResult { id, ok, message } => {
                Body::SourceActionResult(wire::SourceActionResult { id, ok, message })
            }
            Message::Detach { reason } => Body::Detach(wire::Detach { reason }),
        };
        wire::Frame { body: Some(body) }
    }
}
