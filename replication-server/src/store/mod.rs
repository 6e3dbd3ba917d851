//! The snapshot store: content-addressed objects under `data_dir/store/`.
//!
//! ```text
//! store/chunks/ab/abcdef…   one volume block, zstd-compressed; id = blake3 of the block
//! store/pages/ab/…          1024 chunk ids (see [`tree`])
//! store/roots/ab/…          one disk of one snapshot: geometry and page ids
//! store/store.lock          flock: shared while objects are written or read, exclusive to sweep
//! store/gc.lock             flock: one garbage collection at a time
//! store/quarantine/abcdef…  a chunk found damaged (or a marker for a missing one)
//! store/scrub.json          the result of the last scrub (see `snapshot::scrub`)
//! ```
//!
//! Every file uses the container of [`object`] (magic, version, lengths, id, body, checksum). New
//! objects are written as `NAME.<pid>.<n>.partial`; a [`Batch`] makes them durable together
//! (one `syncfs`), then links each to its final name, which fails rather than replace an
//! existing object (an object is never rewritten), and `syncfs` again. So a final name always
//! holds a complete, durable object; a crash leaves only `.partial` files, which GC removes.
//!
//! - [`object`]: the file container; [`tree`]: pages and roots; [`gc`]: mark and sweep;
//!   [`quarantine`]: damaged chunks set aside until the volume gives them back.

pub mod gc;
pub mod object;
pub mod quarantine;
pub mod tree;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use rehost_proto::Hash;

use object::{Damage, Kind};
use tree::{Root, TreeError};

/// Largest chunk we accept back (the largest block size a root may name).
const MAX_CHUNK: u64 = 16 << 20;
const MAX_PAGE: u64 = 4 + 65536 * 32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{kind} {id} ({path}) is damaged")]
    Damaged {
        kind: Kind,
        id: String,
        path: PathBuf,
        source: Damage,
    },
    #[error("{kind} {id} is missing from the store ({path})")]
    Missing {
        kind: Kind,
        id: String,
        path: PathBuf,
    },
    #[error("{kind} {id} is damaged")]
    Tree {
        kind: Kind,
        id: String,
        source: TreeError,
    },
    #[error("another garbage collection is running")]
    Busy,
}

pub fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// Objects (id, path) and `.partial` leftovers of one kind.
pub type Listing = (Vec<(Hash, PathBuf)>, Vec<PathBuf>);

/// A held flock on a store lock file; released on drop.
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

pub struct Store {
    dir: PathBuf,
}

static PARTIAL_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        for k in Kind::ALL {
            let d = dir.join(k.dir());
            crate::private::create_dir_all(&d).map_err(io_err("create store directory", &d))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, kind: Kind, id: &Hash) -> PathBuf {
        let h = hex::encode(id);
        self.dir.join(kind.dir()).join(&h[..2]).join(h)
    }

    pub fn exists(&self, kind: Kind, id: &Hash) -> bool {
        self.path(kind, id).exists()
    }

    fn lock(&self, name: &str, arg: FlockArg) -> Result<StoreLock, StoreError> {
        let p = self.dir.join(name);
        let f = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(io_err("open store lock", &p))?;
        match Flock::lock(f, arg) {
            Ok(l) => Ok(StoreLock(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StoreError::Busy),
            Err((_, e)) => Err(StoreError::Io {
                op: "lock store",
                path: p,
                source: e.into(),
            }),
        }
    }

    /// Held while writing objects of a snapshot or reading them (export, verify): GC does not
    /// sweep meanwhile.
    pub fn shared_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock("store.lock", FlockArg::LockShared)
    }

    pub(crate) fn exclusive_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock("store.lock", FlockArg::LockExclusive)
    }

    pub(crate) fn gc_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock("gc.lock", FlockArg::LockExclusiveNonblock)
    }

    /// Reads and checks one object; returns its data.
    pub fn read(&self, kind: Kind, id: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.path(kind, id);
        let max = match kind {
            Kind::Chunk => MAX_CHUNK,
            Kind::Page => MAX_PAGE,
            Kind::Root => object::MAX_RAW,
        };
        let cap = object::HEADER_LEN as u64 + max + (max >> 7) + 4096 + object::TRAILER_LEN as u64;
        let file = match rehost_proto::fsutil::read_capped(&path, cap) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    kind,
                    id: hex::encode(id),
                    path,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let damage = Damage::Header {
                    what: e.to_string(),
                };
                return Err(StoreError::Damaged {
                    kind,
                    id: hex::encode(id),
                    path,
                    source: damage,
                });
            }
            Err(e) => {
                return Err(StoreError::Io {
                    op: "read store object",
                    path,
                    source: e,
                })
            }
        };
        object::decode(&file, kind, id, max).map_err(|source| StoreError::Damaged {
            kind,
            id: hex::encode(id),
            path,
            source,
        })
    }

    pub fn read_root(&self, id: &Hash) -> Result<Root, StoreError> {
        let b = self.read(Kind::Root, id)?;
        Root::decode(&b).map_err(|source| StoreError::Tree {
            kind: Kind::Root,
            id: hex::encode(id),
            source,
        })
    }

    pub fn read_page(&self, id: &Hash, expect: u32) -> Result<Vec<Hash>, StoreError> {
        let b = self.read(Kind::Page, id)?;
        tree::decode_page(&b, expect).map_err(|source| StoreError::Tree {
            kind: Kind::Page,
            id: hex::encode(id),
            source,
        })
    }

    /// Lists the objects of `kind` (ids parsed from names) and the `.partial` leftovers.
    pub fn list(&self, kind: Kind) -> Result<Listing, StoreError> {
        let (mut objects, mut partials) = (Vec::new(), Vec::new());
        let top = self.dir.join(kind.dir());
        for sub in std::fs::read_dir(&top).map_err(io_err("list store", &top))? {
            let sub = sub.map_err(io_err("list store", &top))?.path();
            if !sub.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&sub).map_err(io_err("list store", &sub))? {
                let p = e.map_err(io_err("list store", &sub))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".partial") {
                    partials.push(p);
                } else if let Some(id) = hex::decode(name)
                    .ok()
                    .and_then(|v| <Hash>::try_from(v).ok())
                {
                    objects.push((id, p));
                }
            }
        }
        Ok((objects, partials))
    }

    /// Writes an encoded object to a fresh `.partial` file next to its final name, without making
    /// it durable; returns (partial, final). A [`Batch`] adopts it and commits it.
    pub fn write_partial(
        &self,
        kind: Kind,
        id: &Hash,
        file: &[u8],
    ) -> Result<(PathBuf, PathBuf), StoreError> {
        let path = self.path(kind, id);
        let parent = path.parent().unwrap_or(&self.dir);
        crate::private::create_dir_all(parent).map_err(io_err("create store directory", parent))?;
        let mut partial = path.clone().into_os_string();
        partial.push(format!(
            ".{}.{}.partial",
            std::process::id(),
            PARTIAL_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let partial = PathBuf::from(partial);
        crate::private::create(&partial)
            .and_then(|mut f| std::io::Write::write_all(&mut f, file))
            .map_err(io_err("write store object", &partial))?;
        Ok((partial, path))
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            pending: Vec::new(),
            seen: HashSet::new(),
            bytes: 0,
            zstd: zstd::bulk::Compressor::new(1).ok(),
        }
    }
}

/// Objects written as `.partial` files and made durable together by [`Batch::commit`].
pub struct Batch<'a> {
    store: &'a Store,
    pending: Vec<(PathBuf, PathBuf)>,
    seen: HashSet<(Kind, Hash)>,
    /// Bytes of object files this batch added.
    pub bytes: u64,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Batch<'_> {
    /// Whether the store has, or this batch will have, the object.
    pub fn contains(&self, kind: Kind, id: &Hash) -> bool {
        self.seen.contains(&(kind, *id)) || self.store.exists(kind, id)
    }

    /// Stores `data` unless an object with its id exists; returns the id.
    pub fn put(&mut self, kind: Kind, data: &[u8]) -> Result<Hash, StoreError> {
        let id = *blake3::hash(data).as_bytes();
        if self.contains(kind, &id) {
            return Ok(id);
        }
        let zstd = if kind == Kind::Chunk {
            self.zstd.as_mut()
        } else {
            None
        };
        let file = object::encode_with_id(kind, &id, data, zstd);
        let (partial, path) = self.store.write_partial(kind, &id, &file)?;
        self.adopt(kind, id, partial, path, file.len() as u64);
        Ok(id)
    }

    /// Takes over a `.partial` file written by [`Store::write_partial`] (on another thread).
    pub fn adopt(&mut self, kind: Kind, id: Hash, partial: PathBuf, path: PathBuf, len: u64) {
        if !self.seen.insert((kind, id)) {
            let _ = std::fs::remove_file(partial);
            return;
        }
        self.bytes += len;
        self.pending.push((partial, path));
    }

    /// Makes every object of the batch durable under its final name.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let dir = File::open(self.store.dir()).map_err(io_err("open store", self.store.dir()))?;
        let sync = |dir: &File| {
            nix::unistd::syncfs(dir).map_err(|e| StoreError::Io {
                op: "syncfs store",
                path: self.store.dir().into(),
                source: e.into(),
            })
        };
        sync(&dir)?;
        for (partial, path) in self.pending.drain(..) {
            match std::fs::hard_link(&partial, &path) {
                Ok(()) => {}
                // Written meanwhile by another snapshot with the same data: keep that one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        op: "link store object",
                        path,
                        source: e,
                    })
                }
            }
            std::fs::remove_file(&partial).map_err(io_err("remove partial object", &partial))?;
        }
        sync(&dir)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // An abandoned batch leaves nothing behind but what GC would remove anyway.
        for (partial, _) in self.pending.drain(..) {
            let _ = std::fs::remove_file(partial);
        }
    }
}
