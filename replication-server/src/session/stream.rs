//! The stream of a live session: each frame the agent sends, checked (sequence, disk, range)
//! and turned into a job for the session's writer, or answered (pings, points, source actions).

use std::collections::HashMap;
use std::sync::Arc;

use rehost_proto::frame::read_message;
use rehost_proto::msg::Zero;
use rehost_proto::{DiskId, MachineId, Message};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::disks::Granted;
use super::{blocking, internal, SessionError, IDLE_TIMEOUT};
use crate::auth::Kick;
use crate::volume::Volume;
use crate::writer::Job;
use crate::Shared;

/// One live session's reading side: what every frame is checked against, and where it goes.
pub(super) struct Stream<'a> {
    pub shared: &'a Arc<Shared>,
    pub machine: &'a MachineId,
    pub granted: &'a HashMap<DiskId, Granted>,
    /// Frames to the agent.
    pub out: &'a mpsc::Sender<Message>,
    /// Jobs for the session's writer, in stream order.
    pub jobs: &'a mpsc::Sender<Job>,
    /// Why the session must end (replaced, revoked, stopped), when it must.
    pub kicked: &'a mut tokio::sync::watch::Receiver<Option<Kick>>,
    /// When the last frame arrived (ms since the epoch), for `machines`.
    pub last_frame: &'a std::sync::atomic::AtomicI64,
    pub shutdown: &'a mut tokio::sync::watch::Receiver<bool>,
    /// The sequence number the next sequenced frame must carry.
    pub next_seq: u64,
}

impl<'a> Stream<'a> {
    /// Reads and handles frames until the agent closes, the session is kicked or the server
    /// stops, or a frame is refused.
    pub async fn run<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<(), SessionError> {
        loop {
            let msg = tokio::select! {
                r = tokio::time::timeout(IDLE_TIMEOUT, read_message(rd)) => match r {
                    Err(_) => return Err(SessionError::Idle(IDLE_TIMEOUT)),
                    Ok(m) => m?,
                },
                _ = kicked_changed(self.kicked) => return Err(kicked_error(self.machine, self.kicked.borrow().clone())),
                _ = self.shutdown.changed() => return Err(SessionError::Shutdown),
            };
            self.last_frame.store(
                crate::catalog::now_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let Some(msg) = msg else { return Ok(()) };
            self.frame(msg).await?;
        }
    }

    fn check_seq(&mut self, seq: u64) -> Result<(), SessionError> {
        if seq != self.next_seq {
            return Err(SessionError::Protocol(format!(
                "sequence {seq} where {} was expected",
                self.next_seq
            )));
        }
        self.next_seq += 1;
        Ok(())
    }

    fn disk(&self, id: DiskId) -> Result<&'a Granted, SessionError> {
        self.granted.get(&id).ok_or_else(|| {
            SessionError::Forbidden(format!("{id} does not belong to machine {}", self.machine))
        })
    }

    async fn frame(&mut self, msg: Message) -> Result<(), SessionError> {
        let (shared, machine, out, jobs) = (self.shared, self.machine, self.out, self.jobs);
        match msg {
            Message::Block(b) => {
                self.check_seq(b.seq)?;
                let d = self.disk(b.disk_id)?;
                let expect = d.size.saturating_sub(b.offset).min(d.block_size);
                if b.offset % d.block_size != 0
                    || b.offset >= d.size
                    || u64::from(b.length) != expect
                {
                    return Err(SessionError::OutOfRange(format!(
                        "block at offset {} length {} does not fit {} ({} bytes, {}-byte blocks)",
                        b.offset, b.length, b.disk_id, d.size, d.block_size
                    )));
                }
                jobs.send(Job::Block(b))
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::Zero(z) => {
                let Zero {
                    seq,
                    disk_id,
                    offset,
                    length,
                } = z;
                self.check_seq(seq)?;
                let d = self.disk(disk_id)?;
                let end = offset.checked_add(length).filter(|e| *e <= d.size);
                let aligned = offset % d.block_size == 0
                    && end.is_some_and(|e| e % d.block_size == 0 || e == d.size);
                if !aligned {
                    return Err(SessionError::OutOfRange(format!(
                        "zero range {offset}+{length} does not fit {disk_id} ({} bytes, {}-byte blocks)",
                        d.size, d.block_size
                    )));
                }
                jobs.send(Job::Zero(z))
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::Mark(m) => {
                self.check_seq(m.seq)?;
                self.disk(m.disk_id)?;
                jobs.send(Job::Mark(m))
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::IndexRequest {
                disk_id,
                start_block,
                count,
            } => {
                let d = self.disk(disk_id)?;
                let blocks = d.size.div_ceil(d.block_size);
                if start_block
                    .checked_add(u64::from(count))
                    .is_none_or(|e| e > blocks)
                {
                    return Err(SessionError::OutOfRange(format!(
                        "index request {start_block}+{count} beyond {disk_id}'s {blocks} blocks"
                    )));
                }
                let dir = shared.volume_dir(machine);
                let (size, bs) = (d.size, d.block_size as u32);
                let hashes = blocking(move || {
                    Volume::open(&dir, disk_id.0, size, bs)
                        .and_then(|v| v.read_index(start_block, count))
                        .map_err(internal)
                })
                .await?;
                out.send(Message::IndexChunk {
                    disk_id,
                    start_block,
                    hashes,
                })
                .await
                .map_err(internal)?;
            }
            Message::Progress(p) => {
                self.disk(p.disk_id)?;
                shared.live.progress(machine.as_str(), &p);
            }
            // Echoed, so an agent can tell a live server from a stalled connection.
            Message::Ping { nonce } => out.send(Message::Ping { nonce }).await.map_err(internal)?,
            Message::Point {
                seq,
                id,
                consistency,
                freeze_ms,
                note,
            } => {
                self.check_seq(seq)?;
                let job = match shared.slot(machine).take_point(id) {
                    Some(mut p) => {
                        if let Some(marked) = p.marked.take() {
                            let _ = marked.send(crate::PointMarked {
                                consistency,
                                freeze_ms,
                                note: note.clone(),
                                at: std::time::Instant::now(),
                            });
                        }
                        let consistency = match consistency {
                            rehost_proto::msg::PointConsistency::App => {
                                crate::snapshot::Consistency::App
                            }
                            _ => crate::snapshot::Consistency::Crash,
                        };
                        info!(point = id, freeze_ms, %note, consistency = consistency.as_str(), "consistency point from the agent");
                        crate::snapshot::point_job(
                            shared,
                            machine,
                            consistency,
                            p.reason,
                            Some(p.reply),
                            Some(seq),
                        )
                    }
                    None => {
                        warn!(
                            point = id,
                            "consistency point arrived after its request was given up"
                        );
                        Job::Ack { seq }
                    }
                };
                jobs.send(job)
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::SourceActionResult { id, ok, message } => {
                match shared.slot(machine).take_action(id) {
                    Some(reply) => {
                        let _ = reply.send((ok, message));
                    }
                    None => warn!(
                        action = id,
                        "source action result after its request was given up"
                    ),
                }
            }
            Message::Error { code, message } => {
                return Err(SessionError::Agent(format!("{code:?}: {message}")))
            }
            m @ (Message::Hello(_)
            | Message::SourceAction { .. }
            | Message::Welcome(_)
            | Message::IndexChunk { .. }
            | Message::Ack { .. }
            | Message::PointRequest { .. }
            | Message::PointRelease { .. }
            | Message::Settings { .. }
            | Message::Detach { .. }) => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} from an agent",
                    m.kind()
                )))
            }
        }
        Ok(())
    }
}

/// Resolves when the session's kick value changes (never, if its sender is gone).
async fn kicked_changed(rx: &mut tokio::sync::watch::Receiver<Option<Kick>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn kicked_error(machine: &MachineId, why: Option<Kick>) -> SessionError {
    match why {
        Some(Kick::Replaced { by, shared: false }) => SessionError::Replaced(by),
        Some(Kick::Replaced { by, shared: true }) => SessionError::SharedCredential(by),
        Some(Kick::Revoked) => SessionError::Revoked(format!(
            "machine {machine} was revoked by the operator (`rehost-server machine unrevoke` lets it connect again)"
        )),
        Some(Kick::Stopped(why)) => SessionError::Forbidden(why),
        None => internal("session ended without a reason"),
    }
}
