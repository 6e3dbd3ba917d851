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

/// Why a logical volume cannot be attached without device-mapper (the text completes "cannot be
/// attached: ...", as the inspection lists it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("it is a snapshot (the copy-on-write store of a snapshot of {origin})")]
    Snapshot { origin: String },
    #[error("it has no segments")]
    NoSegments,
    #[error(
        "it has {0} segments (only a single linear segment can be attached without device-mapper)"
    )]
    Segments(usize),
    #[error("its segment type is {0:?} (thin, raid, mirror, cache and snapshot volumes need device-mapper)")]
    SegmentType(String),
    #[error("it is striped over {0} physical volumes")]
    Striped(usize),
    #[error("its segment covers extents {start}+{count}")]
    SegmentRange { start: u64, count: u64 },
    #[error("its physical volume {0} is not in the metadata")]
    UnknownPv(String),
    #[error("extents {first}+{count} lie past the {pe_count} extents of {pv}")]
    PastPv {
        first: u64,
        count: u64,
        pe_count: u64,
        pv: String,
    },
    #[error("its extent range overflows")]
    Overflow,
}

impl VolumeGroup {
    /// Where `lv` lies, when it is one linear segment on one PV; otherwise why it cannot be attached
    /// without device-mapper.
    pub fn placement(&self, lv: &LogicalVolume) -> Result<Placement<'_>, PlacementError> {
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
            return Err(PlacementError::Snapshot { origin });
        }
        let seg = match lv.segments.as_slice() {
            [one] => one,
            [] => return Err(PlacementError::NoSegments),
            many => return Err(PlacementError::Segments(many.len())),
        };
        if seg.kind != "striped" {
            return Err(PlacementError::SegmentType(seg.kind.clone()));
        }
        let (pv_name, first) = match seg.stripes.as_slice() {
            [one] => one,
            many => return Err(PlacementError::Striped(many.len())),
        };
        if seg.start_extent != 0 || seg.extent_count == 0 {
            return Err(PlacementError::SegmentRange {
                start: seg.start_extent,
                count: seg.extent_count,
            });
        }
        let pv = self
            .pvs
            .iter()
            .find(|p| &p.name == pv_name)
            .ok_or_else(|| PlacementError::UnknownPv(pv_name.clone()))?;
        if first
            .checked_add(seg.extent_count)
            .is_none_or(|e| e > pv.pe_count)
        {
            return Err(PlacementError::PastPv {
                first: *first,
                count: seg.extent_count,
                pe_count: pv.pe_count,
                pv: pv_name.clone(),
            });
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
            _ => Err(PlacementError::Overflow),
        }
    }
}
