//! `rehost-server`: the staging side of replication.
//!
//! - [`pki`]: CA, TLS certificate and admin credential in the data dir;
//! - [`private`]: file modes of the data dir (0700 / 0600), checked and fixed at start;
//! - [`catalog`]: tokens, machines, disks in SQLite;
//! - [`auth`]: who may register or connect as which machine (install and reinstall tokens,
//!   revocation), and why a live session is ended;
//! - [`volume`]: sparse staging volumes and their per-block hash index;
//! - [`session`]: one agent connection (handshake, checks, stream);
//! - [`writer`]: the per-connection durability thread (verify, pwrite, group commit, ack);
//! - [`live`]: what connected agents report;
//! - [`admission`]: caps and shedding of connections that have not logged in, the open-file limit;
//! - [`api`]: the admin HTTP/JSON API the operator commands use (its request and reply types in
//!   [`api::model`]), Prometheus metrics, and where it listens ([`api::tls`]);
//! - [`metrics`]: the Prometheus text encoder the metrics page is written with;
//! - [`cli`]: the operator commands (`rehost-server ...`), the admin API's client side;
//! - [`human`]: sizes and times as the operator commands and job logs print them;
//! - [`store`]: the content-addressed snapshot store and its garbage collection;
//! - [`snapshot`]: recovery points (take, export, verify, select);
//! - [`retention`]: retention policies and the snapshot scheduler;
//! - [`launch`]: blueprints, test and cutover jobs, the machine lifecycle;
//! - [`plan`]: recovery plans (named, ordered sets of machines recovered together).
//!
//! [`run`] takes its listeners and a shutdown signal, so tests can bind port 0.

pub mod admission;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod failpoint;
pub mod human;
pub mod launch;
pub mod live;
pub mod metrics;
pub mod pki;
pub mod plan;
pub mod private;
pub mod retention;
pub mod session;
pub mod snapshot;
pub mod states;
pub mod store;
pub mod task;
pub mod volume;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rehost_proto::MachineId;
use tokio::net::TcpListener;

/// Per-machine session slot: at most one live session writes a machine's volumes.
pub struct Slot {
    pub lock: Arc<tokio::sync::Mutex<()>>,
    /// Ends the live session with a reason (replaced, revoked, stopped).
    pub kick: auth::Kicker,
    /// The live session's writer queue, for snapshots at a point of its stream.
    jobs: Mutex<Option<tokio::sync::mpsc::WeakSender<writer::Job>>>,
    /// The live session's frames to its agent (weak, like `jobs`).
    agent: Mutex<Option<tokio::sync::mpsc::WeakSender<rehost_proto::Message>>>,
    /// Consistency points asked of the agent and not yet marked in its stream.
    points: Pending<PendingPoint>,
    /// Source actions (planned failover) asked of the agent and not yet answered.
    actions: Pending<ActionReply>,
}

/// Requests asked of an agent and not yet answered, by the id sent with each (ids start at 1).
struct Pending<V>(Mutex<(u64, HashMap<u64, V>)>);

impl<V> Default for Pending<V> {
    fn default() -> Self {
        Pending(Mutex::new((0, HashMap::new())))
    }
}

impl<V> Pending<V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, V>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `v` under a new id, and returns the id.
    fn insert(&self, v: V) -> u64 {
        let mut p = self.lock();
        p.0 += 1;
        let id = p.0;
        p.1.insert(id, v);
        id
    }

    /// The request `id`, if it is still awaited.
    fn take(&self, id: u64) -> Option<V> {
        self.lock().1.remove(&id)
    }

    /// Drops every pending request: their requesters hear at once that no answer comes.
    fn clear(&self) {
        self.lock().1.clear();
    }
}

/// Where the agent's answer to a source action goes: whether it succeeded, and what it said.
pub type ActionReply = tokio::sync::oneshot::Sender<(bool, String)>;

/// A consistency point the server asked an agent for.
pub struct PendingPoint {
    pub reason: String,
    pub reply:
        tokio::sync::oneshot::Sender<Result<snapshot::SnapshotInfo, snapshot::SnapshotError>>,
    /// A group point's barrier: told when the agent's mark arrives, before the snapshot is taken.
    pub marked: Option<tokio::sync::oneshot::Sender<PointMarked>>,
}

/// Where the snapshot of a requested point comes, once taken.
pub type SnapshotReply =
    tokio::sync::oneshot::Receiver<Result<snapshot::SnapshotInfo, snapshot::SnapshotError>>;

/// An agent's mark of a consistency point, as the session read it.
#[derive(Debug)]
pub struct PointMarked {
    pub consistency: rehost_proto::msg::PointConsistency,
    /// How long the agent's filesystems had been frozen at the mark.
    pub freeze_ms: u32,
    pub note: String,
    pub at: std::time::Instant,
}

impl Slot {
    /// Called by a session once its writer runs; held weakly, so the writer still ends when the
    /// session drops its sender.
    pub fn attach_jobs(&self, jobs: &tokio::sync::mpsc::Sender<writer::Job>) {
        *self.jobs.lock().unwrap_or_else(|p| p.into_inner()) = Some(jobs.downgrade());
    }

    /// Called by a session once it can send frames to its agent.
    pub fn attach_agent(&self, out: &tokio::sync::mpsc::Sender<rehost_proto::Message>) {
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(out.downgrade());
    }

    /// The live session's frames to its agent, if a session is running.
    pub fn agent(&self) -> Option<tokio::sync::mpsc::Sender<rehost_proto::Message>> {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|w| w.upgrade())
    }

    /// Registers a point to ask the agent for; returns its id and where its snapshot will come.
    pub fn expect_point(
        &self,
        reason: &str,
    ) -> (
        u64,
        tokio::sync::oneshot::Receiver<Result<snapshot::SnapshotInfo, snapshot::SnapshotError>>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.points.insert(PendingPoint {
            reason: reason.to_string(),
            reply: tx,
            marked: None,
        });
        (id, rx)
    }

    /// [`Slot::expect_point`] for a group point: also says when the agent's mark arrives.
    pub fn expect_group_point(
        &self,
        reason: &str,
    ) -> (
        u64,
        tokio::sync::oneshot::Receiver<PointMarked>,
        SnapshotReply,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mtx, mrx) = tokio::sync::oneshot::channel();
        let id = self.points.insert(PendingPoint {
            reason: reason.to_string(),
            reply: tx,
            marked: Some(mtx),
        });
        (id, mrx, rx)
    }

    /// The pending point `id`, if it is still awaited.
    pub fn take_point(&self, id: u64) -> Option<PendingPoint> {
        self.points.take(id)
    }

    pub fn forget_point(&self, id: u64) {
        self.take_point(id);
    }

    /// Drops every pending point and source action (their requesters hear at once that no
    /// answer comes): the session ended.
    pub fn clear_points(&self) {
        self.points.clear();
        self.actions.clear();
    }

    /// Registers a source action to send to the agent; returns its id and where the answer comes.
    pub fn expect_action(&self) -> (u64, tokio::sync::oneshot::Receiver<(bool, String)>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (self.actions.insert(tx), rx)
    }

    /// The pending source action `id`, if it is still awaited.
    pub fn take_action(&self, id: u64) -> Option<ActionReply> {
        self.actions.take(id)
    }

    /// The live session's writer queue, if a session is running.
    pub fn jobs(&self) -> Option<tokio::sync::mpsc::Sender<writer::Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|w| w.upgrade())
    }
}

/// `serve --max-disk-size` by default: 64 TiB.
pub const DEFAULT_MAX_DISK_SIZE: u64 = 64 << 40;

pub struct Shared {
    pub data_dir: PathBuf,
    pub catalog: catalog::Catalog,
    pub pki: pki::Pki,
    pub admin_token: String,
    pub live: live::Live,
    pub block_size: u32,
    /// The largest disk an agent may declare (`serve --max-disk-size`).
    pub max_disk_size: std::sync::atomic::AtomicU64,
    pub store: store::Store,
    slots: Mutex<HashMap<MachineId, Arc<Slot>>>,
}

impl Shared {
    pub fn volume_dir(&self, machine: &MachineId) -> PathBuf {
        self.data_dir.join("volumes").join(machine.as_str())
    }

    pub fn slot(&self, machine: &MachineId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(machine.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    kick: auth::Kicker::default(),
                    jobs: Mutex::new(None),
                    agent: Mutex::new(None),
                    points: Pending::default(),
                    actions: Pending::default(),
                })
            })
            .clone()
    }
}

/// First pause of the accept loop after an accept error; it doubles up to the maximum while
/// accepts keep failing.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// Unauthenticated connections closed at once when `accept` finds no descriptor free, and beyond
/// what brings an accepted connection's descriptor number back out of the reserve.
const SHED_BATCH: usize = 8;

/// Opens (or initialises) the data dir: PKI, admin credential, catalog.
pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Shared>> {
    private::create_dir_all(data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    private::check_data_dir(data_dir)
        .with_context(|| format!("check the file modes of data dir {}", data_dir.display()))?;
    let pki = pki::load_or_create(data_dir).context("load server certificates")?;
    let admin_token = pki::admin_token(data_dir).context("load admin credential")?;
    pki::metrics_token(data_dir, false).context("load the metrics token")?;
    let catalog =
        catalog::Catalog::open(&data_dir.join("catalog.sqlite")).context("open catalog")?;
    let store = store::Store::open(&data_dir.join("store")).context("open snapshot store")?;
    let unfinished = catalog
        .remove_unfinished_snapshots()
        .context("remove unfinished snapshots")?;
    if !unfinished.is_empty() {
        tracing::warn!(snapshots = ?unfinished, "removed snapshots a crash left unfinished; GC reclaims their data");
    }
    let shared = Arc::new(Shared {
        data_dir: data_dir.to_path_buf(),
        catalog,
        pki,
        admin_token,
        live: live::Live::default(),
        block_size: rehost_proto::DEFAULT_BLOCK_SIZE,
        max_disk_size: DEFAULT_MAX_DISK_SIZE.into(),
        store,
        slots: Mutex::new(HashMap::new()),
    });
    launch::recover(&shared).context("clean up launch jobs a stop interrupted")?;
    plan::run::recover(&shared).context("end the plan runs a stop interrupted")?;
    Ok(shared)
}

/// Serves agents on `listener` and the admin API on `admin` until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: api::tls::Endpoint,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_limits(
        shared,
        listener,
        admin,
        admission::Limits::default(),
        shutdown,
    )
    .await
}

/// [`run`] with caps on the connections that have not logged in yet.
pub async fn run_with_limits(
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: api::tls::Endpoint,
    limits: admission::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = {
        let mut stop = stop_rx.clone();
        let stop = async move {
            let _ = stop.changed().await;
        };
        tokio::spawn(admin.serve(shared.clone(), stop))
    };
    tokio::pin!(shutdown);
    let admission = admission::Admission::new(limits);
    let fd_limit = admission::nofile_soft_limit().context("read the open-file limit")?;
    let fd_reserve = admission::fd_reserve(fd_limit);
    let mut sessions = tokio::task::JoinSet::new();
    // After an accept error: when to try again, and how long the next pause is.
    let mut paused: Option<tokio::time::Instant> = None;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut trim = tokio::time::interval(std::time::Duration::from_secs(2));
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resume = paused.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            accepted = listener.accept(), if paused.is_none() => match accepted {
                Ok((tcp, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp) as u64;
                    // Descriptors are allocated lowest first: this one's number is a floor on how
                    // many are open.
                    if fd + fd_reserve >= fd_limit {
                        // Enough to leave the reserve again (and some slack: the flood that
                        // filled it goes on), so volumes and the catalog still find descriptors.
                        let excess = (fd + fd_reserve - fd_limit) as usize + 1;
                        let shed = admission.shed_oldest(excess + SHED_BATCH);
                        if let Some(held) = admission.pressure_log.check() {
                            tracing::warn!(fd, fd_limit, shed, held_back = held, "near the open-file limit: closing the oldest connections that have not logged in");
                        }
                    }
                    match admission.admit(peer.ip()) {
                        Ok(ticket) => {
                            sessions.spawn(session::serve(shared.clone(), tcp, peer, stop_rx.clone(), ticket));
                        }
                        Err(refusal) => {
                            drop(tcp);
                            if let Some(held) = admission.refused_log.check() {
                                tracing::warn!(%peer, held_back = held, unauthenticated = admission.unauthenticated(), "connection closed at once: {}", refusal.as_str());
                            }
                        }
                    }
                }
                Err(e) => {
                    let starved = admission::out_of_descriptors(&e);
                    let shed = if starved { admission.shed_oldest(SHED_BATCH) } else { 0 };
                    if let Some(held) = admission.pressure_log.check() {
                        tracing::warn!(error = %e, shed, pause_ms = backoff.as_millis() as u64, held_back = held, "accept failed");
                    }
                    paused = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = tokio::time::sleep_until(resume), if paused.is_some() => paused = None,
            _ = trim.tick() => if admission.memory_to_give_back() {
                tokio::task::spawn_blocking(admission::give_back_memory);
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Sessions stop reading and their writers commit what they hold.
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("sessions still running after 30 s; exiting anyway");
    }
    admin_task
        .await
        .context("admin API task")?
        .context("admin API")?;
    Ok(())
}
