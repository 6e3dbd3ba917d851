//! The dirty bitmap an agent saves when it stops cleanly (`dirty-<disk>.bitmap` in the state dir):
//! magic, version, geometry, the generation the server is told in the `CleanStop` mark, the bitmap
//! words, and a blake3 of everything before it. Written with the crash-safe recipe; removed (and
//! the directory synced) as soon as the next start has read it, so a bitmap vouches for exactly
//! one restart: after a crash there is no file, and the agent rescans.

use std::io;
use std::path::{Path, PathBuf};

use rehost_proto::fsutil::{read_capped, write_atomic};

use crate::tracker::DirtySet;

const MAGIC: &[u8; 8] = b"RHDIRTY\x01";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8;
/// Largest bitmap accepted back: 2^27 words (a 512 TiB disk at 64 KiB blocks).
const MAX_WORDS: u64 = 1 << 27;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub disk_id: u64,
    pub generation: u64,
    pub size: u64,
    pub block_size: u32,
    pub dirty: DirtySet,
}

pub fn path(dir: &Path, disk_id: u64) -> PathBuf {
    dir.join(format!("dirty-{disk_id}.bitmap"))
}

pub fn encode(s: &Saved) -> Vec<u8> {
    let words = s.dirty.words();
    let mut b = Vec::with_capacity(HEADER + words.len() * 8 + 32);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&s.block_size.to_le_bytes());
    b.extend_from_slice(&s.disk_id.to_le_bytes());
    b.extend_from_slice(&s.generation.to_le_bytes());
    b.extend_from_slice(&s.size.to_le_bytes());
    b.extend_from_slice(&(words.len() as u64).to_le_bytes());
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn decode(b: &[u8]) -> Result<Saved, &'static str> {
    if b.len() < HEADER + 32 || b[..8] != *MAGIC {
        return Err("not a rehost dirty bitmap");
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes()[..] != *sum {
        return Err("checksum mismatch");
    }
    if u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) != VERSION {
        return Err("unknown version");
    }
    let block_size = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes"));
    let (disk_id, generation, size, nwords) = (
        u64_at(body, 16),
        u64_at(body, 24),
        u64_at(body, 32),
        u64_at(body, 40),
    );
    if !(rehost_proto::MIN_BLOCK_SIZE..=rehost_proto::MAX_BLOCK_SIZE).contains(&block_size)
        || generation == 0
    {
        return Err("bad header");
    }
    if nwords > MAX_WORDS || body.len() - HEADER != nwords as usize * 8 {
        return Err("bad length");
    }
    let words = body[HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let dirty =
        DirtySet::from_words(size, block_size, words).ok_or("bitmap does not fit the disk size")?;
    Ok(Saved {
        disk_id,
        generation,
        size,
        block_size,
        dirty,
    })
}

pub fn save(dir: &Path, s: &Saved) -> io::Result<()> {
    write_atomic(&path(dir, s.disk_id), &encode(s), 0o600)
}

/// Reads and removes the saved bitmap of a disk. `Ok(None)`: there was none; `Ok(Some(Err))`: it
/// was there but unusable (the reason).
pub fn take(dir: &Path, disk_id: u64) -> io::Result<Option<Result<Saved, String>>> {
    let p = path(dir, disk_id);
    let raw = match read_capped(&p, HEADER as u64 + MAX_WORDS * 8 + 32) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Ok(Some(Err(format!("cannot read {}: {e}", p.display())))),
    };
    std::fs::remove_file(&p)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(Some(
        decode(&raw).map_err(|e| format!("{} is unusable: {e}", p.display())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Saved {
        let mut dirty = DirtySet::new(5 << 20, 65536);
        dirty.mark_bytes(0, 1);
        dirty.mark_bytes(3 << 20, 200_000);
        Saved {
            disk_id: 3,
            generation: 0xfeed,
            size: 5 << 20,
            block_size: 65536,
            dirty,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let s = sample();
        let b = encode(&s);
        assert_eq!(decode(&b).unwrap(), s);
        for i in [0, 9, 20, 30, b.len() - 40, b.len() - 1] {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(decode(&d).is_err(), "flip at {i} must be caught");
        }
        assert!(decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn take_reads_once() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample()).unwrap();
        assert_eq!(take(dir.path(), 3).unwrap().unwrap().unwrap(), sample());
        assert!(take(dir.path(), 3).unwrap().is_none());
    }

    /// Found by `fuzz/run.sh bitmap`: a well-formed file claiming a disk of 2^58 bytes made the
    /// decoder allocate the bitmap of that size (512 GiB) before comparing it with the saved words.
    #[test]
    fn huge_size_is_refused_without_allocating() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&65536u32.to_le_bytes());
        b.extend_from_slice(&0x73u64.to_le_bytes());
        b.extend_from_slice(&0xfeeeu64.to_le_bytes());
        b.extend_from_slice(&0x0400_0000_5000_0000u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0x0f, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0]);
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        assert_eq!(decode(&b), Err("bitmap does not fit the disk size"));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
        }

        #[test]
        fn valid_header_random_body_never_panics(size in 0u64..(1 << 30), words in proptest::collection::vec(any::<u64>(), 0..64)) {
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&65536u32.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&7u64.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&(words.len() as u64).to_le_bytes());
            for w in &words { b.extend_from_slice(&w.to_le_bytes()); }
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            let _ = decode(&b);
        }
    }
}
