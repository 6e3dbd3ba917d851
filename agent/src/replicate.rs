//! The replication daemon (`rehost-agent run`): connect, decide per disk between initial sync,
//! resume and rescan, stream blocks through the pipeline, and keep going: reconnect with backoff
//! after any failure that a retry can fix, resending whatever was not acknowledged.
//!
//! Per disk, given the server's grant and the agent's own state:
//! - the server has nothing yet: **initial sync** from byte 0;
//! - the agent's state knows the disk and the server reports a partial sync: **resume** from the
//!   server's durable watermark;
//! - the server holds data the agent's state cannot vouch for (state lost or reinstalled, or a
//!   restart after the sync finished, when writes during the stop are unknown): **rescan** — hash
//!   every block the server has, send only those whose digest differs from the server's index,
//!   then sync the rest.
//!
//! After the initial sync, the scan tracker keeps the replica current: a pass every
//! `scan_interval` compares every block with the server's index and sends the differences.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rehost_proto::msg::{Auth, Block, DiskGrant, DiskInfo, DiskState, Hello, MarkKind, Progress};
use rehost_proto::{DiskId, Message, MAX_INDEX_CHUNK};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::conn::{self, Conn, ConnError};
use crate::pipeline::{self, Item, Plan};
use crate::state::{AgentState, DiskStatus, Phase, RescanReport, StateError, Status};

#[derive(Debug, Clone)]
pub struct Options {
    pub scan_interval: Duration,
    pub workers: usize,
    /// Bandwidth cap in megabits per second (None: unlimited).
    pub max_mbps: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error("read {0} at offset {1}")]
    Read(PathBuf, u64, #[source] std::io::Error),
    #[error("{0} changed size from {1} to {2} bytes; reinstall to replicate it as a new disk")]
    Resized(PathBuf, u64, u64),
    #[error("agent state is damaged: {0}")]
    BadState(&'static str),
    #[error("the server granted {0}, which this agent did not ask for")]
    UnknownGrant(String),
    #[error("stopped")]
    Stopped,
}

impl RunError {
    fn is_fatal(&self) -> bool {
        match self {
            RunError::Conn(c) => c.is_fatal(),
            RunError::State(_) | RunError::BadState(_) | RunError::Resized(..) | RunError::UnknownGrant(_) => true,
            _ => false,
        }
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Shared between the replication flow and the status ticker.
pub struct Agent {
    pub dir: PathBuf,
    pub state: Mutex<AgentState>,
    pub status: Mutex<Status>,
    /// When the last completed pass over each disk started (its data is at least that recent).
    consistent_at: Mutex<Vec<(u64, Instant)>>,
}

impl Agent {
    pub fn new(dir: PathBuf, state: AgentState) -> Arc<Self> {
        let status = Status {
            machine_id: state.machine_id.clone(),
            hostname: state.hostname.clone(),
            server: state.server.clone(),
            pid: std::process::id(),
            running: true,
            connection: "connecting".into(),
            ..Default::default()
        };
        Arc::new(Self { dir, state: Mutex::new(state), status: Mutex::new(status), consistent_at: Mutex::new(Vec::new()) })
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disk_status<T>(&self, disk: u64, f: impl FnOnce(&mut DiskStatus) -> T) -> Option<T> {
        self.status().disks.iter_mut().find(|d| d.disk_id == disk).map(f)
    }

    fn lag_ms(&self, disk: u64) -> Option<u64> {
        let c = self.consistent_at.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().find(|(d, _)| *d == disk).map(|(_, t)| t.elapsed().as_millis() as u64)
    }

    fn set_consistent(&self, disk: u64, at: Instant) {
        let mut c = self.consistent_at.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(d, _)| *d != disk);
        c.push((disk, at));
    }

    fn save_state(&self) -> Result<(), StateError> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.save(&self.dir)
    }

    fn write_status(&self) {
        let mut s = self.status().clone();
        s.updated_at = now();
        for d in &mut s.disks {
            d.lag_seconds = if d.state == "continuous" { self.lag_ms(d.disk_id).map(|l| l / 1000) } else { None };
        }
        if let Err(e) = s.save(&self.dir) {
            warn!(error = %e, "cannot write status file");
        }
    }

    fn progress_messages(&self) -> Vec<Message> {
        let s = self.status().clone();
        s.disks
            .iter()
            .filter_map(|d| {
                let state = match d.state.as_str() {
                    "initial-sync" => DiskState::InitialSync,
                    "rescan" => DiskState::Rescan,
                    "continuous" => DiskState::Continuous,
                    _ => return None,
                };
                Some(Message::Progress(Progress {
                    disk_id: DiskId(d.disk_id),
                    state,
                    done_bytes: (d.progress_percent / 100.0 * d.size_bytes as f64) as u64,
                    backlog_bytes: d.backlog_bytes,
                    sent_bytes: d.sent_bytes,
                    lag_ms: self.lag_ms(d.disk_id).unwrap_or(0),
                }))
            })
            .collect()
    }
}

/// Runs until `shutdown` flips or a fatal error (bad credential, revoked machine).
pub async fn run(agent: Arc<Agent>, opts: Options, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let ticker = tokio::spawn(status_ticker(agent.clone()));
    let mut backoff = Duration::from_secs(1);
    let result = loop {
        let started = Instant::now();
        let r = session(&agent, &opts, &mut shutdown).await;
        match r {
            Ok(()) | Err(RunError::Stopped) => break Ok(()),
            Err(e) if e.is_fatal() => break Err(e),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), retry_in = ?backoff, "replication interrupted");
                {
                    let mut s = agent.status();
                    s.connection = "reconnecting".into();
                    for d in &mut s.disks {
                        d.state = "disconnected".into();
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    ticker.abort();
    {
        let mut s = agent.status();
        s.running = false;
        s.connection = if result.is_ok() { "stopped".into() } else { "failed".into() };
        s.last_error = result.as_ref().err().map(|e| format!("{:#}", anyhow::Error::msg(e.to_string())));
        for d in &mut s.disks {
            d.state = "disconnected".into();
        }
    }
    agent.write_status();
    result
}

async fn status_ticker(agent: Arc<Agent>) {
    let mut t = tokio::time::interval(Duration::from_secs(1));
    loop {
        t.tick().await;
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || a.write_status()).await;
    }
}

struct OpenDisk {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
}

async fn session(agent: &Arc<Agent>, opts: &Options, shutdown: &mut watch::Receiver<bool>) -> Result<(), RunError> {
    let state = agent.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let pin = state.pin().ok_or(RunError::BadState("server_pin"))?;
    let secret = state.secret().ok_or(RunError::BadState("machine_secret"))?;
    let machine_id = rehost_proto::MachineId::parse(&state.machine_id).map_err(|_| RunError::BadState("machine_id"))?;
    let mut disks = Vec::new();
    for d in &state.disks {
        let probed = crate::disks::probe(&d.device)?;
        let file = File::open(&d.device).map_err(|e| crate::disks::DiskError::Open(d.device.clone(), e))?;
        disks.push(OpenDisk { path: d.device.clone(), file: Arc::new(file), size: probed.size_bytes });
    }
    agent.status().connection = "connecting".into();
    let mut tls = conn::connect(&state.server, pin).await?;
    let hello = Hello {
        min_version: rehost_proto::MIN_PROTOCOL_VERSION,
        max_version: rehost_proto::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        auth: Auth::Machine { machine_id, secret },
        disks: disks.iter().map(|d| DiskInfo { device: d.path.display().to_string(), size_bytes: d.size }).collect(),
    };
    let welcome = conn::handshake(&mut tls, hello).await?;
    let mut conn = Conn::start(tls, opts.max_mbps);
    info!(server = %state.server, machine = %welcome.machine_id, "connected");
    {
        let mut s = agent.status();
        s.connection = "connected".into();
        s.last_error = None;
        let old = std::mem::take(&mut s.disks);
        s.disks = welcome
            .disks
            .iter()
            .map(|g| {
                let prev = old.iter().find(|d| d.disk_id == g.disk_id.0);
                DiskStatus {
                    device: g.device.clone(),
                    disk_id: g.disk_id.0,
                    size_bytes: g.size_bytes,
                    state: "connecting".into(),
                    replicated_bytes: if g.sync_complete { g.size_bytes } else { g.durable_bytes },
                    sent_bytes: prev.map(|p| p.sent_bytes).unwrap_or(0),
                    sent_blocks: prev.map(|p| p.sent_blocks).unwrap_or(0),
                    last_rescan: prev.and_then(|p| p.last_rescan.clone()),
                    ..Default::default()
                }
            })
            .collect();
    }
    let ticker = {
        let (agent, out) = (agent.clone(), conn.sender());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                for m in agent.progress_messages() {
                    if out.try_send(m).is_err() {
                        break;
                    }
                }
            }
        })
    };
    let result = replicate(agent, opts, &mut conn, &welcome.disks, &disks, shutdown).await;
    ticker.abort();
    conn.close().await;
    result
}

async fn replicate(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    grants: &[DiskGrant],
    disks: &[OpenDisk],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    for g in grants {
        let d = disks
            .iter()
            .find(|d| d.path.display().to_string() == g.device)
            .ok_or_else(|| RunError::UnknownGrant(g.device.clone()))?;
        if d.size != g.size_bytes {
            return Err(RunError::Resized(d.path.clone(), g.size_bytes, d.size));
        }
        let local = agent.state.lock().unwrap_or_else(|p| p.into_inner()).disk(&d.path).cloned();
        let known = local.as_ref().is_some_and(|l| l.disk_id == g.disk_id.0);
        let started = Instant::now();
        if g.sync_complete {
            let reason = if known {
                "agent restarted after the initial sync: writes made while it was stopped are unknown"
            } else {
                "the server holds a replica this agent has no state for (reinstalled or state lost)"
            };
            rescan(agent, opts, conn, g, d, g.size_bytes, reason, shutdown).await?;
            send_mark(agent, conn, g, MarkKind::RescanDone).await?;
        } else {
            if g.durable_bytes > 0 && !known {
                let reason = "the server holds a partial replica this agent has no state for (reinstalled or state lost)";
                rescan(agent, opts, conn, g, d, g.durable_bytes, reason, shutdown).await?;
            } else if g.durable_bytes > 0 {
                info!(disk = %g.device, from = g.durable_bytes, "resuming initial sync from the server's durable watermark");
            }
            {
                let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
                st.set_disk(&d.path, g.disk_id.0, Phase::InitialSync);
            }
            agent.save_state()?;
            agent.disk_status(g.disk_id.0, |s| s.state = "initial-sync".into());
            let plan = Plan { start: g.durable_bytes, end: g.size_bytes, block_size: g.block_size, known: None };
            stream(agent, opts, conn, g, d, plan, shutdown).await?;
            send_mark(agent, conn, g, MarkKind::InitialSyncDone).await?;
            info!(disk = %g.device, secs = started.elapsed().as_secs_f64(), "initial sync complete");
        }
        {
            let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
            st.set_disk(&d.path, g.disk_id.0, Phase::Synced);
        }
        agent.save_state()?;
        agent.set_consistent(g.disk_id.0, started);
        agent.disk_status(g.disk_id.0, |s| {
            s.state = "continuous".into();
            s.progress_percent = 100.0;
            s.replicated_bytes = s.size_bytes;
            s.backlog_bytes = 0;
        });
    }
    // Continuous replication with the scan tracker.
    loop {
        tokio::select! {
            _ = tokio::time::sleep(opts.scan_interval) => {}
            _ = shutdown.changed() => return Err(RunError::Stopped),
            e = conn.closed() => return Err(e.into()),
        }
        for g in grants {
            let d = disks.iter().find(|d| d.path.display().to_string() == g.device).expect("matched above");
            let started = Instant::now();
            let sent = scan_pass(agent, opts, conn, g, d, shutdown).await?;
            let seq = conn.send_seq(|seq| Message::Mark { seq, disk_id: g.disk_id, kind: MarkKind::RescanDone }).await?;
            conn.wait_acked(seq).await?;
            agent.set_consistent(g.disk_id.0, started);
            if sent > 0 {
                info!(disk = %g.device, sent_bytes = sent, "scan pass sent changed blocks");
            }
        }
    }
}

async fn send_mark(agent: &Arc<Agent>, conn: &mut Conn, g: &DiskGrant, kind: MarkKind) -> Result<(), RunError> {
    let seq = conn.send_seq(|seq| Message::Mark { seq, disk_id: g.disk_id, kind }).await?;
    conn.wait_acked(seq).await?;
    agent.disk_status(g.disk_id.0, |s| s.replicated_bytes = s.size_bytes);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn rescan(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    g: &DiskGrant,
    d: &OpenDisk,
    upto: u64,
    reason: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    warn!(disk = %g.device, bytes = upto, reason, "rescan: comparing every block with the server's hash index");
    agent.disk_status(g.disk_id.0, |s| {
        s.state = "rescan".into();
        s.last_rescan = Some(RescanReport { reason: reason.into(), ..Default::default() });
    });
    let before = agent.disk_status(g.disk_id.0, |s| (s.sent_bytes, s.sent_blocks)).unwrap_or_default();
    compare_range(agent, opts, conn, g, d, upto, shutdown).await?;
    let (bytes, blocks) = agent.disk_status(g.disk_id.0, |s| (s.sent_bytes, s.sent_blocks)).unwrap_or_default();
    agent.disk_status(g.disk_id.0, |s| {
        if let Some(r) = &mut s.last_rescan {
            r.scanned_bytes = upto;
            r.sent_bytes = bytes - before.0;
            r.differing_blocks = blocks - before.1;
            r.finished = true;
        }
    });
    info!(disk = %g.device, scanned = upto, differing_blocks = blocks - before.1, sent_bytes = bytes - before.0, "rescan complete");
    Ok(())
}

/// One pass of the scan tracker over a synced disk; returns the payload bytes it sent.
async fn scan_pass(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    g: &DiskGrant,
    d: &OpenDisk,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<u64, RunError> {
    let before = agent.disk_status(g.disk_id.0, |s| s.sent_bytes).unwrap_or_default();
    compare_range(agent, opts, conn, g, d, g.size_bytes, shutdown).await?;
    Ok(agent.disk_status(g.disk_id.0, |s| s.sent_bytes).unwrap_or_default() - before)
}

/// Hashes `[0, upto)` chunk by chunk against the server's index and sends what differs.
async fn compare_range(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    g: &DiskGrant,
    d: &OpenDisk,
    upto: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let bs = u64::from(g.block_size);
    let blocks = upto.div_ceil(bs);
    let mut b = 0u64;
    while b < blocks {
        let count = (blocks - b).min(u64::from(MAX_INDEX_CHUNK)) as u32;
        let known = conn.index(g.disk_id, b, count).await?;
        let end = ((b + u64::from(count)) * bs).min(g.size_bytes);
        let plan = Plan { start: b * bs, end, block_size: g.block_size, known: Some(Arc::new(known)) };
        stream(agent, opts, conn, g, d, plan, shutdown).await?;
        b += u64::from(count);
    }
    Ok(())
}

/// Streams one plan through the pipeline; returns once every frame is queued (not yet acked).
async fn stream(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    g: &DiskGrant,
    d: &OpenDisk,
    plan: Plan,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    const MAX_ZERO_RUN: u64 = 1 << 30;
    let initial = plan.known.is_none();
    let mut segments = pipeline::spawn(d.file.clone(), plan.clone(), opts.workers);
    let mut zero: Option<(u64, u64)> = None;
    // (sequence, end offset) of frames not yet acknowledged, to show durable progress.
    let mut inflight = std::collections::VecDeque::new();
    let disk_id = g.disk_id;
    while let Some(next) = segments.recv().await {
        if *shutdown.borrow() {
            return Err(RunError::Stopped);
        }
        let seg = next.await.map_err(|_| RunError::BadState("pipeline worker stopped"))?;
        let seg = seg.map_err(|e| RunError::Read(d.path.clone(), plan.start, e))?;
        let (mut bytes, mut blocks) = (0u64, 0u64);
        for item in seg.items {
            match item {
                Item::Zero { offset, length } => match zero {
                    Some((o, l)) if o + l == offset && l < MAX_ZERO_RUN => zero = Some((o, l + length)),
                    _ => {
                        if let Some((o, l)) = zero.take() {
                            let seq = conn.send_seq(|seq| Message::Zero { seq, disk_id, offset: o, length: l }).await?;
                            inflight.push_back((seq, o + l));
                        }
                        zero = Some((offset, length));
                    }
                },
                Item::Block { offset, length, hash, compression, payload } => {
                    if let Some((o, l)) = zero.take() {
                        let seq = conn.send_seq(|seq| Message::Zero { seq, disk_id, offset: o, length: l }).await?;
                        inflight.push_back((seq, o + l));
                    }
                    bytes += payload.len() as u64;
                    blocks += 1;
                    let seq = conn
                        .send_seq(|seq| {
                            Message::Block(Block { seq, disk_id, offset, length, hash, compression, payload })
                        })
                        .await?;
                    inflight.push_back((seq, offset + u64::from(length)));
                }
            }
        }
        let acked = conn.acked();
        let mut durable = None;
        while inflight.front().is_some_and(|(s, _)| *s <= acked) {
            durable = inflight.pop_front().map(|(_, e)| e);
        }
        let done = seg.offset + seg.len;
        agent.disk_status(g.disk_id.0, |s| {
            s.sent_bytes += bytes;
            s.sent_blocks += blocks;
            if initial {
                if let Some(e) = durable {
                    s.replicated_bytes = s.replicated_bytes.max(e);
                }
                s.progress_percent = (s.replicated_bytes as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                s.backlog_bytes = g.size_bytes - s.replicated_bytes.min(g.size_bytes);
            } else if s.state == "rescan" {
                s.progress_percent = (done as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                s.backlog_bytes = g.size_bytes - done;
            }
        });
    }
    if let Some((o, l)) = zero.take() {
        conn.send_seq(|seq| Message::Zero { seq, disk_id, offset: o, length: l }).await?;
    }
    Ok(())
}
