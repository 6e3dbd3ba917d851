//! MBR/GPT partition tables (`partition::parse`). The input is the disk image. It is parsed as it
//! is, and again with the CRCs of both GPT headers (and of the entry arrays they point at) made
//! right, so that the fuzzer gets past the checksums. Every partition of a table that parses lies
//! inside the disk, and no two overlap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_converter::partition::{crc32, parse, Scheme, SECTOR};

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Rewrites the entry-array and header CRCs of the GPT header at `lba`, when there is one.
fn fix_gpt(d: &mut [u8], lba: u64) {
    let at = (lba * SECTOR) as usize;
    let Some(hdr) = d.get(at..at + SECTOR as usize) else {
        return;
    };
    if &hdr[..8] != b"EFI PART" {
        return;
    }
    let hsize = le32(hdr, 12) as usize;
    let (entries_lba, count, esize) = (le64(hdr, 72), le32(hdr, 80), le32(hdr, 84));
    let table = (u64::from(count) <= 1024 && esize <= 4096)
        .then(|| {
            let off = usize::try_from(entries_lba.checked_mul(SECTOR)?).ok()?;
            let len = count as usize * esize as usize;
            d.get(off..off.checked_add(len)?)
        })
        .flatten();
    if let Some(t) = table {
        let c = crc32(t);
        d[at + 88..at + 92].copy_from_slice(&c.to_le_bytes());
    }
    if (92..=SECTOR as usize).contains(&hsize) {
        let mut copy = d[at..at + hsize].to_vec();
        copy[16..20].fill(0);
        let c = crc32(&copy);
        d[at + 16..at + 20].copy_from_slice(&c.to_le_bytes());
    }
}

fn check(disk: &[u8]) {
    let Ok(t) = parse(disk) else {
        return;
    };
    let size = disk.len() as u64;
    for p in &t.partitions {
        let end = p.start.checked_add(p.len).expect("partition end overflows");
        assert!(end <= size, "partition {p:?} past the {size}-byte disk");
        if t.scheme != Scheme::None {
            assert!(p.start >= SECTOR && p.len > 0, "partition {p:?}");
        }
    }
    for (i, a) in t.partitions.iter().enumerate() {
        for b in &t.partitions[i + 1..] {
            assert!(
                a.start + a.len <= b.start || b.start + b.len <= a.start,
                "partitions overlap: {a:?} {b:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 2 * SECTOR as usize {
        let mut d = data.to_vec();
        fix_gpt(&mut d, 1);
        let last = d.len() as u64 / SECTOR - 1;
        fix_gpt(&mut d, last);
        if d != data {
            check(&d);
        }
    }
});
