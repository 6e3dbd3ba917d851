//! Catalog tests: migrations from every older version, deletion of a machine.
use super::*;

#[test]
fn a_version_1_catalog_is_migrated_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!("{} PRAGMA user_version = 1;", LADDER[0]))
            .unwrap();
        c.execute(
            "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at)
             VALUES ('m-old', 'old-host', x'01', x'02', 't', 1)",
            [],
        )
        .unwrap();
    }
    let cat = Catalog::open(&path).unwrap();
    let v: i64 = cat
        .with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    assert_eq!(cat.machines().unwrap()[0].0.hostname, "old-host");
    let (m, dup) = cat
        .register_machine("new-host", &[3; 32], "t", b"s")
        .unwrap();
    assert_eq!(dup, None);
    let id = cat
        .begin_snapshot(&m, crate::states::Consistency::Crash, "manual")
        .unwrap();
    cat.finish_snapshot(id, &[(DiskId(1), 10, [9; 32])], 5, 1)
        .unwrap();
    assert_eq!(
        cat.snapshots(m.as_str()).unwrap()[0].state,
        crate::states::SnapshotState::Complete
    );
    drop(cat);
    // Reopening a current catalog changes nothing.
    let cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.snapshots(m.as_str()).unwrap().len(), 1);
}

#[test]
fn deleting_a_machine_removes_its_rows_only_and_waits_for_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&dir.path().join("catalog.sqlite")).unwrap();
    let (gone, _) = cat.register_machine("gone", &[1; 32], "t", b"s").unwrap();
    let (kept, _) = cat.register_machine("kept", &[2; 32], "t", b"s").unwrap();
    let disk = |d: &str| DiskInfo {
        device: d.into(),
        size_bytes: 1 << 20,
    };
    cat.ensure_disks(&gone, &[disk("/dev/a"), disk("/dev/b")], 65536)
        .unwrap();
    let kept_disk = cat.ensure_disks(&kept, &[disk("/dev/a")], 65536).unwrap()[0].id;
    for m in [&gone, &kept] {
        let s = cat
            .begin_snapshot(m, crate::states::Consistency::Crash, "manual")
            .unwrap();
        cat.finish_snapshot(s, &[(DiskId(kept_disk), 10, [9; 32])], 5, 1)
            .unwrap();
        cat.set_blueprint(m.as_str(), "{}").unwrap();
    }
    cat.with(|c| {
        c.execute_batch(&format!(
            "INSERT INTO tokens (id, secret_hash, created_at, machine_id) VALUES ('r', x'00', 1, '{gone}');
             INSERT INTO retention (machine_id, policy) VALUES ('{gone}', 'p');
             INSERT INTO jobs (id, machine_id, mode, state, created_at, prev_lifecycle)
               VALUES (7, '{gone}', 'test', 'running', 1, 'ready-for-testing');
             INSERT INTO job_log (job_id, seq, at_ms, step, message) VALUES (7, 1, 1, 'job-start', '');
             INSERT INTO plans (id, name, created_at) VALUES (1, 'tier', 1);
             INSERT INTO plan_members (plan_id, machine_id, step, added_at)
               VALUES (1, '{gone}', 1, 1), (1, '{kept}', 2, 1);"
        ))
    })
    .unwrap();
    cat.detach_machine(&gone, "0.0.1", "agent uninstalled")
        .unwrap();

    let refused = cat.delete_machine(gone.as_str()).unwrap().unwrap_err();
    assert!(refused.contains("test job 7"), "{refused}");
    assert_eq!(cat.machines().unwrap().len(), 2, "nothing removed");
    cat.with(|c| c.execute("UPDATE jobs SET state = 'failed' WHERE id = 7", []))
        .unwrap();
    let creating = cat
        .begin_snapshot(&gone, crate::states::Consistency::Crash, "manual")
        .unwrap();
    let refused = cat.delete_machine(gone.as_str()).unwrap().unwrap_err();
    assert!(refused.contains("being taken"), "{refused}");
    cat.remove_snapshot(creating).unwrap();

    assert_eq!(cat.delete_machine(gone.as_str()).unwrap().unwrap().len(), 2);
    let left: Vec<String> = cat
        .machines()
        .unwrap()
        .into_iter()
        .map(|(m, _)| m.id)
        .collect();
    assert_eq!(left, [kept.as_str()]);
    for table in [
        "disks",
        "snapshots",
        "jobs",
        "blueprints",
        "retention",
        "lifecycle_log",
        "tokens",
        "plan_members",
    ] {
        let n: i64 = cat
            .with(|c| {
                c.query_row(
                    &format!("SELECT COUNT(*) FROM {table} WHERE machine_id = ?1"),
                    [gone.as_str()],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(n, 0, "{table} rows of the deleted machine");
    }
    let orphans: i64 = cat
        .with(|c| {
            c.query_row(
                "SELECT (SELECT COUNT(*) FROM job_log) + (SELECT COUNT(*) FROM snapshot_disks
                   WHERE snapshot_id NOT IN (SELECT id FROM snapshots))",
                [],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(orphans, 0);
    assert_eq!(cat.snapshots(kept.as_str()).unwrap().len(), 1);
    assert!(cat.blueprint(kept.as_str()).unwrap().is_some());
    let kept_in_plan: i64 = cat
        .with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM plan_members WHERE machine_id = ?1",
                [kept.as_str()],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(kept_in_plan, 1);
}

#[test]
fn a_version_5_catalog_gains_the_agents_life_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "{} PRAGMA user_version = 5;",
            LADDER[..5].join("\n")
        ))
        .unwrap();
        c.execute(
            "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at, lifecycle)
             VALUES ('m-00000000000000aa', 'old-host', x'01', x'02', 't', 1, 'archived')",
            [],
        )
        .unwrap();
    }
    let cat = Catalog::open(&path).unwrap();
    let (m, _) = cat.machines().unwrap().remove(0);
    assert_eq!(
        (m.hostname.as_str(), m.lifecycle.as_str()),
        ("old-host", "archived")
    );
    assert_eq!(
        (m.agent_version, m.detached_at, m.detached_reason),
        (None, None, None)
    );

    let id = MachineId::parse(&m.id).unwrap();
    cat.detach_machine(&id, "0.0.1", "agent uninstalled")
        .unwrap();
    let (m, _) = cat.machines().unwrap().remove(0);
    assert_eq!(m.agent_version.as_deref(), Some("0.0.1"));
    assert_eq!(m.detached_reason.as_deref(), Some("agent uninstalled"));
    assert!(m.detached_at.is_some());
    let log = cat.lifecycle_log(&m.id).unwrap();
    assert_eq!(
        (
            log[0].from.as_str(),
            log[0].to.as_str(),
            log[0].reason.as_str()
        ),
        ("archived", "archived", "agent uninstalled")
    );
    cat.agent_connected(&id, "0.0.2").unwrap();
    let (m, _) = cat.machines().unwrap().remove(0);
    assert_eq!(m.agent_version.as_deref(), Some("0.0.2"));
    assert_eq!((m.detached_at, m.detached_reason), (None, None));
}

#[test]
fn a_version_6_catalog_gains_recovery_plans() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "{} PRAGMA user_version = 6;",
            LADDER[..6].join("\n")
        ))
        .unwrap();
        c.execute(
            "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at)
             VALUES ('m-00000000000000bb', 'old-host', x'01', x'02', 't', 1)",
            [],
        )
        .unwrap();
    }
    let cat = Catalog::open(&path).unwrap();
    let tables: Vec<String> = cat
        .with(|c| {
            c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'plan%' ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .unwrap();
    assert_eq!(
        tables,
        [
            "plan_hooks",
            "plan_members",
            "plan_run_log",
            "plan_runs",
            "plans"
        ]
    );
    // The schema holds the bounds too: a step out of 1..=20 is refused by SQLite itself.
    let bad = cat.with(|c| {
        c.execute_batch(
            "INSERT INTO plans (id, name, created_at) VALUES (1, 'p', 1);
             INSERT INTO plan_members (plan_id, machine_id, step, added_at)
               VALUES (1, 'm-00000000000000bb', 21, 1);",
        )
    });
    assert!(bad.is_err());
    assert_eq!(cat.machines().unwrap()[0].0.hostname, "old-host");
}

#[test]
fn a_version_8_catalog_gains_plan_runs_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "{} PRAGMA user_version = 8;",
            LADDER[..8].join("\n")
        ))
        .unwrap();
        c.execute_batch(
            "INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at)
               VALUES ('m-00000000000000cc', 'old-host', x'01', x'02', 't', 1);
             INSERT INTO jobs (machine_id, mode, state, created_at, prev_lifecycle)
               VALUES ('m-00000000000000cc', 'test', 'succeeded', 1, 'ready-for-testing');
             INSERT INTO plans (id, name, created_at) VALUES (1, 'p', 1);
             INSERT INTO plan_members (plan_id, machine_id, step, added_at)
               VALUES (1, 'm-00000000000000cc', 1, 1);",
        )
        .unwrap();
    }
    let cat = Catalog::open(&path).unwrap();
    let job = cat.job(1).unwrap().unwrap();
    assert_eq!((job.plan_run, job.hostname.as_str()), (None, "old-host"));
    let plan = cat.plan("p").unwrap();
    assert_eq!(plan.steps[0].machines[0].source_action, None);
    let run = cat
        .begin_run("p", crate::states::RunMode::Drill, None)
        .unwrap()
        .unwrap();
    // One run of a plan at a time.
    let again = cat
        .begin_run("p", crate::states::RunMode::FailoverUnplanned, None)
        .unwrap();
    assert!(again.unwrap_err().contains("still running"));
    cat.log_run(run.id, Some("old-host"), "step", "a line")
        .unwrap();
    cat.finish_run(run.id, Some("why"), Some("old-host"))
        .unwrap();
    let r = cat.plan_run(run.id).unwrap().unwrap();
    assert_eq!(r.state, crate::states::JobState::Failed);
    assert_eq!(r.failed_machine.as_deref(), Some("old-host"));
    assert_eq!(
        cat.run_log(run.id, 0).unwrap()[0].machine.as_deref(),
        Some("old-host")
    );
    // A drill not cleaned up keeps its plan.
    assert!(cat.delete_plan("p").is_err());
    cat.set_run_cleaned(run.id).unwrap();
    cat.delete_plan("p").unwrap();
    assert_eq!(
        cat.plan_runs(Some("p")).unwrap().len(),
        1,
        "the run's record stays"
    );
}
