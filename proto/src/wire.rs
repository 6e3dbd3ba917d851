//! The prost messages exactly as they travel. Nothing here is trusted: every field may be missing or
//! out of range. [`crate::msg`] turns them into checked types. Wire enums reserve `0` for "invalid",
//! so a missing or zeroed field never reads as a meaningful value.

use bytes::Bytes;

/// One frame on the connection: exactly one body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(
        oneof = "frame::Body",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18"
    )]
    pub body: Option<frame::Body>,
}

pub mod frame {
    /// The frame bodies; tags are stable forever.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        #[prost(message, tag = "2")]
        Welcome(super::Welcome),
        #[prost(message, tag = "3")]
        IndexRequest(super::IndexRequest),
        #[prost(message, tag = "4")]
        IndexChunk(super::IndexChunk),
        #[prost(message, tag = "5")]
        Block(super::Block),
        #[prost(message, tag = "6")]
        Zero(super::Zero),
        #[prost(message, tag = "7")]
        Mark(super::Mark),
        #[prost(message, tag = "8")]
        Ack(super::Ack),
        #[prost(message, tag = "9")]
        Progress(super::Progress),
        #[prost(message, tag = "10")]
        Error(super::Error),
        #[prost(message, tag = "11")]
        Ping(super::Ping),
        #[prost(message, tag = "12")]
        PointRequest(super::PointRequest),
        #[prost(message, tag = "13")]
        Point(super::Point),
        #[prost(message, tag = "14")]
        Settings(super::Settings),
        #[prost(message, tag = "15")]
        SourceAction(super::SourceAction),
        #[prost(message, tag = "16")]
        SourceActionResult(super::SourceActionResult),
        #[prost(message, tag = "17")]
        Detach(super::Detach),
        #[prost(message, tag = "18")]
        PointRelease(super::PointRelease),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub min_version: u32,
    #[prost(uint32, tag = "2")]
    pub max_version: u32,
    #[prost(string, tag = "3")]
    pub agent_version: String,
    #[prost(oneof = "hello::Auth", tags = "4, 5")]
    pub auth: Option<hello::Auth>,
    #[prost(message, repeated, tag = "6")]
    pub disks: Vec<DiskInfo>,
    /// Protocol 2: this connection only tells the server that the agent is being uninstalled,
    /// for this reason; the server records it and answers `Detach` instead of `Welcome`. A
    /// version-1 server ignores the field and answers `Welcome`, which the agent then closes.
    #[prost(string, optional, tag = "7")]
    pub detach: Option<String>,
}

pub mod hello {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Auth {
        #[prost(message, tag = "4")]
        Register(super::Register),
        #[prost(message, tag = "5")]
        Machine(super::MachineAuth),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Register {
    #[prost(bytes = "vec", tag = "1")]
    pub token_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub token_secret: Vec<u8>,
    #[prost(string, tag = "3")]
    pub hostname: String,
    #[prost(bytes = "vec", tag = "4")]
    pub source_id: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MachineAuth {
    #[prost(string, tag = "1")]
    pub machine_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub secret: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DiskInfo {
    #[prost(string, tag = "1")]
    pub device: String,
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub server_version: String,
    #[prost(string, tag = "3")]
    pub machine_id: String,
    #[prost(bytes = "vec", tag = "4")]
    pub machine_secret: Vec<u8>,
    #[prost(message, repeated, tag = "5")]
    pub disks: Vec<DiskGrant>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DiskGrant {
    #[prost(uint64, tag = "1")]
    pub disk_id: u64,
    #[prost(string, tag = "2")]
    pub device: String,
    #[prost(uint64, tag = "3")]
    pub size_bytes: u64,
    #[prost(uint32, tag = "4")]
    pub block_size: u32,
    #[prost(uint64, tag = "5")]
    pub durable_bytes: u64,
    #[prost(bool, tag = "6")]
    pub sync_complete: bool,
    /// The generation of the agent's last clean stop for this disk as the server recorded it
    /// (0: none). Handed out once: the server forgets it when it sends it.
    #[prost(uint64, tag = "7")]
    pub clean_stop_generation: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IndexRequest {
    #[prost(uint64, tag = "1")]
    pub disk_id: u64,
    #[prost(uint64, tag = "2")]
    pub start_block: u64,
    #[prost(uint32, tag = "3")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IndexChunk {
    #[prost(uint64, tag = "1")]
    pub disk_id: u64,
    #[prost(uint64, tag = "2")]
    pub start_block: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub hashes: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Block {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub disk_id: u64,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    #[prost(uint32, tag = "4")]
    pub length: u32,
    #[prost(bytes = "vec", tag = "5")]
    pub hash: Vec<u8>,
    #[prost(enumeration = "Compression", tag = "6")]
    pub compression: i32,
    #[prost(bytes = "bytes", tag = "7")]
    pub payload: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Zero {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub disk_id: u64,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    #[prost(uint64, tag = "4")]
    pub length: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mark {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub disk_id: u64,
    #[prost(enumeration = "MarkKind", tag = "3")]
    pub kind: i32,
    /// With `CleanStop`: the generation of the dirty bitmap the agent saved (non-zero).
    #[prost(uint64, tag = "4")]
    pub generation: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Progress {
    #[prost(uint64, tag = "1")]
    pub disk_id: u64,
    #[prost(enumeration = "DiskState", tag = "2")]
    pub state: i32,
    #[prost(uint64, tag = "3")]
    pub done_bytes: u64,
    #[prost(uint64, tag = "4")]
    pub backlog_bytes: u64,
    #[prost(uint64, tag = "5")]
    pub sent_bytes: u64,
    #[prost(uint64, tag = "6")]
    pub lag_ms: u64,
    /// `backlog_bytes` is only what is known to have changed (a scanned disk between passes).
    /// Absent from older agents, which read as false.
    #[prost(bool, tag = "7")]
    pub backlog_lower_bound: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

/// Server → agent, after `Welcome` and whenever the operator changes them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Settings {
    /// Bandwidth cap for block payloads in megabits per second; 0: none set on the server (the
    /// agent's own `--max-mbps`, if any, applies).
    #[prost(uint64, tag = "1")]
    pub max_mbps: u64,
}

/// Server → agent: make a consistency point now (freeze, drain, mark, thaw).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PointRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The longest the agent may keep filesystems frozen.
    #[prost(uint32, tag = "2")]
    pub max_freeze_ms: u32,
    /// A point of a consistency group: the agent keeps its filesystems frozen after the mark,
    /// until [`PointRelease`] with this id (or `max_freeze_ms`), so that every machine of the
    /// group is frozen at one instant. An agent that does not know the field thaws at once.
    #[prost(bool, tag = "3")]
    pub hold: bool,
}

/// Server → agent: every machine of the group has marked point `id`; thaw.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PointRelease {
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// Agent → server, in the stream: every write the agent saw before this frame is in the stream
/// before it. The server takes the recovery point of request `id` here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Point {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(enumeration = "PointConsistency", tag = "3")]
    pub consistency: i32,
    /// How long the filesystems were frozen (0 when none was).
    #[prost(uint32, tag = "4")]
    pub freeze_ms: u32,
    /// What the agent did, for the job log (e.g. which filesystems it froze, or why none).
    #[prost(string, tag = "5")]
    pub note: String,
}

/// Server → agent, during a planned cutover: act on the source machine.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SourceAction {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(enumeration = "SourceActionKind", tag = "2")]
    pub kind: i32,
    /// systemd units to stop (`StopServices` only).
    #[prost(string, repeated, tag = "3")]
    pub units: Vec<String>,
}

/// Agent → server (protocol 2): the agent is being removed from the source, for `reason`; the
/// server records it and answers with a `Detach` of its own before closing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Detach {
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// Agent → server: what became of [`SourceAction`] `id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SourceActionResult {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(bool, tag = "2")]
    pub ok: bool,
    #[prost(string, tag = "3")]
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SourceActionKind {
    Invalid = 0,
    /// `systemctl stop UNITS`.
    StopServices = 1,
    /// `systemctl poweroff` (answered before the machine goes down).
    PowerOff = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Compression {
    Invalid = 0,
    None = 1,
    Zstd = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MarkKind {
    Invalid = 0,
    /// Every block of the disk has been sent once (initial sync finished).
    InitialSyncDone = 1,
    /// A rescan compared every block with the server's index and sent the differences.
    RescanDone = 2,
    /// The agent stops cleanly: every block it sent is acknowledged, and what is still dirty is
    /// saved on its side under `generation`. On restart, a matching generation means the saved
    /// bitmap is complete and no rescan is needed.
    CleanStop = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PointConsistency {
    Invalid = 0,
    /// No write was seen while the point was drained: as if the power had been cut there.
    Crash = 1,
    /// Every filesystem on the machine's disks was frozen while the point was drained.
    App = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DiskState {
    Invalid = 0,
    InitialSync = 1,
    Rescan = 2,
    Continuous = 3,
    /// Continuous, but the replica is more than a few seconds behind the source.
    Lagging = 4,
    /// Continuous, but nothing the agent sent has been acknowledged for a long time.
    Stalled = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Invalid = 0,
    Protocol = 1,
    Version = 2,
    Unauthorized = 3,
    Revoked = 4,
    Forbidden = 5,
    OutOfRange = 6,
    HashMismatch = 7,
    Internal = 8,
    TooLarge = 9,
}
