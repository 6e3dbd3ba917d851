//! Recovery point benchmark (not run in CI): `cargo bench -p rehost-server --bench snapshots`.
//!
//! Builds a staging volume (default 4 GiB, `REHOST_BENCH_GIB`) of half-random, half-text blocks
//! through the real `Volume`, takes a full snapshot, exports it (the baseline, with a plain copy of
//! the volume as the physical floor), then 60 rounds of: change 1% of the blocks at random, take a
//! snapshot. Prints the ratios the issue sets as targets:
//! - incremental snapshot time / full export time (target ≤ 0.02);
//! - bytes added / changed bytes compressed with zstd level 1 (target ≤ 1.2);
//! - store size after 60 snapshots / (volume size + 60 × 1.2 × change) (target ≤ 1).
//!
//! `REHOST_BENCH_DIR` chooses where the data dir goes (default: the system temp dir).

use std::time::Instant;

use rehost_proto::msg::DiskInfo;
use rehost_proto::DiskId;
use rehost_server::snapshot::{export::export_raw, take_snapshot, Consistency};
use rehost_server::volume::Volume;

const BS: u64 = 65536;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Half random bytes, half repeated text: compresses to a little over half.
fn block(seed: u64, out: &mut [u8]) {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let half = out.len() / 2;
    for c in out[..half].chunks_mut(8) {
        let v = r.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let text = format!("block {seed} of the rehost snapshot benchmark\n");
    for (i, b) in out[half..].iter_mut().enumerate() {
        *b = text.as_bytes()[i % text.len()];
    }
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let gib: u64 = std::env::var("REHOST_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let rounds: usize = std::env::var("REHOST_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let base = std::env::var_os("REHOST_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base)?;
    let size = gib << 30;
    let blocks = size / BS;
    let shared = rehost_server::open(tmp.path())?;
    let (machine, _) = shared
        .catalog
        .register_machine("bench", &[7; 32], "bench", b"secret")?;
    let rows = shared.catalog.ensure_disks(
        &machine,
        &[DiskInfo {
            device: "/dev/bench".into(),
            size_bytes: size,
        }],
        BS as u32,
    )?;
    let disk = DiskId(rows[0].id);
    let vol = Volume::open(&shared.volume_dir(&machine), disk.0, size, BS as u32)?;

    let t = Instant::now();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..blocks {
        block(b, &mut buf);
        vol.write_block(b * BS, &buf, blake3::hash(&buf).as_bytes())?;
    }
    vol.sync()?;
    println!(
        "volume: {gib} GiB, {blocks} blocks written in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let full = take_snapshot(
        &shared,
        &machine,
        &[(disk, &vol)],
        Consistency::Crash,
        "bench",
    )?;
    let full_s = t.elapsed().as_secs_f64();
    println!(
        "full snapshot: {:.1} s, {} MiB added",
        full_s,
        full.bytes_added >> 20
    );

    let (vol_path, _) = Volume::paths(&shared.volume_dir(&machine), disk.0);
    let copy = tmp.path().join("copy.raw");
    let t = Instant::now();
    std::fs::copy(&vol_path, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let cp_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;

    let out_path = tmp.path().join("export.raw");
    let out = std::fs::File::create(&out_path)?;
    let root = full.disks[0].root_id().expect("root id");
    let t = Instant::now();
    export_raw(&shared.store, &root, &out, &out_path, &mut |_, _| {})?;
    let export_s = t.elapsed().as_secs_f64();
    drop(out);
    std::fs::remove_file(&out_path)?;
    println!(
        "full export: {export_s:.2} s ({:.0} MiB/s); copy of the volume (floor): {cp_s:.2} s",
        size as f64 / 1048576.0 / export_s
    );

    let store_after_full = dir_bytes(shared.store.dir());
    let mut rng = Rng(12345);
    let mut zstd = zstd::bulk::Compressor::new(1)?;
    let per_round = blocks / 100;
    let (mut worst_time, mut worst_bytes, mut total_change) = (0f64, 0f64, 0u64);
    let mut times = Vec::new();
    for round in 1..=rounds {
        let mut changed = std::collections::HashSet::new();
        while (changed.len() as u64) < per_round {
            changed.insert(rng.next() % blocks);
        }
        let mut change_c = 0u64;
        for b in &changed {
            block(b ^ ((round as u64) << 40), &mut buf);
            change_c += zstd.compress(&buf)?.len() as u64;
            vol.write_block(b * BS, &buf, blake3::hash(&buf).as_bytes())?;
        }
        vol.sync()?;
        total_change += change_c;
        let t = Instant::now();
        let s = take_snapshot(
            &shared,
            &machine,
            &[(disk, &vol)],
            Consistency::Crash,
            "bench",
        )?;
        let secs = t.elapsed().as_secs_f64();
        times.push(secs);
        let tr = secs / export_s;
        let br = s.bytes_added as f64 / change_c as f64;
        worst_time = worst_time.max(tr);
        worst_bytes = worst_bytes.max(br);
        if round <= 3 || round % 10 == 0 {
            println!(
                "snapshot {round:>2}: {} blocks changed ({} KiB compressed), {:.0} ms, {} KiB added: time ratio {tr:.4}, bytes ratio {br:.3}",
                changed.len(),
                change_c >> 10,
                secs * 1000.0,
                s.bytes_added >> 10
            );
        }
    }
    times.sort_by(f64::total_cmp);
    let store = dir_bytes(shared.store.dir());
    let avg_change = total_change / rounds.max(1) as u64;
    let limit = size as f64 + rounds as f64 * 1.2 * avg_change as f64;
    println!("--- results ({gib} GiB volume, {rounds} snapshots of 1% random change) ---");
    println!(
        "incremental snapshot time: median {:.0} ms, worst {:.0} ms; ratio to full export: median {:.4}, worst {worst_time:.4} (target <= 0.02)",
        times[times.len() / 2] * 1000.0,
        times[times.len() - 1] * 1000.0,
        times[times.len() / 2] / export_s
    );
    println!("bytes added / changed bytes compressed: worst {worst_bytes:.3} (target <= 1.2)");
    println!(
        "store: {} MiB after the full snapshot, {} MiB after {rounds} more; limit volume + {rounds} x 1.2 x change = {} MiB; ratio {:.3} (target <= 1)",
        store_after_full >> 20,
        store >> 20,
        (limit as u64) >> 20,
        store as f64 / limit
    );
    Ok(())
}
