//! The replication daemon (`rehost-agent run`): connect, decide per disk between initial sync,
//! resume and rescan, stream blocks through the pipeline, and keep going: reconnect with backoff
//! after any failure that a retry can fix, resending whatever was not acknowledged.
//!
//! Each disk gets a change tracker (see [`crate::tracker`]) when this process first sees it,
//! before anything is read, and keeps it across reconnects. Per disk, given the server's grant:
//! - the server has nothing yet: **initial sync** from byte 0;
//! - the tracker vouches for every change since the server's copy was made — this process has
//!   tracked the disk since then, or the agent stopped cleanly (saved dirty bitmap, a generation
//!   the server agrees on, and a kernel trace instance that recorded without a break while the
//!   agent was down): **resume** from the server's durable watermark, or from the saved bitmap;
//! - otherwise (first start after a crash, a reinstall, a reboot, lost trace events): **rescan** —
//!   hash every block the server has, send only those whose digest differs from its index.
//!
//! Then **continuous replication**: with the tracepoint tracker, dirty blocks are read and sent as
//! they come (a round every 100 ms at most, re-dirtied blocks go again); with the scan tracker a
//! pass every `scan_interval` compares every block with the server's index. The lag is the age of
//! the last round the server acknowledged in full.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rehost_proto::msg::{Auth, Block, DiskGrant, DiskInfo, DiskState, Hello, MarkKind, Progress};
use rehost_proto::{DiskId, Message, MAX_INDEX_CHUNK};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cleanstop;
use crate::conn::{self, Conn, ConnError};
use crate::pipeline::{self, Item, Plan};
use crate::state::{AgentState, DiskStatus, Phase, RescanReport, StartReport, StateError, Status};
use crate::tracker::{Continuity, DirtySet, TraceTracker};

/// Lag above which a continuous disk shows as `lagging`.
const LAGGING_AFTER: Duration = Duration::from_secs(10);
/// A round not acknowledged for this long shows the disk as `stalled`.
const STALLED_AFTER: Duration = Duration::from_secs(30);
const ROUND: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Options {
    pub scan_interval: Duration,
    pub workers: usize,
    /// Bandwidth cap in megabits per second (None: unlimited).
    pub max_mbps: Option<u64>,
    /// Keepalive and stall detection on each connection.
    pub timeouts: crate::watchdog::Timeouts,
    /// Between progress lines during an initial sync or rescan.
    pub progress_every: Duration,
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
    /// When the server refused this machine because its replication has ended (it is
    /// cutover-complete or archived): what to tell the operator.
    pub fn replication_ended(&self) -> Option<String> {
        match self {
            RunError::Conn(ConnError::Refused {
                code: rehost_proto::msg::ErrorCode::Forbidden,
                message,
            }) if message.contains(rehost_proto::msg::REPLICATION_ENDED) => Some(format!(
                "{message}. Nothing more will be replicated from this machine: remove the agent \
                 with `rehost-agent uninstall` (the server keeps the replica and its recovery \
                 points)"
            )),
            _ => None,
        }
    }

    /// An error that a restart cannot fix (exit status 3: the unit does not restart on it).
    pub fn is_fatal(&self) -> bool {
        match self {
            RunError::Conn(c) => c.is_fatal(),
            RunError::State(_)
            | RunError::BadState(_)
            | RunError::Resized(..)
            | RunError::UnknownGrant(_) => true,
            _ => false,
        }
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
            agent_version: crate::VERSION.into(),
            running: true,
            connection: "connecting".into(),
            ..Default::default()
        };
        Arc::new(Self {
            dir,
            state: Mutex::new(state),
            status: Mutex::new(status),
            consistent_at: Mutex::new(Vec::new()),
        })
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disk_status<T>(&self, disk: u64, f: impl FnOnce(&mut DiskStatus) -> T) -> Option<T> {
        self.status()
            .disks
            .iter_mut()
            .find(|d| d.disk_id == disk)
            .map(f)
    }

    fn lag_ms(&self, disk: u64) -> Option<u64> {
        let c = self.consistent_at.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .find(|(d, _)| *d == disk)
            .map(|(_, t)| t.elapsed().as_millis() as u64)
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
            d.state = self.shown_state(d, s.stall.is_some());
            d.lag_seconds = if matches!(d.state.as_str(), "continuous" | "lagging" | "stalled") {
                self.lag_ms(d.disk_id).map(|l| l / 1000)
            } else {
                None
            };
            d.backlog_lower_bound =
                d.tracker == "scan" && matches!(d.state.as_str(), "continuous" | "lagging");
        }
        if let Err(e) = s.save(&self.dir) {
            warn!(error = %e, "cannot write status file");
        }
    }

    /// The state shown for a disk: `stalled` while the connection is, and for a replicating
    /// disk `lagging` or `continuous` from its lag at this moment. A scanned disk's lag grows
    /// between passes (its data is as recent as the start of its last complete pass), so it
    /// turns `lagging` when the scan interval exceeds [`LAGGING_AFTER`].
    fn shown_state(&self, d: &DiskStatus, stalled: bool) -> String {
        match d.state.as_str() {
            _ if stalled => "stalled".into(),
            "disconnected" | "connecting" => d.state.clone(),
            "continuous" | "lagging" => match self.lag_ms(d.disk_id) {
                Some(l) if Duration::from_millis(l) > LAGGING_AFTER => "lagging".into(),
                _ => "continuous".into(),
            },
            _ => d.state.clone(),
        }
    }

    fn progress_messages(&self) -> Vec<Message> {
        let s = self.status().clone();
        s.disks
            .iter()
            .filter_map(|d| {
                if d.state == "disconnected" {
                    return None;
                }
                let state = match self.shown_state(d, s.stall.is_some()).as_str() {
                    "initial-sync" => DiskState::InitialSync,
                    "rescan" => DiskState::Rescan,
                    "continuous" => DiskState::Continuous,
                    "lagging" => DiskState::Lagging,
                    "stalled" => DiskState::Stalled,
                    _ => return None,
                };
                Some(Message::Progress(Progress {
                    disk_id: DiskId(d.disk_id),
                    state,
                    done_bytes: (d.progress_percent / 100.0 * d.size_bytes as f64) as u64,
                    backlog_bytes: d.backlog_bytes,
                    sent_bytes: d.sent_bytes,
                    lag_ms: self.lag_ms(d.disk_id).unwrap_or(0),
                    backlog_lower_bound: d.tracker == "scan"
                        && matches!(state, DiskState::Continuous | DiskState::Lagging),
                }))
            })
            .collect()
    }
}

/// Runs until `shutdown` flips or a fatal error (bad credential, revoked machine).
pub async fn run(
    agent: Arc<Agent>,
    opts: Options,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let ticker = tokio::spawn(status_ticker(agent.clone()));
    let progress = tokio::spawn(crate::progress::report(agent.clone(), opts.progress_every));
    let mut backoff = Duration::from_secs(1);
    let mut tracked = std::collections::HashMap::new();
    let result = loop {
        let started = Instant::now();
        let r = session(&agent, &opts, &mut tracked, &mut shutdown).await;
        match r {
            Ok(()) | Err(RunError::Stopped) => break Ok(()),
            Err(e) if e.is_fatal() => break Err(e),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
                let stalled = match &e {
                    RunError::Conn(ConnError::Stalled(reason)) => Some(reason.clone()),
                    RunError::Conn(ConnError::Frame(rehost_proto::FrameError::Io(io)))
                        if io.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        Some(format!(
                            "the server acknowledged nothing at the TCP level for {} s",
                            (opts.timeouts.stall + opts.timeouts.keepalive).as_secs()
                        ))
                    }
                    _ => None,
                };
                let text = format!("{:#}", anyhow::Error::from(e));
                warn!(error = %text, retry_in = ?backoff, "replication interrupted");
                {
                    let mut s = agent.status();
                    if text.contains(rehost_proto::msg::SHARED_CREDENTIAL) {
                        s.credential_conflict = Some(crate::state::CredentialConflict {
                            at: now(),
                            message: text.clone(),
                        });
                    }
                    s.connection = "reconnecting".into();
                    s.last_error = Some(text);
                    if let Some(reason) = stalled {
                        s.connection = "stalled".into();
                        s.stall = Some(format!("{reason}; reconnecting"));
                        s.last_stall = Some(crate::state::StallReport {
                            at: now(),
                            reason,
                            reconnected: true,
                        });
                    }
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
    progress.abort();
    {
        let mut s = agent.status();
        s.running = false;
        s.connection = if result.is_ok() {
            "stopped".into()
        } else {
            "failed".into()
        };
        s.last_error = result
            .as_ref()
            .err()
            .map(|e| format!("{:#}", anyhow::Error::msg(e.to_string())));
        s.uninstall_offer = result.as_ref().err().and_then(RunError::replication_ended);
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
    block_device: bool,
}

enum Tracker {
    Trace(TraceTracker),
    Scan { last_pass: Option<Instant> },
}

/// A disk's change tracking for the life of this process.
struct Tracked {
    tracker: Tracker,
    /// Blocks taken from the tracker and sent, not yet acknowledged: they go back into the dirty
    /// set if the connection drops.
    pending: Option<DirtySet>,
    /// The tracker (with `pending`) accounts for every difference between the source and what the
    /// server holds, so no rescan is needed.
    vouched: bool,
    /// Why not, when not.
    why_not: String,
    /// A clean-stop bitmap to merge once the server confirms the generation.
    saved: Option<Result<cleanstop::Saved, String>>,
    continuity: Continuity,
    /// The agent's state knew this disk under the server's id.
    known: bool,
}

impl Tracked {
    fn kind(&self) -> &'static str {
        match self.tracker {
            Tracker::Trace(_) => "tracepoint",
            Tracker::Scan { .. } => "scan",
        }
    }

    fn dirty_count(&self) -> u64 {
        match &self.tracker {
            Tracker::Trace(t) => t.dirty.lock().unwrap_or_else(|p| p.into_inner()).count(),
            Tracker::Scan { .. } => 0,
        }
    }
}

/// Starts tracking a disk the first time this process sees it, before any of it is read.
fn track(agent: &Agent, g: &DiskGrant, d: &OpenDisk) -> Tracked {
    let saved = match cleanstop::take(&agent.dir, g.disk_id.0) {
        Ok(s) => s,
        Err(e) => Some(Err(format!("cannot read the saved dirty bitmap: {e}"))),
    };
    let machine = agent
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .machine_id
        .clone();
    let (tracker, continuity) = if d.block_device {
        match TraceTracker::start(
            &TraceTracker::instance_name(&machine, g.disk_id.0),
            &d.path,
            d.size,
            g.block_size,
        ) {
            Ok((t, c)) => (Tracker::Trace(t), c),
            Err(e) => {
                warn!(disk = %g.device, error = %format!("{:#}", anyhow::Error::from(e)), "kernel block tracepoints unavailable; using the scan tracker");
                (Tracker::Scan { last_pass: None }, Continuity::Unbroken)
            }
        }
    } else {
        (Tracker::Scan { last_pass: None }, Continuity::Unbroken)
    };
    info!(disk = %g.device, tracker = match tracker { Tracker::Trace(_) => "tracepoint", _ => "scan" }, "tracking changes");
    Tracked {
        tracker,
        pending: None,
        vouched: false,
        why_not: String::new(),
        saved,
        continuity,
        known: false,
    }
}

/// Decides, on the first grant this process gets for a disk, whether the saved state vouches for
/// the server's copy.
fn first_decision(t: &mut Tracked, g: &DiskGrant, known: bool) {
    t.known = known;
    let saved = t.saved.take();
    let verdict: Result<DirtySet, String> = match saved {
        _ if !known => Err("the server holds data this agent has no state for (reinstalled or state lost)".into()),
        None => Err("the agent did not stop cleanly (no saved dirty bitmap): writes made meanwhile are unknown".into()),
        Some(Err(r)) => Err(r),
        Some(Ok(_)) if g.clean_stop_generation == 0 => {
            Err("the server recorded no clean stop for this disk".into())
        }
        Some(Ok(s)) if s.generation != g.clean_stop_generation => Err(format!(
            "the saved dirty bitmap is generation {:016x}, the server recorded {:016x}",
            s.generation, g.clean_stop_generation
        )),
        Some(Ok(s)) if s.size != g.size_bytes || s.block_size != g.block_size => {
            Err("the saved dirty bitmap is for another disk geometry".into())
        }
        Some(Ok(s)) => match &t.continuity {
            Continuity::Unbroken => Ok(s.dirty),
            Continuity::Broken(r) => Err(r.clone()),
        },
    };
    match verdict {
        Ok(dirty) => {
            if let Tracker::Trace(tr) = &t.tracker {
                tr.dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .merge(&dirty);
            }
            t.pending = None;
            t.vouched = true;
        }
        Err(r) => {
            t.vouched = false;
            t.why_not = r;
        }
    }
}

async fn session(
    agent: &Arc<Agent>,
    opts: &Options,
    tracked: &mut std::collections::HashMap<u64, Tracked>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let state = agent
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let pin = state.pin().ok_or(RunError::BadState("server_pin"))?;
    let secret = state.secret().ok_or(RunError::BadState("machine_secret"))?;
    let machine_id = rehost_proto::MachineId::parse(&state.machine_id)
        .map_err(|_| RunError::BadState("machine_id"))?;
    let mut disks = Vec::new();
    for d in &state.disks {
        let probed = crate::disks::probe(&d.device)?;
        let block_device = crate::tracker::kernel_dev(&d.device).is_some();
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.read(true);
            if block_device {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&d.device)
                .map_err(|e| crate::disks::DiskError::Open(d.device.clone(), e))?
        };
        disks.push(OpenDisk {
            path: d.device.clone(),
            file: Arc::new(file),
            size: probed.size_bytes,
            block_device,
        });
    }
    agent.status().connection = "connecting".into();
    let mut tls = conn::connect_with(&state.server, pin, &opts.timeouts).await?;
    let hello = Hello {
        min_version: rehost_proto::MIN_PROTOCOL_VERSION,
        max_version: rehost_proto::PROTOCOL_VERSION,
        agent_version: crate::VERSION.into(),
        detach: None,
        auth: Auth::Machine { machine_id, secret },
        disks: disks
            .iter()
            .map(|d| DiskInfo {
                device: d.path.display().to_string(),
                size_bytes: d.size,
            })
            .collect(),
    };
    let welcome = conn::handshake(&mut tls, hello).await?;
    let mut conn = Conn::start(tls, opts.max_mbps, opts.timeouts);
    info!(server = %state.server, machine = %welcome.machine_id, "connected");
    {
        let mut s = agent.status();
        s.connection = "connected".into();
        s.last_error = None;
        s.stall = None;
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
                    replicated_bytes: if g.sync_complete {
                        g.size_bytes
                    } else {
                        g.durable_bytes
                    },
                    sent_bytes: prev.map(|p| p.sent_bytes).unwrap_or(0),
                    sent_blocks: prev.map(|p| p.sent_blocks).unwrap_or(0),
                    last_rescan: prev.and_then(|p| p.last_rescan.clone()),
                    tracker: prev.map(|p| p.tracker.clone()).unwrap_or_default(),
                    start: prev.and_then(|p| p.start.clone()),
                    ..Default::default()
                }
            })
            .collect();
    }
    let ticker = {
        let (agent, out, live) = (agent.clone(), conn.sender(), conn.liveness());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                note_slow(&agent, live.slow());
                for m in agent.progress_messages() {
                    if out.try_send(m).is_err() {
                        break;
                    }
                }
            }
        })
    };
    let result = replicate(
        agent,
        opts,
        &mut conn,
        &welcome.disks,
        &disks,
        tracked,
        shutdown,
    )
    .await;
    ticker.abort();
    // Whatever was sent and not acknowledged goes back into the dirty sets for the next session.
    for t in tracked.values_mut() {
        if let (Some(p), Tracker::Trace(tr)) = (t.pending.take(), &t.tracker) {
            tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).merge(&p);
        }
    }
    conn.close().await;
    result
}

async fn replicate(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    grants: &[DiskGrant],
    disks: &[OpenDisk],
    tracked: &mut std::collections::HashMap<u64, Tracked>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut pairs = Vec::new();
    for g in grants {
        let d = disks
            .iter()
            .find(|d| d.path.display().to_string() == g.device)
            .ok_or_else(|| RunError::UnknownGrant(g.device.clone()))?;
        if d.size != g.size_bytes {
            return Err(RunError::Resized(d.path.clone(), g.size_bytes, d.size));
        }
        pairs.push((g, d));
    }
    // Trackers first: from here on no write to these disks goes unseen.
    for (g, d) in &pairs {
        match tracked.entry(g.disk_id.0) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                let local = agent
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .disk(&d.path)
                    .cloned();
                let known = local.as_ref().is_some_and(|l| l.disk_id == g.disk_id.0);
                let mut t = track(agent, g, d);
                first_decision(&mut t, g, known);
                slot.insert(t);
            }
            std::collections::hash_map::Entry::Occupied(_) if g.clean_stop_generation != 0 => {
                // Only a stopping agent sends a clean stop; this one did not stop.
                warn!(disk = %g.device, "the server holds a clean-stop generation this running agent did not send");
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
        }
        let kind = tracked[&g.disk_id.0].kind();
        agent.disk_status(g.disk_id.0, |s| s.tracker = kind.into());
    }
    for (g, d) in &pairs {
        let t = tracked.get_mut(&g.disk_id.0).expect("tracked above");
        let started = Instant::now();
        if g.sync_complete {
            if t.vouched {
                info!(disk = %g.device, dirty_blocks = t.dirty_count(), "resuming continuous replication without a rescan");
                set_start(
                    agent,
                    g,
                    "resume",
                    "the tracker accounts for every change since the server's copy",
                );
            } else {
                let reason = std::mem::take(&mut t.why_not);
                set_start(agent, g, "rescan", &reason);
                rescan(agent, opts, conn, g, d, g.size_bytes, &reason, shutdown).await?;
                send_mark(agent, conn, g, MarkKind::RescanDone).await?;
                t.vouched = true;
            }
        } else {
            // The scan tracker compares every block once the initial sync is done, so an agent
            // that knows the disk can resume it without first rescanning what is below the
            // watermark; kernel tracking cannot see what changed while the agent was down.
            let covered = t.vouched || (t.known && matches!(t.tracker, Tracker::Scan { .. }));
            if g.durable_bytes > 0 && !covered {
                let reason = std::mem::take(&mut t.why_not);
                set_start(agent, g, "rescan", &reason);
                rescan(agent, opts, conn, g, d, g.durable_bytes, &reason, shutdown).await?;
            } else if g.durable_bytes > 0 {
                info!(disk = %g.device, from = g.durable_bytes, "resuming initial sync from the server's durable watermark");
                set_start(
                    agent,
                    g,
                    "resume",
                    "initial sync resumed from the server's durable watermark",
                );
            } else {
                set_start(
                    agent,
                    g,
                    "initial-sync",
                    "the server holds nothing of this disk yet",
                );
            }
            t.vouched = true;
            {
                let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
                st.set_disk(&d.path, g.disk_id.0, Phase::InitialSync);
            }
            agent.save_state()?;
            agent.disk_status(g.disk_id.0, |s| s.state = "initial-sync".into());
            let plan = Plan {
                start: g.durable_bytes,
                end: g.size_bytes,
                block_size: g.block_size,
                known: None,
                blocks: None,
                uncached: d.block_device,
            };
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
        if let Tracker::Scan { last_pass } = &mut t.tracker {
            *last_pass = Some(started);
        }
        agent.disk_status(g.disk_id.0, |s| {
            s.state = "continuous".into();
            s.progress_percent = 100.0;
            s.replicated_bytes = s.size_bytes;
            s.backlog_bytes = 0;
        });
    }
    continuous(agent, opts, conn, &pairs, tracked, shutdown).await
}

/// Shows a server that answers but acknowledges nothing as `stalled` (the connection is kept).
fn note_slow(agent: &Agent, slow: Option<String>) {
    let mut s = agent.status();
    if slow.is_some() && s.stall.is_none() {
        warn!(
            reason = slow.as_deref().unwrap_or_default(),
            "replication stalled"
        );
        s.last_stall = Some(crate::state::StallReport {
            at: now(),
            reason: slow.clone().unwrap_or_default(),
            reconnected: false,
        });
    }
    if s.connection == "connected" || s.connection == "stalled" {
        s.connection = if slow.is_some() {
            "stalled"
        } else {
            "connected"
        }
        .into();
    }
    s.stall = slow;
}

fn set_start(agent: &Agent, g: &DiskGrant, kind: &str, reason: &str) {
    agent.disk_status(g.disk_id.0, |s| {
        s.start = Some(StartReport {
            kind: kind.into(),
            reason: reason.into(),
        })
    });
}

/// Continuous replication until the connection fails or the agent is asked to stop.
async fn continuous(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    pairs: &[(&DiskGrant, &OpenDisk)],
    tracked: &mut std::collections::HashMap<u64, Tracked>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut points = conn.take_points();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ROUND) => {}
            _ = shutdown.changed() => {
                clean_stop(agent, conn, pairs, tracked).await;
                return Err(RunError::Stopped);
            }
            Some((id, max_ms)) = points.recv() => {
                consistency_point(agent, opts, conn, pairs, tracked, id, max_ms, shutdown).await?;
                continue;
            }
            e = conn.closed() => return Err(e.into()),
        }
        for (g, d) in pairs {
            let t = tracked.get_mut(&g.disk_id.0).expect("tracked");
            match &mut t.tracker {
                Tracker::Trace(tr) => {
                    let taken = tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let at = Instant::now();
                    if let Some(reason) = taken.lost.clone() {
                        warn!(disk = %g.device, reason, "change tracking lost events: comparing the whole disk");
                        rescan(agent, opts, conn, g, d, g.size_bytes, &reason, shutdown).await?;
                        send_mark(agent, conn, g, MarkKind::RescanDone).await?;
                        agent.set_consistent(g.disk_id.0, at);
                        agent.disk_status(g.disk_id.0, |s| s.state = "continuous".into());
                        continue;
                    }
                    if taken.count() > 0 {
                        send_round(agent, opts, conn, g, d, &mut t.pending, taken, shutdown)
                            .await?;
                    }
                    agent.set_consistent(g.disk_id.0, at);
                }
                Tracker::Scan { last_pass } => {
                    if last_pass.is_some_and(|l| l.elapsed() < opts.scan_interval) {
                        continue;
                    }
                    let started = Instant::now();
                    let sent = scan_pass(agent, opts, conn, g, d, shutdown).await?;
                    let seq = conn
                        .send_seq(|seq| Message::Mark {
                            seq,
                            disk_id: g.disk_id,
                            kind: MarkKind::RescanDone,
                            generation: 0,
                        })
                        .await?;
                    conn.wait_acked(seq).await?;
                    agent.set_consistent(g.disk_id.0, started);
                    *last_pass = Some(started);
                    if sent > 0 {
                        info!(disk = %g.device, sent_bytes = sent, "scan pass sent changed blocks");
                    }
                }
            }
            let cap = conn.max_mbps();
            agent.status().max_mbps = cap;
            let backlog = t.dirty_count() * u64::from(g.block_size);
            let lag = agent
                .lag_ms(g.disk_id.0)
                .map(Duration::from_millis)
                .unwrap_or_default();
            agent.disk_status(g.disk_id.0, |s| {
                s.backlog_bytes = backlog.min(s.size_bytes);
                s.state = if lag > LAGGING_AFTER {
                    "lagging"
                } else {
                    "continuous"
                }
                .into();
            });
        }
    }
}

/// Sends the blocks of `taken` and waits until the server holds them durably; they stay in
/// `pending` meanwhile, so a dropped connection puts them back into the dirty set. A round not
/// acknowledged for [`STALLED_AFTER`] shows the disk as `stalled`.
#[allow(clippy::too_many_arguments)]
async fn send_round(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    g: &DiskGrant,
    d: &OpenDisk,
    pending: &mut Option<DirtySet>,
    taken: DirtySet,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let started = Instant::now();
    let blocks: Vec<u64> = taken.iter().collect();
    tracing::debug!(disk = %g.device, ?blocks, "sending dirty blocks");
    *pending = Some(taken);
    let plan = Plan {
        start: 0,
        end: g.size_bytes,
        block_size: g.block_size,
        known: None,
        blocks: Some(Arc::new(blocks)),
        uncached: d.block_device,
    };
    stream(agent, opts, conn, g, d, plan, shutdown).await?;
    let last = conn.last_seq();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), conn.wait_acked(last)).await {
            Ok(r) => break r?,
            Err(_) if started.elapsed() > STALLED_AFTER => {
                agent.disk_status(g.disk_id.0, |s| s.state = "stalled".into());
            }
            Err(_) => {}
        }
    }
    *pending = None;
    Ok(())
}

/// Sends what is dirty, in rounds, until a round finds nothing new: every write completed
/// before that moment is then in the stream. `Ok(false)`: not quiet by `deadline`.
#[allow(clippy::too_many_arguments)]
async fn drain_until_quiet(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    pairs: &[(&DiskGrant, &OpenDisk)],
    tracked: &mut std::collections::HashMap<u64, Tracked>,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, RunError> {
    let mut scanned = false;
    loop {
        let mut sent_any = false;
        for (g, d) in pairs {
            let t = tracked.get_mut(&g.disk_id.0).expect("tracked");
            match &t.tracker {
                Tracker::Trace(tr) => {
                    tr.settle().await;
                    let taken = tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(reason) = taken.lost.clone() {
                        // Put the loss back: the continuous loop answers it with a full compare.
                        tr.dirty
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .merge(&taken);
                        warn!(disk = %g.device, reason, "no consistency point: change tracking lost events");
                        return Ok(false);
                    }
                    if taken.count() > 0 {
                        sent_any = true;
                        send_round(agent, opts, conn, g, d, &mut t.pending, taken, shutdown)
                            .await?;
                    }
                }
                Tracker::Scan { .. } if !scanned => {
                    scan_pass(agent, opts, conn, g, d, shutdown).await?;
                    conn.wait_acked(conn.last_seq()).await?;
                }
                Tracker::Scan { .. } => {}
            }
        }
        scanned = true;
        if !sent_any {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A consistency point the server asked for: freeze the filesystems on the machine's disks (or,
/// with none, wait for a quiet moment), drain what is dirty, mark the point in the stream, thaw.
#[allow(clippy::too_many_arguments)]
async fn consistency_point(
    agent: &Arc<Agent>,
    opts: &Options,
    conn: &mut Conn,
    pairs: &[(&DiskGrant, &OpenDisk)],
    tracked: &mut std::collections::HashMap<u64, Tracked>,
    id: u64,
    max_ms: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    use rehost_proto::msg::PointConsistency;
    let cap = Duration::from_millis(u64::from(max_ms.clamp(10, 60_000)));
    let block_disks: Vec<PathBuf> = pairs
        .iter()
        .filter(|(_, d)| d.block_device)
        .map(|(_, d)| d.path.clone())
        .collect();
    let all_scanned = pairs
        .iter()
        .all(|(g, _)| matches!(tracked[&g.disk_id.0].tracker, Tracker::Scan { .. }));
    let mounts = crate::freeze::mounts_on(&block_disks);
    let mut frozen = None;
    let mut note = String::new();
    if !mounts.is_empty() {
        let paths: Vec<PathBuf> = mounts.iter().map(|(p, _)| p.clone()).collect();
        // This very binary even when an upgrade has replaced its file since it started.
        let exe = PathBuf::from("/proc/self/exe");
        let marker = agent.dir.join(crate::freeze::FREEZE_FILE);
        match tokio::task::spawn_blocking(move || {
            crate::freeze::Frozen::freeze(&paths, cap, &exe, Some(&marker))
        })
        .await
        {
            Ok(Ok(f)) => frozen = Some(f),
            Ok(Err(e)) => note = format!("{:#}; ", anyhow::Error::from(e)),
            Err(e) => note = format!("freeze: {e}; "),
        }
    }
    let deadline = Instant::now()
        + if frozen.is_some() {
            cap
        } else {
            Duration::from_secs(10)
        };
    let quiet = drain_until_quiet(agent, opts, conn, pairs, tracked, deadline, shutdown).await;
    let app = frozen.as_ref().is_some_and(|f| !f.expired());
    let consistency = if app {
        PointConsistency::App
    } else {
        PointConsistency::Crash
    };
    let described: Vec<String> = mounts
        .iter()
        .map(|(p, t)| format!("{} ({t})", p.display()))
        .collect();
    let result = match quiet {
        Ok(true) => {
            // Nothing is sent between the quiet drain and the point, so the stream up to the
            // point holds the disks as they were at that frozen (or quiet) moment; thawing
            // before queueing the point keeps the freeze short.
            let held = frozen.as_mut().map(|f| f.thaw());
            let freeze_ms = held.map(|h| h.as_millis() as u32).unwrap_or(0);
            note.push_str(&match (app, held) {
                (true, _) => format!("froze {} for {freeze_ms} ms", described.join(", ")),
                (false, Some(_)) => {
                    format!(
                        "the freeze of {} reached its {} ms cap: crash-consistent point",
                        described.join(", "),
                        cap.as_millis()
                    )
                }
                (false, None) if all_scanned => {
                    "no kernel change tracking: point after a full compare pass".to_string()
                }
                (false, None) => {
                    "no freezable filesystem: point at a quiet moment (crash-consistent)"
                        .to_string()
                }
            });
            info!(point = id, consistency = ?consistency, freeze_ms, note, "consistency point marked");
            let text = note.clone();
            let r = conn
                .send_seq(|seq| Message::Point {
                    seq,
                    id,
                    consistency,
                    freeze_ms,
                    note: text,
                })
                .await;
            let kind = if app { "app" } else { "crash" };
            agent.status().last_point = Some(crate::state::PointReport {
                at: now(),
                consistency: kind.into(),
                freeze_ms,
                note,
            });
            r.map(drop).map_err(RunError::from)
        }
        Ok(false) => {
            if let Some(f) = frozen.as_mut() {
                f.thaw();
            }
            warn!(point = id, "no quiet moment for a consistency point; the server falls back to a point of the stream");
            Ok(())
        }
        Err(e) => Err(e),
    };
    drop(frozen);
    result
}

/// On a clean stop: saves what is still dirty under a fresh generation and tells the server, so
/// the next start needs no rescan. Kernel trace instances go on recording meanwhile.
async fn clean_stop(
    agent: &Arc<Agent>,
    conn: &mut Conn,
    pairs: &[(&DiskGrant, &OpenDisk)],
    tracked: &mut std::collections::HashMap<u64, Tracked>,
) {
    for (g, _) in pairs {
        let Some(t) = tracked.get_mut(&g.disk_id.0) else {
            continue;
        };
        if !t.vouched {
            continue;
        }
        let mut dirty = match &mut t.tracker {
            Tracker::Trace(tr) => {
                tr.stop();
                tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take()
            }
            Tracker::Scan { .. } => DirtySet::new(g.size_bytes, g.block_size),
        };
        if let Some(p) = t.pending.take() {
            dirty.merge(&p);
        }
        if let Some(reason) = &dirty.lost {
            warn!(disk = %g.device, reason, "events were lost: the next start will rescan");
            continue;
        }
        let mut generation = 0u64;
        while generation == 0 {
            let mut b = [0u8; 8];
            rehost_proto::random_bytes(&mut b);
            generation = u64::from_le_bytes(b);
        }
        let count = dirty.count();
        let saved = cleanstop::Saved {
            disk_id: g.disk_id.0,
            generation,
            size: g.size_bytes,
            block_size: g.block_size,
            dirty,
        };
        if let Err(e) = cleanstop::save(&agent.dir, &saved) {
            warn!(disk = %g.device, error = %e, "cannot save the dirty bitmap: the next start will rescan");
            continue;
        }
        let told = async {
            let seq = conn
                .send_seq(|seq| Message::Mark {
                    seq,
                    disk_id: g.disk_id,
                    kind: MarkKind::CleanStop,
                    generation,
                })
                .await?;
            conn.wait_acked(seq).await
        };
        match tokio::time::timeout(Duration::from_secs(10), told).await {
            Ok(Ok(())) => {
                info!(disk = %g.device, dirty_blocks = count, generation = format!("{generation:016x}"), "clean stop recorded: the next start resumes without a rescan")
            }
            Ok(Err(e)) => {
                warn!(disk = %g.device, error = %e, "the server did not record the clean stop: the next start will rescan")
            }
            Err(_) => {
                warn!(disk = %g.device, "the server did not acknowledge the clean stop in time: the next start will rescan")
            }
        }
    }
}

async fn send_mark(
    agent: &Arc<Agent>,
    conn: &mut Conn,
    g: &DiskGrant,
    kind: MarkKind,
) -> Result<(), RunError> {
    let seq = conn
        .send_seq(|seq| Message::Mark {
            seq,
            disk_id: g.disk_id,
            kind,
            generation: 0,
        })
        .await?;
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
        s.last_rescan = Some(RescanReport {
            reason: reason.into(),
            ..Default::default()
        });
    });
    let before = agent
        .disk_status(g.disk_id.0, |s| (s.sent_bytes, s.sent_blocks))
        .unwrap_or_default();
    compare_range(agent, opts, conn, g, d, upto, shutdown).await?;
    let (bytes, blocks) = agent
        .disk_status(g.disk_id.0, |s| (s.sent_bytes, s.sent_blocks))
        .unwrap_or_default();
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
    let before = agent
        .disk_status(g.disk_id.0, |s| s.sent_bytes)
        .unwrap_or_default();
    compare_range(agent, opts, conn, g, d, g.size_bytes, shutdown).await?;
    Ok(agent
        .disk_status(g.disk_id.0, |s| s.sent_bytes)
        .unwrap_or_default()
        - before)
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
        let plan = Plan {
            start: b * bs,
            end,
            block_size: g.block_size,
            known: Some(Arc::new(known)),
            blocks: None,
            uncached: d.block_device,
        };
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
    // (sequence, end offset, block bytes) of frames not yet acknowledged, to show durable
    // progress and a compare pass's backlog.
    let mut inflight = std::collections::VecDeque::new();
    let disk_id = g.disk_id;
    while let Some(next) = segments.recv().await {
        if *shutdown.borrow() {
            return Err(RunError::Stopped);
        }
        let seg = next
            .await
            .map_err(|_| RunError::BadState("pipeline worker stopped"))?;
        let seg = seg.map_err(|e| RunError::Read(d.path.clone(), plan.start, e))?;
        let (mut bytes, mut blocks) = (0u64, 0u64);
        for item in seg.items {
            match item {
                Item::Zero { offset, length } => match zero {
                    Some((o, l)) if o + l == offset && l < MAX_ZERO_RUN => {
                        zero = Some((o, l + length))
                    }
                    _ => {
                        if let Some((o, l)) = zero.take() {
                            let seq = conn
                                .send_seq(|seq| Message::Zero {
                                    seq,
                                    disk_id,
                                    offset: o,
                                    length: l,
                                })
                                .await?;
                            inflight.push_back((seq, o + l, 0));
                        }
                        zero = Some((offset, length));
                    }
                },
                Item::Block {
                    offset,
                    length,
                    hash,
                    compression,
                    payload,
                } => {
                    if let Some((o, l)) = zero.take() {
                        let seq = conn
                            .send_seq(|seq| Message::Zero {
                                seq,
                                disk_id,
                                offset: o,
                                length: l,
                            })
                            .await?;
                        inflight.push_back((seq, o + l, 0));
                    }
                    bytes += payload.len() as u64;
                    blocks += 1;
                    let seq = conn
                        .send_seq(|seq| {
                            Message::Block(Block {
                                seq,
                                disk_id,
                                offset,
                                length,
                                hash,
                                compression,
                                payload,
                            })
                        })
                        .await?;
                    inflight.push_back((seq, offset + u64::from(length), u64::from(length)));
                }
            }
        }
        let acked = conn.acked();
        let mut durable = None;
        while inflight.front().is_some_and(|(s, _, _)| *s <= acked) {
            durable = inflight.pop_front().map(|(_, e, _)| e);
        }
        // Changed blocks a compare pass found that the server does not hold durably yet.
        let found_unacked: u64 = inflight.iter().map(|(_, _, n)| n).sum();
        let done = seg.offset + seg.len;
        agent.disk_status(g.disk_id.0, |s| {
            s.sent_bytes += bytes;
            s.sent_blocks += blocks;
            if initial {
                if let Some(e) = durable {
                    s.replicated_bytes = s.replicated_bytes.max(e);
                }
                s.progress_percent =
                    (s.replicated_bytes as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                s.backlog_bytes = g.size_bytes - s.replicated_bytes.min(g.size_bytes);
            } else if s.state == "rescan" {
                s.progress_percent = (done as f64 * 1000.0 / g.size_bytes as f64).floor() / 10.0;
                s.backlog_bytes = g.size_bytes - done;
            } else {
                s.backlog_bytes = found_unacked;
            }
        });
    }
    if let Some((o, l)) = zero.take() {
        conn.send_seq(|seq| Message::Zero {
            seq,
            disk_id,
            offset: o,
            length: l,
        })
        .await?;
    }
    Ok(())
}
