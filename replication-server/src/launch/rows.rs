//! The catalog's side of launches (schema version 4, a job's plan run 9; see `catalog::migrations`): blueprints, jobs
//! and their progress logs. A job's start and end move the machine's lifecycle (see
//! `catalog::lifecycle`).

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::catalog::{lifecycle_of, now, now_ms, set_lifecycle, Catalog, CatalogError};
use crate::states::{Cause, JobMode, JobState, Lifecycle};

/// One job as `jobs --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRow {
    pub id: i64,
    pub machine_id: String,
    pub hostname: String,
    pub mode: JobMode,
    pub state: JobState,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    /// The recovery point the target was made from, once chosen.
    pub snapshot_id: Option<i64>,
    pub target_dir: Option<String>,
    /// The launch method used (`none`, `qemu`, `libvirt`).
    pub launch: String,
    pub error: Option<String>,
    /// Whether this job's target (VM and images) is the machine's current one of its mode.
    pub active: bool,
    /// The recovery plan run this launch is part of (`jobs P<id>`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_run: Option<i64>,
    #[serde(skip)]
    pub prev_lifecycle: Lifecycle,
    #[serde(skip)]
    pub child_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: i64,
    pub at_ms: i64,
    pub step: String,
    pub message: String,
}

const JOB_COLS: &str = "j.id, j.machine_id, m.hostname, j.mode, j.state, j.created_at, j.ended_at, j.snapshot_id, j.target_dir, j.launch, j.error, j.active, j.prev_lifecycle, j.child_pid, j.plan_run_id";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        machine_id: r.get(1)?,
        hostname: r.get(2)?,
        mode: r.get(3)?,
        state: r.get(4)?,
        created_at: r.get(5)?,
        ended_at: r.get(6)?,
        snapshot_id: r.get(7)?,
        target_dir: r.get(8)?,
        launch: r.get(9)?,
        error: r.get(10)?,
        active: r.get(11)?,
        prev_lifecycle: r.get(12)?,
        child_pid: r.get(13)?,
        plan_run: r.get(14)?,
    })
}

impl Catalog {
    pub fn blueprint(&self, machine: &str) -> Result<Option<String>, CatalogError> {
        self.with(|c| {
            c.query_row(
                "SELECT body FROM blueprints WHERE machine_id = ?1",
                [machine],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub fn set_blueprint(&self, machine: &str, body: &str) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO blueprints (machine_id, body) VALUES (?1, ?2)
                 ON CONFLICT (machine_id) DO UPDATE SET body = excluded.body",
                params![machine, body],
            )
            .map(drop)
        })
    }

    /// Creates a running job of `mode` if the machine's lifecycle allows the launch and no other
    /// job runs on it, and moves the machine to the mode's running state. `Ok(Err(why))` when
    /// refused.
    pub fn begin_job(
        &self,
        machine: &str,
        mode: JobMode,
        launch: &str,
        plan_run: Option<i64>,
    ) -> Result<Result<JobRow, String>, CatalogError> {
        self.try_with(|c| {
            let tx = c.transaction()?;
            let Some(cur) = lifecycle_of(&tx, machine)? else {
                return Ok(Err(format!("no machine {machine}")));
            };
            let running: Option<(i64, JobMode)> = tx
                .query_row(
                    "SELECT id, mode FROM jobs WHERE machine_id = ?1 AND state = 'running'",
                    [machine],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((id, m)) = running {
                return Ok(Err(format!(
                    "job {id} ({m}) is still running on this machine; one job at a time (see `rehost-server jobs {id}`)"
                )));
            }
            let from = mode.allowed_from();
            if !from.contains(&cur) {
                let from: Vec<_> = from.iter().map(|l| l.as_str()).collect();
                return Ok(Err(format!(
                    "a {mode} launch needs the machine in {}, and it is {cur}",
                    from.join(" or ")
                )));
            }
            tx.execute(
                "INSERT INTO jobs (machine_id, mode, state, created_at, prev_lifecycle, launch, plan_run_id) VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6)",
                params![machine, mode, now(), cur, launch, plan_run],
            )?;
            let id = tx.last_insert_rowid();
            set_lifecycle(
                &tx,
                machine,
                cur,
                mode.running_state(),
                Cause::Launch(mode),
                &format!("{mode} job {id} started"),
            )?;
            let row = tx.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs j JOIN machines m ON m.id = j.machine_id WHERE j.id = ?1"),
                [id],
                job_row,
            )?;
            tx.commit()?;
            Ok(Ok(row))
        })
    }

    /// Appends a line to a job's progress log.
    pub fn log_job(&self, job: i64, step: &str, message: &str) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO job_log (job_id, seq, at_ms, step, message)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_log WHERE job_id = ?1), ?2, ?3, ?4)",
                params![job, now_ms(), step, message],
            )
            .map(drop)
        })
    }

    pub fn set_job_snapshot(&self, job: i64, snapshot: i64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET snapshot_id = ?2 WHERE id = ?1",
                params![job, snapshot],
            )
            .map(drop)
        })
    }

    /// Records the job's target dir before anything is written into it, so that a crash leaves
    /// a dir the next start can find and remove.
    pub fn set_job_target(&self, job: i64, dir: &str) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET target_dir = ?2 WHERE id = ?1",
                params![job, dir],
            )
            .map(drop)
        })
    }

    /// The job's helper process (the converter) while it runs.
    pub fn set_job_child(&self, job: i64, pid: Option<u32>) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET child_pid = ?2 WHERE id = ?1",
                params![job, pid],
            )
            .map(drop)
        })
    }

    /// Ends a job and moves its machine to `lifecycle`. A succeeded job becomes the machine's
    /// active target of its mode.
    pub fn finish_job(
        &self,
        job: i64,
        error: Option<&str>,
        lifecycle: Lifecycle,
    ) -> Result<(), CatalogError> {
        self.try_with(|c| {
            let tx = c.transaction()?;
            let (machine, mode): (String, JobMode) = tx.query_row(
                "SELECT machine_id, mode FROM jobs WHERE id = ?1",
                [job],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let ok = error.is_none();
            if ok {
                tx.execute(
                    "UPDATE jobs SET active = 0 WHERE machine_id = ?1 AND mode = ?2",
                    params![machine, mode],
                )?;
            }
            let state = if ok { JobState::Succeeded } else { JobState::Failed };
            tx.execute(
                "UPDATE jobs SET state = ?2, ended_at = ?3, error = ?4, active = ?5, child_pid = NULL WHERE id = ?1",
                params![job, state, now(), error, ok],
            )?;
            if let Some(cur) = lifecycle_of(&tx, &machine)? {
                let (why, cause) = if ok {
                    (format!("{mode} job {job} succeeded"), Cause::Succeeded(mode))
                } else {
                    (format!("{mode} job {job} failed"), Cause::Failed)
                };
                set_lifecycle(&tx, &machine, cur, lifecycle, cause, &why)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The target is gone (reverted, replaced or cleaned up).
    pub fn deactivate_job(&self, job: i64) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute("UPDATE jobs SET active = 0 WHERE id = ?1", [job])
                .map(drop)
        })
    }

    pub fn active_job(&self, machine: &str, mode: JobMode) -> Result<Option<JobRow>, CatalogError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs j JOIN machines m ON m.id = j.machine_id WHERE j.machine_id = ?1 AND j.mode = ?2 AND j.active = 1 ORDER BY j.id DESC LIMIT 1"),
                params![machine, mode],
                job_row,
            )
            .optional()
        })
    }

    pub fn job(&self, id: i64) -> Result<Option<JobRow>, CatalogError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs j JOIN machines m ON m.id = j.machine_id WHERE j.id = ?1"),
                [id],
                job_row,
            )
            .optional()
        })
    }

    /// Jobs, newest last; of one machine, or of all; or only running ones.
    pub fn jobs(
        &self,
        machine: Option<&str>,
        running_only: bool,
    ) -> Result<Vec<JobRow>, CatalogError> {
        self.with(|c| {
            c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs j JOIN machines m ON m.id = j.machine_id
                 WHERE (?1 IS NULL OR j.machine_id = ?1) AND (?2 = 0 OR j.state = 'running') ORDER BY j.id"
            ))?
            .query_map(params![machine, running_only], job_row)?
            .collect()
        })
    }

    /// How many jobs there are of each (mode, state).
    pub fn job_counts(&self) -> Result<Vec<(String, String, u64)>, CatalogError> {
        self.with(|c| {
            c.prepare(
                "SELECT mode, state, COUNT(*) FROM jobs GROUP BY mode, state ORDER BY mode, state",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
        })
    }

    pub fn job_log(&self, job: i64, after_seq: i64) -> Result<Vec<LogLine>, CatalogError> {
        self.with(|c| {
            c.prepare(
                "SELECT seq, at_ms, step, message FROM job_log WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
            )?
            .query_map(params![job, after_seq], |r| {
                Ok(LogLine {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    step: r.get(2)?,
                    message: r.get(3)?,
                })
            })?
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::Lifecycle::*;

    fn catalog() -> (tempfile::TempDir, Catalog, String) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let (m, _) = cat.register_machine("web-1", &[1; 32], "t", b"s").unwrap();
        (dir, cat, m.to_string())
    }

    #[test]
    fn one_running_job_per_machine_and_guarded_lifecycle() {
        let (_d, cat, m) = catalog();
        let refused = cat.begin_job(&m, JobMode::Test, "qemu", None).unwrap();
        assert!(refused.unwrap_err().contains("it is not-ready"));
        cat.transition(&m, ReadyForTesting, Cause::InitialSync, "synced")
            .unwrap()
            .unwrap();
        let job = cat
            .begin_job(&m, JobMode::Test, "qemu", None)
            .unwrap()
            .unwrap();
        assert_eq!(cat.lifecycle(&m).unwrap().unwrap(), Testing);
        let again = cat.begin_job(&m, JobMode::Test, "qemu", None).unwrap();
        assert!(again.unwrap_err().contains("still running"));
        // No manual transition while a job runs.
        assert!(cat
            .transition(&m, ReadyForCutover, Cause::Mark, "mark")
            .unwrap()
            .is_err());
        cat.log_job(job.id, "snapshot", "one").unwrap();
        cat.log_job(job.id, "snapshot", "two").unwrap();
        let log = cat.job_log(job.id, 1).unwrap();
        assert_eq!(
            (log.len(), log[0].seq, log[0].message.as_str()),
            (1, 2, "two")
        );
        cat.finish_job(job.id, None, Testing).unwrap();
        let j = cat.job(job.id).unwrap().unwrap();
        assert_eq!((j.state, j.active), (JobState::Succeeded, true));
        assert_eq!(
            cat.active_job(&m, JobMode::Test).unwrap().unwrap().id,
            job.id
        );
        // A second test replaces the first as the active target.
        let job2 = cat
            .begin_job(&m, JobMode::Test, "qemu", None)
            .unwrap()
            .unwrap();
        cat.finish_job(job2.id, Some("boot failed"), ReadyForTesting)
            .unwrap();
        assert_eq!(
            cat.active_job(&m, JobMode::Test).unwrap().unwrap().id,
            job.id
        );
        let t = cat.lifecycle_log(&m).unwrap();
        let path: Vec<_> = t.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(path, ["ready-for-testing", "testing", "ready-for-testing"]);
        assert_eq!(cat.jobs(Some(&m), false).unwrap().len(), 2);
        assert_eq!(
            cat.job_counts().unwrap(),
            [
                ("test".to_string(), "failed".to_string(), 1),
                ("test".to_string(), "succeeded".to_string(), 1)
            ]
        );
        assert!(cat.jobs(None, true).unwrap().is_empty());
    }
}
