//! The one container every store object uses (chunks, hash pages, roots): a fixed header, the
//! body, and a trailing checksum.
//!
//! ```text
//! 0   magic "RHOBJ\0\0\x01"          8 bytes
//! 8   format version (u32 le) = 1
//! 12  kind (u8: 1 chunk, 2 page, 3 root), compression (u8: 0 none, 1 zstd), 2 zero bytes
//! 16  raw length (u64 le): length of the uncompressed data
//! 24  body length (u64 le): length of the stored body
//! 32  id: blake3 of the uncompressed data (32 bytes)
//! 64  body
//! ..  blake3 of everything before it (32 bytes)
//! ```
//!
//! The id is also the file name, so a decoder checks three things: the file checksum (a torn or
//! flipped file), the id against the name asked for, and blake3 of the decompressed data against
//! the id. Lengths are capped before anything is allocated.

use rehost_proto::Hash;

const MAGIC: &[u8; 8] = b"RHOBJ\0\0\x01";
pub const OBJECT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const TRAILER_LEN: usize = 32;
/// Largest uncompressed object: a root for a 64 TiB disk of 64 KiB blocks is 32 MiB.
pub const MAX_RAW: u64 = 64 << 20;
/// Largest file we read back: header, an uncompressible body with zstd's worst-case overhead, trailer.
pub const MAX_FILE: u64 = HEADER_LEN as u64 + MAX_RAW + (MAX_RAW >> 7) + 4096 + TRAILER_LEN as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Chunk = 1,
    Page = 2,
    Root = 3,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Chunk, Kind::Page, Kind::Root];

    pub fn dir(self) -> &'static str {
        match self {
            Kind::Chunk => "chunks",
            Kind::Page => "pages",
            Kind::Root => "roots",
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Chunk,
            2 => Kind::Page,
            3 => Kind::Root,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Chunk => "chunk",
            Kind::Page => "page",
            Kind::Root => "root",
        })
    }
}

/// What is wrong with an object file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("file is {0} bytes, too short for an object")]
    Short(usize),
    #[error("not a rehost store object (bad magic)")]
    Magic,
    #[error(
        "object format version {0} is not understood (this server reads version {OBJECT_VERSION})"
    )]
    Version(u32),
    #[error("file checksum does not match its content")]
    Checksum,
    #[error("header says {what}")]
    Header { what: String },
    #[error("object is a {found}, expected a {expected}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("object id in the header ({found}) is not its file name")]
    WrongId { found: String },
    #[error("body does not decompress to {0} bytes")]
    Decompress(u64),
    #[error("blake3 of the data does not match the object id")]
    Content,
}

/// Encodes `data` as an object of `kind`; compresses with `zstd` when given and when it helps.
pub fn encode(
    kind: Kind,
    data: &[u8],
    zstd: Option<&mut zstd::bulk::Compressor<'_>>,
) -> (Hash, Vec<u8>) {
    let id = *blake3::hash(data).as_bytes();
    (id, encode_with_id(kind, &id, data, zstd))
}

/// [`encode`] for a caller that has already computed `id` = blake3 of `data`.
pub fn encode_with_id(
    kind: Kind,
    id: &Hash,
    data: &[u8],
    zstd: Option<&mut zstd::bulk::Compressor<'_>>,
) -> Vec<u8> {
    let compressed = zstd
        .and_then(|c| c.compress(data).ok())
        .filter(|c| c.len() < data.len());
    let (compression, body) = match &compressed {
        Some(c) => (1u8, c.as_slice()),
        None => (0u8, data),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
    out.extend_from_slice(&[kind as u8, compression, 0, 0]);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes an object file, checking everything listed in the module docs. `max_raw` caps the
/// uncompressed size the caller accepts for this kind.
pub fn decode(file: &[u8], kind: Kind, id: &Hash, max_raw: u64) -> Result<Vec<u8>, Damage> {
    if file.len() < HEADER_LEN + TRAILER_LEN {
        return Err(Damage::Short(file.len()));
    }
    if &file[..8] != MAGIC {
        return Err(Damage::Magic);
    }
    let (content, sum) = file.split_at(file.len() - TRAILER_LEN);
    if blake3::hash(content).as_bytes()[..] != sum[..] {
        return Err(Damage::Checksum);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&file[8..12]);
    let version = u32::from_le_bytes(v);
    if version != OBJECT_VERSION {
        return Err(Damage::Version(version));
    }
    let found = Kind::from_u8(file[12]).ok_or_else(|| Damage::Header {
        what: format!("kind {}", file[12]),
    })?;
    if found != kind {
        return Err(Damage::WrongKind {
            expected: kind,
            found,
        });
    }
    let compression = file[13];
    let raw_len = u64_at(file, 16);
    let body_len = u64_at(file, 24);
    if raw_len > max_raw.min(MAX_RAW) {
        return Err(Damage::Header {
            what: format!("{raw_len} bytes of data, more than the {max_raw}-byte limit"),
        });
    }
    if body_len != (content.len() - HEADER_LEN) as u64 {
        return Err(Damage::Header {
            what: format!("a {body_len}-byte body in a {}-byte file", file.len()),
        });
    }
    if &file[32..64] != id {
        return Err(Damage::WrongId {
            found: hex::encode(&file[32..64]),
        });
    }
    let body = &content[HEADER_LEN..];
    let data = match compression {
        0 if body_len == raw_len => body.to_vec(),
        0 => {
            return Err(Damage::Header {
                what: "an uncompressed body of the wrong length".into(),
            })
        }
        1 => {
            let mut out = vec![0u8; raw_len as usize];
            match zstd::bulk::decompress_to_buffer(body, &mut out[..]) {
                Ok(n) if n as u64 == raw_len => out,
                _ => return Err(Damage::Decompress(raw_len)),
            }
        }
        c => {
            return Err(Damage::Header {
                what: format!("compression {c}"),
            })
        }
    };
    if blake3::hash(&data).as_bytes() != id {
        return Err(Damage::Content);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_compressed_and_raw() {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let text = b"rehost ".repeat(1000);
        let (id, file) = encode(Kind::Chunk, &text, Some(&mut c));
        assert_eq!(file[13], 1, "compressible data is compressed");
        assert_eq!(decode(&file, Kind::Chunk, &id, MAX_RAW).unwrap(), text);
        let (id2, file2) = encode(Kind::Page, &[7u8; 3], Some(&mut c));
        assert_eq!(file2[13], 0, "no compression where it does not help");
        assert_eq!(decode(&file2, Kind::Page, &id2, MAX_RAW).unwrap(), [7u8; 3]);
        assert_eq!(
            decode(&file2, Kind::Chunk, &id2, MAX_RAW),
            Err(Damage::WrongKind {
                expected: Kind::Chunk,
                found: Kind::Page
            })
        );
        assert!(matches!(
            decode(&file2, Kind::Page, &id, MAX_RAW),
            Err(Damage::WrongId { .. })
        ));
        assert!(matches!(
            decode(&file, Kind::Chunk, &id, 10),
            Err(Damage::Header { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let (id, file) = encode(Kind::Chunk, &b"abc".repeat(50), Some(&mut c));
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(&bad, Kind::Chunk, &id, MAX_RAW).is_err(),
                "flip at {i} not detected"
            );
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(file in proptest::collection::vec(any::<u8>(), 0..300), id in any::<[u8; 32]>()) {
            let _ = decode(&file, Kind::Chunk, &id, MAX_RAW);
        }

        #[test]
        fn random_body_with_valid_envelope_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0u64..100_000, comp in 0u8..3) {
            // A well-formed envelope (valid checksum) around arbitrary, possibly lying, fields.
            let mut f = Vec::new();
            f.extend_from_slice(MAGIC);
            f.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
            f.extend_from_slice(&[1, comp, 0, 0]);
            f.extend_from_slice(&raw_len.to_le_bytes());
            f.extend_from_slice(&(body.len() as u64).to_le_bytes());
            f.extend_from_slice(&[9u8; 32]);
            f.extend_from_slice(&body);
            let sum = *blake3::hash(&f).as_bytes();
            f.extend_from_slice(&sum);
            let _ = decode(&f, Kind::Chunk, &[9u8; 32], MAX_RAW);
        }

        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), compress in any::<bool>()) {
            let mut c = zstd::bulk::Compressor::new(1).unwrap();
            let (id, file) = encode(Kind::Chunk, &data, if compress { Some(&mut c) } else { None });
            prop_assert_eq!(decode(&file, Kind::Chunk, &id, MAX_RAW).unwrap(), data);
        }
    }
}
