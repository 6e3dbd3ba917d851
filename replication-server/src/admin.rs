//! The admin API: HTTP/JSON on loopback (default 127.0.0.1:1501). Every `/v1` route except
//! `/v1/health` needs `Authorization: Bearer <admin credential>` (the `admin.token` file in the
//! data dir). `/metrics` serves Prometheus text.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rehost_proto::msg::DiskState;
use rehost_proto::token::InstallToken;
use serde::{Deserialize, Serialize};

use crate::catalog::now;
use crate::Shared;

pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(crate) fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if blake3::hash(t.as_bytes()) == blake3::hash(s.admin_token.as_bytes()) => Ok(()),
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin credential".into(),
        )),
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
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

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({ "ok": true })) }),
        )
        .route("/v1/machines", get(machines))
        .route("/v1/machines/{id}/revoke", post(revoke_machine))
        .route("/v1/machines/{id}/throttle", post(throttle_machine))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/metrics", get(metrics))
        .merge(crate::auth::routes())
        .merge(crate::snapshot::api::routes())
        .merge(crate::launch::api::routes())
        .with_state(shared)
}

/// `machines --json`: stable, documented in the README.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachinesView {
    pub machines: Vec<MachineView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MachineView {
    pub machine_id: String,
    pub hostname: String,
    pub lifecycle: String,
    pub connected: bool,
    pub agent_address: Option<String>,
    pub agent_version: Option<String>,
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
    pub state: String,
    pub progress_percent: f64,
    pub replicated_bytes: u64,
    pub backlog_bytes: u64,
    /// Seconds a launch now would be behind the source; null until the initial sync is done.
    pub lag_seconds: Option<u64>,
    pub sync_complete: bool,
}

pub fn machines_view(s: &Shared) -> Result<MachinesView, ApiError> {
    let rows = s.catalog.machines().map_err(internal)?;
    let now = now();
    let mut machines = Vec::new();
    for (m, disks) in rows {
        let live = s.live.get(&m.id);
        let disks = disks
            .into_iter()
            .map(|d| {
                let ld = live.as_ref().and_then(|l| l.disks.get(&d.id));
                let pct = |done: u64| {
                    if d.size_bytes == 0 {
                        100.0
                    } else {
                        (done as f64 * 1000.0 / d.size_bytes as f64).floor() / 10.0
                    }
                };
                let (state, progress, backlog, lag) = match (live.as_ref(), ld) {
                    (None, _) => (
                        "disconnected",
                        pct(d.durable_bytes),
                        d.size_bytes - d.durable_bytes.min(d.size_bytes),
                        d.sync_complete
                            .then(|| (now - m.last_seen.unwrap_or(now)).max(0) as u64),
                    ),
                    (Some(_), None) => {
                        let state = if d.sync_complete {
                            "continuous"
                        } else {
                            "initial-sync"
                        };
                        (
                            state,
                            pct(d.durable_bytes),
                            d.size_bytes - d.durable_bytes.min(d.size_bytes),
                            None,
                        )
                    }
                    (Some(_), Some(ld)) => match ld.state {
                        DiskState::Rescan => ("rescan", pct(ld.done_bytes), ld.backlog_bytes, None),
                        DiskState::Continuous | DiskState::Lagging | DiskState::Stalled => {
                            let lag = ld.lag_ms / 1000 + (now - ld.reported_at).max(0) as u64;
                            let state = match ld.state {
                                DiskState::Lagging => "lagging",
                                DiskState::Stalled => "stalled",
                                _ => "continuous",
                            };
                            (state, 100.0, ld.backlog_bytes, Some(lag))
                        }
                        _ => (
                            "initial-sync",
                            pct(d.durable_bytes),
                            d.size_bytes - d.durable_bytes.min(d.size_bytes),
                            None,
                        ),
                    },
                };
                DiskView {
                    disk_id: d.id,
                    device: d.device,
                    size_bytes: d.size_bytes,
                    state: state.into(),
                    progress_percent: if d.sync_complete && state != "rescan" {
                        100.0
                    } else {
                        progress
                    },
                    replicated_bytes: if d.sync_complete {
                        d.size_bytes
                    } else {
                        d.durable_bytes
                    },
                    backlog_bytes: backlog,
                    lag_seconds: lag,
                    sync_complete: d.sync_complete,
                }
            })
            .collect();
        machines.push(MachineView {
            machine_id: m.id,
            hostname: m.hostname,
            lifecycle: m.lifecycle,
            connected: live.is_some(),
            agent_address: live.as_ref().map(|l| l.peer.clone()),
            agent_version: live.as_ref().map(|l| l.agent_version.clone()),
            registered_at: m.registered_at,
            last_seen: if live.is_some() {
                Some(now)
            } else {
                m.last_seen
            },
            revoked: m.revoked_at.is_some(),
            duplicate_of: m.duplicate_of,
            disks,
        });
    }
    Ok(MachinesView { machines })
}

async fn machines(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
) -> Result<Json<MachinesView>, ApiError> {
    authorize(&s, &h)?;
    blocking(move || machines_view(&s)).await.map(Json)
}

async fn revoke_machine(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let s2 = s.clone();
    let id2 = id.clone();
    if !blocking(move || s2.catalog.revoke_machine(&id2).map_err(internal)).await? {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no machine {id}")));
    }
    // A connected agent of a revoked machine is cut off now, not at its next reconnect.
    if let Ok(mid) = rehost_proto::MachineId::parse(&id) {
        s.slot(&mid).kick.kick(crate::auth::Kick::Revoked);
    }
    Ok(Json(serde_json::json!({ "revoked": id })))
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Throttle {
    /// Megabits per second; null or 0 removes the cap.
    pub max_mbps: Option<u64>,
}

/// Sets a machine's bandwidth cap; a connected agent applies it at once.
async fn throttle_machine(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(req): Json<Throttle>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let cap = req.max_mbps.filter(|m| *m > 0);
    let s2 = s.clone();
    let id = blocking(move || {
        let id = s2
            .catalog
            .resolve_machine(&name)
            .map_err(internal)?
            .map_err(|m| ApiError(StatusCode::NOT_FOUND, m))?;
        s2.catalog
            .set_max_mbps(id.as_str(), cap)
            .map_err(internal)?;
        Ok(id)
    })
    .await?;
    let applied = match s.slot(&id).agent() {
        Some(out) => out
            .send(rehost_proto::Message::Settings {
                max_mbps: cap.unwrap_or(0),
            })
            .await
            .is_ok(),
        None => false,
    };
    tracing::info!(machine = %id, max_mbps = ?cap, applied, "bandwidth cap set");
    Ok(Json(
        serde_json::json!({ "machine_id": id.as_str(), "max_mbps": cap, "applied_now": applied }),
    ))
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CreateToken {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub expires_at: Option<i64>,
}

async fn create_token(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Json(req): Json<CreateToken>,
) -> Result<Json<CreatedToken>, ApiError> {
    authorize(&s, &h)?;
    let token = InstallToken::generate(s.pki.pin);
    let expires_at = req
        .expires_in_seconds
        .map(|e| now().saturating_add(e.min(i64::MAX as u64 / 2) as i64));
    let (id, t) = (token.id_hex(), token.clone());
    let desc = req.description.chars().take(200).collect::<String>();
    blocking(move || {
        s.catalog
            .create_token(&id, &t.secret, &desc, expires_at)
            .map_err(internal)
    })
    .await?;
    Ok(Json(CreatedToken {
        id: token.id_hex(),
        token: token.encode(),
        expires_at,
    }))
}

async fn tokens(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let rows = blocking(move || s.catalog.tokens().map_err(internal)).await?;
    Ok(Json(serde_json::json!({ "tokens": rows })))
}

async fn revoke_token(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &h)?;
    let id2 = id.clone();
    if !blocking(move || s.catalog.revoke_token(&id2).map_err(internal)).await? {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no token {id}")));
    }
    Ok(Json(serde_json::json!({ "revoked": id })))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Result<String, ApiError> {
    let s2 = s.clone();
    let view = blocking(move || machines_view(&s2)).await?;
    let mut out = String::new();
    let connected = view.machines.iter().filter(|m| m.connected).count();
    let _ = writeln!(
        out,
        "# TYPE rehost_agents_connected gauge\nrehost_agents_connected {connected}"
    );
    for (name, kind) in [
        ("rehost_disk_size_bytes", "gauge"),
        ("rehost_disk_replicated_bytes", "gauge"),
        ("rehost_disk_backlog_bytes", "gauge"),
        ("rehost_disk_lag_seconds", "gauge"),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for m in &view.machines {
            for d in &m.disks {
                let v = match name {
                    "rehost_disk_size_bytes" => Some(d.size_bytes),
                    "rehost_disk_replicated_bytes" => Some(d.replicated_bytes),
                    "rehost_disk_backlog_bytes" => Some(d.backlog_bytes),
                    _ => d.lag_seconds,
                };
                if let Some(v) = v {
                    let _ = writeln!(
                        out,
                        "{name}{{machine=\"{}\",device=\"{}\",state=\"{}\"}} {v}",
                        m.machine_id,
                        d.device.replace('"', "'"),
                        d.state
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "# TYPE rehost_machine_lifecycle gauge");
    for m in &view.machines {
        let _ = writeln!(
            out,
            "rehost_machine_lifecycle{{machine=\"{}\",lifecycle=\"{}\"}} 1",
            m.machine_id, m.lifecycle
        );
    }
    let s2 = s.clone();
    out.push_str(&blocking(move || crate::snapshot::api::metrics(&s2)).await?);
    out.push_str(&blocking(move || crate::launch::api::metrics(&s)).await?);
    Ok(out)
}
