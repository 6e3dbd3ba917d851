//! Showing recovery plan runs: following a run's log (`plan drill|failover --wait`, `jobs P<id>`),
//! the runs in `jobs`, and `plan status`.

use super::client::AdminClient;
use crate::api::model::{JobState, PlanRun, PlanStatus, RunLogLine, RunMode, RunView};
use crate::human;

/// After a run started: say so, or follow it (`--wait`).
pub(super) fn started(c: &AdminClient, r: &PlanRun, wait: bool, json: bool) -> anyhow::Result<()> {
    if !wait {
        if json {
            println!("{}", serde_json::to_string_pretty(r)?);
        } else {
            println!(
                "P{} started: {} of plan {} (follow it with `rehost-server jobs P{} --follow`)",
                r.id, r.mode, r.plan, r.id
            );
        }
        return Ok(());
    }
    show_run(c, r.id, true, false)?;
    let end: RunView = c.get(&format!("/v1/plan-runs/{}?after=0", r.id))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&end.run)?);
    }
    if end.run.state != JobState::Succeeded {
        std::process::exit(1);
    }
    Ok(())
}

fn print_run_line(l: &RunLogLine, start_ms: i64) {
    println!(
        "{}  +{:>6.1}s  {:<12} {:<10}  {}",
        super::jobs::clock(l.at_ms),
        (l.at_ms - start_ms) as f64 / 1000.0,
        l.machine.as_deref().unwrap_or("-"),
        l.step,
        l.message
    );
}

/// `jobs P<id> [--follow] [--json]`: a plan run and its log across its machines.
pub(super) fn show_run(c: &AdminClient, id: i64, follow: bool, json: bool) -> anyhow::Result<()> {
    if json && !follow {
        let v: RunView = c.get(&format!("/v1/plan-runs/{id}?after=0"))?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut after = 0;
    let mut start_ms = None;
    let mut head = false;
    loop {
        let v: RunView = c.get(&format!("/v1/plan-runs/{id}?after={after}"))?;
        if !head {
            let r = &v.run;
            println!("P{} — {} of plan {}, {}", r.id, r.mode, r.plan, r.state);
            head = true;
        }
        for l in &v.log {
            print_run_line(l, *start_ms.get_or_insert(l.at_ms));
            after = l.seq;
        }
        if !follow || v.run.state != JobState::Running {
            if follow {
                let tail: RunView = c.get(&format!("/v1/plan-runs/{id}?after={after}"))?;
                for l in &tail.log {
                    print_run_line(l, start_ms.unwrap_or(l.at_ms));
                }
            }
            println!("P{id}: {}", result(&v.run));
            if follow && v.run.state == JobState::Failed {
                std::process::exit(1);
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A run's result in words, as Leap's "Last Failover Status".
fn result(r: &PlanRun) -> String {
    let when = r
        .ended_at
        .map(|t| format!(" at {}", human::datetime(t)))
        .unwrap_or_default();
    match (r.state, &r.error) {
        (JobState::Running, _) => "running".into(),
        (JobState::Failed, Some(e)) => format!(
            "failed{when}{}: {e}",
            r.failed_machine
                .as_deref()
                .map(|m| format!(" (machine {m})"))
                .unwrap_or_default()
        ),
        (state, _) => format!("{state}{when}"),
    }
}

pub(super) fn print_runs(runs: &[PlanRun]) {
    println!(
        "{:>5}  {:<20} {:<20} {:<10} {:<20} {:<6}  RESULT",
        "RUN", "PLAN", "MODE", "STATE", "STARTED", "JOBS"
    );
    for r in runs {
        println!(
            "{:>5}  {:<20} {:<20} {:<10} {:<20} {:<6}  {}",
            format!("P{}", r.id),
            r.plan,
            r.mode,
            r.state,
            human::datetime(r.created_at),
            r.jobs.len(),
            match (r.state, &r.error, r.cleaned_at) {
                (JobState::Failed, Some(e), _) => e.clone(),
                (JobState::Succeeded, _, Some(_)) => "ok, cleaned up".into(),
                (JobState::Succeeded, _, None) => "ok".into(),
                _ => String::new(),
            }
        );
    }
}

pub(super) fn print_status(v: &PlanStatus) {
    println!("plan {}", v.plan);
    for (what, r) in [("drill", &v.last_drill), ("failover", &v.last_failover)] {
        match r {
            None => println!("  last {what:<9} none"),
            Some(r) => println!(
                "  last {what:<9} P{} {}, started {}: {}{}",
                r.id,
                r.mode,
                human::datetime(r.created_at),
                result(r),
                match (r.cleaned_at, r.cleanup_at) {
                    (Some(t), _) => format!(" (cleaned up {})", human::datetime(t)),
                    (None, Some(t)) if r.mode == RunMode::Drill =>
                        format!(" (cleanup after {})", human::datetime(t)),
                    _ => String::new(),
                }
            ),
        }
    }
    println!(
        "  {:>4}  {:<20} {:<16} {:<18} {:<28} TARGET",
        "STEP", "MACHINE", "HOST", "LIFECYCLE", "LAST RUN"
    );
    for m in &v.machines {
        let part = m.failover.as_ref().or(m.drill.as_ref());
        println!(
            "  {:>4}  {:<20} {:<16} {:<18} {:<28} {}",
            m.step,
            m.machine_id,
            m.hostname,
            m.lifecycle,
            part.map(|p| format!(
                "P{} job {} {}{}",
                p.run,
                p.job,
                p.state,
                p.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ))
            .unwrap_or_else(|| "-".into()),
            part.and_then(|p| p.target.as_deref()).unwrap_or("-")
        );
    }
}
