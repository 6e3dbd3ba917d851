//! A disk's replication state as operators see it, beside the wire's [`DiskState`].

use crate::wire::DiskState;

/// A disk's replication state as the agent names it to operators (`rehost-agent status --json`):
/// the states of the protocol's [`DiskState`], which `Progress` frames carry, and those of a disk
/// that is not replicating right now. Its serde names and `Display` are the documented
/// strings.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationState {
    /// Connected, and the disk's start (initial sync, resume or rescan) is not decided yet.
    #[default]
    Connecting,
    InitialSync,
    Rescan,
    Continuous,
    /// Continuous, but the replica is more than a few seconds behind the source.
    Lagging,
    /// Continuous, but nothing the agent sent has been acknowledged for a long time.
    Stalled,
    /// The agent is not connected to the server.
    Disconnected,
}

impl ReplicationState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::InitialSync => "initial-sync",
            Self::Rescan => "rescan",
            Self::Continuous => "continuous",
            Self::Lagging => "lagging",
            Self::Stalled => "stalled",
            Self::Disconnected => "disconnected",
        }
    }

    /// The state a `Progress` frame carries; none for a disk that is not replicating
    /// (connecting, disconnected).
    pub const fn wire(self) -> Option<DiskState> {
        match self {
            Self::InitialSync => Some(DiskState::InitialSync),
            Self::Rescan => Some(DiskState::Rescan),
            Self::Continuous => Some(DiskState::Continuous),
            Self::Lagging => Some(DiskState::Lagging),
            Self::Stalled => Some(DiskState::Stalled),
            Self::Connecting | Self::Disconnected => None,
        }
    }
}

impl TryFrom<DiskState> for ReplicationState {
    type Error = DiskState;

    /// The state of a disk that a `Progress` frame reports; `Invalid` is none.
    fn try_from(s: DiskState) -> Result<Self, DiskState> {
        match s {
            DiskState::InitialSync => Ok(Self::InitialSync),
            DiskState::Rescan => Ok(Self::Rescan),
            DiskState::Continuous => Ok(Self::Continuous),
            DiskState::Lagging => Ok(Self::Lagging),
            DiskState::Stalled => Ok(Self::Stalled),
            DiskState::Invalid => Err(s),
        }
    }
}

impl std::fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}
