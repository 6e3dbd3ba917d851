//! Admin API routes for blueprints, launches, jobs, lifecycle marks and test reverts (used by the
//! `rehost-server blueprint`, `launch`, `jobs`, `mark`, `test revert` and `machine history`
//! commands). A machine may be named by id or hostname.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::blueprint::Blueprint;
use super::rows::{JobRow, LogLine};
use super::{blueprint_of, LaunchError};
use crate::admin::{authorize, blocking, internal, resolve, ApiError};
use crate::catalog::Transition;
use crate::states::JobMode;
use crate::Shared;
use rehost_proto::error::chain;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/v1/machines/{machine}/blueprint",
            get(show_blueprint).post(set_blueprint),
        )
        .route("/v1/machines/{machine}/launch", post(launch))
        .route("/v1/machines/{machine}/mark", post(mark))
        .route("/v1/machines/{machine}/test/revert", post(revert))
        .route("/v1/machines/{machine}/history", get(history))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
}

fn api(e: LaunchError) -> ApiError {
    let code = match &e {
        LaunchError::Refused(_) => StatusCode::CONFLICT,
        LaunchError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, chain(&e))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BlueprintView {
    pub machine_id: String,
    /// `machine` (set for this machine) or `default`.
    pub source: String,
    pub blueprint: Blueprint,
}

async fn show_blueprint(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
) -> Result<Json<BlueprintView>, ApiError> {
    authorize(&s, &h)?;
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let (bp, set) = blueprint_of(&s, machine.as_str()).map_err(api)?;
        Ok(Json(BlueprintView {
            machine_id: machine.to_string(),
            source: if set { "machine" } else { "default" }.into(),
            blueprint: bp,
        }))
    })
    .await
}

/// Body: the blueprint fields to change (a partial blueprint); the others keep their values.
async fn set_blueprint(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
    Json(changes): Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<Json<BlueprintView>, ApiError> {
    authorize(&s, &h)?;
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let (bp, _) = blueprint_of(&s, machine.as_str()).map_err(api)?;
        let mut v = serde_json::to_value(&bp).map_err(internal)?;
        if let Some(obj) = v.as_object_mut() {
            for (k, val) in changes {
                obj.insert(k, val);
            }
        }
        let bp: Blueprint = serde_json::from_value(v)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("blueprint: {e}")))?;
        bp.validate()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("blueprint: {e}")))?;
        let body = serde_json::to_string(&bp).map_err(internal)?;
        s.catalog
            .set_blueprint(machine.as_str(), &body)
            .map_err(internal)?;
        tracing::info!(%machine, blueprint = %bp.summary(), "blueprint set");
        Ok(Json(BlueprintView {
            machine_id: machine.to_string(),
            source: "machine".into(),
            blueprint: bp,
        }))
    })
    .await
}

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

async fn launch(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
    Json(req): Json<LaunchRequest>,
) -> Result<Json<JobRow>, ApiError> {
    authorize(&s, &h)?;
    let mode: JobMode = req.mode.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("mode `{}` is neither test nor cutover", req.mode),
        )
    })?;
    let action = req
        .source_action
        .as_deref()
        .map(str::parse::<super::SourceAction>)
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let final_point_timeout = match req.final_point_timeout_s {
        None => super::FINAL_POINT_BOUND,
        Some(t @ 1..=3600) => std::time::Duration::from_secs(t),
        Some(t) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("final point timeout {t} s is not within 1..=3600"),
            ))
        }
    };
    let machine = resolve(&s, m).await?;
    let opts = super::LaunchOptions {
        snapshot: req.snapshot,
        source_action: action,
        final_point_timeout,
    };
    super::start(s, machine, mode, opts)
        .await
        .map(Json)
        .map_err(api)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MarkRequest {
    pub state: String,
}

async fn mark(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
    Json(req): Json<MarkRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let prev = super::mark(&s, &machine, &req.state).map_err(api)?;
        tracing::info!(%machine, from = %prev, to = %req.state, "lifecycle marked");
        Ok(Json(serde_json::json!({
            "machine_id": machine.as_str(), "from": prev, "lifecycle": req.state
        })))
    })
    .await
}

async fn revert(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let done = super::revert_test(&s, machine.as_str()).map_err(api)?;
        tracing::info!(%machine, "test reverted");
        Ok(Json(serde_json::json!({
            "machine_id": machine.as_str(), "lifecycle": "ready-for-testing", "removed": done
        })))
    })
    .await
}

#[derive(Debug, Serialize, Deserialize)]
pub struct History {
    pub machine_id: String,
    pub transitions: Vec<Transition>,
}

async fn history(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(m): Path<String>,
) -> Result<Json<History>, ApiError> {
    authorize(&s, &h)?;
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let transitions = s
            .catalog
            .lifecycle_log(machine.as_str())
            .map_err(internal)?;
        Ok(Json(History {
            machine_id: machine.to_string(),
            transitions,
        }))
    })
    .await
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobsQuery {
    pub machine: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobRow>,
}

async fn jobs(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Result<Json<JobList>, ApiError> {
    authorize(&s, &h)?;
    let machine = match q.machine {
        Some(m) => Some(resolve(&s, m).await?),
        None => None,
    };
    blocking(move || {
        let jobs = s
            .catalog
            .jobs(machine.as_ref().map(|m| m.as_str()), false)
            .map_err(internal)?;
        Ok(Json(JobList { jobs }))
    })
    .await
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LogQuery {
    /// Only log lines after this sequence number (for `--follow`).
    #[serde(default)]
    pub after: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub job: JobRow,
    pub log: Vec<LogLine>,
}

async fn job(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Json<JobView>, ApiError> {
    authorize(&s, &h)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("`{id}` is not a job id")))?;
    blocking(move || {
        let job = s
            .catalog
            .job(id)
            .map_err(internal)?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
        let log = s.catalog.job_log(id, q.after).map_err(internal)?;
        Ok(Json(JobView { job, log }))
    })
    .await
}

/// Prometheus lines: launch jobs by mode and state.
pub fn metrics(s: &Shared) -> Result<String, ApiError> {
    let mut page = crate::metrics::Page::default();
    let jobs = page.gauges("rehost_launch_jobs", "Launch jobs by mode and state");
    for (mode, state, n) in s.catalog.job_counts().map_err(internal)? {
        crate::metrics::set(&jobs, vec![("mode", mode), ("state", state)], n);
    }
    Ok(page.text())
}
