//! The status model: what the daemon shares between its replication flow, the status file
//! (`rehost-agent status`) and the `Progress` frames it sends the server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rehost_proto::msg::{DiskGrant, Progress, ReplicationState};
use rehost_proto::{DiskId, Message};
use tracing::warn;

use super::{now, LAGGING_AFTER, LOG};
use crate::state::{
    AgentState, ConnectionState, DiskStatus, StartKind, StartReport, StateError, Status,
};

/// Shared between the replication flow and the status ticker.
pub struct Agent {
    pub dir: PathBuf,
    pub state: Mutex<AgentState>,
    pub status: Mutex<Status>,
    /// When the last completed pass over each disk started (its data is at least that recent).
    consistent_at: Mutex<Vec<(u64, Instant)>>,
}

impl Agent {
    pub fn new(dir: PathBuf, state: AgentState) -> Arc<Self> {
        let status = Status {
            machine_id: state.machine_id.clone(),
            hostname: state.hostname.clone(),
            server: state.server.clone(),
            pid: std::process::id(),
            agent_version: crate::VERSION.into(),
            running: true,
            connection: ConnectionState::Connecting,
            ..Default::default()
        };
        Arc::new(Self {
            dir,
            state: Mutex::new(state),
            status: Mutex::new(status),
            consistent_at: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn disk_status<T>(
        &self,
        disk: u64,
        f: impl FnOnce(&mut DiskStatus) -> T,
    ) -> Option<T> {
        self.status()
            .disks
            .iter_mut()
            .find(|d| d.disk_id == disk)
            .map(f)
    }

    pub(super) fn lag_ms(&self, disk: u64) -> Option<u64> {
        let c = self.consistent_at.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .find(|(d, _)| *d == disk)
            .map(|(_, t)| t.elapsed().as_millis() as u64)
    }

    pub(super) fn set_consistent(&self, disk: u64, at: Instant) {
        let mut c = self.consistent_at.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(d, _)| *d != disk);
        c.push((disk, at));
    }

    pub(super) fn save_state(&self) -> Result<(), StateError> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.save(&self.dir)
    }

    pub(super) fn write_status(&self) {
        use ReplicationState::{Continuous, Lagging, Stalled};
        let mut s = self.status().clone();
        s.updated_at = now();
        for d in &mut s.disks {
            d.state = self.shown_state(d, s.stall.is_some());
            d.lag_seconds = if matches!(d.state, Continuous | Lagging | Stalled) {
                self.lag_ms(d.disk_id).map(|l| l / 1000)
            } else {
                None
            };
            d.backlog_lower_bound = d.tracker == "scan" && matches!(d.state, Continuous | Lagging);
        }
        if let Err(e) = s.save(&self.dir) {
            warn!(target: LOG, error = %e, "cannot write status file");
        }
    }

    /// The state shown for a disk: `stalled` while the connection is, and for a replicating
    /// disk `lagging` or `continuous` from its lag at this moment. A scanned disk's lag grows
    /// between passes (its data is as recent as the start of its last complete pass), so it
    /// turns `lagging` when the scan interval exceeds [`LAGGING_AFTER`].
    fn shown_state(&self, d: &DiskStatus, stalled: bool) -> ReplicationState {
        use ReplicationState::*;
        match d.state {
            _ if stalled => Stalled,
            Disconnected | Connecting => d.state,
            Continuous | Lagging => match self.lag_ms(d.disk_id) {
                Some(l) if Duration::from_millis(l) > LAGGING_AFTER => Lagging,
                _ => Continuous,
            },
            _ => d.state,
        }
    }

    pub(super) fn progress_messages(&self) -> Vec<Message> {
        let s = self.status().clone();
        s.disks
            .iter()
            .filter_map(|d| {
                if d.state == ReplicationState::Disconnected {
                    return None;
                }
                let state = self.shown_state(d, s.stall.is_some()).wire()?;
                Some(Message::Progress(Progress {
                    disk_id: DiskId(d.disk_id),
                    state,
                    done_bytes: (d.progress_percent / 100.0 * d.size_bytes as f64) as u64,
                    backlog_bytes: d.backlog_bytes,
                    sent_bytes: d.sent_bytes,
                    lag_ms: self.lag_ms(d.disk_id).unwrap_or(0),
                    backlog_lower_bound: d.tracker == "scan"
                        && matches!(
                            state,
                            rehost_proto::msg::DiskState::Continuous
                                | rehost_proto::msg::DiskState::Lagging
                        ),
                }))
            })
            .collect()
    }

    /// Shows a server that answers but acknowledges nothing as `stalled` (the connection is kept).
    pub(super) fn note_slow(&self, slow: Option<String>) {
        let mut s = self.status();
        if slow.is_some() && s.stall.is_none() {
            warn!(target: LOG,
                reason = slow.as_deref().unwrap_or_default(),
                "replication stalled"
            );
            s.last_stall = Some(crate::state::StallReport {
                at: now(),
                reason: slow.clone().unwrap_or_default(),
                reconnected: false,
            });
        }
        if matches!(
            s.connection,
            ConnectionState::Connected | ConnectionState::Stalled
        ) {
            s.connection = if slow.is_some() {
                ConnectionState::Stalled
            } else {
                ConnectionState::Connected
            };
        }
        s.stall = slow;
    }

    pub(super) fn set_start(&self, g: &DiskGrant, kind: StartKind, reason: &str) {
        self.disk_status(g.disk_id.0, |s| {
            s.start = Some(StartReport {
                kind,
                reason: reason.into(),
            })
        });
    }

    pub(super) fn set_state(&self, g: &DiskGrant, state: ReplicationState) {
        self.disk_status(g.disk_id.0, |s| s.state = state);
    }
}
