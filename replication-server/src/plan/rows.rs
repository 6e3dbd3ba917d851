//! The catalog's side of recovery plans (schema version 7, see `catalog::migrations`): `plans`,
//! `plan_members` (a machine's step, wait and delay) and `plan_hooks` (a step's pre and post
//! hooks). Each change is one transaction that checks what it needs first, so a refused change
//! changes nothing. The values are checked by the caller ([`super`]'s `check_*`); the schema's
//! CHECKs hold them as well.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Hook, Member, MemberSettings, Network, Networks, Plan, PlanError, PlanSummary, Step,
    MAX_MACHINES,
};
use crate::catalog::{now, Catalog, CatalogError};
use crate::states::HookKind;

fn plan_id(c: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    c.query_row("SELECT id FROM plans WHERE name = ?1", [name], |r| r.get(0))
        .optional()
}

/// A network column, as [`Network`]'s text.
fn network(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Network> {
    let s: String = r.get(i)?;
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            Box::new(std::io::Error::other(e)),
        )
    })
}

/// Step `n` of `steps`, made empty if it is not there yet.
fn step(steps: &mut BTreeMap<u32, Step>, n: u32) -> &mut Step {
    steps.entry(n).or_insert_with(|| Step {
        step: n,
        machines: Vec::new(),
        pre_hook: None,
        post_hook: None,
    })
}

/// [`Catalog::with`] for a change that may be refused: `Ok(Err(e))` from `f` is the refusal.
fn change<T>(
    cat: &Catalog,
    f: impl FnOnce(&mut Connection) -> rusqlite::Result<Result<T, PlanError>>,
) -> Result<T, PlanError> {
    cat.with(f)?
}

/// Whether a machine (`machine`, or any of plan `id`'s) would follow two plans' schedules if plan
/// `id` has one: a machine's scheduled points follow one plan's policy.
fn schedule_conflict(
    c: &Connection,
    id: i64,
    plan: &str,
    machine: Option<&str>,
) -> rusqlite::Result<Option<PlanError>> {
    let has: Option<String> =
        c.query_row("SELECT policy FROM plans WHERE id = ?1", [id], |r| r.get(0))?;
    if has.is_none() {
        return Ok(None);
    }
    let other: Option<(String, String, String)> = c
        .query_row(
            "SELECT pm.machine_id, p.name, p.policy FROM plan_members pm JOIN plans p ON p.id = pm.plan_id
             WHERE p.id != ?1 AND p.policy IS NOT NULL
               AND (pm.machine_id = ?2
                    OR (?2 IS NULL AND pm.machine_id IN
                        (SELECT machine_id FROM plan_members WHERE plan_id = ?1)))
             LIMIT 1",
            params![id, machine],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(other.map(|(m, other, policy)| {
        PlanError::Invalid(format!(
            "machine {m} is in plan `{other}`, whose schedule ({policy}) takes its points, and \
             plan `{plan}` has one too: a machine's scheduled points follow one plan (clear one \
             with `rehost-server plan schedule NAME --clear`)"
        ))
    }))
}

impl Catalog {
    /// Sets (or clears) the plan's retention policy, refused when one of its machines follows
    /// another plan's.
    pub fn set_plan_policy(&self, plan: &str, policy: Option<&str>) -> Result<(), PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, plan)? else {
                return Ok(Err(PlanError::NoPlan(plan.into())));
            };
            tx.execute(
                "UPDATE plans SET policy = ?2 WHERE id = ?1",
                params![id, policy],
            )?;
            if let Some(e) = schedule_conflict(&tx, id, plan, None)? {
                return Ok(Err(e));
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    /// The plans that have a policy, each with its machines.
    pub fn scheduled_plans(&self) -> Result<Vec<(String, String, Vec<String>)>, CatalogError> {
        self.with(|c| {
            let plans = c
                .prepare("SELECT id, name, policy FROM plans WHERE policy IS NOT NULL ORDER BY id")?
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<(i64, String, String)>>>()?;
            let mut out = Vec::new();
            for (id, name, policy) in plans {
                let members = c
                    .prepare("SELECT machine_id FROM plan_members WHERE plan_id = ?1 ORDER BY step, rowid")?
                    .query_map([id], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                out.push((name, policy, members));
            }
            Ok(out)
        })
    }

    /// Creates an empty plan with the default networks. Refused when the name is taken.
    pub fn create_plan(&self, name: &str, description: &str) -> Result<(), PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            if plan_id(&tx, name)?.is_some() {
                return Ok(Err(PlanError::Exists(name.into())));
            }
            let n = Networks::default();
            tx.execute(
                "INSERT INTO plans (name, description, created_at, production_network, test_network)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    name,
                    description,
                    now(),
                    n.production.to_string(),
                    n.test.to_string()
                ],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    /// Every plan, by name, with how many machines and steps it has.
    pub fn plans(&self) -> Result<Vec<PlanSummary>, PlanError> {
        Ok(self.with(|c| {
            c.prepare(
                "SELECT p.name, p.description, p.created_at,
                   (SELECT COUNT(*) FROM plan_members m WHERE m.plan_id = p.id),
                   (SELECT COUNT(*) FROM (SELECT step FROM plan_members m WHERE m.plan_id = p.id
                                          UNION SELECT step FROM plan_hooks h WHERE h.plan_id = p.id))
                 FROM plans p ORDER BY p.name",
            )?
            .query_map([], |r| {
                Ok(PlanSummary {
                    name: r.get(0)?,
                    description: r.get(1)?,
                    created_at: r.get(2)?,
                    machine_count: r.get(3)?,
                    step_count: r.get(4)?,
                })
            })?
            .collect()
        })?)
    }

    /// The plan named `name`, with its steps, machines and hooks.
    pub fn plan(&self, name: &str) -> Result<Plan, PlanError> {
        change(self, |c| {
            let head = c
                .query_row(
                    "SELECT id, name, description, created_at, production_network, test_network,
                            policy
                     FROM plans WHERE name = ?1",
                    [name],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            Plan {
                                name: r.get(1)?,
                                description: r.get(2)?,
                                created_at: r.get(3)?,
                                networks: Networks {
                                    production: network(r, 4)?,
                                    test: network(r, 5)?,
                                },
                                policy: r.get(6)?,
                                steps: Vec::new(),
                            },
                        ))
                    },
                )
                .optional()?;
            let Some((id, mut plan)) = head else {
                return Ok(Err(PlanError::NoPlan(name.into())));
            };
            let mut steps: BTreeMap<u32, Step> = BTreeMap::new();
            let members = c
                .prepare(
                    "SELECT pm.step, pm.machine_id, m.hostname, m.lifecycle, pm.wait, pm.delay_s,
                            pm.source_action, pm.continue_on_error
                     FROM plan_members pm JOIN machines m ON m.id = pm.machine_id
                     WHERE pm.plan_id = ?1 ORDER BY pm.step, pm.rowid",
                )?
                .query_map([id], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        Member {
                            machine_id: r.get(1)?,
                            hostname: r.get(2)?,
                            lifecycle: r.get(3)?,
                            wait: r.get(4)?,
                            delay_s: r.get(5)?,
                            source_action: r.get(6)?,
                            continue_on_error: r.get(7)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (n, m) in members {
                step(&mut steps, n).machines.push(m);
            }
            let hooks = c
                .prepare(
                    "SELECT step, kind, path, timeout_s, continue_on_error FROM plan_hooks
                     WHERE plan_id = ?1 ORDER BY step, kind",
                )?
                .query_map([id], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, HookKind>(1)?,
                        Hook {
                            path: r.get(2)?,
                            timeout_s: r.get(3)?,
                            continue_on_error: r.get(4)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (n, kind, h) in hooks {
                let s = step(&mut steps, n);
                match kind {
                    HookKind::Pre => s.pre_hook = Some(h),
                    HookKind::Post => s.post_hook = Some(h),
                }
            }
            plan.steps = steps.into_values().collect();
            Ok(Ok(plan))
        })
    }

    /// Removes a plan with its members and hooks; returns how many of each it had.
    pub fn delete_plan(&self, name: &str) -> Result<(usize, usize), PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, name)? else {
                return Ok(Err(PlanError::NoPlan(name.into())));
            };
            let live: Option<(i64, String, String)> = tx
                .query_row(
                    "SELECT id, mode, state FROM plan_runs WHERE plan_id = ?1
                     AND (state = 'running' OR (mode = 'drill' AND cleaned_at IS NULL))
                     ORDER BY id DESC LIMIT 1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((run, mode, state)) = live {
                return Ok(Err(PlanError::Invalid(if state == "running" {
                    format!("{mode} P{run} of plan `{name}` is running: wait for it to end")
                } else {
                    format!(
                        "drill P{run} of plan `{name}` may have targets running: \
                         `rehost-server plan cleanup {name}` first"
                    )
                })));
            }
            let members = tx.execute("DELETE FROM plan_members WHERE plan_id = ?1", [id])?;
            let hooks = tx.execute("DELETE FROM plan_hooks WHERE plan_id = ?1", [id])?;
            tx.execute("DELETE FROM plans WHERE id = ?1", [id])?;
            tx.commit()?;
            Ok(Ok((members, hooks)))
        })
    }

    /// Puts `machine` in `step` of `plan` with its wait and delay; returns whether it is new to
    /// the plan. A machine already in that step gets the new wait and delay; one in another step
    /// is refused (remove it first), and so is a new machine in a full plan.
    pub fn set_plan_member(
        &self,
        plan: &str,
        machine: &str,
        step: u32,
        settings: MemberSettings<'_>,
    ) -> Result<bool, PlanError> {
        let MemberSettings {
            wait,
            delay_s,
            source_action,
            continue_on_error,
        } = settings;
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, plan)? else {
                return Ok(Err(PlanError::NoPlan(plan.into())));
            };
            let known: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM machines WHERE id = ?1)",
                [machine],
                |r| r.get(0),
            )?;
            if !known {
                return Ok(Err(PlanError::NoMachine(machine.into())));
            }
            if let Some(e) = schedule_conflict(&tx, id, plan, Some(machine))? {
                return Ok(Err(e));
            }
            let now_in: Option<u32> = tx
                .query_row(
                    "SELECT step FROM plan_members WHERE plan_id = ?1 AND machine_id = ?2",
                    params![id, machine],
                    |r| r.get(0),
                )
                .optional()?;
            match now_in {
                Some(s) if s != step => {
                    return Ok(Err(PlanError::AlreadyIn {
                        plan: plan.into(),
                        machine: machine.into(),
                        step: s,
                    }))
                }
                Some(_) => {
                    tx.execute(
                        "UPDATE plan_members SET wait = ?3, delay_s = ?4, source_action = ?5,
                                                 continue_on_error = ?6
                         WHERE plan_id = ?1 AND machine_id = ?2",
                        params![id, machine, wait, delay_s, source_action, continue_on_error],
                    )?;
                }
                None => {
                    let count: usize = tx.query_row(
                        "SELECT COUNT(*) FROM plan_members WHERE plan_id = ?1",
                        [id],
                        |r| r.get(0),
                    )?;
                    if count >= MAX_MACHINES {
                        return Ok(Err(PlanError::Full(plan.into())));
                    }
                    tx.execute(
                        "INSERT INTO plan_members (plan_id, machine_id, step, wait, delay_s, added_at,
                                                   source_action, continue_on_error)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![id, machine, step, wait, delay_s, now(), source_action, continue_on_error],
                    )?;
                }
            }
            tx.commit()?;
            Ok(Ok(now_in.is_none()))
        })
    }

    /// Takes `machine` out of `plan`; returns the step it was in.
    pub fn remove_plan_member(&self, plan: &str, machine: &str) -> Result<u32, PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, plan)? else {
                return Ok(Err(PlanError::NoPlan(plan.into())));
            };
            let step: Option<u32> = tx
                .query_row(
                    "DELETE FROM plan_members WHERE plan_id = ?1 AND machine_id = ?2 RETURNING step",
                    params![id, machine],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(step) = step else {
                return Ok(Err(PlanError::NotMember {
                    plan: plan.into(),
                    machine: machine.into(),
                }));
            };
            tx.commit()?;
            Ok(Ok(step))
        })
    }

    /// Sets the networks given; the other keeps its value.
    pub fn set_plan_networks(
        &self,
        plan: &str,
        production: Option<&Network>,
        test: Option<&Network>,
    ) -> Result<(), PlanError> {
        change(self, |c| {
            let n = c.execute(
                "UPDATE plans SET production_network = COALESCE(?2, production_network),
                                  test_network = COALESCE(?3, test_network)
                 WHERE name = ?1",
                params![
                    plan,
                    production.map(Network::to_string),
                    test.map(Network::to_string)
                ],
            )?;
            Ok(if n == 0 {
                Err(PlanError::NoPlan(plan.into()))
            } else {
                Ok(())
            })
        })
    }

    /// Sets (or replaces) the `kind` hook of `step`.
    pub fn set_plan_hook(
        &self,
        plan: &str,
        step: u32,
        kind: HookKind,
        hook: &Hook,
    ) -> Result<(), PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, plan)? else {
                return Ok(Err(PlanError::NoPlan(plan.into())));
            };
            tx.execute(
                "INSERT INTO plan_hooks (plan_id, step, kind, path, timeout_s, continue_on_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (plan_id, step, kind) DO UPDATE SET path = excluded.path,
                   timeout_s = excluded.timeout_s, continue_on_error = excluded.continue_on_error",
                params![
                    id,
                    step,
                    kind,
                    hook.path,
                    hook.timeout_s,
                    hook.continue_on_error
                ],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    /// Removes the `kind` hook of `step`; refused when there is none.
    pub fn remove_plan_hook(&self, plan: &str, step: u32, kind: HookKind) -> Result<(), PlanError> {
        change(self, |c| {
            let tx = c.transaction()?;
            let Some(id) = plan_id(&tx, plan)? else {
                return Ok(Err(PlanError::NoPlan(plan.into())));
            };
            let n = tx.execute(
                "DELETE FROM plan_hooks WHERE plan_id = ?1 AND step = ?2 AND kind = ?3",
                params![id, step, kind],
            )?;
            if n == 0 {
                return Ok(Err(PlanError::NoHook {
                    plan: plan.into(),
                    step,
                    kind,
                }));
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::states::{Lifecycle, StepWait};

    fn catalog() -> (tempfile::TempDir, Catalog, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let (a, _) = cat.register_machine("web-1", &[1; 32], "t", b"s").unwrap();
        let (b, _) = cat.register_machine("db-1", &[2; 32], "t", b"s").unwrap();
        (dir, cat, a.to_string(), b.to_string())
    }

    fn hook(path: &str) -> Hook {
        Hook {
            path: path.into(),
            timeout_s: 300,
            continue_on_error: false,
        }
    }

    #[test]
    fn a_plan_holds_each_machine_once_in_one_step() {
        let (_d, cat, web, db) = catalog();
        cat.create_plan("tier", "the web tier").unwrap();
        assert!(matches!(
            cat.create_plan("tier", "again"),
            Err(PlanError::Exists(_))
        ));
        assert!(cat
            .set_plan_member("tier", &db, 1, MemberSettings::new(StepWait::Boot, 0))
            .unwrap());
        assert!(cat
            .set_plan_member("tier", &web, 2, MemberSettings::new(StepWait::None, 30))
            .unwrap());
        // The same step again: new wait and delay, still one row.
        assert!(!cat
            .set_plan_member("tier", &web, 2, MemberSettings::new(StepWait::Boot, 5))
            .unwrap());
        let e = cat
            .set_plan_member("tier", &web, 3, MemberSettings::new(StepWait::Boot, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already in step 2"), "{e}");
        assert!(matches!(
            cat.set_plan_member("nope", &web, 1, MemberSettings::new(StepWait::Boot, 0)),
            Err(PlanError::NoPlan(_))
        ));
        assert!(matches!(
            cat.set_plan_member(
                "tier",
                "m-0000000000000000",
                1,
                MemberSettings::new(StepWait::Boot, 0)
            ),
            Err(PlanError::NoMachine(_))
        ));
        cat.set_plan_hook("tier", 2, HookKind::Post, &hook("/bin/true"))
            .unwrap();
        cat.set_plan_hook("tier", 3, HookKind::Pre, &hook("/bin/false"))
            .unwrap();
        cat.set_plan_networks("tier", None, Some(&Network::Bridge("br0".into())))
            .unwrap();

        let p = cat.plan("tier").unwrap();
        assert_eq!(p.description, "the web tier");
        assert_eq!(
            p.networks,
            Networks {
                production: Network::User,
                test: Network::Bridge("br0".into())
            }
        );
        let steps: Vec<_> = p.steps.iter().map(|s| s.step).collect();
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(p.steps[0].machines[0].hostname, "db-1");
        assert_eq!(p.steps[0].machines[0].lifecycle, Lifecycle::NotReady);
        let w = &p.steps[1].machines[0];
        assert_eq!((w.wait, w.delay_s), (StepWait::Boot, 5));
        assert_eq!(p.steps[1].post_hook, Some(hook("/bin/true")));
        assert!(p.steps[1].pre_hook.is_none() && p.steps[2].machines.is_empty());
        assert_eq!(
            cat.plans().unwrap(),
            [PlanSummary {
                name: "tier".into(),
                description: "the web tier".into(),
                created_at: p.created_at,
                machine_count: 2,
                step_count: 3,
            }]
        );

        assert_eq!(cat.remove_plan_member("tier", &web).unwrap(), 2);
        assert!(matches!(
            cat.remove_plan_member("tier", &web),
            Err(PlanError::NotMember { .. })
        ));
        cat.remove_plan_hook("tier", 3, HookKind::Pre).unwrap();
        assert!(matches!(
            cat.remove_plan_hook("tier", 3, HookKind::Pre),
            Err(PlanError::NoHook { .. })
        ));
        assert_eq!(cat.delete_plan("tier").unwrap(), (1, 1));
        assert!(matches!(cat.plan("tier"), Err(PlanError::NoPlan(_))));
        let left: i64 = cat
            .with(|c| {
                c.query_row(
                    "SELECT (SELECT COUNT(*) FROM plan_members) + (SELECT COUNT(*) FROM plan_hooks)",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn a_plan_holds_at_most_100_machines() {
        let (_d, cat, _, _) = catalog();
        cat.create_plan("big", "").unwrap();
        for i in 0..MAX_MACHINES as u8 {
            let (m, _) = cat
                .register_machine(&format!("h{i}"), &[i + 10; 32], "t", b"s")
                .unwrap();
            cat.set_plan_member(
                "big",
                m.as_str(),
                1 + u32::from(i) % 20,
                MemberSettings::new(StepWait::Boot, 0),
            )
            .unwrap();
        }
        let (extra, _) = cat
            .register_machine("extra", &[250; 32], "t", b"s")
            .unwrap();
        assert!(matches!(
            cat.set_plan_member(
                "big",
                extra.as_str(),
                1,
                MemberSettings::new(StepWait::Boot, 0)
            ),
            Err(PlanError::Full(_))
        ));
        assert_eq!(cat.plans().unwrap()[0].machine_count, MAX_MACHINES);
    }

    #[test]
    fn deleting_a_machine_takes_it_out_of_every_plan() {
        let (_d, cat, web, db) = catalog();
        for p in ["a", "b"] {
            cat.create_plan(p, "").unwrap();
            cat.set_plan_member(p, &web, 1, MemberSettings::new(StepWait::Boot, 0))
                .unwrap();
            cat.set_plan_member(p, &db, 2, MemberSettings::new(StepWait::Boot, 0))
                .unwrap();
        }
        assert_eq!(cat.delete_machine(&web).unwrap().unwrap().len(), 0);
        for p in ["a", "b"] {
            let plan = cat.plan(p).unwrap();
            let left: Vec<_> = plan
                .steps
                .iter()
                .flat_map(|s| s.machines.iter().map(|m| m.machine_id.clone()))
                .collect();
            assert_eq!(left, [db.as_str()]);
        }
    }
}
