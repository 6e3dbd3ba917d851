//! One step of a run: its hooks, its machines' launches in parallel, the wait for the ones that
//! gate the next step.

use super::hooks::run_hook;
use super::*;

/// A machine's launch: its job (or why it failed), and how long from the step's start to its end.
pub(super) type Launched = (Unit, Result<JobRow, String>, Duration);

/// What every step of a run reads.
#[derive(Clone, Copy)]
pub(super) struct StepRun<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) log: &'a RunLog,
    pub(super) plan: &'a Plan,
    pub(super) run: &'a PlanRun,
    pub(super) mode: RunMode,
    /// The plan's test (drill) or production (failover) network.
    pub(super) network: &'a crate::plan::Network,
    /// Bounds the launches running at once ([`PARALLEL`]).
    pub(super) sem: &'a Arc<tokio::sync::Semaphore>,
}

/// Step `n`: its pre hook, its machines' launches, the wait for the `boot` ones, its post hook.
/// The `none` members' launches go to `pending`; the members that failed with continue-on-error
/// to `went_on`.
pub(super) async fn run_step(
    r: StepRun<'_>,
    n: u32,
    step: Option<&crate::plan::Step>,
    members: Vec<Unit>,
    pending: &mut tokio::task::JoinSet<Launched>,
    went_on: &mut Vec<Stop>,
) -> Result<(), Stop> {
    let StepRun {
        shared,
        log,
        plan,
        run,
        mode,
        network,
        sem,
    } = r;
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
