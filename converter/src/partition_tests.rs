use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn mbr_disk(size: u64, entries: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    d[440..444].copy_from_slice(&0x52ea05e1u32.to_le_bytes());
    for (i, &(kind, lba, sectors)) in entries.iter().enumerate() {
        let e = &mut d[446 + i * 16..446 + (i + 1) * 16];
        e[0] = if i == 0 { 0x80 } else { 0 };
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    d[510] = 0x55;
    d[511] = 0xAA;
    d
}

fn gpt_disk(size: u64, parts: &[(u64, u64)]) -> Vec<u8> {
    let mut d = mbr_disk(size, &[(0xEE, 1, (size / SECTOR - 1) as u32)]);
    let last = size / SECTOR - 1;
    let mut table = vec![0u8; 128 * 128];
    for (i, &(first, lastp)) in parts.iter().enumerate() {
        let e = &mut table[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ]);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&lastp.to_le_bytes());
        for (j, c) in "root".encode_utf16().enumerate() {
            e[56 + j * 2..58 + j * 2].copy_from_slice(&c.to_le_bytes());
        }
    }
    let mut h = vec![0u8; 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&last.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
    h[56..72].copy_from_slice(&[7u8; 16]);
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32(&table).to_le_bytes());
    let c = crc32(&h);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    d[512..512 + 92].copy_from_slice(&h);
    d[1024..1024 + table.len()].copy_from_slice(&table);
    d
}

#[test]
fn crc32_known_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn mbr_two_primaries() {
    let d = mbr_disk(4 * MIB, &[(0x83, 2048, 4096), (0x82, 6144, 2048)]);
    let t = parse(&d[..]).unwrap();
    assert_eq!(t.scheme, Scheme::Mbr);
    assert_eq!(t.disk_id, "52ea05e1");
    assert_eq!(t.partitions.len(), 2);
    assert_eq!(t.partitions[0].start, MIB);
    assert_eq!(t.partitions[0].len, 2 * MIB);
    assert!(t.partitions[0].bootable);
    assert_eq!(t.partitions[1].type_id, "82");
}

#[test]
fn mbr_logical_partitions_are_numbered_from_five() {
    let mut d = mbr_disk(8 * MIB, &[(0x83, 2048, 2048), (0x05, 4096, 8192)]);
    // EBR at 4096: logical at +2048 for 1024 sectors, next EBR at +4096 (relative to the extended start).
    let ebr1 = 4096 * 512;
    d[ebr1 + 446 + 4] = 0x83;
    d[ebr1 + 446 + 8..ebr1 + 446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    d[ebr1 + 446 + 12..ebr1 + 446 + 16].copy_from_slice(&1024u32.to_le_bytes());
    d[ebr1 + 462 + 4] = 0x05;
    d[ebr1 + 462 + 8..ebr1 + 462 + 12].copy_from_slice(&4096u32.to_le_bytes());
    d[ebr1 + 462 + 12..ebr1 + 462 + 16].copy_from_slice(&2048u32.to_le_bytes());
    d[ebr1 + 510] = 0x55;
    d[ebr1 + 511] = 0xAA;
    let ebr2 = (4096 + 4096) * 512;
    d[ebr2 + 446 + 4] = 0x82;
    d[ebr2 + 446 + 8..ebr2 + 446 + 12].copy_from_slice(&1024u32.to_le_bytes());
    d[ebr2 + 446 + 12..ebr2 + 446 + 16].copy_from_slice(&1024u32.to_le_bytes());
    d[ebr2 + 510] = 0x55;
    d[ebr2 + 511] = 0xAA;
    let t = parse(&d[..]).unwrap();
    let nums: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, vec![1, 5, 6]);
    assert_eq!(t.partitions[1].start, (4096 + 2048) * 512);
    assert_eq!(t.partitions[2].start, (8192 + 1024) * 512);
}

#[test]
fn mbr_ebr_loop_is_refused() {
    let mut d = mbr_disk(8 * MIB, &[(0x05, 4096, 8192)]);
    let ebr = 4096 * 512;
    d[ebr + 462 + 4] = 0x05;
    d[ebr + 462 + 8..ebr + 462 + 12].copy_from_slice(&0u32.to_le_bytes());
    d[ebr + 462 + 12..ebr + 462 + 16].copy_from_slice(&1u32.to_le_bytes());
    d[ebr + 510] = 0x55;
    d[ebr + 511] = 0xAA;
    assert!(matches!(parse(&d[..]), Err(PartitionError::BadExtended(_))));
}

#[test]
fn mbr_partition_past_the_end_is_refused() {
    let d = mbr_disk(4 * MIB, &[(0x83, 2048, 0xFFFF_0000)]);
    assert!(matches!(
        parse(&d[..]),
        Err(PartitionError::OutOfBounds { number: 1, .. })
    ));
}

#[test]
fn mbr_overlap_is_refused() {
    let d = mbr_disk(4 * MIB, &[(0x83, 2048, 4096), (0x83, 4096, 1024)]);
    assert!(matches!(
        parse(&d[..]),
        Err(PartitionError::Overlap { a: 1, b: 2 })
    ));
}

#[test]
fn no_signature_means_whole_disk() {
    let d = vec![0u8; MIB as usize];
    let t = parse(&d[..]).unwrap();
    assert_eq!(t.scheme, Scheme::None);
    assert_eq!(t.partitions[0].number, 0);
    assert_eq!(t.partitions[0].len, MIB);
}

#[test]
fn gpt_partition_is_found() {
    let d = gpt_disk(4 * MIB, &[(2048, 4095)]);
    let t = parse(&d[..]).unwrap();
    assert_eq!(t.scheme, Scheme::Gpt);
    assert_eq!(t.partitions.len(), 1);
    let p = &t.partitions[0];
    assert_eq!((p.number, p.start, p.len), (1, MIB, MIB));
    assert_eq!(p.type_id, "0fc63daf-8483-4772-8e79-3d69d8477de4");
    assert_eq!(p.name, "root");
}

#[test]
fn gpt_bad_checksum_without_backup_is_refused() {
    let mut d = gpt_disk(4 * MIB, &[(2048, 4095)]);
    d[512 + 40] ^= 1;
    assert!(matches!(parse(&d[..]), Err(PartitionError::BadGpt(_))));
}

#[test]
fn gpt_entry_outside_usable_range_is_refused() {
    let d = gpt_disk(4 * MIB, &[(2048, 9_999_999)]);
    assert!(matches!(
        parse(&d[..]),
        Err(PartitionError::OutOfBounds { .. })
    ));
}

/// Found by `fuzz/run.sh partition`: a header whose usable range starts at LBA 0 let an entry
/// describe a partition over the protective MBR and the GPT header (start 0; MBR entries are refused
/// below sector 1).
#[test]
fn gpt_usable_range_over_the_header_is_refused() {
    let mut d = gpt_disk(MIB, &[(0, 0)]);
    d[512 + 40..512 + 48].copy_from_slice(&0u64.to_le_bytes());
    d[512 + 16..512 + 20].fill(0);
    let c = crc32(&d[512..512 + 92]);
    d[512 + 16..512 + 20].copy_from_slice(&c.to_le_bytes());
    assert!(
        matches!(parse(&d[..]), Err(PartitionError::BadGpt(ref m)) if m.contains("usable range")),
        "{:?}",
        parse(&d[..])
    );
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = parse(&bytes[..]);
    }

    #[test]
    fn random_mbr_entries_never_panic(entries in proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 0..4)) {
        let d = mbr_disk(64 * 1024, &entries);
        if let Ok(t) = parse(&d[..]) {
            for p in t.partitions {
                prop_assert!(p.start + p.len <= d.len() as u64);
            }
        }
    }

    #[test]
    fn corrupted_gpt_never_panics(pos in 0usize..(34 * 512), val in any::<u8>()) {
        let mut d = gpt_disk(MIB, &[(40, 100)]);
        d[pos] = val;
        if let Ok(t) = parse(&d[..]) {
            for p in t.partitions {
                prop_assert!(p.start + p.len <= d.len() as u64);
            }
        }
    }
}
