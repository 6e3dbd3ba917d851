//! The clean stop: what is still dirty is saved under a fresh generation and the server is told,
//! so the next start needs no rescan. Kernel trace instances go on recording meanwhile.

use std::time::Duration;

use rehost_proto::msg::{Mark, MarkKind};
use rehost_proto::Message;
use tracing::{info, warn};

use super::start::Tracker;
use super::{DiskRun, LOG};
use crate::cleanstop;
use crate::tracker::DirtySet;

impl DiskRun<'_, '_> {
    /// On a clean stop: saves what is still dirty of this disk under a fresh generation and
    /// tells the server, so the next start needs no rescan.
    pub(super) async fn clean_stop(&mut self) {
        let g = self.g;
        let t = &mut *self.t;
        if !t.vouched {
            warn!(target: LOG, disk = %g.device, "stopped while comparing the whole disk: the next start will rescan");
            return;
        }
        let mut dirty = match &mut t.tracker {
            Tracker::Trace(tr) => {
                tr.stop();
                tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take()
            }
            Tracker::Scan { .. } => DirtySet::new(g.size_bytes, g.block_size),
        };
        if let Some(p) = t.pending.take() {
            dirty.merge(&p);
        }
        if let Some(reason) = &dirty.lost {
            warn!(target: LOG, disk = %g.device, reason, "events were lost: the next start will rescan");
            return;
        }
        let mut generation = 0u64;
        while generation == 0 {
            let mut b = [0u8; 8];
            rehost_proto::random_bytes(&mut b);
            generation = u64::from_le_bytes(b);
        }
        let count = dirty.count();
        let saved = cleanstop::Saved {
            disk_id: g.disk_id.0,
            generation,
            size: g.size_bytes,
            block_size: g.block_size,
            dirty,
        };
        if let Err(e) = cleanstop::save(&self.link.agent.dir, &saved) {
            warn!(target: LOG, disk = %g.device, error = %e, "cannot save the dirty bitmap: the next start will rescan");
            return;
        }
        let conn = &mut *self.link.conn;
        let told = async {
            let seq = conn
                .send_seq(|seq| {
                    Message::Mark(Mark {
                        seq,
                        disk_id: g.disk_id,
                        kind: MarkKind::CleanStop,
                        generation,
                    })
                })
                .await?;
            conn.wait_acked(seq).await
        };
        match tokio::time::timeout(Duration::from_secs(10), told).await {
            Ok(Ok(())) => {
                info!(target: LOG, disk = %g.device, dirty_blocks = count, generation = format!("{generation:016x}"), "clean stop recorded: the next start resumes without a rescan")
            }
            Ok(Err(e)) => {
                warn!(target: LOG, disk = %g.device, error = %e, "the server did not record the clean stop: the next start will rescan")
            }
            Err(_) => {
                warn!(target: LOG, disk = %g.device, "the server did not acknowledge the clean stop in time: the next start will rescan")
            }
        }
    }
}
