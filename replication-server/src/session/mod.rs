//! One agent connection: TLS handshake, `Hello`/`Welcome`, then the replication stream. Every
//! frame is checked here (sequence, ownership, bounds) before the writer thread sees it; any
//! violation ends the session with an `Error` frame and a closed connection.

mod disks;
mod handshake;
mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rehost_proto::frame::{read_message_capped, write_message};
use rehost_proto::msg::{Auth, ErrorCode, Welcome, SHARED_CREDENTIAL};
use rehost_proto::{DiskId, FrameError, MachineId, Message};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::admission::Ticket;
use crate::auth::Kick;
pub(crate) use crate::task::blocking;
use crate::writer::{self, Job};
use crate::Shared;
use disks::{open_disks, Granted};
use handshake::{authenticate, claim_slot, negotiate};
use rehost_proto::error::chain;
use stream::Stream;

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

impl From<crate::task::TaskFailed> for SessionError {
    fn from(e: crate::task::TaskFailed) -> Self {
        internal(e)
    }
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
    let mut reader = Stream {
        shared,
        machine: &machine,
        granted: &granted,
        out: &out,
        jobs: &job_tx,
        kicked: &mut kicked,
        last_frame: &last_frame,
        shutdown: &mut shutdown,
        next_seq: 1,
    };
    let stream = reader.run(&mut rd);
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
