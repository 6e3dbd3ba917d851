//! Consistency points: freeze the filesystems on the machine's disks (or, with none, wait for a
//! quiet moment), drain what is dirty, mark the point in the stream, thaw.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rehost_proto::msg::{DiskGrant, PointConsistency};
use rehost_proto::Message;
use tracing::{info, warn};

use super::start::{Tracked, Tracker};
use super::{now, Link, OpenDisk, RunError, LOG};
use crate::conn::PointAsk;

impl Link<'_> {
    /// Sends what is dirty, in rounds, until a round finds nothing new: every write completed
    /// before that moment is then in the stream. `Ok(false)`: not quiet by `deadline`.
    async fn drain_until_quiet(
        &mut self,
        pairs: &[(&DiskGrant, &OpenDisk)],
        tracked: &mut HashMap<u64, Tracked>,
        deadline: Instant,
    ) -> Result<bool, RunError> {
        let mut scanned = false;
        loop {
            let mut sent_any = false;
            for (g, d) in pairs {
                let t = tracked.get_mut(&g.disk_id.0).expect("tracked");
                let mut disk = self.disk(g, d, t);
                match &disk.t.tracker {
                    Tracker::Trace(tr) => {
                        tr.settle().await;
                        let taken = tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let Some(reason) = taken.lost.clone() {
                            // Put the loss back: the continuous loop answers it with a full compare.
                            tr.dirty
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .merge(&taken);
                            warn!(target: LOG, disk = %g.device, reason, "no consistency point: change tracking lost events");
                            return Ok(false);
                        }
                        if taken.count() > 0 {
                            sent_any = true;
                            disk.send_round(taken).await?;
                        }
                    }
                    Tracker::Scan { .. } if !scanned => {
                        disk.scan_pass().await?;
                        let conn = &mut *disk.link.conn;
                        conn.wait_acked(conn.last_seq()).await?;
                    }
                    Tracker::Scan { .. } => {}
                }
            }
            scanned = true;
            if !sent_any {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// A consistency point the server asked for: freeze the filesystems on the machine's disks
    /// (or, with none, wait for a quiet moment), drain what is dirty, mark the point in the
    /// stream, thaw.
    pub(super) async fn consistency_point(
        &mut self,
        pairs: &[(&DiskGrant, &OpenDisk)],
        tracked: &mut HashMap<u64, Tracked>,
        ask: PointAsk,
    ) -> Result<(), RunError> {
        let agent = self.agent;
        let id = ask.id;
        let cap = Duration::from_millis(u64::from(ask.max_freeze_ms.clamp(10, 60_000)));
        let block_disks: Vec<PathBuf> = pairs
            .iter()
            .filter(|(_, d)| d.block_device)
            .map(|(_, d)| d.path.clone())
            .collect();
        let all_scanned = pairs
            .iter()
            .all(|(g, _)| matches!(tracked[&g.disk_id.0].tracker, Tracker::Scan { .. }));
        let mounts = crate::freeze::mounts_on(&block_disks);
        let mut frozen = None;
        let mut note = String::new();
        if !mounts.is_empty() {
            let paths: Vec<PathBuf> = mounts.iter().map(|(p, _)| p.clone()).collect();
            // This very binary even when an upgrade has replaced its file since it started.
            let exe = PathBuf::from("/proc/self/exe");
            let marker = agent.dir.join(crate::freeze::FREEZE_FILE);
            match tokio::task::spawn_blocking(move || {
                crate::freeze::Frozen::freeze(&paths, cap, &exe, Some(&marker))
            })
            .await
            {
                Ok(Ok(f)) => frozen = Some(f),
                Ok(Err(e)) => note = format!("{:#}; ", anyhow::Error::from(e)),
                Err(e) => note = format!("freeze: {e}; "),
            }
        }
        let deadline = Instant::now()
            + if frozen.is_some() {
                cap
            } else {
                Duration::from_secs(10)
            };
        let quiet = self.drain_until_quiet(pairs, tracked, deadline).await;
        let app = frozen.as_ref().is_some_and(|f| !f.expired());
        let consistency = if app {
            PointConsistency::App
        } else {
            PointConsistency::Crash
        };
        let described: Vec<String> = mounts
            .iter()
            .map(|(p, t)| format!("{} ({t})", p.display()))
            .collect();
        let result = match quiet {
            Ok(true) => {
                // Nothing is sent between the quiet drain and the point, so the stream up to the
                // point holds the disks as they were at that frozen (or quiet) moment; thawing
                // before queueing the point keeps the freeze short. A group point stays frozen
                // until the server has every machine's mark, so the group shares one instant.
                let hold = ask.hold && app;
                let held = match frozen.as_mut() {
                    Some(f) if hold => Some(f.held()),
                    Some(f) => Some(f.thaw()),
                    None => None,
                };
                let freeze_ms = held.map(|h| h.as_millis() as u32).unwrap_or(0);
                note.push_str(&match (app, held) {
                    (true, _) if hold => format!(
                        "froze {} for {freeze_ms} ms to the mark, held for the group",
                        described.join(", ")
                    ),
                    (true, _) => format!("froze {} for {freeze_ms} ms", described.join(", ")),
                    (false, Some(_)) => {
                        format!(
                            "the freeze of {} reached its {} ms cap: crash-consistent point",
                            described.join(", "),
                            cap.as_millis()
                        )
                    }
                    (false, None) if all_scanned => {
                        "no kernel change tracking: point after a full compare pass".to_string()
                    }
                    (false, None) => {
                        "no freezable filesystem: point at a quiet moment (crash-consistent)"
                            .to_string()
                    }
                });
                info!(target: LOG, point = id, consistency = ?consistency, freeze_ms, note, "consistency point marked");
                let text = note.clone();
                let r = self
                    .conn
                    .send_seq(|seq| Message::Point {
                        seq,
                        id,
                        consistency,
                        freeze_ms,
                        note: text,
                    })
                    .await;
                let mut freeze_ms = freeze_ms;
                if let (true, Ok(_), Some(f)) = (hold, &r, frozen.as_mut()) {
                    let left = cap.saturating_sub(f.held());
                    let released = tokio::time::timeout(left, self.conn.released(id))
                        .await
                        .is_ok();
                    let total = f.thaw();
                    freeze_ms = total.as_millis() as u32;
                    if released {
                        info!(target: LOG, point = id, freeze_ms, "group point released: thawed");
                    } else {
                        warn!(target: LOG, point = id, freeze_ms, "the group point was not released within the freeze cap: thawed");
                    }
                }
                let kind = if app { "app" } else { "crash" };
                agent.status().last_point = Some(crate::state::PointReport {
                    at: now(),
                    consistency: kind.into(),
                    freeze_ms,
                    note,
                });
                r.map(drop).map_err(RunError::from)
            }
            Ok(false) => {
                if let Some(f) = frozen.as_mut() {
                    f.thaw();
                }
                warn!(target: LOG, point = id, "no quiet moment for a consistency point; the server falls back to a point of the stream");
                Ok(())
            }
            Err(e) => Err(e),
        };
        drop(frozen);
        result
    }
}
