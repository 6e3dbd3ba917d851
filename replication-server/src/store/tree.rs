//! Snapshot metadata: per disk a **root** (geometry and the ids of its hash pages) and **pages**
//! of chunk ids, 1024 blocks per page. Pages and roots are store objects like chunks, so a page
//! that did not change since the previous snapshot is the same object and stored once (as git
//! shares unchanged trees). A page entry of 32 zero bytes is a block of zeros, which is not stored.
//!
//! Page body: `count: u32 le`, then `count` 32-byte chunk ids.
//! Root body: `version: u32 = 1`, `block_size: u32`, `disk_size: u64`, `page_entries: u32`,
//! `page_count: u32`, then `page_count` 32-byte page ids. All le. The object container around
//! them carries the format version of the envelope and the checksum.

use rehost_proto::Hash;

pub const ROOT_VERSION: u32 = 1;
/// Blocks per page: 32 KiB of ids, covering 64 MiB of disk with 64 KiB blocks.
pub const PAGE_ENTRIES: u32 = 1024;
/// The id stored for a block of zeros (no chunk).
pub const ZERO: Hash = [0u8; 32];
const ROOT_HEADER: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("{what} body is {len} bytes, which does not fit its header")]
    Length { what: &'static str, len: usize },
    #[error(
        "root format version {0} is not understood (this server reads version {ROOT_VERSION})"
    )]
    Version(u32),
    #[error("root geometry is impossible: {0}")]
    Geometry(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub disk_size: u64,
    pub block_size: u32,
    pub page_entries: u32,
    pub pages: Vec<Hash>,
}

impl Root {
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.block_size))
    }

    /// Number of entries page `p` must hold.
    pub fn page_len(&self, p: usize) -> u32 {
        let start = p as u64 * u64::from(self.page_entries);
        (self.blocks() - start.min(self.blocks())).min(u64::from(self.page_entries)) as u32
    }

    /// Bytes of block `b` (the last block of a disk may be short).
    pub fn block_len(&self, b: u64) -> u64 {
        let bs = u64::from(self.block_size);
        self.disk_size.saturating_sub(b * bs).min(bs)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROOT_HEADER + self.pages.len() * 32);
        out.extend_from_slice(&ROOT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.page_entries.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(p);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, TreeError> {
        if b.len() < ROOT_HEADER {
            return Err(TreeError::Length {
                what: "root",
                len: b.len(),
            });
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let version = u32_at(0);
        if version != ROOT_VERSION {
            return Err(TreeError::Version(version));
        }
        let block_size = u32_at(4);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        let disk_size = u64::from_le_bytes(s);
        let page_entries = u32_at(16);
        let count = u32_at(20) as usize;
        if !(512..=(16 << 20)).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(TreeError::Geometry(format!("block size {block_size}")));
        }
        if !(1..=65536).contains(&page_entries) {
            return Err(TreeError::Geometry(format!(
                "{page_entries} entries per page"
            )));
        }
        if b.len() != ROOT_HEADER + count * 32 {
            return Err(TreeError::Length {
                what: "root",
                len: b.len(),
            });
        }
        let root = Root {
            disk_size,
            block_size,
            page_entries,
            pages: b[ROOT_HEADER..].chunks_exact(32).map(to_hash).collect(),
        };
        let want = root.blocks().div_ceil(u64::from(page_entries));
        if want != count as u64 {
            return Err(TreeError::Geometry(format!(
                "{count} pages for a {disk_size}-byte disk"
            )));
        }
        Ok(root)
    }
}

fn to_hash(c: &[u8]) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(c);
    h
}

pub fn encode_page(entries: &[Hash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * 32);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

/// Decodes a page that must hold exactly `expect` entries.
pub fn decode_page(b: &[u8], expect: u32) -> Result<Vec<Hash>, TreeError> {
    if b.len() < 4 {
        return Err(TreeError::Length {
            what: "page",
            len: b.len(),
        });
    }
    let count = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if count != expect || b.len() != 4 + count as usize * 32 {
        return Err(TreeError::Length {
            what: "page",
            len: b.len(),
        });
    }
    Ok(b[4..].chunks_exact(32).map(to_hash).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn root_geometry() {
        let r = Root {
            disk_size: (64 << 20) + 1,
            block_size: 65536,
            page_entries: 1024,
            pages: vec![[1; 32], [2; 32]],
        };
        assert_eq!(r.blocks(), 1025);
        assert_eq!(r.page_len(0), 1024);
        assert_eq!(r.page_len(1), 1);
        assert_eq!(r.block_len(1024), 1);
        assert_eq!(Root::decode(&r.encode()).unwrap(), r);
        let short = Root {
            pages: vec![[1; 32]],
            ..r.clone()
        };
        assert!(matches!(
            Root::decode(&short.encode()),
            Err(TreeError::Geometry(_))
        ));
        let empty = Root {
            disk_size: 0,
            block_size: 65536,
            page_entries: 1024,
            pages: vec![],
        };
        assert_eq!(Root::decode(&empty.encode()).unwrap(), empty);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), n in any::<u32>()) {
            let _ = Root::decode(&b);
            let _ = decode_page(&b, n);
        }

        #[test]
        fn page_round_trip(entries in proptest::collection::vec(any::<[u8; 32]>(), 0..50)) {
            let n = entries.len() as u32;
            prop_assert_eq!(decode_page(&encode_page(&entries), n).unwrap(), entries);
        }

        #[test]
        fn root_round_trip(size in 0u64..(1 << 40), shift in 9u32..24, per in 1u32..4096) {
            let bs = 1u32 << shift;
            let blocks = size.div_ceil(u64::from(bs));
            let pages = blocks.div_ceil(u64::from(per));
            prop_assume!(pages < 5000);
            let r = Root { disk_size: size, block_size: bs, page_entries: per, pages: (0..pages).map(|i| [i as u8; 32]).collect() };
            prop_assert_eq!(Root::decode(&r.encode()).unwrap(), r);
        }
    }
}
