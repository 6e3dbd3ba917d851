//! Asking for a recovery point: through a live session's writer (a point in its stream, or the
//! agent's own consistency point with the source's filesystems frozen), or from the volumes of a
//! machine with no live session; and a cutover's final point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::MachineId;
use tokio::sync::oneshot;

use super::{
    prepare, snapshot_offline, snapshot_session, Consistency, SnapshotError, SnapshotInfo,
};
use crate::writer::{Job, PointDisk};
use crate::Shared;

/// The writer's job for a recovery point at this place of a live session's stream: queue it on
/// the session's writer queue (`jobs.send(job).await`); the snapshot goes to `reply`, when there
/// is one, once it is complete (dropping the receiver is fine). `seq` is the agent's `Point`
/// frame it answers, if any. Calling [`prepare`] on a blocking thread first, while the stream
/// still flows, shortens the pause.
pub fn point_job(
    shared: &Arc<Shared>,
    machine: &MachineId,
    consistency: Consistency,
    reason: String,
    reply: Option<oneshot::Sender<Result<SnapshotInfo, SnapshotError>>>,
    seq: Option<u64>,
) -> Job {
    let (shared, machine) = (shared.clone(), machine.clone());
    let take = move |disks: &[PointDisk<'_>]| {
        let r = snapshot_session(&shared, &machine, disks, consistency, &reason);
        let outcome = r.as_ref().map(|s| s.id).map_err(|e| e.to_string());
        if let Some(reply) = reply {
            let _ = reply.send(r);
        }
        outcome
    };
    Job::Point {
        take: Box::new(take),
        seq,
    }
}

/// How long the agent gets to answer a consistency-point request before the server takes a point
/// of the stream without its help.
pub const POINT_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest an agent may keep the source's filesystems frozen for a point.
pub const MAX_FREEZE_MS: u32 = 2000;

/// Asks the connected agent for a consistency point (it freezes the filesystems on its disks,
/// or waits for a quiet moment, and marks the point in its stream, where the writer takes the
/// snapshot). `Ok(None)`: no agent is connected, or it did not answer in time (logged), and the
/// caller takes a point of the stream instead.
async fn agent_point(
    slot: &crate::Slot,
    machine: &MachineId,
    reason: &str,
    timeout: Duration,
) -> Result<Option<SnapshotInfo>, SnapshotError> {
    let Some(out) = slot.agent() else {
        return Ok(None);
    };
    let (id, rx) = slot.expect_point(reason);
    let asked = out
        .send(rehost_proto::Message::PointRequest {
            id,
            max_freeze_ms: MAX_FREEZE_MS,
            hold: false,
        })
        .await;
    drop(out);
    if asked.is_err() {
        slot.forget_point(id);
        return Ok(None);
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r.map(Some),
        Ok(Err(_)) => {
            tracing::warn!(%machine, "the agent's session ended before its consistency point");
            Ok(None)
        }
        Err(_) => {
            slot.forget_point(id);
            tracing::warn!(%machine, secs = timeout.as_secs(), "the agent gave no consistency point in time");
            Ok(None)
        }
    }
}

/// Whether every disk of `machine` finished its initial sync (an agent still syncing answers a
/// point only once it is done; the stream point path reports why it cannot be taken yet).
pub(super) async fn synced(
    shared: &Arc<Shared>,
    machine: &MachineId,
) -> Result<bool, SnapshotError> {
    let (s, m) = (shared.clone(), machine.clone());
    let rows = tokio::task::spawn_blocking(move || s.catalog.machines())
        .await
        .map_err(|e| SnapshotError::Internal(e.to_string()))??;
    Ok(rows
        .into_iter()
        .find(|(r, _)| r.id == m.as_str())
        .is_some_and(|(_, d)| !d.is_empty() && d.iter().all(|d| d.sync_complete)))
}

/// Counts the chunks [`prepare`] stored ahead of the point as added by this snapshot.
pub(super) async fn add_prepared(shared: &Arc<Shared>, info: &mut SnapshotInfo, prepared: u64) {
    if prepared == 0 {
        return;
    }
    let (s, id) = (shared.clone(), info.id);
    let add = move || s.catalog.add_snapshot_bytes(id, prepared);
    match tokio::task::spawn_blocking(add).await {
        Ok(Ok(())) => info.bytes_added += prepared,
        Ok(Err(e)) => tracing::warn!(snapshot = id, error = %e, "record prepared bytes"),
        Err(e) => tracing::warn!(snapshot = id, error = %e, "record prepared bytes"),
    }
}

/// [`prepare`] for a machine with a live session (nothing to prepare otherwise); returns the
/// bytes it stored. A failure is logged: the snapshot then stores that data itself.
pub(super) async fn prepare_live(
    shared: &Arc<Shared>,
    slot: &crate::Slot,
    machine: &MachineId,
) -> u64 {
    let mut prepared = 0;
    if slot.jobs().is_some() {
        let (s, m) = (shared.clone(), machine.clone());
        let start = Instant::now();
        match tokio::task::spawn_blocking(move || prepare(&s, &m)).await {
            Ok(Ok(bytes)) => {
                prepared = bytes;
                tracing::debug!(%machine, bytes, ms = start.elapsed().as_millis() as u64, "snapshot data prepared")
            }
            Ok(Err(e)) => {
                tracing::warn!(%machine, error = %e, "preparing snapshot data failed; the snapshot stores it")
            }
            Err(e) => tracing::warn!(%machine, error = %e, "preparing snapshot data failed"),
        }
    }
    prepared
}

/// A cutover's final point: only the agent's own consistency point (freeze, drain, mark, thaw)
/// within `timeout`, never a point of the stream without it. The error says why there is none.
pub async fn final_point(
    shared: Arc<Shared>,
    machine: MachineId,
    reason: String,
    timeout: Duration,
) -> Result<SnapshotInfo, SnapshotError> {
    let slot = shared.slot(&machine);
    if slot.agent().is_none() {
        return Err(SnapshotError::NotReady(
            "the machine's agent is not connected".into(),
        ));
    }
    if !synced(&shared, &machine).await? {
        return Err(SnapshotError::NotReady(
            "not every disk has finished its initial sync".into(),
        ));
    }
    let prepared = prepare_live(&shared, &slot, &machine).await;
    match agent_point(&slot, &machine, &reason, timeout).await? {
        Some(mut info) => {
            add_prepared(&shared, &mut info, prepared).await;
            Ok(info)
        }
        None => Err(SnapshotError::NotReady(format!(
            "the agent gave no consistency point within {} s",
            timeout.as_secs()
        ))),
    }
}

/// Takes a snapshot of `machine` now: through its live session's writer (a point in its stream,
/// after [`prepare`] stored most of the changed data without pausing it), or directly from its
/// volumes when no agent is connected.
pub async fn request(
    shared: Arc<Shared>,
    machine: MachineId,
    consistency: Consistency,
    reason: String,
    ask_agent: bool,
) -> Result<SnapshotInfo, SnapshotError> {
    let slot = shared.slot(&machine);
    let prepared = prepare_live(&shared, &slot, &machine).await;
    let from_agent = if ask_agent && synced(&shared, &machine).await? {
        agent_point(&slot, &machine, &reason, POINT_TIMEOUT).await?
    } else {
        None
    };
    if let Some(mut info) = from_agent {
        add_prepared(&shared, &mut info, prepared).await;
        return Ok(info);
    }
    stream_point(shared, machine, consistency, reason, prepared).await
}

/// A point of `machine`'s stream now, without its agent: queued on its live session's writer, or
/// taken from its volumes when no session runs. `prepared`: what [`prepare_live`] stored for it.
pub(super) async fn stream_point(
    shared: Arc<Shared>,
    machine: MachineId,
    consistency: Consistency,
    reason: String,
    prepared: u64,
) -> Result<SnapshotInfo, SnapshotError> {
    let slot = shared.slot(&machine);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(jobs) = slot.jobs() {
            let (tx, rx) = oneshot::channel();
            let job = point_job(
                &shared,
                &machine,
                consistency,
                reason.clone(),
                Some(tx),
                None,
            );
            if jobs.send(job).await.is_ok() {
                drop(jobs);
                match rx.await {
                    Ok(Ok(mut info)) if prepared > 0 => {
                        add_prepared(&shared, &mut info, prepared).await;
                        return Ok(info);
                    }
                    Ok(r) => return r,
                    Err(_) => {}
                }
            }
        } else if let Ok(guard) = slot.lock.clone().try_lock_owned() {
            let shared = shared.clone();
            return tokio::task::spawn_blocking(move || {
                let _slot = guard;
                let start = Instant::now();
                let r = snapshot_offline(&shared, &machine, consistency, &reason);
                tracing::debug!(ms = start.elapsed().as_millis() as u64, "offline snapshot");
                r
            })
            .await
            .map_err(|e| SnapshotError::Internal(e.to_string()))?;
        }
        if Instant::now() > deadline {
            return Err(SnapshotError::Busy(format!(
                "machine {machine}'s session is starting or ending; try again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
