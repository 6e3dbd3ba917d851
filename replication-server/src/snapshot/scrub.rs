//! Damaged chunks: quarantine, repair from the volumes, and the scheduled scrub.
//!
//! A chunk's id is the blake3 of a volume block, so a damaged chunk can be stored again from any
//! volume block that still hashes to that id. [`verify`] (`snapshot verify`) checks one snapshot
//! and quarantines the damaged chunks it finds (see [`crate::store::quarantine`]: from then on
//! nothing treats them as present, and the next snapshot of the machine stores them again when
//! the volume still has them); with `repair` it also restores them at once from the blocks the
//! affected snapshots used, after checking each block's blake3, and says which snapshots stay
//! damaged because no volume holds that data any more. [`scrub`] does both for every chunk that
//! complete snapshots use (Proxmox Backup Server's verify job), on the schedule of
//! `serve --scrub-interval`, and keeps its result in `store/scrub.json` for `/metrics`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::Hash;
use serde::{Deserialize, Serialize};

use super::export::{check, damaged_list, Checked, Damaged, VerifyReport};
use super::{SnapshotError, SnapshotInfo};
use crate::catalog::Catalog;
use crate::states::SnapshotState;
use crate::store::object::{self, Kind};
use crate::store::quarantine::Quarantined;
use crate::store::{Store, StoreError};

const RESULT_FILE: &str = "scrub.json";

/// A chunk stored again from a volume block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Repaired {
    pub chunk: String,
    pub machine_id: String,
    pub device: String,
    pub offset: u64,
}

/// A snapshot that still lacks data after repair, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StillDamaged {
    pub snapshot: i64,
    pub machine_id: String,
    /// `kind id` of each object it lacks.
    pub objects: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepairReport {
    /// Damaged chunks moved to the quarantine (or recorded missing) by this run.
    pub quarantined: Vec<String>,
    pub repaired: Vec<Repaired>,
    /// Damaged objects no volume block could restore.
    pub unrepaired: Vec<String>,
    pub still_damaged: Vec<StillDamaged>,
}

/// `snapshot verify`: checks `snap`, quarantines its damaged chunks and, with `repair`,
/// restores what the volumes under `data_dir` still hold.
pub fn verify(
    store: &Store,
    catalog: &Catalog,
    data_dir: &Path,
    snap: &SnapshotInfo,
    repair: bool,
) -> Result<(VerifyReport, RepairReport), SnapshotError> {
    let mut report = super::export::verify(store, catalog, snap)?;
    let fix = settle(store, data_dir, &report.damaged, repair)?;
    if repair {
        let fixed: BTreeSet<&str> = fix.repaired.iter().map(|r| r.chunk.as_str()).collect();
        report.damaged.retain(|d| !fixed.contains(d.id.as_str()));
    }
    Ok((report, fix))
}

/// Quarantines the damaged chunks of `damaged`, then (with `repair`) restores them from the
/// volumes, and names the snapshots that stay damaged.
fn settle(
    store: &Store,
    data_dir: &Path,
    damaged: &[Damaged],
    repair: bool,
) -> Result<RepairReport, SnapshotError> {
    let mut out = RepairReport::default();
    let chunks: Vec<Hash> = damaged
        .iter()
        .filter(|d| d.kind == Kind::Chunk.to_string())
        .filter_map(|d| parse_id(&d.id))
        .collect();
    for (id, what) in store.quarantine(&chunks)? {
        if matches!(what, Quarantined::Moved | Quarantined::Marked) {
            out.quarantined.push(hex::encode(id));
        }
    }
    if repair {
        out.repaired = restore(store, data_dir, damaged)?;
    }
    let fixed: BTreeSet<&str> = out.repaired.iter().map(|r| r.chunk.as_str()).collect();
    let mut per: HashMap<i64, StillDamaged> = HashMap::new();
    for d in damaged.iter().filter(|d| !fixed.contains(d.id.as_str())) {
        out.unrepaired.push(format!("{} {}", d.kind, d.id));
        for a in &d.affected {
            let e = per.entry(a.snapshot).or_insert_with(|| StillDamaged {
                snapshot: a.snapshot,
                machine_id: a.machine_id.clone(),
                objects: Vec::new(),
            });
            let what = format!("{} {}", d.kind, d.id);
            if !e.objects.contains(&what) {
                e.objects.push(what);
            }
        }
    }
    out.still_damaged = per.into_values().collect();
    out.still_damaged.sort_by_key(|s| s.snapshot);
    Ok(out)
}

fn parse_id(s: &str) -> Option<Hash> {
    hex::decode(s).ok().and_then(|v| <Hash>::try_from(v).ok())
}

/// Stores again every damaged chunk of `damaged` that a volume block still holds: the blocks
/// the affected snapshots used, read from the live volume and kept only if their blake3 is the
/// chunk's id (a block written meanwhile, or torn by a concurrent write, fails that check).
fn restore(
    store: &Store,
    data_dir: &Path,
    damaged: &[Damaged],
) -> Result<Vec<Repaired>, SnapshotError> {
    let _lock = store.shared_lock()?;
    let mut batch = store.batch();
    let mut files: HashMap<PathBuf, Option<File>> = HashMap::new();
    let mut zstd = zstd::bulk::Compressor::new(1).ok();
    let mut repaired = Vec::new();
    for d in damaged.iter().filter(|d| d.kind == Kind::Chunk.to_string()) {
        let Some(id) = parse_id(&d.id) else { continue };
        if store.exists(Kind::Chunk, &id) {
            continue;
        }
        let mut found = None;
        'ranges: for a in &d.affected {
            if a.block_size == 0 || a.machine_id.contains('/') || a.machine_id.starts_with('.') {
                continue;
            }
            let path = data_dir
                .join("volumes")
                .join(&a.machine_id)
                .join(format!("disk-{}.vol", a.disk_id));
            let file = files
                .entry(path.clone())
                .or_insert_with(|| File::open(&path).ok());
            let Some(file) = file else { continue };
            let bs = u64::from(a.block_size);
            let mut off = a.start;
            while off < a.end {
                let len = (a.end - off).min(bs) as usize;
                let mut buf = vec![0u8; len];
                if file.read_exact_at(&mut buf, off).is_ok() && blake3::hash(&buf).as_bytes() == &id
                {
                    found = Some((buf, a, off));
                    break 'ranges;
                }
                off += bs;
            }
        }
        let Some((data, a, offset)) = found else {
            continue;
        };
        let file = object::encode_with_id(Kind::Chunk, &id, &data, zstd.as_mut());
        let (partial, path) = store.write_partial(Kind::Chunk, &id, &file)?;
        batch.adopt(Kind::Chunk, id, partial, path, file.len() as u64);
        repaired.push(Repaired {
            chunk: d.id.clone(),
            machine_id: a.machine_id.clone(),
            device: a.device.clone(),
            offset,
        });
    }
    batch.commit()?;
    let ids: Vec<Hash> = repaired.iter().filter_map(|r| parse_id(&r.chunk)).collect();
    store.release(&ids)?;
    for r in &repaired {
        tracing::info!(chunk = %r.chunk, machine = %r.machine_id, device = %r.device, offset = r.offset, "damaged chunk restored from the volume");
    }
    Ok(repaired)
}

/// The result of one scrub (kept in `store/scrub.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrubResult {
    pub finished_at: i64,
    pub duration_ms: u64,
    pub snapshots: usize,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Damaged or missing objects found (chunks, pages, roots).
    pub damaged_objects: u64,
    pub damaged_chunks: u64,
    pub repaired_chunks: u64,
    /// Chunks repaired by every scrub so far.
    #[serde(default)]
    pub repaired_total: u64,
    /// Complete snapshots that still lack data after the repair.
    pub damaged_snapshots: Vec<i64>,
}

/// Checks every object of every complete snapshot once, quarantines the damaged chunks,
/// restores what the volumes still hold, and records the result.
pub fn scrub(
    store: &Store,
    catalog: &Catalog,
    data_dir: &Path,
) -> Result<ScrubResult, SnapshotError> {
    let start = Instant::now();
    let snaps = catalog.snapshots_in(&[SnapshotState::Complete])?;
    let mut c = Checked::default();
    let mut counts = VerifyReport::default();
    let damaged = {
        let _lock = store.shared_lock()?;
        for s in &snaps {
            check(store, s, &mut counts, &mut c)?;
        }
        damaged_list(store, catalog, &c.bad)?
    };
    let fix = settle(store, data_dir, &damaged, true)?;
    let r = ScrubResult {
        finished_at: crate::catalog::now(),
        duration_ms: start.elapsed().as_millis() as u64,
        snapshots: snaps.len(),
        chunks_checked: counts.chunks,
        bytes_checked: counts.bytes,
        damaged_objects: damaged.len() as u64,
        damaged_chunks: damaged
            .iter()
            .filter(|d| d.kind == Kind::Chunk.to_string())
            .count() as u64,
        repaired_chunks: fix.repaired.len() as u64,
        repaired_total: last(store).map_or(0, |l| l.repaired_total) + fix.repaired.len() as u64,
        damaged_snapshots: fix.still_damaged.iter().map(|s| s.snapshot).collect(),
    };
    let p = store.dir().join(RESULT_FILE);
    let json = serde_json::to_vec(&r).map_err(|e| SnapshotError::Internal(e.to_string()))?;
    rehost_proto::fsutil::write_atomic(&p, &json, crate::private::FILE_MODE).map_err(|source| {
        StoreError::Io {
            op: "write scrub result",
            path: p,
            source,
        }
    })?;
    if r.damaged_objects > 0 {
        tracing::warn!(
            damaged = r.damaged_objects,
            repaired = r.repaired_chunks,
            damaged_snapshots = ?r.damaged_snapshots,
            unrepaired = ?fix.unrepaired,
            "scrub found damage"
        );
    }
    tracing::info!(
        snapshots = r.snapshots,
        chunks = r.chunks_checked,
        bytes = r.bytes_checked,
        damaged = r.damaged_objects,
        repaired = r.repaired_chunks,
        ms = r.duration_ms,
        "scrub done"
    );
    Ok(r)
}

/// The last scrub's result, if one ran (an unreadable file counts as none).
pub fn last(store: &Store) -> Option<ScrubResult> {
    let b = rehost_proto::fsutil::read_capped(&store.dir().join(RESULT_FILE), 1 << 20).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Parses `--scrub-interval`: `0` (off) or a duration like `30s`, `12h`, `1d`.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    rehost_proto::human::period_secs(s.trim()).map(Duration::from_secs)
}

/// Runs [`scrub`] every `every` (counted from the last run, also across restarts; a fresh
/// data dir waits one interval), until the runtime ends.
pub async fn scheduler(shared: Arc<crate::Shared>, every: Duration) {
    let secs = every.as_secs().max(1) as i64;
    let mut next = match last(&shared.store) {
        Some(r) => r.finished_at + secs,
        None => crate::catalog::now() + secs,
    };
    loop {
        let wait = (next - crate::catalog::now()).max(0) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || scrub(&s.store, &s.catalog, &s.data_dir)).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %rehost_proto::error::chain(&e), "scrub failed"),
            Err(e) => tracing::warn!(error = %e, "scrub failed"),
        }
        next = crate::catalog::now() + secs;
    }
}

/// Prometheus lines of the last scrub and the quarantine.
pub fn metrics(store: &Store, page: &mut crate::metrics::Page) {
    use crate::metrics::set;
    if let Some(r) = last(store) {
        for (name, help, v) in [
            (
                "rehost_scrub_last_run_timestamp_seconds",
                "When the last scrub of the store ended (seconds since the epoch)",
                r.finished_at.max(0) as u64,
            ),
            (
                "rehost_scrub_duration_seconds",
                "How long the last scrub took",
                r.duration_ms / 1000,
            ),
            (
                "rehost_scrub_damaged_chunks",
                "Damaged chunks the last scrub found",
                r.damaged_chunks,
            ),
            (
                "rehost_scrub_repaired_chunks",
                "Damaged chunks the last scrub restored from the replica volumes",
                r.repaired_chunks,
            ),
            (
                "rehost_snapshots_damaged",
                "Recovery points still damaged after the last scrub",
                r.damaged_snapshots.len() as u64,
            ),
        ] {
            set(&page.gauges(name, help), vec![], v);
        }
        page.counter(
            "rehost_scrub_chunks_repaired",
            "Chunks restored from the replica volumes by every scrub so far",
            r.repaired_total,
        );
    }
    if let Ok(q) = store.quarantined_missing() {
        set(
            &page.gauges(
                "rehost_store_quarantined_chunks",
                "Quarantined chunks not yet restored",
            ),
            vec![],
            q.len() as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{take_snapshot, Consistency};
    use crate::volume::Volume;
    use rehost_proto::msg::DiskInfo;
    use rehost_proto::DiskId;

    const BS: u64 = 65536;

    fn flip(store: &Store, data: &[u8]) -> Hash {
        let id = *blake3::hash(data).as_bytes();
        let p = store.path(Kind::Chunk, &id);
        let mut f = std::fs::read(&p).unwrap();
        let mid = f.len() / 2;
        f[mid] ^= 1;
        std::fs::write(&p, f).unwrap();
        id
    }

    #[test]
    fn quarantine_rewrite_repair_and_scrub() {
        let dir = tempfile::tempdir().unwrap();
        let shared = crate::open(dir.path()).unwrap();
        let (m, _) = shared
            .catalog
            .register_machine("q", &[2; 32], "t", b"s")
            .unwrap();
        let disks = [DiskInfo {
            device: "/dev/q".into(),
            size_bytes: 8 * BS,
        }];
        let row = &shared.catalog.ensure_disks(&m, &disks, 65536).unwrap()[0];
        let vol = Volume::open(&shared.volume_dir(&m), row.id, row.size_bytes, 65536).unwrap();
        let block = |seed: u8| vec![seed; BS as usize];
        let write = |b: u64, seed: u8| {
            let data = block(seed);
            vol.write_block(b * BS, &data, blake3::hash(&data).as_bytes())
                .unwrap();
        };
        for b in 0..8 {
            write(b, 10 + b as u8);
        }
        let snap = |reason: &str| {
            take_snapshot(
                &shared,
                &m,
                &[(DiskId(row.id), &vol)],
                Consistency::Crash,
                reason,
            )
            .unwrap()
        };
        let s1 = snap("one");
        let (store, cat, data) = (&shared.store, &shared.catalog, dir.path());

        // Verify finds the flipped chunk and quarantines it.
        let c2 = flip(store, &block(12));
        let (r, fix) = verify(store, cat, data, &s1, false).unwrap();
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(fix.quarantined, vec![hex::encode(c2)]);
        assert!(!store.exists(Kind::Chunk, &c2));
        // The next point stores it again although the block did not change, and is whole.
        let s2 = snap("two");
        assert!(s2.bytes_added > 0, "{s2:?}");
        for s in [&s1, &s2] {
            assert!(verify(store, cat, data, s, false)
                .unwrap()
                .0
                .damaged
                .is_empty());
        }
        assert!(store.quarantined().unwrap().is_empty(), "released");

        // --repair restores a damaged chunk from the volume.
        let c3 = flip(store, &block(13));
        let (r, fix) = verify(store, cat, data, &s1, true).unwrap();
        assert!(r.damaged.is_empty(), "{r:?}");
        assert_eq!(fix.repaired.len(), 1);
        assert_eq!(
            (fix.repaired[0].chunk.clone(), fix.repaired[0].offset),
            (hex::encode(c3), 3 * BS)
        );
        assert!(fix.still_damaged.is_empty());

        // A block written since: its old chunk cannot come back; both points stay damaged.
        write(4, 99);
        let c4 = flip(store, &block(14));
        let (r, fix) = verify(store, cat, data, &s1, true).unwrap();
        assert_eq!(r.damaged.len(), 1);
        assert!(fix.repaired.is_empty());
        let ids: Vec<i64> = fix.still_damaged.iter().map(|s| s.snapshot).collect();
        assert_eq!(ids, vec![s1.id, s2.id]);
        assert!(!store.exists(Kind::Chunk, &c4));
        // A new point has the new data and is whole.
        let s3 = snap("three");
        assert!(verify(store, cat, data, &s3, false)
            .unwrap()
            .0
            .damaged
            .is_empty());

        // The scrub finds and repairs a damaged chunk, and keeps the result.
        let c5 = flip(store, &block(15));
        let res = scrub(store, cat, data).unwrap();
        assert_eq!(res.snapshots, 3);
        assert_eq!((res.damaged_chunks, res.repaired_chunks), (2, 1), "{res:?}");
        assert_eq!(res.damaged_snapshots, vec![s1.id, s2.id]);
        assert!(store.exists(Kind::Chunk, &c5));
        let mut page = crate::metrics::Page::default();
        metrics(store, &mut page);
        let text = page.text();
        assert!(
            text.contains("rehost_scrub_chunks_repaired_total 1"),
            "{text}"
        );
        assert!(text.contains("rehost_scrub_repaired_chunks 1"), "{text}");
        assert!(text.contains("rehost_snapshots_damaged 2"), "{text}");
        assert!(text.contains("rehost_store_quarantined_chunks 1"), "{text}");

        // GC keeps what the damaged points use and its quarantine record; once they are
        // deleted the record goes too.
        crate::store::gc::collect(store, cat).unwrap();
        assert_eq!(store.quarantined().unwrap(), [c4].into_iter().collect());
        for s in [&s1, &s2] {
            assert!(cat.mark_deleting(s.id).unwrap());
            cat.remove_snapshot(s.id).unwrap();
        }
        let st = crate::store::gc::collect(store, cat).unwrap();
        assert_eq!(st.released_quarantine, 1);
        assert!(store.quarantined().unwrap().is_empty());
        assert!(scrub(store, cat, data)
            .unwrap()
            .damaged_snapshots
            .is_empty());
    }
}
