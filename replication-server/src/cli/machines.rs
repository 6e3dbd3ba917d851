//! The token and machine commands: `token create|list|revoke`, `machine
//! revoke|unrevoke|throttle|delete` and `machines`, through the admin API.

use crate::api::model::{
    CreateToken, CreatedReinstallToken, CreatedToken, MachineDeleted, MachinesView, Revoked,
    SnapshotList, Throttle, Throttled, TokenList, Unrevoked,
};
use crate::human;

use super::client::AdminClient;
use super::{MachineCmd, TokenCmd};

fn time(t: Option<i64>) -> String {
    t.map(human::datetime).unwrap_or_else(|| "-".into())
}

pub(super) fn token(cmd: &TokenCmd, c: &AdminClient) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            expires,
            description,
            reinstall,
            json,
        } => {
            // A reinstall token is bound to its machine; either reply carries `token`.
            let req = CreateToken {
                description: description.clone(),
                expires_in_seconds: *expires,
            };
            let (token, text) = match reinstall {
                Some(machine) => {
                    let t: CreatedReinstallToken =
                        c.post(&format!("/v1/machines/{machine}/reinstall-token"), &req)?;
                    (t.token.clone(), serde_json::to_string_pretty(&t)?)
                }
                None => {
                    let t: CreatedToken = c.post("/v1/tokens", &req)?;
                    (t.token.clone(), serde_json::to_string_pretty(&t)?)
                }
            };
            println!("{}", if *json { text } else { token });
            Ok(())
        }
        TokenCmd::List { json } => {
            let v: TokenList = c.get("/v1/tokens")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<18} {:<19} {:<19} {:<9} {:>5}  DESCRIPTION",
                "ID", "CREATED", "EXPIRES", "STATUS", "USED"
            );
            for t in &v.tokens {
                let now = crate::catalog::now();
                let status = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.machine_id.is_some() && t.registrations > 0 {
                    "used"
                } else if t.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<18} {:<19} {:<19} {:<9} {:>5}  {}",
                    t.id,
                    time(Some(t.created_at)),
                    t.expires_at
                        .map(human::datetime)
                        .unwrap_or_else(|| "never".into()),
                    status,
                    t.registrations,
                    match &t.machine_id {
                        Some(m) => format!("reinstall {m} {}", t.description),
                        None => t.description.clone(),
                    }
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            let _: Revoked = c.post(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}))?;
            println!("token {id} revoked");
            Ok(())
        }
    }
}

pub(super) fn machine(cmd: &MachineCmd, c: &AdminClient) -> anyhow::Result<()> {
    match cmd {
        MachineCmd::Delete { machine, yes } => delete_machine(c, machine, *yes),
        MachineCmd::History { machine, json } => super::jobs::history(c, machine, *json),
        MachineCmd::Throttle { machine, mbps } => {
            let v: Throttled = c.post(
                &format!("/v1/machines/{machine}/throttle"),
                &Throttle {
                    max_mbps: Some(*mbps),
                },
            )?;
            let now = if v.applied_now {
                "applied now"
            } else {
                "applies when its agent connects"
            };
            match v.max_mbps {
                Some(m) => println!("{}: bandwidth capped at {m} Mbit/s ({now})", v.machine_id),
                None => println!("{}: no bandwidth cap ({now})", v.machine_id),
            }
            Ok(())
        }
        MachineCmd::Revoke { machine_id } => {
            let _: Revoked = c.post(
                &format!("/v1/machines/{machine_id}/revoke"),
                &serde_json::json!({}),
            )?;
            println!("machine {machine_id} revoked");
            Ok(())
        }
        MachineCmd::Unrevoke { machine } => {
            let v: Unrevoked = c.post(
                &format!("/v1/machines/{machine}/unrevoke"),
                &serde_json::json!({}),
            )?;
            let id = &v.machine_id;
            if v.unrevoked {
                println!("machine {id} unrevoked: its agent may connect again");
            } else {
                println!("machine {id} was not revoked");
            }
            Ok(())
        }
    }
}

/// `machines`: every machine and the replication state of each disk.
pub(super) fn machines(c: &AdminClient, json: bool, outdated: bool) -> anyhow::Result<()> {
    let mut v: MachinesView = c.get("/v1/machines")?;
    if outdated {
        let server = v.server_version.clone();
        v.machines.retain(|m| {
            m.agent_version
                .as_deref()
                .and_then(|a| crate::api::machines::older_version(a, &server))
                == Some(true)
        });
        if !json {
            if v.machines.is_empty() {
                println!("no machine runs an agent older than this server ({server})");
            }
            for m in &v.machines {
                println!(
                    "{}  {}  agent {} (server {server}){}",
                    m.machine_id,
                    m.hostname,
                    m.agent_version.as_deref().unwrap_or("?"),
                    if m.connected { "" } else { "  disconnected" }
                );
            }
            return Ok(());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if v.machines.is_empty() {
        println!("no machines registered yet (create a token with `rehost-server token create`)");
    }
    for m in &v.machines {
        let agent = match (&m.agent_address, m.revoked) {
            (_, true) => "revoked".to_string(),
            (Some(a), _) => format!("connected from {a}"),
            (None, _) => match m.last_seen {
                Some(t) if m.disconnected_reason.is_some() => format!(
                    "disconnected ({}) since {}",
                    m.disconnected_reason.as_deref().unwrap_or_default(),
                    human::when(t, crate::catalog::now())
                ),
                Some(t) => format!(
                    "disconnected since {}",
                    human::when(t, crate::catalog::now())
                ),
                None => "never connected".to_string(),
            },
        };
        println!(
            "{}  {}  {}  agent {}{}{}",
            m.machine_id,
            m.hostname,
            m.lifecycle,
            m.agent_version
                .as_ref()
                .map(|v| format!("{v} "))
                .unwrap_or_default(),
            agent,
            m.duplicate_of
                .as_ref()
                .map(|d| format!("  (duplicate of {d}: same hostname or source id)"))
                .unwrap_or_default()
        );
        println!(
            "  {:<24} {:>10} {:<13} {:>7} {:>11} {:>11} {:>6}",
            "DEVICE", "SIZE", "STATE", "PROG", "REPLICATED", "BACKLOG", "LAG"
        );
        for d in &m.disks {
            println!(
                "  {:<24} {:>10} {:<13} {:>6.1}% {:>11} {:>11} {:>6}",
                d.device,
                human::bytes(d.size_bytes),
                d.state,
                d.progress_percent,
                human::bytes(d.replicated_bytes),
                match (d.backlog_lower_bound, d.backlog_bytes) {
                    (false, b) => human::bytes(b),
                    (true, 0) => "unknown".into(),
                    (true, b) => format!(">={}", human::bytes(b)),
                },
                d.lag_seconds
                    .map(|l| format!("{l}s"))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(())
}

/// `machine delete`: says what goes, asks on a terminal (or needs `--yes`), deletes.
pub(super) fn delete_machine(c: &AdminClient, machine: &str, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let v: MachinesView = c.get("/v1/machines")?;
    let by_id = v.machines.iter().find(|m| m.machine_id == machine);
    let mut by_name = v.machines.iter().filter(|m| m.hostname == machine);
    let m = match (by_id, by_name.next(), by_name.next()) {
        (Some(m), _, _) | (None, Some(m), None) => m,
        (None, None, _) => anyhow::bail!("no machine {machine}"),
        (None, Some(_), Some(_)) => {
            anyhow::bail!("several machines are named {machine}: give the machine id")
        }
    };
    let id = &m.machine_id;
    if m.connected {
        anyhow::bail!(
            "the agent of machine {id} is connected: uninstall the agent or `rehost-server machine revoke {id}` it first"
        );
    }
    let points: SnapshotList = c.get(&format!("/v1/machines/{id}/snapshots"))?;
    let points = points.snapshots.len();
    let data: u64 = m.disks.iter().map(|d| d.replicated_bytes).sum();
    let what = format!(
        "machine {id} ({}): {} disks, {points} recovery points, {} of replica data",
        m.hostname,
        m.disks.len(),
        human::bytes(data)
    );
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("not deleting {what}: not on a terminal to confirm (pass --yes)");
        }
        eprint!("Delete {what}? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            anyhow::bail!("not deleted");
        }
    }
    let d: MachineDeleted =
        c.post_long(&format!("/v1/machines/{id}/delete"), &serde_json::json!({}))?;
    println!(
        "machine {} ({}) deleted: {} disks ({} of volumes), {} recovery points",
        d.machine_id,
        d.hostname,
        d.disks,
        human::bytes(d.volume_bytes),
        d.recovery_points
    );
    match (&d.gc, &d.gc_error) {
        (Some(g), _) => println!(
            "gc: removed {} store objects ({})",
            g.removed_objects,
            human::bytes(g.removed_bytes)
        ),
        (None, Some(e)) => println!(
            "gc did not run ({e}): `rehost-server gc` or the scheduler frees the store data"
        ),
        (None, None) => {}
    }
    Ok(())
}
