//! A connection flood against the server's agent port, for the pre-login hardening tests and the
//! `preauth` bench: many connections that never log in, each reopened a moment after the server
//! closes it. Built on `rehost-proto` framing and tokio-rustls, trusting the server's CA from its
//! data dir (as an attacker with network access and no credential would, minus the pin check).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What each connection does once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// TCP only: never starts TLS.
    IdleTcp,
    /// Completes the TLS handshake, then says nothing.
    IdleTls,
    /// TLS, then a frame length of `declare` bytes followed by `send` bytes of its body, then
    /// waits (the finding of issue 11: `declare` = 2 MiB, `send` = 2 MB).
    Frame { declare: u32, send: usize },
}

impl std::str::FromStr for Attack {
    type Err = String;
    /// `idle-tcp`, `idle-tls`, or `frame:DECLARE:SEND` (bytes).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle-tcp" => Ok(Attack::IdleTcp),
            "idle-tls" => Ok(Attack::IdleTls),
            _ => {
                let mut p = s
                    .strip_prefix("frame:")
                    .ok_or(format!("unknown attack `{s}`"))?
                    .split(':');
                let declare = p.next().and_then(|v| v.parse().ok());
                let send = p.next().and_then(|v| v.parse().ok());
                match (declare, send, p.next()) {
                    (Some(declare), Some(send), None) => Ok(Attack::Frame { declare, send }),
                    _ => Err(format!("`{s}`: expected frame:DECLARE:SEND")),
                }
            }
        }
    }
}

/// Counters of a running flood.
#[derive(Default)]
pub struct Counts {
    /// Connections now open whose attack was fully sent and that the server has not closed.
    pub holding: AtomicUsize,
    /// Connections the server closed (at any step), in total.
    pub closed: AtomicUsize,
    /// Connections whose attack was fully sent, in total.
    pub delivered: AtomicUsize,
}

/// `count` connections from `source` (any local address, such as 127.0.0.2, so that the flood
/// has an address of its own) to `server`, each reopened `pause` after the server closes it,
/// until the flood is dropped.
pub struct Flood {
    rt: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
    pub counts: Arc<Counts>,
}

fn tls_config(data_dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let ca = rustls::pki_types::CertificateDer::from_pem_file(data_dir.join("ca.crt"))
        .expect("read the server's CA certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("add the server CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One connection's life: Ok(()) when it was delivered and then closed by the server.
async fn one(
    server: SocketAddr,
    source: IpAddr,
    attack: Attack,
    tls: Arc<rustls::ClientConfig>,
    counts: &Counts,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let sock = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(source, 0))?;
    let mut tcp = sock.connect(server).await?;
    let mut buf = [0u8; 512];
    // Counts the connection as held, then waits until the server closes it (EOF or error) or
    // the flood stops.
    macro_rules! hold {
        ($s:expr) => {{
            counts.delivered.fetch_add(1, Ordering::Relaxed);
            counts.holding.fetch_add(1, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), $s.read(&mut buf)).await {
                    Err(_) => continue,
                    Ok(Ok(n)) if n > 0 => continue,
                    Ok(_) => break,
                }
            }
            counts.holding.fetch_sub(1, Ordering::Relaxed);
        }};
    }
    match attack {
        Attack::IdleTcp => hold!(tcp),
        Attack::IdleTls | Attack::Frame { .. } => {
            let connector = tokio_rustls::TlsConnector::from(tls);
            let name = rustls::pki_types::ServerName::try_from(rehost_proto::SERVER_NAME)
                .expect("server name");
            let _ = tcp.set_nodelay(true);
            let mut s = connector.connect(name, tcp).await?;
            if let Attack::Frame { declare, send } = attack {
                s.write_all(&declare.to_be_bytes()).await?;
                let chunk = vec![0x55u8; 64 << 10];
                let mut left = send;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).await?;
                    left -= n;
                }
                s.flush().await?;
            }
            hold!(s)
        }
    }
    Ok(())
}

impl Flood {
    pub fn start(
        server: &str,
        source: IpAddr,
        data_dir: &Path,
        count: usize,
        attack: Attack,
        pause: Duration,
    ) -> Flood {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("flood runtime");
        let server: SocketAddr = server.parse().expect("server address");
        let tls = tls_config(data_dir);
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        for i in 0..count {
            let (tls, stop, counts) = (tls.clone(), stop.clone(), counts.clone());
            rt.spawn(async move {
                // Spread the first connections over a second, as a flood ramps up.
                tokio::time::sleep(Duration::from_micros(1_000_000 * i as u64 / count as u64))
                    .await;
                while !stop.load(Ordering::Relaxed) {
                    let _ = one(server, source, attack, tls.clone(), &counts, &stop).await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                }
            });
        }
        Flood {
            rt: Some(rt),
            stop,
            counts,
        }
    }

    pub fn holding(&self) -> usize {
        self.counts.holding.load(Ordering::Relaxed)
    }

    pub fn closed(&self) -> usize {
        self.counts.closed.load(Ordering::Relaxed)
    }

    pub fn delivered(&self) -> usize {
        self.counts.delivered.load(Ordering::Relaxed)
    }

    /// Closes every connection and waits until they are gone from this side.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resident memory of a process in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
