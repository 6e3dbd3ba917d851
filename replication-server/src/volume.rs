//! Staging volumes: one sparse file per source disk (`<disk>.vol`) and its per-block hash index
//! (`<disk>.idx`). The index is a versioned header (magic, version, geometry, blake3 of the header)
//! followed by one 32-byte blake3 per block; an all-zero entry means "never written". Data and
//! index are written with `pwrite` and made durable together by [`Volume::sync`].
//!
//! `<disk>.gen` holds the generation of the agent's last clean stop (magic, version, generation,
//! blake3), written crash-safely when the agent announces the stop and removed when it is handed
//! back, so a generation vouches for exactly one restart.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rehost_proto::Hash;

const MAGIC: &[u8; 8] = b"RHIDX\0\0\x01";
const INDEX_VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("hash index {0} is damaged or of another format")]
    BadIndex(PathBuf),
}

pub struct Volume {
    data: File,
    index: File,
    data_path: PathBuf,
    index_path: PathBuf,
    pub size: u64,
    pub block_size: u32,
}

fn header(size: u64, block_size: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&block_size.to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    let sum = blake3::hash(&h[..24]);
    h[24..56].copy_from_slice(sum.as_bytes());
    h
}

const GEN_MAGIC: &[u8; 8] = b"RHGEN\0\0\x01";

fn gen_path(dir: &Path, disk_id: u64) -> PathBuf {
    dir.join(format!("disk-{disk_id}.gen"))
}

/// Records the agent's clean-stop generation for a disk, durably.
pub fn save_clean_stop(dir: &Path, disk_id: u64, generation: u64) -> Result<(), VolumeError> {
    let p = gen_path(dir, disk_id);
    let mut b = Vec::with_capacity(48);
    b.extend_from_slice(GEN_MAGIC);
    b.extend_from_slice(&generation.to_le_bytes());
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    rehost_proto::fsutil::write_atomic(&p, &b, 0o600).map_err(|source| VolumeError::Io {
        op: "write clean-stop generation",
        path: p,
        source,
    })
}

/// Takes the recorded clean-stop generation (0: none, or damaged) and forgets it durably.
pub fn take_clean_stop(dir: &Path, disk_id: u64) -> Result<u64, VolumeError> {
    let p = gen_path(dir, disk_id);
    let raw = match rehost_proto::fsutil::read_capped(&p, 64) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(VolumeError::Io {
                op: "read clean-stop generation",
                path: p,
                source,
            })
        }
    };
    let generation = if raw.len() == 48
        && raw[..8] == *GEN_MAGIC
        && blake3::hash(&raw[..16]).as_bytes()[..] == raw[16..]
    {
        u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"))
    } else {
        tracing::warn!(path = %p.display(), "clean-stop generation file is damaged; the agent will rescan");
        0
    };
    std::fs::remove_file(&p).map_err(|source| VolumeError::Io {
        op: "remove clean-stop generation",
        path: p.clone(),
        source,
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| VolumeError::Io {
            op: "sync directory",
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(generation)
}

impl Volume {
    pub fn paths(dir: &Path, disk_id: u64) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("disk-{disk_id}.vol")),
            dir.join(format!("disk-{disk_id}.idx")),
        )
    }

    /// Opens the disk's volume, creating or resizing it to `size`.
    pub fn open(dir: &Path, disk_id: u64, size: u64, block_size: u32) -> Result<Self, VolumeError> {
        let (data_path, index_path) = Self::paths(dir, disk_id);
        let err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| VolumeError::Io { op, path, source }
        };
        crate::private::create_dir_all(dir).map_err(err("create directory", dir))?;
        let data = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(err("open volume", &data_path))?;
        if data
            .metadata()
            .map_err(err("stat volume", &data_path))?
            .len()
            != size
        {
            data.set_len(size).map_err(err("size volume", &data_path))?;
        }
        let index = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&index_path)
            .map_err(err("open hash index", &index_path))?;
        let blocks = size.div_ceil(u64::from(block_size));
        let want = header(size, block_size);
        let mut have = [0u8; HEADER_LEN as usize];
        let len = index
            .metadata()
            .map_err(err("stat hash index", &index_path))?
            .len();
        if len >= HEADER_LEN {
            index
                .read_exact_at(&mut have, 0)
                .map_err(err("read hash index", &index_path))?;
        }
        if have != want {
            let known =
                have[..8] == *MAGIC && blake3::hash(&have[..24]).as_bytes()[..] == have[24..56];
            if len >= HEADER_LEN && !known {
                return Err(VolumeError::BadIndex(index_path));
            }
            // New, or a disk whose size changed: keep the entries that still apply.
            index
                .write_all_at(&want, 0)
                .map_err(err("write hash index", &index_path))?;
        }
        index
            .set_len(HEADER_LEN + blocks * 32)
            .map_err(err("size hash index", &index_path))?;
        Ok(Self {
            data,
            index,
            data_path,
            index_path,
            size,
            block_size,
        })
    }

    /// The directory holding this volume's files.
    pub fn dir(&self) -> &Path {
        self.data_path.parent().unwrap_or(Path::new("."))
    }

    fn io(&self, op: &'static str, index: bool) -> impl FnOnce(io::Error) -> VolumeError + '_ {
        let path = if index {
            &self.index_path
        } else {
            &self.data_path
        };
        move |source| VolumeError::Io {
            op,
            path: path.clone(),
            source,
        }
    }

    pub fn write_block(&self, offset: u64, data: &[u8], hash: &Hash) -> Result<(), VolumeError> {
        self.data
            .write_all_at(data, offset)
            .map_err(self.io("write volume", false))?;
        let entry = HEADER_LEN + offset / u64::from(self.block_size) * 32;
        self.index
            .write_all_at(hash, entry)
            .map_err(self.io("write hash index", true))
    }

    /// Zeroes `[offset, offset+len)` (block aligned) by punching a hole, so the volume stays sparse.
    pub fn write_zero(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let punched = fallocate(
            &self.data,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        );
        if punched.is_err() {
            // Filesystems without hole punching: write the zeros.
            let zeros = vec![0u8; self.block_size as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.data
                    .write_all_at(&zeros[..n], at)
                    .map_err(self.io("write volume", false))?;
                at += n as u64;
            }
        }
        let bs = u64::from(self.block_size);
        let full = rehost_proto::zero_hash(self.block_size as usize);
        let first = offset / bs;
        let last = (offset + len).div_ceil(bs);
        let mut buf = Vec::with_capacity(((last - first) as usize).min(4096) * 32);
        let mut b = first;
        while b < last {
            buf.clear();
            let batch_end = last.min(b + 4096);
            for blk in b..batch_end {
                let blen = (self.size - blk * bs).min(bs);
                if blen == bs {
                    buf.extend_from_slice(&full);
                } else {
                    buf.extend_from_slice(&rehost_proto::zero_hash(blen as usize));
                }
            }
            self.index
                .write_all_at(&buf, HEADER_LEN + b * 32)
                .map_err(self.io("write hash index", true))?;
            b = batch_end;
        }
        Ok(())
    }

    /// Makes every write so far durable (data, then index).
    pub fn sync(&self) -> Result<(), VolumeError> {
        self.data
            .sync_data()
            .map_err(self.io("fdatasync volume", false))?;
        self.index
            .sync_data()
            .map_err(self.io("fdatasync hash index", true))
    }

    pub fn read_index(&self, start_block: u64, count: u32) -> Result<Vec<Hash>, VolumeError> {
        let mut buf = vec![0u8; count as usize * 32];
        self.index
            .read_exact_at(&mut buf, HEADER_LEN + start_block * 32)
            .map_err(self.io("read hash index", true))?;
        Ok(buf
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(self.io("read volume", false))
    }
}
