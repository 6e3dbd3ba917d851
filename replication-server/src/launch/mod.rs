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
//!   [`target`]: target dirs and their processes; [`steps`]: point, export, convert, launch;
//!   [`api`]: admin API routes.

pub mod api;
pub mod blueprint;
pub mod rows;
pub mod steps;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::MachineId;

use crate::states::{Cause, JobMode, Lifecycle};
use crate::Shared;
use blueprint::Blueprint;
pub use rows::{JobRow, LogLine};

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
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            snapshot: None,
            source_action: None,
            final_point_timeout: FINAL_POINT_BOUND,
        }
    }
}

/// A planned failover's action on the source, asked of its agent during a cutover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// `systemctl stop UNITS` before the final point, so that the point holds everything the
    /// services wrote; if it fails, the cutover stops there and the source keeps running.
    StopServices(Vec<String>),
    /// `systemctl poweroff` once the final point is taken.
    PowerOff,
}

impl std::str::FromStr for SourceAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "poweroff" {
            return Ok(SourceAction::PowerOff);
        }
        let Some(list) = s.strip_prefix("stop-services:") else {
            return Err(format!(
                "source action `{s}` is neither poweroff nor stop-services:UNIT[,UNIT...]"
            ));
        };
        let units: Vec<String> = list
            .split(',')
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if units.is_empty() || units.len() > rehost_proto::msg::MAX_SOURCE_UNITS {
            return Err(format!(
                "stop-services needs 1 to {} units",
                rehost_proto::msg::MAX_SOURCE_UNITS
            ));
        }
        if let Some(bad) = units.iter().find(|u| !rehost_proto::msg::valid_unit(u)) {
            return Err(format!("`{bad}` is not a systemd unit name"));
        }
        Ok(SourceAction::StopServices(units))
    }
}

/// How long the agent gets to stop the source's services (or to acknowledge a poweroff).
pub const SOURCE_ACTION_BOUND: Duration = Duration::from_secs(150);

/// Asks the connected agent to act on the source; returns what it said.
async fn source_action(
    shared: &Shared,
    machine: &MachineId,
    action: &SourceAction,
) -> Result<String, String> {
    let slot = shared.slot(machine);
    let out = slot.agent().ok_or("the machine's agent is not connected")?;
    let (id, rx) = slot.expect_action();
    let (kind, units) = match action {
        SourceAction::StopServices(u) => {
            (rehost_proto::msg::SourceActionKind::StopServices, u.clone())
        }
        SourceAction::PowerOff => (rehost_proto::msg::SourceActionKind::PowerOff, Vec::new()),
    };
    if out
        .send(rehost_proto::Message::SourceAction { id, kind, units })
        .await
        .is_err()
    {
        slot.take_action(id);
        return Err("the machine's agent disconnected".into());
    }
    drop(out);
    match tokio::time::timeout(SOURCE_ACTION_BOUND, rx).await {
        Ok(Ok((true, m))) => Ok(m),
        Ok(Ok((false, m))) => Err(m),
        Ok(Err(_)) => Err("the agent's session ended before it answered".into()),
        Err(_) => {
            slot.take_action(id);
            Err(format!(
                "no answer within {} s",
                SOURCE_ACTION_BOUND.as_secs()
            ))
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
    if opts.source_action.is_some() && mode != JobMode::Cutover {
        return Err(LaunchError::Refused(
            "a source action (stop services, power off) belongs to a cutover, not a test".into(),
        ));
    }
    let s = shared.clone();
    let m = machine.clone();
    let (bp, job) = tokio::task::spawn_blocking(move || {
        let (bp, _) = blueprint_of(&s, m.as_str())?;
        bp.validate().map_err(|e| {
            LaunchError::Refused(format!("the blueprint of {m} is not usable: {e}"))
        })?;
        let launch = format!("{:?}", bp.launch).to_lowercase();
        let job = s
            .catalog
            .begin_job(m.as_str(), mode, &launch)?
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
    let row = job.clone();
    tokio::spawn(run(shared, job, machine, mode, bp, opts));
    Ok(row)
}

/// Writes the job's log lines (and mirrors them to the server log).
#[derive(Clone)]
struct JobLog {
    shared: Arc<Shared>,
    job: i64,
}

impl JobLog {
    fn line(&self, step: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(job = self.job, step, "{message}");
        if let Err(e) = self.shared.catalog.log_job(self.job, step, &message) {
            tracing::warn!(job = self.job, error = %e, "write job log");
        }
    }

    async fn log(&self, step: &str, message: impl Into<String>) {
        let (l, step, message) = (self.clone(), step.to_string(), message.into());
        let _ = tokio::task::spawn_blocking(move || l.line(&step, message)).await;
    }
}

/// What a running job made that a failure must remove.
#[derive(Default)]
struct Made {
    dir: Option<PathBuf>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("task failed: {e}"))?
}

async fn run(
    shared: Arc<Shared>,
    job: JobRow,
    machine: MachineId,
    mode: JobMode,
    bp: Blueprint,
    opts: LaunchOptions,
) {
    let log = JobLog {
        shared: shared.clone(),
        job: job.id,
    };
    let start = Instant::now();
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
    let mut removed_test = false;
    let result = steps(
        &shared,
        &log,
        &job,
        &machine,
        mode,
        &bp,
        &opts,
        &mut made,
        &mut removed_test,
    )
    .await;
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
            let r = blocking(move || {
                s.catalog
                    .finish_job(id, None, to)
                    .map_err(|e| e.to_string())
            })
            .await;
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
        Err(why) => {
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
                        Ok(())
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
                    .map_err(|e| e.to_string())
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
) -> Result<bool, String> {
    let (s, m) = (shared.clone(), machine.to_string());
    let prev = blocking(move || {
        s.catalog
            .active_job(&m, JobMode::Test)
            .map_err(|e| e.to_string())
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
        s.catalog.deactivate_job(p.id).map_err(|e| e.to_string())
    })
    .await?;
    Ok(true)
}

/// Where a failed job leaves the machine: where it was, except that a machine whose test target
/// the job removed is no longer testing.
fn restore_to(prev: Lifecycle, removed_test: bool) -> Lifecycle {
    if prev == Lifecycle::Testing && removed_test {
        Lifecycle::ReadyForTesting
    } else {
        prev
    }
}

fn cleanup(log: &JobLog, dir: &Path) {
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

#[allow(clippy::too_many_arguments)]
async fn steps(
    shared: &Arc<Shared>,
    log: &JobLog,
    job: &JobRow,
    machine: &MachineId,
    mode: JobMode,
    bp: &Blueprint,
    opts: &LaunchOptions,
    made: &mut Made,
    removed_test: &mut bool,
) -> Result<(), String> {
    // cleanup: a new test replaces the previous one.
    if mode == JobMode::Test {
        *removed_test =
            remove_test_target(shared, log, machine, "the new test replaces it").await?;
        if !*removed_test {
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
        let said = source_action(shared, machine, a).await.map_err(|e| {
            format!("source action failed: {e}; no cutover was made and the source keeps running")
        })?;
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
        blocking(move || s.catalog.set_job_target(id, &d).map_err(|e| e.to_string())).await?;
    }
    made.dir = Some(dir.clone());
    crate::private::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    if bp.launch == blueprint::LaunchMethod::Libvirt {
        // libvirt's QEMU runs as its own user: it must be able to reach the images (the images
        // themselves stay 0600; libvirt hands them to that user when it starts the domain).
        let top = if parent.starts_with(&shared.data_dir) {
            shared.data_dir.clone()
        } else {
            parent.clone()
        };
        let opened = crate::private::allow_search(&dir, &top)
            .map_err(|e| format!("let libvirt's QEMU reach {}: {e}", dir.display()))?;
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
