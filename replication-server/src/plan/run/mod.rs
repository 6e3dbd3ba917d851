//! Running a recovery plan: a drill (test launches on the plan's test network, replication going
//! on) or a failover (cutovers onto the production network). A run is a parent job
//! ([`PlanRun`]) whose log holds its own lines and, mirrored, every line of its machines' launch
//! jobs, each naming its machine.
//!
//! ```text
//! checks (all before anything runs) ─▶ [planned: stop services ─▶ final group point ─▶ power off]
//!   ─▶ step 1: pre hook ─▶ launches in parallel (each after its delay) ─▶ wait for the `boot`
//!              members ─▶ post hook ─▶ step 2 ... ─▶ run-end
//! ```
//!
//! - **Points.** `--point GROUP` launches every machine from its point of that group point;
//!   `latest` (the default) from the plan's latest group point holding every machine, else each
//!   machine's latest point (the log says so). A planned failover takes its own final group point
//!   after the sources' `stop-services` actions, so it takes no `--point`.
//! - **Steps.** The machines of a step launch in parallel, at most [`PARALLEL`] at a time; a
//!   launch is a test (drill) or cutover (failover) job of `launch`, whose `launch` step waits
//!   for the target's boot marker. The next step starts when every member whose `wait` is `boot`
//!   has ended its launch; the `none` ones are awaited at the end of the run.
//! - **Failure.** A machine whose launch fails stops the run at its step (its target is removed by
//!   its job, as a failed launch's; the targets of the steps before stay, a drill's until `plan
//!   cleanup`); a hook that fails stops it unless it is set to continue on error.
//! - **Hooks** run on the staging host with [`hook_env`]'s environment, their output in the run's
//!   log, stopped (the whole process group) at their timeout.
//! - **Drills** end with their targets running; `plan cleanup` or the drill's `--cleanup-after`
//!   deadline ([`cleanup_scheduler`]) removes them and puts the machines back in
//!   ready-for-testing.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::error::chain;
use rehost_proto::MachineId;
use tokio::io::AsyncBufReadExt as _;

/// A machine's launch job in a step, and the guest address its boot check saw.
type StepJob = (JobRow, Option<String>);

mod check;
mod cleanup;
mod hooks;
mod steps;

use check::check;
pub use check::parse_duration;
pub use cleanup::{cleanup, cleanup_scheduler, recover, Cleaned};
pub use hooks::{hook_env, MemberLike};
use steps::{run_step, StepRun};

use super::runs::PlanRun;
use super::{Hook, Member, Plan, PlanError};
use crate::launch::{self, JobRow, LaunchOptions, SourceAction};
use crate::states::{HookKind, JobMode, JobState, Lifecycle, RunMode, SnapshotState, StepWait};
use crate::Shared;

/// The most launches of one step that run at once.
pub const PARALLEL: usize = 4;
/// The longest `--cleanup-after`: a week.
pub const MAX_CLEANUP_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the server looks for drills past their clean-up deadline.
pub const CLEANUP_TICK: Duration = Duration::from_secs(5);
/// The most lines of a hook's output the run's log keeps (the rest are counted).
const HOOK_LINES: usize = 200;
/// The longest line of a hook's output the log keeps, in bytes.
const HOOK_LINE_BYTES: usize = 1000;

/// What a run asks besides its plan.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub mode: RunMode,
    /// A group point id or `latest`; `None`: latest (a planned failover takes its own).
    pub point: Option<String>,
    /// Drills only: remove the targets this long after the drill ended.
    pub cleanup_after: Option<Duration>,
}

/// Why a run was refused (nothing was launched), or the catalog failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The run cannot start as asked: the text says why.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
}

impl From<crate::catalog::CatalogError> for RunError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        RunError::Plan(e.into())
    }
}

/// One machine of a run, resolved by the checks.
#[derive(Debug, Clone)]
struct Unit {
    member: Member,
    id: MachineId,
    step: u32,
    /// The recovery point it launches from (`None`: the planned failover's group point).
    snapshot: Option<i64>,
    action: Option<SourceAction>,
}

/// What the checks found: the plan, its machines in step order, and where the points come from.
struct Checked {
    plan: Plan,
    units: Vec<Unit>,
    /// Says which point the run launches from, for the log.
    point_note: String,
    group: Option<i64>,
}

/// Checks a run, records it, and runs it in the background; returns the run as recorded.
pub async fn start(
    shared: Arc<Shared>,
    name: String,
    req: RunRequest,
) -> Result<PlanRun, RunError> {
    let (s, n, r) = (shared.clone(), name.clone(), req.clone());
    let (checked, run) = tokio::task::spawn_blocking(move || {
        let checked = check(&s, &n, &r)?;
        let cleanup_at = r
            .cleanup_after
            .map(|d| crate::catalog::now() + d.as_secs() as i64);
        let run = s
            .catalog
            .begin_run(&n, r.mode, cleanup_at)?
            .map_err(RunError::Refused)?;
        if let Some(g) = checked.group {
            s.catalog.set_run_group(run.id, g)?;
        }
        Ok::<_, RunError>((checked, run))
    })
    .await
    .map_err(|e| RunError::Refused(format!("plan run task: {e}")))??;
    tracing::info!(run = run.id, plan = %name, mode = %req.mode, "plan run started");
    let row = run.clone();
    tokio::spawn(execute(shared, run, checked, req));
    Ok(row)
}

/// The run's log.
#[derive(Clone)]
struct RunLog {
    shared: Arc<Shared>,
    run: i64,
}

impl RunLog {
    async fn log(&self, machine: Option<&str>, step: &str, message: impl Into<String>) {
        let (s, run, m, st, msg) = (
            self.shared.clone(),
            self.run,
            machine.map(String::from),
            step.to_string(),
            message.into(),
        );
        tracing::info!(run, step = %st, machine = m.as_deref().unwrap_or("-"), "{msg}");
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = s.catalog.log_run(run, m.as_deref(), &st, &msg) {
                tracing::warn!(run, error = %e, "write plan run log");
            }
        })
        .await;
    }
}

/// Why a run stopped: the machine (hostname) that failed it, if one did, and the reason.
struct Stop {
    machine: Option<String>,
    why: String,
}

async fn execute(shared: Arc<Shared>, run: PlanRun, checked: Checked, req: RunRequest) {
    let log = RunLog {
        shared: shared.clone(),
        run: run.id,
    };
    let Checked {
        plan,
        mut units,
        point_note,
        group: _,
    } = checked;
    let network = match req.mode {
        RunMode::Drill => plan.networks.test.clone(),
        _ => plan.networks.production.clone(),
    };
    // Every step with machines or hooks, in order (a step of hooks alone runs its hooks).
    let steps: Vec<u32> = plan.steps.iter().map(|s| s.step).collect();
    let start = Instant::now();
    log.log(
        None,
        "run-start",
        format!(
            "{} of plan {}: {} machines in {} steps, network {} ({}); from {point_note}",
            req.mode,
            plan.name,
            units.len(),
            steps.len(),
            network,
            match req.mode {
                RunMode::Drill => "the plan's test network",
                _ => "the plan's production network",
            }
        ),
    )
    .await;
    let mut result = Ok(());
    if req.mode == RunMode::FailoverPlanned {
        result = planned_prelude(&shared, &log, &plan, &mut units, run.id).await;
    }
    let mut pending = tokio::task::JoinSet::new();
    // Machines that failed with continue-on-error: the run went on, and ends failed.
    let mut went_on: Vec<Stop> = Vec::new();
    if result.is_ok() {
        let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        for n in &steps {
            let step = plan.steps.iter().find(|s| s.step == *n);
            let members: Vec<Unit> = units.iter().filter(|u| u.step == *n).cloned().collect();
            let r = run_step(
                StepRun {
                    shared: &shared,
                    log: &log,
                    plan: &plan,
                    run: &run,
                    mode: req.mode,
                    network: &network,
                    sem: &sem,
                },
                *n,
                step,
                members,
                &mut pending,
                &mut went_on,
            )
            .await;
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
    }
    // The members that did not gate a step: their launches end before the run does.
    while let Some(done) = pending.join_next().await {
        if let Ok((u, Err(why), _)) = done {
            let stop = Stop {
                machine: Some(u.member.hostname.clone()),
                why: format!("{} ({}): {why}", u.member.hostname, u.member.machine_id),
            };
            if u.member.continue_on_error {
                went_on.push(stop);
            } else if result.is_ok() {
                result = Err(stop);
            }
        }
    }
    if result.is_ok() && !went_on.is_empty() {
        let why: Vec<String> = went_on.iter().map(|s| s.why.clone()).collect();
        result = Err(Stop {
            machine: went_on[0].machine.clone(),
            why: format!(
                "every step ran, but {} failed (continue-on-error): {}",
                went_on.len(),
                why.join("; ")
            ),
        });
    }
    let secs = start.elapsed().as_secs_f64();
    let (error, machine) = match &result {
        Ok(()) => {
            let end = match req.mode {
                RunMode::Drill => format!(
                    "drill succeeded in {secs:.1} s: every target runs on the test network until \
                     `rehost-server plan cleanup {}`{}",
                    plan.name,
                    run.cleanup_at
                        .map(|t| format!(" or {}", crate::human::datetime(t)))
                        .unwrap_or_default()
                ),
                _ => format!(
                    "failover succeeded in {secs:.1} s: every machine is cutover-complete and \
                     runs on the production network"
                ),
            };
            log.log(None, "run-end", end).await;
            (None, None)
        }
        Err(stop) => {
            log.log(
                stop.machine.as_deref(),
                "run-end",
                format!("{} failed after {secs:.1} s: {}", req.mode, stop.why),
            )
            .await;
            (Some(stop.why.clone()), stop.machine.clone())
        }
    };
    let (s, id) = (shared.clone(), run.id);
    let r = tokio::task::spawn_blocking(move || {
        s.catalog
            .finish_run(id, error.as_deref(), machine.as_deref())
    })
    .await;
    if !matches!(r, Ok(Ok(()))) {
        tracing::error!(run = id, "record the end of a plan run");
    }
}

/// A planned failover before its steps: each source's `stop-services` action, one final group
/// point of every machine, then each `poweroff` action (a power-off that fails is logged, and the
/// failover goes on from the point, as a cutover's).
async fn planned_prelude(
    shared: &Arc<Shared>,
    log: &RunLog,
    plan: &Plan,
    units: &mut [Unit],
    run: i64,
) -> Result<(), Stop> {
    let mut set = tokio::task::JoinSet::new();
    for u in units.iter() {
        if let Some(a @ SourceAction::StopServices(names)) = &u.action {
            log.log(
                Some(&u.member.hostname),
                "source",
                format!("stopping {} on the source", names.join(", ")),
            )
            .await;
            let (s, u, a) = (shared.clone(), u.clone(), a.clone());
            set.spawn(async move {
                let r = launch::source_action(&s, &u.id, &a).await;
                (u, r)
            });
        }
    }
    while let Some(done) = set.join_next().await {
        let Ok((u, r)) = done else { continue };
        match r {
            Ok(said) => {
                log.log(
                    Some(&u.member.hostname),
                    "source",
                    format!("the agent says: {said}"),
                )
                .await
            }
            Err(e) => {
                return Err(Stop {
                    machine: Some(u.member.hostname.clone()),
                    why: format!(
                        "{} ({}): could not stop its services ({e}); nothing was cut over",
                        u.member.hostname, u.member.machine_id
                    ),
                })
            }
        }
    }
    log.log(
        None,
        "snapshot",
        "taking the final group point of every machine (freeze together, or crash points at one instant)",
    )
    .await;
    let ids: Vec<MachineId> = units.iter().map(|u| u.id.clone()).collect();
    let g = crate::snapshot::group::take(
        shared.clone(),
        plan.name.clone(),
        ids,
        format!("planned failover P{run}"),
    )
    .await
    .map_err(|e| Stop {
        machine: None,
        why: format!("the final group point failed: {}", chain(&e)),
    })?;
    log.log(
        None,
        "snapshot",
        format!("final group point {} ({}): {}", g.id, g.consistency, g.note),
    )
    .await;
    {
        let (s, gid) = (shared.clone(), g.id);
        let _ = tokio::task::spawn_blocking(move || s.catalog.set_run_group(run, gid)).await;
    }
    for u in units.iter_mut() {
        u.snapshot = g
            .snapshots
            .iter()
            .find(|s| s.machine_id == u.member.machine_id)
            .map(|s| s.id);
        if u.snapshot.is_none() {
            return Err(Stop {
                machine: Some(u.member.hostname.clone()),
                why: format!(
                    "the final group point holds no point of {}",
                    u.member.hostname
                ),
            });
        }
    }
    for u in units.iter() {
        if let Some(a @ SourceAction::PowerOff) = &u.action {
            let host = Some(u.member.hostname.as_str());
            log.log(
                host,
                "source",
                "powering off the source after the final point",
            )
            .await;
            match launch::source_action(shared, &u.id, a).await {
                Ok(said) => log.log(host, "source", format!("the agent says: {said}")).await,
                Err(e) => {
                    log.log(
                        host,
                        "source",
                        format!("could not power off the source ({e}); it keeps running, and the failover goes on from the final point"),
                    )
                    .await
                }
            }
        }
    }
    Ok(())
}
