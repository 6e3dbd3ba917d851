//! Where a logical volume lies: a volume of one linear segment on one PV is a byte range of that
//! PV, which can be attached as a loop device without device-mapper; any other is refused with the
//! reason.

use super::{LogicalVolume, VgPv, VolumeGroup, SECTOR};

/// Where a linear logical volume lies on one of its PVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'a> {
    pub pv: &'a VgPv,
    /// Byte offset from the start of the PV.
    pub offset: u64,
    pub len: u64,
}

impl VolumeGroup {
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
