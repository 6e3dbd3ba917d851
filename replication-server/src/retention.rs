//! Retention of recovery points and the scheduler that takes and expires them.
//!
//! A policy is a list of rules `EVERY:FOR` (durations like `10m`, `1h`, `7d`): keep one point per
//! `EVERY` for the last `FOR`. The default is DRS's: `10m:1h,1h:24h,1d:7d` (every 10 minutes for
//! an hour, hourly for a day, daily for a week). `off` takes no scheduled points. The server-wide
//! policy and per-machine overrides are rows of the catalog's `retention` table
//! (`rehost-server retention set`).
//!
//! Scheduled points are taken every `EVERY` of the finest rule for machines whose initial sync is
//! complete, and expired by the policy: within each rule's window the newest point of each
//! `EVERY`-long bucket is kept; the newest point is always kept. Manual and agent-requested
//! points are not expired by the policy; they stay until deleted.
//!
//! A recovery plan with its own policy (`plan schedule`) takes its machines' scheduled points
//! as group points (`snapshot::group`), due and expired by the plan's policy, a group at a time;
//! those machines get no scheduled points of their own.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::snapshot::{self, Consistency, SnapshotError};
use crate::states::SnapshotState;
use crate::task::blocking;
use crate::Shared;
use rehost_proto::error::chain;

pub const DEFAULT_POLICY: &str = "10m:1h,1h:24h,1d:7d";
/// The reason tag of points the scheduler takes (and the only ones it expires).
pub const SCHEDULED: &str = "scheduled";
const MAX_KEEP: u64 = 365 * 86400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub every: u64,
    pub keep_for: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

fn fmt_secs(s: u64) -> String {
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "off" {
            return Ok(Policy { rules: Vec::new() });
        }
        let mut rules = Vec::new();
        for part in s.split(',') {
            let (every, keep) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("`{part}` is not EVERY:FOR (e.g. 1h:24h)"))?;
            let rule = Rule {
                every: rehost_proto::human::period_secs(every)?,
                keep_for: rehost_proto::human::period_secs(keep)?,
            };
            if rule.keep_for < rule.every {
                return Err(format!(
                    "`{part}`: keeps points for less than their interval"
                ));
            }
            if rule.keep_for > MAX_KEEP {
                return Err(format!("`{part}`: retention is limited to 365 days"));
            }
            rules.push(rule);
        }
        if rules.is_empty() || rules.len() > 16 {
            return Err("a policy has 1 to 16 rules, or is `off`".into());
        }
        Ok(Policy { rules })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("off");
        }
        let parts: Vec<String> = self
            .rules
            .iter()
            .map(|r| format!("{}:{}", fmt_secs(r.every), fmt_secs(r.keep_for)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Policy {
    /// Seconds between scheduled points; `None` when off.
    pub fn interval(&self) -> Option<u64> {
        self.rules.iter().map(|r| r.every).min()
    }

    /// Whether a point is due at `now` given the newest scheduled one.
    pub fn due(&self, now: i64, last: Option<i64>) -> bool {
        match (self.interval(), last) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(i), Some(t)) => now - t >= i as i64,
        }
    }

    /// Which of `points` (id, created_at) to keep at `now`.
    pub fn keep(&self, now: i64, points: &[(i64, i64)]) -> HashSet<i64> {
        let mut sorted = points.to_vec();
        sorted.sort_by_key(|p| std::cmp::Reverse((p.1, p.0)));
        let mut keep: HashSet<i64> = sorted.first().map(|p| p.0).into_iter().collect();
        for r in &self.rules {
            let mut buckets = HashSet::new();
            for (id, at) in &sorted {
                if now - at <= r.keep_for as i64 && buckets.insert(at.div_euclid(r.every as i64)) {
                    keep.insert(*id);
                }
            }
        }
        keep
    }
}

/// The policy that applies to `machine` (its override, else the server's, else the default).
pub fn policy_for(shared: &Shared, machine: &str) -> Result<Policy, SnapshotError> {
    let text = match shared.catalog.retention(machine)? {
        Some(p) => p,
        None => shared
            .catalog
            .retention("")?
            .unwrap_or_else(|| DEFAULT_POLICY.into()),
    };
    text.parse()
        .map_err(|e| SnapshotError::Internal(format!("stored retention policy `{text}`: {e}")))
}

/// Takes due scheduled points and expires old ones, every `tick`, until the runtime ends.
pub async fn scheduler(shared: Arc<Shared>, tick: Duration) {
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(tick).await;
        }
        if let Err(e) = round(&shared, first).await {
            tracing::warn!(error = %e, "snapshot scheduler round failed");
        }
        first = false;
    }
}

async fn round(shared: &Arc<Shared>, gc_anyway: bool) -> Result<(), SnapshotError> {
    let s = shared.clone();
    let (ready, plans) = blocking(move || {
        Ok::<_, SnapshotError>((s.catalog.machines_ready()?, s.catalog.scheduled_plans()?))
    })
    .await?;
    let mut expired = 0;
    let in_plans: HashSet<String> = plans.iter().flat_map(|p| p.2.iter().cloned()).collect();
    for (plan, policy, members) in plans {
        match plan_round(shared, &plan, &policy, &members, &ready).await {
            Ok(n) => expired += n,
            Err(e) => {
                tracing::warn!(%plan, error = %chain(&e), "scheduled group point round failed")
            }
        }
    }
    for machine in ready.into_iter().filter(|m| !in_plans.contains(m.as_str())) {
        let (s, m) = (shared.clone(), machine.clone());
        let (policy, points) = blocking(move || {
            let policy = policy_for(&s, m.as_str())?;
            let points: Vec<(i64, i64)> = s
                .catalog
                .snapshots(m.as_str())?
                .into_iter()
                .filter(|p| p.state == SnapshotState::Complete && p.reason == SCHEDULED)
                .map(|p| (p.id, p.created_at))
                .collect();
            Ok::<_, SnapshotError>((policy, points))
        })
        .await?;
        let now = crate::catalog::now();
        let mut points = points;
        if policy.due(now, points.iter().map(|p| p.1).max()) {
            match snapshot::request(
                shared.clone(),
                machine.clone(),
                Consistency::Crash,
                SCHEDULED.into(),
                true,
            )
            .await
            {
                Ok(p) => points.push((p.id, p.created_at)),
                Err(e @ SnapshotError::NotReady(_)) => {
                    tracing::info!(%machine, reason = %e, "scheduled recovery point skipped")
                }
                Err(e) => {
                    tracing::warn!(%machine, error = %chain(&e), "scheduled recovery point failed")
                }
            }
        }
        let keep = policy.keep(crate::catalog::now(), &points);
        for (id, _) in points.into_iter().filter(|p| !keep.contains(&p.0)) {
            let s = shared.clone();
            blocking(move || {
                if s.catalog.mark_deleting(id)? {
                    s.catalog.remove_snapshot(id)?;
                }
                Ok::<_, SnapshotError>(())
            })
            .await?;
            tracing::info!(%machine, snapshot = id, "recovery point expired");
            expired += 1;
        }
    }
    if expired > 0 || gc_anyway {
        let s = shared.clone();
        let r = blocking(move || {
            crate::store::gc::collect(&s.store, &s.catalog)
                .map_err(|e| SnapshotError::Internal(chain(&e)))
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "garbage collection failed");
        }
    }
    Ok(())
}

/// One plan's round: a scheduled group point when due (once every machine of it has finished
/// its initial sync), then the expiry of its scheduled group points. Returns how many points
/// expired.
async fn plan_round(
    shared: &Arc<Shared>,
    plan: &str,
    policy: &str,
    members: &[String],
    ready: &[rehost_proto::MachineId],
) -> Result<usize, SnapshotError> {
    let policy: Policy = policy.parse().map_err(|e| {
        SnapshotError::Internal(format!("stored policy `{policy}` of plan {plan}: {e}"))
    })?;
    let (s, p) = (shared.clone(), plan.to_string());
    let groups = blocking(move || Ok::<_, SnapshotError>(s.catalog.group_points(&p)?)).await?;
    // The plan's scheduled group points: (id, created_at, snapshot ids).
    let mut points: Vec<(i64, i64, Vec<i64>)> = groups
        .into_iter()
        .filter(|g| !g.snapshots.is_empty() && g.snapshots.iter().all(|s| s.reason == SCHEDULED))
        .map(|g| {
            (
                g.id,
                g.created_at,
                g.snapshots.iter().map(|s| s.id).collect(),
            )
        })
        .collect();
    let now = crate::catalog::now();
    let all_ready = !members.is_empty()
        && members
            .iter()
            .all(|m| ready.iter().any(|r| r.as_str() == m));
    if all_ready && policy.due(now, points.iter().map(|p| p.1).max()) {
        let ids: Vec<rehost_proto::MachineId> = ready
            .iter()
            .filter(|r| members.iter().any(|m| m == r.as_str()))
            .cloned()
            .collect();
        match snapshot::group::take(shared.clone(), plan.to_string(), ids, SCHEDULED.into()).await {
            Ok(g) => {
                tracing::info!(%plan, group = g.id, consistency = %g.consistency, "scheduled group point");
                points.push((
                    g.id,
                    g.created_at,
                    g.snapshots.iter().map(|s| s.id).collect(),
                ));
            }
            Err(e) => {
                tracing::warn!(%plan, error = %chain(&e), "scheduled group point failed")
            }
        }
    }
    let keep = policy.keep(
        crate::catalog::now(),
        &points.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
    );
    let mut expired = 0;
    for (group, _, snaps) in points.into_iter().filter(|p| !keep.contains(&p.0)) {
        let s = shared.clone();
        let n = snaps.len();
        blocking(move || {
            for id in snaps {
                if s.catalog.mark_deleting(id)? {
                    s.catalog.remove_snapshot(id)?;
                }
            }
            s.catalog.remove_empty_group(group)?;
            Ok::<_, SnapshotError>(())
        })
        .await?;
        tracing::info!(%plan, group, "scheduled group point expired");
        expired += n;
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let p: Policy = DEFAULT_POLICY.parse().unwrap();
        assert_eq!(
            p.rules[0],
            Rule {
                every: 600,
                keep_for: 3600
            }
        );
        assert_eq!(p.to_string(), "10m:1h,1h:1d,1d:7d");
        assert_eq!(p.to_string().parse::<Policy>().unwrap(), p);
        assert_eq!(p.interval(), Some(600));
        assert_eq!("off".parse::<Policy>().unwrap().interval(), None);
        for bad in ["", "10m", "10:1h", "1h:10m", "1d:400d", "x:y"] {
            assert!(bad.parse::<Policy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn drs_like_keep() {
        let p: Policy = DEFAULT_POLICY.parse().unwrap();
        let now = 100 * 86400;
        // A point every 10 minutes for 10 days.
        let points: Vec<(i64, i64)> = (0..10 * 144).map(|i| (i, now - i * 600)).collect();
        let keep = p.keep(now, &points);
        // 7 points in the last hour (buckets may straddle), 24-25 hourly, 7-8 daily, overlapping.
        assert!(keep.contains(&0), "the newest is kept");
        assert!(keep.len() >= 30 && keep.len() <= 40, "kept {}", keep.len());
        assert!(
            keep.iter()
                .all(|id| now - points[*id as usize].1 <= 7 * 86400),
            "nothing older than a week"
        );
        let old: Vec<(i64, i64)> = vec![(1, now - 30 * 86400)];
        assert_eq!(
            p.keep(now, &old),
            [1].into_iter().collect(),
            "the only point is kept however old"
        );
        assert!(p.due(now, Some(now - 600)) && !p.due(now, Some(now - 599)) && p.due(now, None));
    }
}
