//! The catalog's side of recovery points: `snapshots`, `snapshot_disks` and `retention` rows
//! (schema version 2, see `catalog`).

use rehost_proto::{DiskId, Hash, MachineId};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::catalog::{now, Catalog, CatalogError};
use crate::states::{Consistency, SnapshotState};

/// One recovery point as `snapshots --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: i64,
    pub machine_id: String,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub consistency: Consistency,
    pub state: SnapshotState,
    /// `manual`, `scheduled`, or what requested it.
    pub reason: String,
    /// Bytes of new store objects this snapshot wrote (including those stored just before its
    /// point to shorten the stream pause).
    pub bytes_added: u64,
    pub duration_ms: Option<u64>,
    pub disks: Vec<SnapshotDisk>,
    /// The group point this snapshot belongs to (`snapshots --plan`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub disk_id: u64,
    pub device: String,
    pub size_bytes: u64,
    /// Hex id of the disk's root object.
    pub root: String,
}

impl SnapshotDisk {
    pub fn root_id(&self) -> Option<Hash> {
        hex::decode(&self.root)
            .ok()
            .and_then(|v| Hash::try_from(v).ok())
    }
}

fn info_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotInfo> {
    Ok(SnapshotInfo {
        id: r.get(0)?,
        machine_id: r.get(1)?,
        created_at: r.get(2)?,
        completed_at: r.get(3)?,
        consistency: r.get(4)?,
        state: r.get(5)?,
        reason: r.get(6)?,
        bytes_added: r.get(7)?,
        duration_ms: r.get(8)?,
        disks: Vec::new(),
        group_id: r.get(9)?,
    })
}

const COLUMNS: &str = "id, machine_id, created_at, completed_at, consistency, state, reason, bytes_added, duration_ms, group_id";

fn fill_disks(c: &rusqlite::Connection, rows: &mut [SnapshotInfo]) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached(
        "SELECT disk_id, device, size_bytes, root FROM snapshot_disks WHERE snapshot_id = ?1 ORDER BY disk_id",
    )?;
    for s in rows {
        s.disks = st
            .query_map([s.id], |r| {
                Ok(SnapshotDisk {
                    disk_id: r.get(0)?,
                    device: r.get(1)?,
                    size_bytes: r.get(2)?,
                    root: hex::encode(r.get::<_, Vec<u8>>(3)?),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(())
}

impl Catalog {
    /// Records a snapshot in state `creating`, before any of its objects is written.
    pub fn begin_snapshot(
        &self,
        machine: &MachineId,
        consistency: Consistency,
        reason: &str,
    ) -> Result<i64, CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO snapshots (machine_id, created_at, consistency, state, reason) VALUES (?1, ?2, ?3, 'creating', ?4)",
                params![machine.as_str(), now(), consistency, reason],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records the disks' roots and marks the snapshot complete, once all its objects are durable.
    pub fn finish_snapshot(
        &self,
        id: i64,
        disks: &[(DiskId, u64, Hash)],
        bytes_added: u64,
        duration_ms: u64,
    ) -> Result<(), CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            for (disk, size, root) in disks {
                tx.execute(
                    "INSERT INTO snapshot_disks (snapshot_id, disk_id, device, size_bytes, root)
                     VALUES (?1, ?2, COALESCE((SELECT device FROM disks WHERE id = ?2), '?'), ?3, ?4)",
                    params![id, disk.0, size, &root[..]],
                )?;
            }
            tx.execute(
                "UPDATE snapshots SET state = 'complete', completed_at = ?2, bytes_added = ?3, duration_ms = ?4 WHERE id = ?1",
                params![id, now(), bytes_added, duration_ms],
            )?;
            tx.commit()
        })
    }

    /// Adds bytes stored for a snapshot before its point (see `snapshot::prepare`).
    pub fn add_snapshot_bytes(&self, id: i64, bytes: u64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET bytes_added = bytes_added + ?2 WHERE id = ?1",
                params![id, bytes],
            )
            .map(drop)
        })
    }

    /// Forgets a snapshot row (and its disks); GC reclaims what only it used.
    pub fn remove_snapshot(&self, id: i64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute("DELETE FROM snapshots WHERE id = ?1", [id])
                .map(drop)
        })
    }

    /// Marks a complete snapshot `deleting`; false if there is no such complete snapshot.
    pub fn mark_deleting(&self, id: i64) -> Result<bool, CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET state = 'deleting' WHERE id = ?1 AND state = 'complete'",
                [id],
            )
            .map(|n| n > 0)
        })
    }

    /// At startup: removes snapshots that a crash left unfinished (`creating`) or half deleted.
    pub fn remove_unfinished_snapshots(&self) -> Result<Vec<i64>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let ids = tx
                .prepare(
                    "SELECT id FROM snapshots WHERE state IN ('creating', 'deleting') ORDER BY id",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            tx.execute(
                "DELETE FROM snapshots WHERE state IN ('creating', 'deleting')",
                [],
            )?;
            tx.commit()?;
            Ok(ids)
        })
    }

    pub fn snapshots(&self, machine: &str) -> Result<Vec<SnapshotInfo>, CatalogError> {
        self.with(|c| {
            let mut rows = c
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM snapshots WHERE machine_id = ?1 ORDER BY id"
                ))?
                .query_map([machine], info_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            fill_disks(c, &mut rows)?;
            Ok(rows)
        })
    }

    /// Every snapshot in the given states, of all machines, with their disks.
    pub fn snapshots_in(
        &self,
        states: &[SnapshotState],
    ) -> Result<Vec<SnapshotInfo>, CatalogError> {
        self.with(|c| {
            let mut rows = c
                .prepare(&format!("SELECT {COLUMNS} FROM snapshots ORDER BY id"))?
                .query_map([], info_row)?
                .filter(|r| r.as_ref().map_or(true, |s| states.contains(&s.state)))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            fill_disks(c, &mut rows)?;
            Ok(rows)
        })
    }

    /// The snapshots that belong to the given group points, with their disks.
    pub fn snapshots_in_groups(&self, groups: &[i64]) -> Result<Vec<SnapshotInfo>, CatalogError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM snapshots WHERE group_id = ?1 ORDER BY id"
            ))?;
            let mut rows = Vec::new();
            for g in groups {
                rows.extend(
                    st.query_map([g], info_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
            }
            fill_disks(c, &mut rows)?;
            Ok(rows)
        })
    }

    /// The root of `disk` in its machine's latest complete snapshot.
    pub fn latest_root(&self, disk: DiskId) -> Result<Option<Hash>, CatalogError> {
        self.with(|c| {
            let root: Option<Vec<u8>> = c
                .query_row(
                    "SELECT d.root FROM snapshot_disks d JOIN snapshots s ON s.id = d.snapshot_id
                     WHERE d.disk_id = ?1 AND s.state = 'complete' ORDER BY s.id DESC LIMIT 1",
                    [disk.0],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(root.and_then(|v| Hash::try_from(v).ok()))
        })
    }

    /// A machine id from an id or a hostname; `Ok(Err(msg))` when unknown or ambiguous.
    pub fn resolve_machine(&self, name: &str) -> Result<Result<MachineId, String>, CatalogError> {
        self.with(|c| {
            let ids = c
                .prepare("SELECT id FROM machines WHERE id = ?1 UNION SELECT id FROM machines WHERE hostname = ?1")?
                .query_map([name], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(match ids.as_slice() {
                [] => Err(format!("no machine with id or hostname `{name}`")),
                [one] => MachineId::parse(one).map_err(|e| format!("machine id {one}: {e}")),
                many if many.iter().any(|i| i == name) => MachineId::parse(name).map_err(|e| e.to_string()),
                many => Err(format!("hostname `{name}` is ambiguous ({}): use the machine id", many.join(", "))),
            })
        })
    }

    /// Machines (not revoked) whose disks have all finished their initial sync.
    pub fn machines_ready(&self) -> Result<Vec<MachineId>, CatalogError> {
        self.with(|c| {
            let ids = c
                .prepare(
                    "SELECT m.id FROM machines m WHERE m.revoked_at IS NULL
                       AND EXISTS (SELECT 1 FROM disks d WHERE d.machine_id = m.id)
                       AND NOT EXISTS (SELECT 1 FROM disks d WHERE d.machine_id = m.id AND d.sync_complete = 0)
                     ORDER BY m.id",
                )?
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(ids.iter().filter_map(|i| MachineId::parse(i).ok()).collect())
        })
    }

    /// The retention policy text of `machine` (or of the server when `machine` is empty).
    pub fn retention(&self, machine: &str) -> Result<Option<String>, CatalogError> {
        self.with(|c| {
            c.query_row(
                "SELECT policy FROM retention WHERE machine_id = ?1",
                [machine],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Sets (or with `None` removes) a retention policy.
    pub fn set_retention(&self, machine: &str, policy: Option<&str>) -> Result<(), CatalogError> {
        self.with(|c| {
            match policy {
                Some(p) => c.execute(
                    "INSERT INTO retention (machine_id, policy) VALUES (?1, ?2) ON CONFLICT (machine_id) DO UPDATE SET policy = ?2",
                    params![machine, p],
                )?,
                None => c.execute("DELETE FROM retention WHERE machine_id = ?1", [machine])?,
            };
            Ok(())
        })
    }
}
