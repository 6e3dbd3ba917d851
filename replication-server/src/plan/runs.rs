//! The catalog's side of plan runs (schema version 9, see `catalog::migrations`): `plan_runs`
//! (one row per drill or failover, the parent of its machines' launch jobs) and `plan_run_log`
//! (its timestamped log, the machines' lines mirrored in).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::catalog::{now, now_ms, Catalog, CatalogError};
use crate::states::{JobState, RunMode};

/// One run of a plan as `jobs` and `plan status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRun {
    pub id: i64,
    pub plan: String,
    pub mode: RunMode,
    pub state: JobState,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    /// The group point the run launched from, when it used one.
    pub group_id: Option<i64>,
    /// A drill's clean-up deadline (`--cleanup-after`), unix seconds.
    pub cleanup_at: Option<i64>,
    /// When the drill's targets were removed.
    pub cleaned_at: Option<i64>,
    pub error: Option<String>,
    /// The machine whose launch (or hook) failed the run.
    pub failed_machine: Option<String>,
    /// The machines' launch jobs, in the order they started.
    pub jobs: Vec<i64>,
}

/// One line of a plan run's log; `machine` is the hostname a launch's line is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLogLine {
    pub seq: i64,
    pub at_ms: i64,
    pub machine: Option<String>,
    pub step: String,
    pub message: String,
}

const RUN_COLS: &str = "id, plan_name, mode, state, created_at, ended_at, group_id, cleanup_at, \
                        cleaned_at, error, failed_machine";

fn run_row(c: &Connection, r: &rusqlite::Row<'_>) -> rusqlite::Result<PlanRun> {
    let id: i64 = r.get(0)?;
    let jobs = c
        .prepare_cached("SELECT id FROM jobs WHERE plan_run_id = ?1 ORDER BY id")?
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    Ok(PlanRun {
        id,
        plan: r.get(1)?,
        mode: r.get(2)?,
        state: r.get(3)?,
        created_at: r.get(4)?,
        ended_at: r.get(5)?,
        group_id: r.get(6)?,
        cleanup_at: r.get(7)?,
        cleaned_at: r.get(8)?,
        error: r.get(9)?,
        failed_machine: r.get(10)?,
        jobs,
    })
}

fn runs_where(
    c: &Connection,
    clause: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<Vec<PlanRun>> {
    let mut st = c.prepare(&format!(
        "SELECT {RUN_COLS} FROM plan_runs WHERE {clause} ORDER BY id"
    ))?;
    let mut rows = st.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(run_row(c, r)?);
    }
    Ok(out)
}

impl Catalog {
    /// Records a running run of `plan`, refused (`Ok(Err(why))`) while another of its runs is
    /// running.
    pub fn begin_run(
        &self,
        plan: &str,
        mode: RunMode,
        cleanup_at: Option<i64>,
    ) -> Result<Result<PlanRun, String>, CatalogError> {
        self.try_with(|c| {
            let tx = c.transaction()?;
            let Some(plan_id): Option<i64> = tx
                .query_row("SELECT id FROM plans WHERE name = ?1", [plan], |r| r.get(0))
                .optional()?
            else {
                return Ok(Err(format!("no recovery plan `{plan}`")));
            };
            let running: Option<(i64, RunMode)> = tx
                .query_row(
                    "SELECT id, mode FROM plan_runs WHERE plan_id = ?1 AND state = 'running'",
                    [plan_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((id, mode)) = running {
                return Ok(Err(format!(
                    "{mode} P{id} of plan `{plan}` is still running; one run at a time (see `rehost-server jobs P{id} --follow`)"
                )));
            }
            tx.execute(
                "INSERT INTO plan_runs (plan_id, plan_name, mode, state, created_at, cleanup_at)
                 VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
                params![plan_id, plan, mode, now(), cleanup_at],
            )?;
            let id = tx.last_insert_rowid();
            let run = runs_where(&tx, "id = ?1", [id])?.remove(0);
            tx.commit()?;
            Ok(Ok(run))
        })
    }

    /// Appends a line to a run's log.
    pub fn log_run(
        &self,
        run: i64,
        machine: Option<&str>,
        step: &str,
        message: &str,
    ) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO plan_run_log (run_id, seq, at_ms, machine, step, message)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM plan_run_log WHERE run_id = ?1),
                         ?2, ?3, ?4, ?5)",
                params![run, now_ms(), machine, step, message],
            )
            .map(drop)
        })
    }

    pub fn set_run_group(&self, run: i64, group: i64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE plan_runs SET group_id = ?2 WHERE id = ?1",
                params![run, group],
            )
            .map(drop)
        })
    }

    /// Ends a run: succeeded without an error, else failed (by `machine`, when one failed it).
    pub fn finish_run(
        &self,
        run: i64,
        error: Option<&str>,
        machine: Option<&str>,
    ) -> Result<(), CatalogError> {
        let state = if error.is_none() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        self.with(|c| {
            c.execute(
                "UPDATE plan_runs SET state = ?2, ended_at = ?3, error = ?4, failed_machine = ?5
                 WHERE id = ?1",
                params![run, state, now(), error, machine],
            )
            .map(drop)
        })
    }

    /// The drill's targets are gone.
    pub fn set_run_cleaned(&self, run: i64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE plan_runs SET cleaned_at = ?2 WHERE id = ?1",
                params![run, now()],
            )
            .map(drop)
        })
    }

    pub fn plan_run(&self, id: i64) -> Result<Option<PlanRun>, CatalogError> {
        self.with(|c| Ok(runs_where(c, "id = ?1", [id])?.pop()))
    }

    /// Runs of one plan, or of all, oldest first.
    pub fn plan_runs(&self, plan: Option<&str>) -> Result<Vec<PlanRun>, CatalogError> {
        self.with(|c| runs_where(c, "(?1 IS NULL OR plan_name = ?1)", params![plan]))
    }

    /// Runs still marked running (at a server start: the ones its stop interrupted).
    pub fn running_runs(&self) -> Result<Vec<PlanRun>, CatalogError> {
        self.with(|c| runs_where(c, "state = 'running'", []))
    }

    /// Ended drills past their clean-up deadline whose targets are not cleaned up yet.
    pub fn drills_due(&self, at: i64) -> Result<Vec<PlanRun>, CatalogError> {
        self.with(|c| {
            runs_where(
                c,
                "mode = 'drill' AND state != 'running' AND cleaned_at IS NULL
                 AND cleanup_at IS NOT NULL AND cleanup_at <= ?1",
                [at],
            )
        })
    }

    pub fn run_log(&self, run: i64, after_seq: i64) -> Result<Vec<RunLogLine>, CatalogError> {
        self.with(|c| {
            c.prepare(
                "SELECT seq, at_ms, machine, step, message FROM plan_run_log
                 WHERE run_id = ?1 AND seq > ?2 ORDER BY seq",
            )?
            .query_map(params![run, after_seq], |r| {
                Ok(RunLogLine {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    machine: r.get(2)?,
                    step: r.get(3)?,
                    message: r.get(4)?,
                })
            })?
            .collect()
        })
    }
}
