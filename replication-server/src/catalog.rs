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
    #[error("catalog migration from version {0} left rows of table {1} without their parent")]
    Migration(i64, String),
}

pub(crate) const SCHEMA_VERSION: i64 = 6;

use crate::auth::MIGRATE_5;
use crate::launch::rows::MIGRATE_4;

/// The migration ladder: step `i` takes a catalog from version `i` to version `i + 1` (a new
/// catalog climbs every step). Each run of steps is one transaction.
pub(crate) const LADDER: [&str; SCHEMA_VERSION as usize] = [
    SCHEMA, MIGRATE_2, MIGRATE_3, MIGRATE_4, MIGRATE_5, MIGRATE_6,
];

/// Climbs the ladder from `from` to [`SCHEMA_VERSION`] in one transaction. Foreign keys are off
/// meanwhile (a step may rebuild a table others refer to, as v5 does) and checked before the
/// commit.
fn migrate(conn: &mut Connection, from: i64) -> Result<(), CatalogError> {
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let tx = conn.transaction()?;
    for step in &LADDER[from as usize..] {
        tx.execute_batch(step)?;
    }
    let broken: Option<String> = tx
        .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
        .optional()?;
    if let Some(table) = broken {
        return Err(CatalogError::Migration(from, table));
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Version 1: tokens, machines, disks.
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

/// Version 6: the agent's life cycle: the version of the agent last seen (set at each successful
/// handshake, kept while it is disconnected) and when and why an agent being uninstalled
/// detached its machine (cleared by the machine's next normal connection).
const MIGRATE_6: &str = "
ALTER TABLE machines ADD COLUMN agent_version TEXT;
ALTER TABLE machines ADD COLUMN detached_at INTEGER;
ALTER TABLE machines ADD COLUMN detached_reason TEXT;
";

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
    /// A reinstall token's machine (`token create --reinstall`); such a token is used once.
    pub machine_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MachineRow {
    pub id: String,
    pub hostname: String,
    pub registered_at: i64,
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
    pub lifecycle: String,
    /// The oldest other machine registered before this one with the same source id or hostname:
    /// a reinstall without the machine's credential, a cloned source, or someone claiming its
    /// name. Shown, never merged.
    pub duplicate_of: Option<String>,
    /// The version of the agent at its last successful handshake.
    pub agent_version: Option<String>,
    /// When and why the agent detached the machine (it was uninstalled); cleared by its next
    /// normal connection.
    pub detached_at: Option<i64>,
    pub detached_reason: Option<String>,
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
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if !(0..=SCHEMA_VERSION).contains(&version) {
            return Err(CatalogError::Schema(version));
        }
        if version < SCHEMA_VERSION {
            migrate(&mut conn, version)?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
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
                "SELECT id, description, created_at, expires_at, revoked_at, registrations, machine_id FROM tokens ORDER BY created_at, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(TokenRow {
                    id: r.get(0)?,
                    description: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    revoked_at: r.get(4)?,
                    registrations: r.get(5)?,
                    machine_id: r.get(6)?,
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

    /// Registers a new machine (always a new one: see [`crate::auth`]) and gives it `secret`.
    /// Returns its id and the oldest machine with the same source id or hostname, if any.
    pub fn register_machine(
        &self,
        hostname: &str,
        source_id: &Hash,
        token_id: &str,
        secret: &[u8],
    ) -> Result<(MachineId, Option<String>), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let r = crate::auth::insert_machine(&tx, hostname, source_id, token_id, secret)?;
            tx.commit()?;
            Ok(r)
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

    /// A successful handshake of `id`'s agent: its version is remembered, and a detached mark (an
    /// earlier uninstall) is cleared, since the agent is back (a reinstall).
    pub fn agent_connected(&self, id: &MachineId, agent_version: &str) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE machines SET agent_version = ?2, last_seen = ?3, detached_at = NULL, detached_reason = NULL WHERE id = ?1",
                params![id.as_str(), agent_version, now()],
            )
            .map(drop)
        })
    }

    /// The agent of `id` is being uninstalled and said so (`Hello.detach`): recorded durably,
    /// with a line in the machine's history (its lifecycle is unchanged).
    pub fn detach_machine(
        &self,
        id: &MachineId,
        agent_version: &str,
        reason: &str,
    ) -> Result<(), CatalogError> {
        let at = now();
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE machines SET agent_version = ?2, last_seen = ?3, detached_at = ?3, detached_reason = ?4 WHERE id = ?1",
                params![id.as_str(), agent_version, at, reason],
            )?;
            tx.execute(
                "INSERT INTO lifecycle_log (machine_id, at, from_state, to_state, reason)
                   SELECT id, ?2, lifecycle, lifecycle, ?3 FROM machines WHERE id = ?1",
                params![id.as_str(), at, reason],
            )?;
            tx.commit()
        })
    }

    /// Removes `id` and every catalog row of it: recovery points (their disks cascade), jobs and
    /// their logs, blueprint, retention policy, history, disks and the reinstall tokens bound to
    /// it, in one transaction. `Ok(Err(why))` when refused: a launch job of the machine runs, or
    /// one of its recovery points is being taken. Returns the ids of the disks it had.
    pub fn delete_machine(&self, id: &str) -> Result<Result<Vec<u64>, String>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let job: Option<(i64, String)> = tx
                .query_row(
                    "SELECT id, mode FROM jobs WHERE machine_id = ?1 AND state = 'running'",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((job, mode)) = job {
                return Ok(Err(format!(
                    "{mode} job {job} of machine {id} is running (wait for it to end: `rehost-server jobs {job} --follow`)"
                )));
            }
            let creating: Option<i64> = tx
                .query_row(
                    "SELECT id FROM snapshots WHERE machine_id = ?1 AND state = 'creating'",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(snap) = creating {
                return Ok(Err(format!(
                    "recovery point {snap} of machine {id} is being taken; try again when it is done"
                )));
            }
            let disks = tx
                .prepare("SELECT id FROM disks WHERE machine_id = ?1 ORDER BY id")?
                .query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<u64>>>()?;
            for sql in [
                "DELETE FROM snapshot_disks WHERE snapshot_id IN (SELECT id FROM snapshots WHERE machine_id = ?1)",
                "DELETE FROM snapshots WHERE machine_id = ?1",
                "DELETE FROM job_log WHERE job_id IN (SELECT id FROM jobs WHERE machine_id = ?1)",
                "DELETE FROM jobs WHERE machine_id = ?1",
                "DELETE FROM blueprints WHERE machine_id = ?1",
                "DELETE FROM retention WHERE machine_id = ?1",
                "DELETE FROM lifecycle_log WHERE machine_id = ?1",
                "DELETE FROM disks WHERE machine_id = ?1",
                "DELETE FROM tokens WHERE machine_id = ?1",
                "DELETE FROM machines WHERE id = ?1",
            ] {
                tx.execute(sql, [id])?;
            }
            tx.commit()?;
            Ok(Ok(disks))
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
        let rows = self.ensure_disks_with(machine, disks, block_size, |_, _| Ok::<_, ()>(()))?;
        Ok(rows
            .unwrap_or_default()
            .into_iter()
            .map(|(r, ())| r)
            .collect())
    }

    /// [`Catalog::ensure_disks`] with `prepare` (given each row and whether it is new) run inside
    /// the transaction: the rows are committed only if `prepare` succeeds for every disk, so a
    /// volume that cannot be created leaves no row behind. `prepare`'s first error is returned
    /// (after the rollback) as `Ok(Err(e))`.
    pub fn ensure_disks_with<T, E>(
        &self,
        machine: &MachineId,
        disks: &[DiskInfo],
        block_size: u32,
        mut prepare: impl FnMut(&DiskRow, bool) -> Result<T, E>,
    ) -> Result<Result<Vec<(DiskRow, T)>, E>, CatalogError> {
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
                let r = tx.query_row(
                    "SELECT id, device, size_bytes, block_size, durable_bytes, sync_complete FROM disks WHERE machine_id = ?1 AND device = ?2",
                    params![machine.as_str(), d.device],
                    disk_row,
                )?;
                match prepare(&r, row.is_none()) {
                    Ok(t) => out.push((r, t)),
                    // Dropping the transaction rolls it back.
                    Err(e) => return Ok(Err(e)),
                }
            }
            tx.commit()?;
            Ok(Ok(out))
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
                "SELECT id, hostname, registered_at, last_seen, revoked_at, lifecycle,
                   (SELECT o.id FROM machines o WHERE o.id != m.id
                      AND (o.source_id = m.source_id OR o.hostname = m.hostname)
                      AND o.rowid < m.rowid
                    ORDER BY o.rowid LIMIT 1),
                   agent_version, detached_at, detached_reason
                 FROM machines m ORDER BY registered_at, rowid",
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
                        duplicate_of: r.get(6)?,
                        agent_version: r.get(7)?,
                        detached_at: r.get(8)?,
                        detached_reason: r.get(9)?,
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
        let (m, dup) = cat
            .register_machine("new-host", &[3; 32], "t", b"s")
            .unwrap();
        assert_eq!(dup, None);
        let id = cat.begin_snapshot(&m, "crash", "manual").unwrap();
        cat.finish_snapshot(id, &[(DiskId(1), 10, [9; 32])], 5, 1)
            .unwrap();
        assert_eq!(cat.snapshots(m.as_str()).unwrap()[0].state, "complete");
        drop(cat);
        // Reopening a current catalog changes nothing.
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.snapshots(m.as_str()).unwrap().len(), 1);
    }

    #[test]
    fn deleting_a_machine_removes_its_rows_only_and_waits_for_its_job() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.sqlite")).unwrap();
        let (gone, _) = cat.register_machine("gone", &[1; 32], "t", b"s").unwrap();
        let (kept, _) = cat.register_machine("kept", &[2; 32], "t", b"s").unwrap();
        let disk = |d: &str| DiskInfo {
            device: d.into(),
            size_bytes: 1 << 20,
        };
        cat.ensure_disks(&gone, &[disk("/dev/a"), disk("/dev/b")], 65536)
            .unwrap();
        let kept_disk = cat.ensure_disks(&kept, &[disk("/dev/a")], 65536).unwrap()[0].id;
        for m in [&gone, &kept] {
            let s = cat.begin_snapshot(m, "crash", "manual").unwrap();
            cat.finish_snapshot(s, &[(DiskId(kept_disk), 10, [9; 32])], 5, 1)
                .unwrap();
            cat.set_blueprint(m.as_str(), "{}").unwrap();
        }
        cat.with(|c| {
            c.execute_batch(&format!(
                "INSERT INTO tokens (id, secret_hash, created_at, machine_id) VALUES ('r', x'00', 1, '{gone}');
                 INSERT INTO retention (machine_id, policy) VALUES ('{gone}', 'p');
                 INSERT INTO jobs (id, machine_id, mode, state, created_at, prev_lifecycle)
                   VALUES (7, '{gone}', 'test', 'running', 1, 'ready-for-testing');
                 INSERT INTO job_log (job_id, seq, at_ms, step, message) VALUES (7, 1, 1, 'job-start', '');"
            ))
        })
        .unwrap();
        cat.detach_machine(&gone, "0.0.1", "agent uninstalled")
            .unwrap();

        let refused = cat.delete_machine(gone.as_str()).unwrap().unwrap_err();
        assert!(refused.contains("test job 7"), "{refused}");
        assert_eq!(cat.machines().unwrap().len(), 2, "nothing removed");
        cat.with(|c| c.execute("UPDATE jobs SET state = 'failed' WHERE id = 7", []))
            .unwrap();
        let creating = cat.begin_snapshot(&gone, "crash", "manual").unwrap();
        let refused = cat.delete_machine(gone.as_str()).unwrap().unwrap_err();
        assert!(refused.contains("being taken"), "{refused}");
        cat.remove_snapshot(creating).unwrap();

        assert_eq!(cat.delete_machine(gone.as_str()).unwrap().unwrap().len(), 2);
        let left: Vec<String> = cat
            .machines()
            .unwrap()
            .into_iter()
            .map(|(m, _)| m.id)
            .collect();
        assert_eq!(left, [kept.as_str()]);
        for table in [
            "disks",
            "snapshots",
            "jobs",
            "blueprints",
            "retention",
            "lifecycle_log",
            "tokens",
        ] {
            let n: i64 = cat
                .with(|c| {
                    c.query_row(
                        &format!("SELECT COUNT(*) FROM {table} WHERE machine_id = ?1"),
                        [gone.as_str()],
                        |r| r.get(0),
                    )
                })
                .unwrap();
            assert_eq!(n, 0, "{table} rows of the deleted machine");
        }
        let orphans: i64 = cat
            .with(|c| {
                c.query_row(
                    "SELECT (SELECT COUNT(*) FROM job_log) + (SELECT COUNT(*) FROM snapshot_disks
                       WHERE snapshot_id NOT IN (SELECT id FROM snapshots))",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(orphans, 0);
        assert_eq!(cat.snapshots(kept.as_str()).unwrap().len(), 1);
        assert!(cat.blueprint(kept.as_str()).unwrap().is_some());
    }

    #[test]
    fn a_version_5_catalog_gains_the_agents_life_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "{} PRAGMA user_version = 5;",
                LADDER[..5].join("\n")
            ))
            .unwrap();
            c.execute(
                "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at, lifecycle)
                 VALUES ('m-00000000000000aa', 'old-host', x'01', x'02', 't', 1, 'archived')",
                [],
            )
            .unwrap();
        }
        let cat = Catalog::open(&path).unwrap();
        let (m, _) = cat.machines().unwrap().remove(0);
        assert_eq!(
            (m.hostname.as_str(), m.lifecycle.as_str()),
            ("old-host", "archived")
        );
        assert_eq!(
            (m.agent_version, m.detached_at, m.detached_reason),
            (None, None, None)
        );

        let id = MachineId::parse(&m.id).unwrap();
        cat.detach_machine(&id, "0.0.1", "agent uninstalled")
            .unwrap();
        let (m, _) = cat.machines().unwrap().remove(0);
        assert_eq!(m.agent_version.as_deref(), Some("0.0.1"));
        assert_eq!(m.detached_reason.as_deref(), Some("agent uninstalled"));
        assert!(m.detached_at.is_some());
        let log = cat.lifecycle_log(&m.id).unwrap();
        assert_eq!(
            (
                log[0].from.as_str(),
                log[0].to.as_str(),
                log[0].reason.as_str()
            ),
            ("archived", "archived", "agent uninstalled")
        );
        cat.agent_connected(&id, "0.0.2").unwrap();
        let (m, _) = cat.machines().unwrap().remove(0);
        assert_eq!(m.agent_version.as_deref(), Some("0.0.2"));
        assert_eq!((m.detached_at, m.detached_reason), (None, None));
    }
}
