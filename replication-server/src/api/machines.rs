//! Machines: `GET /v1/machines` (the view `machines` prints), and `POST
//! /v1/machines/{id}/revoke`, `.../throttle`, `.../delete`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rehost_proto::state::ReplicationState as R;

use super::model::{
    DiskView, MachineDeleted, MachineView, MachinesView, Revoked, Throttle, Throttled,
};
use super::{blocking, conflict_of, internal, resolve, ApiError};
use crate::catalog::now;
use crate::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/machines", get(machines))
        .route("/v1/machines/{id}/revoke", post(revoke_machine))
        .route("/v1/machines/{id}/throttle", post(throttle_machine))
        .route("/v1/machines/{id}/delete", post(delete_machine))
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
                        R::Disconnected,
                        pct(d.durable_bytes),
                        d.size_bytes - d.durable_bytes.min(d.size_bytes),
                        d.sync_complete
                            .then(|| (now - m.last_seen.unwrap_or(now)).max(0) as u64),
                    ),
                    (Some(_), None) => {
                        let state = if d.sync_complete {
                            R::Continuous
                        } else {
                            R::InitialSync
                        };
                        (
                            state,
                            pct(d.durable_bytes),
                            d.size_bytes - d.durable_bytes.min(d.size_bytes),
                            None,
                        )
                    }
                    (Some(_), Some(ld)) => match R::try_from(ld.state) {
                        Ok(R::Rescan) => (R::Rescan, pct(ld.done_bytes), ld.backlog_bytes, None),
                        Ok(state @ (R::Continuous | R::Lagging | R::Stalled)) => {
                            let lag = ld.lag_ms / 1000 + (now - ld.reported_at).max(0) as u64;
                            (state, 100.0, ld.backlog_bytes, Some(lag))
                        }
                        _ => (
                            R::InitialSync,
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
                    state,
                    progress_percent: if d.sync_complete && state != R::Rescan {
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
                            && matches!(state, R::Continuous | R::Lagging | R::Stalled)
                    }),
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

async fn machines(State(s): State<Arc<Shared>>) -> Result<Json<MachinesView>, ApiError> {
    blocking(move || machines_view(&s)).await.map(Json)
}

async fn revoke_machine(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    let s2 = s.clone();
    let id2 = id.clone();
    if !blocking(move || s2.catalog.revoke_machine(&id2).map_err(internal)).await? {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no machine {id}")));
    }
    // A connected agent of a revoked machine is cut off now, not at its next reconnect.
    if let Ok(mid) = rehost_proto::MachineId::parse(&id) {
        s.slot(&mid).kick.kick(crate::auth::Kick::Revoked);
    }
    Ok(Json(Revoked { revoked: id }))
}

/// Deletes a machine: its catalog rows, its staging volumes, its recovery points (then GC frees
/// the store objects only they used). Refused while its agent is connected (the session holds
/// the machine's slot, which the delete holds throughout, so no session starts meanwhile), while
/// a launch job of it runs, or while one of its points is being taken.
async fn delete_machine(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<MachineDeleted>, ApiError> {
    use std::os::unix::fs::MetadataExt;
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

/// Sets a machine's bandwidth cap; a connected agent applies it at once.
async fn throttle_machine(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<Throttle>,
) -> Result<Json<Throttled>, ApiError> {
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
    Ok(Json(Throttled {
        machine_id: id.to_string(),
        max_mbps: cap,
        applied_now: applied,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
