//! `rehost-agent`: the source side of replication. No kernel module: it reads the disks.
//!
//! - [`direct`]: reading a disk past the page cache (`O_DIRECT`, aligned buffers);
//! - [`disks`]: whole-disk discovery (`/sys/block`, `BLKGETSIZE64`), image files for tests;
//! - [`install`]: the installer (disks shown, registration with the install token, service);
//! - [`state`]: the persisted agent state (credential 0600) and the status file;
//! - [`tls`]: TLS 1.3 client that trusts only the CA pinned by the token;
//! - [`conn`]: handshake, send window, acknowledgements;
//! - [`watchdog`]: keepalive pings and stall detection for a connection (TCP keepalive too);
//! - [`pipeline`]: read → zero-detect → blake3 → zstd on worker threads, in disk order;
//! - [`progress`]: progress lines (percent, rate, time left) during an initial sync or rescan;
//! - [`replicate`]: the daemon: initial sync, resume, rescan, continuous replication, reconnect;
//! - [`tracker`]: change tracking (kernel block tracepoints through tracefs, or periodic scans);
//! - [`freeze`]: filesystem freezes for consistency points, with a thaw guard process;
//! - [`cleanstop`]: the dirty bitmap saved on a clean stop, so a restart needs no rescan;
//! - [`source`]: planned failover on the source (stop services, power off) during a cutover.

pub mod cleanstop;
pub mod conn;
pub mod direct;
pub mod disks;
pub mod freeze;
pub mod install;
pub mod pipeline;
pub mod progress;
pub mod replicate;
pub mod source;
pub mod state;
pub mod tls;
pub mod tracker;
pub mod uninstall;
pub mod watchdog;

/// The version this agent reports (installer, `status`, and its `Hello` to the server): the
/// crate's, or `REHOST_AGENT_VERSION` when set at build time (a packager's build stamp such as
/// `0.1.0+deb12u1`, or a test's rebuilt "newer" agent).
pub const VERSION: &str = match option_env!("REHOST_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
