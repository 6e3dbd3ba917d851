//! Garbage collection: mark every object reachable from the roots of `complete` and `creating`
//! snapshots in the catalog, then remove the other objects and all `.partial` leftovers.
//!
//! **Why it never removes what a snapshot needs.** Objects are only ever created by snapshot
//! creation, which holds `store.lock` *shared* from before its catalog row exists until the row
//! is `complete` (or removed). GC removes files only while holding `store.lock` *exclusive*, in
//! batches, and at the start of every batch marks again from the catalog every snapshot it has not
//! marked yet. So during a batch no snapshot is being created, and each snapshot is either
//! complete, and marked (its roots, pages and chunks are all live), or not started (it has no
//! objects, and when it starts it sees the store as this batch leaves it: a chunk it finds
//! present is present, because removal happens only under the exclusive lock it excludes).
//! Objects a complete snapshot reuses from an older, since deleted snapshot are covered the same
//! way: the reuse happened under the shared lock, and the batch marks the new snapshot before it
//! removes anything. Export and verify hold the shared lock too, so they never see a snapshot
//! half reclaimed. A crash at any point of GC loses nothing: it only ever removes unreferenced
//! files, in any order, and the next run finishes the job. A snapshot being deleted is out of the
//! catalog before GC ignores it; a `creating` row under the exclusive lock can only be a crash
//! leftover (startup removes those), and is marked anyway as far as its roots are readable.
//!
//! **What it costs the replication stream.** A snapshot waits for at most one batch (2048
//! removals and the marking of snapshots completed since the previous batch). Linux grants a
//! shared flock while an exclusive one is only waiting, so a GC queued behind a long export never
//! holds up snapshot creation.
//!
//! Quarantined chunks (see [`super::quarantine`]) are not under `chunks/`, so the sweep never
//! sees them; their entries are dropped once no marked snapshot uses them or they are back.
//!
//! Marking a damaged page or root of a complete snapshot stops GC with an error rather than
//! guessing what it referenced.

use std::collections::HashSet;
use std::time::Instant;

use rehost_proto::Hash;
use serde::{Deserialize, Serialize};

use super::object::Kind;
use super::{Store, StoreError};
use crate::catalog::{Catalog, CatalogError};
use crate::states::SnapshotState;

const BATCH: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read the catalog")]
    Catalog(#[from] CatalogError),
    #[error("mark snapshot {snapshot} (delete or repair it; nothing was removed)")]
    Mark { snapshot: i64, source: StoreError },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcStats {
    pub snapshots: usize,
    pub live_objects: usize,
    pub removed_objects: u64,
    pub removed_bytes: u64,
    pub removed_partials: u64,
    /// Quarantine entries dropped: their chunk is back, or no snapshot uses it any more.
    #[serde(default)]
    pub released_quarantine: u64,
    pub duration_ms: u64,
}

#[derive(Default)]
struct Live {
    chunks: HashSet<Hash>,
    pages: HashSet<Hash>,
    roots: HashSet<Hash>,
    marked: HashSet<i64>,
}

impl Live {
    fn contains(&self, kind: Kind, id: &Hash) -> bool {
        match kind {
            Kind::Chunk => self.chunks.contains(id),
            Kind::Page => self.pages.contains(id),
            Kind::Root => self.roots.contains(id),
        }
    }

    /// Marks snapshots not marked yet. Without the exclusive lock only complete ones.
    fn mark(&mut self, store: &Store, catalog: &Catalog, locked: bool) -> Result<(), GcError> {
        let states: &[SnapshotState] = if locked {
            &[SnapshotState::Complete, SnapshotState::Creating]
        } else {
            &[SnapshotState::Complete]
        };
        for s in catalog.snapshots_in(states)? {
            if self.marked.contains(&s.id) {
                continue;
            }
            let tolerant = s.state == SnapshotState::Creating;
            for d in &s.disks {
                let Some(root_id) = d.root_id() else { continue };
                if let Err(source) = self.mark_root(store, &root_id) {
                    if !tolerant {
                        return Err(GcError::Mark {
                            snapshot: s.id,
                            source,
                        });
                    }
                }
            }
            self.marked.insert(s.id);
        }
        Ok(())
    }

    fn mark_root(&mut self, store: &Store, id: &Hash) -> Result<(), StoreError> {
        if self.roots.contains(id) {
            return Ok(());
        }
        let root = store.read_root(id)?;
        for (p, page) in root.pages.iter().enumerate() {
            if self.pages.contains(page) {
                continue;
            }
            let entries = store.read_page(page, root.page_len(p))?;
            self.chunks
                .extend(entries.into_iter().filter(|e| *e != super::tree::ZERO));
            self.pages.insert(*page);
        }
        self.roots.insert(*id);
        Ok(())
    }
}

/// Runs one garbage collection; `StoreError::Busy` if another is running.
pub fn collect(store: &Store, catalog: &Catalog) -> Result<GcStats, GcError> {
    let start = Instant::now();
    let _one = store.gc_lock()?;
    let mut live = Live::default();
    // The bulk of the marking runs without blocking snapshots; batches only add new ones.
    live.mark(store, catalog, false)?;
    let mut candidates = Vec::new();
    for kind in Kind::ALL {
        let (objects, _) = store.list(kind)?;
        candidates.extend(objects.into_iter().map(|(id, p)| (kind, id, p)));
    }
    let mut stats = GcStats::default();
    let mut batches = candidates.chunks(BATCH).peekable();
    if batches.peek().is_none() {
        // Still take the lock once, for the partial files below.
        let _x = store.exclusive_lock()?;
        live.mark(store, catalog, true)?;
    }
    for batch in batches {
        let _x = store.exclusive_lock()?;
        live.mark(store, catalog, true)?;
        for (kind, id, path) in batch {
            if live.contains(*kind, id) {
                continue;
            }
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(path) {
                Ok(()) => {
                    stats.removed_objects += 1;
                    stats.removed_bytes += len;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        op: "remove unreferenced object",
                        path: path.clone(),
                        source: e,
                    }
                    .into())
                }
            }
            if stats.removed_objects == 2 {
                crate::failpoint::hit("gc-mid-sweep");
            }
        }
    }
    {
        // Under the exclusive lock no snapshot is writing, so every partial file is a leftover.
        let _x = store.exclusive_lock()?;
        for kind in Kind::ALL {
            for p in store.list(kind)?.1 {
                if std::fs::remove_file(&p).is_ok() {
                    stats.removed_partials += 1;
                }
            }
        }
        // A quarantine entry records a chunk some snapshot lacks; it goes with the last of them.
        live.mark(store, catalog, true)?;
        stats.released_quarantine = store.prune_quarantine(&live.chunks)?;
    }
    stats.snapshots = live.marked.len();
    stats.live_objects = live.chunks.len() + live.pages.len() + live.roots.len();
    stats.duration_ms = start.elapsed().as_millis() as u64;
    tracing::info!(
        removed = stats.removed_objects,
        removed_bytes = stats.removed_bytes,
        partials = stats.removed_partials,
        live = stats.live_objects,
        ms = stats.duration_ms,
        "garbage collection done"
    );
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{take_snapshot, Consistency};
    use crate::volume::Volume;
    use rehost_proto::msg::DiskInfo;
    use rehost_proto::DiskId;

    #[test]
    fn gc_keeps_what_complete_snapshots_use_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let shared = crate::open(dir.path()).unwrap();
        let (m, _) = shared
            .catalog
            .register_machine("gc", &[1; 32], "t", b"s")
            .unwrap();
        let disks = [DiskInfo {
            device: "/dev/x".into(),
            size_bytes: (3 << 16) + 5,
        }];
        let row = &shared.catalog.ensure_disks(&m, &disks, 65536).unwrap()[0];
        let vol = Volume::open(&shared.volume_dir(&m), row.id, row.size_bytes, 65536).unwrap();
        let write = |b: u64, seed: u8| {
            let len = (row.size_bytes - b * 65536).min(65536) as usize;
            let data = vec![seed; len];
            vol.write_block(b * 65536, &data, blake3::hash(&data).as_bytes())
                .unwrap();
        };
        write(0, 1);
        write(3, 2);
        let s1 = take_snapshot(
            &shared,
            &m,
            &[(DiskId(row.id), &vol)],
            Consistency::Crash,
            "t",
        )
        .unwrap();
        write(0, 3);
        let s2 = take_snapshot(
            &shared,
            &m,
            &[(DiskId(row.id), &vol)],
            Consistency::App,
            "t",
        )
        .unwrap();
        assert_eq!(s2.consistency, Consistency::App);
        // A leftover of a crashed writer.
        let junk = shared.store.dir().join("chunks").join("00");
        std::fs::create_dir_all(&junk).unwrap();
        std::fs::write(junk.join("00.1.1.partial"), b"x").unwrap();

        let st = collect(&shared.store, &shared.catalog).unwrap();
        assert_eq!(
            (st.removed_objects, st.removed_partials, st.snapshots),
            (0, 1, 2)
        );
        assert!(shared.catalog.mark_deleting(s1.id).unwrap());
        shared.catalog.remove_snapshot(s1.id).unwrap();
        let st = collect(&shared.store, &shared.catalog).unwrap();
        // s1's own chunk (block 0 = 1s), page and root go; the shared chunk of block 3 stays.
        assert_eq!(st.removed_objects, 3, "{st:?}");
        let mut out = tempfile::tempfile().unwrap();
        let root = s2.disks[0].root_id().unwrap();
        crate::snapshot::export::export_raw(&shared.store, &root, &out, dir.path(), &mut |_, _| {})
            .unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut got).unwrap();
        let mut want = vec![0u8; row.size_bytes as usize];
        want[..65536].fill(3);
        want[3 * 65536..].fill(2);
        assert!(got == want, "s2 exports as written after GC");
        // Another GC at the same time is refused, not run twice.
        let _held = shared.store.gc_lock().unwrap();
        assert!(matches!(
            collect(&shared.store, &shared.catalog),
            Err(GcError::Store(StoreError::Busy))
        ));
    }
}
