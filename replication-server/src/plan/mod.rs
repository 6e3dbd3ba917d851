//! Recovery plans: a named, ordered set of machines that are recovered together (as AWS DRS's
//! recovery plans and Azure Site Recovery's recovery plans). This module holds a plan's
//! **definition**; [`run`] runs one (a drill on the test network, a failover on the production
//! one), and [`runs`] holds the runs' rows.
//!
//! A plan has steps 1..=[`MAX_STEPS`]; each machine of it is in one step (a machine is in a plan at
//! most once, and may be in several plans), and a plan holds at most [`MAX_MACHINES`]. The machines
//! of one step launch in parallel, each after its own delay; the next step waits for the boot
//! marker of every machine of the step whose `wait` is [`StepWait::Boot`]. Each step may have a
//! pre hook and a post hook: an executable on the staging host, run with a timeout, whose failure
//! stops the plan unless it is set to continue. A plan names the network its targets get on a
//! failover (`production`, default `user`) and on a drill (`test`, default `none`: isolated), as
//! a blueprint names a target's ([`Network`]).
//!
//! The rows are in [`rows`] (schema version 7, see `catalog::migrations`); the checks of what an
//! operator gives are here, so that the API and the command line refuse the same things.

pub mod rows;
pub mod run;
pub mod runs;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::catalog::CatalogError;
pub use crate::launch::blueprint::Network;
use crate::states::{HookKind, Lifecycle, StepWait};

/// The last step a plan may have (AWS DRS's limit).
pub const MAX_STEPS: u32 = 20;
/// The most machines a plan may hold.
pub const MAX_MACHINES: usize = 100;
/// The longest delay before a machine's launch in its step, in seconds.
pub const MAX_DELAY_S: u64 = 3600;
/// A hook's timeout when none is given, in seconds.
pub const DEFAULT_HOOK_TIMEOUT_S: u64 = 300;
/// The longest timeout a hook may have, in seconds.
pub const MAX_HOOK_TIMEOUT_S: u64 = 3600;
/// The longest plan name.
pub const MAX_NAME: usize = 64;
/// The longest description, in characters.
pub const MAX_DESCRIPTION: usize = 1024;

/// Why a plan change was refused (nothing was changed), or the catalog failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no recovery plan `{0}` (see `rehost-server plan list`)")]
    NoPlan(String),
    #[error("no machine {0}")]
    NoMachine(String),
    #[error("a recovery plan named `{0}` exists already")]
    Exists(String),
    #[error(
        "machine {machine} is already in step {step} of plan `{plan}` (a machine is in a plan \
         once): to move it, `rehost-server plan remove {plan} {machine}`, then `plan add` it again"
    )]
    AlreadyIn {
        plan: String,
        machine: String,
        step: u32,
    },
    #[error("machine {machine} is not in plan `{plan}`")]
    NotMember { plan: String, machine: String },
    #[error("plan `{0}` holds {MAX_MACHINES} machines already, the most a plan may hold")]
    Full(String),
    #[error("step {step} of plan `{plan}` has no {kind} hook")]
    NoHook {
        plan: String,
        step: u32,
        kind: HookKind,
    },
    /// A value that is not one a plan may have: the text says which and why.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// A plan as `plan show --json` prints it: its networks, then its steps in order, each with its
/// machines (in the order they were added) and hooks. Steps with neither are left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub networks: Networks,
    /// The plan's own retention policy (`plan schedule`): its machines' scheduled points are
    /// group points of the plan, taken and expired by it; absent: each machine's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub steps: Vec<Step>,
}

/// The networks a plan's targets get: on a failover (`production`) and on a drill (`test`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Networks {
    pub production: Network,
    pub test: Network,
}

impl Default for Networks {
    fn default() -> Self {
        Networks {
            production: Network::User,
            test: Network::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: u32,
    pub machines: Vec<Member>,
    /// Runs before the step's machines launch; null: none.
    pub pre_hook: Option<Hook>,
    /// Runs once the step's machines are up (as their `wait` says); null: none.
    pub post_hook: Option<Hook>,
}

/// A machine in a plan's step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub machine_id: String,
    pub hostname: String,
    /// The machine's lifecycle now.
    pub lifecycle: Lifecycle,
    /// What the next step waits for: this machine's boot marker (`boot`) or nothing (`none`).
    pub wait: StepWait,
    /// Seconds to wait, once the step starts, before this machine's launch.
    pub delay_s: u64,
    /// What a planned failover asks of this machine's agent first, as a cutover's
    /// `--source-action` (`stop-services:UNIT[,UNIT...]` or `poweroff`); absent: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_action: Option<String>,
    /// Whether a run goes on when this machine's launch fails (it still ends failed, naming it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
}

/// How a machine is in its step (`plan add`'s options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSettings<'a> {
    pub wait: StepWait,
    pub delay_s: u64,
    pub source_action: Option<&'a str>,
    pub continue_on_error: bool,
}

impl MemberSettings<'_> {
    /// `wait` and `delay_s`, no source action, a failure stops the run.
    pub fn new(wait: StepWait, delay_s: u64) -> Self {
        MemberSettings {
            wait,
            delay_s,
            source_action: None,
            continue_on_error: false,
        }
    }
}

/// A step's pre or post hook: an executable on the staging host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// Absolute path of the executable.
    pub path: String,
    /// Seconds it may run before it is stopped and counted as failed.
    pub timeout_s: u64,
    /// Whether the plan goes on when it fails (else it stops there).
    pub continue_on_error: bool,
}

/// One line of `plan list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub machine_count: usize,
    /// Steps that have machines or hooks.
    pub step_count: usize,
}

/// A plan name: 1 to [`MAX_NAME`] of `A-Z a-z 0-9 . _ -`, not `.` or `..` (it is a path segment of
/// the admin API).
pub fn check_name(name: &str) -> Result<(), PlanError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(PlanError::Invalid(format!(
            "plan name `{name}` is not 1-{MAX_NAME} of A-Z a-z 0-9 . _ - (and not . or ..)"
        )))
    }
}

pub fn check_description(d: &str) -> Result<(), PlanError> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(PlanError::Invalid(format!(
            "a plan's description is at most {MAX_DESCRIPTION} characters, without control characters"
        )));
    }
    Ok(())
}

pub fn check_step(step: u32) -> Result<(), PlanError> {
    if (1..=MAX_STEPS).contains(&step) {
        Ok(())
    } else {
        Err(PlanError::Invalid(format!(
            "step {step} is not within 1..={MAX_STEPS} (a plan has at most {MAX_STEPS} steps)"
        )))
    }
}

/// A step as the command line and the API path give it.
pub fn parse_step(s: &str) -> Result<u32, String> {
    let step: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a step number (1..={MAX_STEPS})"))?;
    check_step(step).map_err(|e| e.to_string())?;
    Ok(step)
}

pub fn check_delay(delay_s: u64) -> Result<(), PlanError> {
    if delay_s <= MAX_DELAY_S {
        Ok(())
    } else {
        Err(PlanError::Invalid(format!(
            "delay {delay_s} s is not within 0..={MAX_DELAY_S}"
        )))
    }
}

pub fn check_timeout(timeout_s: u64) -> Result<(), PlanError> {
    if (1..=MAX_HOOK_TIMEOUT_S).contains(&timeout_s) {
        Ok(())
    } else {
        Err(PlanError::Invalid(format!(
            "hook timeout {timeout_s} s is not within 1..={MAX_HOOK_TIMEOUT_S}"
        )))
    }
}

/// A plan's network: `user`, `none` or `bridge:NAME` (as a blueprint's), named `which`
/// (`production` or `test`) in the error.
pub fn parse_network(which: &str, s: &str) -> Result<Network, PlanError> {
    s.parse()
        .map_err(|e| PlanError::Invalid(format!("{which} network: {e}")))
}

/// A hook's path as it is when set: absolute, and a regular file on this (the staging) host that
/// is executable. (It is checked again when a run starts it.)
pub fn check_hook(hook: &Hook) -> Result<(), PlanError> {
    check_timeout(hook.timeout_s)?;
    let path = &hook.path;
    let bad = |why: String| Err(PlanError::Invalid(format!("hook {path}: {why}")));
    if path.is_empty() {
        return Err(PlanError::Invalid("a hook needs a path".into()));
    }
    if !Path::new(path).is_absolute() {
        return bad(
            "a relative path: give an absolute one (the server runs the hook, and not in the \
             directory of this command)"
                .into(),
        );
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad("no such file on the staging host".into())
        }
        Err(e) => return bad(e.to_string()),
    };
    if !meta.is_file() {
        return bad("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return bad("not executable (chmod +x it)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_safe_path_segments() {
        for ok in ["web", "web-tier_2.prod", "A", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", "web\n", &"x".repeat(65)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("is not 1-64 of"), "{bad}: {e}");
        }
    }

    #[test]
    fn steps_are_1_to_20() {
        assert_eq!(parse_step("1"), Ok(1));
        assert_eq!(parse_step("20"), Ok(20));
        for bad in ["0", "21", "-1", "x", "", "4294967296"] {
            assert!(parse_step(bad).is_err(), "{bad}");
        }
        assert!(parse_step("21").unwrap_err().contains("not within 1..=20"));
        assert!(parse_step("x").unwrap_err().contains("not a step number"));
    }

    #[test]
    fn delays_descriptions_and_timeouts_have_bounds() {
        assert!(check_delay(0).is_ok() && check_delay(3600).is_ok());
        assert!(check_delay(3601).is_err());
        assert!(check_timeout(1).is_ok() && check_timeout(3600).is_ok());
        assert!(check_timeout(0).is_err() && check_timeout(3601).is_err());
        assert!(check_description("the web tier").is_ok());
        assert!(check_description("a\nb").is_err());
        assert!(check_description(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn networks_are_the_blueprints() {
        assert_eq!(parse_network("test", "user").unwrap(), Network::User);
        assert_eq!(parse_network("test", "none").unwrap(), Network::None);
        assert_eq!(
            parse_network("test", "bridge:br-prod.1").unwrap(),
            Network::Bridge("br-prod.1".into())
        );
        for bad in [
            "bridge:",
            "bridge:a/b",
            "bridge:a b",
            "bridge:sixteen-chars-xx",
            "bridge:..",
            "nat",
            "",
        ] {
            let e = parse_network("production", bad).unwrap_err().to_string();
            assert!(e.starts_with("production network: "), "{bad}: {e}");
        }
        let d = Networks::default();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"production": "user", "test": "none"})
        );
    }

    #[test]
    fn a_hook_is_an_absolute_executable_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let hook = |path: &Path| Hook {
            path: path.display().to_string(),
            timeout_s: DEFAULT_HOOK_TIMEOUT_S,
            continue_on_error: false,
        };
        let script = dir.path().join("hook.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        let set_mode =
            |m| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(m)).unwrap();
        set_mode(0o644);
        let err = |h: &Hook| check_hook(h).unwrap_err().to_string();
        assert!(err(&hook(&script)).contains("not executable"));
        set_mode(0o755);
        assert!(check_hook(&hook(&script)).is_ok());
        assert!(err(&hook(dir.path())).contains("not a regular file"));
        assert!(err(&hook(&dir.path().join("gone"))).contains("no such file"));
        assert!(err(&hook(Path::new("hook.sh"))).contains("relative path"));
        assert!(err(&hook(Path::new(""))).contains("needs a path"));
        let mut slow = hook(&script);
        slow.timeout_s = 0;
        assert!(err(&slow).contains("timeout 0 s"));
    }
}
