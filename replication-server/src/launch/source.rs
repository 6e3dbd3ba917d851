//! A cutover's planned-failover source action: stop services before the final point, or power
//! off after it, asked of the agent and bounded in time.

use super::SourceActionError;
use std::time::Duration;

use rehost_proto::MachineId;

use crate::Shared;

/// A planned failover's action on the source, asked of its agent during a cutover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// `systemctl stop UNITS` before the final point, so that the point holds everything the
    /// services wrote; if it fails, the cutover stops there and the source keeps running.
    StopServices(Vec<String>),
    /// `systemctl poweroff` once the final point is taken.
    PowerOff,
}

impl std::str::FromStr for SourceAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "poweroff" {
            return Ok(SourceAction::PowerOff);
        }
        let Some(list) = s.strip_prefix("stop-services:") else {
            return Err(format!(
                "source action `{s}` is neither poweroff nor stop-services:UNIT[,UNIT...]"
            ));
        };
        let units: Vec<String> = list
            .split(',')
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if units.is_empty() || units.len() > rehost_proto::msg::MAX_SOURCE_UNITS {
            return Err(format!(
                "stop-services needs 1 to {} units",
                rehost_proto::msg::MAX_SOURCE_UNITS
            ));
        }
        if let Some(bad) = units.iter().find(|u| !rehost_proto::msg::valid_unit(u)) {
            return Err(format!("`{bad}` is not a systemd unit name"));
        }
        Ok(SourceAction::StopServices(units))
    }
}

/// How long the agent gets to stop the source's services (or to acknowledge a poweroff).
pub const SOURCE_ACTION_BOUND: Duration = Duration::from_secs(150);

/// Asks the connected agent to act on the source; returns what it said.
pub async fn source_action(
    shared: &Shared,
    machine: &MachineId,
    action: &SourceAction,
) -> Result<String, SourceActionError> {
    let slot = shared.slot(machine);
    let out = slot.agent().ok_or(SourceActionError::NotConnected)?;
    let (id, rx) = slot.expect_action();
    let (kind, units) = match action {
        SourceAction::StopServices(u) => {
            (rehost_proto::msg::SourceActionKind::StopServices, u.clone())
        }
        SourceAction::PowerOff => (rehost_proto::msg::SourceActionKind::PowerOff, Vec::new()),
    };
    if out
        .send(rehost_proto::Message::SourceAction { id, kind, units })
        .await
        .is_err()
    {
        slot.take_action(id);
        return Err(SourceActionError::Disconnected);
    }
    drop(out);
    match tokio::time::timeout(SOURCE_ACTION_BOUND, rx).await {
        Ok(Ok((true, m))) => Ok(m),
        Ok(Ok((false, m))) => Err(SourceActionError::Refused(m)),
        Ok(Err(_)) => Err(SourceActionError::SessionEnded),
        Err(_) => {
            slot.take_action(id);
            Err(SourceActionError::NoAnswer(SOURCE_ACTION_BOUND.as_secs()))
        }
    }
}
