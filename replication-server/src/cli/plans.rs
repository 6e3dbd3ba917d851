//! The recovery plan commands, through the admin API: `plan create|add|remove|delete|network|
//! hook|list|show` define plans; `plan drill|failover|cleanup|status` run them, and `jobs P<id>`
//! shows a run's log across its machines.

use clap::{Subcommand, ValueEnum};

use super::client::AdminClient;
use crate::api::model::{
    Cleaned, CreatePlan, DrillRequest, FailoverRequest, Hook, MemberRemoved, Plan, PlanDeleted,
    PlanList, PlanRun, PlanStatus, SetHook, SetMember, SetNetworks, SetSchedule, StepWait,
};
use crate::human;
use crate::plan::{self, Network};

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Create an empty recovery plan: a named, ordered set of machines recovered together. Its
    /// networks start as production `user` and test `none` (see `plan network`).
    Create {
        /// Plan name: 1-64 of A-Z a-z 0-9 . _ - (unique).
        name: String,
        /// A note shown by `plan list` and `plan show`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Put a machine in a step of a plan. The machines of one step launch together; a machine is
    /// in a plan once (to move it to another step: `plan remove`, then `plan add`). Adding it
    /// again to the step it is in sets its --wait and --delay.
    Add {
        /// Plan name.
        name: String,
        /// Machine id or hostname.
        machine: String,
        /// The step, 1..=20: step 1 launches first, then 2, and so on.
        #[arg(long, value_name = "N", value_parser = plan::parse_step)]
        step: u32,
        /// boot: the next step waits for this machine's boot marker; none: it does not.
        #[arg(long, value_enum, default_value = "boot")]
        wait: Wait,
        /// Seconds to wait, once its step starts, before launching this machine (0..=3600).
        #[arg(long, value_name = "SECONDS", default_value_t = 0,
              value_parser = clap::value_parser!(u64).range(0..=plan::MAX_DELAY_S))]
        delay: u64,
        /// What a planned failover asks of this machine's agent before the final group point, as
        /// a cutover's: `stop-services:UNIT[,UNIT...]` (stopped before the point) or `poweroff`
        /// (after it). Default: nothing.
        #[arg(long, value_name = "ACTION")]
        source_action: Option<String>,
        /// A run goes on when this machine's launch fails (it still ends failed, naming it);
        /// without it, the failure stops the run at this machine's step.
        #[arg(long)]
        continue_on_error: bool,
    },
    /// Take a machine out of a plan.
    Remove {
        /// Plan name.
        name: String,
        /// Machine id or hostname.
        machine: String,
    },
    /// Delete a plan, with its machines' places in it and its hooks (the machines stay).
    Delete {
        /// Plan name.
        name: String,
    },
    /// Set the networks a plan's targets get: production (a failover) and test (a drill). Without
    /// options, show them.
    Network {
        /// Plan name.
        name: String,
        /// user (QEMU user networking), none, or bridge:NAME (a host bridge). Default user.
        #[arg(long, value_name = "NETWORK", value_parser = network)]
        production: Option<Network>,
        /// user, none (isolated: the default), or bridge:NAME.
        #[arg(long, value_name = "NETWORK", value_parser = network)]
        test: Option<Network>,
    },
    /// Set or remove a step's pre hook (run before its machines launch) or post hook (run once
    /// they are up): an executable on the staging host.
    Hook(HookArgs),
    /// List the recovery plans: name, machines, steps, description.
    List {
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Show a plan: its networks, then each step's hooks and machines (wait, delay, lifecycle).
    Show {
        /// Plan name.
        name: String,
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// The plan's own schedule of group points, with the retention policy of `retention set`
    /// (`EVERY:FOR,...`, e.g. `1h:24h,1d:7d`, or `off`): its machines' scheduled points are then
    /// group points of the plan, and their own policies do not apply. A machine follows one
    /// plan's schedule. Without arguments, show it.
    Schedule {
        /// Plan name.
        name: String,
        /// The policy.
        #[arg(conflicts_with = "clear")]
        policy: Option<String>,
        /// Remove the plan's schedule: its machines follow their own policies again.
        #[arg(long)]
        clear: bool,
    },
    /// Test failover: every machine of the plan gets a test target on the plan's test network
    /// (isolated by default), step by step, while replication goes on. The targets stay until
    /// `plan cleanup` (or --cleanup-after); the machines are then testing.
    Drill {
        /// Plan name.
        name: String,
        /// A group point id (`snapshots --plan NAME`) or `latest`: the plan's latest group point
        /// holding every machine, else each machine's latest point (the log says so).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Remove the drill's targets this long after it ended: 90s, 30m, 2h, 1d (at most 7d).
        #[arg(long, value_name = "DURATION", value_parser = plan::run::parse_duration)]
        cleanup_after: Option<std::time::Duration>,
        /// Follow the run's log until it ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        /// Print the run as JSON (with --wait: once it has ended).
        #[arg(long)]
        json: bool,
    },
    /// Fail the plan's machines over onto the plan's production network, step by step: each ends
    /// cutover-complete, as after a cutover, and its replication stops.
    Failover {
        /// Plan name.
        name: String,
        /// Planned: each machine's source action (`plan add --source-action`), one final group
        /// point of every machine, then the steps.
        #[arg(
            long,
            conflicts_with = "unplanned",
            required_unless_present = "unplanned"
        )]
        planned: bool,
        /// Unplanned (the sources are lost): from the plan's latest group point (or --point), no
        /// source contacted.
        #[arg(long)]
        unplanned: bool,
        /// Unplanned only: a group point id or `latest`.
        #[arg(long, conflicts_with = "planned")]
        point: Option<String>,
        /// Follow the run's log until it ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        /// Print the run as JSON (with --wait: once it has ended).
        #[arg(long)]
        json: bool,
    },
    /// Remove the targets of the plan's drills (VMs, domains, images); their machines go back to
    /// ready-for-testing.
    Cleanup {
        /// Plan name.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Each machine of the plan (step, lifecycle, its target in the last drill and the last
    /// failover), and the result of the last drill and the last failover.
    Status {
        /// Plan name.
        name: String,
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
}

/// What `plan hook` takes.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["pre", "post"])))]
pub struct HookArgs {
    /// Plan name.
    name: String,
    /// The step the hook belongs to, 1..=20.
    #[arg(long, value_name = "N", value_parser = plan::parse_step)]
    step: u32,
    /// The pre hook: it runs before the step's machines launch.
    #[arg(long)]
    pre: bool,
    /// The post hook: it runs once the step's machines are up.
    #[arg(long)]
    post: bool,
    /// Absolute path of the hook on the staging host: a regular, executable file.
    #[arg(
        value_name = "PATH",
        required_unless_present = "remove",
        conflicts_with = "remove"
    )]
    path: Option<String>,
    /// Seconds the hook may run before it is stopped and counts as failed (1..=3600).
    #[arg(long, value_name = "SECONDS", default_value_t = plan::DEFAULT_HOOK_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..=plan::MAX_HOOK_TIMEOUT_S),
          conflicts_with = "remove")]
    timeout: u64,
    /// Go on with the plan when the hook fails (by default a failed hook stops it).
    #[arg(long, conflicts_with = "remove")]
    continue_on_error: bool,
    /// Remove the hook instead.
    #[arg(long)]
    remove: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Wait {
    Boot,
    None,
}

fn network(s: &str) -> Result<Network, String> {
    s.parse()
}

/// `s` as one segment of an API path: every byte but `A-Z a-z 0-9 - _ ~` percent-encoded (a
/// name the server does not know then comes back as "no such", not as a wrong route).
pub(super) fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) fn run(cmd: &PlanCmd, c: &AdminClient) -> anyhow::Result<()> {
    match cmd {
        PlanCmd::Create { name, description } => {
            let p: Plan = c.post(
                "/v1/plans",
                &CreatePlan {
                    name: name.clone(),
                    description: description.clone(),
                },
            )?;
            println!(
                "plan {} created (production network {}, test network {}); add machines with \
                 `rehost-server plan add {} MACHINE --step 1`",
                p.name, p.networks.production, p.networks.test, p.name
            );
        }
        PlanCmd::Add {
            name,
            machine,
            step,
            wait,
            delay,
            source_action,
            continue_on_error,
        } => {
            let wait = match wait {
                Wait::Boot => StepWait::Boot,
                Wait::None => StepWait::None,
            };
            let p: Plan = c.put(
                &format!("/v1/plans/{}/machines/{}", seg(name), seg(machine)),
                &SetMember {
                    step: *step,
                    wait: Some(wait),
                    delay_s: Some(*delay),
                    source_action: source_action.clone(),
                    continue_on_error: *continue_on_error,
                },
            )?;
            let m = p
                .steps
                .iter()
                .filter(|s| s.step == *step)
                .flat_map(|s| &s.machines)
                .find(|m| m.machine_id == *machine || m.hostname == *machine);
            match m {
                Some(m) => println!(
                    "plan {}: step {step}: {} ({}), wait {}, delay {} s",
                    p.name, m.machine_id, m.hostname, m.wait, m.delay_s
                ),
                None => println!("plan {}: step {step}: {machine}", p.name),
            }
        }
        PlanCmd::Remove { name, machine } => {
            let r: MemberRemoved = c.delete(&format!(
                "/v1/plans/{}/machines/{}",
                seg(name),
                seg(machine)
            ))?;
            println!(
                "plan {}: {} removed (it was in step {})",
                r.plan, r.machine_id, r.step
            );
        }
        PlanCmd::Delete { name } => {
            let d: PlanDeleted = c.delete(&format!("/v1/plans/{}", seg(name)))?;
            println!(
                "plan {} deleted ({} machines, {} hooks; the machines themselves stay)",
                d.name, d.machines, d.hooks
            );
        }
        PlanCmd::Network {
            name,
            production,
            test,
        } => {
            let p: Plan = if production.is_none() && test.is_none() {
                c.get(&format!("/v1/plans/{}", seg(name)))?
            } else {
                c.put(
                    &format!("/v1/plans/{}/network", seg(name)),
                    &SetNetworks {
                        production: production.as_ref().map(Network::to_string),
                        test: test.as_ref().map(Network::to_string),
                    },
                )?
            };
            println!(
                "plan {}: production network {}, test network {}",
                p.name, p.networks.production, p.networks.test
            );
        }
        PlanCmd::Schedule {
            name,
            policy,
            clear,
        } => {
            let p: Plan = if policy.is_none() && !clear {
                c.get(&format!("/v1/plans/{}", seg(name)))?
            } else {
                c.put(
                    &format!("/v1/plans/{}/schedule", seg(name)),
                    &SetSchedule {
                        policy: policy.clone(),
                    },
                )?
            };
            match &p.policy {
                Some(pol) => println!(
                    "plan {}: scheduled group points, retention {pol} (its machines' own schedules do not apply)",
                    p.name
                ),
                None => println!(
                    "plan {}: no schedule of its own (each machine follows its retention policy)",
                    p.name
                ),
            }
        }
        PlanCmd::Hook(h) => hook(h, c)?,
        PlanCmd::List { json } => {
            let v: PlanList = c.get("/v1/plans")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_list(&v);
            }
        }
        PlanCmd::Show { name, json } => {
            let p: Plan = c.get(&format!("/v1/plans/{}", seg(name)))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print_plan(&p);
            }
        }
        PlanCmd::Drill {
            name,
            point,
            cleanup_after,
            wait,
            json,
        } => {
            let r: PlanRun = c.post(
                &format!("/v1/plans/{}/drill", seg(name)),
                &DrillRequest {
                    point: Some(point.clone()),
                    cleanup_after_s: cleanup_after.map(|d| d.as_secs()),
                },
            )?;
            super::plan_runs::started(c, &r, *wait, *json)?;
        }
        PlanCmd::Failover {
            name,
            planned,
            unplanned: _,
            point,
            wait,
            json,
        } => {
            let r: PlanRun = c.post(
                &format!("/v1/plans/{}/failover", seg(name)),
                &FailoverRequest {
                    planned: *planned,
                    point: point.clone(),
                },
            )?;
            super::plan_runs::started(c, &r, *wait, *json)?;
        }
        PlanCmd::Cleanup { name, json } => {
            let v: Cleaned = c.post(
                &format!("/v1/plans/{}/cleanup", seg(name)),
                &serde_json::json!({}),
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.runs.is_empty() {
                println!("plan {}: no drill to clean up", v.plan);
            } else {
                let runs: Vec<String> = v.runs.iter().map(|r| format!("P{r}")).collect();
                println!("plan {}: cleaned up drill {}", v.plan, runs.join(", "));
                for (host, removed) in &v.removed {
                    println!(
                        "  {host}: {} (ready-for-testing)",
                        if removed.is_empty() {
                            "nothing left to remove".to_string()
                        } else {
                            removed.join("; ")
                        }
                    );
                }
            }
        }
        PlanCmd::Status { name, json } => {
            let v: PlanStatus = c.get(&format!("/v1/plans/{}/status", seg(name)))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                super::plan_runs::print_status(&v);
            }
        }
    }
    Ok(())
}

fn hook(h: &HookArgs, c: &AdminClient) -> anyhow::Result<()> {
    let kind = if h.pre { "pre" } else { "post" };
    let path = format!("/v1/plans/{}/hooks/{}/{kind}", seg(&h.name), h.step);
    if h.remove {
        let p: Plan = c.delete(&path)?;
        println!("plan {}: step {}: {kind} hook removed", p.name, h.step);
        return Ok(());
    }
    let Some(exe) = &h.path else {
        anyhow::bail!("give the hook's PATH, or --remove");
    };
    let p: Plan = c.put(
        &path,
        &SetHook {
            path: exe.clone(),
            timeout_s: Some(h.timeout),
            continue_on_error: h.continue_on_error,
        },
    )?;
    let set = p
        .steps
        .iter()
        .find(|s| s.step == h.step)
        .and_then(|s| (if h.pre { &s.pre_hook } else { &s.post_hook }).clone());
    match set {
        Some(hk) => println!(
            "plan {}: step {}: {kind} hook {}",
            p.name,
            h.step,
            describe(&hk)
        ),
        None => println!("plan {}: step {}: {kind} hook {exe}", p.name, h.step),
    }
    Ok(())
}

fn describe(h: &Hook) -> String {
    format!(
        "{} (timeout {} s, {})",
        h.path,
        h.timeout_s,
        if h.continue_on_error {
            "continue on error"
        } else {
            "stop on error"
        }
    )
}

fn print_list(v: &PlanList) {
    if v.plans.is_empty() {
        println!("no recovery plans yet (create one with `rehost-server plan create NAME`)");
        return;
    }
    println!(
        "{:<24} {:>8} {:>5}  {:<19}  DESCRIPTION",
        "NAME", "MACHINES", "STEPS", "CREATED"
    );
    for p in &v.plans {
        println!(
            "{:<24} {:>8} {:>5}  {:<19}  {}",
            p.name,
            p.machine_count,
            p.step_count,
            human::datetime(p.created_at),
            p.description
        );
    }
}

fn print_plan(p: &Plan) {
    let about = if p.description.is_empty() {
        String::new()
    } else {
        format!(" — {}", p.description)
    };
    println!(
        "plan {}{about} (created {})",
        p.name,
        human::datetime(p.created_at)
    );
    println!("  production network  {}", p.networks.production);
    println!("  test network        {}", p.networks.test);
    if let Some(pol) = &p.policy {
        println!("  schedule            group points, retention {pol}");
    }
    if p.steps.is_empty() {
        println!(
            "no machines yet (add one with `rehost-server plan add {} MACHINE --step 1`)",
            p.name
        );
        return;
    }
    for s in &p.steps {
        println!("step {}", s.step);
        if let Some(h) = &s.pre_hook {
            println!("  pre hook   {}", describe(h));
        }
        if s.machines.is_empty() {
            println!("  no machines");
        } else {
            println!(
                "  {:<20} {:<24} {:<5} {:>6}  LIFECYCLE",
                "MACHINE", "HOST", "WAIT", "DELAY"
            );
        }
        for m in &s.machines {
            println!(
                "  {:<20} {:<24} {:<5} {:>5}s  {}",
                m.machine_id,
                m.hostname,
                m.wait.as_str(),
                m.delay_s,
                m.lifecycle
            );
        }
        if let Some(h) = &s.post_hook {
            println!("  post hook  {}", describe(h));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(super::seg("web-1_a~"), "web-1_a~");
        assert_eq!(super::seg("a b/.."), "a%20b%2F%2E%2E");
        assert_eq!(super::seg("é"), "%C3%A9");
    }
}
