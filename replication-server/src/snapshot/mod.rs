//! Recovery points: a snapshot of all disks of a machine at one point of its replication stream.
//!
//! **Where the point is.** One agent connection carries all of a machine's disks, and the
//! session's writer thread applies its jobs in stream order. A snapshot is a [`Job::Snapshot`]
//! in that queue: the writer commits everything before it, runs [`take_snapshot`] on every disk,
//! replies, and goes on; so no write the agent sent after the point is in it and none sent before
//! is missing (a multi-disk consistency group). The stream pauses for the length of the snapshot,
//! which is logged (`pause_ms`). A machine with no live session is snapshotted from its volumes
//! while holding its session slot, so no session can start meanwhile ([`request`] does both).
//!
//! **What a snapshot costs.** Chunks are volume blocks, and a chunk's id is the blake3 the volume's
//! hash index already holds for the block. So the live index, compared with the pages of the
//! disk's previous snapshot, names the changed blocks without reading the volume; only those are
//! read, checked against their hash, compressed and stored (unless the store already has them:
//! dedup across snapshots and machines). Unchanged pages keep their id and are not rewritten.
//!
//! **Crash safety.** The catalog row is created `creating` before any object is written, and set
//! `complete` (with its roots) only after [`crate::store::Batch::commit`] made every object
//! durable. A crash in between leaves a `creating` row, which startup removes, and unreferenced
//! objects, which GC removes. See [`crate::store::gc`] for why GC never removes what a complete
//! or in-progress snapshot needs.
//!
//! - [`rows`]: catalog rows; [`export`]: export and verify; [`api`]: admin API routes.

pub mod api;
pub mod export;
pub mod rows;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::{DiskId, Hash, MachineId};
use tokio::sync::oneshot;

use crate::catalog::CatalogError;
use crate::store::object::Kind;
use crate::store::tree::{self, Root, PAGE_ENTRIES, ZERO};
use crate::store::{Batch, Store, StoreError};
use crate::volume::{Volume, VolumeError};
use crate::writer::Job;
use crate::Shared;
pub use rows::{SnapshotDisk, SnapshotInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// A point in the stream with no cooperation from the source.
    Crash,
    /// A point the agent made with the source's filesystems frozen.
    App,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot catalog")]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("write export {path}")]
    Output {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

/// Takes a snapshot of `disks` (all of `machine`'s disks, quiescent for the duration: called on
/// the writer thread at a stream point, or with the machine's slot held). Returns once the
/// snapshot is durable and `complete` in the catalog.
pub fn take_snapshot(
    shared: &Shared,
    machine: &MachineId,
    disks: &[(DiskId, &Volume)],
    consistency: Consistency,
    reason: &str,
) -> Result<SnapshotInfo, SnapshotError> {
    let start = Instant::now();
    let store = &shared.store;
    // Declared before the batch so that an abandoned batch cleans up while the lock is held.
    let _lock = store.shared_lock()?;
    let id = shared
        .catalog
        .begin_snapshot(machine, consistency.as_str(), reason)?;
    let result = (|| {
        let mut batch = store.batch();
        let mut roots = Vec::new();
        let mut changed = 0u64;
        for (disk, volume) in disks {
            let prev = shared.catalog.latest_root(*disk)?;
            let (root, n) = snapshot_disk(store, &mut batch, *disk, volume, prev.as_ref())?;
            roots.push((*disk, volume.size, root));
            changed += n;
        }
        batch.commit()?;
        crate::failpoint::hit("snapshot-after-chunks");
        let ms = start.elapsed().as_millis() as u64;
        shared
            .catalog
            .finish_snapshot(id, &roots, batch.bytes, ms)?;
        Ok::<_, SnapshotError>((batch.bytes, changed, ms))
    })();
    match result {
        Ok((bytes, changed, ms)) => {
            tracing::info!(snapshot = id, %machine, bytes_added = bytes, changed_blocks = changed, ms, "recovery point complete");
            let all = shared.catalog.snapshots(machine.as_str())?;
            all.into_iter()
                .find(|s| s.id == id)
                .ok_or_else(|| SnapshotError::Internal(format!("snapshot {id} vanished")))
        }
        Err(e) => {
            // Unreferenced objects it wrote are GC's to remove; the row must not stay `creating`.
            let _ = shared.catalog.remove_snapshot(id);
            Err(e)
        }
    }
}

/// Stores one disk's changed blocks and its pages and root; returns the root id and how many
/// blocks differed from the previous snapshot.
fn snapshot_disk(
    store: &Store,
    batch: &mut Batch<'_>,
    disk: DiskId,
    volume: &Volume,
    prev: Option<&Hash>,
) -> Result<(Hash, u64), SnapshotError> {
    let bs = u64::from(volume.block_size);
    let blocks = volume.size.div_ceil(bs);
    let prev = match prev.map(|p| store.read_root(p)) {
        Some(Ok(r)) if r.block_size == volume.block_size && r.page_entries == PAGE_ENTRIES => {
            Some(r)
        }
        Some(Err(e)) => {
            tracing::warn!(%disk, error = %e, "previous snapshot unreadable; storing this one in full");
            None
        }
        _ => None,
    };
    let full_zero = rehost_proto::zero_hash(bs as usize);
    let mut buf = vec![0u8; bs as usize];
    let mut pages = Vec::new();
    let mut changed = 0u64;
    let npages = blocks.div_ceil(u64::from(PAGE_ENTRIES));
    for p in 0..npages {
        let start = p * u64::from(PAGE_ENTRIES);
        let n = (blocks - start).min(u64::from(PAGE_ENTRIES)) as u32;
        let live = volume.read_index(start, n)?;
        let old = match &prev {
            Some(r) if (p as usize) < r.pages.len() && r.page_len(p as usize) == n => Some((
                r.pages[p as usize],
                store.read_page(&r.pages[p as usize], n)?,
            )),
            _ => None,
        };
        let mut entries = Vec::with_capacity(n as usize);
        for (i, h) in live.iter().enumerate() {
            let b = start + i as u64;
            let len = (volume.size - b * bs).min(bs);
            let zero = *h == ZERO
                || *h == full_zero
                || (len < bs && *h == rehost_proto::zero_hash(len as usize));
            let want = if zero { ZERO } else { *h };
            if old.as_ref().is_some_and(|(_, e)| e[i] == want) {
                entries.push(want);
                continue;
            }
            changed += 1;
            if want == ZERO || store.exists(Kind::Chunk, &want) {
                entries.push(want);
                continue;
            }
            let data = &mut buf[..len as usize];
            volume.read_at(data, b * bs)?;
            let id = if blake3::hash(data).as_bytes() != &want {
                // The index is behind the data (possible only right after a crash): the snapshot
                // takes what the volume holds.
                tracing::warn!(%disk, offset = b * bs, "volume block does not match its index entry; storing the data");
                if data.iter().all(|&x| x == 0) {
                    ZERO
                } else {
                    batch.put(Kind::Chunk, data)?
                }
            } else {
                batch.put(Kind::Chunk, data)?
            };
            entries.push(id);
        }
        let page = match old {
            Some((id, e)) if e == entries => id,
            _ => batch.put(Kind::Page, &tree::encode_page(&entries))?,
        };
        pages.push(page);
    }
    let root = Root {
        disk_size: volume.size,
        block_size: volume.block_size,
        page_entries: PAGE_ENTRIES,
        pages,
    };
    Ok((batch.put(Kind::Root, &root.encode())?, changed))
}

/// What the writer thread runs for a [`Job::Snapshot`]: all the session's disks, which must have
/// finished their initial sync.
pub fn snapshot_session(
    shared: &Shared,
    machine: &MachineId,
    disks: &[(DiskId, &Volume, bool)],
    consistency: Consistency,
    reason: &str,
) -> Result<SnapshotInfo, SnapshotError> {
    if let Some((id, ..)) = disks.iter().find(|d| !d.2) {
        return Err(SnapshotError::NotReady(format!(
            "{id} of machine {machine} has not finished its initial sync"
        )));
    }
    let vols: Vec<(DiskId, &Volume)> = disks.iter().map(|(id, v, _)| (*id, *v)).collect();
    take_snapshot(shared, machine, &vols, consistency, reason)
}

/// Snapshot of a machine with no live session, from its volumes (the caller holds its slot).
fn snapshot_offline(
    shared: &Shared,
    machine: &MachineId,
    consistency: Consistency,
    reason: &str,
) -> Result<SnapshotInfo, SnapshotError> {
    let rows = shared.catalog.machines()?;
    let (_, disks) = rows
        .into_iter()
        .find(|(m, _)| m.id == machine.as_str())
        .ok_or_else(|| SnapshotError::NotFound(format!("no machine {machine}")))?;
    if disks.is_empty() {
        return Err(SnapshotError::NotReady(format!(
            "machine {machine} has no disks yet"
        )));
    }
    let dir = shared.volume_dir(machine);
    let mut vols = Vec::new();
    for d in &disks {
        vols.push((
            DiskId(d.id),
            Volume::open(&dir, d.id, d.size_bytes, d.block_size)?,
            d.sync_complete,
        ));
    }
    let refs: Vec<(DiskId, &Volume, bool)> = vols.iter().map(|(i, v, c)| (*i, v, *c)).collect();
    snapshot_session(shared, machine, &refs, consistency, reason)
}

/// Takes a snapshot of `machine` now: through its live session's writer (a point in its stream),
/// or directly from its volumes when no agent is connected.
pub async fn request(
    shared: Arc<Shared>,
    machine: MachineId,
    consistency: Consistency,
    reason: String,
) -> Result<SnapshotInfo, SnapshotError> {
    let slot = shared.slot(&machine);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(jobs) = slot.jobs() {
            let (tx, rx) = oneshot::channel();
            let job = Job::Snapshot {
                machine: machine.clone(),
                consistency,
                reason: reason.clone(),
                reply: Some(tx),
            };
            if jobs.send(job).await.is_ok() {
                drop(jobs);
                if let Ok(r) = rx.await {
                    return r;
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
