//! The checks of a run, before anything is written, and the choice of its recovery points.

use super::*;

/// Parses `30m`, `2h`, `1d`, `90s` or plain seconds, within 1 s..=[`MAX_CLEANUP_AFTER`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 30m, 2h, 1d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unit `{unit}` is not one of s, m, h, d")),
    };
    let secs = n
        .checked_mul(mult)
        .filter(|v| (1..=MAX_CLEANUP_AFTER.as_secs()).contains(v))
        .ok_or_else(|| format!("`{s}` is not within 1s..=7d"))?;
    Ok(Duration::from_secs(secs))
}

/// The checks of a run, all before anything is written: the plan has machines; none of them has
/// a running job and each is in a state its launch needs; their blueprints are usable; every
/// hook is still an executable; the points exist.
pub(super) fn check(shared: &Shared, name: &str, req: &RunRequest) -> Result<Checked, RunError> {
    let plan = shared.catalog.plan(name)?;
    let members: Vec<(u32, &Member)> = plan
        .steps
        .iter()
        .flat_map(|s| s.machines.iter().map(move |m| (s.step, m)))
        .collect();
    if members.is_empty() {
        return Err(RunError::Refused(format!(
            "plan `{name}` has no machines: add some with `rehost-server plan add {name} MACHINE --step N`"
        )));
    }
    if req.cleanup_after.is_some() && req.mode != RunMode::Drill {
        return Err(RunError::Refused(
            "--cleanup-after belongs to a drill: a failover's targets are the production ones"
                .into(),
        ));
    }
    if req.mode == RunMode::FailoverPlanned && req.point.is_some() {
        return Err(RunError::Refused(
            "a planned failover takes its own final group point after the sources' actions: \
             --point is for a drill or an unplanned failover"
                .into(),
        ));
    }
    let jm = req.mode.job_mode();
    let allowed = jm.allowed_from();
    let mut refusals = Vec::new();
    let mut units = Vec::new();
    for (step, m) in &members {
        let id = MachineId::parse(&m.machine_id).map_err(|e| RunError::Refused(e.to_string()))?;
        let who = format!("{} ({})", m.hostname, m.machine_id);
        if let Some(j) = shared
            .catalog
            .jobs(Some(&m.machine_id), true)?
            .into_iter()
            .next()
        {
            refusals.push(format!(
                "{who} has job {} ({}) running (see `rehost-server jobs {}`)",
                j.id, j.mode, j.id
            ));
            continue;
        }
        if !allowed.contains(&m.lifecycle) {
            let from: Vec<_> = allowed.iter().map(|l| l.as_str()).collect();
            let hint = match (jm, m.lifecycle) {
                (_, Lifecycle::NotReady) => " (its initial sync has not finished)",
                (JobMode::Cutover, Lifecycle::ReadyForTesting) => {
                    " (drill the plan first, or `rehost-server mark MACHINE ready-for-cutover`)"
                }
                _ => "",
            };
            refusals.push(format!(
                "{who} is {}, and a {} needs {}{hint}",
                m.lifecycle,
                req.mode,
                from.join(" or ")
            ));
            continue;
        }
        let (bp, _) = launch::blueprint_of(shared, &m.machine_id)
            .map_err(|e| RunError::Refused(chain(&e)))?;
        if let Err(e) = bp.validate() {
            refusals.push(format!("the blueprint of {who} is not usable: {e}"));
            continue;
        }
        let action = match (&m.source_action, req.mode) {
            (Some(a), RunMode::FailoverPlanned) => Some(
                a.parse::<SourceAction>()
                    .map_err(|e| RunError::Refused(format!("source action of {who}: {e}")))?,
            ),
            _ => None,
        };
        units.push(Unit {
            member: (*m).clone(),
            id,
            step: *step,
            snapshot: None,
            action,
        });
    }
    for s in &plan.steps {
        for (kind, h) in [(HookKind::Pre, &s.pre_hook), (HookKind::Post, &s.post_hook)] {
            if let Some(h) = h {
                if let Err(e) = crate::plan::check_hook(h) {
                    refusals.push(format!("the {kind} hook of step {}: {e}", s.step));
                }
            }
        }
    }
    if !refusals.is_empty() {
        return Err(RunError::Refused(format!(
            "{} of plan `{name}` refused, nothing launched: {}",
            req.mode,
            refusals.join("; ")
        )));
    }
    let (point_note, group) = if req.mode == RunMode::FailoverPlanned {
        (
            "a final group point, taken once the sources' services are stopped".to_string(),
            None,
        )
    } else {
        choose_points(shared, name, req.point.as_deref(), &mut units)?
    };
    Ok(Checked {
        plan,
        units,
        point_note,
        group,
    })
}

/// Sets each unit's recovery point: from the group point asked for, or the plan's latest one
/// holding every machine, else each machine's latest point.
fn choose_points(
    shared: &Shared,
    name: &str,
    sel: Option<&str>,
    units: &mut [Unit],
) -> Result<(String, Option<i64>), RunError> {
    let groups = shared.catalog.group_points(name)?;
    let complete = |g: &crate::snapshot::group::GroupPoint| -> Option<HashMap<String, i64>> {
        let by: HashMap<String, i64> = g
            .snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Complete)
            .map(|s| (s.machine_id.clone(), s.id))
            .collect();
        units
            .iter()
            .all(|u| by.contains_key(&u.member.machine_id))
            .then_some(by)
    };
    let chosen = match sel {
        None | Some("latest") => groups
            .iter()
            .rev()
            .find_map(|g| complete(g).map(|by| (g, by))),
        Some(s) => {
            let id: i64 = s.parse().map_err(|_| {
                RunError::Refused(format!(
                    "--point `{s}` is neither a group point id nor `latest`"
                ))
            })?;
            let g = groups.iter().find(|g| g.id == id).ok_or_else(|| {
                RunError::NotFound(format!(
                    "no group point {id} of plan `{name}` (see `rehost-server snapshots --plan {name}`)"
                ))
            })?;
            let by = complete(g).ok_or_else(|| {
                RunError::Refused(format!(
                    "group point {id} does not hold a complete point of every machine of plan \
                     `{name}` (a machine was added since, or its point was deleted)"
                ))
            })?;
            Some((g, by))
        }
    };
    if let Some((g, by)) = chosen {
        for u in units.iter_mut() {
            u.snapshot = by.get(&u.member.machine_id).copied();
        }
        let note = format!(
            "group point {} ({}, taken at {})",
            g.id,
            g.consistency,
            crate::human::datetime(g.created_at)
        );
        return Ok((note, Some(g.id)));
    }
    let mut missing = Vec::new();
    for u in units.iter_mut() {
        let snaps = shared.catalog.snapshots(&u.member.machine_id)?;
        match crate::snapshot::select::select(&snaps, "latest") {
            Ok(p) => u.snapshot = Some(p.id),
            Err(_) => missing.push(format!("{} ({})", u.member.hostname, u.member.machine_id)),
        }
    }
    if !missing.is_empty() {
        return Err(RunError::Refused(format!(
            "plan `{name}` has no group point, and {} no recovery point yet: take one with \
             `rehost-server snapshot create --plan {name}`",
            missing.join(", ")
        )));
    }
    Ok((
        "each machine's latest recovery point: the plan has no group point holding every \
         machine (their points were taken at unrelated instants)"
            .into(),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(MAX_CLEANUP_AFTER));
        for bad in [
            "",
            "0",
            "8d",
            "1w",
            "m",
            "-5m",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
