//! Admin API routes for blueprints, launches, jobs, lifecycle marks and test reverts (used by the
//! `rehost-server blueprint`, `launch`, `jobs`, `mark`, `test revert` and `machine history`
//! commands). A machine may be named by id or hostname.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::model::{
    BlueprintChanges, BlueprintView, History, JobList, JobView, JobsQuery, LaunchRequest, LogQuery,
    MarkRequest, Marked, Reverted,
};
use super::{blocking, internal, resolve, ApiError};
use crate::launch::blueprint::Blueprint;
use crate::launch::rows::JobRow;
use crate::launch::{blueprint_of, LaunchError};
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

async fn show_blueprint(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
) -> Result<Json<BlueprintView>, ApiError> {
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
    Path(m): Path<String>,
    Json(changes): Json<BlueprintChanges>,
) -> Result<Json<BlueprintView>, ApiError> {
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

async fn launch(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
    Json(req): Json<LaunchRequest>,
) -> Result<Json<JobRow>, ApiError> {
    let mode: JobMode = req.mode.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("mode `{}` is neither test nor cutover", req.mode),
        )
    })?;
    let action = req
        .source_action
        .as_deref()
        .map(str::parse::<crate::launch::SourceAction>)
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let final_point_timeout = match req.final_point_timeout_s {
        None => crate::launch::FINAL_POINT_BOUND,
        Some(t @ 1..=3600) => std::time::Duration::from_secs(t),
        Some(t) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("final point timeout {t} s is not within 1..=3600"),
            ))
        }
    };
    let machine = resolve(&s, m).await?;
    let opts = crate::launch::LaunchOptions {
        snapshot: req.snapshot,
        source_action: action,
        final_point_timeout,
        ..Default::default()
    };
    crate::launch::start(s, machine, mode, opts)
        .await
        .map(Json)
        .map_err(api)
}

async fn mark(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
    Json(req): Json<MarkRequest>,
) -> Result<Json<Marked>, ApiError> {
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let prev = crate::launch::mark(&s, &machine, &req.state).map_err(api)?;
        tracing::info!(%machine, from = %prev, to = %req.state, "lifecycle marked");
        Ok(Json(Marked {
            machine_id: machine.to_string(),
            from: prev,
            lifecycle: req.state,
        }))
    })
    .await
}

async fn revert(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
) -> Result<Json<Reverted>, ApiError> {
    let machine = resolve(&s, m).await?;
    blocking(move || {
        let done = crate::launch::revert_test(&s, machine.as_str()).map_err(api)?;
        tracing::info!(%machine, "test reverted");
        Ok(Json(Reverted {
            machine_id: machine.to_string(),
            lifecycle: "ready-for-testing".into(),
            removed: done,
        }))
    })
    .await
}

async fn history(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
) -> Result<Json<History>, ApiError> {
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

async fn jobs(
    State(s): State<Arc<Shared>>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<JobList>, ApiError> {
    let machine = match q.machine {
        Some(m) => Some(resolve(&s, m).await?),
        None => None,
    };
    blocking(move || {
        let jobs = s
            .catalog
            .jobs(machine.as_ref().map(|m| m.as_str()), false)
            .map_err(internal)?;
        let plan_runs = match machine {
            Some(_) => Vec::new(),
            None => s.catalog.plan_runs(None).map_err(internal)?,
        };
        Ok(Json(JobList { jobs, plan_runs }))
    })
    .await
}

async fn job(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Json<JobView>, ApiError> {
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
