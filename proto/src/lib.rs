//! The rehost wire protocol between `rehost-agent` and `rehost-server`.
//!
//! - [`wire`]: the prost messages as they travel (untrusted);
//! - [`msg`]: checked domain types ([`Message`]), built with `TryFrom` at the boundary;
//! - [`state`]: a disk's replication state as operators see it (`status`, `machines`);
//! - [`frame`]: length-prefixed framing with a hard size cap;
//! - [`token`]: install tokens (server pin + registration secret);
//! - [`fsutil`]: the crash-safe write recipe for small persisted files.
//!
//! # Transport
//! TLS 1.3 only, on TCP 1500 by default. The server presents a certificate for [`SERVER_NAME`]
//! issued by its own CA; the agent trusts exactly the CA whose blake3 digest is pinned in the install
//! token (and later in its state). Nothing is trusted on first use.
//!
//! # Sequence
//! ```text
//! agent                                             server
//!   │ Hello{versions, Register{token, hostname,       │
//!   │        source_id} | Machine{id, secret}, disks} │
//!   │ ───────────────────────────────────────────────▶│ check version range, token or credential
//!   │◀─────────────────────────────────────────────── │ Welcome{version, machine_id, [secret],
//!   │                                                 │         DiskGrant{disk_id, size, block_size,
//!   │                                                 │                   durable_bytes, sync_complete}}
//!   │        (or Error{code, message} and close)      │
//!   │ IndexRequest{disk, start, count}  (rescan only) │
//!   │ ───────────────────────────────────────────────▶│
//!   │◀─────────────────────────────────────────────── │ IndexChunk{disk, start, hashes}
//!   │ Block{seq, disk, offset, hash, zstd|none, data} │
//!   │ Zero{seq, disk, offset, length}                 │ verify bounds, ownership, blake3;
//!   │ Mark{seq, disk, initial-sync-done|rescan-done}  │ pwrite; group commit (fdatasync)
//!   │ Progress{disk, state, done, backlog}  (no seq)  │
//!   │ ───────────────────────────────────────────────▶│
//!   │◀─────────────────────────────────────────────── │ Ack{seq}: everything up to seq is durable
//!   │               ... until either side closes ...  │
//! ```
//! `seq` numbers are per connection, start at 1 and increase by one for each Block, Zero and Mark.
//! An `Ack` is cumulative. After a reconnect the agent starts again from what the server reports as
//! durable in the `Welcome`, so whatever was not acknowledged is sent again. Any protocol violation
//! is answered with an `Error` frame and the connection is closed.

pub mod error;
pub mod frame;
pub mod fsutil;
pub mod human;
pub mod msg;
pub mod process;
pub mod state;
pub mod token;
pub mod wire;

pub use msg::{DiskId, Hash, MachineId, Message};

/// Protocol versions this build speaks. Both sides send their range in the handshake and use the
/// highest version both speak, so an agent one version behind its server keeps replicating.
/// - 1: the first.
/// - 2: `Detach` (an agent being uninstalled tells the server); `Progress.backlog_lower_bound`.
pub const PROTOCOL_VERSION: u32 = 2;
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first version with [`msg::Message::Detach`].
pub const DETACH_VERSION: u32 = 2;

/// Largest frame body accepted (bytes). Checked before allocating.
pub const MAX_FRAME: usize = 2 << 20;
/// Largest frame a server reads before the peer has authenticated (its `Hello`): enough for the
/// largest legitimate Hello, 256 disks whose device paths are up to 230 bytes each with the
/// longest hostname and agent version (see the `hello_cap_fits_the_largest_legitimate_hello`
/// test), and small enough that unauthenticated connections cost little memory.
pub const MAX_HELLO_FRAME: usize = 64 << 10;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default replication block size: the granularity of the hash index and of rescans.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest number of hashes in one index chunk.
pub const MAX_INDEX_CHUNK: u32 = 16 * 1024;
/// TLS server name the server certificate is issued for, whatever address the agent dials.
pub const SERVER_NAME: &str = "rehost-server";
pub const DEFAULT_PORT: u16 = 1500;

/// A frame body that is not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed protobuf: {0}")]
    Prost(String),
    #[error("missing or invalid field `{0}`")]
    Field(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection i/o")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the size limit")]
    TooLarge(usize),
    #[error("bad frame")]
    Decode(#[from] DecodeError),
}

/// The blake3 digest of an all-zero block of `len` bytes.
pub fn zero_hash(len: usize) -> Hash {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) {
    msg::getrandom_fill(buf)
}
