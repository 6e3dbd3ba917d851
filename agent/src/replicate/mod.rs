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
//!
//! The phases, each a module around [`DiskRun`] (one disk of a session):
//! - [`status`]: the status model shared with the status file and the server's `Progress`;
//! - [`start`]: change tracking and how a disk starts (initial sync, resume or rescan);
//! - [`stream`]: streaming plans through the pipeline, rescans, scan passes, dirty rounds;
//! - [`points`]: consistency points (freeze, drain until quiet, mark);
//! - [`stop`]: the clean stop (dirty bitmap saved, generation told to the server).

mod points;
mod start;
mod status;
mod stop;
mod stream;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::msg::{Auth, DiskGrant, Mark, MarkKind, ReplicationState};
use rehost_proto::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::conn::{self, Conn, ConnError};
use crate::state::{ConnectionState, DiskStatus, StateError};
use start::{Tracked, Tracker};

pub use status::Agent;

/// Lag above which a continuous disk shows as `lagging`.
const LAGGING_AFTER: Duration = Duration::from_secs(10);
/// A round not acknowledged for this long shows the disk as `stalled`.
const STALLED_AFTER: Duration = Duration::from_secs(30);
const ROUND: Duration = Duration::from_millis(100);
/// The target of every phase's log lines: this module's, as before the phases had modules.
const LOG: &str = module_path!();

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

/// Runs until `shutdown` flips or a fatal error (bad credential, revoked machine).
pub async fn run(
    agent: Arc<Agent>,
    opts: Options,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let ticker = tokio::spawn(status_ticker(agent.clone()));
    let progress = tokio::spawn(crate::progress::report(agent.clone(), opts.progress_every));
    let mut backoff = Duration::from_secs(1);
    let mut tracked = HashMap::new();
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
                    s.connection = ConnectionState::Reconnecting;
                    s.last_error = Some(text);
                    if let Some(reason) = stalled {
                        s.connection = ConnectionState::Stalled;
                        s.stall = Some(format!("{reason}; reconnecting"));
                        s.last_stall = Some(crate::state::StallReport {
                            at: now(),
                            reason,
                            reconnected: true,
                        });
                    }
                    for d in &mut s.disks {
                        d.state = ReplicationState::Disconnected;
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
            ConnectionState::Stopped
        } else {
            ConnectionState::Failed
        };
        s.last_error = result
            .as_ref()
            .err()
            .map(|e| format!("{:#}", anyhow::Error::msg(e.to_string())));
        s.uninstall_offer = result.as_ref().err().and_then(RunError::replication_ended);
        for d in &mut s.disks {
            d.state = ReplicationState::Disconnected;
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

/// What every phase of one session works with: the agent, its options, the connection to the
/// server and the stop signal.
struct Link<'a> {
    agent: &'a Arc<Agent>,
    opts: &'a Options,
    conn: &'a mut Conn,
    shutdown: &'a mut watch::Receiver<bool>,
}

impl<'a> Link<'a> {
    /// One disk of this session, to run a phase on.
    fn disk<'s>(
        &'s mut self,
        g: &'s DiskGrant,
        d: &'s OpenDisk,
        t: &'s mut Tracked,
    ) -> DiskRun<'s, 'a> {
        DiskRun {
            link: self,
            g,
            d,
            t,
        }
    }
}

/// One disk of a session: the server's grant, the open device and its change tracking, with the
/// session's [`Link`]. The phases are its methods.
struct DiskRun<'s, 'a> {
    link: &'s mut Link<'a>,
    g: &'s DiskGrant,
    d: &'s OpenDisk,
    t: &'s mut Tracked,
}

impl DiskRun<'_, '_> {
    fn agent(&self) -> &Arc<Agent> {
        self.link.agent
    }

    fn set_state(&self, state: ReplicationState) {
        self.agent().set_state(self.g, state);
    }
}

async fn session(
    agent: &Arc<Agent>,
    opts: &Options,
    tracked: &mut HashMap<u64, Tracked>,
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
        let file = crate::direct::open_read(&d.device, block_device)
            .map_err(|e| crate::disks::DiskError::Open(d.device.clone(), e))?;
        disks.push(OpenDisk {
            path: d.device.clone(),
            file: Arc::new(file),
            size: probed.size_bytes,
            block_device,
        });
    }
    agent.status().connection = ConnectionState::Connecting;
    let mut tls = conn::connect_with(&state.server, pin, &opts.timeouts).await?;
    let hello = conn::hello(
        Auth::Machine { machine_id, secret },
        disks.iter().map(|d| (d.path.as_path(), d.size)),
    );
    let welcome = conn::handshake(&mut tls, hello).await?;
    let mut conn = Conn::start(tls, opts.max_mbps, opts.timeouts);
    info!(server = %state.server, machine = %welcome.machine_id, "connected");
    {
        let mut s = agent.status();
        s.connection = ConnectionState::Connected;
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
                    state: ReplicationState::Connecting,
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
                agent.note_slow(live.slow());
                for m in agent.progress_messages() {
                    if out.try_send(m).is_err() {
                        break;
                    }
                }
            }
        })
    };
    let mut link = Link {
        agent,
        opts,
        conn: &mut conn,
        shutdown,
    };
    let result = link.replicate(&welcome.disks, &disks, tracked).await;
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

impl Link<'_> {
    async fn replicate(
        &mut self,
        grants: &[DiskGrant],
        disks: &[OpenDisk],
        tracked: &mut HashMap<u64, Tracked>,
    ) -> Result<(), RunError> {
        let agent = self.agent;
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
                    let mut t = start::track(agent, g, d);
                    t.first_decision(g, known);
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
            self.disk(g, d, t).start().await?;
        }
        self.continuous(&pairs, tracked).await
    }

    /// Continuous replication until the connection fails or the agent is asked to stop.
    async fn continuous(
        &mut self,
        pairs: &[(&DiskGrant, &OpenDisk)],
        tracked: &mut HashMap<u64, Tracked>,
    ) -> Result<(), RunError> {
        let mut points = self.conn.take_points();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = self.shutdown.changed() => return self.stop_cleanly(pairs, tracked).await,
                Some(ask) = points.recv() => {
                    self.consistency_point(pairs, tracked, ask).await?;
                    continue;
                }
                e = self.conn.closed() => return Err(e.into()),
            }
            for (g, d) in pairs {
                let t = tracked.get_mut(&g.disk_id.0).expect("tracked");
                match self.disk(g, d, t).round().await {
                    // Asked to stop while a round streamed: the round's blocks are still
                    // pending, so the clean stop saves them with the rest.
                    Err(RunError::Stopped) => return self.stop_cleanly(pairs, tracked).await,
                    r => r?,
                }
            }
        }
    }

    /// The clean stop of every disk (see `stop.rs`), then [`RunError::Stopped`].
    async fn stop_cleanly(
        &mut self,
        pairs: &[(&DiskGrant, &OpenDisk)],
        tracked: &mut HashMap<u64, Tracked>,
    ) -> Result<(), RunError> {
        for (g, d) in pairs {
            if let Some(t) = tracked.get_mut(&g.disk_id.0) {
                self.disk(g, d, t).clean_stop().await;
            }
        }
        Err(RunError::Stopped)
    }
}

impl DiskRun<'_, '_> {
    /// One round of continuous replication of this disk: what its tracker found since the last
    /// round (or, with the scan tracker, a pass once `scan_interval` is up), then its backlog
    /// and state.
    async fn round(&mut self) -> Result<(), RunError> {
        let (g, agent) = (self.g, self.link.agent);
        match &mut self.t.tracker {
            Tracker::Trace(tr) => {
                let taken = tr.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
                let at = Instant::now();
                if let Some(reason) = taken.lost.clone() {
                    warn!(disk = %g.device, reason, "change tracking lost events: comparing the whole disk");
                    // Until the comparison is done, nothing vouches for the server's copy: a
                    // stop half-way leaves the next start to rescan.
                    self.t.distrust(&reason);
                    self.rescan(g.size_bytes, &reason).await?;
                    self.send_mark(MarkKind::RescanDone).await?;
                    self.t.vouched = true;
                    agent.set_consistent(g.disk_id.0, at);
                    self.set_state(ReplicationState::Continuous);
                    return Ok(());
                }
                if taken.count() > 0 {
                    self.send_round(taken).await?;
                }
                agent.set_consistent(g.disk_id.0, at);
            }
            Tracker::Scan { last_pass } => {
                if last_pass.is_some_and(|l| l.elapsed() < self.link.opts.scan_interval) {
                    return Ok(());
                }
                let started = Instant::now();
                let sent = self.scan_pass().await?;
                let conn = &mut *self.link.conn;
                let seq = conn
                    .send_seq(|seq| {
                        Message::Mark(Mark {
                            seq,
                            disk_id: g.disk_id,
                            kind: MarkKind::RescanDone,
                            generation: 0,
                        })
                    })
                    .await?;
                conn.wait_acked(seq).await?;
                agent.set_consistent(g.disk_id.0, started);
                if let Tracker::Scan { last_pass } = &mut self.t.tracker {
                    *last_pass = Some(started);
                }
                if sent.bytes > 0 {
                    info!(disk = %g.device, sent_bytes = sent.bytes, "scan pass sent changed blocks");
                }
            }
        }
        let cap = self.link.conn.max_mbps();
        agent.status().max_mbps = cap;
        let backlog = self.t.dirty_count() * u64::from(g.block_size);
        let lag = agent
            .lag_ms(g.disk_id.0)
            .map(Duration::from_millis)
            .unwrap_or_default();
        agent.disk_status(g.disk_id.0, |s| {
            s.backlog_bytes = backlog.min(s.size_bytes);
            s.state = if lag > LAGGING_AFTER {
                ReplicationState::Lagging
            } else {
                ReplicationState::Continuous
            };
        });
        Ok(())
    }
}
