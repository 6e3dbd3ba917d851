//! Planned failover on the source: what the server asks during a cutover (stop the application's
//! services before the final point, or power the machine off after it), done through systemd.
//! The unit names were checked by the protocol decoder (`rehost_proto::msg::valid_unit`); they
//! are passed after `--`, never through a shell.

use std::time::Duration;

use rehost_proto::msg::SourceActionKind;
use tokio::process::Command;

/// The longest `systemctl stop` may take (the server waits a little longer).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `systemctl ARGS`; `Ok(())` on success, else what it printed.
async fn systemctl(args: &[&str], units: &[String]) -> Result<(), String> {
    let mut cmd = Command::new("systemctl");
    cmd.args(args).arg("--").args(units).kill_on_drop(true);
    let out = tokio::time::timeout(STOP_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            format!(
                "systemctl {} did not finish within {} s",
                args.join(" "),
                STOP_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("run systemctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {} {} failed ({}): {}",
            args.join(" "),
            units.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Does what the server asked; returns whether it worked and what to tell the server. A
/// poweroff is only started (see [`power_off`]), since the answer must leave first.
pub async fn act(kind: SourceActionKind, units: &[String]) -> (bool, String) {
    match kind {
        SourceActionKind::StopServices => match systemctl(&["stop"], units).await {
            Ok(()) => {
                tracing::warn!(units = ?units, "planned failover: services stopped at the server's request");
                (true, format!("stopped {}", units.join(", ")))
            }
            Err(e) => {
                tracing::warn!(error = %e, "planned failover: stopping services failed");
                (false, e)
            }
        },
        SourceActionKind::PowerOff => (true, "powering off in 2 s".into()),
        SourceActionKind::Invalid => (false, "unknown source action".into()),
    }
}

/// The second half of a poweroff: after the answer went out.
pub async fn power_off() {
    tokio::time::sleep(Duration::from_secs(2)).await;
    tracing::warn!("planned failover: powering off at the server's request");
    if let Err(e) = systemctl(&["poweroff"], &[]).await {
        tracing::error!(error = %e, "planned failover: poweroff failed");
    }
}
