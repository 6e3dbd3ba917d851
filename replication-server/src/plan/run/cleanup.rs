//! The end of drills (`plan cleanup`, `--cleanup-after`) and of runs a server stop interrupted.

use super::*;

/// What `plan cleanup` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cleaned {
    pub plan: String,
    /// The drill runs whose targets were removed.
    pub runs: Vec<i64>,
    /// Per machine (hostname): what was removed.
    pub removed: Vec<(String, Vec<String>)>,
}

/// Removes the targets of the plan's drills that are not cleaned up yet: each machine whose
/// active test target is a drill's goes back to ready-for-testing. Refused while a run of the
/// plan is running.
pub fn cleanup(shared: &Shared, name: &str, why: &str) -> Result<Cleaned, RunError> {
    shared.catalog.plan(name)?;
    let runs = shared.catalog.plan_runs(Some(name))?;
    if let Some(r) = runs.iter().find(|r| r.state == JobState::Running) {
        return Err(RunError::Refused(format!(
            "{} P{} of plan `{name}` is running: wait for it to end (`rehost-server jobs P{} --follow`)",
            r.mode, r.id, r.id
        )));
    }
    let mut out = Cleaned {
        plan: name.into(),
        runs: Vec::new(),
        removed: Vec::new(),
    };
    for r in runs
        .iter()
        .filter(|r| r.mode == RunMode::Drill && r.cleaned_at.is_none())
    {
        clean_run(shared, r, why, &mut out)?;
    }
    Ok(out)
}

fn clean_run(shared: &Shared, r: &PlanRun, why: &str, out: &mut Cleaned) -> Result<(), RunError> {
    let mut notes = Vec::new();
    for id in &r.jobs {
        let Some(j) = shared.catalog.job(*id)? else {
            continue;
        };
        let current = shared.catalog.active_job(&j.machine_id, JobMode::Test)?;
        if current.as_ref().map(|c| c.id) != Some(j.id) {
            continue;
        }
        let done = launch::revert_test(shared, &j.machine_id).map_err(|e| {
            RunError::Refused(format!(
                "clean up {} ({}): {}",
                j.hostname,
                j.machine_id,
                chain(&e)
            ))
        })?;
        let what = if done.is_empty() {
            "no target left to remove".to_string()
        } else {
            done.join("; ")
        };
        shared.catalog.log_run(
            r.id,
            Some(&j.hostname),
            "cleanup",
            &format!(
                "test target of job {} removed ({why}): {what}; the machine is ready-for-testing",
                j.id
            ),
        )?;
        notes.push(j.hostname.clone());
        out.removed.push((j.hostname.clone(), done));
    }
    shared.catalog.log_run(
        r.id,
        None,
        "cleanup",
        &if notes.is_empty() {
            format!("drill cleaned up ({why}): none of its targets was still there")
        } else {
            format!("drill cleaned up ({why}): {}", notes.join(", "))
        },
    )?;
    shared.catalog.set_run_cleaned(r.id)?;
    out.runs.push(r.id);
    tracing::info!(run = r.id, plan = %r.plan, why, "drill cleaned up");
    Ok(())
}

/// Ends forgotten drills: every [`CLEANUP_TICK`], the drills past their `--cleanup-after`
/// deadline are cleaned up (the run's log says so).
pub async fn cleanup_scheduler(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(CLEANUP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            for r in s.catalog.drills_due(crate::catalog::now())? {
                let why = format!(
                    "its --cleanup-after deadline {} passed",
                    crate::human::datetime(r.cleanup_at.unwrap_or_default())
                );
                let mut out = Cleaned {
                    plan: r.plan.clone(),
                    runs: Vec::new(),
                    removed: Vec::new(),
                };
                if let Err(e) = clean_run(&s, &r, &why, &mut out) {
                    tracing::warn!(run = r.id, error = %chain(&e), "clean up a drill past its deadline");
                }
            }
            Ok::<_, RunError>(())
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %chain(&e), "look for drills past their clean-up deadline");
        }
    }
}

/// At server start: every run still `running` was interrupted by the stop (its launch jobs are
/// recovered by `launch::recover`); each is marked failed with a log line saying so.
pub fn recover(shared: &Shared) -> Result<Vec<i64>, crate::catalog::CatalogError> {
    let mut ids = Vec::new();
    for r in shared.catalog.running_runs()? {
        let why = "interrupted: the server stopped while the run ran";
        shared.catalog.log_run(
            r.id,
            None,
            "run-end",
            "the server stopped while this run ran (crash or kill): its running launches were \
             cleaned up as failed ones; the targets of finished steps stay",
        )?;
        shared.catalog.finish_run(r.id, Some(why), None)?;
        tracing::warn!(run = r.id, plan = %r.plan, "plan run interrupted by a server stop: marked failed");
        ids.push(r.id);
    }
    Ok(ids)
}
