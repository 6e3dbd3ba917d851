//! How a disk starts: its change tracker, taken the first time this process sees the disk, and
//! the decision between initial sync, resume and rescan.

use std::time::Instant;

use rehost_proto::msg::{DiskGrant, MarkKind, ReplicationState};
use tracing::{info, warn};

use super::{Agent, DiskRun, OpenDisk, RunError, LOG};
use crate::cleanstop;
use crate::pipeline::Plan;
use crate::state::{Phase, StartKind};
use crate::tracker::{Continuity, DirtySet, TraceTracker};

pub(super) enum Tracker {
    Trace(TraceTracker),
    Scan { last_pass: Option<Instant> },
}

/// A disk's change tracking for the life of this process.
pub(super) struct Tracked {
    pub(super) tracker: Tracker,
    /// Blocks taken from the tracker and sent, not yet acknowledged: they go back into the dirty
    /// set if the connection drops.
    pub(super) pending: Option<DirtySet>,
    /// The tracker (with `pending`) accounts for every difference between the source and what the
    /// server holds, so no rescan is needed.
    pub(super) vouched: bool,
    /// Why not, when not.
    why_not: String,
    /// A clean-stop bitmap to merge once the server confirms the generation.
    saved: Option<Result<cleanstop::Saved, String>>,
    continuity: Continuity,
    /// The agent's state knew this disk under the server's id.
    known: bool,
}

impl Tracked {
    /// Nothing vouches for the server's copy any more (events were lost): the next start rescans,
    /// saying `reason`, unless a finished comparison vouches again.
    pub(super) fn distrust(&mut self, reason: &str) {
        self.vouched = false;
        self.why_not = reason.to_string();
    }

    pub(super) fn kind(&self) -> &'static str {
        match self.tracker {
            Tracker::Trace(_) => "tracepoint",
            Tracker::Scan { .. } => "scan",
        }
    }

    pub(super) fn dirty_count(&self) -> u64 {
        match &self.tracker {
            Tracker::Trace(t) => t.dirty.lock().unwrap_or_else(|p| p.into_inner()).count(),
            Tracker::Scan { .. } => 0,
        }
    }

    /// Decides, on the first grant this process gets for a disk, whether the saved state vouches
    /// for the server's copy.
    pub(super) fn first_decision(&mut self, g: &DiskGrant, known: bool) {
        self.known = known;
        let saved = self.saved.take();
        let verdict: Result<DirtySet, String> = match saved {
            _ if !known => Err("the server holds data this agent has no state for (reinstalled or state lost)".into()),
            None => Err("the agent did not stop cleanly (no saved dirty bitmap): writes made meanwhile are unknown".into()),
            Some(Err(r)) => Err(r),
            Some(Ok(_)) if g.clean_stop_generation == 0 => {
                Err("the server recorded no clean stop for this disk".into())
            }
            Some(Ok(s)) if s.generation != g.clean_stop_generation => Err(format!(
                "the saved dirty bitmap is generation {:016x}, the server recorded {:016x}",
                s.generation, g.clean_stop_generation
            )),
            Some(Ok(s)) if s.size != g.size_bytes || s.block_size != g.block_size => {
                Err("the saved dirty bitmap is for another disk geometry".into())
            }
            Some(Ok(s)) => match &self.continuity {
                Continuity::Unbroken => Ok(s.dirty),
                Continuity::Broken(r) => Err(r.clone()),
            },
        };
        match verdict {
            Ok(dirty) => {
                if let Tracker::Trace(tr) = &self.tracker {
                    tr.dirty
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .merge(&dirty);
                }
                self.pending = None;
                self.vouched = true;
            }
            Err(r) => {
                self.vouched = false;
                self.why_not = r;
            }
        }
    }
}

/// Starts tracking a disk the first time this process sees it, before any of it is read.
pub(super) fn track(agent: &Agent, g: &DiskGrant, d: &OpenDisk) -> Tracked {
    let saved = match cleanstop::take(&agent.dir, g.disk_id.0) {
        Ok(s) => s,
        Err(e) => Some(Err(format!("cannot read the saved dirty bitmap: {e}"))),
    };
    let machine = agent
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .machine_id
        .clone();
    let (tracker, continuity) = if d.block_device {
        match TraceTracker::start(
            &TraceTracker::instance_name(&machine, g.disk_id.0),
            &d.path,
            d.size,
            g.block_size,
        ) {
            Ok((t, c)) => (Tracker::Trace(t), c),
            Err(e) => {
                warn!(target: LOG, disk = %g.device, error = %format!("{:#}", anyhow::Error::from(e)), "kernel block tracepoints unavailable; using the scan tracker");
                (Tracker::Scan { last_pass: None }, Continuity::Unbroken)
            }
        }
    } else {
        (Tracker::Scan { last_pass: None }, Continuity::Unbroken)
    };
    info!(target: LOG, disk = %g.device, tracker = match tracker { Tracker::Trace(_) => "tracepoint", _ => "scan" }, "tracking changes");
    Tracked {
        tracker,
        pending: None,
        vouched: false,
        why_not: String::new(),
        saved,
        continuity,
        known: false,
    }
}

impl DiskRun<'_, '_> {
    /// Brings the disk to continuous replication: resume, rescan, or (the rest of) its initial
    /// sync, as its grant and tracker allow.
    pub(super) async fn start(&mut self) -> Result<(), RunError> {
        let (agent, g, d) = (self.link.agent, self.g, self.d);
        let started = Instant::now();
        if g.sync_complete {
            if self.t.vouched {
                info!(target: LOG, disk = %g.device, dirty_blocks = self.t.dirty_count(), "resuming continuous replication without a rescan");
                agent.set_start(
                    g,
                    StartKind::Resume,
                    "the tracker accounts for every change since the server's copy",
                );
            } else {
                let reason = std::mem::take(&mut self.t.why_not);
                agent.set_start(g, StartKind::Rescan, &reason);
                self.rescan(g.size_bytes, &reason).await?;
                self.send_mark(MarkKind::RescanDone).await?;
                self.t.vouched = true;
            }
        } else {
            // The scan tracker compares every block once the initial sync is done, so an agent
            // that knows the disk can resume it without first rescanning what is below the
            // watermark; kernel tracking cannot see what changed while the agent was down.
            let covered =
                self.t.vouched || (self.t.known && matches!(self.t.tracker, Tracker::Scan { .. }));
            if g.durable_bytes > 0 && !covered {
                let reason = std::mem::take(&mut self.t.why_not);
                agent.set_start(g, StartKind::Rescan, &reason);
                self.rescan(g.durable_bytes, &reason).await?;
            } else if g.durable_bytes > 0 {
                info!(target: LOG, disk = %g.device, from = g.durable_bytes, "resuming initial sync from the server's durable watermark");
                agent.set_start(
                    g,
                    StartKind::Resume,
                    "initial sync resumed from the server's durable watermark",
                );
            } else {
                agent.set_start(
                    g,
                    StartKind::InitialSync,
                    "the server holds nothing of this disk yet",
                );
            }
            self.t.vouched = true;
            {
                let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
                st.set_disk(&d.path, g.disk_id.0, Phase::InitialSync);
            }
            agent.save_state()?;
            self.set_state(ReplicationState::InitialSync);
            let plan = Plan {
                start: g.durable_bytes,
                end: g.size_bytes,
                block_size: g.block_size,
                known: None,
                blocks: None,
                uncached: d.block_device,
            };
            self.stream(plan).await?;
            self.send_mark(MarkKind::InitialSyncDone).await?;
            info!(target: LOG, disk = %g.device, secs = started.elapsed().as_secs_f64(), "initial sync complete");
        }
        {
            let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
            st.set_disk(&d.path, g.disk_id.0, Phase::Synced);
        }
        agent.save_state()?;
        agent.set_consistent(g.disk_id.0, started);
        if let Tracker::Scan { last_pass } = &mut self.t.tracker {
            *last_pass = Some(started);
        }
        agent.disk_status(g.disk_id.0, |s| {
            s.state = ReplicationState::Continuous;
            s.progress_percent = 100.0;
            s.replicated_bytes = s.size_bytes;
            s.backlog_bytes = 0;
        });
        Ok(())
    }
}
