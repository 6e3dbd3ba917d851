//! Reading snapshots back: [`export_raw`] writes one disk of a snapshot as a sparse raw image,
//! byte-identical to the volume at the snapshot point; [`verify`] re-reads and re-hashes every
//! object of a snapshot and, for each damaged one, names every snapshot and byte range that uses
//! it. Both run with the store's shared lock held (GC waits).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rehost_proto::Hash;
use serde::{Deserialize, Serialize};

use super::{SnapshotError, SnapshotInfo};
use crate::catalog::Catalog;
use crate::states::SnapshotState;
use crate::store::object::Kind;
use crate::store::tree::ZERO;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ExportStats {
    pub size_bytes: u64,
    /// Bytes written (the rest is holes).
    pub data_bytes: u64,
}

/// Writes the disk whose root is `root_id` to `out` (truncated first) as a sparse raw image.
/// `progress(done, total)` is called after every page.
pub fn export_raw(
    store: &Store,
    root_id: &Hash,
    out: &File,
    out_path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportStats, SnapshotError> {
    let _lock = store.shared_lock()?;
    let root = store.read_root(root_id)?;
    let werr = |source| SnapshotError::Output {
        path: out_path.to_path_buf(),
        source,
    };
    out.set_len(0).map_err(werr)?;
    out.set_len(root.disk_size).map_err(werr)?;
    let bs = u64::from(root.block_size);
    let mut stats = ExportStats {
        size_bytes: root.disk_size,
        data_bytes: 0,
    };
    for (p, page) in root.pages.iter().enumerate() {
        let entries = store.read_page(page, root.page_len(p))?;
        let first = p as u64 * u64::from(root.page_entries);
        for (i, id) in entries.iter().enumerate() {
            if *id == ZERO {
                continue;
            }
            let b = first + i as u64;
            let data = store.read(Kind::Chunk, id)?;
            if data.len() as u64 != root.block_len(b) {
                return Err(SnapshotError::Store(StoreError::Damaged {
                    kind: Kind::Chunk,
                    id: hex::encode(id),
                    path: store.path(Kind::Chunk, id),
                    source: crate::store::object::Damage::Header {
                        what: format!(
                            "{} bytes where block {b} has {}",
                            data.len(),
                            root.block_len(b)
                        ),
                    },
                }));
            }
            out.write_all_at(&data, b * bs).map_err(werr)?;
            stats.data_bytes += data.len() as u64;
        }
        progress(
            ((first + entries.len() as u64) * bs).min(root.disk_size),
            root.disk_size,
        );
    }
    out.sync_all().map_err(werr)?;
    Ok(stats)
}

/// One damaged object and everything that depends on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Damaged {
    pub kind: String,
    pub id: String,
    pub path: String,
    pub problem: String,
    pub affected: Vec<Affected>,
}

/// A byte range `[start, end)` of one disk of one snapshot that cannot be restored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Affected {
    pub snapshot: i64,
    pub machine_id: String,
    pub device: String,
    pub start: u64,
    pub end: u64,
    #[serde(default)]
    pub disk_id: u64,
    /// The disk's block size in that snapshot (the range is whole blocks of it).
    #[serde(default)]
    pub block_size: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub snapshot: i64,
    pub disks: usize,
    pub pages: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub damaged: Vec<Damaged>,
}

fn problem(store: &Store, e: &StoreError) -> String {
    match e {
        StoreError::Damaged { source, .. } => source.to_string(),
        StoreError::Missing { kind, id, .. } => {
            let quarantined = *kind == Kind::Chunk
                && hex::decode(id)
                    .ok()
                    .and_then(|v| <Hash>::try_from(v).ok())
                    .is_some_and(|h| store.quarantine_path(&h).exists());
            if quarantined {
                "quarantined (found damaged earlier; not restored from a volume yet)".into()
            } else {
                "missing".into()
            }
        }
        StoreError::Tree { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// What checking several snapshots found; each object is read once.
#[derive(Debug, Default)]
pub struct Checked {
    ok: HashSet<Hash>,
    /// Damaged object (kind as u8, id) -> problem.
    pub bad: BTreeMap<(u8, Hash), String>,
}

/// Re-reads every object of `snap` (root, pages, chunks), checking every checksum and hash.
/// Damaged chunks are reported, not quarantined: see [`crate::snapshot::scrub::verify`].
pub fn verify(
    store: &Store,
    catalog: &Catalog,
    snap: &SnapshotInfo,
) -> Result<VerifyReport, SnapshotError> {
    let _lock = store.shared_lock()?;
    let mut report = VerifyReport {
        snapshot: snap.id,
        disks: snap.disks.len(),
        ..Default::default()
    };
    let mut c = Checked::default();
    check(store, snap, &mut report, &mut c)?;
    report.damaged = damaged_list(store, catalog, &c.bad)?;
    Ok(report)
}

/// Checks the objects of `snap` not checked yet in `c`; counts into `report`. The caller holds
/// the shared lock.
pub fn check(
    store: &Store,
    snap: &SnapshotInfo,
    report: &mut VerifyReport,
    c: &mut Checked,
) -> Result<(), SnapshotError> {
    let (bad, ok) = (&mut c.bad, &mut c.ok);
    for d in &snap.disks {
        let root_id = d.root_id().ok_or_else(|| {
            SnapshotError::Internal(format!("bad root id in catalog: {}", d.root))
        })?;
        let root = match store.read_root(&root_id) {
            Ok(r) => r,
            Err(e) => {
                bad.insert((Kind::Root as u8, root_id), problem(store, &e));
                continue;
            }
        };
        for (p, page) in root.pages.iter().enumerate() {
            report.pages += 1;
            let entries = match store.read_page(page, root.page_len(p)) {
                Ok(e) => e,
                Err(e) => {
                    bad.insert((Kind::Page as u8, *page), problem(store, &e));
                    continue;
                }
            };
            let first = p as u64 * u64::from(root.page_entries);
            for (i, id) in entries.iter().enumerate().filter(|(_, e)| **e != ZERO) {
                report.chunks += 1;
                if ok.contains(id) || bad.contains_key(&(Kind::Chunk as u8, *id)) {
                    continue;
                }
                match store.read(Kind::Chunk, id) {
                    Ok(data) if data.len() as u64 != root.block_len(first + i as u64) => {
                        let what = format!(
                            "{} bytes where its block has {}",
                            data.len(),
                            root.block_len(first + i as u64)
                        );
                        bad.insert((Kind::Chunk as u8, *id), what);
                    }
                    Ok(data) => {
                        report.bytes += data.len() as u64;
                        ok.insert(*id);
                    }
                    Err(StoreError::Io { op, path, source }) => {
                        return Err(StoreError::Io { op, path, source }.into());
                    }
                    Err(e) => {
                        bad.insert((Kind::Chunk as u8, *id), problem(store, &e));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The damaged objects of `bad`, each with every complete snapshot range that uses it. The
/// caller holds the shared lock.
pub fn damaged_list(
    store: &Store,
    catalog: &Catalog,
    bad: &BTreeMap<(u8, Hash), String>,
) -> Result<Vec<Damaged>, SnapshotError> {
    if bad.is_empty() {
        return Ok(Vec::new());
    }
    let affected = affected_ranges(store, catalog, bad)?;
    let mut out = Vec::new();
    for ((k, id), problem) in bad {
        let kind = match k {
            1 => Kind::Chunk,
            2 => Kind::Page,
            _ => Kind::Root,
        };
        out.push(Damaged {
            kind: kind.to_string(),
            id: hex::encode(id),
            path: store.path(kind, id).display().to_string(),
            problem: problem.clone(),
            affected: affected.get(&(*k, *id)).cloned().unwrap_or_default(),
        });
    }
    Ok(out)
}

/// For each damaged object, the byte ranges of every complete snapshot that depend on it.
fn affected_ranges(
    store: &Store,
    catalog: &Catalog,
    bad: &BTreeMap<(u8, Hash), String>,
) -> Result<HashMap<(u8, Hash), Vec<Affected>>, SnapshotError> {
    let mut out: HashMap<(u8, Hash), Vec<Affected>> = HashMap::new();
    let mut add = |key: (u8, Hash), a: Affected| {
        let v = out.entry(key).or_default();
        match v.last_mut() {
            Some(l) if l.snapshot == a.snapshot && l.disk_id == a.disk_id && l.end == a.start => {
                l.end = a.end
            }
            _ => v.push(a),
        }
    };
    for s in catalog.snapshots_in(&[SnapshotState::Complete])? {
        for d in &s.disks {
            let Some(root_id) = d.root_id() else { continue };
            let range = |start: u64, end: u64, block_size: u32| Affected {
                snapshot: s.id,
                machine_id: s.machine_id.clone(),
                device: d.device.clone(),
                start,
                end,
                disk_id: d.disk_id,
                block_size,
            };
            if bad.contains_key(&(Kind::Root as u8, root_id)) {
                add((Kind::Root as u8, root_id), range(0, d.size_bytes, 0));
                continue;
            }
            let Ok(root) = store.read_root(&root_id) else {
                continue;
            };
            let bs = u64::from(root.block_size);
            for (p, page) in root.pages.iter().enumerate() {
                let first = p as u64 * u64::from(root.page_entries);
                if bad.contains_key(&(Kind::Page as u8, *page)) {
                    let end = ((first + u64::from(root.page_len(p))) * bs).min(root.disk_size);
                    add(
                        (Kind::Page as u8, *page),
                        range(first * bs, end, root.block_size),
                    );
                    continue;
                }
                let Ok(entries) = store.read_page(page, root.page_len(p)) else {
                    continue;
                };
                for (i, id) in entries.iter().enumerate() {
                    if *id != ZERO && bad.contains_key(&(Kind::Chunk as u8, *id)) {
                        let b = first + i as u64;
                        add(
                            (Kind::Chunk as u8, *id),
                            range(b * bs, b * bs + root.block_len(b), root.block_size),
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}
