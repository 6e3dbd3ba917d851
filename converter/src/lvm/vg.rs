//! The volume group that the newest metadata text describes: its PVs and logical volumes with their
//! segments.

use super::{parse_config, LvmError, Value};
use serde::Serialize;
use std::collections::BTreeMap;

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
}
