//! Where and how the admin API listens: plain HTTP on a loopback address, HTTPS everywhere else.
//!
//! On a non-loopback address the admin credential and machine data would cross the network, so
//! the listener serves only TLS, with a certificate issued at start by the server's own CA (the
//! `ca.crt` the agents pin) for the bound address — every local interface address when bound to
//! `0.0.0.0` or `::` — the host name, and the names given with `--admin-cert-san`. There is no way
//! to serve plain HTTP on a non-loopback address.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::Shared;

/// How the admin API talks on an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP: only on loopback.
    Plain,
    /// HTTPS with a certificate from the server CA.
    Tls,
}

/// The loopback decision: plain HTTP only when the bound address is a loopback address
/// (127.0.0.0/8, ::1, or ::ffff:127.x); an unspecified address (`0.0.0.0`, `::`) is not.
pub fn transport_for(addr: &SocketAddr) -> Transport {
    if addr.ip().to_canonical().is_loopback() {
        Transport::Plain
    } else {
        Transport::Tls
    }
}

/// The serve options of the admin API.
#[derive(Clone, Debug, Default)]
pub struct AdminOptions {
    /// `/metrics` answers without a credential (it then shows machine ids and device paths to
    /// anyone who can reach the admin address).
    pub metrics_public: bool,
    /// Extra names (host names or IP addresses) for the HTTPS certificate.
    pub cert_sans: Vec<String>,
    /// HTTPS on a loopback address too (the address was given as `https://`).
    pub force_tls: bool,
}

/// The admin API's listener with its transport decided.
pub struct Endpoint {
    tcp: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    names: Vec<String>,
    metrics_public: bool,
}

impl Endpoint {
    /// Decides the transport from the bound address; for HTTPS issues the certificate (a failure
    /// stops the start: a non-loopback admin address never falls back to plain HTTP).
    pub fn new(tcp: TcpListener, shared: &Shared, opts: &AdminOptions) -> anyhow::Result<Self> {
        let local = tcp.local_addr().context("admin listener address")?;
        let transport = match transport_for(&local) {
            Transport::Plain if !opts.force_tls => Transport::Plain,
            _ => Transport::Tls,
        };
        let (tls, names) = match transport {
            Transport::Plain => (None, Vec::new()),
            Transport::Tls => {
                let names = cert_names(local.ip(), &opts.cert_sans);
                let cfg = crate::pki::admin_tls(&shared.data_dir, &names).with_context(|| {
                    format!(
                        "issue the admin API's HTTPS certificate for {local} (a non-loopback \
                         admin address is served only over HTTPS)"
                    )
                })?;
                (Some(Arc::new(cfg)), names)
            }
        };
        Ok(Self {
            tcp,
            tls,
            names,
            metrics_public: opts.metrics_public,
        })
    }

    pub fn transport(&self) -> Transport {
        if self.tls.is_some() {
            Transport::Tls
        } else {
            Transport::Plain
        }
    }

    /// The names in the HTTPS certificate (empty for plain HTTP).
    pub fn cert_names(&self) -> &[String] {
        &self.names
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves the admin API until `shutdown` resolves.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = super::router(shared, self.metrics_public);
        match self.tls {
            None => {
                axum::serve(self.tcp, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(cfg) => {
                axum::serve(TlsListener::new(self.tcp, cfg), app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    }
}

/// Handshakes at most this many connections at once; more wait in the TCP backlog.
const HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS listener for axum: a task accepts TCP connections and handshakes each on its own task
/// (so a slow or silent peer holds up no one), handing over the finished ones. A peer that does
/// not speak TLS (a plain HTTP request) fails its handshake and is closed.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: std::io::Result<SocketAddr>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(tcp: TcpListener, cfg: Arc<rustls::ServerConfig>) -> Self {
        let local = tcp.local_addr();
        let (tx, ready) = tokio::sync::mpsc::channel(HANDSHAKES);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin API: TLS handshake timed out"),
                    }
                });
            }
        });
        Self {
            ready,
            local,
            accept_task,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (it only does when the runtime shuts down): accept no more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// The names of the HTTPS certificate for a listener bound to `ip`: that address (or, for
/// `0.0.0.0`/`::`, every local interface address), the host name, `localhost`, and `extra`.
pub fn cert_names(ip: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    if ip.is_unspecified() {
        names.extend(local_addresses().iter().map(IpAddr::to_string));
        names.push("localhost".into());
    } else {
        names.push(ip.to_canonical().to_string());
    }
    if let Ok(h) = nix::unistd::gethostname() {
        let dns = |h: &&str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if let Some(h) = h.to_str().filter(dns) {
            names.push(h.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The IPv4 and IPv6 addresses of the local interfaces (loopback included); empty when they
/// cannot be listed.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; on success we walk it and free it
    // below, exactly once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says which
            // sockaddr_* it is; we read it as that type only.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                // Link-local addresses need a zone, which a URL host cannot carry here.
                if ip.segments()[0] & 0xffc0 != 0xfe80 {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once; no node is used after.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Transport {
        transport_for(&s.parse().unwrap())
    }

    #[test]
    fn loopback_is_plain_everything_else_is_tls() {
        assert_eq!(t("127.0.0.1:1501"), Transport::Plain);
        assert_eq!(t("127.0.0.2:1501"), Transport::Plain);
        assert_eq!(t("[::1]:1501"), Transport::Plain);
        assert_eq!(t("[::ffff:127.0.0.1]:1501"), Transport::Plain);
        assert_eq!(t("0.0.0.0:1501"), Transport::Tls);
        assert_eq!(t("[::]:1501"), Transport::Tls);
        assert_eq!(t("192.0.2.2:1501"), Transport::Tls);
        assert_eq!(t("10.0.0.1:0"), Transport::Tls);
        assert_eq!(t("[2001:db8::1]:1501"), Transport::Tls);
        assert_eq!(t("[::ffff:10.0.0.1]:1501"), Transport::Tls);
    }

    #[test]
    fn certificate_names() {
        let n = cert_names("192.0.2.7".parse().unwrap(), &["admin.example".into()]);
        assert_eq!(n[0], "192.0.2.7");
        assert!(n.contains(&"admin.example".to_string()));
        let n = cert_names("0.0.0.0".parse().unwrap(), &[]);
        assert!(n.contains(&"127.0.0.1".to_string()), "{n:?}");
        assert!(n.contains(&"localhost".to_string()), "{n:?}");
        let mut dedup = n.clone();
        dedup.dedup();
        assert_eq!(n.len(), dedup.len());
    }
}
