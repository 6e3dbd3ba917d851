//! One connection to the server: TLS connect, the `Hello`/`Welcome` handshake, and, once
//! established, the split stream: an outbound task that owns the write half, an inbound task that
//! turns `Ack`s into a watermark and routes `IndexChunk`s, and a send window so that at most
//! [`WINDOW`] frames are unacknowledged.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rehost_proto::frame::{encode, read_message};
use rehost_proto::msg::{Auth, DiskInfo, ErrorCode, Hello, Mark, Welcome, Zero};
use rehost_proto::{DiskId, FrameError, Hash, Message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use crate::watchdog::{Liveness, Timeouts};

/// Unacknowledged sequenced frames allowed in flight (about 32 MiB of 64 KiB blocks).
pub const WINDOW: u64 = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("TLS handshake with {0}")]
    Tls(String, #[source] std::io::Error),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("server refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("connection closed by the server")]
    Closed,
    #[error("connection stalled: {0}")]
    Stalled(String),
    #[error("{0} is not a rehost replication port: it answers in HTTP (is it the admin port? the replication port defaults to {port})", port = rehost_proto::DEFAULT_PORT)]
    NotReplicationPort(String),
}

impl ConnError {
    /// Errors that a retry cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ConnError::Refused {
                code: ErrorCode::Unauthorized
                    | ErrorCode::Revoked
                    | ErrorCode::Forbidden
                    | ErrorCode::Version,
                ..
            } | ConnError::NotReplicationPort(_)
        )
    }
}

type Tls = TlsStream<TcpStream>;

/// TCP + TLS 1.3 to `server`, trusting only the pinned CA, with the default keepalive.
pub async fn connect(server: &str, pin: [u8; 32]) -> Result<Tls, ConnError> {
    connect_with(server, pin, &Timeouts::default()).await
}

/// [`connect`] with the socket's keepalive and user timeout set from `t`.
pub async fn connect_with(server: &str, pin: [u8; 32], t: &Timeouts) -> Result<Tls, ConnError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| ConnError::Timeout(format!("connect to {server}")))?
        .map_err(|e| ConnError::Connect(server.into(), e))?;
    let _ = tcp.set_nodelay(true);
    crate::watchdog::tune_socket(&tcp, t);
    let connector = tokio_rustls::TlsConnector::from(crate::tls::client_config(pin));
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        connector.connect(crate::tls::server_name(), tcp),
    )
    .await
    .map_err(|_| ConnError::Timeout(format!("TLS handshake with {server}")))?;
    match tls {
        Ok(t) => Ok(t),
        // A plain HTTP server answers a ClientHello with an HTTP error, which TLS reads as a
        // corrupt record: ask it plainly to tell the operator what the port really is.
        Err(e) if answers_http(server).await => {
            tracing::debug!(error = %e, "TLS handshake failed");
            Err(ConnError::NotReplicationPort(server.into()))
        }
        Err(e) => Err(ConnError::Tls(server.into(), e)),
    }
}

/// Whether `server` answers a plain `HEAD /` with an HTTP status line.
async fn answers_http(server: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let probe = async {
        let mut tcp = TcpStream::connect(server).await.ok()?;
        tcp.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut head = [0u8; 5];
        tcp.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Some(true))
    )
}

/// A frame length that spells `HTTP`: the peer is an HTTP server behind TLS, not a rehost one.
fn http_reply(e: &FrameError) -> bool {
    matches!(e, FrameError::TooLarge(len) if (*len as u32).to_be_bytes() == *b"HTTP")
}

/// This agent's `Hello`: the protocol versions it speaks, its version, `auth`, and its disks
/// as (device, size in bytes).
pub fn hello<'a>(auth: Auth, disks: impl IntoIterator<Item = (&'a Path, u64)>) -> Hello {
    Hello {
        min_version: rehost_proto::MIN_PROTOCOL_VERSION,
        max_version: rehost_proto::PROTOCOL_VERSION,
        agent_version: crate::VERSION.into(),
        detach: None,
        auth,
        disks: disks
            .into_iter()
            .map(|(device, size_bytes)| DiskInfo {
                device: device.display().to_string(),
                size_bytes,
            })
            .collect(),
    }
}

/// Sends `hello`, returns the server's `Welcome` (or its refusal).
pub async fn handshake(tls: &mut Tls, hello: Hello) -> Result<Welcome, ConnError> {
    match hello_reply(tls, hello).await? {
        Message::Welcome(w) => Ok(w),
        m => Err(ConnError::Protocol(format!(
            "expected welcome, got {}",
            m.kind()
        ))),
    }
}

/// Sends `hello`, returns the server's answer: `Welcome`, or `Detach` to a detaching hello; a
/// refusal is an error.
pub async fn hello_reply(tls: &mut Tls, hello: Hello) -> Result<Message, ConnError> {
    rehost_proto::frame::write_message(tls, Message::Hello(hello)).await?;
    let reply = tokio::time::timeout(CONNECT_TIMEOUT, read_message(tls))
        .await
        .map_err(|_| ConnError::Timeout("welcome from the server".into()))?
        .map_err(|e| {
            if http_reply(&e) {
                let peer = tls
                    .get_ref()
                    .0
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "the server".into());
                ConnError::NotReplicationPort(peer)
            } else {
                ConnError::from(e)
            }
        })?;
    match reply {
        Some(Message::Error { code, message }) => Err(ConnError::Refused { code, message }),
        Some(m) => Ok(m),
        None => Err(ConnError::Closed),
    }
}

pub struct IndexChunk {
    pub disk_id: DiskId,
    pub start_block: u64,
    pub hashes: Vec<Hash>,
}

/// A consistency point the server asks for.
#[derive(Clone, Copy, Debug)]
pub struct PointAsk {
    pub id: u64,
    /// The longest the filesystems may stay frozen.
    pub max_freeze_ms: u32,
    /// A group point: stay frozen after the mark until the server releases it.
    pub hold: bool,
}

/// An established replication stream.
pub struct Conn {
    out: mpsc::Sender<Message>,
    acked: watch::Receiver<u64>,
    index: mpsc::Receiver<IndexChunk>,
    /// Consistency points the server asks for.
    points: mpsc::Receiver<PointAsk>,
    /// The highest group point id the server released (ids grow within a connection).
    released: watch::Receiver<u64>,
    inbound: Option<JoinHandle<Result<(), ConnError>>>,
    outbound: JoinHandle<()>,
    watchdog: JoinHandle<()>,
    live: Arc<Liveness>,
    seq: u64,
    throttle: Throttle,
}

/// A token bucket over block payload bytes. The rate is the server's setting when it sets one,
/// else the agent's own `--max-mbps`; none means unlimited.
struct Throttle {
    local_mbps: Option<u64>,
    server_mbps: watch::Receiver<u64>,
    next: tokio::time::Instant,
}

impl Throttle {
    fn mbps(&self) -> Option<u64> {
        let server = *self.server_mbps.borrow();
        if server > 0 {
            Some(server)
        } else {
            self.local_mbps.filter(|m| *m > 0)
        }
    }

    async fn take(&mut self, bytes: usize) {
        let Some(mbps) = self.mbps() else { return };
        let bytes_per_sec = mbps as f64 * 1_000_000.0 / 8.0;
        let now = tokio::time::Instant::now();
        // Allow at most a quarter second of burst after an idle period.
        let floor = now - Duration::from_millis(250);
        if self.next < floor {
            self.next = floor;
        }
        self.next += Duration::from_secs_f64(bytes as f64 / bytes_per_sec);
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}

impl Conn {
    /// `max_mbps`: bandwidth cap for block payloads in megabits per second.
    /// `timeouts`: keepalive and stall detection (see [`crate::watchdog`]).
    pub fn start(tls: Tls, max_mbps: Option<u64>, timeouts: Timeouts) -> Self {
        let (rd, wr) = tokio::io::split(tls);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (ack_tx, ack_rx) = watch::channel(0u64);
        let (idx_tx, idx_rx) = mpsc::channel(4);
        let (pt_tx, pt_rx) = mpsc::channel(16);
        let (rel_tx, rel_rx) = watch::channel(0u64);
        let (set_tx, set_rx) = watch::channel(0u64);
        let (dead_tx, dead_rx) = watch::channel(None::<String>);
        let live = Liveness::new();
        let inbound = tokio::spawn(inbound(
            BufReader::new(rd),
            Inbound {
                acked: ack_tx,
                index: idx_tx,
                points: pt_tx,
                released: rel_tx,
                settings: set_tx,
                out: out_tx.clone(),
                live: live.clone(),
            },
            dead_rx.clone(),
        ));
        let outbound = tokio::spawn(outbound(wr, out_rx, dead_rx));
        let watchdog = tokio::spawn(crate::watchdog::watch(
            live.clone(),
            timeouts,
            ack_rx.clone(),
            out_tx.clone(),
            dead_tx,
        ));
        let throttle = Throttle {
            local_mbps: max_mbps,
            server_mbps: set_rx,
            next: tokio::time::Instant::now(),
        };
        Self {
            out: out_tx,
            acked: ack_rx,
            index: idx_rx,
            points: pt_rx,
            released: rel_rx,
            inbound: Some(inbound),
            outbound,
            watchdog,
            live,
            seq: 0,
            throttle,
        }
    }

    pub fn sender(&self) -> mpsc::Sender<Message> {
        self.out.clone()
    }

    /// The connection's liveness, for status: whether the server counts as slow.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.live.clone()
    }

    /// The bandwidth cap in force (Mbps), if any.
    pub fn max_mbps(&self) -> Option<u64> {
        self.throttle.mbps()
    }

    /// The consistency points the server asks for. Taken once.
    pub fn take_points(&mut self) -> mpsc::Receiver<PointAsk> {
        std::mem::replace(&mut self.points, mpsc::channel(1).1)
    }

    /// Waits until the server releases group point `id` (or the connection ends).
    pub async fn released(&self, id: u64) {
        let mut rx = self.released.clone();
        let _ = rx.wait_for(|r| *r >= id).await;
    }

    /// The sequence number of the last sequenced frame sent (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// The reason the connection ended (after a send or wait failed).
    /// Cancel safe: the inbound task is only given up once it has finished.
    pub async fn failure(&mut self) -> ConnError {
        let Some(h) = self.inbound.as_mut() else {
            return ConnError::Closed;
        };
        let r = h.await;
        self.inbound = None;
        match r {
            Ok(Err(e)) => e,
            _ => ConnError::Closed,
        }
    }

    /// Sends a sequenced frame once the window allows; returns its sequence number.
    pub async fn send_seq(&mut self, make: impl FnOnce(u64) -> Message) -> Result<u64, ConnError> {
        self.seq += 1;
        let seq = self.seq;
        if self.acked.wait_for(|a| seq - a <= WINDOW).await.is_err() {
            return Err(self.failure().await);
        }
        let m = make(seq);
        if let Message::Block(b) = &m {
            self.throttle.take(b.payload.len()).await;
        }
        self.send(m).await?;
        Ok(seq)
    }

    pub async fn send(&mut self, m: Message) -> Result<(), ConnError> {
        let seq = match &m {
            Message::Block(b) => Some(b.seq),
            Message::Zero(Zero { seq, .. })
            | Message::Mark(Mark { seq, .. })
            | Message::Point { seq, .. } => Some(*seq),
            _ => None,
        };
        if self.out.send(m).await.is_err() {
            return Err(self.failure().await);
        }
        if let Some(seq) = seq {
            self.live
                .sent_seq
                .fetch_max(seq, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    /// Waits until the server has made everything up to `seq` durable.
    pub async fn wait_acked(&mut self, seq: u64) -> Result<(), ConnError> {
        if self.acked.wait_for(|a| *a >= seq).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    pub async fn index(
        &mut self,
        disk_id: DiskId,
        start_block: u64,
        count: u32,
    ) -> Result<Vec<Hash>, ConnError> {
        self.send(Message::IndexRequest {
            disk_id,
            start_block,
            count,
        })
        .await?;
        match self.index.recv().await {
            Some(c)
                if c.disk_id == disk_id
                    && c.start_block == start_block
                    && c.hashes.len() == count as usize =>
            {
                Ok(c.hashes)
            }
            Some(_) => Err(ConnError::Protocol(
                "index chunk does not answer the request".into(),
            )),
            None => Err(self.failure().await),
        }
    }

    /// Closes the stream after everything queued has been written, with a TLS close_notify.
    pub async fn close(self) {
        self.watchdog.abort();
        let _ = self.watchdog.await;
        // The inbound task holds a sender too (for source action results): end it first, so
        // the outbound queue closes once drained and the outbound task sends close_notify.
        if let Some(h) = self.inbound {
            h.abort();
            let _ = h.await;
        }
        drop(self.out);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.outbound).await;
    }

    /// Resolves when the inbound side ends (server closed or sent an error).
    pub async fn closed(&mut self) -> ConnError {
        self.failure().await
    }
}

async fn outbound<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Message>,
    mut dead: watch::Receiver<Option<String>>,
) {
    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
    let stalled = async move {
        stall_reason(&mut dead).await;
    };
    tokio::pin!(stalled);
    loop {
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = &mut stalled => return,
        };
        let Some(m) = m else { break };
        encode(m, &mut buf);
        // Batch what is already queued into one write.
        while buf.len() < (1 << 20) {
            match rx.try_recv() {
                Ok(m) => encode(m, &mut buf),
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            r = async { wr.write_all(&buf).await?; wr.flush().await } => r.is_ok(),
            // A peer that reads nothing leaves the write blocked: give it up.
            _ = &mut stalled => return,
        };
        if !written {
            return;
        }
        buf.clear();
    }
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, wr.shutdown()).await;
}

/// Resolves with the reason once the watchdog calls the connection dead; never if the watchdog
/// ends without doing so (the connection is being closed).
async fn stall_reason(dead: &mut watch::Receiver<Option<String>>) -> String {
    let reason = dead
        .wait_for(Option::is_some)
        .await
        .ok()
        .map(|r| r.clone().unwrap_or_default());
    match reason {
        Some(r) => r,
        None => std::future::pending().await,
    }
}

/// Where the inbound task delivers what the server sends.
struct Inbound {
    acked: watch::Sender<u64>,
    index: mpsc::Sender<IndexChunk>,
    points: mpsc::Sender<PointAsk>,
    released: watch::Sender<u64>,
    settings: watch::Sender<u64>,
    out: mpsc::Sender<Message>,
    live: Arc<Liveness>,
}

async fn inbound<R: AsyncRead + Unpin>(
    mut rd: BufReader<ReadHalf<R>>,
    to: Inbound,
    mut dead: watch::Receiver<Option<String>>,
) -> Result<(), ConnError> {
    let Inbound {
        acked,
        index,
        points,
        released,
        settings,
        out,
        live,
    } = to;
    let stalled = stall_reason(&mut dead);
    tokio::pin!(stalled);
    loop {
        // Not cancel safe, which does not matter: a stalled connection is given up whole.
        let m = tokio::select! {
            m = read_message(&mut rd) => m?,
            reason = &mut stalled => return Err(ConnError::Stalled(reason)),
        };
        let advanced = matches!(&m, Some(Message::Ack { seq }) if *seq > *acked.borrow());
        live.frame(advanced);
        match m {
            None => return Err(ConnError::Closed),
            Some(Message::Ack { seq }) => {
                acked.send_if_modified(|a| {
                    let newer = seq > *a;
                    if newer {
                        *a = seq;
                    }
                    newer
                });
            }
            Some(Message::IndexChunk {
                disk_id,
                start_block,
                hashes,
            }) => {
                if index
                    .send(IndexChunk {
                        disk_id,
                        start_block,
                        hashes,
                    })
                    .await
                    .is_err()
                {
                    return Err(ConnError::Closed);
                }
            }
            Some(Message::Error { code, message }) => {
                return Err(ConnError::Refused { code, message })
            }
            Some(Message::Ping { nonce }) => live.echo(nonce),
            Some(Message::Settings { max_mbps }) => {
                if *settings.borrow() != max_mbps {
                    tracing::info!(max_mbps, "bandwidth cap set by the server (0: none)");
                }
                let _ = settings.send(max_mbps);
            }
            Some(Message::SourceAction { id, kind, units }) => {
                let out = out.clone();
                tokio::spawn(async move {
                    let (ok, message) = crate::source::act(kind, &units).await;
                    let sent = out
                        .send(Message::SourceActionResult { id, ok, message })
                        .await
                        .is_ok();
                    if sent && ok && kind == rehost_proto::msg::SourceActionKind::PowerOff {
                        crate::source::power_off().await;
                    }
                });
            }
            Some(Message::PointRequest {
                id,
                max_freeze_ms,
                hold,
            }) => {
                // A full queue means points are already pending; the server times this one out.
                let _ = points.try_send(PointAsk {
                    id,
                    max_freeze_ms,
                    hold,
                });
            }
            Some(Message::PointRelease { id }) => {
                released.send_if_modified(|r| {
                    let newer = id > *r;
                    if newer {
                        *r = id;
                    }
                    newer
                });
            }
            Some(m) => {
                return Err(ConnError::Protocol(format!(
                    "unexpected {} from the server",
                    m.kind()
                )))
            }
        }
    }
}
