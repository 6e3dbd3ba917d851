//! `rehost-server`: the staging side of replication.
//!
//! - [`pki`]: CA, TLS certificate and admin credential in the data dir;
//! - [`catalog`]: tokens, machines, disks in SQLite;
//! - [`volume`]: sparse staging volumes and their per-block hash index;
//! - [`session`]: one agent connection (handshake, checks, stream);
//! - [`writer`]: the per-connection durability thread (verify, pwrite, group commit, ack);
//! - [`live`]: what connected agents report;
//! - [`admin`]: the admin HTTP/JSON API the operator commands use, and Prometheus metrics;
//! - [`client`]: the operator commands' side of the admin API;
//! - [`human`]: sizes and times as the operator commands and job logs print them;
//! - [`store`]: the content-addressed snapshot store and its garbage collection;
//! - [`snapshot`]: recovery points (take, export, verify) and their admin API;
//! - [`retention`]: retention policies and the snapshot scheduler;
//! - [`launch`]: blueprints, test and cutover jobs, the machine lifecycle.
//!
//! [`run`] takes its listeners and a shutdown signal, so tests can bind port 0.

pub mod admin;
pub mod catalog;
pub mod client;
pub mod failpoint;
pub mod human;
pub mod launch;
pub mod live;
pub mod pki;
pub mod retention;
pub mod session;
pub mod snapshot;
pub mod store;
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
    pub kick: Arc<tokio::sync::Notify>,
    /// The live session's writer queue, for snapshots at a point of its stream.
    jobs: Mutex<Option<tokio::sync::mpsc::WeakSender<writer::Job>>>,
    /// The live session's frames to its agent (weak, like `jobs`).
    agent: Mutex<Option<tokio::sync::mpsc::WeakSender<rehost_proto::Message>>>,
    /// Consistency points asked of the agent and not yet marked in its stream.
    points: Mutex<(u64, HashMap<u64, PendingPoint>)>,
    /// Source actions (planned failover) asked of the agent and not yet answered.
    actions: Mutex<(u64, HashMap<u64, ActionReply>)>,
}

/// Where the agent's answer to a source action goes: whether it succeeded, and what it said.
pub type ActionReply = tokio::sync::oneshot::Sender<(bool, String)>;

/// A consistency point the server asked an agent for.
pub struct PendingPoint {
    pub reason: String,
    pub reply:
        tokio::sync::oneshot::Sender<Result<snapshot::SnapshotInfo, snapshot::SnapshotError>>,
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
        let mut p = self.points.lock().unwrap_or_else(|p| p.into_inner());
        p.0 += 1;
        let id = p.0;
        p.1.insert(
            id,
            PendingPoint {
                reason: reason.to_string(),
                reply: tx,
            },
        );
        (id, rx)
    }

    /// The pending point `id`, if it is still awaited.
    pub fn take_point(&self, id: u64) -> Option<PendingPoint> {
        self.points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .remove(&id)
    }

    pub fn forget_point(&self, id: u64) {
        self.take_point(id);
    }

    /// Drops every pending point and source action (their requesters hear at once that no
    /// answer comes): the session ended.
    pub fn clear_points(&self) {
        self.points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clear();
        self.actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clear();
    }

    /// Registers a source action to send to the agent; returns its id and where the answer comes.
    pub fn expect_action(&self) -> (u64, tokio::sync::oneshot::Receiver<(bool, String)>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut a = self.actions.lock().unwrap_or_else(|p| p.into_inner());
        a.0 += 1;
        let id = a.0;
        a.1.insert(id, tx);
        (id, rx)
    }

    /// The pending source action `id`, if it is still awaited.
    pub fn take_action(&self, id: u64) -> Option<ActionReply> {
        self.actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .remove(&id)
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

pub struct Shared {
    pub data_dir: PathBuf,
    pub catalog: catalog::Catalog,
    pub pki: pki::Pki,
    pub admin_token: String,
    pub live: live::Live,
    pub block_size: u32,
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
                    kick: Arc::new(tokio::sync::Notify::new()),
                    jobs: Mutex::new(None),
                    agent: Mutex::new(None),
                    points: Mutex::new((0, HashMap::new())),
                    actions: Mutex::new((0, HashMap::new())),
                })
            })
            .clone()
    }
}

/// Opens (or initialises) the data dir: PKI, admin credential, catalog.
pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Shared>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    let pki = pki::load_or_create(data_dir).context("load server certificates")?;
    let admin_token = pki::admin_token(data_dir).context("load admin credential")?;
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
        store,
        slots: Mutex::new(HashMap::new()),
    });
    launch::recover(&shared).context("clean up launch jobs a stop interrupted")?;
    Ok(shared)
}

/// Serves agents on `listener` and the admin API on `admin` until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = {
        let mut stop = stop_rx.clone();
        let app = admin::router(shared.clone());
        tokio::spawn(async move {
            axum::serve(admin, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await
        })
    };
    tokio::pin!(shutdown);
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    sessions.spawn(session::serve(shared.clone(), tcp, peer, stop_rx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
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
