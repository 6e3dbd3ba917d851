//! Quarantine of damaged chunks: `store/quarantine/<id>`.
//!
//! A chunk found damaged (verify, scrub) is *moved* there from its name under `chunks/`, one
//! `rename` (so at any moment it is at exactly one of the two names), and both directories are
//! synced. A chunk a snapshot needs that is missing altogether gets an empty marker file there,
//! written the durable way ([`rehost_proto::fsutil::write_atomic`]). So after a crash at any
//! point a chunk is either still under its name (the next verify finds it again) or quarantined.
//!
//! Nothing treats a quarantined chunk as present: its name under `chunks/` is gone, and the next
//! snapshot ([`crate::snapshot`]) reads the quarantine list and stores the chunk again from the
//! volume, also for blocks that did not change since the previous snapshot, when the volume's
//! block still hashes to the chunk's id. Repair (`snapshot verify --repair`, the scrub) does the
//! same for the blocks older snapshots used. Once the chunk is back under its name the entry is
//! released. GC drops entries no complete or in-progress snapshot references.
//!
//! Quarantining takes the store's *exclusive* lock (as GC's removals do): no snapshot is writing
//! meanwhile, so none can find the damaged chunk present and then lose it.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use rehost_proto::Hash;

use super::object::Kind;
use super::{io_err, Store, StoreError};

pub const DIR: &str = "quarantine";

/// What [`Store::quarantine`] did with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quarantined {
    /// The damaged file was moved out of its name.
    Moved,
    /// The chunk was missing; a marker records it.
    Marked,
    /// The chunk reads back fine now (nothing done).
    Healthy,
    /// It was in quarantine already.
    Already,
}

impl Store {
    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir().join(DIR)
    }

    /// Where a quarantined chunk (or its marker) is.
    pub fn quarantine_path(&self, id: &Hash) -> PathBuf {
        self.quarantine_dir().join(hex::encode(id))
    }

    /// Ids of the chunks in quarantine (whether or not they are back under their name).
    pub fn quarantined(&self) -> Result<HashSet<Hash>, StoreError> {
        let dir = self.quarantine_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(io_err("list quarantine", &dir)(e)),
        };
        let mut out = HashSet::new();
        for e in rd {
            let e = e.map_err(io_err("list quarantine", &dir))?;
            let name = e.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| hex::decode(n).ok())
                .and_then(|v| <Hash>::try_from(v).ok())
            {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Chunks in quarantine that are not back under their name: what snapshots lack.
    pub fn quarantined_missing(&self) -> Result<HashSet<Hash>, StoreError> {
        let mut q = self.quarantined()?;
        q.retain(|id| !self.exists(Kind::Chunk, id));
        Ok(q)
    }

    /// Moves each damaged chunk of `ids` to the quarantine (a missing one gets a marker). Takes
    /// the exclusive lock: the caller must not hold the shared one.
    pub fn quarantine(&self, ids: &[Hash]) -> Result<Vec<(Hash, Quarantined)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let _x = self.exclusive_lock()?;
        let qdir = self.quarantine_dir();
        crate::private::create_dir_all(&qdir).map_err(io_err("create quarantine", &qdir))?;
        let mut out = Vec::new();
        let mut synced_dirs: HashSet<PathBuf> = HashSet::new();
        for id in ids {
            let path = self.path(Kind::Chunk, id);
            let to = self.quarantine_path(id);
            let what = match self.read(Kind::Chunk, id) {
                Ok(_) => Quarantined::Healthy,
                // Already quarantined (keep what was moved there), or missing: record it.
                Err(StoreError::Missing { .. }) if to.exists() => Quarantined::Already,
                Err(StoreError::Missing { .. }) => {
                    rehost_proto::fsutil::write_atomic(&to, b"", crate::private::FILE_MODE)
                        .map_err(io_err("record missing chunk in quarantine", &to))?;
                    Quarantined::Marked
                }
                Err(StoreError::Damaged { .. }) => {
                    std::fs::rename(&path, &to)
                        .map_err(io_err("move damaged chunk to quarantine", &path))?;
                    if let Some(p) = path.parent() {
                        synced_dirs.insert(p.to_path_buf());
                    }
                    synced_dirs.insert(qdir.clone());
                    Quarantined::Moved
                }
                Err(e) => return Err(e),
            };
            if matches!(what, Quarantined::Moved | Quarantined::Marked) {
                tracing::warn!(chunk = %hex::encode(id), action = ?what, "chunk quarantined");
            }
            out.push((*id, what));
            if out.len() == 1 && ids.len() > 1 {
                crate::failpoint::hit("quarantine-mid-way");
            }
        }
        for d in synced_dirs {
            File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync directory", &d))?;
        }
        Ok(out)
    }

    /// Forgets the quarantine entries of `ids` that are back under their name.
    pub fn release(&self, ids: &[Hash]) -> Result<usize, StoreError> {
        let mut n = 0;
        for id in ids {
            if !self.exists(Kind::Chunk, id) {
                continue;
            }
            let p = self.quarantine_path(id);
            match std::fs::remove_file(&p) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("release quarantined chunk", &p)(e)),
            }
        }
        Ok(n)
    }

    /// Under the exclusive lock (GC): removes entries whose chunk is back or that `live` (the
    /// chunks complete and in-progress snapshots use) does not name, and write leftovers.
    pub(crate) fn prune_quarantine(&self, live: &HashSet<Hash>) -> Result<u64, StoreError> {
        let dir = self.quarantine_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list quarantine", &dir)(e)),
        };
        let mut n = 0;
        for e in rd {
            let p = e.map_err(io_err("list quarantine", &dir))?.path();
            let id = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| hex::decode(n).ok())
                .and_then(|v| <Hash>::try_from(v).ok());
            let drop = match id {
                Some(id) => !live.contains(&id) || self.exists(Kind::Chunk, &id),
                None => true,
            };
            if drop && std::fs::remove_file(&p).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, data: &[u8]) -> Hash {
        let _l = store.shared_lock().unwrap();
        let mut b = store.batch();
        let id = b.put(Kind::Chunk, data).unwrap();
        b.commit().unwrap();
        id
    }

    #[test]
    fn damaged_moves_missing_is_marked_healthy_stays_and_release_and_prune() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let good = put(&store, &[1u8; 5000]);
        let bad = put(&store, &[2u8; 5000]);
        let gone = *blake3::hash(b"never stored").as_bytes();
        let p = store.path(Kind::Chunk, &bad);
        let mut f = std::fs::read(&p).unwrap();
        let mid = f.len() / 2;
        f[mid] ^= 1;
        std::fs::write(&p, &f).unwrap();

        let r = store.quarantine(&[good, bad, gone]).unwrap();
        assert_eq!(
            r,
            vec![
                (good, Quarantined::Healthy),
                (bad, Quarantined::Moved),
                (gone, Quarantined::Marked)
            ]
        );
        assert!(!store.exists(Kind::Chunk, &bad), "nothing finds it present");
        assert_eq!(std::fs::read(store.quarantine_path(&bad)).unwrap(), f);
        assert_eq!(
            store.quarantined_missing().unwrap(),
            [bad, gone].into_iter().collect()
        );
        // A batch no longer sees it, so it writes the chunk again.
        {
            let _l = store.shared_lock().unwrap();
            let mut b = store.batch();
            assert!(!b.contains(Kind::Chunk, &bad));
            b.put(Kind::Chunk, &[2u8; 5000]).unwrap();
            assert!(b.bytes > 0);
            b.commit().unwrap();
        }
        assert_eq!(store.read(Kind::Chunk, &bad).unwrap(), vec![2u8; 5000]);
        assert_eq!(store.release(&[bad, gone]).unwrap(), 1);
        assert_eq!(store.quarantined().unwrap(), [gone].into_iter().collect());
        // GC keeps the record of a chunk a snapshot still needs, drops the others.
        assert_eq!(store.prune_quarantine(&[gone].into()).unwrap(), 0);
        assert_eq!(store.prune_quarantine(&HashSet::new()).unwrap(), 1);
    }
}
