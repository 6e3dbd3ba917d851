//! The admin API's requests and replies, as the handlers send them and the operator commands
//! read them: one set of types for both sides, so a field cannot change on one side alone. The
//! JSON of the replies the commands print with `--json` is documented in the README and pinned
//! by the end-to-end tests (`tests/pins/`). States are the enums of `crate::states` and
//! `rehost_proto::state`, whose serde names are the documented strings.

use serde::{Deserialize, Serialize};

pub use crate::catalog::TokenRow;
pub use crate::catalog::Transition;
pub use crate::launch::blueprint::Blueprint;
pub use crate::launch::rows::{JobRow, LogLine};
pub use crate::plan::{Hook, Member, Networks, Plan, PlanSummary, Step};
pub use crate::snapshot::SnapshotInfo;
pub use crate::states::{HookKind, Lifecycle, StepWait};
pub use crate::store::gc::GcStats;
pub use rehost_proto::state::ReplicationState;

/// Every error reply: the status code says what kind, `error` says why.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// `GET /v1/health`, to anyone.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
}

/// `machines --json`: stable, documented in the README.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachinesView {
    pub machines: Vec<MachineView>,
    /// This server's version (`machines --outdated` lists agents older than it).
    #[serde(default)]
    pub server_version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MachineView {
    pub machine_id: String,
    pub hostname: String,
    pub lifecycle: Lifecycle,
    pub connected: bool,
    pub agent_address: Option<String>,
    /// The agent's version: the connected agent's, else the one last seen (null: never seen).
    pub agent_version: Option<String>,
    /// Why the agent is not connected, when known: the reason the agent gave when it was
    /// uninstalled (`agent uninstalled`). Null while connected or when unknown.
    #[serde(default)]
    pub disconnected_reason: Option<String>,
    /// When the agent detached the machine (it was uninstalled); null otherwise.
    #[serde(default)]
    pub detached_at: Option<i64>,
    pub registered_at: i64,
    pub last_seen: Option<i64>,
    pub revoked: bool,
    /// An older machine with the same hostname or source id (see `auth`); null: none.
    #[serde(default)]
    pub duplicate_of: Option<String>,
    pub disks: Vec<DiskView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DiskView {
    pub disk_id: u64,
    pub device: String,
    pub size_bytes: u64,
    /// initial-sync, rescan, continuous, lagging, stalled, disconnected
    pub state: ReplicationState,
    pub progress_percent: f64,
    pub replicated_bytes: u64,
    pub backlog_bytes: u64,
    /// True when `backlog_bytes` is a lower bound: a scanned disk between passes does not know
    /// what changed until its next pass reads the disk.
    #[serde(default)]
    pub backlog_lower_bound: bool,
    /// Seconds a launch now would be behind the source; null until the initial sync is done.
    pub lag_seconds: Option<u64>,
    pub sync_complete: bool,
}

/// `POST /v1/machines/{id}/revoke` and `POST /v1/tokens/{id}/revoke`: what was revoked.
#[derive(Debug, Serialize, Deserialize)]
pub struct Revoked {
    pub revoked: String,
}

/// `POST /v1/machines/{id}/unrevoke`: whether the machine was revoked before.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unrevoked {
    pub machine_id: String,
    pub unrevoked: bool,
}

/// What `machine delete` removed.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineDeleted {
    pub machine_id: String,
    pub hostname: String,
    pub disks: usize,
    pub recovery_points: usize,
    /// Disk space the machine's staging volumes and hash indexes took (allocated bytes).
    pub volume_bytes: u64,
    /// The garbage collection run after the delete: what it freed of the store.
    pub gc: Option<GcStats>,
    /// Why that collection did not run or failed (the scheduler's next one frees the rest).
    pub gc_error: Option<String>,
}

/// `POST /v1/machines/{id}/throttle`.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Throttle {
    /// Megabits per second; null or 0 removes the cap.
    pub max_mbps: Option<u64>,
}

/// The cap now in force, and whether a connected agent was told at once.
#[derive(Debug, Serialize, Deserialize)]
pub struct Throttled {
    pub machine_id: String,
    /// Null: no cap.
    pub max_mbps: Option<u64>,
    pub applied_now: bool,
}

/// `POST /v1/tokens` and `POST /v1/machines/{id}/reinstall-token`.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CreateToken {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

/// `token create --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub expires_at: Option<i64>,
}

/// `token create --reinstall MACHINE --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedReinstallToken {
    pub id: String,
    pub token: String,
    pub expires_at: Option<i64>,
    pub machine_id: String,
}

/// `token list --json`: install and reinstall tokens (never their secrets).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenRow>,
}

/// `snapshots MACHINE --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotList {
    pub machine_id: String,
    pub snapshots: Vec<SnapshotInfo>,
}

/// `POST /v1/machines/{machine}/snapshots`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateSnapshot {
    /// Answer once the snapshot is complete (with it), rather than once it is requested.
    #[serde(default)]
    pub wait: bool,
    /// Take the point where the stream stands, without the agent's freeze and drain.
    #[serde(default)]
    pub stream_point: bool,
}

/// The answer to [`CreateSnapshot`]: the complete point (`wait`), else that it was asked for.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SnapshotCreated {
    Complete(SnapshotInfo),
    Requested(SnapshotRequested),
}

/// `snapshot create --json` without `--wait`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotRequested {
    pub requested: bool,
    pub machine_id: String,
}

/// `POST /v1/machines/{machine}/snapshots/{id}/delete`: the id of the point deleted.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotDeleted {
    pub deleted: i64,
}

/// `GET /v1/retention?machine=M`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RetentionQuery {
    pub machine: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RetentionView {
    pub machine_id: Option<String>,
    pub policy: String,
    /// `machine` (an override), `server` (the server-wide setting) or `default`.
    pub source: String,
}

/// `POST /v1/retention`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SetRetention {
    pub machine: Option<String>,
    /// A policy (`10m:1h,1h:24h,1d:7d`, `off`); `None` removes the override.
    pub policy: Option<String>,
}

/// `blueprint show --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlueprintView {
    pub machine_id: String,
    /// `machine` (set for this machine) or `default`.
    pub source: String,
    pub blueprint: Blueprint,
}

/// `POST /v1/machines/{machine}/blueprint`: the blueprint fields to change (a partial
/// blueprint); the others keep their values.
pub type BlueprintChanges = serde_json::Map<String, serde_json::Value>;

/// `POST /v1/machines/{machine}/launch`; the reply is the job started ([`JobRow`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchRequest {
    /// `test` or `cutover`.
    pub mode: String,
    /// A snapshot id or `latest`; default: the latest for a test, a fresh final point for a
    /// cutover.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Cutover only: `stop-services:UNIT[,UNIT...]` (before the final point) or `poweroff`
    /// (after it).
    #[serde(default)]
    pub source_action: Option<String>,
    /// Cutover only: seconds the agent gets to make the final point (default 60).
    #[serde(default)]
    pub final_point_timeout_s: Option<u64>,
}

/// `POST /v1/machines/{machine}/mark`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MarkRequest {
    pub state: String,
}

/// The lifecycle a mark left and the one it set.
#[derive(Debug, Serialize, Deserialize)]
pub struct Marked {
    pub machine_id: String,
    pub from: Lifecycle,
    pub lifecycle: String,
}

/// `POST /v1/machines/{machine}/test/revert`: what was removed of the test target.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reverted {
    pub machine_id: String,
    pub lifecycle: String,
    pub removed: Vec<String>,
}

/// `machine history --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct History {
    pub machine_id: String,
    pub transitions: Vec<Transition>,
}

/// `GET /v1/jobs?machine=M`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobsQuery {
    pub machine: Option<String>,
}

/// `jobs --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobRow>,
    /// Runs of recovery plans (`P<id>`), the parents of the jobs that name them; left out when
    /// there is none, or when the list is of one machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_runs: Vec<PlanRun>,
}

/// `GET /v1/jobs/{id}?after=SEQ`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LogQuery {
    /// Only log lines after this sequence number (for `--follow`).
    #[serde(default)]
    pub after: i64,
}

/// `jobs JOB --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub job: JobRow,
    pub log: Vec<LogLine>,
}

/// `plan list --json`: every recovery plan, by name.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanList {
    pub plans: Vec<PlanSummary>,
}

/// `POST /v1/plans`; the reply is the new plan ([`Plan`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreatePlan {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `DELETE /v1/plans/{plan}`: what went with the plan.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanDeleted {
    pub name: String,
    pub machines: usize,
    pub hooks: usize,
}

/// `PUT /v1/plans/{plan}/machines/{machine}`; the reply is the plan. A machine already in that
/// step gets the new wait and delay; one in another step is refused.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetMember {
    /// 1..=20.
    pub step: u32,
    /// Default `boot`.
    #[serde(default)]
    pub wait: Option<StepWait>,
    /// Seconds before the machine's launch in its step, 0..=3600; default 0.
    #[serde(default)]
    pub delay_s: Option<u64>,
    /// A planned failover's source action for this machine (as a cutover's); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_action: Option<String>,
    /// Whether a run goes on when this machine's launch fails; default false.
    #[serde(default)]
    pub continue_on_error: bool,
}

/// `DELETE /v1/plans/{plan}/machines/{machine}`: the machine and the step it was in.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemberRemoved {
    pub plan: String,
    pub machine_id: String,
    pub step: u32,
}

/// `PUT /v1/plans/{plan}/network`: `user`, `none` or `bridge:NAME` for either network; one left
/// out keeps its value. The reply is the plan.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SetNetworks {
    #[serde(default)]
    pub production: Option<String>,
    #[serde(default)]
    pub test: Option<String>,
}

/// `PUT /v1/plans/{plan}/schedule`: the plan's retention policy (`EVERY:FOR,...` or `off`), or
/// null to clear it. The reply is the plan.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SetSchedule {
    #[serde(default)]
    pub policy: Option<String>,
}

/// `PUT /v1/plans/{plan}/hooks/{step}/{pre|post}`; the reply is the plan.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetHook {
    /// Absolute path of an executable regular file on the staging host.
    pub path: String,
    /// 1..=3600; default 300.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub continue_on_error: bool,
}

/// A group point: one recovery point of every machine of a plan at one instant.
pub use crate::snapshot::group::GroupPoint;

/// `GET /v1/plans/{plan}/points`, `snapshots --plan NAME --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupPointList {
    pub plan: String,
    pub points: Vec<GroupPoint>,
}

pub use crate::plan::run::Cleaned;
pub use crate::plan::runs::{PlanRun, RunLogLine};
pub use crate::states::{JobState, RunMode};

/// `POST /v1/plans/{plan}/drill`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DrillRequest {
    /// A group point id or `latest` (default).
    #[serde(default)]
    pub point: Option<String>,
    /// Remove the drill's targets this many seconds after it ended (1..=7 days); default never.
    #[serde(default)]
    pub cleanup_after_s: Option<u64>,
}

/// `POST /v1/plans/{plan}/failover`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FailoverRequest {
    /// Planned (sources' actions, then a final group point) or unplanned (no source contacted).
    pub planned: bool,
    /// Unplanned only: a group point id or `latest` (default).
    #[serde(default)]
    pub point: Option<String>,
}

/// `GET /v1/plan-runs/{id}?after=SEQ`: a run and its log (after SEQ).
#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    pub run: PlanRun,
    pub log: Vec<RunLogLine>,
}

/// `plan status --json`: each machine of the plan with its part in the last drill and the last
/// failover, and those runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanStatus {
    pub plan: String,
    pub last_drill: Option<PlanRun>,
    pub last_failover: Option<PlanRun>,
    pub machines: Vec<MemberStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub machine_id: String,
    pub hostname: String,
    pub step: u32,
    pub lifecycle: Lifecycle,
    /// Its launch in the last drill, if it had one.
    pub drill: Option<MachineRun>,
    /// Its launch in the last failover, if it had one.
    pub failover: Option<MachineRun>,
}

/// A machine's launch job in a plan run.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineRun {
    pub run: i64,
    pub job: i64,
    pub state: JobState,
    pub snapshot_id: Option<i64>,
    /// Its target dir while the target is there (null once removed).
    pub target: Option<String>,
    pub error: Option<String>,
}
