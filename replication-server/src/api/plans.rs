//! Admin API routes for recovery plans' definitions (used by the `rehost-server plan` commands):
//! `GET|POST /v1/plans`, `GET|DELETE /v1/plans/{plan}`, `PUT|DELETE
//! /v1/plans/{plan}/machines/{machine}` (a machine by id or hostname), `PUT
//! /v1/plans/{plan}/network` and `PUT|DELETE /v1/plans/{plan}/hooks/{step}/{pre|post}`. Every
//! change is checked whole before anything is written; the changes answer with the plan as it is
//! then.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};

use super::model::{
    CreatePlan, GroupPoint, GroupPointList, MemberRemoved, Plan, PlanDeleted, PlanList, SetHook,
    SetMember, SetNetworks, SetSchedule,
};
use super::{blocking, ApiError};
use crate::plan::{self, Hook, PlanError};
use crate::states::{HookKind, StepWait};
use crate::Shared;
use rehost_proto::error::chain;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/plans", get(list).post(create))
        .route("/v1/plans/{plan}", get(show).delete(delete))
        .route(
            "/v1/plans/{plan}/machines/{machine}",
            put(set_member).delete(remove_member),
        )
        .route("/v1/plans/{plan}/network", put(set_networks))
        .route("/v1/plans/{plan}/schedule", put(set_schedule))
        .route(
            "/v1/plans/{plan}/hooks/{step}/{kind}",
            put(set_hook).delete(remove_hook),
        )
        .route("/v1/plans/{plan}/points", get(points).post(take_point))
}

/// `POST /v1/plans/{plan}/points`: one group point of every machine of the plan (see
/// `snapshot::group`); answers once it is recorded.
async fn take_point(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<GroupPoint>, ApiError> {
    let (s2, n) = (s.clone(), name.clone());
    let plan = blocking(move || s2.catalog.plan(&n).map_err(api)).await?;
    let mut machines = Vec::new();
    for m in plan.steps.iter().flat_map(|st| &st.machines) {
        machines.push(
            rehost_proto::MachineId::parse(&m.machine_id)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        );
    }
    let reason = format!("plan {name}");
    crate::snapshot::group::take(s, name, machines, reason)
        .await
        .map(Json)
        .map_err(super::snapshots::api)
}

/// `GET /v1/plans/{plan}/points`: the plan's group points, oldest first.
async fn points(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<GroupPointList>, ApiError> {
    blocking(move || {
        s.catalog.plan(&name).map_err(api)?;
        let points = s
            .catalog
            .group_points(&name)
            .map_err(|e| super::internal(chain(&e)))?;
        Ok(Json(GroupPointList { plan: name, points }))
    })
    .await
}

pub(super) fn api(e: PlanError) -> ApiError {
    let code = match &e {
        PlanError::NoPlan(_)
        | PlanError::NoMachine(_)
        | PlanError::NotMember { .. }
        | PlanError::NoHook { .. } => StatusCode::NOT_FOUND,
        PlanError::Exists(_) | PlanError::AlreadyIn { .. } | PlanError::Full(_) => {
            StatusCode::CONFLICT
        }
        PlanError::Invalid(_) => StatusCode::BAD_REQUEST,
        PlanError::Catalog(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, chain(&e))
}

/// A machine named by id or hostname, as the catalog resolves it (404 when there is none).
fn machine(s: &Shared, name: &str) -> Result<String, ApiError> {
    s.catalog
        .resolve_machine(name)
        .map_err(|e| api(e.into()))?
        .map(|id| id.to_string())
        .map_err(|m| ApiError(StatusCode::NOT_FOUND, m))
}

/// The step and hook kind of a hook's path.
fn hook_at(step: &str, kind: &str) -> Result<(u32, HookKind), ApiError> {
    let step = plan::parse_step(step).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let kind = kind.parse().map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no hook `{kind}` (pre or post)"),
        )
    })?;
    Ok((step, kind))
}

async fn list(State(s): State<Arc<Shared>>) -> Result<Json<PlanList>, ApiError> {
    blocking(move || {
        let plans = s.catalog.plans().map_err(api)?;
        Ok(Json(PlanList { plans }))
    })
    .await
}

async fn create(
    State(s): State<Arc<Shared>>,
    Json(req): Json<CreatePlan>,
) -> Result<Json<Plan>, ApiError> {
    plan::check_name(&req.name).map_err(api)?;
    plan::check_description(&req.description).map_err(api)?;
    blocking(move || {
        s.catalog
            .create_plan(&req.name, &req.description)
            .map_err(api)?;
        tracing::info!(plan = %req.name, "recovery plan created");
        s.catalog.plan(&req.name).map(Json).map_err(api)
    })
    .await
}

async fn show(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Plan>, ApiError> {
    blocking(move || s.catalog.plan(&name).map(Json).map_err(api)).await
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<PlanDeleted>, ApiError> {
    blocking(move || {
        let (machines, hooks) = s.catalog.delete_plan(&name).map_err(api)?;
        tracing::info!(plan = %name, machines, hooks, "recovery plan deleted");
        Ok(Json(PlanDeleted {
            name,
            machines,
            hooks,
        }))
    })
    .await
}

async fn set_member(
    State(s): State<Arc<Shared>>,
    Path((name, m)): Path<(String, String)>,
    Json(req): Json<SetMember>,
) -> Result<Json<Plan>, ApiError> {
    plan::check_step(req.step).map_err(api)?;
    let wait = req.wait.unwrap_or(StepWait::Boot);
    let delay_s = req.delay_s.unwrap_or(0);
    plan::check_delay(delay_s).map_err(api)?;
    if let Some(a) = &req.source_action {
        a.parse::<crate::launch::SourceAction>()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("--source-action: {e}")))?;
    }
    blocking(move || {
        // An unknown plan is named before an unknown machine.
        s.catalog.plan(&name).map_err(api)?;
        let id = machine(&s, &m)?;
        let new = s
            .catalog
            .set_plan_member(
                &name,
                &id,
                req.step,
                plan::MemberSettings {
                    wait,
                    delay_s,
                    source_action: req.source_action.as_deref(),
                    continue_on_error: req.continue_on_error,
                },
            )
            .map_err(api)?;
        tracing::info!(plan = %name, machine = %id, step = req.step, %wait, delay_s, new, "recovery plan machine set");
        s.catalog.plan(&name).map(Json).map_err(api)
    })
    .await
}

async fn remove_member(
    State(s): State<Arc<Shared>>,
    Path((name, m)): Path<(String, String)>,
) -> Result<Json<MemberRemoved>, ApiError> {
    blocking(move || {
        s.catalog.plan(&name).map_err(api)?;
        let id = machine(&s, &m)?;
        let step = s.catalog.remove_plan_member(&name, &id).map_err(api)?;
        tracing::info!(plan = %name, machine = %id, step, "recovery plan machine removed");
        Ok(Json(MemberRemoved {
            plan: name,
            machine_id: id,
            step,
        }))
    })
    .await
}

async fn set_networks(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<SetNetworks>,
) -> Result<Json<Plan>, ApiError> {
    let parse = |which, v: Option<String>| {
        v.map(|v| plan::parse_network(which, &v))
            .transpose()
            .map_err(api)
    };
    let production = parse("production", req.production)?;
    let test = parse("test", req.test)?;
    if production.is_none() && test.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "nothing to change: give the production network, the test network or both".into(),
        ));
    }
    blocking(move || {
        s.catalog
            .set_plan_networks(&name, production.as_ref(), test.as_ref())
            .map_err(api)?;
        let p = s.catalog.plan(&name).map_err(api)?;
        tracing::info!(plan = %name, production = %p.networks.production, test = %p.networks.test, "recovery plan networks set");
        Ok(Json(p))
    })
    .await
}

async fn set_schedule(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<SetSchedule>,
) -> Result<Json<Plan>, ApiError> {
    let policy = req
        .policy
        .map(|p| {
            p.parse::<crate::retention::Policy>()
                .map(|p| p.to_string())
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("policy: {e}")))
        })
        .transpose()?;
    blocking(move || {
        s.catalog
            .set_plan_policy(&name, policy.as_deref())
            .map_err(api)?;
        tracing::info!(plan = %name, policy = policy.as_deref().unwrap_or("(cleared)"), "recovery plan schedule set");
        s.catalog.plan(&name).map(Json).map_err(api)
    })
    .await
}

async fn set_hook(
    State(s): State<Arc<Shared>>,
    Path((name, step, kind)): Path<(String, String, String)>,
    Json(req): Json<SetHook>,
) -> Result<Json<Plan>, ApiError> {
    let (step, kind) = hook_at(&step, &kind)?;
    let hook = Hook {
        path: req.path,
        timeout_s: req.timeout_s.unwrap_or(plan::DEFAULT_HOOK_TIMEOUT_S),
        continue_on_error: req.continue_on_error,
    };
    blocking(move || {
        s.catalog.plan(&name).map_err(api)?;
        plan::check_hook(&hook).map_err(api)?;
        s.catalog
            .set_plan_hook(&name, step, kind, &hook)
            .map_err(api)?;
        tracing::info!(plan = %name, step, %kind, path = %hook.path, timeout_s = hook.timeout_s, continue_on_error = hook.continue_on_error, "recovery plan hook set");
        s.catalog.plan(&name).map(Json).map_err(api)
    })
    .await
}

async fn remove_hook(
    State(s): State<Arc<Shared>>,
    Path((name, step, kind)): Path<(String, String, String)>,
) -> Result<Json<Plan>, ApiError> {
    let (step, kind) = hook_at(&step, &kind)?;
    blocking(move || {
        s.catalog.remove_plan_hook(&name, step, kind).map_err(api)?;
        tracing::info!(plan = %name, step, %kind, "recovery plan hook removed");
        s.catalog.plan(&name).map(Json).map_err(api)
    })
    .await
}
