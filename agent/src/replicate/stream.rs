//! Streaming: a plan through the pipeline onto the connection, and the phases made of it — the
//! rescan, a scan pass, a round of dirty blocks — each returning what it sent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::msg::{Block, Mark, MarkKind, ReplicationState, Zero};
use rehost_proto::{DiskId, Message, MAX_INDEX_CHUNK};
use tracing::{info, warn};

use super::{DiskRun, RunError, LOG, STALLED_AFTER};
use crate::conn::Conn;
use crate::pipeline::{self, Item, Plan};
use crate::state::RescanReport;
use crate::tracker::DirtySet;

/// What a phase put on the wire: block payload bytes (after compression) and blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Sent {
    pub(super) bytes: u64,
    pub(super) blocks: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.bytes += o.bytes;
        self.blocks += o.blocks;
    }
}

/// Frames sent and not yet acknowledged: (sequence, end offset, block bytes), to show durable
/// progress and a compare pass's backlog.
type Inflight = VecDeque<(u64, u64, u64)>;

/// Sends the zero run `zero`, if any.
async fn flush_zero(
    conn: &mut Conn,
    disk_id: DiskId,
    zero: Option<(u64, u64)>,
    inflight: &mut Inflight,
) -> Result<(), RunError> {
    if let Some((o, l)) = zero {
        let seq = conn
            .send_seq(|seq| {
                Message::Zero(Zero {
                    seq,
                    disk_id,
                    offset: o,
                    length: l,
                })
            })
            .await?;
        inflight.push_back((seq, o + l, 0));
    }
    Ok(())
}

impl DiskRun<'_, '_> {
    pub(super) async fn send_mark(&mut self, kind: MarkKind) -> Result<(), RunError> {
        let g = self.g;
        let conn = &mut *self.link.conn;
        let seq = conn
            .send_seq(|seq| {
                Message::Mark(Mark {
                    seq,
                    disk_id: g.disk_id,
                    kind,
                    generation: 0,
                })
            })
            .await?;
        conn.wait_acked(seq).await?;
        self.link
            .agent
            .disk_status(g.disk_id.0, |s| s.replicated_bytes = s.size_bytes);
        Ok(())
    }

    pub(super) async fn rescan(&mut self, upto: u64, reason: &str) -> Result<(), RunError> {
        let (agent, g) = (self.link.agent, self.g);
        warn!(target: LOG, disk = %g.device, bytes = upto, reason, "rescan: comparing every block with the server's hash index");
        agent.disk_status(g.disk_id.0, |s| {
            s.state = ReplicationState::Rescan;
            s.last_rescan = Some(RescanReport {
                reason: reason.into(),
                ..Default::default()
            });
        });
        let sent = self.compare_range(upto).await?;
        agent.disk_status(g.disk_id.0, |s| {
            if let Some(r) = &mut s.last_rescan {
                r.scanned_bytes = upto;
                r.sent_bytes = sent.bytes;
                r.differing_blocks = sent.blocks;
                r.finished = true;
            }
        });
        info!(target: LOG, disk = %g.device, scanned = upto, differing_blocks = sent.blocks, sent_bytes = sent.bytes, "rescan complete");
        Ok(())
    }

    /// One pass of the scan tracker over a synced disk.
    pub(super) async fn scan_pass(&mut self) -> Result<Sent, RunError> {
        self.compare_range(self.g.size_bytes).await
    }

    /// Hashes `[0, upto)` chunk by chunk against the server's index and sends what differs.
    async fn compare_range(&mut self, upto: u64) -> Result<Sent, RunError> {
        let (g, d) = (self.g, self.d);
        let bs = u64::from(g.block_size);
        let blocks = upto.div_ceil(bs);
        let mut sent = Sent::default();
        let mut b = 0u64;
        while b < blocks {
            let count = (blocks - b).min(u64::from(MAX_INDEX_CHUNK)) as u32;
            let known = self.link.conn.index(g.disk_id, b, count).await?;
            let end = ((b + u64::from(count)) * bs).min(g.size_bytes);
            let plan = Plan {
                start: b * bs,
                end,
                block_size: g.block_size,
                known: Some(Arc::new(known)),
                blocks: None,
                uncached: d.block_device,
            };
            sent += self.stream(plan).await?;
            b += u64::from(count);
        }
        Ok(sent)
    }

    /// Sends the blocks of `taken` and waits until the server holds them durably; they stay in
    /// `pending` meanwhile, so a dropped connection puts them back into the dirty set. A round
    /// not acknowledged for [`STALLED_AFTER`] shows the disk as `stalled`.
    pub(super) async fn send_round(&mut self, taken: DirtySet) -> Result<Sent, RunError> {
        let (g, d) = (self.g, self.d);
        let started = Instant::now();
        let blocks: Vec<u64> = taken.iter().collect();
        tracing::debug!(target: LOG, disk = %g.device, ?blocks, "sending dirty blocks");
        self.t.pending = Some(taken);
        let plan = Plan {
            start: 0,
            end: g.size_bytes,
            block_size: g.block_size,
            known: None,
            blocks: Some(Arc::new(blocks)),
            uncached: d.block_device,
        };
        let sent = self.stream(plan).await?;
        let conn = &mut *self.link.conn;
        let last = conn.last_seq();
        loop {
            match tokio::time::timeout(Duration::from_secs(1), conn.wait_acked(last)).await {
                Ok(r) => break r?,
                Err(_) if started.elapsed() > STALLED_AFTER => {
                    self.link.agent.set_state(g, ReplicationState::Stalled);
                }
                Err(_) => {}
            }
        }
        self.t.pending = None;
        Ok(sent)
    }

    /// Streams one plan through the pipeline; returns once every frame is queued (not yet
    /// acked), with what it sent.
    pub(super) async fn stream(&mut self, plan: Plan) -> Result<Sent, RunError> {
        const MAX_ZERO_RUN: u64 = 1 << 30;
        let (agent, g, d) = (self.link.agent, self.g, self.d);
        let link = &mut *self.link;
        let conn = &mut *link.conn;
        let initial = plan.known.is_none();
        let mut segments = pipeline::spawn(d.file.clone(), plan.clone(), link.opts.workers);
        let mut zero: Option<(u64, u64)> = None;
        let mut inflight = Inflight::new();
        let mut total = Sent::default();
        let disk_id = g.disk_id;
        while let Some(next) = segments.recv().await {
            if *link.shutdown.borrow() {
                return Err(RunError::Stopped);
            }
            let seg = next
                .await
                .map_err(|_| RunError::BadState("pipeline worker stopped"))?;
            let seg = seg.map_err(|e| RunError::Read(d.path.clone(), plan.start, e))?;
            let mut sent = Sent::default();
            for item in seg.items {
                match item {
                    Item::Zero { offset, length } => match zero {
                        Some((o, l)) if o + l == offset && l < MAX_ZERO_RUN => {
                            zero = Some((o, l + length))
                        }
                        _ => {
                            flush_zero(conn, disk_id, zero.take(), &mut inflight).await?;
                            zero = Some((offset, length));
                        }
                    },
                    Item::Block {
                        offset,
                        length,
                        hash,
                        compression,
                        payload,
                    } => {
                        flush_zero(conn, disk_id, zero.take(), &mut inflight).await?;
                        sent.bytes += payload.len() as u64;
                        sent.blocks += 1;
                        let seq = conn
                            .send_seq(|seq| {
                                Message::Block(Block {
                                    seq,
                                    disk_id,
                                    offset,
                                    length,
                                    hash,
                                    compression,
                                    payload,
                                })
                            })
                            .await?;
                        inflight.push_back((seq, offset + u64::from(length), u64::from(length)));
                    }
                }
            }
            total += sent;
            let acked = conn.acked();
            let mut durable = None;
            while inflight.front().is_some_and(|(s, _, _)| *s <= acked) {
                durable = inflight.pop_front().map(|(_, e, _)| e);
            }
            // Changed blocks a compare pass found that the server does not hold durably yet.
            let found_unacked: u64 = inflight.iter().map(|(_, _, n)| n).sum();
            let done = seg.offset + seg.len;
            agent.disk_status(g.disk_id.0, |s| {
                s.sent_bytes += sent.bytes;
                s.sent_blocks += sent.blocks;
                if initial {
                    if let Some(e) = durable {
                        s.replicated_bytes = s.replicated_bytes.max(e);
                    }
                    s.progress_percent =
                        (s.replicated_bytes as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                    s.backlog_bytes = g.size_bytes - s.replicated_bytes.min(g.size_bytes);
                } else if s.state == ReplicationState::Rescan {
                    s.progress_percent =
                        (done as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                    s.backlog_bytes = g.size_bytes - done;
                } else {
                    s.backlog_bytes = found_unacked;
                }
            });
        }
        flush_zero(conn, disk_id, zero.take(), &mut inflight).await?;
        Ok(total)
    }
}
