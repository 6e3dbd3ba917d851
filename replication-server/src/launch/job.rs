//! A running launch job: its log, its steps in order (cleanup, source action, recovery point,
//! export, convert, launch), and its end (the lifecycle it leaves, and the clean-up of a failure).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rehost_proto::MachineId;

use super::blueprint::{self, Blueprint};
use super::source::{source_action, SourceAction};
use super::{steps, target, JobLog, JobRow, LaunchOptions, StepError};
use crate::states::{JobMode, Lifecycle};
use crate::task::blocking;
use crate::Shared;

/// What a running job made, or removed, that its end must know of.
#[derive(Default)]
struct Made {
    /// The target dir, removed if the job fails.
    dir: Option<PathBuf>,
    /// A test replaced the machine's previous test target, which is gone.
    removed_test: bool,
}

/// One running launch job: what every step reads.
#[derive(Clone, Copy)]
struct Launch<'a> {
    shared: &'a Arc<Shared>,
    log: &'a JobLog,
    job: &'a JobRow,
    machine: &'a MachineId,
    mode: JobMode,
    bp: &'a Blueprint,
    opts: &'a LaunchOptions,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    job: JobRow,
    machine: MachineId,
    mode: JobMode,
    mut bp: Blueprint,
    opts: LaunchOptions,
) {
    let log = JobLog {
        shared: shared.clone(),
        job: job.id,
        run: opts.plan_run.map(|r| (r, job.hostname.clone())),
    };
    let start = Instant::now();
    if let Some((net, why)) = &opts.network {
        log.log(
            "job-start",
            format!(
                "network {net} ({why}) instead of the blueprint's {}",
                bp.network
            ),
        )
        .await;
        bp.network = net.clone();
    }
    log.log(
        "job-start",
        format!(
            "{} launch of {} ({}); blueprint: {}",
            mode.as_str(),
            job.hostname,
            machine,
            bp.summary()
        ),
    )
    .await;
    let mut made = Made::default();
    let launch = Launch {
        shared: &shared,
        log: &log,
        job: &job,
        machine: &machine,
        mode,
        bp: &bp,
        opts: &opts,
    };
    let result = steps(launch, &mut made).await;
    let removed_test = made.removed_test;
    let secs = start.elapsed().as_secs_f64();
    let (s, id) = (shared.clone(), job.id);
    match result {
        Ok(()) => {
            if mode == JobMode::Cutover {
                let why = "the cutover target runs";
                if let Err(e) = remove_test_target(&shared, &log, &machine, why).await {
                    log.log("cleanup", format!("could not remove the test target: {e}"))
                        .await;
                }
            }
            let to = mode.done_state();
            let end = match mode {
                JobMode::Test => format!("test launch complete in {secs:.1} s; the machine is testing (replication goes on)"),
                JobMode::Cutover => format!("cutover complete in {secs:.1} s; the machine is cutover-complete and its replication has stopped"),
            };
            log.log("job-end", end).await;
            let r =
                blocking(move || s.catalog.finish_job(id, None, to).map_err(StepError::from)).await;
            if let Err(e) = r {
                tracing::error!(job = id, error = %e, "record the end of a job");
            }
            if mode == JobMode::Cutover {
                // The agent's session ends now, and its reconnects are refused.
                shared
                    .slot(&machine)
                    .kick
                    .kick(crate::auth::Kick::Stopped(format!(
                        "machine {machine} is cutover-complete: it was cut over and {}",
                        rehost_proto::msg::REPLICATION_ENDED
                    )));
            }
        }
        Err(e) => {
            let why = e.to_string();
            // The failed job's dir is removed next (the cleanup line says so): paths in it are
            // written JOB_DIR/... in the error, and the last line says which dir that was.
            let dir = made.dir.take();
            let why = match &dir {
                Some(d) => why.replace(&format!("{}/", d.display()), "JOB_DIR/"),
                None => why,
            };
            log.log("fail", why.clone()).await;
            let end = match dir {
                Some(dir) => {
                    let (l, d) = (log.clone(), dir.clone());
                    let _ = blocking(move || {
                        cleanup(&l, &d);
                        Ok::<_, StepError>(())
                    })
                    .await;
                    format!("failed after {secs:.1} s (JOB_DIR: {})", dir.display())
                }
                None => format!("failed after {secs:.1} s"),
            };
            log.log("job-end", end).await;
            let back = restore_to(job.prev_lifecycle, removed_test);
            let r = blocking(move || {
                s.catalog
                    .finish_job(id, Some(&why), back)
                    .map_err(StepError::from)
            })
            .await;
            if let Err(e) = r {
                tracing::error!(job = id, error = %e, "record the end of a job");
            }
        }
    }
}

/// Stops and removes the machine's active test target, if there is one; says why in the log.
async fn remove_test_target(
    shared: &Arc<Shared>,
    log: &JobLog,
    machine: &MachineId,
    why: &str,
) -> Result<bool, StepError> {
    let (s, m) = (shared.clone(), machine.to_string());
    let prev = blocking(move || {
        s.catalog
            .active_job(&m, JobMode::Test)
            .map_err(StepError::from)
    })
    .await?;
    let Some(p) = prev else {
        return Ok(false);
    };
    log.log(
        "cleanup",
        format!("removing the test target of job {}: {why}", p.id),
    )
    .await;
    let (l, s) = (log.clone(), shared.clone());
    blocking(move || {
        if let Some(d) = &p.target_dir {
            cleanup(&l, Path::new(d));
        }
        s.catalog.deactivate_job(p.id).map_err(StepError::from)
    })
    .await?;
    Ok(true)
}

/// Where a failed job leaves the machine: where it was, except that a machine whose test target
/// the job removed is no longer testing.
pub(super) fn restore_to(prev: Lifecycle, removed_test: bool) -> Lifecycle {
    if prev == Lifecycle::Testing && removed_test {
        Lifecycle::ReadyForTesting
    } else {
        prev
    }
}

pub(super) fn cleanup(log: &JobLog, dir: &Path) {
    match target::remove(dir) {
        Ok(done) if done.is_empty() => {}
        Ok(done) => log.line("cleanup", done.join("; ")),
        Err(e) => log.line(
            "cleanup",
            format!(
                "could not remove everything: {}",
                rehost_proto::error::chain(&e)
            ),
        ),
    }
}

/// The job's steps in order: cleanup, source action, recovery point, export, convert, launch.
async fn steps(launch: Launch<'_>, made: &mut Made) -> Result<(), StepError> {
    let Launch {
        shared,
        log,
        job,
        machine,
        mode,
        bp,
        opts,
    } = launch;
    // cleanup: a new test replaces the previous one.
    if mode == JobMode::Test {
        made.removed_test =
            remove_test_target(shared, log, machine, "the new test replaces it").await?;
        if !made.removed_test {
            log.log("cleanup", "no previous test target").await;
        }
    }

    if let Some(a @ SourceAction::StopServices(units)) = &opts.source_action {
        log.log(
            "source",
            format!(
                "planned failover: stopping {} on the source before the final point",
                units.join(", ")
            ),
        )
        .await;
        let said = source_action(shared, machine, a)
            .await
            .map_err(StepError::SourceAction)?;
        log.log("source", format!("the agent says: {said}")).await;
    }

    let point = steps::choose_point(shared, log, job, machine, mode, opts).await?;

    if let Some(a @ SourceAction::PowerOff) = &opts.source_action {
        log.log(
            "source",
            "planned failover: powering off the source after the final point",
        )
        .await;
        match source_action(shared, machine, a).await {
            Ok(said) => log.log("source", format!("the agent says: {said}")).await,
            Err(e) => {
                log.log(
                    "source",
                    format!("could not power off the source ({e}); it keeps running, and the cutover goes on from the final point"),
                )
                .await
            }
        }
    }

    // export
    let parent = bp
        .target_dir
        .clone()
        .unwrap_or_else(|| shared.data_dir.join("targets"));
    let dir = parent
        .join(machine.as_str())
        .join(format!("job-{}-{}", job.id, mode.as_str()));
    {
        let (s, d, id) = (shared.clone(), dir.display().to_string(), job.id);
        blocking(move || s.catalog.set_job_target(id, &d).map_err(StepError::from)).await?;
    }
    made.dir = Some(dir.clone());
    crate::private::create_dir_all(&dir).map_err(StepError::file("create", &dir))?;
    if bp.launch == blueprint::LaunchMethod::Libvirt {
        // libvirt's QEMU runs as its own user: it must be able to reach the images (the images
        // themselves stay 0600; libvirt hands them to that user when it starts the domain).
        let top = if parent.starts_with(&shared.data_dir) {
            shared.data_dir.clone()
        } else {
            parent.clone()
        };
        let opened = crate::private::allow_search(&dir, &top)
            .map_err(StepError::file("let libvirt's QEMU reach", &dir))?;
        if !opened.is_empty() {
            log.log(
                "export",
                format!(
                    "made {} searchable (x, no read) for libvirt's QEMU user",
                    opened
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .await;
        }
    }
    let sources = steps::export(shared, log, &point, &dir).await?;

    // convert
    let report = steps::convert(shared, log, job, bp, &dir, &sources).await?;
    for s in &sources {
        let _ = std::fs::remove_file(s);
    }

    // launch
    steps::launch(log, job, mode, bp, &dir, &report).await
}
