//! Change tracking, chosen per disk:
//!
//! - **tracepoint** (block devices, root, Linux): a private ftrace instance
//!   (`/sys/kernel/tracing/instances/rehost-<machine>-<disk>`) with the `block:block_rq_complete`
//!   event filtered in the kernel to the disk's writes and discards. Completion, not submission:
//!   once an event is seen the data is on the device, so reading the block afterwards gets it.
//!   Partition writes arrive remapped to the whole disk. A reader thread parses `trace_pipe` into
//!   a [`DirtySet`]. Lost events (ring-buffer overruns, counted in `per_cpu/cpu*/stats`) are never
//!   ignored: they mark the set as lost, and the caller compares the whole disk.
//!   The instance outlives the agent: when the agent stops, the kernel keeps recording into the
//!   ring buffer, and the next start drains what happened meanwhile. That, with the saved bitmap
//!   and the generation the server agrees on, is what makes a clean restart need no rescan.
//! - **scan** (anywhere, image files too): no kernel help; the replication loop hashes every block
//!   periodically and compares with the server's index.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per-CPU ring buffer of the trace instance.
const BUFFER_KB: u32 = 8192;
const EVENT: &str = "events/block/block_rq_complete";

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("tracefs is not available (mount it on /sys/kernel/tracing, or run as root)")]
    NoTracefs,
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TrackerError + 'a {
    move |source| TrackerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Blocks written since they were last taken, at replication-block granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    bits: Vec<u64>,
    blocks: u64,
    count: u64,
    block_size: u64,
    /// Why events were lost, if they were: the whole disk must be compared.
    pub lost: Option<String>,
}

impl DirtySet {
    pub fn new(size: u64, block_size: u32) -> Self {
        let blocks = size.div_ceil(u64::from(block_size));
        Self {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            count: 0,
            block_size: u64::from(block_size),
            lost: None,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mark_block(&mut self, b: u64) {
        if b >= self.blocks {
            return;
        }
        let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
        if self.bits[w] & m == 0 {
            self.bits[w] |= m;
            self.count += 1;
        }
    }

    /// Marks every block that `[offset, offset+len)` touches.
    pub fn mark_bytes(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.block_size;
        let last = (offset.saturating_add(len) - 1) / self.block_size;
        for b in first..=last.min(self.blocks.saturating_sub(1)) {
            self.mark_block(b);
        }
    }

    pub fn merge(&mut self, other: &DirtySet) {
        for b in other.iter() {
            self.mark_block(b);
        }
        if self.lost.is_none() {
            self.lost.clone_from(&other.lost);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let t = word.trailing_zeros();
                word &= word - 1;
                Some(w as u64 * 64 + u64::from(t))
            })
        })
    }

    /// Takes everything marked so far, leaving the set empty.
    pub fn take(&mut self) -> DirtySet {
        let fresh = DirtySet {
            bits: vec![0; self.bits.len()],
            blocks: self.blocks,
            count: 0,
            block_size: self.block_size,
            lost: None,
        };
        std::mem::replace(self, fresh)
    }

    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Rebuilds a set from saved words; `None` when they do not fit the geometry.
    pub fn from_words(size: u64, block_size: u32, words: Vec<u64>) -> Option<Self> {
        // Checked before `new`, which allocates the words: a saved size may be anything.
        let blocks = size.div_ceil(u64::from(block_size.max(1)));
        if block_size == 0 || blocks.div_ceil(64) != words.len() as u64 {
            return None;
        }
        let mut s = Self::new(size, block_size);
        let tail = s.blocks % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        s.count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        s.bits = words;
        Some(s)
    }
}

/// One parsed `block_rq_complete` line: (kernel dev, byte offset, byte length).
pub fn parse_event(line: &str) -> Option<(u32, u64, u64)> {
    let rest = &line[line.find("block_rq_complete: ")? + "block_rq_complete: ".len()..];
    let mut it = rest.split_ascii_whitespace();
    let (maj, min) = it.next()?.split_once(',')?;
    let dev = (maj.parse::<u32>().ok()? << 20) | min.parse::<u32>().ok()?;
    let plus = rest.find(" + ")?;
    let sector: u64 = rest[..plus].rsplit(' ').next()?.parse().ok()?;
    let nr: u64 = rest[plus + 3..].split(' ').next()?.parse().ok()?;
    Some((dev, sector.checked_mul(512)?, nr.checked_mul(512)?))
}

fn tracefs_root() -> Result<PathBuf, TrackerError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("instances").is_dir() {
            return Ok(p.into());
        }
    }
    let target = Path::new("/sys/kernel/tracing");
    if target.is_dir() {
        let mounted = nix::mount::mount(
            Some("tracefs"),
            target,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if mounted.is_ok() && target.join("instances").is_dir() {
            return Ok(target.into());
        }
    }
    Err(TrackerError::NoTracefs)
}

/// The kernel's encoding of a block device number in trace events (major << 20 | minor).
pub fn kernel_dev(path: &Path) -> Option<u32> {
    let md = std::fs::metadata(path).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    Some((nix::sys::stat::major(rdev) as u32) << 20 | nix::sys::stat::minor(rdev) as u32)
}

/// Reads a small tracefs file in one call: some of them answer a follow-up read at an offset
/// with a truncated text, so the short probing reads of `read_to_string` must be avoided.
fn read_whole(path: &Path) -> String {
    let mut buf = vec![0u8; 8192];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut buf))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn filter_for(dev: u32) -> String {
    format!("dev == {dev} && (rwbs ~ \"*W*\" || rwbs ~ \"*D*\")")
}

/// Sum of `overrun` and `dropped events` over the instance's CPUs.
fn lost_events(instance: &Path) -> u64 {
    let mut total = 0;
    let Ok(cpus) = std::fs::read_dir(instance.join("per_cpu")) else {
        return 0;
    };
    for cpu in cpus.flatten() {
        let stats = read_whole(&cpu.path().join("stats"));
        for line in stats.lines() {
            if let Some(v) = line
                .strip_prefix("overrun:")
                .or_else(|| line.strip_prefix("dropped events:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// What the kernel instance says about the time the agent was not reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuity {
    /// The instance recorded every event since the last reader stopped.
    Unbroken,
    /// No usable instance was there (first start, reboot, or it was removed); the reason.
    Broken(String),
}

pub struct TraceTracker {
    pub instance: PathBuf,
    pub dirty: Arc<Mutex<DirtySet>>,
    pub wake: Arc<tokio::sync::Notify>,
    /// Counts the times the reader found the pipe empty: two more mean every event that
    /// happened before the count was read has been applied to `dirty`.
    drained: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TraceTracker {
    pub fn instance_name(machine: &str, disk_id: u64) -> String {
        format!("rehost-{machine}-{disk_id}")
    }

    /// Attaches to the disk's trace instance, keeping one that has recorded without a break
    /// (reported as [`Continuity::Unbroken`]), or creating a fresh one.
    pub fn start(
        name: &str,
        device: &Path,
        size: u64,
        block_size: u32,
    ) -> Result<(Self, Continuity), TrackerError> {
        let dev = kernel_dev(device).ok_or(TrackerError::NoTracefs)?;
        let root = tracefs_root()?;
        let instance = root.join("instances").join(name);
        let event = instance.join(EVENT);
        let want = filter_for(dev);
        let continuity = if instance.is_dir() {
            let filter = read_whole(&event.join("filter"));
            let enabled = read_whole(&event.join("enable"));
            let lost = lost_events(&instance);
            if filter.trim() != want || enabled.trim() != "1" {
                Continuity::Broken(format!(
                    "the kernel trace instance was not recording this disk (filter `{}`, enabled `{}`)",
                    filter.trim(),
                    enabled.trim()
                ))
            } else if lost > 0 {
                Continuity::Broken(format!(
                    "the kernel trace buffer lost {lost} events while the agent was stopped"
                ))
            } else {
                Continuity::Unbroken
            }
        } else {
            Continuity::Broken(
                "no kernel trace instance (first start, or the host rebooted)".into(),
            )
        };
        if continuity != Continuity::Unbroken {
            remove_instance(&instance);
            std::fs::create_dir(&instance).map_err(io("create trace instance", &instance))?;
            let w = |file: PathBuf, v: &str| {
                std::fs::write(&file, v).map_err(io("configure trace instance", &file))
            };
            w(instance.join("buffer_size_kb"), &BUFFER_KB.to_string())?;
            w(event.join("filter"), &want)?;
            w(event.join("enable"), "1")?;
            w(instance.join("tracing_on"), "1")?;
        }
        let pipe_path = instance.join("trace_pipe");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(io("open trace pipe", &pipe_path))?;
        let dirty = Arc::new(Mutex::new(DirtySet::new(size, block_size)));
        let wake = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let drained = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (dirty, wake, stop, inst, dr) = (
                dirty.clone(),
                wake.clone(),
                stop.clone(),
                instance.clone(),
                drained.clone(),
            );
            std::thread::Builder::new()
                .name("rehost-trace".into())
                .spawn(move || read_loop(pipe, dev, &inst, &dirty, &wake, &stop, &dr))
                .map_err(io("start trace reader", &instance))?
        };
        Ok((
            Self {
                instance,
                dirty,
                wake,
                drained,
                stop,
                thread: Some(thread),
            },
            continuity,
        ))
    }

    /// Waits until every write completed before this call is in the dirty set (or 1 s passed).
    pub async fn settle(&self) {
        let start = self.drained.load(Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(1);
        while self.drained.load(Ordering::SeqCst) < start + 2
            && Instant::now() < until
            && self.thread.is_some()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops reading; the kernel instance goes on recording for the next start.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops reading and removes the kernel instance (the disk is no longer replicated).
    pub fn remove(mut self) {
        self.stop();
        remove_instance(&self.instance);
    }
}

impl Drop for TraceTracker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn remove_instance(instance: &Path) {
    if instance.is_dir() {
        let _ = std::fs::write(instance.join(EVENT).join("enable"), "0");
        let _ = std::fs::remove_dir(instance);
    }
}

fn read_loop(
    mut pipe: File,
    dev: u32,
    instance: &Path,
    dirty: &Mutex<DirtySet>,
    wake: &tokio::sync::Notify,
    stop: &AtomicBool,
    drained: &std::sync::atomic::AtomicU64,
) {
    let mut buf = vec![0u8; 256 << 10];
    let mut carry = Vec::new();
    let mut lost_seen = lost_events(instance);
    let mut checked = Instant::now();
    loop {
        match pipe.read(&mut buf) {
            Ok(n) if n > 0 => {
                carry.extend_from_slice(&buf[..n]);
                let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                let mut d = dirty.lock().unwrap_or_else(|p| p.into_inner());
                for line in carry[..end].split(|&b| b == b'\n') {
                    let Ok(line) = std::str::from_utf8(line) else {
                        continue;
                    };
                    if let Some((ev_dev, off, len)) = parse_event(line) {
                        if ev_dev == dev {
                            tracing::trace!(off, len, "write completed");
                            d.mark_bytes(off, len);
                        }
                    }
                }
                drop(d);
                carry.drain(..end);
                wake.notify_one();
                continue;
            }
            Ok(_) => {
                drained.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drained.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let mut d = dirty.lock().unwrap_or_else(|p| p.into_inner());
                d.lost = Some(format!("reading the kernel trace pipe failed: {e}"));
                wake.notify_one();
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if checked.elapsed() >= Duration::from_millis(500) {
            checked = Instant::now();
            let lost = lost_events(instance);
            if lost > lost_seen {
                let mut d = dirty.lock().unwrap_or_else(|p| p.into_inner());
                d.lost = Some(format!(
                    "the kernel trace buffer overran: {} events lost",
                    lost - lost_seen
                ));
                lost_seen = lost;
                wake.notify_one();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_completion_events() {
        let l = "     ksoftirqd/0-14      [000] ..s..  3335.780955: block_rq_complete: 7,1 WS () 640 + 128 be,0,4 [0]";
        assert_eq!(parse_event(l), Some(((7 << 20) | 1, 640 * 512, 128 * 512)));
        let d = "  kworker-1 [001] ..... 1.2: block_rq_complete: 259,0 DS () 0 + 2048 none,0,0 [0]";
        assert_eq!(parse_event(d), Some(((259 << 20), 0, 2048 * 512)));
        assert_eq!(parse_event("block_rq_complete: 7,1 WS () x + 1"), None);
        assert_eq!(parse_event("garbage"), None);
        assert_eq!(
            parse_event("block_rq_complete: 7,1 WS () 99999999999999999999 + 1 [0]"),
            None
        );
    }

    #[test]
    fn dirty_set_marks_touched_blocks_and_takes_them() {
        let mut d = DirtySet::new(10 * 65536 + 100, 65536);
        assert_eq!(d.blocks(), 11);
        d.mark_bytes(65535, 2);
        d.mark_bytes(10 * 65536, 4096);
        d.mark_bytes(u64::MAX - 10, 100);
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![0, 1, 10]);
        let t = d.take();
        assert_eq!(t.count(), 3);
        assert_eq!(d.count(), 0);
        let r = DirtySet::from_words(10 * 65536 + 100, 65536, t.words().to_vec()).unwrap();
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![0, 1, 10]);
        assert!(DirtySet::from_words(10 * 65536 + 100, 65536, vec![1 << 20]).is_none());
    }
}
