//! The on-disk format: the label in one of the first sectors, the PV header with its data and
//! metadata areas, and each metadata area's header and current text (a ring buffer).

use super::{crc, LvmError, VolumeGroup, INITIAL_CRC, LABEL_SCAN_SECTORS, MAX_METADATA, SECTOR};
use crate::partition::ReadAt;
use serde::Serialize;

const MDA_HEADER_SIZE: u64 = 512;
pub(super) const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MAX_AREAS: usize = 8;
const RAW_LOCN_IGNORED: u32 = 1;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A byte range of the PV (offset from the PV start, size; size 0 = to the end of the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Area {
    pub offset: u64,
    pub size: u64,
}

/// One physical volume as read from its label and metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhysicalVolume {
    /// PV UUID as LVM prints it (6-4-4-4-4-4-6).
    pub uuid: String,
    pub device_size: u64,
    pub data_areas: Vec<Area>,
    pub metadata_areas: Vec<Area>,
    /// The volume group in the newest valid metadata (None for a PV that belongs to no VG yet).
    pub vg: Option<VolumeGroup>,
}

/// Format a 32-character LVM UUID the way LVM prints it.
pub fn format_uuid(raw: &str) -> String {
    if raw.len() != 32 || !raw.is_ascii() {
        return raw.to_string();
    }
    let mut out = String::with_capacity(38);
    let mut at = 0;
    for (i, n) in [6, 4, 4, 4, 4, 4, 6].iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(&raw[at..at + n]);
        at += n;
    }
    out
}

struct Pv<'a, D: ReadAt + ?Sized> {
    disk: &'a D,
    base: u64,
    len: u64,
}

impl<D: ReadAt + ?Sized> Pv<'_, D> {
    fn read(&self, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>, LvmError> {
        let err = |source| LvmError::Read {
            what,
            offset,
            source,
        };
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let n = usize::try_from(len).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
        let mut buf = vec![0u8; n];
        self.disk
            .read_exact_at(self.base + offset, &mut buf)
            .map_err(err)?;
        Ok(buf)
    }
}

/// Read the PV at `base` (length `len`) of `disk`: label, header, and the newest valid metadata.
pub fn read_pv(
    disk: &(impl ReadAt + ?Sized),
    base: u64,
    len: u64,
) -> Result<PhysicalVolume, LvmError> {
    if base.checked_add(len).is_none_or(|e| e > disk.size()) {
        return Err(LvmError::BadPvHeader(format!(
            "PV range {base}+{len} lies outside the {} byte disk",
            disk.size()
        )));
    }
    let pv = Pv { disk, base, len };
    let head = pv.read(
        "label sectors",
        0,
        (LABEL_SCAN_SECTORS * SECTOR).min(len - len % SECTOR),
    )?;
    let mut found = None;
    for (i, s) in head.chunks_exact(SECTOR as usize).enumerate() {
        if &s[0..8] == b"LABELONE" {
            found = Some((i as u64, s));
            break;
        }
    }
    let (sector, label) = found.ok_or(LvmError::NoLabel)?;
    let bad = |reason: String| LvmError::BadLabel { sector, reason };
    if le64(label, 8) != sector {
        return Err(bad(format!("claims to be in sector {}", le64(label, 8))));
    }
    let computed = crc(INITIAL_CRC, &label[20..]);
    if computed != le32(label, 16) {
        return Err(bad(format!(
            "checksum mismatch (stored {:08x}, computed {computed:08x})",
            le32(label, 16)
        )));
    }
    if &label[24..32] != b"LVM2 001" {
        return Err(bad(format!(
            "type {:?} is not LVM2 001",
            String::from_utf8_lossy(&label[24..32])
        )));
    }
    let hoff = le32(label, 20) as usize;
    // The PV header: uuid (32) + size (8) + at least two terminating (0,0) pairs.
    if !(32..=SECTOR as usize - 72).contains(&hoff) {
        return Err(bad(format!("PV header offset {hoff}")));
    }
    let h = &label[hoff..];
    let raw_uuid = &h[0..32];
    if !raw_uuid.iter().all(|c| c.is_ascii_alphanumeric()) {
        return Err(LvmError::BadPvHeader("PV UUID is not alphanumeric".into()));
    }
    let uuid = format_uuid(&String::from_utf8_lossy(raw_uuid));
    let device_size = le64(h, 32);
    let mut at = 40;
    let mut lists: [Vec<Area>; 2] = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        loop {
            if at + 16 > h.len() {
                return Err(LvmError::BadPvHeader(
                    "area list runs past the label sector".into(),
                ));
            }
            let a = Area {
                offset: le64(h, at),
                size: le64(h, at + 8),
            };
            at += 16;
            if a.offset == 0 {
                break;
            }
            if list.len() == MAX_AREAS {
                return Err(LvmError::BadPvHeader(format!(
                    "more than {MAX_AREAS} areas"
                )));
            }
            list.push(a);
        }
    }
    let [data_areas, metadata_areas] = lists;
    // The newest metadata over all metadata areas (a PV may carry a copy at each end).
    let mut best: Option<VolumeGroup> = None;
    let mut first_err = None;
    for m in &metadata_areas {
        match read_mda(&pv, *m) {
            Ok(Some(vg)) => {
                if best.as_ref().is_none_or(|b| vg.seqno > b.seqno) {
                    best = Some(vg);
                }
            }
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    // A damaged copy is refused rather than silently falling back to an older one: it would describe
    // a different layout than the one the guest last wrote.
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(PhysicalVolume {
        uuid,
        device_size,
        data_areas,
        metadata_areas,
        vg: best,
    })
}

/// Read one metadata area: its header and the text of the current metadata (None if it holds none).
fn read_mda<D: ReadAt + ?Sized>(pv: &Pv<'_, D>, m: Area) -> Result<Option<VolumeGroup>, LvmError> {
    let bad = |reason: String| LvmError::BadMdaHeader {
        offset: m.offset,
        reason,
    };
    if m.size < MDA_HEADER_SIZE * 2 || m.offset.checked_add(m.size).is_none_or(|e| e > pv.len) {
        return Err(bad(format!(
            "area {}+{} does not fit the {} byte PV",
            m.offset, m.size, pv.len
        )));
    }
    let h = pv.read("metadata area header", m.offset, MDA_HEADER_SIZE)?;
    let computed = crc(INITIAL_CRC, &h[4..]);
    if computed != le32(&h, 0) {
        return Err(bad(format!(
            "header checksum mismatch (stored {:08x}, computed {computed:08x})",
            le32(&h, 0)
        )));
    }
    if &h[4..20] != MDA_MAGIC {
        return Err(bad("bad magic".into()));
    }
    if le32(&h, 20) != 1 {
        return Err(bad(format!("version {}", le32(&h, 20))));
    }
    if le64(&h, 24) != m.offset || le64(&h, 32) != m.size {
        return Err(bad(format!(
            "header describes area {}+{}",
            le64(&h, 24),
            le64(&h, 32)
        )));
    }
    let (offset, size, checksum, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if offset == 0 || flags & RAW_LOCN_IGNORED != 0 {
        return Ok(None);
    }
    if size == 0 || size > MAX_METADATA {
        return Err(bad(format!("metadata size {size}")));
    }
    let ring = m.size - MDA_HEADER_SIZE;
    if offset < MDA_HEADER_SIZE || offset >= m.size || size > ring {
        return Err(bad(format!("metadata at {offset}+{size}")));
    }
    // The text is a ring buffer after the header: what does not fit before the end wraps around.
    let first = size.min(m.size - offset);
    let mut text = pv.read("metadata text", m.offset + offset, first)?;
    if first < size {
        text.extend(pv.read(
            "metadata text (wrapped)",
            m.offset + MDA_HEADER_SIZE,
            size - first,
        )?);
    }
    let computed = crc(INITIAL_CRC, &text);
    if computed != checksum {
        return Err(LvmError::MetadataChecksum {
            offset: m.offset + offset,
            stored: checksum,
            computed,
        });
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    let text = std::str::from_utf8(&text).map_err(|e| LvmError::Syntax {
        at: e.valid_up_to(),
        reason: "not UTF-8".into(),
    })?;
    VolumeGroup::from_text(text).map(Some)
}
