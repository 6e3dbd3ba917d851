//! LVM2 physical volumes and their volume group metadata, read in userspace.
//!
//! The staging host's kernel may have no device-mapper, so an LVM root cannot be activated there. What
//! can be done without it: read the on-disk format (the PV label, the PV header, the metadata area
//! header and the newest text metadata it points at), find the logical volumes, and for a volume made of
//! one linear segment on one PV, compute the byte range it occupies. That range is then attached as a
//! plain loop device (offset + size limit), like a partition.
//!
//! On-disk layout (all integers little endian; offsets relative to the start of the PV):
//! - a label sector in one of sectors 0..3: `LABELONE`, its own sector number, a CRC of bytes 20..512,
//!   the offset of the PV header (32) and the type `LVM2 001`;
//! - the PV header: a 32-character PV UUID, the device size, then two zero-terminated lists of
//!   (offset, size) pairs: the data areas, then the metadata areas;
//! - at each metadata area, a 512-byte `mda_header`: CRC of bytes 4..512, the magic ` LVM2 x[5A%r0N*>`,
//!   version 1, its own absolute start and size, then `raw_locn` entries; the first one (offset relative
//!   to the area, size, CRC of the text) locates the current metadata, which may wrap around to just
//!   after the header;
//! - the metadata: LVM's configuration text (`vg { physical_volumes { .. } logical_volumes { .. } }`).
//!
//! Everything here is hostile input: each read is bounded and checked against the PV size, every CRC is
//! verified (LVM's CRC-32 variant: the IEEE polynomial, initial value 0xf597a6cf, no final inversion),
//! the text parser limits nesting, item count and length, and nothing panics on any input.
//!
//! Submodules: `label` reads the label, the PV header and the metadata areas; `text` parses
//! LVM's configuration text; `vg` turns it into the volume group; `placement` locates a logical
//! volume on its PV.

mod label;
mod placement;
mod text;
mod vg;

pub use label::{format_uuid, read_pv, Area, PhysicalVolume};
pub use placement::{Placement, PlacementError};
pub use text::{parse_config, Section, Value};
pub use vg::{LogicalVolume, Segment, VgPv, VolumeGroup};

/// Initial value of LVM's CRC.
pub const INITIAL_CRC: u32 = 0xf597_a6cf;
const SECTOR: u64 = 512;
const LABEL_SCAN_SECTORS: u64 = 4;
/// The largest metadata text read (LVM's own default metadata area is 1 MiB).
pub const MAX_METADATA: u64 = 16 << 20;

/// LVM's CRC-32: reflected IEEE polynomial, caller-chosen initial value, no final inversion.
pub fn crc(initial: u32, data: &[u8]) -> u32 {
    let mut c = initial;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    c
}

/// Why a physical volume's label or metadata was refused.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error("read {what} at PV byte {offset}")]
    Read {
        what: &'static str,
        offset: u64,
        source: std::io::Error,
    },
    #[error("no LVM2 label in the first {LABEL_SCAN_SECTORS} sectors")]
    NoLabel,
    #[error("LVM2 label in sector {sector}: {reason}")]
    BadLabel { sector: u64, reason: String },
    #[error("PV header: {0}")]
    BadPvHeader(String),
    #[error("metadata area at PV byte {offset}: {reason}")]
    BadMdaHeader { offset: u64, reason: String },
    #[error("metadata text at PV byte {offset}: checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    MetadataChecksum {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("metadata text: syntax error at byte {at}: {reason}")]
    Syntax { at: usize, reason: String },
    #[error("volume group metadata: {0}")]
    Metadata(String),
}

/// The device-mapper name of `vg/lv` (`-` doubled in each part), as in `/dev/mapper/NAME`.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Split a device-mapper name back into (vg, lv): the separator is the first single `-`.
pub fn split_dm_name(name: &str) -> Option<(String, String)> {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&name[..i], &name[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
#[path = "lvm_tests.rs"]
mod tests;
