//! Admission of agent connections before they log in. A connection is *unauthenticated* from its
//! `accept` until its `Hello` is authenticated; until then it is cheap to open and costs the server
//! memory and a file descriptor, so:
//! - [`Limits`] caps unauthenticated connections globally and per source address (IPv6: per /64);
//!   a connection over a cap is closed at once, before its TLS handshake;
//! - near the process's open-file limit, and whenever `accept` fails for lack of descriptors, the
//!   oldest unauthenticated connections are shed ([`Admission::shed_oldest`]); an authenticated
//!   agent is never shed;
//! - [`raise_nofile_limit`] raises the soft open-file limit to the hard one at start;
//! - [`RateLimit`] keeps the logs a peer can trigger to one line per period.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Caps on connections that have not logged in yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Unauthenticated connections at once, from everywhere.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections at once from one address (IPv6: one /64).
    pub max_unauthenticated_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unauthenticated: 512,
            max_unauthenticated_per_address: 64,
        }
    }
}

/// Why a new connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Global,
    PerAddress,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "too many connections that have not logged in",
            Refusal::PerAddress => "too many connections from this address that have not logged in",
        }
    }
}

#[derive(Default)]
struct Inner {
    next: u64,
    total: usize,
    /// Most unauthenticated connections at once since memory was last given back.
    peak: usize,
    per_addr: HashMap<IpAddr, usize>,
    /// Unauthenticated connections not yet asked to go, oldest first.
    queue: BTreeMap<u64, Arc<Notify>>,
}

/// The unauthenticated connections of one listener.
pub struct Admission {
    limits: Limits,
    inner: Mutex<Inner>,
    /// Peer-triggered log lines about pre-login connections that failed (TLS, Hello).
    pub log: RateLimit,
    /// Connections closed at once for being over a cap.
    pub refused_log: RateLimit,
    /// Shedding near the open-file limit and failed accepts: the server's own state.
    pub pressure_log: RateLimit,
    /// Refused credentials (anyone can send a wrong one), apart so that noise does not hide them.
    pub auth_log: RateLimit,
}

/// Counts the key an address is capped under: the address itself, or an IPv6 address's /64.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            inner: Mutex::new(Inner::default()),
            log: RateLimit::new(Duration::from_secs(10)),
            auth_log: RateLimit::new(Duration::from_secs(10)),
            pressure_log: RateLimit::new(Duration::from_secs(10)),
            refused_log: RateLimit::new(Duration::from_secs(10)),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip` as unauthenticated, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let key = addr_key(ip);
        let mut g = self.inner();
        if g.total >= self.limits.max_unauthenticated {
            return Err(Refusal::Global);
        }
        let n = g.per_addr.entry(key).or_insert(0);
        if *n >= self.limits.max_unauthenticated_per_address {
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        g.total += 1;
        g.peak = g.peak.max(g.total);
        g.next += 1;
        let id = g.next;
        let shed = Arc::new(Notify::new());
        g.queue.insert(id, shed.clone());
        Ok(Ticket {
            admission: self.clone(),
            id,
            key,
            shed,
            held: true,
        })
    }

    /// Asks the `n` oldest unauthenticated connections to close; returns how many were asked.
    pub fn shed_oldest(&self, n: usize) -> usize {
        let mut g = self.inner();
        let mut asked = 0;
        while asked < n {
            let Some((_, shed)) = g.queue.pop_first() else {
                break;
            };
            // A stored permit: the connection sees it even if it is not waiting right now.
            shed.notify_one();
            asked += 1;
        }
        asked
    }

    /// Whether many unauthenticated connections have come and gone since the last call that said
    /// so: then the memory they used is worth giving back to the system ([`give_back_memory`]).
    pub fn memory_to_give_back(&self) -> bool {
        let mut g = self.inner();
        if g.peak >= TRIM_AFTER && g.total <= g.peak / 4 {
            g.peak = g.total;
            return true;
        }
        false
    }

    /// Unauthenticated connections now.
    pub fn unauthenticated(&self) -> usize {
        self.inner().total
    }

    fn release(&self, id: u64, key: IpAddr) {
        let mut g = self.inner();
        g.queue.remove(&id);
        g.total -= 1;
        if let Some(n) = g.per_addr.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                g.per_addr.remove(&key);
            }
        }
    }
}

/// One admitted connection's place among the unauthenticated ones, until it logs in or ends.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    key: IpAddr,
    shed: Arc<Notify>,
    held: bool,
}

impl Ticket {
    /// Resolves when the server asks this connection to close to make room. Never resolves once
    /// the connection has logged in.
    pub async fn shed(&self) {
        if self.held {
            self.shed.notified().await
        } else {
            std::future::pending().await
        }
    }

    /// The connection logged in: it no longer counts against the caps and is never shed.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.held) {
            self.admission.release(self.id, self.key);
        }
    }

    pub fn is_authenticated(&self) -> bool {
        !self.held
    }

    /// The listener's admission state (for its rate-limited log).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// At most one log line per `period`; the next allowed line reports how many were held back.
pub struct RateLimit {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub fn new(period: Duration) -> Self {
        RateLimit {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.period) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// A flood of this many unauthenticated connections, once mostly gone, is followed by
/// [`give_back_memory`].
const TRIM_AFTER: usize = 64;

/// Returns the allocator's free memory to the system. glibc keeps what a flood's connections
/// freed in its per-thread arenas (measured: 80 MiB still resident after 1,000 connections
/// closed); `malloc_trim` releases it.
pub fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The open-file limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

fn getrlimit() -> std::io::Result<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The process's soft open-file limit now.
pub fn nofile_soft_limit() -> std::io::Result<u64> {
    Ok(getrlimit()?.rlim_cur)
}

/// Raises the soft open-file limit to the hard limit (to the kernel's `nr_open` if the hard limit
/// is unlimited), so that the default soft limit of 1,024 does not cap the agents served.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    let mut r = getrlimit()?;
    let before = r.rlim_cur;
    let mut want = r.rlim_max;
    if want == libc::RLIM_INFINITY {
        want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if want > r.rlim_cur {
        r.rlim_cur = want;
        // SAFETY: `r` is a valid rlimit whose soft value does not exceed its hard value.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let now = getrlimit()?;
    Ok(NofileLimit {
        before,
        soft: now.rlim_cur,
        hard: now.rlim_max,
    })
}

/// Whether an `accept` error means the process or the system is out of file descriptors.
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Descriptors kept free for what the server opens besides connections (volumes, catalog, store,
/// admin API): when an accepted connection's descriptor number comes this close to the soft limit,
/// the oldest unauthenticated connections are shed.
pub fn fd_reserve(soft_limit: u64) -> u64 {
    (soft_limit / 8).max(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_count_per_address_and_globally_and_free_on_login_or_drop() {
        let a = Admission::new(Limits {
            max_unauthenticated: 3,
            max_unauthenticated_per_address: 2,
        });
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let mut t2 = a.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refusal::PerAddress));
        let t3 = a.admit(ip("2001:db8::1")).unwrap();
        // Same /64: the same address as far as the cap goes; and the global cap is reached.
        assert_eq!(a.admit(ip("2001:db8::2")).err(), Some(Refusal::Global));
        t2.authenticated();
        assert!(t2.is_authenticated());
        assert_eq!(a.unauthenticated(), 2);
        let t4 = a.admit(ip("10.0.0.1")).unwrap();
        drop((t1, t3, t4));
        drop(t2);
        assert_eq!(a.unauthenticated(), 0);
        assert!(a.inner().per_addr.is_empty());
    }

    #[tokio::test]
    async fn shedding_asks_the_oldest_unauthenticated_first() {
        let a = Admission::new(Limits::default());
        let old = a.admit(ip("10.0.0.1")).unwrap();
        let mut agent = a.admit(ip("10.0.0.2")).unwrap();
        agent.authenticated();
        let new = a.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(a.shed_oldest(1), 1);
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, old.shed()).await.is_ok());
        assert!(tokio::time::timeout(quick, new.shed()).await.is_err());
        assert!(tokio::time::timeout(quick, agent.shed()).await.is_err());
        // The logged-in connection is never among those asked.
        assert_eq!(a.shed_oldest(10), 1);
        assert!(tokio::time::timeout(quick, new.shed()).await.is_ok());
        assert!(tokio::time::timeout(quick, agent.shed()).await.is_err());
    }

    #[test]
    fn memory_is_given_back_once_after_a_flood_has_mostly_gone() {
        let a = Admission::new(Limits::default());
        let mut flood: Vec<Ticket> = (0..TRIM_AFTER)
            .map(|i| a.admit(IpAddr::from([10, 0, (i / 60) as u8, 1])).unwrap())
            .collect();
        assert!(!a.memory_to_give_back(), "the flood is still there");
        flood.truncate(TRIM_AFTER / 4);
        assert!(a.memory_to_give_back());
        assert!(!a.memory_to_give_back(), "once per flood");
        drop(flood);
        assert!(!a.memory_to_give_back());
        give_back_memory();
    }

    #[test]
    fn rate_limit_counts_what_it_holds_back() {
        let r = RateLimit::new(Duration::from_millis(100));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(r.check(), Some(2));
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let l = raise_nofile_limit().unwrap();
        assert!(l.soft >= l.before);
        assert!(l.soft == l.hard || l.hard == libc::RLIM_INFINITY);
        assert_eq!(nofile_soft_limit().unwrap(), l.soft);
    }
}
