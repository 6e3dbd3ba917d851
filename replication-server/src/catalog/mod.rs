//! The catalog: tokens, machines and disks (and, in `snapshot::rows`, `launch::rows` and
//! `plan::rows`, recovery points, blueprints, jobs, lifecycle transitions and recovery plans) in
//! SQLite (WAL, `synchronous=FULL`). Calls are synchronous and short; async callers go through
//! `spawn_blocking`.

use std::path::Path;
use std::sync::Mutex;

use rehost_proto::msg::DiskInfo;
use rehost_proto::{DiskId, Hash, MachineId};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

mod lifecycle;
mod migrations;
pub use lifecycle::Transition;
pub(crate) use lifecycle::{lifecycle_of, set_lifecycle};
use migrations::migrate;
#[cfg(test)]
pub(crate) use migrations::LADDER;
pub(crate) use migrations::SCHEMA_VERSION;

use crate::states::{Cause, IllegalTransition, Lifecycle};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database")]
    Db(#[from] rusqlite::Error),
    #[error("catalog schema version {0} is newer than this server understands ({SCHEMA_VERSION})")]
    Schema(i64),
    #[error("catalog migration from version {0} left rows of table {1} without their parent")]
    Migration(i64, String),
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub lifecycle: Lifecycle,
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

    /// [`Self::with`] for work that can fail in other ways than SQLite's (a lifecycle move the
    /// table refuses).
    pub(crate) fn try_with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
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
            let r = insert_machine(&tx, hostname, source_id, token_id, secret)?;
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
    /// their logs, blueprint, retention policy, history, its places in recovery plans, disks and
    /// the reinstall tokens bound to it, in one transaction. `Ok(Err(why))` when refused: a launch job of the machine runs, or
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
                "DELETE FROM plan_members WHERE machine_id = ?1",
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
        self.try_with(|c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE disks SET sync_complete = 1, durable_bytes = size_bytes WHERE id = ?1", [id.0])?;
            // A machine whose disks have all finished their initial sync can be tested.
            let (machine, all_synced): (String, bool) = tx.query_row(
                "SELECT machine_id, NOT EXISTS (SELECT 1 FROM disks d WHERE d.machine_id = disks.machine_id AND d.sync_complete = 0)
                   FROM disks WHERE id = ?1",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if all_synced && lifecycle_of(&tx, &machine)? == Some(Lifecycle::NotReady) {
                set_lifecycle(
                    &tx,
                    &machine,
                    Lifecycle::NotReady,
                    Lifecycle::ReadyForTesting,
                    Cause::InitialSync,
                    "initial sync complete",
                )?;
            }
            tx.commit()?;
            Ok(())
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

/// Inserts a new machine. Returns its id and the oldest machine it duplicates, if any.
pub(crate) fn insert_machine(
    tx: &Transaction<'_>,
    hostname: &str,
    source_id: &Hash,
    token_id: &str,
    secret: &[u8],
) -> rusqlite::Result<(MachineId, Option<String>)> {
    let duplicate_of: Option<String> = tx
        .query_row(
            "SELECT id FROM machines WHERE source_id = ?1 OR hostname = ?2
             ORDER BY rowid LIMIT 1",
            params![&source_id[..], hostname],
            |r| r.get(0),
        )
        .optional()?;
    let id = MachineId::random();
    tx.execute(
        "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id.as_str(), hostname, &source_id[..], secret_hash(secret), token_id, now()],
    )?;
    Ok((id, duplicate_of))
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
mod tests;
