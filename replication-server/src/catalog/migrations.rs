//! The catalog's schema: one ordered list of steps, each taking the catalog from one version to
//! the next; a new catalog climbs every step, an older one the steps it lacks, in one
//! transaction.

use rusqlite::{Connection, OptionalExtension};

use super::CatalogError;

pub(crate) const SCHEMA_VERSION: i64 = 9;

/// The migration ladder: step `i` takes a catalog from version `i` to version `i + 1` (a new
/// catalog climbs every step). Each run of steps is one transaction.
pub(crate) const LADDER: [&str; SCHEMA_VERSION as usize] = [
    SCHEMA, MIGRATE_2, MIGRATE_3, MIGRATE_4, MIGRATE_5, MIGRATE_6, MIGRATE_7, MIGRATE_8, MIGRATE_9,
];

/// Climbs the ladder from `from` to [`SCHEMA_VERSION`] in one transaction. Foreign keys are off
/// meanwhile (a step may rebuild a table others refer to, as v5 does) and checked before the
/// commit.
pub(super) fn migrate(conn: &mut Connection, from: i64) -> Result<(), CatalogError> {
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

/// Version 3: the bandwidth cap the operator set for a machine's agent.
const MIGRATE_3: &str = "ALTER TABLE machines ADD COLUMN max_mbps INTEGER;";

/// Schema version 4.
const MIGRATE_4: &str = "
CREATE TABLE blueprints (
    machine_id TEXT PRIMARY KEY REFERENCES machines(id),
    body TEXT NOT NULL
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    mode TEXT NOT NULL CHECK (mode IN ('test', 'cutover')),
    state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    created_at INTEGER NOT NULL,
    ended_at INTEGER,
    prev_lifecycle TEXT NOT NULL,
    snapshot_id INTEGER,
    target_dir TEXT,
    launch TEXT NOT NULL DEFAULT '',
    child_pid INTEGER,
    error TEXT,
    active INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX one_running_job_per_machine ON jobs (machine_id) WHERE state = 'running';
CREATE TABLE job_log (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    step TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE lifecycle_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    at INTEGER NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
";

/// Version 5: `machines.source_id` is no longer UNIQUE (a duplicate is a machine of its own), and
/// a token may be bound to one machine (a reinstall token). SQLite cannot drop a constraint, so
/// the machines table is rebuilt with the same columns and rows.
const MIGRATE_5: &str = "
CREATE TABLE machines_v5 (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    source_id BLOB NOT NULL,
    secret_hash BLOB NOT NULL,
    token_id TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER,
    revoked_at INTEGER,
    lifecycle TEXT NOT NULL DEFAULT 'not-ready',
    max_mbps INTEGER
);
INSERT INTO machines_v5 (id, hostname, source_id, secret_hash, token_id, registered_at,
                         last_seen, revoked_at, lifecycle, max_mbps)
    SELECT id, hostname, source_id, secret_hash, token_id, registered_at,
           last_seen, revoked_at, lifecycle, max_mbps FROM machines ORDER BY rowid;
DROP TABLE machines;
ALTER TABLE machines_v5 RENAME TO machines;
CREATE INDEX machines_by_source ON machines (source_id);
CREATE INDEX machines_by_hostname ON machines (hostname);
ALTER TABLE tokens ADD COLUMN machine_id TEXT REFERENCES machines(id);
";

/// Version 6: the agent's life cycle: the version of the agent last seen (set at each successful
/// handshake, kept while it is disconnected) and when and why an agent being uninstalled
/// detached its machine (cleared by the machine's next normal connection).
const MIGRATE_6: &str = "
ALTER TABLE machines ADD COLUMN agent_version TEXT;
ALTER TABLE machines ADD COLUMN detached_at INTEGER;
ALTER TABLE machines ADD COLUMN detached_reason TEXT;
";

/// Version 7: recovery plans (see `plan`): named, ordered sets of machines recovered together.
/// A machine is in a plan at most once, in one step (1..=20); each step may have a pre and a post
/// hook. A plan's rows go with it; a machine's rows in plans go with the machine
/// (`Catalog::delete_machine`).
const MIGRATE_7: &str = "
CREATE TABLE plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    production_network TEXT NOT NULL DEFAULT 'user',
    test_network TEXT NOT NULL DEFAULT 'none'
);
CREATE TABLE plan_members (
    plan_id INTEGER NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    step INTEGER NOT NULL CHECK (step BETWEEN 1 AND 20),
    wait TEXT NOT NULL DEFAULT 'boot' CHECK (wait IN ('boot', 'none')),
    delay_s INTEGER NOT NULL DEFAULT 0 CHECK (delay_s BETWEEN 0 AND 3600),
    added_at INTEGER NOT NULL,
    PRIMARY KEY (plan_id, machine_id)
);
CREATE INDEX plan_members_by_machine ON plan_members (machine_id);
CREATE TABLE plan_hooks (
    plan_id INTEGER NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
    step INTEGER NOT NULL CHECK (step BETWEEN 1 AND 20),
    kind TEXT NOT NULL CHECK (kind IN ('pre', 'post')),
    path TEXT NOT NULL,
    timeout_s INTEGER NOT NULL CHECK (timeout_s BETWEEN 1 AND 3600),
    continue_on_error INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (plan_id, step, kind)
);
";

/// Version 8: group points (`snapshot create --plan`): one recovery point of every machine of a
/// consistency group at one instant; each member snapshot names its group.
const MIGRATE_8: &str = "
CREATE TABLE point_groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    window_ms INTEGER,
    skew_ms INTEGER,
    note TEXT NOT NULL
);
CREATE INDEX point_groups_by_label ON point_groups (label);
ALTER TABLE snapshots ADD COLUMN group_id INTEGER REFERENCES point_groups(id);
";

/// Version 9: runs of recovery plans (`plan drill|failover`, see `plan::run`). A run is a parent
/// job: its own log (`plan_run_log`, lines of every machine's launch mirrored in, each with the
/// machine it is about), the group point it used, a drill's clean-up deadline and when its
/// targets were cleaned up, and the machine that failed it. Each machine's launch is a job whose
/// `plan_run_id` names its run. A plan member may name the source action a planned failover
/// asks of its agent, and whether the run goes on when its launch fails. A plan may have its own retention policy: its machines' scheduled points
/// are then its group points.
const MIGRATE_9: &str = "
CREATE TABLE plan_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_id INTEGER REFERENCES plans(id) ON DELETE SET NULL,
    plan_name TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('drill', 'failover-planned', 'failover-unplanned')),
    state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    created_at INTEGER NOT NULL,
    ended_at INTEGER,
    group_id INTEGER REFERENCES point_groups(id),
    cleanup_at INTEGER,
    cleaned_at INTEGER,
    error TEXT,
    failed_machine TEXT
);
CREATE UNIQUE INDEX one_running_run_per_plan ON plan_runs (plan_id) WHERE state = 'running';
CREATE TABLE plan_run_log (
    run_id INTEGER NOT NULL REFERENCES plan_runs(id),
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    machine TEXT,
    step TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
ALTER TABLE jobs ADD COLUMN plan_run_id INTEGER REFERENCES plan_runs(id);
ALTER TABLE plan_members ADD COLUMN source_action TEXT;
ALTER TABLE plan_members ADD COLUMN continue_on_error INTEGER NOT NULL DEFAULT 0;
ALTER TABLE plans ADD COLUMN policy TEXT;
";
