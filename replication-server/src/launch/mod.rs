//! Test and cutover launches: from a machine's recovery point to a running target VM.
//!
//! A launch is a **job** with a timestamped progress log in the catalog (`jobs --follow` reads it
//! live). Its steps:
//!
//! ```text
//! job-start ─▶ cleanup (test: the previous test target) ─▶ snapshot ─▶ export ─▶ convert ─▶ launch ─▶ boot-check ─▶ job-end
//!              cutover: final consistency point from the agent, or the latest point (said so)
//! ```
//!
//! - **snapshot**: a test uses the chosen point (default: the latest; one is taken if there is
//!   none). A cutover asks the agent for a final consistency point (freeze, drain, mark, thaw)
//!   and, if none comes within [`FINAL_POINT_BOUND`], falls back to the latest recovery point.
//! - **export**: each disk of the point into the job's target dir as a raw image.
//! - **convert**: `rehost-converter convert` as its own process (it dies with the server:
//!   `PR_SET_PDEATHSIG`), its summary copied into the log.
//! - **launch** per the machine's [`blueprint`]: `none` leaves the image with `qemu.sh` and
//!   `domain.xml`; `qemu` starts the VM and waits for its boot marker on the serial console;
//!   `libvirt` defines and starts the domain and waits the same way.
//!
//! **Lifecycle** (every transition kept in `lifecycle_log`): a test moves the machine to
//! `testing`, a cutover to `cutting-over` and, once its target booted, `cutover-complete`, after
//! which the server refuses the machine's agent (replication of it stops). A failed job puts the
//! machine back where it was and leaves nothing behind: its target dir, VM, mounts and loop
//! devices are removed. A job the server's crash interrupted is found at the next start, marked
//! failed with a log line saying so, and cleaned up the same way ([`recover`]).
//!
//! - [`rows`]: catalog rows; [`blueprint`]: target hardware, QEMU and libvirt definitions;
//!   [`target`]: target dirs and their processes; `job`: a running job, its log and its end;
//!   `steps`: point, export, convert, launch; `source`: a cutover's source action (their admin
//!   API routes are `crate::api::launches`).

pub mod blueprint;
mod error;
pub use error::{SourceActionError, StepError};
mod job;
pub mod rows;
mod source;
mod steps;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rehost_proto::MachineId;

use crate::states::{Cause, JobMode, Lifecycle};
use crate::Shared;
use blueprint::{Blueprint, Network};
use job::{restore_to, run};
pub use rows::{JobRow, LogLine};
pub use source::{source_action, SourceAction};

/// How long a cutover waits by default for the agent's final consistency point before it falls
/// back to the latest recovery point.
pub const FINAL_POINT_BOUND: Duration = Duration::from_secs(60);

/// What a launch request asks besides its mode.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// A snapshot id or `latest`; `None`: the latest (test) or a final point (cutover).
    pub snapshot: Option<String>,
    /// Cutover only: planned failover on the source.
    pub source_action: Option<SourceAction>,
    /// Cutover only: how long the agent gets to make the final point.
    pub final_point_timeout: Duration,
    /// The target's network instead of the blueprint's, and why (a plan's test or production
    /// network).
    pub network: Option<(Network, String)>,
    /// The recovery plan run this launch is part of: its log lines go to the run's log too.
    pub plan_run: Option<i64>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            snapshot: None,
            source_action: None,
            final_point_timeout: FINAL_POINT_BOUND,
            network: None,
            plan_run: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("launch catalog")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("stored blueprint of {machine} is unreadable")]
    Blueprint {
        machine: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Writes the job's log lines (and mirrors them to the server log).
#[derive(Clone)]
pub(crate) struct JobLog {
    pub(crate) shared: Arc<Shared>,
    pub(crate) job: i64,
    /// The plan run this job is part of, and the job's machine (hostname) as the run's log
    /// names it: each line is mirrored there.
    pub(crate) run: Option<(i64, String)>,
}

impl JobLog {
    pub(crate) fn line(&self, step: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(job = self.job, step, "{message}");
        if let Err(e) = self.shared.catalog.log_job(self.job, step, &message) {
            tracing::warn!(job = self.job, error = %e, "write job log");
        }
        if let Some((run, host)) = &self.run {
            let m = format!("job {}: {message}", self.job);
            if let Err(e) = self.shared.catalog.log_run(*run, Some(host), step, &m) {
                tracing::warn!(run, error = %e, "write plan run log");
            }
        }
    }

    pub(crate) async fn log(&self, step: &str, message: impl Into<String>) {
        let (l, step, message) = (self.clone(), step.to_string(), message.into());
        let _ = tokio::task::spawn_blocking(move || l.line(&step, message)).await;
    }
}

/// The machine's blueprint (or the default), and whether it was set.
pub fn blueprint_of(shared: &Shared, machine: &str) -> Result<(Blueprint, bool), LaunchError> {
    match shared.catalog.blueprint(machine)? {
        Some(body) => serde_json::from_str(&body)
            .map(|b| (b, true))
            .map_err(|source| LaunchError::Blueprint {
                machine: machine.into(),
                source,
            }),
        None => Ok((Blueprint::default(), false)),
    }
}

/// The `rehost-converter` binary: `$REHOST_CONVERTER`, else next to this executable, else PATH.
pub fn converter_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REHOST_CONVERTER") {
        return p.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("rehost-converter");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("rehost-converter")
}

/// Starts a job: checks the lifecycle and that no other job runs, records it, and runs it in the
/// background. Returns the job as recorded.
pub async fn start(
    shared: Arc<Shared>,
    machine: MachineId,
    mode: JobMode,
    opts: LaunchOptions,
) -> Result<JobRow, LaunchError> {
    let (bp, job) = begin(&shared, &machine, mode, &opts).await?;
    let row = job.clone();
    tokio::spawn(run(shared, job, machine, mode, bp, opts));
    Ok(row)
}

/// A job begun by [`begin`], run to its end here (a plan run awaits its machines' launches).
/// Returns the job as it ended.
pub async fn run_to_end(
    shared: Arc<Shared>,
    begun: (Blueprint, JobRow),
    machine: MachineId,
    mode: JobMode,
    opts: LaunchOptions,
) -> Result<JobRow, LaunchError> {
    let (bp, job) = begun;
    let id = job.id;
    run(shared.clone(), job, machine, mode, bp, opts).await;
    tokio::task::spawn_blocking(move || shared.catalog.job(id))
        .await
        .map_err(|e| LaunchError::Refused(format!("launch task: {e}")))??
        .ok_or_else(|| LaunchError::NotFound(format!("no job {id}")))
}

/// The checks and the catalog row of a launch (the lifecycle allows it, no other job runs on the
/// machine, its blueprint is usable), nothing run yet.
pub async fn begin(
    shared: &Arc<Shared>,
    machine: &MachineId,
    mode: JobMode,
    opts: &LaunchOptions,
) -> Result<(Blueprint, JobRow), LaunchError> {
    if opts.source_action.is_some() && mode != JobMode::Cutover {
        return Err(LaunchError::Refused(
            "a source action (stop services, power off) belongs to a cutover, not a test".into(),
        ));
    }
    let s = shared.clone();
    let m = machine.clone();
    let plan_run = opts.plan_run;
    let (bp, job) = tokio::task::spawn_blocking(move || {
        let (bp, _) = blueprint_of(&s, m.as_str())?;
        bp.validate().map_err(|e| {
            LaunchError::Refused(format!("the blueprint of {m} is not usable: {e}"))
        })?;
        let launch = format!("{:?}", bp.launch).to_lowercase();
        let job = s
            .catalog
            .begin_job(m.as_str(), mode, &launch, plan_run)?
            .map_err(|why| {
                let hint = if why.ends_with("not-ready") {
                    " (its initial sync has not finished)"
                } else if mode == JobMode::Cutover && why.ends_with("ready-for-testing") {
                    " (launch a test first, or `rehost-server mark MACHINE ready-for-cutover`)"
                } else {
                    ""
                };
                LaunchError::Refused(format!("{why}{hint}"))
            })?;
        Ok::<_, LaunchError>((bp, job))
    })
    .await
    .map_err(|e| LaunchError::Refused(format!("launch task: {e}")))??;
    tracing::info!(job = job.id, %machine, mode = mode.as_str(), "launch job started");
    Ok((bp, job))
}

/// At server start: every job still `running` was interrupted by the server's stop. Each is
/// marked failed with a log line saying so, its helper and target removed, its machine put back.
pub fn recover(shared: &Shared) -> Result<Vec<i64>, crate::catalog::CatalogError> {
    let mut ids = Vec::new();
    for job in shared.catalog.jobs(None, true)? {
        let note = "the server stopped while this job ran (crash or kill); cleaning up";
        shared.catalog.log_job(job.id, "job-end", note)?;
        let mut done = Vec::new();
        if let (Some(pid), Some(dir)) = (job.child_pid, &job.target_dir) {
            if target::stop_process(pid, dir, Duration::from_secs(30)) {
                done.push(format!("stopped the converter (pid {pid})"));
            }
        }
        if let Some(dir) = &job.target_dir {
            match target::remove(Path::new(dir)) {
                Ok(d) => done.extend(d),
                Err(e) => done.push(format!(
                    "could not remove everything: {}",
                    rehost_proto::error::chain(&e)
                )),
            }
        }
        if !done.is_empty() {
            shared
                .catalog
                .log_job(job.id, "cleanup", &done.join("; "))?;
        }
        // A test that had replaced the previous one removed it already.
        let removed_test = job.mode == JobMode::Test
            && shared
                .catalog
                .active_job(&job.machine_id, JobMode::Test)?
                .is_none();
        shared.catalog.finish_job(
            job.id,
            Some("interrupted: the server stopped while the job ran"),
            restore_to(job.prev_lifecycle, removed_test),
        )?;
        tracing::warn!(job = job.id, machine = %job.machine_id, "launch job interrupted by a server stop: marked failed and cleaned up");
        ids.push(job.id);
    }
    Ok(ids)
}

/// Stops and removes the machine's active test target and moves it back to ready-for-testing.
pub fn revert_test(shared: &Shared, machine: &str) -> Result<Vec<String>, LaunchError> {
    let cur = shared
        .catalog
        .lifecycle(machine)?
        .ok_or_else(|| LaunchError::NotFound(format!("no machine {machine}")))?;
    if !Lifecycle::sources(Lifecycle::ReadyForTesting, Cause::Revert).contains(&cur) {
        return Err(LaunchError::Refused(format!(
            "{machine} is {cur}: only a machine in testing or ready-for-cutover has a test to revert"
        )));
    }
    let mut done = Vec::new();
    if let Some(job) = shared.catalog.active_job(machine, JobMode::Test)? {
        if let Some(dir) = &job.target_dir {
            done = target::remove(Path::new(dir))
                .map_err(|e| LaunchError::Refused(rehost_proto::error::chain(&e)))?;
        }
        shared.catalog.deactivate_job(job.id)?;
        shared.catalog.log_job(
            job.id,
            "revert",
            &format!("test reverted: {}", done.join("; ")),
        )?;
    }
    shared
        .catalog
        .transition(
            machine,
            Lifecycle::ReadyForTesting,
            Cause::Revert,
            "test reverted",
        )?
        .map_err(|cur| LaunchError::Refused(format!("{machine} is {cur}")))?;
    Ok(done)
}

/// `mark MACHINE STATE`: the operator's own transitions.
pub fn mark(shared: &Shared, machine: &MachineId, to: &str) -> Result<Lifecycle, LaunchError> {
    let refuse = || {
        LaunchError::Refused(format!(
            "`{to}` cannot be set by hand (use ready-for-cutover, ready-for-testing or archived)"
        ))
    };
    let to: Lifecycle = to.parse().map_err(|_| refuse())?;
    let from = Lifecycle::sources(to, Cause::Mark);
    if from.is_empty() {
        return Err(refuse());
    }
    let prev = shared
        .catalog
        .transition(machine.as_str(), to, Cause::Mark, &format!("marked {to}"))?
        .map_err(|cur| {
            let from: Vec<_> = from.iter().map(|l| l.as_str()).collect();
            LaunchError::Refused(format!(
                "{machine} is {cur}; it can be marked {to} only from {}",
                from.join(", ")
            ))
        })?;
    if to == Lifecycle::Archived {
        // An archived machine's agent is refused from now on.
        shared
            .slot(machine)
            .kick
            .kick(crate::auth::Kick::Stopped(format!(
                "machine {machine} is archived: {}",
                rehost_proto::msg::REPLICATION_ENDED
            )));
    }
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_actions_parse_and_refuse_what_is_not_a_unit() {
        assert_eq!("poweroff".parse(), Ok(SourceAction::PowerOff));
        assert_eq!(
            "stop-services:nginx.service,postgresql@15-main".parse(),
            Ok(SourceAction::StopServices(vec![
                "nginx.service".into(),
                "postgresql@15-main".into()
            ]))
        );
        for bad in [
            "stop-services:",
            "stop-services:--all",
            "stop-services:a b",
            "reboot",
        ] {
            assert!(bad.parse::<SourceAction>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_failed_job_puts_the_machine_back() {
        use Lifecycle::*;
        assert_eq!(restore_to(Testing, true), ReadyForTesting);
        assert_eq!(restore_to(Testing, false), Testing);
        assert_eq!(restore_to(ReadyForCutover, true), ReadyForCutover);
    }
}
