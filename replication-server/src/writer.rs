//! The per-connection durability thread. The session task hands it checked jobs in stream order;
//! it decompresses, verifies each block's blake3, writes it into the volume, and group-commits:
//! one `fdatasync` per volume for many blocks, then the sync watermark in the catalog, then one
//! cumulative `Ack` to the agent. Nothing is acknowledged before it is durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::msg::{Block, Compression, Mark, MarkKind, Zero};
use rehost_proto::{DiskId, Message};
use tokio::sync::mpsc;

use crate::catalog::CatalogError;
use crate::volume::{Volume, VolumeError};
use crate::Shared;

/// Commit at least this often while data keeps arriving.
const GROUP_BYTES: u64 = 32 << 20;
const GROUP_TIME: Duration = Duration::from_millis(50);

pub enum Job {
    Block(Block),
    Zero(Zero),
    Mark(Mark),
    /// A recovery point of all the session's disks at this point of the stream (made by
    /// `snapshot::point_job`): the writer makes everything before it durable, runs `take` on the
    /// session's disks, and goes on; a failed point does not end the session.
    Point {
        take: PointFn,
        /// The agent's `Point` frame this point answers, acknowledged once it is taken.
        seq: Option<u64>,
    },
    /// A sequenced frame with nothing to write (a point nobody waits for any more).
    Ack {
        seq: u64,
    },
}

/// A session's disk as a point sees it: its id, its volume, whether its initial sync is done.
pub type PointDisk<'a> = (DiskId, &'a Volume, bool);

/// What a [`Job::Point`] runs on the session's disks, in disk order: the id of the point it
/// took, or why it could not.
pub type PointFn = Box<dyn FnOnce(&[PointDisk<'_>]) -> Result<i64, String> + Send>;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("block at offset {offset} of {disk}: blake3 of the received data does not match")]
    HashMismatch { disk: DiskId, offset: u64 },
    #[error("block at offset {offset} of {disk}: bad zstd data")]
    Decompress { disk: DiskId, offset: u64 },
    #[error("{disk}: {what}")]
    Protocol { disk: DiskId, what: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("update catalog")]
    Catalog(#[from] CatalogError),
}

pub struct DiskCtx {
    pub volume: Volume,
    /// Initial sync watermark: every byte below it is durable.
    pub watermark: u64,
    pub complete: bool,
    dirty: bool,
    moved: bool,
}

impl DiskCtx {
    pub fn new(volume: Volume, watermark: u64, complete: bool) -> Self {
        Self {
            volume,
            watermark,
            complete,
            dirty: false,
            moved: false,
        }
    }

    fn extend(&mut self, offset: u64, len: u64) {
        if !self.complete && offset == self.watermark {
            self.watermark = offset + len;
            self.moved = true;
        }
        self.dirty = true;
    }
}

struct Writer {
    shared: Arc<Shared>,
    disks: HashMap<DiskId, DiskCtx>,
    acks: mpsc::Sender<Message>,
    decompressor: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    pending_seq: Option<u64>,
    pending_bytes: u64,
    pending_since: Instant,
}

impl Writer {
    fn disk(&mut self, id: DiskId) -> &mut DiskCtx {
        // The session only queues jobs for disks it granted.
        self.disks.get_mut(&id).expect("job for a granted disk")
    }

    fn apply(&mut self, job: Job) -> Result<(), WriteError> {
        let is_mark = matches!(job, Job::Mark(_));
        let (seq, bytes) = match job {
            Job::Block(b) => {
                let data: &[u8] = match b.compression {
                    Compression::None => &b.payload,
                    _ => {
                        self.buf.resize(b.length as usize, 0);
                        let n = self
                            .decompressor
                            .decompress_to_buffer(&b.payload[..], &mut self.buf[..])
                            .map_err(|_| WriteError::Decompress {
                                disk: b.disk_id,
                                offset: b.offset,
                            })?;
                        if n != b.length as usize {
                            return Err(WriteError::Decompress {
                                disk: b.disk_id,
                                offset: b.offset,
                            });
                        }
                        &self.buf
                    }
                };
                if blake3::hash(data).as_bytes() != &b.hash {
                    return Err(WriteError::HashMismatch {
                        disk: b.disk_id,
                        offset: b.offset,
                    });
                }
                let d = self
                    .disks
                    .get_mut(&b.disk_id)
                    .expect("job for a granted disk");
                d.volume.write_block(b.offset, data, &b.hash)?;
                d.extend(b.offset, u64::from(b.length));
                (b.seq, u64::from(b.length))
            }
            Job::Zero(Zero {
                seq,
                disk_id,
                offset,
                length,
            }) => {
                let d = self.disk(disk_id);
                d.volume.write_zero(offset, length)?;
                d.extend(offset, length);
                (seq, 0)
            }
            Job::Mark(Mark {
                seq,
                disk_id,
                kind,
                generation,
            }) => {
                // Everything before the mark is made durable first.
                self.commit()?;
                let d = self.disk(disk_id);
                match kind {
                    MarkKind::InitialSyncDone => {
                        if !d.complete && d.watermark != d.volume.size {
                            return Err(WriteError::Protocol {
                                disk: disk_id,
                                what: format!(
                                    "initial sync reported done at {} of {} bytes",
                                    d.watermark, d.volume.size
                                ),
                            });
                        }
                        d.complete = true;
                        d.watermark = d.volume.size;
                        self.shared.catalog.set_sync_complete(disk_id)?;
                        tracing::info!(disk = %disk_id, "initial sync complete");
                    }
                    MarkKind::RescanDone => {
                        self.shared.catalog.set_rescanned(disk_id)?;
                        tracing::info!(disk = %disk_id, "rescan complete");
                    }
                    MarkKind::CleanStop => {
                        let dir = d.volume.dir().to_path_buf();
                        crate::volume::save_clean_stop(&dir, disk_id.0, generation)?;
                        tracing::info!(disk = %disk_id, generation, "agent stopped cleanly; its dirty bitmap vouches for the next start");
                    }
                    MarkKind::Invalid => {}
                }
                (seq, 0)
            }
            Job::Point { take, seq } => {
                self.point(take)?;
                if let Some(seq) = seq {
                    self.pending_seq = Some(seq);
                    self.commit()?;
                }
                return Ok(());
            }
            Job::Ack { seq } => (seq, 0),
        };
        if self.pending_seq.is_none() {
            self.pending_since = Instant::now();
        }
        self.pending_seq = Some(seq);
        self.pending_bytes += bytes;
        if is_mark {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits everything before the point, runs it on every disk, then lets the stream go on.
    fn point(&mut self, take: PointFn) -> Result<(), WriteError> {
        let paused = Instant::now();
        self.commit()?;
        let mut disks: Vec<PointDisk<'_>> = self
            .disks
            .iter()
            .map(|(id, d)| (*id, &d.volume, d.complete))
            .collect();
        disks.sort_by_key(|d| d.0);
        let r = take(&disks);
        let pause_ms = paused.elapsed().as_millis() as u64;
        match r {
            Ok(id) => tracing::info!(
                snapshot = id,
                pause_ms,
                "replication stream paused for a recovery point"
            ),
            Err(e) => tracing::warn!(error = %e, pause_ms, "recovery point failed"),
        }
        self.pending_since = Instant::now();
        Ok(())
    }

    fn commit(&mut self) -> Result<(), WriteError> {
        let mut moved = Vec::new();
        for (id, d) in self.disks.iter_mut() {
            if d.dirty {
                d.volume.sync()?;
                d.dirty = false;
            }
            if d.moved {
                moved.push((*id, d.watermark));
                d.moved = false;
            }
        }
        if !moved.is_empty() {
            self.shared.catalog.set_durable(&moved)?;
        }
        if let Some(seq) = self.pending_seq.take() {
            // The session may already be gone; the data is durable either way.
            let _ = self.acks.blocking_send(Message::Ack { seq });
        }
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Runs until the job channel closes; commits what it holds before returning.
pub fn run(
    shared: Arc<Shared>,
    disks: HashMap<DiskId, DiskCtx>,
    mut jobs: mpsc::Receiver<Job>,
    acks: mpsc::Sender<Message>,
) -> Result<(), WriteError> {
    let mut w = Writer {
        shared,
        disks,
        acks,
        decompressor: zstd::bulk::Decompressor::new().map_err(|e| {
            WriteError::Volume(VolumeError::Io {
                op: "create zstd context",
                path: Default::default(),
                source: e,
            })
        })?,
        buf: Vec::new(),
        pending_seq: None,
        pending_bytes: 0,
        pending_since: Instant::now(),
    };
    loop {
        let job = match jobs.try_recv() {
            Ok(job) => job,
            Err(mpsc::error::TryRecvError::Empty) => {
                w.commit()?;
                match jobs.blocking_recv() {
                    Some(job) => job,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        w.apply(job)?;
        if w.pending_bytes >= GROUP_BYTES || w.pending_since.elapsed() >= GROUP_TIME {
            w.commit()?;
        }
    }
    w.commit()
}
