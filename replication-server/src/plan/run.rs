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

/// Parses `30m`, `2h`, `1d`, `90s` or plain seconds, within 1 s..=[`MAX_CLEANUP_AFTER`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 30m, 2h, 1d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unit `{unit}` is not one of s, m, h, d")),
    };
    let secs = n
        .checked_mul(mult)
        .filter(|v| (1..=MAX_CLEANUP_AFTER.as_secs()).contains(v))
        .ok_or_else(|| format!("`{s}` is not within 1s..=7d"))?;
    Ok(Duration::from_secs(secs))
}

/// The checks of a run, all before anything is written: the plan has machines; none of them has
/// a running job and each is in a state its launch needs; their blueprints are usable; every
/// hook is still an executable; the points exist.
fn check(shared: &Shared, name: &str, req: &RunRequest) -> Result<Checked, RunError> {
    let plan = shared.catalog.plan(name)?;
    let members: Vec<(u32, &Member)> = plan
        .steps
        .iter()
        .flat_map(|s| s.machines.iter().map(move |m| (s.step, m)))
        .collect();
    if members.is_empty() {
        return Err(RunError::Refused(format!(
            "plan `{name}` has no machines: add some with `rehost-server plan add {name} MACHINE --step N`"
        )));
    }
    if req.cleanup_after.is_some() && req.mode != RunMode::Drill {
        return Err(RunError::Refused(
            "--cleanup-after belongs to a drill: a failover's targets are the production ones"
                .into(),
        ));
    }
    if req.mode == RunMode::FailoverPlanned && req.point.is_some() {
        return Err(RunError::Refused(
            "a planned failover takes its own final group point after the sources' actions: \
             --point is for a drill or an unplanned failover"
                .into(),
        ));
    }
    let jm = req.mode.job_mode();
    let allowed = jm.allowed_from();
    let mut refusals = Vec::new();
    let mut units = Vec::new();
    for (step, m) in &members {
        let id = MachineId::parse(&m.machine_id).map_err(|e| RunError::Refused(e.to_string()))?;
        let who = format!("{} ({})", m.hostname, m.machine_id);
        if let Some(j) = shared
            .catalog
            .jobs(Some(&m.machine_id), true)?
            .into_iter()
            .next()
        {
            refusals.push(format!(
                "{who} has job {} ({}) running (see `rehost-server jobs {}`)",
                j.id, j.mode, j.id
            ));
            continue;
        }
        if !allowed.contains(&m.lifecycle) {
            let from: Vec<_> = allowed.iter().map(|l| l.as_str()).collect();
            let hint = match (jm, m.lifecycle) {
                (_, Lifecycle::NotReady) => " (its initial sync has not finished)",
                (JobMode::Cutover, Lifecycle::ReadyForTesting) => {
                    " (drill the plan first, or `rehost-server mark MACHINE ready-for-cutover`)"
                }
                _ => "",
            };
            refusals.push(format!(
                "{who} is {}, and a {} needs {}{hint}",
                m.lifecycle,
                req.mode,
                from.join(" or ")
            ));
            continue;
        }
        let (bp, _) = launch::blueprint_of(shared, &m.machine_id)
            .map_err(|e| RunError::Refused(chain(&e)))?;
        if let Err(e) = bp.validate() {
            refusals.push(format!("the blueprint of {who} is not usable: {e}"));
            continue;
        }
        let action = match (&m.source_action, req.mode) {
            (Some(a), RunMode::FailoverPlanned) => Some(
                a.parse::<SourceAction>()
                    .map_err(|e| RunError::Refused(format!("source action of {who}: {e}")))?,
            ),
            _ => None,
        };
        units.push(Unit {
            member: (*m).clone(),
            id,
            step: *step,
            snapshot: None,
            action,
        });
    }
    for s in &plan.steps {
        for (kind, h) in [(HookKind::Pre, &s.pre_hook), (HookKind::Post, &s.post_hook)] {
            if let Some(h) = h {
                if let Err(e) = super::check_hook(h) {
                    refusals.push(format!("the {kind} hook of step {}: {e}", s.step));
                }
            }
        }
    }
    if !refusals.is_empty() {
        return Err(RunError::Refused(format!(
            "{} of plan `{name}` refused, nothing launched: {}",
            req.mode,
            refusals.join("; ")
        )));
    }
    let (point_note, group) = if req.mode == RunMode::FailoverPlanned {
        (
            "a final group point, taken once the sources' services are stopped".to_string(),
            None,
        )
    } else {
        choose_points(shared, name, req.point.as_deref(), &mut units)?
    };
    Ok(Checked {
        plan,
        units,
        point_note,
        group,
    })
}

/// Sets each unit's recovery point: from the group point asked for, or the plan's latest one
/// holding every machine, else each machine's latest point.
fn choose_points(
    shared: &Shared,
    name: &str,
    sel: Option<&str>,
    units: &mut [Unit],
) -> Result<(String, Option<i64>), RunError> {
    let groups = shared.catalog.group_points(name)?;
    let complete = |g: &crate::snapshot::group::GroupPoint| -> Option<HashMap<String, i64>> {
        let by: HashMap<String, i64> = g
            .snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Complete)
            .map(|s| (s.machine_id.clone(), s.id))
            .collect();
        units
            .iter()
            .all(|u| by.contains_key(&u.member.machine_id))
            .then_some(by)
    };
    let chosen = match sel {
        None | Some("latest") => groups
            .iter()
            .rev()
            .find_map(|g| complete(g).map(|by| (g, by))),
        Some(s) => {
            let id: i64 = s.parse().map_err(|_| {
                RunError::Refused(format!(
                    "--point `{s}` is neither a group point id nor `latest`"
                ))
            })?;
            let g = groups.iter().find(|g| g.id == id).ok_or_else(|| {
                RunError::NotFound(format!(
                    "no group point {id} of plan `{name}` (see `rehost-server snapshots --plan {name}`)"
                ))
            })?;
            let by = complete(g).ok_or_else(|| {
                RunError::Refused(format!(
                    "group point {id} does not hold a complete point of every machine of plan \
                     `{name}` (a machine was added since, or its point was deleted)"
                ))
            })?;
            Some((g, by))
        }
    };
    if let Some((g, by)) = chosen {
        for u in units.iter_mut() {
            u.snapshot = by.get(&u.member.machine_id).copied();
        }
        let note = format!(
            "group point {} ({}, taken at {})",
            g.id,
            g.consistency,
            crate::human::datetime(g.created_at)
        );
        return Ok((note, Some(g.id)));
    }
    let mut missing = Vec::new();
    for u in units.iter_mut() {
        let snaps = shared.catalog.snapshots(&u.member.machine_id)?;
        match crate::snapshot::select::select(&snaps, "latest") {
            Ok(p) => u.snapshot = Some(p.id),
            Err(_) => missing.push(format!("{} ({})", u.member.hostname, u.member.machine_id)),
        }
    }
    if !missing.is_empty() {
        return Err(RunError::Refused(format!(
            "plan `{name}` has no group point, and {} no recovery point yet: take one with \
             `rehost-server snapshot create --plan {name}`",
            missing.join(", ")
        )));
    }
    Ok((
        "each machine's latest recovery point: the plan has no group point holding every \
         machine (their points were taken at unrelated instants)"
            .into(),
        None,
    ))
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
                &shared,
                &log,
                &plan,
                &run,
                req.mode,
                &network,
                *n,
                step,
                members,
                &sem,
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

/// A machine's launch: its job (or why it failed), and how long from the step's start to its end.
type Launched = (Unit, Result<JobRow, String>, Duration);

/// One step: its pre hook, its machines' launches, the wait for the `boot` ones, its post hook.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    shared: &Arc<Shared>,
    log: &RunLog,
    plan: &Plan,
    run: &PlanRun,
    mode: RunMode,
    network: &super::Network,
    n: u32,
    step: Option<&super::Step>,
    members: Vec<Unit>,
    sem: &Arc<tokio::sync::Semaphore>,
    pending: &mut tokio::task::JoinSet<Launched>,
    went_on: &mut Vec<Stop>,
) -> Result<(), Stop> {
    if let Some(h) = step.and_then(|s| s.pre_hook.as_ref()) {
        let env = hook_env(plan, run, mode, n, HookKind::Pre, &members, &HashMap::new());
        run_hook(log, n, HookKind::Pre, h, env).await?;
    }
    // The step's own time, its hooks left out.
    let t = Instant::now();
    log.log(
        None,
        "step",
        format!(
            "step {n} start: {}",
            members
                .iter()
                .map(|u| format!(
                    "{} (wait {}{})",
                    u.member.hostname,
                    u.member.wait,
                    if u.member.delay_s > 0 {
                        format!(", delay {} s", u.member.delay_s)
                    } else {
                        String::new()
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    let mut gating = tokio::task::JoinSet::new();
    for u in members.iter().cloned() {
        let why = match mode {
            RunMode::Drill => format!("the test network of plan {}", plan.name),
            _ => format!("the production network of plan {}", plan.name),
        };
        let opts = LaunchOptions {
            snapshot: u.snapshot.map(|s| s.to_string()),
            network: Some((network.clone(), why)),
            plan_run: Some(run.id),
            ..Default::default()
        };
        let (s, l, sem) = (shared.clone(), log.clone(), sem.clone());
        let gates = u.member.wait == StepWait::Boot;
        let fut = async move {
            if u.member.delay_s > 0 {
                tokio::time::sleep(Duration::from_secs(u.member.delay_s)).await;
            }
            let _permit = sem.acquire_owned().await;
            let begun = Instant::now();
            let r = launch_one(&s, &l, &u, mode, opts).await;
            (u, r, begun.elapsed())
        };
        if gates {
            gating.spawn(fut);
        } else {
            pending.spawn(fut);
        }
    }
    let mut done: Vec<JobRow> = Vec::new();
    let mut failed: Option<Stop> = None;
    // The slowest launch (with its delay), and the boot of that machine.
    let mut slowest = (Duration::ZERO, None);
    while let Some(r) = gating.join_next().await {
        match r {
            Ok((u, Ok(job), took)) => {
                let took = took + Duration::from_secs(u.member.delay_s);
                if took >= slowest.0 {
                    slowest = (took, Some(job.id));
                }
                done.push(job);
            }
            Ok((u, Err(why), _)) if u.member.continue_on_error => {
                log.log(
                    Some(&u.member.hostname),
                    "step",
                    format!(
                        "step {n}: {} failed ({why}); the run goes on (continue-on-error)",
                        u.member.hostname
                    ),
                )
                .await;
                went_on.push(Stop {
                    machine: Some(u.member.hostname.clone()),
                    why: format!(
                        "step {n}: {} ({}) failed: {why}",
                        u.member.hostname, u.member.machine_id
                    ),
                });
            }
            Ok((u, Err(why), _)) => {
                failed.get_or_insert(Stop {
                    machine: Some(u.member.hostname.clone()),
                    why: format!(
                        "step {n}: {} ({}) failed: {why}",
                        u.member.hostname, u.member.machine_id
                    ),
                });
            }
            Err(e) => {
                failed.get_or_insert(Stop {
                    machine: None,
                    why: format!("step {n}: a launch task ended: {e}"),
                });
            }
        }
    }
    if let Some(stop) = failed {
        return Err(stop);
    }
    let wall = t.elapsed().as_secs_f64();
    let boot = match slowest.1 {
        Some(job) => {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || boot_seconds(&s, job))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let launch = slowest.0.as_secs_f64();
    log.log(
        None,
        "step",
        format!(
            "step {n} done in {wall:.1} s: {} up{}; slowest launch {launch:.1} s{}, plan overhead beyond it {:.1} s",
            done.len(),
            if members.len() > done.len() {
                format!(", {} not awaited (wait none)", members.len() - done.len())
            } else {
                String::new()
            },
            boot.map(|b| format!(" (its guest's boot {b:.1} s; export, conversion and plan beyond the boot {:.1} s)", (wall - b).max(0.0)))
                .unwrap_or_default(),
            (wall - launch).max(0.0)
        ),
    )
    .await;
    if let Some(h) = step.and_then(|s| s.post_hook.as_ref()) {
        let jobs: HashMap<String, JobRow> = done
            .into_iter()
            .map(|j| (j.machine_id.clone(), j))
            .collect();
        let addrs = {
            let (s, j) = (shared.clone(), jobs.clone());
            tokio::task::spawn_blocking(move || addresses(&s, &j))
                .await
                .unwrap_or_default()
        };
        let mut with = HashMap::new();
        for (m, j) in jobs {
            with.insert(m.clone(), (j, addrs.get(&m).cloned()));
        }
        let env = hook_env(plan, run, mode, n, HookKind::Post, &members, &with);
        run_hook(log, n, HookKind::Post, h, env).await?;
    }
    Ok(())
}

/// One machine's launch, run to its end: the job, or why it failed.
async fn launch_one(
    shared: &Arc<Shared>,
    log: &RunLog,
    u: &Unit,
    mode: RunMode,
    opts: LaunchOptions,
) -> Result<JobRow, String> {
    let host = Some(u.member.hostname.as_str());
    let jm = mode.job_mode();
    let begun = launch::begin(shared, &u.id, jm, &opts)
        .await
        .map_err(|e| chain(&e))?;
    log.log(
        host,
        "launch",
        format!(
            "{jm} job {} of {} started from recovery point {}",
            begun.1.id,
            u.member.hostname,
            u.snapshot.map(|s| s.to_string()).unwrap_or_default()
        ),
    )
    .await;
    let job = launch::run_to_end(shared.clone(), begun, u.id.clone(), jm, opts)
        .await
        .map_err(|e| chain(&e))?;
    match job.state {
        JobState::Succeeded => Ok(job),
        _ => Err(format!(
            "job {}: {}",
            job.id,
            job.error.as_deref().unwrap_or("failed")
        )),
    }
}

/// The seconds the boot check of `job` waited for the guest's marker (`target booted: ... after
/// N s` in its log).
fn boot_seconds(shared: &Shared, job: i64) -> Option<f64> {
    let lines = shared.catalog.job_log(job, 0).ok()?;
    lines.iter().rev().find_map(|l| {
        let rest = l.message.strip_prefix("target booted: ")?;
        let after = rest.rsplit_once(" after ")?.1;
        after.split(" s").next()?.parse().ok()
    })
}

/// The guest addresses the boot checks of these jobs saw (`guest address A.B.C.D` in their logs).
fn addresses(shared: &Shared, jobs: &HashMap<String, JobRow>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (m, j) in jobs {
        let Ok(lines) = shared.catalog.job_log(j.id, 0) else {
            continue;
        };
        for l in lines.iter().rev() {
            if let Some(rest) = l.message.split("guest address ").nth(1) {
                let a: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                if !a.is_empty() {
                    out.insert(m.clone(), a);
                    break;
                }
            }
        }
    }
    out
}

/// A hook's environment (documented in the README):
///
/// - `REHOST_PLAN`, `REHOST_RUN` (`P<id>`), `REHOST_MODE` (`drill`, `failover-planned`,
///   `failover-unplanned`), `REHOST_STEP`, `REHOST_HOOK` (`pre` or `post`);
/// - `REHOST_MACHINE_IDS` and `REHOST_HOSTNAMES`: the step's machines, space-separated, in one
///   order that the next variables follow;
/// - post hooks only: `REHOST_JOB_IDS`, `REHOST_TARGET_DIRS` and `REHOST_TARGET_ADDRESSES` (the
///   guest address its boot check saw), `-` for a machine without one (not awaited, or unknown).
pub fn hook_env(
    plan: &Plan,
    run: &PlanRun,
    mode: RunMode,
    step: u32,
    kind: HookKind,
    members: &[impl MemberLike],
    jobs: &HashMap<String, StepJob>,
) -> Vec<(String, String)> {
    let join = |f: &dyn Fn(&str, &str) -> String| {
        members
            .iter()
            .map(|m| f(m.machine_id(), m.hostname()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut env = vec![
        ("REHOST_PLAN".into(), plan.name.clone()),
        ("REHOST_RUN".into(), format!("P{}", run.id)),
        ("REHOST_MODE".into(), mode.to_string()),
        ("REHOST_STEP".into(), step.to_string()),
        ("REHOST_HOOK".into(), kind.to_string()),
        ("REHOST_MACHINE_IDS".into(), join(&|id, _| id.to_string())),
        ("REHOST_HOSTNAMES".into(), join(&|_, h| h.to_string())),
    ];
    if kind == HookKind::Post {
        let of = |f: &dyn Fn(&StepJob) -> Option<String>| {
            join(&|id, _| jobs.get(id).and_then(f).unwrap_or_else(|| "-".into()))
        };
        env.push((
            "REHOST_JOB_IDS".into(),
            of(&|(j, _)| Some(j.id.to_string())),
        ));
        env.push((
            "REHOST_TARGET_DIRS".into(),
            of(&|(j, _)| j.target_dir.clone()),
        ));
        env.push(("REHOST_TARGET_ADDRESSES".into(), of(&|(_, a)| a.clone())));
    }
    env
}

/// What [`hook_env`] reads of a step's machine.
pub trait MemberLike {
    fn machine_id(&self) -> &str;
    fn hostname(&self) -> &str;
}

impl MemberLike for Unit {
    fn machine_id(&self) -> &str {
        &self.member.machine_id
    }
    fn hostname(&self) -> &str {
        &self.member.hostname
    }
}

impl MemberLike for Member {
    fn machine_id(&self) -> &str {
        &self.machine_id
    }
    fn hostname(&self) -> &str {
        &self.hostname
    }
}

/// Runs a hook with its environment and timeout, its output into the run's log. A failure (an
/// exit status other than 0, a signal, the timeout, or not starting) stops the run unless the
/// hook continues on error.
async fn run_hook(
    log: &RunLog,
    step: u32,
    kind: HookKind,
    hook: &Hook,
    env: Vec<(String, String)>,
) -> Result<(), Stop> {
    let name = format!("hook-{kind}");
    let t = Instant::now();
    log.log(
        None,
        &name,
        format!(
            "step {step} {kind} hook start: {} (timeout {} s)",
            hook.path, hook.timeout_s
        ),
    )
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let copy = {
        let (log, name) = (log.clone(), name.clone());
        tokio::spawn(async move {
            while let Some(l) = rx.recv().await {
                log.log(None, &name, l).await;
            }
        })
    };
    let outcome = hook_outcome(hook, env, tx).await;
    // Every line is in the log before the hook's end is.
    let _ = copy.await;
    let secs = t.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            log.log(
                None,
                &name,
                format!("step {step} {kind} hook succeeded in {secs:.1} s"),
            )
            .await;
            Ok(())
        }
        Err(why) if hook.continue_on_error => {
            log.log(
                None,
                &name,
                format!("step {step} {kind} hook failed after {secs:.1} s ({why}); the plan goes on (continue-on-error)"),
            )
            .await;
            Ok(())
        }
        Err(why) => Err(Stop {
            machine: None,
            why: format!("step {step} {kind} hook {} failed: {why}", hook.path),
        }),
    }
}

/// Runs a hook to its end or its timeout; each line of its output goes to `lines` (stderr's
/// prefixed `stderr: `).
async fn hook_outcome(
    hook: &Hook,
    env: Vec<(String, String)>,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&hook.path);
    cmd.envs(env)
        .current_dir(Path::new(&hook.path).parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start it: {e}"))?;
    let pgid = child.id();
    let out = child.stdout.take().map(tokio::io::BufReader::new);
    let err = child.stderr.take().map(tokio::io::BufReader::new);
    let reader = async move {
        let mut readers = Vec::new();
        if let Some(o) = out {
            readers.push(tokio::spawn(copy_lines(lines.clone(), o, "")));
        }
        if let Some(e) = err {
            readers.push(tokio::spawn(copy_lines(lines, e, "stderr: ")));
        }
        for r in readers {
            let _ = r.await;
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(hook.timeout_s), async {
        let status = child.wait().await;
        reader.await;
        status
    })
    .await;
    match waited {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(match st.code() {
            Some(c) => format!("exit status {c}"),
            None => format!("ended by {st}"),
        }),
        Ok(Err(e)) => Err(format!("wait: {e}")),
        Err(_) => {
            if let Some(p) = pgid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Err(format!(
                "still running after its timeout of {} s: stopped (SIGKILL to its process group)",
                hook.timeout_s
            ))
        }
    }
}

async fn copy_lines<R: tokio::io::AsyncBufRead + Unpin>(
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    r: R,
    prefix: &str,
) {
    let mut r = r;
    let mut n = 0usize;
    let mut buf = Vec::new();
    // Bytes, not text: a hook's output that is not UTF-8 is kept (lossily), and read to its end.
    while r.read_until(b'\n', &mut buf).await.is_ok_and(|got| got > 0) {
        n += 1;
        if n <= HOOK_LINES {
            let mut l = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if l.len() > HOOK_LINE_BYTES {
                let mut cut = HOOK_LINE_BYTES;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
                l.push('…');
            }
            let _ = tx.send(format!("{prefix}{l}"));
        }
        buf.clear();
    }
    if n > HOOK_LINES {
        let _ = tx.send(format!("{prefix}({} more lines not kept)", n - HOOK_LINES));
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` as a hook with `timeout_s`; its outcome and output lines.
    fn hook(script: &str, timeout_s: u64) -> (Result<(), String>, Vec<String>, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let h = Hook {
            path: path.display().to_string(),
            timeout_s,
            continue_on_error: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let env = vec![("REHOST_STEP".to_string(), "3".to_string())];
        let r = rt.block_on(hook_outcome(&h, env, tx));
        let took = t.elapsed();
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        (r, lines, took)
    }

    #[test]
    fn a_hook_gets_its_environment_and_its_output_is_kept_line_by_line() {
        let (r, lines, _) = hook(
            "echo step $REHOST_STEP in $(pwd)\necho oops >&2\nprintf 'bad \\377 byte\\n'\n",
            10,
        );
        assert_eq!(r, Ok(()));
        assert!(
            lines.iter().any(|l| l.starts_with("step 3 in /")),
            "{lines:?}"
        );
        assert!(lines.contains(&"stderr: oops".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"bad \u{fffd} byte".to_string()),
            "{lines:?}"
        );
        let (r, lines, _) = hook("seq 1 250\n", 10);
        assert_eq!(r, Ok(()));
        assert_eq!(lines.len(), HOOK_LINES + 1, "{lines:?}");
        assert_eq!(lines.last().unwrap(), "(50 more lines not kept)");
    }

    #[test]
    fn a_failing_hook_says_how_and_one_past_its_timeout_is_stopped_with_its_children() {
        let (r, _, _) = hook("exit 3\n", 10);
        assert_eq!(r, Err("exit status 3".into()));
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let (r, _, took) = hook(
            &format!("sleep 300 &\necho $! > {}\nwait\n", pidfile.display()),
            1,
        );
        let e = r.unwrap_err();
        assert!(e.contains("timeout of 1 s"), "{e}");
        assert!(took < Duration::from_secs(30), "{took:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed with its process group (reaped by init once its parent is gone).
        let gone = (0..50).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = state.is_empty() || state.split(' ').nth(2) == Some("Z");
            if !dead {
                std::thread::sleep(Duration::from_millis(100));
            }
            dead
        });
        assert!(gone, "the hook's child {pid} outlived it");
        let missing = Hook {
            path: "/nonexistent/hook".into(),
            timeout_s: 1,
            continue_on_error: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let e = rt
            .block_on(hook_outcome(&missing, Vec::new(), tx))
            .unwrap_err();
        assert!(e.starts_with("could not start it"), "{e}");
    }

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(MAX_CLEANUP_AFTER));
        for bad in [
            "",
            "0",
            "8d",
            "1w",
            "m",
            "-5m",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
