//! What each disk holds: its partition table, the filesystem of every partition, and the logical
//! volumes of the LVM physical volumes on it (those that can be attached are probed like partitions).

use super::InspectError;
use crate::fsprobe::{self, FsInfo, FsKind};
use crate::lvm;
use crate::partition::{self, FileDisk, PartitionTable, ReadAt};
use serde::Serialize;
use std::path::Path;

/// One input disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub path: String,
    /// The input's format ("raw", or "qcow2" read through a temporary raw copy).
    pub format: &'static str,
    pub size: u64,
    pub table: PartitionTable,
    /// Partitions, then the logical volumes that can be attached (numbered from [`LV_NUMBER_BASE`] + 1).
    pub filesystems: Vec<PartFs>,
    /// Every visible logical volume of the volume groups whose PVs are on this disk.
    pub logical_volumes: Vec<LvInfo>,
    /// LVM physical volumes whose label or metadata was refused (partition and reason).
    pub lvm_errors: Vec<String>,
}

/// Logical volumes that can be attached get volume numbers above this (partitions stay below it), so
/// that `(disk, number)` names partitions and logical volumes alike.
pub const LV_NUMBER_BASE: u32 = 10_000;
const _: () = assert!(LV_NUMBER_BASE > partition::MAX_GPT_ENTRIES + 4);

/// A logical volume found in LVM metadata.
#[derive(Debug, Clone, Serialize)]
pub struct LvInfo {
    pub vg: String,
    pub name: String,
    pub uuid: String,
    /// `/dev/mapper/...` name the guest knows it by.
    pub dm_name: String,
    /// Its volume number in `filesystems` when it can be attached (one linear segment on a PV here).
    pub number: Option<u32>,
    /// Partition holding its PV.
    pub pv_part: Option<u32>,
    /// Why it cannot be attached without device-mapper.
    pub refused: Option<String>,
}

/// A partition and what it holds.
#[derive(Debug, Clone, Serialize)]
pub struct PartFs {
    pub part: u32,
    pub start: u64,
    pub len: u64,
    pub fs: FsInfo,
    /// `vg/lv` when this is a logical volume rather than a partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
}

/// Read the partition table and probe every partition of one disk.
pub fn probe_disk(path: &Path) -> Result<DiskInfo, InspectError> {
    let disk = FileDisk::open(path).map_err(|e| InspectError::Open(path.to_path_buf(), e))?;
    let table =
        partition::parse(&disk).map_err(|e| InspectError::Partitions(path.to_path_buf(), e))?;
    let mut filesystems: Vec<PartFs> = table
        .partitions
        .iter()
        .map(|p| PartFs {
            part: p.number,
            start: p.start,
            len: p.len,
            fs: fsprobe::probe(&disk, p.start, p.len),
            lv: None,
        })
        .collect();
    let (logical_volumes, lvm_errors, lv_fs) = probe_lvm(&disk, &filesystems);
    filesystems.extend(lv_fs);
    Ok(DiskInfo {
        path: path.display().to_string(),
        format: "raw",
        size: disk.size(),
        table,
        filesystems,
        logical_volumes,
        lvm_errors,
    })
}

/// Why a logical volume of a disk cannot be attached as a loop device (listed as its `refused`).
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Placement(#[from] lvm::PlacementError),
    #[error("its physical volume {name} ({uuid}) is not on this disk")]
    PvElsewhere { name: String, uuid: String },
    #[error("its extents ({offset}+{len} bytes) lie past the end of partition {part}")]
    PastPartition { offset: u64, len: u64, part: u32 },
}

/// Read the LVM metadata of every PV partition of a disk; locate each visible logical volume, and
/// probe the filesystem of those that are one linear segment on a PV of this disk.
fn probe_lvm(
    disk: &(impl ReadAt + ?Sized),
    parts: &[PartFs],
) -> (Vec<LvInfo>, Vec<String>, Vec<PartFs>) {
    let mut errors = Vec::new();
    // PV UUID -> partition; VG UUID -> the newest metadata seen on any of its PVs.
    let mut pvs: Vec<(String, &PartFs)> = Vec::new();
    let mut vgs: Vec<lvm::VolumeGroup> = Vec::new();
    for p in parts.iter().filter(|p| p.fs.kind == FsKind::Lvm) {
        match lvm::read_pv(disk, p.start, p.len) {
            Ok(pv) => {
                pvs.push((pv.uuid.clone(), p));
                if let Some(vg) = pv.vg {
                    match vgs.iter_mut().find(|v| v.uuid == vg.uuid) {
                        Some(old) if old.seqno >= vg.seqno => {}
                        Some(old) => *old = vg,
                        None => vgs.push(vg),
                    }
                }
            }
            Err(e) => errors.push(format!("partition {}: {e}", p.part)),
        }
    }
    let mut lvs = Vec::new();
    let mut fs = Vec::new();
    for vg in &vgs {
        for lv in vg.lvs.iter().filter(|l| l.visible) {
            let mut info = LvInfo {
                vg: vg.name.clone(),
                name: lv.name.clone(),
                uuid: lv.uuid.clone(),
                dm_name: lvm::dm_name(&vg.name, &lv.name),
                number: None,
                pv_part: None,
                refused: None,
            };
            let placed = vg.placement(lv).map_err(AttachError::from).and_then(|pl| {
                let (_, part) = pvs.iter().find(|(u, _)| *u == pl.pv.uuid).ok_or_else(|| {
                    AttachError::PvElsewhere {
                        name: pl.pv.name.clone(),
                        uuid: pl.pv.uuid.clone(),
                    }
                })?;
                info.pv_part = Some(part.part);
                if pl.offset.checked_add(pl.len).is_none_or(|e| e > part.len) {
                    return Err(AttachError::PastPartition {
                        offset: pl.offset,
                        len: pl.len,
                        part: part.part,
                    });
                }
                Ok((part.start + pl.offset, pl.len))
            });
            match placed {
                Ok((start, len)) => {
                    let number = LV_NUMBER_BASE + 1 + fs.len() as u32;
                    info.number = Some(number);
                    fs.push(PartFs {
                        part: number,
                        start,
                        len,
                        fs: fsprobe::probe(disk, start, len),
                        lv: Some(format!("{}/{}", vg.name, lv.name)),
                    });
                }
                Err(why) => info.refused = Some(why.to_string()),
            }
            lvs.push(info);
        }
    }
    (lvs, errors, fs)
}
