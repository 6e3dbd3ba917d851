//! Recovery points: a snapshot of all disks of a machine at one point of its replication stream.
//!
//! **Where the point is.** One agent connection carries all of a machine's disks, and the
//! session's writer thread applies its jobs in stream order. A snapshot is a [`Job::Point`]
//! ([`point_job`]) in that queue: the writer commits everything before it, runs [`take_snapshot`] on every disk,
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
//! - `request`: asking for a point (live, by the agent, offline) and a cutover's final point;
//!   [`rows`]: catalog rows; [`export`]: export and verify; [`scrub`]: quarantine and repair
//!   of damaged chunks, the scheduled scrub; [`select`]: a point by id or `latest`.

pub mod export;
pub mod group;
mod request;
pub mod rows;
pub mod scrub;
pub mod select;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rehost_proto::{DiskId, Hash, MachineId};

use crate::catalog::CatalogError;
pub use crate::states::Consistency;
use crate::store::object::Kind;
use crate::store::tree::{self, Root, PAGE_ENTRIES, ZERO};
use crate::store::{Batch, Store, StoreError};
use crate::volume::{Volume, VolumeError};
use crate::writer::PointDisk;
use crate::Shared;
pub use request::{final_point, point_job, request, MAX_FREEZE_MS, POINT_TIMEOUT};
pub use rows::{SnapshotDisk, SnapshotInfo};

impl From<crate::task::TaskFailed> for SnapshotError {
    fn from(e: crate::task::TaskFailed) -> Self {
        SnapshotError::Internal(e.0)
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
    // Stable while the shared lock is held: quarantining takes the exclusive one.
    let quarantined = store.quarantined_missing()?;
    let id = shared
        .catalog
        .begin_snapshot(machine, consistency, reason)?;
    let result = (|| {
        let mut batch = store.batch();
        let mut roots = Vec::new();
        let mut changed = 0u64;
        for (disk, volume) in disks {
            let prev = shared.catalog.latest_root(*disk)?;
            let (root, n) = snapshot_disk(
                store,
                &mut batch,
                *disk,
                volume,
                prev.as_ref(),
                &quarantined,
                false,
            )?;
            roots.push((*disk, volume.size, root));
            changed += n;
        }
        let stored_ms = start.elapsed().as_millis() as u64;
        batch.commit()?;
        crate::failpoint::hit("snapshot-after-chunks");
        release_rewritten(store, &quarantined, machine);
        let ms = start.elapsed().as_millis() as u64;
        shared
            .catalog
            .finish_snapshot(id, &roots, batch.bytes, ms)?;
        Ok::<_, SnapshotError>((batch.bytes, changed, stored_ms, ms))
    })();
    match result {
        Ok((bytes, changed, stored_ms, ms)) => {
            tracing::info!(
                snapshot = id,
                %machine,
                bytes_added = bytes,
                changed_blocks = changed,
                stored_ms,
                durable_ms = ms - stored_ms,
                ms,
                "recovery point complete"
            );
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

/// Forgets the quarantine entries of chunks a snapshot just stored again (logged).
fn release_rewritten(store: &Store, quarantined: &HashSet<Hash>, machine: &MachineId) {
    if quarantined.is_empty() {
        return;
    }
    let ids: Vec<Hash> = quarantined.iter().copied().collect();
    match store.release(&ids) {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(%machine, chunks = n, "quarantined chunks stored again from the volume")
        }
        Err(e) => tracing::warn!(%machine, error = %e, "release quarantined chunks"),
    }
}

/// Pages handled together: their changed blocks are read, hashed and compressed in parallel.
const WINDOW_PAGES: u64 = 64;

/// A changed block whose chunk the store lacks: (page in window, entry, block, length, indexed id).
struct Todo {
    page: usize,
    entry: usize,
    block: u64,
    len: usize,
    want: Hash,
}

/// A page of the window: the previous snapshot's (id, entries) if comparable, and the new entries.
type WindowPage = (Option<(Hash, Vec<Hash>)>, Vec<Hash>);

type Produced = Result<(Hash, Option<(PathBuf, PathBuf, u64)>), SnapshotError>;

/// Stores one disk's changed blocks and its pages and root; returns the root id and how many
/// blocks differed from the previous snapshot. A block whose chunk is `quarantined` (damaged or
/// missing, see [`crate::store::quarantine`]) is stored again from the volume even when it did
/// not change. With `prepare` (see [`prepare`]) it only stores the chunks of whatever the
/// changed blocks hold now, and no pages or root.
fn snapshot_disk(
    store: &Store,
    batch: &mut Batch<'_>,
    disk: DiskId,
    volume: &Volume,
    prev: Option<&Hash>,
    quarantined: &HashSet<Hash>,
    prepare: bool,
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
    let mut pages = Vec::new();
    let mut changed = 0u64;
    let npages = blocks.div_ceil(u64::from(PAGE_ENTRIES));
    let mut w = 0;
    while w < npages {
        let wend = npages.min(w + WINDOW_PAGES);
        // Pass 1: compare the live index with the previous pages; list the chunks to produce.
        let mut window: Vec<WindowPage> = Vec::new();
        let mut todo: Vec<Todo> = Vec::new();
        let mut queued: HashMap<Hash, usize> = HashMap::new();
        let mut dups: Vec<(usize, usize, usize)> = Vec::new();
        for p in w..wend {
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
                entries.push(want);
                let same = old.as_ref().is_some_and(|(_, e)| e[i] == want);
                if same && !quarantined.contains(&want) {
                    continue;
                }
                if !same {
                    changed += 1;
                }
                if want == ZERO || batch.contains(Kind::Chunk, &want) {
                    continue;
                }
                let page = window.len();
                match queued.get(&want) {
                    Some(&t) => dups.push((page, i, t)),
                    None => {
                        queued.insert(want, todo.len());
                        todo.push(Todo {
                            page,
                            entry: i,
                            block: b,
                            len: len as usize,
                            want,
                        });
                    }
                }
            }
            window.push((old, entries));
        }
        // Pass 2: read, check, compress and write the missing chunks on all cores.
        let produced = produce(store, volume, &todo, disk, prepare);
        for (t, r) in todo.iter().zip(produced) {
            let (id, written) = r?;
            if let Some((partial, path, len)) = written {
                batch.adopt(Kind::Chunk, id, partial, path, len);
            }
            window[t.page].1[t.entry] = id;
        }
        for (page, entry, t) in dups {
            window[page].1[entry] = window[todo[t].page].1[todo[t].entry];
        }
        // Pass 3: pages, stored only where they changed.
        if !prepare {
            for (old, entries) in window {
                let page = match old {
                    Some((id, e)) if e == entries => id,
                    _ => batch.put(Kind::Page, &tree::encode_page(&entries))?,
                };
                pages.push(page);
            }
        }
        w = wend;
    }
    if prepare {
        return Ok((ZERO, changed));
    }
    let root = Root {
        disk_size: volume.size,
        block_size: volume.block_size,
        page_entries: PAGE_ENTRIES,
        pages,
    };
    Ok((batch.put(Kind::Root, &root.encode())?, changed))
}

/// Produces the chunks of `todo` on up to 4 threads; results in `todo`'s order.
fn produce(
    store: &Store,
    volume: &Volume,
    todo: &[Todo],
    disk: DiskId,
    prepare: bool,
) -> Vec<Produced> {
    let threads = if todo.len() < 8 {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    };
    let next = AtomicUsize::new(0);
    let work = || {
        let mut z = zstd::bulk::Compressor::new(1).ok();
        let mut buf = vec![0u8; volume.block_size as usize];
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(t) = todo.get(i) else { break };
            mine.push((
                i,
                produce_one(store, volume, t, &mut buf, z.as_mut(), disk, prepare),
            ));
        }
        mine
    };
    let mut all: Vec<(usize, Produced)> = if threads == 1 {
        work()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![(
                            usize::MAX,
                            Err(SnapshotError::Internal("chunk worker panicked".into())),
                        )]
                    })
                })
                .collect()
        })
    };
    if all.iter().any(|(i, _)| *i == usize::MAX) {
        return todo
            .iter()
            .map(|_| Err(SnapshotError::Internal("chunk worker panicked".into())))
            .collect();
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

fn produce_one(
    store: &Store,
    volume: &Volume,
    t: &Todo,
    buf: &mut [u8],
    z: Option<&mut zstd::bulk::Compressor<'static>>,
    disk: DiskId,
    prepare: bool,
) -> Produced {
    let data = &mut buf[..t.len];
    let offset = t.block * u64::from(volume.block_size);
    volume.read_at(data, offset)?;
    let id = *blake3::hash(data).as_bytes();
    if id != t.want {
        // The index is behind the data (possible only right after a crash, or while writes go on
        // during `prepare`): the snapshot takes what the volume holds.
        if !prepare {
            tracing::warn!(%disk, offset, "volume block does not match its index entry; storing the data");
        }
        if data.iter().all(|&x| x == 0) {
            return Ok((ZERO, None));
        }
        if store.exists(Kind::Chunk, &id) {
            return Ok((id, None));
        }
    }
    let file = crate::store::object::encode_with_id(Kind::Chunk, &id, data, z);
    let (partial, path) = store.write_partial(Kind::Chunk, &id, &file)?;
    Ok((id, Some((partial, path, file.len() as u64))))
}

/// Shortens the stream pause of the next snapshot of a live machine: stores, without pausing
/// anything, the chunks of every block that changed since its previous snapshot, as the volume
/// holds them now. The snapshot proper then finds most chunks present and only reads blocks
/// written since. The chunks are unreferenced until that snapshot completes, so GC may remove them
/// meanwhile; the snapshot then simply stores them itself. Returns the bytes stored.
pub fn prepare(shared: &Shared, machine: &MachineId) -> Result<u64, SnapshotError> {
    let rows = shared.catalog.machines()?;
    let Some((_, disks)) = rows.into_iter().find(|(m, _)| m.id == machine.as_str()) else {
        return Ok(0);
    };
    if disks.is_empty() || disks.iter().any(|d| !d.sync_complete) {
        return Ok(0);
    }
    let _lock = shared.store.shared_lock()?;
    let quarantined = shared.store.quarantined_missing()?;
    let mut batch = shared.store.batch();
    let dir = shared.volume_dir(machine);
    for d in &disks {
        let volume = Volume::open(&dir, d.id, d.size_bytes, d.block_size)?;
        let prev = shared.catalog.latest_root(DiskId(d.id))?;
        snapshot_disk(
            &shared.store,
            &mut batch,
            DiskId(d.id),
            &volume,
            prev.as_ref(),
            &quarantined,
            true,
        )?;
    }
    batch.commit()?;
    release_rewritten(&shared.store, &quarantined, machine);
    Ok(batch.bytes)
}

/// What the writer thread runs for a [`Job::Point`]: all the session's disks, which must have
/// finished their initial sync.
pub fn snapshot_session(
    shared: &Shared,
    machine: &MachineId,
    disks: &[PointDisk<'_>],
    consistency: Consistency,
    reason: &str,
) -> Result<SnapshotInfo, SnapshotError> {
    if let Some((id, ..)) = disks.iter().find(|d| !d.2) {
        return Err(SnapshotError::NotReady(format!(
            "{id} of machine {machine} has not finished its initial sync"
        )));
    }
    // During a rescan the volume mixes old and new data: no point in time (as DRS).
    if let Some(live) = shared.live.get(machine.as_str()) {
        let rescanning = disks.iter().find(|(id, ..)| {
            live.disks
                .get(&id.0)
                .is_some_and(|d| d.state == rehost_proto::msg::DiskState::Rescan)
        });
        if let Some((id, ..)) = rescanning {
            return Err(SnapshotError::NotReady(format!(
                "{id} of machine {machine} is being rescanned; recovery points resume when it finishes"
            )));
        }
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
