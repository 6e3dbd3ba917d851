//! Admin API routes for recovery points, retention and GC (used by the `rehost-server snapshot`,
//! `snapshots`, `retention` and `gc` commands). A machine may be named by id or hostname.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::model::{
    CreateSnapshot, RetentionQuery, RetentionView, SetRetention, SnapshotCreated, SnapshotDeleted,
    SnapshotList, SnapshotRequested,
};
use super::{blocking, internal, resolve, ApiError};
use crate::retention::{policy_for, Policy};
use crate::snapshot::select::select;
use crate::snapshot::{Consistency, SnapshotError};
use crate::Shared;
use rehost_proto::error::chain;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/machines/{machine}/snapshots", get(list).post(create))
        .route("/v1/machines/{machine}/snapshots/{id}/delete", post(delete))
        .route("/v1/gc", post(gc))
        .route("/v1/retention", get(retention).post(set_retention))
}

pub(super) fn api(e: SnapshotError) -> ApiError {
    let code = match &e {
        SnapshotError::NotReady(_) => StatusCode::CONFLICT,
        SnapshotError::NotFound(_) => StatusCode::NOT_FOUND,
        SnapshotError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, chain(&e))
}

async fn list(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
) -> Result<Json<SnapshotList>, ApiError> {
    let machine = resolve(&s, m).await?;
    let id = machine.to_string();
    let snapshots =
        blocking(move || s.catalog.snapshots(machine.as_str()).map_err(internal)).await?;
    Ok(Json(SnapshotList {
        machine_id: id,
        snapshots,
    }))
}

async fn create(
    State(s): State<Arc<Shared>>,
    Path(m): Path<String>,
    Json(req): Json<CreateSnapshot>,
) -> Result<Json<SnapshotCreated>, ApiError> {
    let machine = resolve(&s, m).await?;
    let ask_agent = !req.stream_point;
    let (s2, m2) = (s.clone(), machine.clone());
    let task = tokio::spawn(async move {
        let r = crate::snapshot::request(
            s2,
            m2.clone(),
            Consistency::Crash,
            "manual".into(),
            ask_agent,
        )
        .await;
        if let Err(e) = &r {
            // Whoever asked may not be waiting for the answer.
            tracing::warn!(machine = %m2, error = %chain(e), "requested recovery point failed");
        }
        r
    });
    if !req.wait {
        return Ok(Json(SnapshotCreated::Requested(SnapshotRequested {
            requested: true,
            machine_id: machine.to_string(),
        })));
    }
    let info = task.await.map_err(internal)?.map_err(api)?;
    Ok(Json(SnapshotCreated::Complete(info)))
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path((m, id)): Path<(String, String)>,
) -> Result<Json<SnapshotDeleted>, ApiError> {
    let machine = resolve(&s, m).await?;
    let s2 = s.clone();
    let deleted = blocking(move || {
        let snaps = s2.catalog.snapshots(machine.as_str()).map_err(internal)?;
        let snap = select(&snaps, &id).map_err(|m| ApiError(StatusCode::NOT_FOUND, m))?;
        if !s2.catalog.mark_deleting(snap.id).map_err(internal)? {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("snapshot {} is {}, not complete", snap.id, snap.state),
            ));
        }
        s2.catalog.remove_snapshot(snap.id).map_err(internal)?;
        tracing::info!(%machine, snapshot = snap.id, "recovery point deleted");
        Ok(snap.id)
    })
    .await?;
    // Reclaim its space now; a busy or failed GC is retried by the scheduler.
    tokio::task::spawn_blocking(move || {
        if let Err(e) = crate::store::gc::collect(&s.store, &s.catalog) {
            tracing::warn!(error = %chain(&e), "garbage collection after delete");
        }
    });
    Ok(Json(SnapshotDeleted { deleted }))
}

async fn gc(State(s): State<Arc<Shared>>) -> Result<Json<crate::store::gc::GcStats>, ApiError> {
    let stats = blocking(move || {
        crate::store::gc::collect(&s.store, &s.catalog).map_err(|e| {
            let code = match e {
                crate::store::gc::GcError::Store(crate::store::StoreError::Busy) => {
                    StatusCode::CONFLICT
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError(code, chain(&e))
        })
    })
    .await?;
    Ok(Json(stats))
}

async fn retention(
    State(s): State<Arc<Shared>>,
    Query(q): Query<RetentionQuery>,
) -> Result<Json<RetentionView>, ApiError> {
    let machine = match q.machine {
        Some(m) => Some(resolve(&s, m).await?),
        None => None,
    };
    let view = blocking(move || {
        let key = machine.as_ref().map(|m| m.to_string()).unwrap_or_default();
        let own = s.catalog.retention(&key).map_err(internal)?;
        let server = s.catalog.retention("").map_err(internal)?;
        let source = if own.is_some() && !key.is_empty() {
            "machine"
        } else if server.is_some() {
            "server"
        } else {
            "default"
        };
        let policy = policy_for(&s, &key).map_err(api)?;
        Ok(RetentionView {
            machine_id: machine.map(|m| m.to_string()),
            policy: policy.to_string(),
            source: source.into(),
        })
    })
    .await?;
    Ok(Json(view))
}

async fn set_retention(
    State(s): State<Arc<Shared>>,
    Json(req): Json<SetRetention>,
) -> Result<Json<RetentionView>, ApiError> {
    let policy = match &req.policy {
        Some(p) => Some(
            p.parse::<Policy>()
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?
                .to_string(),
        ),
        None => None,
    };
    let machine = match req.machine.clone() {
        Some(m) => Some(resolve(&s, m).await?),
        None => None,
    };
    let key = machine.as_ref().map(|m| m.to_string()).unwrap_or_default();
    let s2 = s.clone();
    let k2 = key.clone();
    blocking(move || {
        s2.catalog
            .set_retention(&k2, policy.as_deref())
            .map_err(internal)
    })
    .await?;
    retention(
        State(s),
        Query(RetentionQuery {
            machine: machine.map(|m| m.to_string()),
        }),
    )
    .await
}

/// Prometheus lines: complete recovery points per machine and the age of the newest; the last
/// scrub and the quarantine.
pub fn metrics(s: &Shared) -> Result<String, ApiError> {
    use std::collections::BTreeMap;
    let mut per: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for p in s
        .catalog
        .snapshots_in(&[crate::states::SnapshotState::Complete])
        .map_err(internal)?
    {
        let e = per.entry(p.machine_id).or_default();
        e.0 += 1;
        e.1 = e.1.max(p.completed_at.unwrap_or(p.created_at));
    }
    let now = crate::catalog::now();
    let mut page = crate::metrics::Page::default();
    let points = page.gauges(
        "rehost_recovery_points",
        "Complete recovery points of a machine",
    );
    let age = page.gauges(
        "rehost_recovery_point_age_seconds",
        "Seconds since a machine's newest complete recovery point",
    );
    for (m, (n, t)) in &per {
        crate::metrics::set(&points, vec![("machine", m.clone())], *n);
        crate::metrics::set(&age, vec![("machine", m.clone())], (now - t).max(0) as u64);
    }
    crate::snapshot::scrub::metrics(&s.store, &mut page);
    Ok(page.text())
}
