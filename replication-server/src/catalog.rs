//! The catalog: tokens, machines and disks (and, in `snapshot::rows` and `launch::rows`, recovery
//! points, blueprints, jobs and lifecycle transitions) in SQLite (WAL, `synchronous=FULL`). Calls are
//! synchronous and short; async callers go through `spawn_blocking`.

use std::path::Path;
use std::sync::Mutex;

use rehost_proto::msg::DiskInfo;
use rehost_proto::{DiskId, Hash, MachineId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database")]
    Db(#[from] rusqlite::Error),
    #[error("catalog schema version {0} is newer than this server understands ({SCHEMA_VERSION})")]
    Schema(i64),
}

const SCHEMA_VERSION: i64 = 4;

use crate::launch::rows::MIGRATE_4;

const SCHEMA: &str = "
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    registrations INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    source_id BLOB NOT NULL UNIQUE,
    secret_hash BLOB NOT NULL,
    token_id TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER,
    revoked_at INTEGER,
    lifecycle TEXT NOT NULL DEFAULT 'not-ready'
);
CREATE TABLE disks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    device TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    durable_bytes INTEGER NOT NULL DEFAULT 0,
    sync_complete INTEGER NOT NULL DEFAULT 0,
    last_rescan_at INTEGER,
    UNIQUE (machine_id, device)
);
";

/// Version 3: the bandwidth cap the operator set for a machine's agent.
const MIGRATE_3: &str = "ALTER TABLE machines ADD COLUMN max_mbps INTEGER;";

/// Version 2: recovery points (see `snapshot`) and retention policies.
const MIGRATE_2: &str = "
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    consistency TEXT NOT NULL CHECK (consistency IN ('crash', 'app')),
    state TEXT NOT NULL CHECK (state IN ('creating', 'complete', 'deleting')),
    reason TEXT NOT NULL DEFAULT 'manual',
    bytes_added INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER
);
CREATE INDEX snapshots_by_machine ON snapshots (machine_id, id);
CREATE TABLE snapshot_disks (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    disk_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    root BLOB NOT NULL,
    PRIMARY KEY (snapshot_id, disk_id)
);
CREATE TABLE retention (
    machine_id TEXT PRIMARY KEY,
    policy TEXT NOT NULL
);
";

/// Seconds since the epoch.
pub fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn secret_hash(secret: &[u8]) -> Vec<u8> {
    blake3::hash(secret).as_bytes().to_vec()
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    pub id: String,
    pub description: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub registrations: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MachineRow {
    pub id: String,
    pub hostname: String,
    pub registered_at: i64,
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
    pub lifecycle: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskRow {
    pub id: u64,
    pub device: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub durable_bytes: u64,
    pub sync_complete: bool,
}

/// Why a token or machine credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Revoked,
    Expired,
}

pub struct Catalog {
    conn: Mutex<Connection>,
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        // Created 0600 before SQLite opens it: its -wal and -shm files take the same mode. (A
        // failure here shows as SQLite's own error just below.)
        if !path.exists() {
            let _ = crate::private::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path);
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} {MIGRATE_2} {MIGRATE_3} {MIGRATE_4} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            1 => conn.execute_batch(&format!(
                "BEGIN; {MIGRATE_2} {MIGRATE_3} {MIGRATE_4} PRAGMA user_version = 4; COMMIT;"
            ))?,
            2 => conn.execute_batch(&format!(
                "BEGIN; {MIGRATE_3} {MIGRATE_4} PRAGMA user_version = 4; COMMIT;"
            ))?,
            3 => conn.execute_batch(&format!(
                "BEGIN; {MIGRATE_4} PRAGMA user_version = 4; COMMIT;"
            ))?,
            SCHEMA_VERSION => {}
            v => return Err(CatalogError::Schema(v)),
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, CatalogError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut c)?)
    }

    pub fn create_token(
        &self,
        id: &str,
        secret: &[u8],
        description: &str,
        expires_at: Option<i64>,
    ) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, secret_hash, description, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, secret_hash(secret), description, now(), expires_at],
            )
            .map(drop)
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>, CatalogError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, description, created_at, expires_at, revoked_at, registrations FROM tokens ORDER BY created_at, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(TokenRow {
                    id: r.get(0)?,
                    description: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    revoked_at: r.get(4)?,
                    registrations: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Returns false when no such token exists.
    pub fn revoke_token(&self, id: &str) -> Result<bool, CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, now()],
            )
            .map(|n| n > 0)
        })
    }

    pub fn check_token(
        &self,
        id: &str,
        secret: &[u8],
    ) -> Result<Result<(), Refusal>, CatalogError> {
        self.with(|c| {
            let row: Option<(Vec<u8>, Option<i64>, Option<i64>)> = c
                .query_row(
                    "SELECT secret_hash, expires_at, revoked_at FROM tokens WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            Ok(match row {
                None => Err(Refusal::Unknown),
                Some((h, _, _)) if h != secret_hash(secret) => Err(Refusal::Unknown),
                Some((_, _, Some(_))) => Err(Refusal::Revoked),
                Some((_, Some(exp), _)) if exp <= now() => Err(Refusal::Expired),
                Some(_) => Ok(()),
            })
        })
    }

    /// Registers a source (or re-registers a known one, identified by its source id) and gives it a
    /// new credential. Returns the machine id and whether it was already known.
    pub fn register_machine(
        &self,
        hostname: &str,
        source_id: &Hash,
        token_id: &str,
        secret: &[u8],
    ) -> Result<(MachineId, bool), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let existing: Option<String> = tx
                .query_row("SELECT id FROM machines WHERE source_id = ?1", [&source_id[..]], |r| r.get(0))
                .optional()?;
            let known = existing.is_some();
            let id = match existing.and_then(|s| MachineId::parse(&s).ok()) {
                Some(id) => {
                    tx.execute(
                        "UPDATE machines SET hostname = ?2, secret_hash = ?3, token_id = ?4, revoked_at = NULL WHERE id = ?1",
                        params![id.as_str(), hostname, secret_hash(secret), token_id],
                    )?;
                    id
                }
                None => {
                    let id = MachineId::random();
                    tx.execute(
                        "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id.as_str(), hostname, &source_id[..], secret_hash(secret), token_id, now()],
                    )?;
                    id
                }
            };
            tx.execute("UPDATE tokens SET registrations = registrations + 1 WHERE id = ?1", [token_id])?;
            tx.commit()?;
            Ok((id, known))
        })
    }

    pub fn check_machine(
        &self,
        id: &MachineId,
        secret: &[u8],
    ) -> Result<Result<(), Refusal>, CatalogError> {
        self.with(|c| {
            let row: Option<(Vec<u8>, Option<i64>)> = c
                .query_row(
                    "SELECT secret_hash, revoked_at FROM machines WHERE id = ?1",
                    [id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(match row {
                None => Err(Refusal::Unknown),
                Some((h, _)) if h != secret_hash(secret) => Err(Refusal::Unknown),
                Some((_, Some(_))) => Err(Refusal::Revoked),
                Some(_) => Ok(()),
            })
        })
    }

    pub fn revoke_machine(&self, id: &str) -> Result<bool, CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, now()],
            )
            .map(|n| n > 0)
        })
    }

    /// Sets (or, with `None`, removes) the bandwidth cap of a machine's agent.
    pub fn set_max_mbps(&self, id: &str, mbps: Option<u64>) -> Result<bool, CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET max_mbps = ?2 WHERE id = ?1",
                params![id, mbps.map(|m| m as i64)],
            )
            .map(|n| n > 0)
        })
    }

    pub fn max_mbps(&self, id: &str) -> Result<Option<u64>, CatalogError> {
        self.with(|c| {
            c.query_row("SELECT max_mbps FROM machines WHERE id = ?1", [id], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()
            .map(|v| v.flatten().map(|m| m as u64))
        })
    }

    pub fn touch_machine(&self, id: &MachineId) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET last_seen = ?2 WHERE id = ?1",
                params![id.as_str(), now()],
            )
            .map(drop)
        })
    }

    /// Makes sure every reported disk has a row; a disk whose size changed starts its sync again
    /// (its volume is resized by the caller, its hash index kept for the rescan).
    pub fn ensure_disks(
        &self,
        machine: &MachineId,
        disks: &[DiskInfo],
        block_size: u32,
    ) -> Result<Vec<DiskRow>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut out = Vec::new();
            for d in disks {
                let row: Option<(u64, u64)> = tx
                    .query_row(
                        "SELECT id, size_bytes FROM disks WHERE machine_id = ?1 AND device = ?2",
                        params![machine.as_str(), d.device],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                match row {
                    None => {
                        tx.execute(
                            "INSERT INTO disks (machine_id, device, size_bytes, block_size) VALUES (?1, ?2, ?3, ?4)",
                            params![machine.as_str(), d.device, d.size_bytes, block_size],
                        )?;
                    }
                    Some((id, size)) if size != d.size_bytes => {
                        tx.execute(
                            "UPDATE disks SET size_bytes = ?2, durable_bytes = MIN(durable_bytes, ?2), sync_complete = 0 WHERE id = ?1",
                            params![id, d.size_bytes],
                        )?;
                    }
                    Some(_) => {}
                }
                out.push(tx.query_row(
                    "SELECT id, device, size_bytes, block_size, durable_bytes, sync_complete FROM disks WHERE machine_id = ?1 AND device = ?2",
                    params![machine.as_str(), d.device],
                    disk_row,
                )?);
            }
            tx.commit()?;
            Ok(out)
        })
    }

    pub fn set_durable(&self, updates: &[(DiskId, u64)]) -> Result<(), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            for (id, bytes) in updates {
                tx.execute(
                    "UPDATE disks SET durable_bytes = MAX(durable_bytes, ?2) WHERE id = ?1",
                    params![id.0, bytes],
                )?;
            }
            tx.commit()
        })
    }

    pub fn set_sync_complete(&self, id: DiskId) -> Result<(), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE disks SET sync_complete = 1, durable_bytes = size_bytes WHERE id = ?1", [id.0])?;
            // A machine whose disks have all finished their initial sync can be tested.
            tx.execute(
                "INSERT INTO lifecycle_log (machine_id, at, from_state, to_state, reason)
                   SELECT id, ?2, 'not-ready', 'ready-for-testing', 'initial sync complete' FROM machines
                   WHERE lifecycle = 'not-ready' AND id = (SELECT machine_id FROM disks WHERE id = ?1)
                   AND NOT EXISTS (SELECT 1 FROM disks d WHERE d.machine_id = machines.id AND d.sync_complete = 0)",
                params![id.0, now()],
            )?;
            tx.execute(
                "UPDATE machines SET lifecycle = 'ready-for-testing' WHERE lifecycle = 'not-ready'
                   AND id = (SELECT machine_id FROM disks WHERE id = ?1)
                   AND NOT EXISTS (SELECT 1 FROM disks d WHERE d.machine_id = machines.id AND d.sync_complete = 0)",
                [id.0],
            )?;
            tx.commit()
        })
    }

    pub fn set_rescanned(&self, id: DiskId) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE disks SET last_rescan_at = ?2 WHERE id = ?1",
                params![id.0, now()],
            )
            .map(drop)
        })
    }

    pub fn machines(&self) -> Result<Vec<(MachineRow, Vec<DiskRow>)>, CatalogError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, hostname, registered_at, last_seen, revoked_at, lifecycle FROM machines ORDER BY registered_at, id",
            )?;
            let machines = st
                .query_map([], |r| {
                    Ok(MachineRow {
                        id: r.get(0)?,
                        hostname: r.get(1)?,
                        registered_at: r.get(2)?,
                        last_seen: r.get(3)?,
                        revoked_at: r.get(4)?,
                        lifecycle: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut ds = c.prepare(
                "SELECT id, device, size_bytes, block_size, durable_bytes, sync_complete FROM disks WHERE machine_id = ?1 ORDER BY id",
            )?;
            let mut out = Vec::new();
            for m in machines {
                let disks = ds.query_map([&m.id], disk_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                out.push((m, disks));
            }
            Ok(out)
        })
    }
}

fn disk_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DiskRow> {
    Ok(DiskRow {
        id: r.get(0)?,
        device: r.get(1)?,
        size_bytes: r.get(2)?,
        block_size: r.get(3)?,
        durable_bytes: r.get(4)?,
        sync_complete: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_catalog_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!("{SCHEMA} PRAGMA user_version = 1;"))
                .unwrap();
            c.execute(
                "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at)
                 VALUES ('m-old', 'old-host', x'01', x'02', 't', 1)",
                [],
            )
            .unwrap();
        }
        let cat = Catalog::open(&path).unwrap();
        let v: i64 = cat
            .with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(cat.machines().unwrap()[0].0.hostname, "old-host");
        let (m, _) = cat
            .register_machine("new-host", &[3; 32], "t", b"s")
            .unwrap();
        let id = cat.begin_snapshot(&m, "crash", "manual").unwrap();
        cat.finish_snapshot(id, &[(DiskId(1), 10, [9; 32])], 5, 1)
            .unwrap();
        assert_eq!(cat.snapshots(m.as_str()).unwrap()[0].state, "complete");
        drop(cat);
        // Reopening a current catalog changes nothing.
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.snapshots(m.as_str()).unwrap().len(), 1);
    }
}
