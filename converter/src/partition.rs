//! MBR and GPT partition tables, parsed natively with strict bounds checks.
//!
//! The kernel on the staging host may have no partition parser at all, so the converter reads the table
//! itself and attaches one loop device per partition (offset + size limit). Everything read here comes
//! from an untrusted image: every offset and count is checked against the disk size before use, loops in
//! extended-partition chains are cut, and the number of entries is capped.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Sector size assumed for MBR and GPT (512-byte logical sectors, as in every raw snapshot export).
pub const SECTOR: u64 = 512;
const MAX_LOGICAL: usize = 128;
/// The most GPT entries read (so the highest partition number).
pub const MAX_GPT_ENTRIES: u32 = 1024;

/// Random-access reads from a disk image (a file, or a byte slice in tests).
pub trait ReadAt {
    /// Fill `buf` from byte offset `off`; an error if the range is outside the disk.
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

/// A disk image file opened read-only, with its size taken once.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    /// Open `path` read-only.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl ReadAt for FileDisk {
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        FileExt::read_exact_at(&self.file, buf, off)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// Why a partition table was refused.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("read partition table at byte {offset}")]
    Read { offset: u64, source: io::Error },
    #[error("partition {number} ({start}+{len} bytes) lies outside the {disk} byte disk")]
    OutOfBounds {
        number: u32,
        start: u64,
        len: u64,
        disk: u64,
    },
    #[error("partitions {a} and {b} overlap")]
    Overlap { a: u32, b: u32 },
    #[error("extended partition chain is invalid: {0}")]
    BadExtended(String),
    #[error("GPT header is invalid: {0}")]
    BadGpt(String),
    #[error("disk is smaller than one sector")]
    TooSmall,
}

/// Which kind of table the disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Mbr,
    Gpt,
    /// No partition table: the whole disk is one (possible) filesystem.
    None,
}

/// One partition (or the whole disk when there is no table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based number as Linux names it (sda1; logical MBR partitions start at 5); 0 = whole disk.
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// MBR type byte as hex ("83") or GPT type GUID.
    pub type_id: String,
    /// MBR boot flag.
    pub bootable: bool,
    /// GPT partition name.
    pub name: String,
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    pub scheme: Scheme,
    /// MBR disk signature or GPT disk GUID.
    pub disk_id: String,
    pub partitions: Vec<Partition>,
    /// Things that were odd but survivable (a bad primary GPT header with a good backup, ...).
    pub warnings: Vec<String>,
}

fn read(disk: &(impl ReadAt + ?Sized), offset: u64, len: usize) -> Result<Vec<u8>, PartitionError> {
    let mut buf = vec![0u8; len];
    disk.read_exact_at(offset, &mut buf)
        .map_err(|source| PartitionError::Read { offset, source })?;
    Ok(buf)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parse the partition table of `disk`.
pub fn parse(disk: &(impl ReadAt + ?Sized)) -> Result<PartitionTable, PartitionError> {
    let size = disk.size();
    if size < SECTOR {
        return Err(PartitionError::TooSmall);
    }
    let mbr = read(disk, 0, SECTOR as usize)?;
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Ok(whole_disk(size));
    }
    let entries = mbr_entries(&mbr);
    // A real MBR has no entry with a status byte other than 0x00/0x80; a filesystem boot sector
    // (FAT, NTFS) carrying 0x55AA would fail that, so treat it as a whole-disk filesystem.
    if (0..4).any(|i| !matches!(mbr[446 + i * 16], 0x00 | 0x80)) {
        return Ok(whole_disk(size));
    }
    if entries.iter().any(|e| e.kind == 0xEE) {
        return parse_gpt(disk, size);
    }
    parse_mbr(disk, size, &mbr, &entries)
}

fn whole_disk(size: u64) -> PartitionTable {
    PartitionTable {
        scheme: Scheme::None,
        disk_id: String::new(),
        partitions: vec![Partition {
            number: 0,
            start: 0,
            len: size,
            type_id: String::new(),
            bootable: false,
            name: String::new(),
        }],
        warnings: Vec::new(),
    }
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    bootable: bool,
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + i * 16..446 + (i + 1) * 16];
        MbrEntry {
            bootable: e[0] == 0x80,
            kind: e[4],
            lba: u64::from(le32(e, 8)),
            sectors: u64::from(le32(e, 12)),
        }
    })
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

fn check_bounds(number: u32, start: u64, len: u64, disk: u64) -> Result<(), PartitionError> {
    match start.checked_add(len) {
        Some(end) if end <= disk && start >= SECTOR => Ok(()),
        _ => Err(PartitionError::OutOfBounds {
            number,
            start,
            len,
            disk,
        }),
    }
}

fn parse_mbr(
    disk: &(impl ReadAt + ?Sized),
    size: u64,
    mbr: &[u8],
    entries: &[MbrEntry; 4],
) -> Result<PartitionTable, PartitionError> {
    let mut parts = Vec::new();
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let number = i as u32 + 1;
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let (start, len) = (e.lba * SECTOR, e.sectors * SECTOR);
        check_bounds(number, start, len, size)?;
        if is_extended(e.kind) {
            if extended.is_some() {
                return Err(PartitionError::BadExtended(
                    "more than one extended partition".into(),
                ));
            }
            extended = Some((e.lba, e.sectors));
            continue;
        }
        parts.push(Partition {
            number,
            start,
            len,
            type_id: format!("{:02x}", e.kind),
            bootable: e.bootable,
            name: String::new(),
        });
    }
    if let Some((ext_lba, ext_sectors)) = extended {
        logical_partitions(disk, size, ext_lba, ext_sectors, &mut parts)?;
    }
    check_overlaps(&parts)?;
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        disk_id: format!("{:08x}", le32(mbr, 440)),
        partitions: parts,
        warnings: Vec::new(),
    })
}

fn logical_partitions(
    disk: &(impl ReadAt + ?Sized),
    size: u64,
    ext_lba: u64,
    ext_sectors: u64,
    parts: &mut Vec<Partition>,
) -> Result<(), PartitionError> {
    let mut seen = BTreeSet::new();
    let mut ebr_rel = 0u64;
    let mut number = 5u32;
    loop {
        if !seen.insert(ebr_rel) {
            return Err(PartitionError::BadExtended(format!(
                "EBR chain loops at sector {}",
                ext_lba + ebr_rel
            )));
        }
        if seen.len() > MAX_LOGICAL {
            return Err(PartitionError::BadExtended(format!(
                "more than {MAX_LOGICAL} logical partitions"
            )));
        }
        if ebr_rel >= ext_sectors {
            return Err(PartitionError::BadExtended(
                "EBR outside the extended partition".into(),
            ));
        }
        let ebr_lba = ext_lba + ebr_rel;
        let ebr = read(disk, ebr_lba * SECTOR, SECTOR as usize)?;
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            return Err(PartitionError::BadExtended(format!(
                "no signature in EBR at sector {ebr_lba}"
            )));
        }
        let e = mbr_entries(&ebr);
        if e[0].kind != 0 && e[0].sectors != 0 {
            let start_lba = ebr_lba
                .checked_add(e[0].lba)
                .ok_or(PartitionError::OutOfBounds {
                    number,
                    start: u64::MAX,
                    len: 0,
                    disk: size,
                })?;
            let (start, len) = (start_lba * SECTOR, e[0].sectors * SECTOR);
            check_bounds(number, start, len, size)?;
            if start_lba + e[0].sectors > ext_lba + ext_sectors {
                return Err(PartitionError::BadExtended(format!(
                    "logical partition {number} leaves the extended one"
                )));
            }
            parts.push(Partition {
                number,
                start,
                len,
                type_id: format!("{:02x}", e[0].kind),
                bootable: e[0].bootable,
                name: String::new(),
            });
            number += 1;
        }
        if e[1].kind == 0 || e[1].sectors == 0 {
            return Ok(());
        }
        ebr_rel = e[1].lba;
    }
}

fn check_overlaps(parts: &[Partition]) -> Result<(), PartitionError> {
    for (i, a) in parts.iter().enumerate() {
        for b in &parts[i + 1..] {
            if a.start < b.start + b.len && b.start < a.start + a.len {
                return Err(PartitionError::Overlap {
                    a: a.number,
                    b: b.number,
                });
            }
        }
    }
    Ok(())
}

/// Format a 16-byte GPT GUID (mixed endian) as text.
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// CRC-32 (IEEE 802.3), as GPT uses it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn gpt_header(disk: &(impl ReadAt + ?Sized), lba: u64) -> Result<Vec<u8>, PartitionError> {
    let hdr = read(disk, lba * SECTOR, SECTOR as usize)?;
    if &hdr[0..8] != b"EFI PART" {
        return Err(PartitionError::BadGpt(format!("no signature at LBA {lba}")));
    }
    let hsize = le32(&hdr, 12) as usize;
    if !(92..=SECTOR as usize).contains(&hsize) {
        return Err(PartitionError::BadGpt(format!("header size {hsize}")));
    }
    let mut copy = hdr[..hsize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(&hdr, 16) {
        return Err(PartitionError::BadGpt(format!(
            "header checksum mismatch at LBA {lba}"
        )));
    }
    Ok(hdr)
}

fn parse_gpt(disk: &(impl ReadAt + ?Sized), size: u64) -> Result<PartitionTable, PartitionError> {
    let last_lba = size / SECTOR - 1;
    let mut warnings = Vec::new();
    let hdr = match gpt_header(disk, 1) {
        Ok(h) => h,
        Err(primary) => {
            let backup = gpt_header(disk, last_lba)
                .map_err(|b| PartitionError::BadGpt(format!("primary: {primary}; backup: {b}")))?;
            warnings.push(format!(
                "primary GPT header unusable ({primary}); used the backup"
            ));
            backup
        }
    };
    let first_usable = le64(&hdr, 40);
    let last_usable = le64(&hdr, 48);
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80);
    let esize = le32(&hdr, 84);
    // LBA 0 is the protective MBR and LBA 1 the header: no partition may start before LBA 2.
    if first_usable < 2 || first_usable > last_usable || last_usable > last_lba {
        return Err(PartitionError::BadGpt(format!(
            "usable range {first_usable}..{last_usable}"
        )));
    }
    if count > MAX_GPT_ENTRIES {
        return Err(PartitionError::BadGpt(format!(
            "{count} entries (limit {MAX_GPT_ENTRIES})"
        )));
    }
    if !(128..=4096).contains(&esize) || !esize.is_power_of_two() {
        return Err(PartitionError::BadGpt(format!("entry size {esize}")));
    }
    let table_len = u64::from(count) * u64::from(esize);
    let table_off = entries_lba
        .checked_mul(SECTOR)
        .filter(|o| o.checked_add(table_len).is_some_and(|end| end <= size))
        .ok_or_else(|| {
            PartitionError::BadGpt(format!(
                "entry array at LBA {entries_lba} is outside the disk"
            ))
        })?;
    let table = read(disk, table_off, table_len as usize)?;
    if crc32(&table) != le32(&hdr, 88) {
        return Err(PartitionError::BadGpt(
            "entry array checksum mismatch".into(),
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if first > last || first < first_usable || last > last_usable {
            return Err(PartitionError::OutOfBounds {
                number,
                start: first.saturating_mul(SECTOR),
                len: last
                    .saturating_sub(first)
                    .saturating_add(1)
                    .saturating_mul(SECTOR),
                disk: size,
            });
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let name = String::from_utf16_lossy(&units)
            .trim_end_matches('\0')
            .to_string();
        parts.push(Partition {
            number,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            type_id: guid(&e[0..16]),
            bootable: le64(e, 48) & 0b100 != 0,
            name,
        });
    }
    check_overlaps(&parts)?;
    Ok(PartitionTable {
        scheme: Scheme::Gpt,
        disk_id: guid(&hdr[56..72]),
        partitions: parts,
        warnings,
    })
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
