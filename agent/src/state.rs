//! What the agent persists in its state dir:
//! - `agent.json` (0600): server address, the pinned CA digest, the machine id and credential, and
//!   per disk its server id and replication phase. Written with the crash-safe recipe.
//! - `status.json` (0644): what the running daemon last reported, for `rehost-agent status`.

use std::path::{Path, PathBuf};

use rehost_proto::fsutil::{read_capped, write_atomic};
use rehost_proto::msg::ReplicationState;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "agent.json";
/// Where the agent keeps its state unless told otherwise (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rehost-agent";
pub const STATUS_FILE: &str = "status.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no agent installation in {0} (run `rehost-agent install` first)")]
    Missing(PathBuf),
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is damaged")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("{0} has format version {1}, this agent understands {STATE_VERSION}")]
    Version(PathBuf, u32),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Known to the server; the initial sync has not finished.
    InitialSync,
    /// The initial sync finished and the server acknowledged it.
    Synced,
}

/// A disk as `agent.json` records it: the device, its id on the server, its phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub device: PathBuf,
    pub disk_id: u64,
    pub phase: Phase,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub version: u32,
    pub server: String,
    /// blake3 of the server CA certificate, hex.
    pub server_pin: String,
    pub machine_id: String,
    /// The machine's own credential, hex.
    pub machine_secret: String,
    pub hostname: String,
    pub disks: Vec<DiskRecord>,
}

impl AgentState {
    pub fn new(
        server: String,
        pin: &[u8; 32],
        machine_id: String,
        secret: &[u8; 32],
        hostname: String,
    ) -> Self {
        Self {
            version: STATE_VERSION,
            server,
            server_pin: hex::encode(pin),
            machine_id,
            machine_secret: hex::encode(secret),
            hostname,
            disks: Vec::new(),
        }
    }

    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let p = dir.join(STATE_FILE);
        if !p.exists() {
            return Err(StateError::Missing(dir.into()));
        }
        let raw = read_capped(&p, 1 << 20).map_err(|e| StateError::Read(p.clone(), e))?;
        let s: Self = serde_json::from_slice(&raw).map_err(|e| StateError::Parse(p.clone(), e))?;
        if s.version != STATE_VERSION {
            return Err(StateError::Version(p, s.version));
        }
        Ok(s)
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::Write(dir.into(), e))?;
        let p = dir.join(STATE_FILE);
        let data = serde_json::to_vec_pretty(self).expect("state serialises");
        write_atomic(&p, &data, 0o600).map_err(|e| StateError::Write(p, e))
    }

    pub fn pin(&self) -> Option<[u8; 32]> {
        hex::decode(&self.server_pin).ok()?.try_into().ok()
    }

    pub fn secret(&self) -> Option<[u8; 32]> {
        hex::decode(&self.machine_secret).ok()?.try_into().ok()
    }

    pub fn disk(&self, device: &Path) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.device == device)
    }

    pub fn set_disk(&mut self, device: &Path, disk_id: u64, phase: Phase) {
        self.disks.retain(|d| d.device != device);
        self.disks.push(DiskRecord {
            device: device.into(),
            disk_id,
            phase,
        });
    }
}

/// The agent's connection to the server, as `rehost-agent status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionState {
    /// Connecting (or about to): no session yet.
    #[default]
    Connecting,
    Connected,
    /// The server went silent (the agent reconnects) or acknowledges nothing.
    Stalled,
    /// The last session failed (see `last_error`); the agent retries after a backoff.
    Reconnecting,
    /// The agent stopped (asked to, or found not running).
    Stopped,
    /// The agent stopped on an error a restart cannot fix.
    Failed,
    /// `rehost-agent run` never wrote a status in this state dir.
    #[serde(rename = "never started")]
    NeverStarted,
}

impl ConnectionState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Stalled => "stalled",
            Self::Reconnecting => "reconnecting",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::NeverStarted => "never started",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How this agent process picked up a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartKind {
    /// The server held nothing of the disk.
    #[default]
    InitialSync,
    /// The tracker vouched for every change (or the initial sync went on from the watermark).
    Resume,
    /// Every block compared with the server's index.
    Rescan,
}

impl StartKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InitialSync => "initial-sync",
            Self::Resume => "resume",
            Self::Rescan => "rescan",
        }
    }
}

impl std::fmt::Display for StartKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// `rehost-agent status --json`: stable, documented in the README.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub machine_id: String,
    pub hostname: String,
    pub server: String,
    pub pid: u32,
    /// The version of the agent that wrote this status.
    #[serde(default)]
    pub agent_version: String,
    pub running: bool,
    /// connecting, connected, stalled, reconnecting (with the last error), stopped, failed
    pub connection: ConnectionState,
    pub last_error: Option<String>,
    pub updated_at: i64,
    pub disks: Vec<DiskStatus>,
    /// The bandwidth cap in force (Mbps): the server's setting, else `--max-mbps`; null: none.
    #[serde(default)]
    pub max_mbps: Option<u64>,
    /// The last consistency point this agent marked.
    #[serde(default)]
    pub last_point: Option<PointReport>,
    /// Why the connection counts as stalled right now (every disk then shows `stalled`): the
    /// server went silent (the agent reconnects) or answers but acknowledges nothing.
    #[serde(default)]
    pub stall: Option<String>,
    /// The last stall this agent process saw, kept after it recovers.
    #[serde(default)]
    pub last_stall: Option<StallReport>,
    /// The last time the server ended this agent's session because another agent connects with
    /// the same machine credential (and from where); null: never since this agent started.
    #[serde(default)]
    pub credential_conflict: Option<CredentialConflict>,
    /// Set when the server ended this machine's replication for good (cut over or archived):
    /// why, and that `rehost-agent uninstall` removes the agent.
    #[serde(default)]
    pub uninstall_offer: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StallReport {
    /// When it was detected (Unix seconds).
    pub at: i64,
    pub reason: String,
    /// The agent gave the connection up and reconnected (false: a slow server, kept).
    pub reconnected: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CredentialConflict {
    pub at: i64,
    /// The server's message, naming the other agent's address.
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PointReport {
    pub at: i64,
    /// `app` (filesystems frozen) or `crash` (a quiet moment).
    pub consistency: String,
    pub freeze_ms: u32,
    pub note: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    pub device: String,
    pub disk_id: u64,
    pub size_bytes: u64,
    /// initial-sync, rescan, continuous, lagging, stalled, disconnected (connecting: not started)
    pub state: ReplicationState,
    pub progress_percent: f64,
    /// Bytes the server has acknowledged as durable (initial sync), or the whole disk once synced.
    pub replicated_bytes: u64,
    pub backlog_bytes: u64,
    /// `backlog_bytes` is only what is known so far, the true backlog may be larger: a scanned
    /// disk in continuous replication knows only what its pass in progress has found (0 between
    /// passes) and not writes made since the pass went over a block.
    #[serde(default)]
    pub backlog_lower_bound: bool,
    pub lag_seconds: Option<u64>,
    /// Block payload bytes put on the wire by this agent process (after compression).
    pub sent_bytes: u64,
    pub sent_blocks: u64,
    /// Why the current or last rescan happened, and what it sent.
    pub last_rescan: Option<RescanReport>,
    /// How changes are found: `tracepoint` (kernel block events) or `scan` (periodic hashing).
    pub tracker: String,
    /// How this agent process picked up the disk: `initial-sync`, `resume` (clean restart: saved
    /// dirty bitmap, no rescan) or `rescan`, and why.
    pub start: Option<StartReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartReport {
    pub kind: StartKind,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RescanReport {
    pub reason: String,
    pub scanned_bytes: u64,
    pub differing_blocks: u64,
    pub sent_bytes: u64,
    pub finished: bool,
}

impl Status {
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let p = dir.join(STATUS_FILE);
        let data = serde_json::to_vec_pretty(self).expect("status serialises");
        write_atomic(&p, &data, 0o644).map_err(|e| StateError::Write(p, e))
    }

    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let p = dir.join(STATUS_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let raw = read_capped(&p, 4 << 20).map_err(|e| StateError::Read(p.clone(), e))?;
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| StateError::Parse(p, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_keep_their_documented_names() {
        use ReplicationState::*;
        for (s, name) in [
            (Connecting, "connecting"),
            (InitialSync, "initial-sync"),
            (Rescan, "rescan"),
            (Continuous, "continuous"),
            (Lagging, "lagging"),
            (Stalled, "stalled"),
            (Disconnected, "disconnected"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.to_string(), name);
            assert_eq!(
                serde_json::from_value::<ReplicationState>(name.into()).unwrap(),
                s
            );
            if let Some(w) = s.wire() {
                assert_eq!(ReplicationState::try_from(w), Ok(s));
            }
        }
        use ConnectionState as C;
        for (s, name) in [
            (C::Connecting, "connecting"),
            (C::Connected, "connected"),
            (C::Stalled, "stalled"),
            (C::Reconnecting, "reconnecting"),
            (C::Stopped, "stopped"),
            (C::Failed, "failed"),
            (C::NeverStarted, "never started"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.to_string(), name);
            assert_eq!(
                serde_json::from_value::<ConnectionState>(name.into()).unwrap(),
                s
            );
        }
        for (s, name) in [
            (StartKind::InitialSync, "initial-sync"),
            (StartKind::Resume, "resume"),
            (StartKind::Rescan, "rescan"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.to_string(), name);
        }
        // The status table pads the state to its column.
        assert_eq!(format!("{:<13}|", Continuous), "continuous   |");
    }
}
