//! Group points: one recovery point of every machine of a consistency group (a recovery plan's
//! machines) at one instant.
//!
//! Every agent of the group is asked at once for a *held* consistency point: it freezes its
//! filesystems, drains what is dirty, marks the point in its stream and stays frozen. Once every
//! mark has arrived (the barrier), the server releases them all and they thaw; every machine was
//! then frozen at the instant of the last mark, so the points are app-consistent together. The
//! whole window from the request to the release is capped ([`GROUP_WINDOW`]), and each agent's
//! freeze by [`GROUP_MAX_FREEZE_MS`] on its own side.
//!
//! If one machine cannot take part (its agent is not connected or still syncing, it cannot
//! freeze, or its mark misses the window), the held points are given up (the ones already taken
//! are removed) and every machine gets a crash-consistent point queued on its writer at one
//! instant of its stream (from its volumes when no session runs); the group's note says why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::msg::PointConsistency;
use rehost_proto::MachineId;
use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::request::{add_prepared, prepare_live, stream_point, synced};
use super::{Consistency, SnapshotError, SnapshotInfo, POINT_TIMEOUT};
use crate::catalog::{now, Catalog, CatalogError};
use crate::Shared;

/// The longest from the request to the release of a group point: past it, the group falls back
/// to crash-consistent points.
pub const GROUP_WINDOW: Duration = Duration::from_millis(1500);

/// The longest an agent keeps its filesystems frozen for a group point, on its own clock. It
/// freezes after the request was sent, so a release within [`GROUP_WINDOW`] finds every machine
/// still frozen.
pub const GROUP_MAX_FREEZE_MS: u32 = 2000;

/// A group point as `snapshots --plan NAME --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupPoint {
    pub id: i64,
    /// The consistency group: the plan's name.
    pub group: String,
    pub created_at: i64,
    /// `app` when every machine was frozen together, else `crash`.
    pub consistency: Consistency,
    /// From the request to the release, as the server measured it (app points only).
    pub window_ms: Option<u64>,
    /// Between the first and the last machine's mark (app points only).
    pub skew_ms: Option<u64>,
    /// What happened: who froze for how long, or why the group fell back.
    pub note: String,
    /// The machines' recovery points, in the group's machine order.
    pub snapshots: Vec<SnapshotInfo>,
}

impl Catalog {
    /// Records a group of complete snapshots as one group point.
    fn record_group(
        &self,
        group: &str,
        consistency: Consistency,
        window_ms: Option<u64>,
        skew_ms: Option<u64>,
        note: &str,
        snapshots: &[i64],
    ) -> Result<(i64, i64), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let at = now();
            tx.execute(
                "INSERT INTO point_groups (label, created_at, consistency, window_ms, skew_ms, note)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![group, at, consistency, window_ms, skew_ms, note],
            )?;
            let id = tx.last_insert_rowid();
            for s in snapshots {
                tx.execute(
                    "UPDATE snapshots SET group_id = ?1 WHERE id = ?2",
                    params![id, s],
                )?;
            }
            tx.commit()?;
            Ok((id, at))
        })
    }

    /// Removes a group point whose snapshots are all gone (expired or deleted); returns whether
    /// it did.
    pub fn remove_empty_group(&self, id: i64) -> Result<bool, CatalogError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM point_groups WHERE id = ?1
                 AND NOT EXISTS (SELECT 1 FROM snapshots WHERE group_id = ?1)",
                [id],
            )
            .map(|n| n > 0)
        })
    }

    /// The group points of `group`, oldest first, with the snapshots of theirs that remain.
    pub fn group_points(&self, group: &str) -> Result<Vec<GroupPoint>, CatalogError> {
        let rows = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, label, created_at, consistency, window_ms, skew_ms, note
                 FROM point_groups WHERE label = ?1 ORDER BY id",
            )?;
            let rows = st
                .query_map([group], |r| {
                    Ok(GroupPoint {
                        id: r.get(0)?,
                        group: r.get(1)?,
                        created_at: r.get(2)?,
                        consistency: r.get(3)?,
                        window_ms: r.get(4)?,
                        skew_ms: r.get(5)?,
                        note: r.get(6)?,
                        snapshots: Vec::new(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        let mut rows = rows;
        if rows.is_empty() {
            return Ok(rows);
        }
        let all = self.snapshots_in_groups(&rows.iter().map(|g| g.id).collect::<Vec<_>>())?;
        for g in &mut rows {
            g.snapshots = all
                .iter()
                .filter(|s| s.group_id == Some(g.id))
                .cloned()
                .collect();
        }
        Ok(rows)
    }
}

/// Ends a group point that is given up: the release every held agent waits for, and the removal
/// of the points already taken (they belong to no group).
async fn give_up(shared: &Arc<Shared>, held: Vec<Held>) {
    for h in &held {
        let _ = h
            .out
            .send(rehost_proto::Message::PointRelease { id: h.id })
            .await;
    }
    for h in held {
        if h.marked_at.is_none() {
            shared.slot(&h.machine).forget_point(h.id);
            continue;
        }
        if let Ok(Ok(Ok(info))) = tokio::time::timeout(POINT_TIMEOUT, h.snapshot).await {
            let (s, id) = (shared.clone(), info.id);
            let removed = crate::task::blocking(move || {
                s.catalog.remove_snapshot(id).map_err(SnapshotError::from)
            })
            .await;
            match removed {
                Ok(()) => {
                    tracing::info!(machine = %h.machine, snapshot = id, "held point of a failed group removed")
                }
                Err(e) => {
                    tracing::warn!(machine = %h.machine, snapshot = id, error = %e, "remove the held point of a failed group")
                }
            }
        }
    }
}

/// One machine's held point while the group waits for its mark.
struct Held {
    machine: MachineId,
    id: u64,
    out: tokio::sync::mpsc::Sender<rehost_proto::Message>,
    marked: tokio::sync::oneshot::Receiver<crate::PointMarked>,
    marked_at: Option<Instant>,
    snapshot: crate::SnapshotReply,
}

/// What the frozen path gives: the points, window and skew, and the note.
struct Frozen {
    snapshots: Vec<SnapshotInfo>,
    window_ms: u64,
    skew_ms: u64,
    note: String,
}

/// Every machine frozen together; `Ok(Err(why))` when the group must fall back.
async fn frozen_group(
    shared: &Arc<Shared>,
    machines: &[MachineId],
    reason: &str,
) -> Result<Result<Frozen, String>, SnapshotError> {
    let start = Instant::now();
    let mut held = Vec::new();
    for m in machines {
        let slot = shared.slot(m);
        let Some(out) = slot.agent() else {
            give_up(shared, held).await;
            return Ok(Err(format!("{m}: its agent disconnected")));
        };
        let (id, marked, snapshot) = slot.expect_group_point(reason);
        let asked = out
            .send(rehost_proto::Message::PointRequest {
                id,
                max_freeze_ms: GROUP_MAX_FREEZE_MS,
                hold: true,
            })
            .await;
        held.push(Held {
            machine: m.clone(),
            id,
            out,
            marked,
            marked_at: None,
            snapshot,
        });
        if asked.is_err() {
            give_up(shared, held).await;
            return Ok(Err(format!("{m}: its agent disconnected")));
        }
    }
    let deadline = tokio::time::Instant::from_std(start + GROUP_WINDOW);
    let mut failed = Vec::new();
    let mut notes = Vec::new();
    for h in &mut held {
        match tokio::time::timeout_at(deadline, &mut h.marked).await {
            Ok(Ok(mark)) => {
                h.marked_at = Some(mark.at);
                if mark.consistency == PointConsistency::App {
                    notes.push(format!("{}: {}", h.machine, mark.note));
                } else {
                    failed.push(format!("{}: {}", h.machine, mark.note));
                }
            }
            Ok(Err(_)) => failed.push(format!("{}: its session ended", h.machine)),
            Err(_) => failed.push(format!(
                "{}: no mark within {} ms",
                h.machine,
                GROUP_WINDOW.as_millis()
            )),
        }
    }
    if !failed.is_empty() {
        give_up(shared, held).await;
        return Ok(Err(failed.join("; ")));
    }
    for h in &held {
        let _ = h
            .out
            .send(rehost_proto::Message::PointRelease { id: h.id })
            .await;
    }
    let window = start.elapsed();
    let marks: Vec<Instant> = held.iter().filter_map(|h| h.marked_at).collect();
    let skew = match (marks.iter().min(), marks.iter().max()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    let mut snapshots = Vec::new();
    for h in held {
        match tokio::time::timeout(POINT_TIMEOUT, h.snapshot).await {
            Ok(Ok(Ok(info))) => snapshots.push(info),
            Ok(Ok(Err(e))) => return Err(e),
            _ => {
                return Err(SnapshotError::Internal(format!(
                    "{}: its marked point was not taken",
                    h.machine
                )))
            }
        }
    }
    Ok(Ok(Frozen {
        snapshots,
        window_ms: window.as_millis() as u64,
        skew_ms: skew.as_millis() as u64,
        note: notes.join("; "),
    }))
}

/// Takes one group point of `machines` (the consistency group `group`), and records it.
pub async fn take(
    shared: Arc<Shared>,
    group: String,
    machines: Vec<MachineId>,
    reason: String,
) -> Result<GroupPoint, SnapshotError> {
    if machines.is_empty() {
        return Err(SnapshotError::NotReady(format!(
            "{group} has no machines: nothing to take a point of"
        )));
    }
    let mut absent = Vec::new();
    for m in &machines {
        if shared.slot(m).agent().is_none() {
            absent.push(format!("{m}: its agent is not connected"));
        } else if !synced(&shared, m).await? {
            absent.push(format!("{m}: not every disk has finished its initial sync"));
        }
    }
    // Most of the changed data is stored ahead, while the streams still flow.
    let mut prepared = Vec::new();
    for m in &machines {
        prepared.push(prepare_live(&shared, &shared.slot(m), m).await);
    }
    let why = if absent.is_empty() {
        match frozen_group(&shared, &machines, &reason).await? {
            Ok(mut f) => {
                for (info, bytes) in f.snapshots.iter_mut().zip(&prepared) {
                    add_prepared(&shared, info, *bytes).await;
                }
                tracing::info!(%group, window_ms = f.window_ms, skew_ms = f.skew_ms, "group point: every machine frozen together");
                return record(
                    &shared,
                    &group,
                    Consistency::App,
                    Some(f.window_ms),
                    Some(f.skew_ms),
                    f.note,
                    f.snapshots,
                )
                .await;
            }
            Err(why) => why,
        }
    } else {
        absent.join("; ")
    };
    tracing::warn!(%group, reason = %why, "group point: not every machine could freeze; crash-consistent points at one instant");
    // One instant: every writer gets its point job at once.
    let mut tasks = Vec::new();
    for (m, bytes) in machines.iter().zip(prepared) {
        tasks.push(tokio::spawn(stream_point(
            shared.clone(),
            m.clone(),
            Consistency::Crash,
            reason.clone(),
            bytes,
        )));
    }
    let mut snapshots = Vec::new();
    for t in tasks {
        snapshots.push(
            t.await
                .map_err(|e| SnapshotError::Internal(e.to_string()))??,
        );
    }
    let note = format!("crash-consistent at one instant of every stream: {why}");
    record(
        &shared,
        &group,
        Consistency::Crash,
        None,
        None,
        note,
        snapshots,
    )
    .await
}

async fn record(
    shared: &Arc<Shared>,
    group: &str,
    consistency: Consistency,
    window_ms: Option<u64>,
    skew_ms: Option<u64>,
    note: String,
    mut snapshots: Vec<SnapshotInfo>,
) -> Result<GroupPoint, SnapshotError> {
    let ids: Vec<i64> = snapshots.iter().map(|s| s.id).collect();
    let (s, g, n) = (shared.clone(), group.to_string(), note.clone());
    let (id, created_at) = crate::task::blocking(move || {
        s.catalog
            .record_group(&g, consistency, window_ms, skew_ms, &n, &ids)
            .map_err(SnapshotError::from)
    })
    .await?;
    for s in &mut snapshots {
        s.group_id = Some(id);
    }
    Ok(GroupPoint {
        id,
        group: group.to_string(),
        created_at,
        consistency,
        window_ms,
        skew_ms,
        note,
        snapshots,
    })
}
