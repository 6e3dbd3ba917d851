//! A machine's lifecycle in the catalog: its current state and the log of every transition with
//! its reason. Every move goes through [`set_lifecycle`], which checks it against
//! [`crate::states::TRANSITIONS`].

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{now, Catalog, CatalogError};
use crate::states::{Cause, Lifecycle};

/// One line of a machine's lifecycle history (`history MACHINE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    pub at: i64,
    pub from: Lifecycle,
    pub to: Lifecycle,
    pub reason: String,
}

/// Moves `machine` from `from` to `to` and logs it, if the table allows it (a move to the same
/// state records nothing).
pub(crate) fn set_lifecycle(
    tx: &Transaction<'_>,
    machine: &str,
    from: Lifecycle,
    to: Lifecycle,
    cause: Cause,
    reason: &str,
) -> Result<(), CatalogError> {
    from.check(to, cause)?;
    if from == to {
        return Ok(());
    }
    tx.execute(
        "UPDATE machines SET lifecycle = ?2 WHERE id = ?1",
        params![machine, to],
    )?;
    tx.execute(
        "INSERT INTO lifecycle_log (machine_id, at, from_state, to_state, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![machine, now(), from, to, reason],
    )?;
    Ok(())
}

pub(crate) fn lifecycle_of(
    tx: &Transaction<'_>,
    machine: &str,
) -> rusqlite::Result<Option<Lifecycle>> {
    tx.query_row(
        "SELECT lifecycle FROM machines WHERE id = ?1",
        [machine],
        |r| r.get(0),
    )
    .optional()
}

/// Whether a job runs on `machine`.
fn job_running(tx: &Transaction<'_>, machine: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE machine_id = ?1 AND state = 'running')",
        [machine],
        |r| r.get(0),
    )
}

impl Catalog {
    pub fn lifecycle(&self, machine: &str) -> Result<Option<Lifecycle>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            lifecycle_of(&tx, machine)
        })
    }

    /// Moves `machine` to `to` by `cause` if the table allows it from its current state and no
    /// job runs on it. `Ok(Err(current))` when the move is not allowed (with why, when a job
    /// runs). Returns the state it left.
    pub fn transition(
        &self,
        machine: &str,
        to: Lifecycle,
        cause: Cause,
        reason: &str,
    ) -> Result<Result<Lifecycle, String>, CatalogError> {
        self.try_with(|c| {
            let tx = c.transaction()?;
            let Some(cur) = lifecycle_of(&tx, machine)? else {
                return Ok(Err("unknown".into()));
            };
            if job_running(&tx, machine)? {
                return Ok(Err(format!("{cur} (a job is running)")));
            }
            if cur.check(to, cause).is_err() {
                return Ok(Err(cur.to_string()));
            }
            set_lifecycle(&tx, machine, cur, to, cause, reason)?;
            tx.commit()?;
            Ok(Ok(cur))
        })
    }

    pub fn lifecycle_log(&self, machine: &str) -> Result<Vec<Transition>, CatalogError> {
        self.with(|c| {
            c.prepare(
                "SELECT at, from_state, to_state, reason FROM lifecycle_log WHERE machine_id = ?1 ORDER BY id",
            )?
            .query_map([machine], |r| {
                Ok(Transition {
                    at: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    reason: r.get(3)?,
                })
            })?
            .collect()
        })
    }
}
