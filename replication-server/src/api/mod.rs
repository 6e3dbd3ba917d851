//! The admin API: HTTP/JSON, plain on loopback (default 127.0.0.1:1501) and HTTPS on any other
//! address ([`tls`]). Every `/v1` route except `/v1/health` (which says only `ok`)
//! needs `Authorization: Bearer <admin credential>` (the `admin.token` file in the data dir).
//! `/metrics` serves Prometheus text to the admin credential or the read-only metrics token
//! (`metrics.token`), or to anyone when the server runs with `--metrics-public`; the metrics
//! token opens nothing else (403).
//!
//! The admin credential is checked once, by a layer over every `/v1` route but health
//! ([`require_admin`]), before a handler or its extractors run. Handlers parse the request and
//! call the domain; their requests and replies are the types of [`model`], which the operator
//! commands ([`crate::cli`]) read back.
//!
//! - [`machines`]: machines, their revocation, bandwidth cap and deletion;
//! - [`tokens`]: install and reinstall tokens, unrevoke;
//! - [`snapshots`]: recovery points, retention, GC;
//! - [`launches`]: blueprints, launches, jobs, lifecycle marks, test reverts, history;
//! - [`plans`]: recovery plans' definitions (machines by step, networks, hooks);
//! - [`metrics`]: the Prometheus page;
//! - [`tls`]: where the API listens: plain HTTP on loopback, HTTPS elsewhere.

pub mod launches;
pub mod machines;
mod metrics;
pub mod model;
pub mod plan_runs;
pub mod plans;
pub mod snapshots;
pub mod tls;
pub mod tokens;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};

use crate::Shared;

pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(model::ErrorReply { error: self.1 })).into_response()
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Who sent a request, by its bearer credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    Admin,
    /// The read-only metrics token: `/metrics` only.
    Metrics,
    /// No credential, or one that is neither.
    Unknown,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Compares hashes, so the time taken says nothing about how much of a guess was right.
fn same(given: &str, secret: &str) -> bool {
    blake3::hash(given.as_bytes()) == blake3::hash(secret.as_bytes())
}

pub(crate) fn caller(s: &Shared, headers: &HeaderMap) -> Caller {
    let Some(t) = bearer(headers) else {
        return Caller::Unknown;
    };
    if same(t, &s.admin_token) {
        return Caller::Admin;
    }
    // Read at each use: `rehost-server metrics-token --rotate` takes effect at once.
    match crate::pki::current_metrics_token(&s.data_dir) {
        Some(m) if same(t, &m) => Caller::Metrics,
        _ => Caller::Unknown,
    }
}

fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    match caller(s, headers) {
        Caller::Admin => Ok(()),
        Caller::Metrics => Err(ApiError(
            StatusCode::FORBIDDEN,
            "the metrics token only reads /metrics; this needs the admin credential".into(),
        )),
        Caller::Unknown => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin credential".into(),
        )),
    }
}

/// The layer over every route that needs the admin credential: 401 without it, 403 for the
/// metrics token; the handler runs only with it.
async fn require_admin(
    State(s): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    authorize(&s, req.headers())?;
    Ok(next.run(req).await)
}

/// [`crate::task::blocking`] with the API's error, so that handlers' closures need no annotation.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::task::blocking(f).await
}

/// A blocking task that panicked is a 500 with tokio's reason.
impl From<crate::task::TaskFailed> for ApiError {
    fn from(e: crate::task::TaskFailed) -> Self {
        internal(e)
    }
}

/// A machine named by id or hostname; 404 when there is none (or the hostname is ambiguous).
pub(crate) async fn resolve(
    s: &Arc<Shared>,
    name: String,
) -> Result<rehost_proto::MachineId, ApiError> {
    let s = s.clone();
    blocking(move || {
        s.catalog
            .resolve_machine(&name)
            .map_err(internal)?
            .map_err(|m| ApiError(StatusCode::NOT_FOUND, m))
    })
    .await
}

/// Whether `/metrics` answers without a credential (`serve --metrics-public`).
#[derive(Clone, Copy, Debug)]
struct MetricsAccess {
    public: bool,
}

pub(crate) fn conflict_of(m: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, m)
}

/// The admin API's routes. `/v1/health` answers `{"ok": true}` and nothing else to anyone: it
/// tells a load balancer or a script that the server is up, without machine data. `/metrics`
/// checks its own credentials; every other route needs the admin credential.
pub fn router(shared: Arc<Shared>, metrics_public: bool) -> Router {
    let admin = Router::new()
        .merge(machines::routes())
        .merge(tokens::routes())
        .merge(snapshots::routes())
        .merge(launches::routes())
        .merge(plans::routes())
        .merge(plan_runs::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_admin,
        ));
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(model::Health { ok: true }) }),
        )
        .route("/metrics", get(metrics::page))
        .merge(admin)
        .layer(Extension(MetricsAccess {
            public: metrics_public,
        }))
        .with_state(shared)
}
