//! `/metrics`: Prometheus text for the admin credential or the read-only metrics token (or anyone,
//! with `--metrics-public`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::model::MachinesView;
use super::{blocking, caller, ApiError, Caller, MetricsAccess};
use crate::Shared;

pub(super) async fn page(
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
    let view = blocking(move || super::machines::machines_view(&s2)).await?;
    let s2 = s.clone();
    let text = [
        replication_metrics(&view),
        blocking(move || super::snapshots::metrics(&s2)).await?,
        blocking(move || super::launches::metrics(&s)).await?,
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
                    ("state", d.state.to_string()),
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
                ("lifecycle", m.lifecycle.to_string()),
            ],
            1,
        );
    }
    page.text()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{DiskView, MachineView};

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
    fn device_labels_round_trip_through_the_page() {
        let device = "/dev/evil\\\"\nsecond line\\".to_string();
        let view = MachinesView {
            machines: vec![MachineView {
                machine_id: "m-1".into(),
                hostname: "h".into(),
                lifecycle: crate::states::Lifecycle::ReadyForTesting,
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
                    state: rehost_proto::state::ReplicationState::Continuous,
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
            text.contains(
                "rehost_machine_lifecycle{machine=\"m-1\",lifecycle=\"ready-for-testing\"} 1"
            ),
            "{text}"
        );
    }
}
