//! Keepalive and stall detection for one connection to the server.
//!
//! A peer that stops reading without closing (a stuck proxy, a dead link with no reset) leaves
//! TCP writes blocked forever, so the agent watches what it hears back:
//! - on connecting and then every `keepalive` it sends a `Ping`; a server that echoes pings (this
//!   one does) proves it is alive even when nothing is in flight. A server that has never echoed
//!   (in this agent process) is not expected to;
//! - a **dead** connection is one from which nothing at all has been heard for `stall` while
//!   something was expected: frames sent and not acknowledged, or a ping not echoed. The
//!   connection is then torn down (the agent reconnects with backoff and resends what was not
//!   acknowledged) and `status` shows `stalled` with the reason;
//! - a **slow** server is one that still answers pings but has acknowledged nothing for `stall`
//!   while frames are in flight (its storage is behind): `status` shows `stalled`, the connection
//!   stays, since a new one would not make the server's disk faster.
//!
//! Beside it, the socket has TCP keepalive and `TCP_USER_TIMEOUT`, so the kernel also gives up on
//! a peer that acknowledges nothing at the TCP level (see [`tune_socket`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rehost_proto::Message;
use tokio::sync::{mpsc, watch};

/// How often the agent pings, and how long it waits for the server before calling the
/// connection stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub keepalive: Duration,
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(10),
            stall: Duration::from_secs(30),
        }
    }
}

/// Sets TCP keepalive (first probe after `keepalive`, then every `keepalive`, 3 probes) and
/// `TCP_USER_TIMEOUT` (unacknowledged data for `stall` plus one keepalive period ends the
/// connection) on the socket. Best effort: a failure is logged, the connection still works.
pub fn tune_socket(tcp: &tokio::net::TcpStream, t: &Timeouts) {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as u32;
    let user_ms = (t.stall + t.keepalive)
        .as_millis()
        .clamp(1000, u32::MAX as u128) as u32;
    let r = setsockopt(tcp, sockopt::KeepAlive, &true)
        .and_then(|_| setsockopt(tcp, sockopt::TcpKeepIdle, &secs(t.keepalive)))
        .and_then(|_| setsockopt(tcp, sockopt::TcpKeepInterval, &secs(t.keepalive)))
        .and_then(|_| setsockopt(tcp, sockopt::TcpKeepCount, &3))
        .and_then(|_| setsockopt(tcp, sockopt::TcpUserTimeout, &user_ms));
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot set TCP keepalive / user timeout on the connection");
    }
}

/// A server of this agent process has echoed a ping: later connections expect echoes from the
/// start, so one that stalls before its first echo is noticed too.
static SERVER_ECHOES: AtomicBool = AtomicBool::new(false);

/// What the inbound side has heard, shared with the watchdog.
#[derive(Debug)]
struct Heard {
    /// Last frame of any kind from the server.
    any: Instant,
    /// Last time the acknowledged watermark advanced.
    ack: Instant,
    /// The server has echoed a ping on this connection.
    echoes: bool,
    /// The ping sent and not yet echoed: (nonce, when).
    ping: Option<(u64, Instant)>,
}

/// The watchdog's shared state for one connection.
#[derive(Debug)]
pub struct Liveness {
    heard: Mutex<Heard>,
    /// The highest sequence number handed to the outbound task.
    pub sent_seq: AtomicU64,
    /// Why the server counts as slow (status only), if it does.
    slow: Mutex<Option<String>>,
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            heard: Mutex::new(Heard {
                any: now,
                ack: now,
                echoes: SERVER_ECHOES.load(Ordering::Relaxed),
                ping: None,
            }),
            sent_seq: AtomicU64::new(0),
            slow: Mutex::new(None),
        })
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frame arrived; `ack_advanced` when it moved the acknowledged watermark.
    pub fn frame(&self, ack_advanced: bool) {
        let mut h = self.heard();
        h.any = Instant::now();
        if ack_advanced {
            h.ack = h.any;
        }
    }

    /// The server echoed ping `nonce`.
    pub fn echo(&self, nonce: u64) {
        let mut h = self.heard();
        if !h.echoes {
            tracing::debug!(nonce, "the server echoes keepalive pings");
        }
        h.echoes = true;
        SERVER_ECHOES.store(true, Ordering::Relaxed);
        if h.ping.is_some_and(|(n, _)| n == nonce) {
            h.ping = None;
        }
    }

    /// Why the server counts as slow right now (it answers, but acknowledges nothing).
    pub fn slow(&self) -> Option<String> {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().round() as u64
}

/// Runs for the life of a connection: pings every `keepalive`, and once the connection is dead
/// sends the reason on `dead` (the inbound and outbound tasks end on it).
pub async fn watch(
    live: Arc<Liveness>,
    t: Timeouts,
    acked: watch::Receiver<u64>,
    out: mpsc::Sender<Message>,
    dead: watch::Sender<Option<String>>,
) {
    let tick =
        (t.keepalive.min(t.stall) / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first ping goes out at once.
    let mut last_ping = Instant::now()
        .checked_sub(t.keepalive)
        .unwrap_or_else(Instant::now);
    // Since when frames have been outstanding (reset whenever nothing is).
    let mut outstanding_since: Option<Instant> = None;
    let mut nonce = 0u64;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let acked_to = *acked.borrow();
        let sent = live.sent_seq.load(Ordering::Acquire);
        let in_flight = sent.saturating_sub(acked_to);
        if in_flight == 0 {
            outstanding_since = None;
        } else if outstanding_since.is_none() {
            outstanding_since = Some(now);
        }
        let (any, ack, echoes, ping) = {
            let h = live.heard();
            (h.any, h.ack, h.echoes, h.ping)
        };
        let mut dead_for = None;
        if let Some(since) = outstanding_since {
            let silent = now - since.max(any);
            if silent >= t.stall {
                dead_for = Some(format!(
                    "no acknowledgement from the server for {} s ({in_flight} frames in flight)",
                    secs(silent)
                ));
            }
            let unacked = now - since.max(ack);
            let slow = (unacked >= t.stall).then(|| {
                format!(
                    "the server answers but has acknowledged nothing for {} s ({in_flight} frames in flight): its storage may be slow",
                    secs(unacked)
                )
            });
            *live.slow.lock().unwrap_or_else(|p| p.into_inner()) = slow;
        } else {
            *live.slow.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let (true, Some((_, at)), None) = (echoes, ping, &dead_for) {
            let silent = now - at.max(any);
            if silent >= t.stall {
                dead_for = Some(format!(
                    "no answer to keepalives from the server for {} s",
                    secs(silent)
                ));
            }
        }
        tracing::trace!(in_flight, echoes, ?ping, since_heard = ?(now - any), "watchdog");
        if let Some(reason) = dead_for {
            let _ = dead.send(Some(reason));
            return;
        }
        if ping.is_none() && now - last_ping >= t.keepalive {
            nonce += 1;
            // Recorded before it is sent, so an echo cannot arrive before it is expected.
            live.heard().ping = Some((nonce, now));
            // A full queue means the link is busy, and the ack timeout watches it.
            if out.try_send(Message::Ping { nonce }).is_ok() {
                last_ping = now;
            } else {
                live.heard().ping = None;
            }
        }
    }
}
