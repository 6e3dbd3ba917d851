//! The admin API: HTTP/JSON, plain on loopback (default 127.0.0.1:1501) and HTTPS on any other
//! address ([`crate::admin_tls`]). Every `/v1` route except `/v1/health` (which says only `ok`)
//! needs `Authorization: Bearer <admin credential>` (the `admin.token` file in the data dir).
//! `/metrics` serves Prometheus text to the admin credential or the read-only metrics token
//! (`metrics.token`), or to anyone when the server runs with `--metrics-public`; the metrics
//! token opens nothing else (403).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
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

pub(crate) fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
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

/// Whether `/metrics` answers without a credential (`serve --metrics-public`).
#[derive(Clone, Copy, Debug)]
struct MetricsAccess {
    public: bool,
}

/// The admin API's routes. `/v1/health` answers `{"ok": true}` and nothing else to anyone: it
/// tells a load balancer or a script that the server is up, without machine data.
pub fn router(shared: Arc<Shared>, metrics_public: bool) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({ "ok": true })) }),
        )
        .route("/v1/machines", get(machines))
        .route("/v1/machines/{id}/revoke", post(revoke_machine))
        .route("/v1/machines/{id}/throttle", post(throttle_machine))
        .route("/v1/machines/{id}/delete", post(delete_machine))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/metrics", get(metrics))
        .merge(crate::auth::routes())
        .merge(crate::snapshot::api::routes())
        .merge(crate::launch::api::routes())
        .layer(Extension(MetricsAccess {
            public: metrics_public,
        }))
        .with_state(shared)
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
    pub lifecycle: String,
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
    pub state: String,
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

/// Whether agent version `agent` is older than `server`, compared as semver (`1.2.3`, with an
/// optional `-pre-release`, which sorts before its release; `+build` is ignored). None when
/// either does not parse.
pub fn older_version(agent: &str, server: &str) -> Option<bool> {
    Some(parse_semver(agent)? < parse_semver(server)?)
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    // Numeric identifiers sort before alphanumeric ones (semver 11.4.3).
    Num(u64),
    Alpha(String),
}

/// (major, minor, patch, is-release, pre-release identifiers): ordered as semver orders them.
type Semver = (u64, u64, u64, bool, Vec<PreId>);

fn parse_semver(v: &str) -> Option<Semver> {
    let v = v.trim().trim_start_matches('v');
    let v = v.split_once('+').map_or(v, |(v, _)| v);
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let mut n = core.split('.').map(|p| {
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<u64>().ok())
            .flatten()
    });
    let (major, minor, patch) = (n.next()??, n.next()??, n.next()??);
    if n.next().is_some() {
        return None;
    }
    let pre = match pre {
        None => Vec::new(),
        Some(p) => p
            .split('.')
            .map(|id| match id.parse::<u64>() {
                _ if id.is_empty() => None,
                Ok(n) if id.bytes().all(|b| b.is_ascii_digit()) => Some(PreId::Num(n)),
                _ => Some(PreId::Alpha(id.to_string())),
            })
            .collect::<Option<Vec<_>>>()?,
    };
    Some((major, minor, patch, pre.is_empty(), pre))
}

pub fn machines_view(s: &Shared) -> Result<MachinesView, ApiError> {
    let rows = s.catalog.machines().map_err(internal)?;
    let now = now();
    let mut machines = Vec::new();
    for (m, disks) in rows {
        // A detached machine's agent is gone, even while the session it ended still unwinds (a
        // reinstall clears the mark before its session is live).
        let live = s.live.get(&m.id).filter(|_| m.detached_at.is_none());
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
                    backlog_lower_bound: ld.is_some_and(|ld| {
                        ld.backlog_lower_bound
                            && matches!(state, "continuous" | "lagging" | "stalled")
                    }),
                    lag_seconds: lag,
                    sync_complete: d.sync_complete,
                }
            })
            .collect();
        machines.push(MachineView {
            machine_id: m.id,
            hostname: m.hostname,
            lifecycle: m.lifecycle.to_string(),
            connected: live.is_some(),
            agent_address: live.as_ref().map(|l| l.peer.clone()),
            agent_version: live
                .as_ref()
                .map(|l| l.agent_version.clone())
                .or(m.agent_version),
            disconnected_reason: m.detached_reason.filter(|_| live.is_none()),
            detached_at: m.detached_at,
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
    Ok(MachinesView {
        machines,
        server_version: env!("CARGO_PKG_VERSION").into(),
    })
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
    pub gc: Option<crate::store::gc::GcStats>,
    /// Why that collection did not run or failed (the scheduler's next one frees the rest).
    pub gc_error: Option<String>,
}

/// Deletes a machine: its catalog rows, its staging volumes, its recovery points (then GC frees
/// the store objects only they used). Refused while its agent is connected (the session holds
/// the machine's slot, which the delete holds throughout, so no session starts meanwhile), while
/// a launch job of it runs, or while one of its points is being taken.
async fn delete_machine(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<MachineDeleted>, ApiError> {
    use std::os::unix::fs::MetadataExt;
    authorize(&s, &h)?;
    let id = resolve(&s, name).await?;
    let connected = || {
        conflict_of(format!(
            "the agent of machine {id} is connected: uninstall the agent or `rehost-server machine revoke {id}` it first"
        ))
    };
    let Ok(_slot) = s.slot(&id).lock.clone().try_lock_owned() else {
        return Err(connected());
    };
    if s.live.get(id.as_str()).is_some() {
        return Err(connected());
    }
    let (s2, id2) = (s.clone(), id.clone());
    let deleted = blocking(move || {
        let hostname = s2
            .catalog
            .machines()
            .map_err(internal)?
            .into_iter()
            .find(|(m, _)| m.id == id2.as_str())
            .map(|(m, _)| m.hostname)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no machine {id2}")))?;
        let points = s2.catalog.snapshots(id2.as_str()).map_err(internal)?.len();
        let disks = s2
            .catalog
            .delete_machine(id2.as_str())
            .map_err(internal)?
            .map_err(conflict_of)?;
        // The rows are gone: the volumes are nobody's now. (A crash here leaves files that a
        // second delete cannot reach: their dir is named by the machine id, so it says which.)
        let dir = s2.volume_dir(&id2);
        let mut volume_bytes = 0;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                volume_bytes += e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(internal(format!(
                    "machine {id2} was removed from the catalog, but its volumes in {} were not: {e}",
                    dir.display()
                )))
            }
        }
        tracing::info!(machine = %id2, %hostname, disks = disks.len(), recovery_points = points, volume_bytes, "machine deleted");
        Ok(MachineDeleted {
            machine_id: id2.to_string(),
            hostname,
            disks: disks.len(),
            recovery_points: points,
            volume_bytes,
            gc: None,
            gc_error: None,
        })
    })
    .await?;
    let s2 = s.clone();
    let gc = blocking(move || Ok(crate::store::gc::collect(&s2.store, &s2.catalog))).await?;
    let mut deleted = deleted;
    match gc {
        Ok(st) => deleted.gc = Some(st),
        Err(e) => {
            let e = rehost_proto::error::chain(&e);
            tracing::warn!(error = %e, "garbage collection after a machine delete");
            deleted.gc_error = Some(e);
        }
    }
    Ok(Json(deleted))
}

fn conflict_of(m: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, m)
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

async fn metrics(
    State(s): State<Arc<Shared>>,
    Extension(access): Extension<MetricsAccess>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    if !access.public {
        let s2 = s.clone();
        let who = blocking(move || Ok(caller(&s2, &h))).await?;
        if who == Caller::Unknown {
            let mut r = ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong credential: /metrics needs the metrics token (`rehost-server \
                 metrics-token`) or the admin credential as `Authorization: Bearer`"
                    .into(),
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return Ok(r);
        }
    }
    let s2 = s.clone();
    let view = blocking(move || machines_view(&s2)).await?;
    let s2 = s.clone();
    let text = [
        replication_metrics(&view),
        blocking(move || crate::snapshot::api::metrics(&s2)).await?,
        blocking(move || crate::launch::api::metrics(&s)).await?,
    ]
    .concat();
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Connected agents, per-disk replication gauges and machine lifecycles.
fn replication_metrics(view: &MachinesView) -> String {
    use crate::metrics::set;
    let mut page = crate::metrics::Page::default();
    let connected = page.gauges("rehost_agents_connected", "Agents connected now");
    let size = page.gauges("rehost_disk_size_bytes", "Size of a source disk");
    let replicated = page.gauges(
        "rehost_disk_replicated_bytes",
        "Bytes of a source disk durable in its staging volume",
    );
    let backlog = page.gauges(
        "rehost_disk_backlog_bytes",
        "Bytes of a source disk still to replicate",
    );
    let lag = page.gauges(
        "rehost_disk_lag_seconds",
        "Seconds a launch now would be behind the source",
    );
    let lifecycle = page.gauges(
        "rehost_machine_lifecycle",
        "A machine's lifecycle state (1 for the current one)",
    );
    let n = view.machines.iter().filter(|m| m.connected).count();
    set(&connected, Vec::new(), n as u64);
    for m in &view.machines {
        for d in &m.disks {
            let labels = || {
                vec![
                    ("machine", m.machine_id.clone()),
                    ("device", d.device.clone()),
                    ("state", d.state.clone()),
                ]
            };
            set(&size, labels(), d.size_bytes);
            set(&replicated, labels(), d.replicated_bytes);
            set(&backlog, labels(), d.backlog_bytes);
            if let Some(l) = d.lag_seconds {
                set(&lag, labels(), l);
            }
        }
        set(
            &lifecycle,
            vec![
                ("machine", m.machine_id.clone()),
                ("lifecycle", m.lifecycle.clone()),
            ],
            1,
        );
    }
    page.text()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A label value in a sample line, unescaped as Prometheus reads it.
    fn label(line: &str, key: &str) -> String {
        let start = line.find(&format!("{key}=\"")).unwrap() + key.len() + 2;
        let (mut out, mut chars) = (String::new(), line[start..].chars());
        loop {
            match chars.next().unwrap() {
                '"' => return out,
                '\\' => match chars.next().unwrap() {
                    'n' => out.push('\n'),
                    c => out.push(c),
                },
                c => out.push(c),
            }
        }
    }

    #[test]
    fn agent_versions_compare_as_semver() {
        assert_eq!(older_version("0.0.1", "0.1.0"), Some(true));
        assert_eq!(older_version("0.1.0", "0.1.0"), Some(false));
        assert_eq!(older_version("0.2.0", "0.1.9"), Some(false));
        // Numerically, not as text.
        assert_eq!(older_version("0.9.0", "0.10.0"), Some(true));
        assert_eq!(older_version("1.0.0-rc.1", "1.0.0"), Some(true));
        assert_eq!(older_version("1.0.0-rc.2", "1.0.0-rc.10"), Some(true));
        assert_eq!(older_version("1.0.0-alpha", "1.0.0-1"), Some(false));
        assert_eq!(older_version("1.0.0+build.5", "1.0.0"), Some(false));
        assert_eq!(older_version("unknown", "1.0.0"), None);
        assert_eq!(older_version("1.0", "1.0.0"), None);
    }

    #[test]
    fn device_labels_round_trip_through_the_page() {
        let device = "/dev/evil\\\"\nsecond line\\".to_string();
        let view = MachinesView {
            machines: vec![MachineView {
                machine_id: "m-1".into(),
                hostname: "h".into(),
                lifecycle: "replicating".into(),
                connected: true,
                agent_address: None,
                agent_version: None,
                disconnected_reason: None,
                detached_at: None,
                registered_at: 0,
                last_seen: None,
                revoked: false,
                duplicate_of: None,
                disks: vec![DiskView {
                    disk_id: 1,
                    device: device.clone(),
                    size_bytes: 4096,
                    state: "continuous".into(),
                    progress_percent: 100.0,
                    replicated_bytes: 4096,
                    backlog_bytes: 0,
                    backlog_lower_bound: false,
                    lag_seconds: Some(3),
                    sync_complete: true,
                }],
            }],
            server_version: String::new(),
        };
        let text = replication_metrics(&view);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        // agents, 4 disk gauges, lifecycle: the newline split no line.
        assert_eq!(samples.len(), 6, "{text}");
        for l in samples.iter().filter(|l| l.starts_with("rehost_disk_")) {
            assert_eq!(label(l, "device"), device, "{l}");
        }
        assert!(text.contains("rehost_agents_connected 1\n"), "{text}");
        assert!(
            text.contains("rehost_disk_lag_seconds{machine=\"m-1\""),
            "{text}"
        );
        assert!(
            text.contains("rehost_machine_lifecycle{machine=\"m-1\",lifecycle=\"replicating\"} 1"),
            "{text}"
        );
    }
}
