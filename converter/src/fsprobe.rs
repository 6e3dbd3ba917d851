//! Filesystem identification from superblock magic numbers, read natively (no blkid, nothing mounted).
//!
//! Gives the type and UUID of each partition so fstab and the kernel command line can be rewritten to
//! `UUID=` and so that partitions of secondary disks can be matched without attaching them.

use crate::partition::ReadAt;
use serde::Serialize;

/// What a partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
    Swap,
    /// LUKS encrypted volume: cannot be converted without the key.
    Luks,
    /// LVM2 physical volume.
    Lvm,
    Unknown,
}

impl FsKind {
    /// Name as `mount -t` wants it.
    pub fn mount_type(self) -> Option<&'static str> {
        match self {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Some("ext4"),
            FsKind::Xfs => Some("xfs"),
            FsKind::Btrfs => Some("btrfs"),
            FsKind::Vfat => Some("vfat"),
            _ => None,
        }
    }

    /// True for filesystems that may hold a Linux root.
    pub fn can_be_root(self) -> bool {
        matches!(
            self,
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 | FsKind::Xfs | FsKind::Btrfs
        )
    }
}

/// Type, UUID and label of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    pub kind: FsKind,
    pub uuid: Option<String>,
    pub label: Option<String>,
}

fn uuid_text(b: &[u8]) -> Option<String> {
    if b.len() < 16 || b[..16].iter().all(|&x| x == 0) {
        return None;
    }
    let h: Vec<String> = b[..16].iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

fn label_text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Read `len` bytes at `off` within a partition starting at `base` of length `plen`; None when outside.
fn read(
    disk: &(impl ReadAt + ?Sized),
    base: u64,
    plen: u64,
    off: u64,
    len: usize,
) -> Option<Vec<u8>> {
    if off.checked_add(len as u64)? > plen {
        return None;
    }
    let mut buf = vec![0u8; len];
    disk.read_exact_at(base.checked_add(off)?, &mut buf).ok()?;
    Some(buf)
}

/// Identify the filesystem in the partition at byte `base` of length `len`.
pub fn probe(disk: &(impl ReadAt + ?Sized), base: u64, len: u64) -> FsInfo {
    let unknown = FsInfo {
        kind: FsKind::Unknown,
        uuid: None,
        label: None,
    };
    let Some(head) = read(disk, base, len, 0, 4096) else {
        return unknown;
    };
    if &head[0..6] == b"LUKS\xba\xbe" {
        let u = label_text(&head[168..208]);
        return FsInfo {
            kind: FsKind::Luks,
            uuid: u,
            label: None,
        };
    }
    if &head[0..4] == b"XFSB" {
        return FsInfo {
            kind: FsKind::Xfs,
            uuid: uuid_text(&head[32..48]),
            label: label_text(&head[108..120]),
        };
    }
    if &head[4086..4096] == b"SWAPSPACE2" {
        return FsInfo {
            kind: FsKind::Swap,
            uuid: uuid_text(&head[1036..1052]),
            label: label_text(&head[1052..1068]),
        };
    }
    let sb = &head[1024..2048];
    if sb[56] == 0x53 && sb[57] == 0xEF {
        let compat = u32::from_le_bytes([sb[92], sb[93], sb[94], sb[95]]);
        let incompat = u32::from_le_bytes([sb[96], sb[97], sb[98], sb[99]]);
        let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            FsKind::Ext4
        } else if compat & 0x4 != 0 {
            FsKind::Ext3
        } else {
            FsKind::Ext2
        };
        return FsInfo {
            kind,
            uuid: uuid_text(&sb[104..120]),
            label: label_text(&sb[120..136]),
        };
    }
    for sector in 0..4 {
        let at = sector * 512;
        if &head[at..at + 8] == b"LABELONE" && &head[at + 24..at + 32] == b"LVM2 001" {
            let id = label_text(&head[at + 32..at + 64]).map(|u| crate::lvm::format_uuid(&u));
            return FsInfo {
                kind: FsKind::Lvm,
                uuid: id,
                label: None,
            };
        }
    }
    if head[510] == 0x55
        && head[511] == 0xAA
        && (&head[82..87] == b"FAT32" || &head[54..59] == b"FAT16" || &head[54..59] == b"FAT12")
    {
        let id_at = if &head[82..87] == b"FAT32" { 67 } else { 39 };
        let id = u32::from_le_bytes([
            head[id_at],
            head[id_at + 1],
            head[id_at + 2],
            head[id_at + 3],
        ]);
        let uuid = format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF);
        return FsInfo {
            kind: FsKind::Vfat,
            uuid: Some(uuid),
            label: None,
        };
    }
    if let Some(b) = read(disk, base, len, 0x10000, 0x300) {
        if &b[0x40..0x48] == b"_BHRfS_M" {
            return FsInfo {
                kind: FsKind::Btrfs,
                uuid: uuid_text(&b[0x20..0x30]),
                label: label_text(&b[0x12b..0x22b]),
            };
        }
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ext4_superblock() {
        let mut d = vec![0u8; 8192];
        d[1024 + 56] = 0x53;
        d[1024 + 57] = 0xEF;
        d[1024 + 96] = 0x40;
        d[1024 + 104..1024 + 120].copy_from_slice(&[
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ]);
        d[1024 + 120..1024 + 126].copy_from_slice(b"rootfs");
        let i = probe(&d[..], 0, 8192);
        assert_eq!(i.kind, FsKind::Ext4);
        assert_eq!(
            i.uuid.as_deref(),
            Some("12345678-9abc-def0-0102-030405060708")
        );
        assert_eq!(i.label.as_deref(), Some("rootfs"));
    }

    #[test]
    fn swap_and_luks() {
        let mut d = vec![0u8; 8192];
        d[4086..4096].copy_from_slice(b"SWAPSPACE2");
        d[1036] = 0xaa;
        assert_eq!(probe(&d[..], 0, 8192).kind, FsKind::Swap);
        let mut l = vec![0u8; 8192];
        l[0..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(probe(&l[..], 0, 8192).kind, FsKind::Luks);
    }

    #[test]
    fn too_small_partition_is_unknown() {
        let d = [0u8; 100];
        assert_eq!(probe(&d[..], 0, 100).kind, FsKind::Unknown);
        assert_eq!(probe(&d[..], 50, u64::MAX).kind, FsKind::Unknown);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..(70 * 1024)), base in 0u64..100) {
            let _ = probe(&bytes[..], base, bytes.len() as u64);
        }
    }
}
