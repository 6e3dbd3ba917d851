//! Admin API routes for running recovery plans (used by `rehost-server plan drill|failover|
//! cleanup|status` and `jobs P<id>`): `POST /v1/plans/{plan}/drill`, `POST
//! /v1/plans/{plan}/failover`, `POST /v1/plans/{plan}/cleanup`, `GET /v1/plans/{plan}/status`
//! and `GET /v1/plan-runs/{id}?after=SEQ`. A run is checked whole before anything is launched
//! (see `plan::run`); it answers with the run as recorded, and runs in the background.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::model::{
    Cleaned, DrillRequest, FailoverRequest, LogQuery, MachineRun, MemberStatus, PlanRun,
    PlanStatus, RunView,
};
use super::{blocking, internal, ApiError};
use crate::plan::run::{self, RunError, RunRequest};
use crate::states::{JobMode, RunMode};
use crate::Shared;
use rehost_proto::error::chain;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/plans/{plan}/drill", post(drill))
        .route("/v1/plans/{plan}/failover", post(failover))
        .route("/v1/plans/{plan}/cleanup", post(cleanup))
        .route("/v1/plans/{plan}/status", get(status))
        .route("/v1/plan-runs/{id}", get(run_view))
}

fn api(e: RunError) -> ApiError {
    match e {
        RunError::Plan(p) => super::plans::api(p),
        RunError::Refused(m) => ApiError(StatusCode::CONFLICT, m),
        RunError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
    }
}

async fn drill(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<DrillRequest>,
) -> Result<Json<PlanRun>, ApiError> {
    let cleanup_after = match req.cleanup_after_s {
        None => None,
        Some(t) if (1..=run::MAX_CLEANUP_AFTER.as_secs()).contains(&t) => {
            Some(std::time::Duration::from_secs(t))
        }
        Some(t) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("cleanup after {t} s is not within 1 s..=7 days"),
            ))
        }
    };
    let req = RunRequest {
        mode: RunMode::Drill,
        point: req.point,
        cleanup_after,
    };
    run::start(s, name, req).await.map(Json).map_err(api)
}

async fn failover(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<FailoverRequest>,
) -> Result<Json<PlanRun>, ApiError> {
    let req = RunRequest {
        mode: if req.planned {
            RunMode::FailoverPlanned
        } else {
            RunMode::FailoverUnplanned
        },
        point: req.point,
        cleanup_after: None,
    };
    run::start(s, name, req).await.map(Json).map_err(api)
}

async fn cleanup(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Cleaned>, ApiError> {
    blocking(move || {
        run::cleanup(&s, &name, "plan cleanup")
            .map(Json)
            .map_err(api)
    })
    .await
}

async fn status(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<PlanStatus>, ApiError> {
    blocking(move || {
        let plan = s.catalog.plan(&name).map_err(super::plans::api)?;
        let runs = s.catalog.plan_runs(Some(&name)).map_err(internal)?;
        let last = |drill: bool| {
            runs.iter()
                .rev()
                .find(|r| (r.mode == RunMode::Drill) == drill)
                .cloned()
        };
        let (last_drill, last_failover) = (last(true), last(false));
        let part = |r: &Option<PlanRun>, machine: &str| -> Result<Option<MachineRun>, ApiError> {
            let Some(r) = r else { return Ok(None) };
            for id in &r.jobs {
                let Some(j) = s.catalog.job(*id).map_err(internal)? else {
                    continue;
                };
                if j.machine_id == machine {
                    let kept = j.active
                        || (j.mode == JobMode::Cutover
                            && j.state == crate::states::JobState::Succeeded);
                    return Ok(Some(MachineRun {
                        run: r.id,
                        job: j.id,
                        state: j.state,
                        snapshot_id: j.snapshot_id,
                        target: j.target_dir.filter(|_| kept),
                        error: j.error,
                    }));
                }
            }
            Ok(None)
        };
        let mut machines = Vec::new();
        for st in &plan.steps {
            for m in &st.machines {
                machines.push(MemberStatus {
                    machine_id: m.machine_id.clone(),
                    hostname: m.hostname.clone(),
                    step: st.step,
                    lifecycle: m.lifecycle,
                    drill: part(&last_drill, &m.machine_id)?,
                    failover: part(&last_failover, &m.machine_id)?,
                });
            }
        }
        Ok(Json(PlanStatus {
            plan: plan.name,
            last_drill,
            last_failover,
            machines,
        }))
    })
    .await
}

async fn run_view(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Json<RunView>, ApiError> {
    let n: i64 = id.strip_prefix('P').unwrap_or(&id).parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a plan run id (P<number>)"),
        )
    })?;
    blocking(move || {
        let run = s
            .catalog
            .plan_run(n)
            .map_err(|e| internal(chain(&e)))?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no plan run P{n}")))?;
        let log = s
            .catalog
            .run_log(n, q.after)
            .map_err(|e| internal(chain(&e)))?;
        Ok(Json(RunView { run, log }))
    })
    .await
}
