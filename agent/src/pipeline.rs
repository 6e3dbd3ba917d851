//! The read pipeline: one reader thread reads the device in segments, worker threads (one per core)
//! detect zero blocks, hash with blake3 and compress with zstd; results come back in disk order
//! through a bounded queue of one-shot receivers, so the work runs in parallel while the sender
//! still sees a sequential stream. Memory is bounded by the queue depth.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rehost_proto::msg::Compression;
use rehost_proto::Hash;
use tokio::sync::{mpsc, oneshot};

/// Bytes read per reader call (a whole number of blocks).
const SEGMENT: u64 = 1 << 20;

#[derive(Debug)]
pub enum Item {
    Block {
        offset: u64,
        length: u32,
        hash: Hash,
        compression: Compression,
        payload: Bytes,
    },
    Zero {
        offset: u64,
        length: u64,
    },
}

#[derive(Debug)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub items: Vec<Item>,
}

/// What to read: `[start, end)` of a disk, block aligned at `start`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub start: u64,
    pub end: u64,
    pub block_size: u32,
    /// In a rescan, the server's digest of each block from `start` on (all-zero: unknown);
    /// blocks whose digest matches are not sent.
    pub known: Option<Arc<Vec<Hash>>>,
    /// Only these blocks (indices, ascending) of `[start, end)`; `None`: all of them.
    pub blocks: Option<Arc<Vec<u64>>>,
    /// The file was opened with `O_DIRECT` (block devices): reads go through an aligned buffer.
    /// A block device's page cache is shared with a mounted filesystem's metadata buffers, which
    /// can differ from what is on the device (ext4 builds uninitialised bitmaps in memory), so
    /// the agent reads the device itself.
    pub uncached: bool,
}

impl Plan {
    /// The `(offset, length)` reads this plan makes: runs of consecutive blocks, at most
    /// [`SEGMENT`] bytes each.
    fn reads(&self) -> Vec<(u64, u64)> {
        let bs = u64::from(self.block_size);
        let mut out = Vec::new();
        match &self.blocks {
            None => {
                let mut offset = self.start;
                while offset < self.end {
                    let len = (self.end - offset).min(SEGMENT);
                    out.push((offset, len));
                    offset += len;
                }
            }
            Some(blocks) => {
                for &b in blocks.iter() {
                    let off = b * bs;
                    if off < self.start || off >= self.end {
                        continue;
                    }
                    let len = bs.min(self.end - off);
                    match out.last_mut() {
                        Some((o, l)) if *o + *l == off && *l + len <= SEGMENT => *l += len,
                        _ => out.push((off, len)),
                    }
                }
            }
        }
        out
    }
}

pub type SegmentResult = Result<Segment, std::io::Error>;
pub type Ordered = mpsc::Receiver<oneshot::Receiver<SegmentResult>>;

struct Job {
    offset: u64,
    data: Vec<u8>,
    done: oneshot::Sender<SegmentResult>,
}

/// Starts the pipeline; dropping the returned receiver stops the threads.
pub fn spawn(file: Arc<File>, plan: Plan, workers: usize) -> Ordered {
    let workers = workers.max(1);
    let (ordered_tx, ordered_rx) = mpsc::channel(workers * 3);
    let (job_tx, job_rx) = std_mpsc::sync_channel::<Job>(workers);
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..workers {
        let (rx, plan) = (job_rx.clone(), plan.clone());
        std::thread::Builder::new()
            .name("rehost-hash".into())
            .spawn(move || worker(rx, plan))
            .expect("spawn pipeline worker");
    }
    std::thread::Builder::new()
        .name("rehost-read".into())
        .spawn(move || reader(file, plan, ordered_tx, job_tx))
        .expect("spawn pipeline reader");
    ordered_rx
}

fn reader(
    file: Arc<File>,
    plan: Plan,
    ordered: mpsc::Sender<oneshot::Receiver<SegmentResult>>,
    jobs: std_mpsc::SyncSender<Job>,
) {
    let mut aligned = crate::direct::Aligned::new(if plan.uncached { SEGMENT as usize } else { 0 });
    for (offset, len) in plan.reads() {
        let (done, rx) = oneshot::channel();
        if ordered.blocking_send(rx).is_err() {
            return;
        }
        let data = if plan.uncached {
            let buf = &mut aligned[..len as usize];
            if let Err(e) = file.read_exact_at(buf, offset) {
                let _ = done.send(Err(e));
                return;
            }
            buf.to_vec()
        } else {
            let mut data = vec![0u8; len as usize];
            if let Err(e) = file.read_exact_at(&mut data, offset) {
                let _ = done.send(Err(e));
                return;
            }
            data
        };
        if jobs.send(Job { offset, data, done }).is_err() {
            return;
        }
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.split_at(data.len() - data.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|b| *b == 0)
}

/// Compresses when it pays: a 4 KiB probe skips data that zstd cannot shrink (already compressed
/// or encrypted), and a result that saves less than 1/16 is sent raw.
fn compress(
    c: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    const PROBE: usize = 4096;
    if data.len() > 2 * PROBE {
        scratch.resize(PROBE + PROBE / 8, 0);
        match c.compress_to_buffer(&data[..PROBE], &mut scratch[..]) {
            Ok(n) if n < PROBE * 15 / 16 => {}
            _ => return None,
        }
    }
    let limit = data.len() - data.len() / 16;
    scratch.resize(limit, 0);
    match c.compress_to_buffer(data, &mut scratch[..]) {
        Ok(n) if n < limit => Some(scratch[..n].to_vec()),
        _ => None,
    }
}

fn worker(jobs: Arc<Mutex<std_mpsc::Receiver<Job>>>, plan: Plan) {
    let mut zstd = match zstd::bulk::Compressor::new(1) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a zstd context");
            return;
        }
    };
    let mut scratch = Vec::new();
    let bs = plan.block_size as u64;
    let full_zero = rehost_proto::zero_hash(plan.block_size as usize);
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let mut items = Vec::new();
        let mut pos = 0usize;
        while pos < job.data.len() {
            let offset = job.offset + pos as u64;
            let len = (job.data.len() - pos).min(bs as usize);
            let block = &job.data[pos..pos + len];
            pos += len;
            let zero = is_zero(block);
            let hash = if zero && len as u64 == bs {
                full_zero
            } else if zero {
                rehost_proto::zero_hash(len)
            } else {
                *blake3::hash(block).as_bytes()
            };
            if let Some(known) = &plan.known {
                let i = ((offset - plan.start) / bs) as usize;
                if known.get(i) == Some(&hash) {
                    continue;
                }
            }
            if zero {
                items.push(Item::Zero {
                    offset,
                    length: len as u64,
                });
                continue;
            }
            let (compression, payload) = match compress(&mut zstd, block, &mut scratch) {
                Some(c) => (Compression::Zstd, Bytes::from(c)),
                None => (Compression::None, Bytes::copy_from_slice(block)),
            };
            items.push(Item::Block {
                offset,
                length: len as u32,
                hash,
                compression,
                payload,
            });
        }
        let _ = job.done.send(Ok(Segment {
            offset: job.offset,
            len: job.data.len() as u64,
            items,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn compression_skips_random_data_and_shrinks_text() {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let mut s = Vec::new();
        let text: Vec<u8> = b"hello rehost "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        assert!(compress(&mut c, &text, &mut s).unwrap().len() < 4096);
        let mut x = 0x9e3779b97f4a7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&mut c, &random, &mut s).is_none());
    }

    #[tokio::test]
    async fn pipeline_keeps_order_and_skips_known_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let mut data = vec![0u8; 3 * 1024 * 1024 + 5000];
        for (i, b) in data.iter_mut().enumerate().skip(1 << 20) {
            *b = (i % 251) as u8;
        }
        std::fs::write(&p, &data).unwrap();
        let f = Arc::new(File::open(&p).unwrap());
        let plan = Plan {
            start: 0,
            end: data.len() as u64,
            block_size: 65536,
            known: None,
            blocks: None,
            uncached: false,
        };
        let mut rx = spawn(f.clone(), plan, 2);
        let mut next = 0;
        let mut hashes = Vec::new();
        while let Some(seg) = rx.recv().await {
            let seg = seg.await.unwrap().unwrap();
            assert_eq!(seg.offset, next);
            next += seg.len;
            for it in seg.items {
                match it {
                    Item::Zero { length, .. } => {
                        hashes.push(rehost_proto::zero_hash(length as usize))
                    }
                    Item::Block { hash, .. } => hashes.push(hash),
                }
            }
        }
        assert_eq!(next, data.len() as u64);
        assert_eq!(hashes.len(), data.len().div_ceil(65536));
        // A rescan with every digest known sends nothing; with one wrong digest, one block.
        hashes[20] = [1; 32];
        let plan = Plan {
            start: 0,
            end: data.len() as u64,
            block_size: 65536,
            known: Some(Arc::new(hashes)),
            blocks: None,
            uncached: false,
        };
        let mut rx = spawn(f.clone(), plan, 2);
        let mut items = 0;
        while let Some(seg) = rx.recv().await {
            items += seg.await.unwrap().unwrap().items.len();
        }
        assert_eq!(items, 1);
        // A block list reads exactly those blocks, the last one short, runs merged.
        let last = (data.len() / 65536) as u64;
        let blocks = Arc::new(vec![3, 4, 5, 30, last]);
        let plan = Plan {
            start: 0,
            end: data.len() as u64,
            block_size: 65536,
            known: None,
            blocks: Some(blocks),
            uncached: true,
        };
        assert_eq!(
            plan.reads(),
            vec![
                (3 * 65536, 3 * 65536),
                (30 * 65536, 65536),
                (last * 65536, data.len() as u64 - last * 65536)
            ]
        );
        let mut rx = spawn(f, plan, 2);
        let mut offsets = Vec::new();
        while let Some(seg) = rx.recv().await {
            for it in seg.await.unwrap().unwrap().items {
                match it {
                    Item::Zero { offset, .. } | Item::Block { offset, .. } => {
                        offsets.push(offset / 65536)
                    }
                }
            }
        }
        assert_eq!(offsets, vec![3, 4, 5, 30, last]);
    }
}
