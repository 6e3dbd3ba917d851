//! One agent connection: TLS handshake, `Hello`/`Welcome`, then the replication stream. Every
//! frame is checked here (sequence, ownership, bounds) before the writer thread sees it; any
//! violation ends the session with an `Error` frame and a closed connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rehost_proto::frame::{read_message, read_message_capped, write_message};
use rehost_proto::msg::{Auth, DiskGrant, ErrorCode, Hello, Welcome, SHARED_CREDENTIAL};
use rehost_proto::{DiskId, FrameError, MachineId, Message};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedMutexGuard};
use tracing::{debug, info, warn, Instrument};

use crate::admission::Ticket;
use crate::auth::{Kick, RegisterRefusal};
use crate::catalog::Refusal;
use crate::volume::Volume;
use crate::writer::{self, DiskCtx, Job};
use crate::Shared;
use rehost_proto::error::chain;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// An agent that says nothing for this long is gone (agents ping every few seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("TLS handshake")]
    Tls(#[source] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{}", version_mismatch(*.0, *.1))]
    Version(u32, u32),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error(transparent)]
    Write(#[from] writer::WriteError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("agent reported an error: {0}")]
    Agent(String),
    #[error("replaced by a newer connection of the same machine from {0}")]
    Replaced(SocketAddr),
    #[error("{SHARED_CREDENTIAL} from {0}: the two keep replacing each other's connection (a cloned source or a copied agent state dir? give the copy its own machine: remove its state dir and install it with a new token)")]
    SharedCredential(SocketAddr),
    #[error("server shutting down")]
    Shutdown,
    #[error("no frame for {0:?}")]
    Idle(Duration),
    #[error("hello of {0} bytes exceeds the {max}-byte limit before login", max = rehost_proto::MAX_HELLO_FRAME)]
    HelloTooLarge(usize),
    #[error("closed to make room: the server is near its open-file limit and this connection had not logged in")]
    Shed,
}

impl SessionError {
    fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            SessionError::Frame(FrameError::TooLarge(_)) | SessionError::HelloTooLarge(_) => {
                ErrorCode::TooLarge
            }
            SessionError::Frame(FrameError::Decode(_)) | SessionError::Protocol(_) => {
                ErrorCode::Protocol
            }
            SessionError::Version(..) => ErrorCode::Version,
            SessionError::Unauthorized(_) => ErrorCode::Unauthorized,
            SessionError::Revoked(_) => ErrorCode::Revoked,
            SessionError::Forbidden(_) => ErrorCode::Forbidden,
            SessionError::OutOfRange(_) => ErrorCode::OutOfRange,
            SessionError::Write(
                writer::WriteError::HashMismatch { .. } | writer::WriteError::Decompress { .. },
            ) => ErrorCode::HashMismatch,
            SessionError::Write(writer::WriteError::Protocol { .. }) => ErrorCode::Protocol,
            SessionError::Write(_) | SessionError::Internal(_) => ErrorCode::Internal,
            SessionError::Replaced(_)
            | SessionError::SharedCredential(_)
            | SessionError::Shutdown
            | SessionError::Idle(_) => ErrorCode::Protocol,
            SessionError::Tls(_)
            | SessionError::Shed
            | SessionError::Frame(FrameError::Io(_))
            | SessionError::Agent(_) => return None,
        })
    }
}

/// Why an agent speaking `min..=max` has no version in common with this server, and which side
/// to upgrade.
fn version_mismatch(min: u32, max: u32) -> String {
    let (smin, smax) = (
        rehost_proto::MIN_PROTOCOL_VERSION,
        rehost_proto::PROTOCOL_VERSION,
    );
    if min > smax {
        format!("this agent speaks protocol {min}..={max}, newer than this server ({smin}..={smax}): upgrade the server")
    } else if max < smin {
        format!("this agent speaks protocol {min}..={max}, older than this server supports ({smin}..={smax}): upgrade the agent")
    } else {
        format!("no common protocol version (agent speaks {min}..={max}, server {smin}..={smax})")
    }
}

fn internal(e: impl std::fmt::Display) -> SessionError {
    SessionError::Internal(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SessionError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// Serves one TCP connection until it ends; logs the outcome once.
pub async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: tokio::sync::watch::Receiver<bool>,
    mut ticket: Ticket,
) {
    let span = tracing::info_span!("conn", %peer, machine = tracing::field::Empty);
    async move {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.pki.tls.clone());
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            // A peer can cause this at will: one line per period.
            if let Some(held) = ticket.admission().log.check() {
                warn!(error = %e, held_back = held, "{what}");
            }
        };
        let tls = tokio::select! {
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return failed("TLS handshake failed", &e),
                Err(_) => return failed("TLS handshake timed out", &"no handshake within the timeout"),
            },
            _ = ticket.shed() => return failed("connection closed before its TLS handshake", &SessionError::Shed),
        };
        let (rd, wr) = tokio::io::split(tls);
        let (out_tx, out_rx) = mpsc::channel::<Message>(256);
        let outbound = tokio::spawn(outbound(wr, out_rx));
        let result = session(&shared, rd, out_tx.clone(), peer, shutdown, &mut ticket).await;
        match &result {
            Ok(()) => info!("agent disconnected"),
            // Closing without a TLS close_notify is how many peers hang up; nothing is lost by it
            // at a frame boundary.
            Err(SessionError::Frame(FrameError::Io(e)))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                if ticket.is_authenticated() {
                    info!("agent disconnected");
                }
                debug!(error = %e, "connection closed without TLS close_notify");
            }
            // Anonymous peers can cause these at will: one line per period. (A revoked or
            // forbidden credential is a real one, always logged below.)
            Err(e)
                if !ticket.is_authenticated()
                    && !matches!(e, SessionError::Revoked(_) | SessionError::Forbidden(_)) =>
            {
                let limit = match e {
                    SessionError::Unauthorized(_) => &ticket.admission().auth_log,
                    _ => &ticket.admission().log,
                };
                if let Some(held) = limit.check() {
                    warn!(error = %chain(e), held_back = held, "session refused or aborted before login");
                }
            }
            Err(
                e @ (SessionError::Frame(FrameError::Io(_))
                | SessionError::Replaced(_)
                | SessionError::SharedCredential(_)
                | SessionError::Shutdown),
            ) => {
                warn!(error = %chain(e), "session ended")
            }
            Err(e) => warn!(error = %chain(e), "session refused or aborted"),
        }
        if let Err(e) = &result {
            if let Some(code) = e.code() {
                let _ = out_tx
                    .send(Message::Error {
                        code,
                        message: chain(e),
                    })
                    .await;
            }
        }
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), outbound).await;
    }
    .instrument(span)
    .await
}

async fn outbound<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Message>) {
    use tokio::io::AsyncWriteExt;
    while let Some(m) = rx.recv().await {
        if write_message(&mut wr, m).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

struct Granted {
    size: u64,
    block_size: u64,
}

async fn session<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    mut rd: R,
    out: mpsc::Sender<Message>,
    peer: SocketAddr,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    ticket: &mut Ticket,
) -> Result<(), SessionError> {
    // Before login: no read buffer of our own and a small frame cap, so that a connection that
    // has not logged in costs little memory.
    let read_hello = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_message_capped(&mut rd, rehost_proto::MAX_HELLO_FRAME),
    );
    let read = tokio::select! {
        r = read_hello => r,
        _ = ticket.shed() => return Err(SessionError::Shed),
    };
    let hello = match read {
        Err(_) => {
            return Err(SessionError::Protocol(
                "no hello within the handshake timeout".into(),
            ))
        }
        Ok(Err(FrameError::TooLarge(n))) => return Err(SessionError::HelloTooLarge(n)),
        Ok(r) => match r? {
            Some(Message::Hello(h)) => h,
            Some(m) => {
                return Err(SessionError::Protocol(format!(
                    "expected hello, got {}",
                    m.kind()
                )))
            }
            None => return Err(SessionError::Protocol("closed before hello".into())),
        },
    };
    let version = negotiate(&hello)?;
    if hello.detach.is_some() {
        if version < rehost_proto::DETACH_VERSION {
            return Err(SessionError::Protocol(format!(
                "detach in a hello of protocol {version} (detach needs {})",
                rehost_proto::DETACH_VERSION
            )));
        }
        if !matches!(hello.auth, Auth::Machine { .. }) {
            return Err(SessionError::Protocol(
                "detach needs the machine's credential, not an install token".into(),
            ));
        }
    }
    let (machine, secret) = authenticate(shared, &hello).await?;
    ticket.authenticated();
    tracing::Span::current().record("machine", machine.as_str());
    // An agent being uninstalled: handled before the lifecycle check, since a machine that was
    // cut over or archived is exactly the one whose agent is then removed.
    if let Some(reason) = hello.detach.clone() {
        return detach(shared, &machine, &hello.agent_version, reason, &out).await;
    }
    let mut rd = BufReader::with_capacity(1 << 20, rd);
    // A machine that was cut over (or archived) is no longer replicated.
    let lifecycle = {
        let (s, m) = (shared.clone(), machine.clone());
        blocking(move || s.catalog.lifecycle(m.as_str()).map_err(internal)).await?
    };
    if let Some(lc) = lifecycle.filter(|l| l.ends_replication()) {
        return Err(SessionError::Forbidden(format!(
            "machine {machine} is {lc}: {}",
            rehost_proto::msg::REPLICATION_ENDED
        )));
    }

    // One session per machine: a reconnecting agent replaces its stale predecessor.
    let _slot = claim_slot(shared, &machine, peer).await?;
    let (mut kicked, last_frame) = shared.slot(&machine).kick.attach(peer);

    let (grants, ctxs) = {
        let (shared, machine, disks) = (shared.clone(), machine.clone(), hello.disks.clone());
        blocking(move || open_disks(&shared, &machine, &disks)).await?
    };
    {
        let (s, m, v) = (shared.clone(), machine.clone(), hello.agent_version.clone());
        blocking(move || s.catalog.agent_connected(&m, &v).map_err(internal)).await?;
    }
    info!(
        version,
        agent = %hello.agent_version,
        disks = grants.len(),
        registered = secret.is_some(),
        "agent connected"
    );
    let granted: HashMap<DiskId, Granted> = grants
        .iter()
        .map(|g| {
            (
                g.disk_id,
                Granted {
                    size: g.size_bytes,
                    block_size: u64::from(g.block_size),
                },
            )
        })
        .collect();
    out.send(Message::Welcome(Welcome {
        version,
        server_version: env!("CARGO_PKG_VERSION").into(),
        machine_id: machine.clone(),
        machine_secret: secret,
        disks: grants,
    }))
    .await
    .map_err(internal)?;
    let cap = {
        let (s, m) = (shared.clone(), machine.clone());
        blocking(move || s.catalog.max_mbps(m.as_str()).map_err(internal)).await?
    };
    out.send(Message::Settings {
        max_mbps: cap.unwrap_or(0),
    })
    .await
    .map_err(internal)?;
    shared.live.connected(
        machine.as_str(),
        peer.to_string(),
        hello.agent_version.clone(),
    );
    let _live = LiveGuard(shared.clone(), machine.clone());

    let (job_tx, job_rx) = mpsc::channel::<Job>(64);
    shared.slot(&machine).attach_jobs(&job_tx);
    shared.slot(&machine).attach_agent(&out);
    let _points = PointsGuard(shared.slot(&machine));
    let mut writer = {
        let (shared, out) = (shared.clone(), out.clone());
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| writer::run(shared, ctxs, job_rx, out))
        })
    };
    let stream = stream(
        shared,
        &machine,
        &granted,
        &mut rd,
        &out,
        &job_tx,
        (&mut kicked, &last_frame),
        &mut shutdown,
    );
    // A write error (bad hash, disk failure) ends the session at once, even while the reader waits.
    let result = tokio::select! {
        r = stream => r,
        w = &mut writer => {
            return match w.map_err(internal)? {
                Err(e) => Err(e.into()),
                Ok(()) => Err(internal("writer stopped")),
            };
        }
    };
    drop(job_tx);
    // The writer commits what it holds; a write error beats the reader's view of why we stopped.
    match writer.await.map_err(internal)? {
        Err(e) => Err(e.into()),
        Ok(()) => result,
    }
}

/// Records that `machine`'s agent is being uninstalled, ends its live session if one remains,
/// and answers `Detach` (the caller then closes).
async fn detach(
    shared: &Arc<Shared>,
    machine: &MachineId,
    agent_version: &str,
    reason: String,
    out: &mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    {
        let (s, m, v, r) = (
            shared.clone(),
            machine.clone(),
            agent_version.to_string(),
            reason.clone(),
        );
        blocking(move || s.catalog.detach_machine(&m, &v, &r).map_err(internal)).await?;
    }
    // A session this machine still has (the agent's service, stopped just before) ends now.
    shared.slot(machine).kick.kick(Kick::Stopped(format!(
        "machine {machine} was detached by its agent ({reason})"
    )));
    info!(agent = %agent_version, %reason, "agent detached its machine");
    out.send(Message::Detach { reason }).await.map_err(internal)
}

/// Fails the points still awaited from this session's agent when the session ends.
struct PointsGuard(Arc<crate::Slot>);
impl Drop for PointsGuard {
    fn drop(&mut self) {
        self.0.clear_points();
    }
}

struct LiveGuard(Arc<Shared>, MachineId);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.disconnected(self.1.as_str());
        let _ = self.0.catalog.touch_machine(&self.1);
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    machine: &MachineId,
    granted: &HashMap<DiskId, Granted>,
    rd: &mut R,
    out: &mpsc::Sender<Message>,
    jobs: &mpsc::Sender<Job>,
    (kicked, last_frame): (
        &mut tokio::sync::watch::Receiver<Option<Kick>>,
        &std::sync::atomic::AtomicI64,
    ),
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut next_seq = 1u64;
    let disk = |id: DiskId| {
        granted.get(&id).ok_or_else(|| {
            SessionError::Forbidden(format!("{id} does not belong to machine {machine}"))
        })
    };
    let mut check_seq = |seq: u64| {
        if seq != next_seq {
            return Err(SessionError::Protocol(format!(
                "sequence {seq} where {next_seq} was expected"
            )));
        }
        next_seq += 1;
        Ok(())
    };
    loop {
        let msg = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read_message(rd)) => match r {
                Err(_) => return Err(SessionError::Idle(IDLE_TIMEOUT)),
                Ok(m) => m?,
            },
            _ = kicked_changed(kicked) => return Err(kicked_error(machine, kicked.borrow().clone())),
            _ = shutdown.changed() => return Err(SessionError::Shutdown),
        };
        last_frame.store(
            crate::catalog::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let Some(msg) = msg else { return Ok(()) };
        match msg {
            Message::Block(b) => {
                check_seq(b.seq)?;
                let d = disk(b.disk_id)?;
                let expect = d.size.saturating_sub(b.offset).min(d.block_size);
                if b.offset % d.block_size != 0
                    || b.offset >= d.size
                    || u64::from(b.length) != expect
                {
                    return Err(SessionError::OutOfRange(format!(
                        "block at offset {} length {} does not fit {} ({} bytes, {}-byte blocks)",
                        b.offset, b.length, b.disk_id, d.size, d.block_size
                    )));
                }
                jobs.send(Job::Block(b))
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::Zero {
                seq,
                disk_id,
                offset,
                length,
            } => {
                check_seq(seq)?;
                let d = disk(disk_id)?;
                let end = offset.checked_add(length).filter(|e| *e <= d.size);
                let aligned = offset % d.block_size == 0
                    && end.is_some_and(|e| e % d.block_size == 0 || e == d.size);
                if !aligned {
                    return Err(SessionError::OutOfRange(format!(
                        "zero range {offset}+{length} does not fit {disk_id} ({} bytes, {}-byte blocks)",
                        d.size, d.block_size
                    )));
                }
                jobs.send(Job::Zero {
                    seq,
                    disk_id,
                    offset,
                    length,
                })
                .await
                .map_err(|_| internal("writer stopped"))?;
            }
            Message::Mark {
                seq,
                disk_id,
                kind,
                generation,
            } => {
                check_seq(seq)?;
                disk(disk_id)?;
                jobs.send(Job::Mark {
                    seq,
                    disk_id,
                    kind,
                    generation,
                })
                .await
                .map_err(|_| internal("writer stopped"))?;
            }
            Message::IndexRequest {
                disk_id,
                start_block,
                count,
            } => {
                let d = disk(disk_id)?;
                let blocks = d.size.div_ceil(d.block_size);
                if start_block
                    .checked_add(u64::from(count))
                    .is_none_or(|e| e > blocks)
                {
                    return Err(SessionError::OutOfRange(format!(
                        "index request {start_block}+{count} beyond {disk_id}'s {blocks} blocks"
                    )));
                }
                let dir = shared.volume_dir(machine);
                let (size, bs) = (d.size, d.block_size as u32);
                let hashes = blocking(move || {
                    Volume::open(&dir, disk_id.0, size, bs)
                        .and_then(|v| v.read_index(start_block, count))
                        .map_err(internal)
                })
                .await?;
                out.send(Message::IndexChunk {
                    disk_id,
                    start_block,
                    hashes,
                })
                .await
                .map_err(internal)?;
            }
            Message::Progress(p) => {
                disk(p.disk_id)?;
                shared.live.progress(machine.as_str(), &p);
            }
            // Echoed, so an agent can tell a live server from a stalled connection.
            Message::Ping { nonce } => out.send(Message::Ping { nonce }).await.map_err(internal)?,
            Message::Point {
                seq,
                id,
                consistency,
                freeze_ms,
                note,
            } => {
                check_seq(seq)?;
                let job = match shared.slot(machine).take_point(id) {
                    Some(p) => {
                        let consistency = match consistency {
                            rehost_proto::msg::PointConsistency::App => {
                                crate::snapshot::Consistency::App
                            }
                            _ => crate::snapshot::Consistency::Crash,
                        };
                        info!(point = id, freeze_ms, %note, consistency = consistency.as_str(), "consistency point from the agent");
                        crate::snapshot::point_job(
                            shared,
                            machine,
                            consistency,
                            p.reason,
                            Some(p.reply),
                            Some(seq),
                        )
                    }
                    None => {
                        warn!(
                            point = id,
                            "consistency point arrived after its request was given up"
                        );
                        Job::Ack { seq }
                    }
                };
                jobs.send(job)
                    .await
                    .map_err(|_| internal("writer stopped"))?;
            }
            Message::SourceActionResult { id, ok, message } => {
                match shared.slot(machine).take_action(id) {
                    Some(reply) => {
                        let _ = reply.send((ok, message));
                    }
                    None => warn!(
                        action = id,
                        "source action result after its request was given up"
                    ),
                }
            }
            Message::Error { code, message } => {
                return Err(SessionError::Agent(format!("{code:?}: {message}")))
            }
            m @ (Message::Hello(_)
            | Message::SourceAction { .. }
            | Message::Welcome(_)
            | Message::IndexChunk { .. }
            | Message::Ack { .. }
            | Message::PointRequest { .. }
            | Message::Settings { .. }
            | Message::Detach { .. }) => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} from an agent",
                    m.kind()
                )))
            }
        }
    }
}

fn negotiate(h: &Hello) -> Result<u32, SessionError> {
    let v = h.max_version.min(rehost_proto::PROTOCOL_VERSION);
    if v < h.min_version.max(rehost_proto::MIN_PROTOCOL_VERSION) {
        return Err(SessionError::Version(h.min_version, h.max_version));
    }
    Ok(v)
}

async fn authenticate(
    shared: &Arc<Shared>,
    hello: &Hello,
) -> Result<(MachineId, Option<[u8; 32]>), SessionError> {
    let shared = shared.clone();
    let auth = hello.auth.clone();
    blocking(move || match auth {
        Auth::Register {
            token_id,
            token_secret,
            hostname,
            source_id,
        } => {
            let id = hex::encode(token_id);
            match shared
                .catalog
                .check_token(&id, &token_secret)
                .map_err(internal)?
            {
                Ok(()) => {}
                Err(Refusal::Unknown) => {
                    return Err(SessionError::Unauthorized(format!(
                        "unknown install token {id}"
                    )))
                }
                Err(Refusal::Revoked) => {
                    return Err(SessionError::Revoked(format!(
                        "install token {id} was revoked"
                    )))
                }
                Err(Refusal::Expired) => {
                    return Err(SessionError::Revoked(format!(
                        "install token {id} has expired"
                    )))
                }
            }
            let mut secret = [0u8; 32];
            rehost_proto::random_bytes(&mut secret);
            let r = match shared
                .catalog
                .register(&id, &hostname, &source_id, &secret)
                .map_err(internal)?
            {
                Ok(r) => r,
                Err(e @ RegisterRefusal::MachineRevoked(_)) => {
                    return Err(SessionError::Revoked(e.to_string()))
                }
                Err(e) => return Err(SessionError::Unauthorized(e.to_string())),
            };
            match &r.duplicate_of {
                _ if r.reinstalled => {
                    info!(machine = %r.machine, %hostname, token = %id, "machine re-registered with its reinstall token (new credential; id, disks and replica kept)")
                }
                Some(dup) => warn!(
                    machine = %r.machine, %hostname, token = %id, duplicate_of = %dup,
                    "new machine registered with the hostname or source id of an existing one: duplicate of {dup}, not merged"
                ),
                None => info!(machine = %r.machine, %hostname, token = %id, "machine registered"),
            }
            Ok((r.machine, Some(secret)))
        }
        Auth::Machine { machine_id, secret } => match shared
            .catalog
            .check_machine(&machine_id, &secret)
            .map_err(internal)?
        {
            Ok(()) => Ok((machine_id, None)),
            Err(Refusal::Revoked) => Err(SessionError::Revoked(format!(
                "machine {machine_id}'s credential was revoked"
            ))),
            Err(_) => Err(SessionError::Unauthorized(format!(
                "unknown machine or wrong credential for {machine_id}"
            ))),
        },
    })
    .await
}

/// Resolves when the session's kick value changes (never, if its sender is gone).
async fn kicked_changed(rx: &mut tokio::sync::watch::Receiver<Option<Kick>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn kicked_error(machine: &MachineId, why: Option<Kick>) -> SessionError {
    match why {
        Some(Kick::Replaced { by, shared: false }) => SessionError::Replaced(by),
        Some(Kick::Replaced { by, shared: true }) => SessionError::SharedCredential(by),
        Some(Kick::Revoked) => SessionError::Revoked(format!(
            "machine {machine} was revoked by the operator (`rehost-server machine unrevoke` lets it connect again)"
        )),
        Some(Kick::Stopped(why)) => SessionError::Forbidden(why),
        None => internal("session ended without a reason"),
    }
}

async fn claim_slot(
    shared: &Arc<Shared>,
    machine: &MachineId,
    peer: SocketAddr,
) -> Result<OwnedMutexGuard<()>, SessionError> {
    let slot = shared.slot(machine);
    if let Ok(g) = slot.lock.clone().try_lock_owned() {
        return Ok(g);
    }
    slot.kick.replace(machine, peer);
    match tokio::time::timeout(Duration::from_secs(30), slot.lock.clone().lock_owned()).await {
        Ok(g) => Ok(g),
        Err(_) => Err(SessionError::Internal(
            "previous session of this machine did not end".into(),
        )),
    }
}

type Opened = (Vec<DiskGrant>, HashMap<DiskId, DiskCtx>);

fn open_disks(
    shared: &Shared,
    machine: &MachineId,
    disks: &[rehost_proto::msg::DiskInfo],
) -> Result<Opened, SessionError> {
    let mut seen = HashSet::new();
    if disks.is_empty() {
        return Err(SessionError::Protocol("no disks in hello".into()));
    }
    if let Some(d) = disks.iter().find(|d| !seen.insert(d.device.as_str())) {
        return Err(SessionError::Protocol(format!(
            "disk {} listed twice",
            d.device
        )));
    }
    let cap = shared
        .max_disk_size
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some(d) = disks.iter().find(|d| d.size_bytes > cap) {
        return Err(SessionError::OutOfRange(format!(
            "disk {} declares {} bytes, more than this server accepts ({cap} bytes, `serve --max-disk-size`)",
            d.device, d.size_bytes
        )));
    }
    let dir = shared.volume_dir(machine);
    // A disk's row and its volume go together: if a volume cannot be made, every row rolls back
    // and the files made for new disks are removed.
    let mut made = Vec::new();
    let opened = shared
        .catalog
        .ensure_disks_with(machine, disks, shared.block_size, |r, new| {
            if new {
                made.push(r.id);
            }
            Volume::open(&dir, r.id, r.size_bytes, r.block_size)
        })
        .map_err(internal)?;
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            for id in made {
                let (vol, idx) = Volume::paths(&dir, id);
                for p in [vol, idx] {
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(path = %p.display(), error = %e, "remove a file of a disk whose registration failed")
                        }
                    }
                }
            }
            return Err(SessionError::Internal(format!(
                "create the staging volume of a disk: {}",
                chain(&e)
            )));
        }
    };
    let mut grants = Vec::new();
    let mut ctxs = HashMap::new();
    for (r, volume) in opened {
        let id = DiskId(r.id);
        let clean_stop_generation = crate::volume::take_clean_stop(&dir, r.id).map_err(internal)?;
        grants.push(DiskGrant {
            disk_id: id,
            device: r.device,
            size_bytes: r.size_bytes,
            block_size: r.block_size,
            durable_bytes: r.durable_bytes,
            sync_complete: r.sync_complete,
            clean_stop_generation,
        });
        ctxs.insert(id, DiskCtx::new(volume, r.durable_bytes, r.sync_complete));
    }
    Ok((grants, ctxs))
}
