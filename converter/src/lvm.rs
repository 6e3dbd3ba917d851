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

use crate::partition::ReadAt;
use serde::Serialize;
use std::collections::BTreeMap;

/// Initial value of LVM's CRC.
pub const INITIAL_CRC: u32 = 0xf597_a6cf;
const SECTOR: u64 = 512;
const LABEL_SCAN_SECTORS: u64 = 4;
const MDA_HEADER_SIZE: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// The largest metadata text read (LVM's own default metadata area is 1 MiB).
pub const MAX_METADATA: u64 = 16 << 20;
const MAX_AREAS: usize = 8;
const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 200_000;
const RAW_LOCN_IGNORED: u32 = 1;

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

/// A value in LVM's configuration text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
}

/// A section of LVM's configuration text: assignments and subsections, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    pub values: Vec<(String, Value)>,
    pub sections: Vec<(String, Section)>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn section(&self, key: &str) -> Option<&Section> {
        self.sections.iter().find(|(k, _)| k == key).map(|(_, s)| s)
    }
    fn int(&self, key: &str, owner: &str) -> Result<i64, LvmError> {
        match self.get(key) {
            Some(Value::Int(i)) => Ok(*i),
            _ => Err(LvmError::Metadata(format!(
                "{owner}: {key} missing or not an integer"
            ))),
        }
    }
    fn uint(&self, key: &str, owner: &str) -> Result<u64, LvmError> {
        u64::try_from(self.int(key, owner)?)
            .map_err(|_| LvmError::Metadata(format!("{owner}: {key} is negative")))
    }
    fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    fn strings(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    items: usize,
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-')
}

impl Parser<'_> {
    fn err(&self, reason: impl Into<String>) -> LvmError {
        LvmError::Syntax {
            at: self.at,
            reason: reason.into(),
        }
    }

    fn skip_ws(&mut self) {
        while let Some(&c) = self.s.get(self.at) {
            if c == b'#' {
                while self.s.get(self.at).is_some_and(|&c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn name(&mut self) -> Result<String, LvmError> {
        let start = self.at;
        while self.s.get(self.at).is_some_and(|&c| is_name_byte(c)) {
            self.at += 1;
        }
        if start == self.at {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    fn section(&mut self, depth: usize) -> Result<Section, LvmError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("sections nested deeper than {MAX_DEPTH}")));
        }
        let mut sec = Section::default();
        loop {
            self.skip_ws();
            match self.s.get(self.at) {
                None if depth == 0 => return Ok(sec),
                None => return Err(self.err("unterminated section")),
                Some(b'}') if depth > 0 => {
                    self.at += 1;
                    return Ok(sec);
                }
                _ => {}
            }
            self.items += 1;
            if self.items > MAX_ITEMS {
                return Err(self.err(format!("more than {MAX_ITEMS} items")));
            }
            let name = self.name()?;
            self.skip_ws();
            match self.s.get(self.at) {
                Some(b'{') => {
                    self.at += 1;
                    let sub = self.section(depth + 1)?;
                    sec.sections.push((name, sub));
                }
                Some(b'=') => {
                    self.at += 1;
                    self.skip_ws();
                    let v = self.value(true)?;
                    sec.values.push((name, v));
                }
                _ => return Err(self.err(format!("expected = or {{ after {name:?}"))),
            }
        }
    }

    fn value(&mut self, array_ok: bool) -> Result<Value, LvmError> {
        match self.s.get(self.at) {
            Some(b'"') => self.string(),
            Some(b'[') if array_ok => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    if self.s.get(self.at) == Some(&b']') {
                        self.at += 1;
                        return Ok(Value::Array(items));
                    }
                    if !items.is_empty() {
                        if self.s.get(self.at) != Some(&b',') {
                            return Err(self.err("expected , or ] in array"));
                        }
                        self.at += 1;
                        self.skip_ws();
                    }
                    self.items += 1;
                    if self.items > MAX_ITEMS {
                        return Err(self.err(format!("more than {MAX_ITEMS} items")));
                    }
                    items.push(self.value(false)?);
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                let start = self.at;
                self.at += 1;
                while self
                    .s
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.at += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
                if t.contains('.') {
                    t.parse()
                        .map(Value::Float)
                        .map_err(|_| self.err(format!("bad number {t:?}")))
                } else {
                    t.parse()
                        .map(Value::Int)
                        .map_err(|_| self.err(format!("bad integer {t:?}")))
                }
            }
            _ => Err(self.err("expected a value")),
        }
    }

    fn string(&mut self) -> Result<Value, LvmError> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.at) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()));
                }
                Some(b'\\') => {
                    let Some(&c) = self.s.get(self.at + 1) else {
                        return Err(self.err("unterminated string"));
                    };
                    out.push(c);
                    self.at += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

/// Parse LVM configuration text into its top-level section.
pub fn parse_config(text: &str) -> Result<Section, LvmError> {
    if text.len() as u64 > MAX_METADATA {
        return Err(LvmError::Syntax {
            at: 0,
            reason: format!("{} bytes is more than {MAX_METADATA}", text.len()),
        });
    }
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
        items: 0,
    };
    p.section(0)
}

/// A PV as the volume group metadata lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VgPv {
    /// Name inside the metadata (`pv0`).
    pub name: String,
    pub uuid: String,
    /// First data sector (512-byte units) on the PV.
    pub pe_start: u64,
    pub pe_count: u64,
}

/// One segment of a logical volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub start_extent: u64,
    pub extent_count: u64,
    /// `striped` (linear when one stripe), `thin`, `raid1`, `snapshot`, `mirror`, `cache` ...
    pub kind: String,
    /// (PV name, first extent on it) per stripe.
    pub stripes: Vec<(String, u64)>,
    /// String-valued settings of other segment types (`origin`, `cow_store`, `thin_pool` ...).
    pub refs: BTreeMap<String, String>,
}

/// A logical volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogicalVolume {
    pub name: String,
    pub uuid: String,
    pub visible: bool,
    pub segments: Vec<Segment>,
}

/// A volume group as its newest metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeGroup {
    pub name: String,
    pub uuid: String,
    pub seqno: u64,
    /// Extent size in 512-byte sectors.
    pub extent_size: u64,
    pub pvs: Vec<VgPv>,
    pub lvs: Vec<LogicalVolume>,
}

/// Where a linear logical volume lies on one of its PVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'a> {
    pub pv: &'a VgPv,
    /// Byte offset from the start of the PV.
    pub offset: u64,
    pub len: u64,
}

impl VolumeGroup {
    /// Interpret metadata text: the single top-level section is the volume group.
    pub fn from_text(text: &str) -> Result<Self, LvmError> {
        let top = parse_config(text)?;
        let (name, vg) = match top.sections.as_slice() {
            [one] => one,
            other => {
                return Err(LvmError::Metadata(format!(
                    "{} top-level sections (one volume group expected)",
                    other.len()
                )))
            }
        };
        let owner = format!("VG {name}");
        let extent_size = vg.uint("extent_size", &owner)?;
        if extent_size == 0 || extent_size > (1 << 32) {
            return Err(LvmError::Metadata(format!(
                "{owner}: extent size {extent_size}"
            )));
        }
        let mut pvs = Vec::new();
        for (pn, p) in vg
            .section("physical_volumes")
            .map(|s| s.sections.as_slice())
            .unwrap_or_default()
        {
            let o = format!("{owner} PV {pn}");
            pvs.push(VgPv {
                name: pn.clone(),
                uuid: p.string("id").unwrap_or_default().to_string(),
                pe_start: p.uint("pe_start", &o)?,
                pe_count: p.uint("pe_count", &o)?,
            });
        }
        let mut lvs = Vec::new();
        for (ln, l) in vg
            .section("logical_volumes")
            .map(|s| s.sections.as_slice())
            .unwrap_or_default()
        {
            let o = format!("{owner} LV {ln}");
            let count = l.uint("segment_count", &o)?;
            let mut segments = Vec::new();
            for (sn, s) in &l.sections {
                if !sn.starts_with("segment") {
                    continue;
                }
                let so = format!("{o} {sn}");
                let stripes = match s.get("stripes") {
                    Some(Value::Array(a)) => {
                        if a.len() % 2 != 0 {
                            return Err(LvmError::Metadata(format!("{so}: odd stripes list")));
                        }
                        a.chunks_exact(2)
                            .map(|c| match c {
                                [Value::Str(pv), Value::Int(e)] if *e >= 0 => {
                                    Ok((pv.clone(), *e as u64))
                                }
                                _ => Err(LvmError::Metadata(format!(
                                    "{so}: stripes entry is not (\"pv\", extent)"
                                ))),
                            })
                            .collect::<Result<Vec<_>, _>>()?
                    }
                    _ => Vec::new(),
                };
                let refs = s
                    .values
                    .iter()
                    .filter_map(|(k, v)| match v {
                        Value::Str(x) if k != "type" => Some((k.clone(), x.clone())),
                        _ => None,
                    })
                    .collect();
                segments.push(Segment {
                    start_extent: s.uint("start_extent", &so)?,
                    extent_count: s.uint("extent_count", &so)?,
                    kind: s.string("type").unwrap_or("").to_string(),
                    stripes,
                    refs,
                });
            }
            if segments.len() as u64 != count {
                return Err(LvmError::Metadata(format!(
                    "{o}: segment_count {count} but {} segments",
                    segments.len()
                )));
            }
            lvs.push(LogicalVolume {
                name: ln.clone(),
                uuid: l.string("id").unwrap_or_default().to_string(),
                visible: l.strings("status").iter().any(|s| s == "VISIBLE"),
                segments,
            });
        }
        Ok(VolumeGroup {
            name: name.clone(),
            uuid: vg.string("id").unwrap_or_default().to_string(),
            seqno: vg.uint("seqno", &owner)?,
            extent_size,
            pvs,
            lvs,
        })
    }

    /// Where `lv` lies, when it is one linear segment on one PV; otherwise why it cannot be attached
    /// without device-mapper.
    pub fn placement(&self, lv: &LogicalVolume) -> Result<Placement<'_>, String> {
        if let Some(snap) = self.lvs.iter().find(|o| {
            o.segments
                .iter()
                .any(|s| s.kind == "snapshot" && s.refs.get("cow_store") == Some(&lv.name))
        }) {
            let origin = snap
                .segments
                .iter()
                .find_map(|s| s.refs.get("origin"))
                .cloned()
                .unwrap_or_default();
            return Err(format!(
                "it is a snapshot (the copy-on-write store of a snapshot of {origin})"
            ));
        }
        let seg = match lv.segments.as_slice() {
            [one] => one,
            [] => return Err("it has no segments".into()),
            many => {
                return Err(format!(
                    "it has {} segments (only a single linear segment can be attached without device-mapper)",
                    many.len()
                ))
            }
        };
        if seg.kind != "striped" {
            return Err(format!(
                "its segment type is {:?} (thin, raid, mirror, cache and snapshot volumes need device-mapper)",
                seg.kind
            ));
        }
        let (pv_name, first) = match seg.stripes.as_slice() {
            [one] => one,
            many => {
                return Err(format!(
                    "it is striped over {} physical volumes",
                    many.len()
                ))
            }
        };
        if seg.start_extent != 0 || seg.extent_count == 0 {
            return Err(format!(
                "its segment covers extents {}+{}",
                seg.start_extent, seg.extent_count
            ));
        }
        let pv = self
            .pvs
            .iter()
            .find(|p| &p.name == pv_name)
            .ok_or_else(|| format!("its physical volume {pv_name} is not in the metadata"))?;
        if first
            .checked_add(seg.extent_count)
            .is_none_or(|e| e > pv.pe_count)
        {
            return Err(format!(
                "extents {first}+{} lie past the {} extents of {pv_name}",
                seg.extent_count, pv.pe_count
            ));
        }
        let bytes = |sectors: u64| sectors.checked_mul(SECTOR);
        let offset = first
            .checked_mul(self.extent_size)
            .and_then(|s| s.checked_add(pv.pe_start))
            .and_then(bytes);
        let len = seg
            .extent_count
            .checked_mul(self.extent_size)
            .and_then(bytes);
        match (offset, len) {
            (Some(offset), Some(len)) if offset.checked_add(len).is_some() => {
                Ok(Placement { pv, offset, len })
            }
            _ => Err("its extent range overflows".into()),
        }
    }
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
