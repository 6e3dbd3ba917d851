//! The recovery point commands: `snapshot create|export|delete|verify`, `snapshots`, `gc` and
//! `retention`. Create, delete, GC and retention go through the admin API; export and verify read
//! the data dir directly (as the user that runs the server), holding the store's shared lock so
//! that GC waits for them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::client::AdminClient;
use crate::api::model::{
    CreateSnapshot, GcStats, GroupPoint, GroupPointList, RetentionView, SetRetention,
    SnapshotCreated, SnapshotDeleted, SnapshotInfo, SnapshotList,
};
use crate::catalog::Catalog;
use crate::human;
use crate::snapshot::export::export_raw;
use crate::snapshot::scrub::verify;
use crate::snapshot::select::select;
use crate::store::Store;
use anyhow::{bail, Context as _};
use clap::{Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a recovery point of all the machine's disks now (or, with --plan, one group point of
    /// every machine of a recovery plan).
    Create {
        /// Machine id or hostname.
        #[arg(required_unless_present = "plan", conflicts_with = "plan")]
        machine: Option<String>,
        /// One group point of every machine of this recovery plan: their agents freeze
        /// together, each marks its point, and all thaw once every mark has arrived (at most
        /// 1.5 s); if one cannot, every machine gets a crash-consistent point at one instant of
        /// its stream, and the point's note says why. Always waits for the group.
        #[arg(long, conflicts_with = "stream_point")]
        plan: Option<String>,
        /// Wait until the snapshot is complete and print it.
        #[arg(long)]
        wait: bool,
        /// Take the point where the replication stream stands, without asking the agent to
        /// freeze and drain first (crash-consistent at best; by default a connected agent makes
        /// the point: app-consistent where it can freeze the filesystems).
        #[arg(long)]
        stream_point: bool,
        /// Print the answer as JSON (with --wait: the complete snapshot).
        #[arg(long)]
        json: bool,
    },
    /// Write one disk of a snapshot to an image file, byte-identical to the disk at that point.
    Export {
        /// Machine id or hostname.
        machine: String,
        /// Snapshot id (as `snapshots` lists them), or `latest` for the newest complete one.
        snapshot: String,
        /// The disk's device (as listed by `machines`) or disk id; optional for one-disk machines.
        #[arg(long)]
        disk: Option<String>,
        /// The image file to write; an existing file is refused unless --force is given.
        #[arg(long)]
        output: PathBuf,
        /// Image format: raw (byte-identical to the disk) or qcow2 (converted with qemu-img).
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
        /// Permission bits of the image (octal). The default, 0600, keeps the disk's data from
        /// other local users; e.g. 0640 lets the file's group read it.
        #[arg(long, default_value = "0600", value_parser = parse_mode)]
        mode: u32,
        /// Overwrite --output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot; GC reclaims the space only it used.
    Delete {
        /// Machine id or hostname.
        machine: String,
        /// Snapshot id (as `snapshots` lists them), or `latest`.
        snapshot: String,
    },
    /// Re-read and re-hash every chunk and page of a snapshot; name what is damaged and which
    /// snapshots and byte ranges it affects, and quarantine damaged chunks (the next snapshot
    /// stores them again from the volume where it still has them). Exits non-zero on damage.
    Verify {
        /// Machine id or hostname.
        machine: String,
        /// Snapshot id, or `latest`.
        snapshot: String,
        /// Also restore damaged chunks now from the volume blocks the snapshots used, where the
        /// block still has that data (its blake3 is checked), and name the snapshots that stay
        /// damaged. Exits zero when everything was restored.
        #[arg(long)]
        repair: bool,
        /// Machine-readable output: the report, with what repair did under `repair`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum RetentionCmd {
    /// Show the policy that applies (to a machine, or server-wide).
    Show {
        /// This machine's policy (id or hostname): its own, or the server-wide one it inherits.
        #[arg(long)]
        machine: Option<String>,
    },
    /// Set the policy, e.g. `10m:1h,1h:24h,1d:7d` (EVERY:FOR,...) or `off`; server-wide unless
    /// --machine is given.
    Set {
        /// EVERY:FOR pairs, comma separated (units s, m, h, d), e.g. `10m:1h,1h:24h,1d:7d`; or
        /// `off` (no scheduled points).
        policy: String,
        /// Set it for this machine only (id or hostname), overriding the server-wide policy.
        #[arg(long)]
        machine: Option<String>,
    },
    /// Remove a machine's override (or the server-wide setting: back to the default).
    Reset {
        /// Remove this machine's override (id or hostname) instead of the server-wide setting.
        #[arg(long)]
        machine: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not a file mode like 0600 or 0640"))
}

pub fn print_list(l: &SnapshotList) {
    if l.snapshots.is_empty() {
        println!("no snapshots of {} yet", l.machine_id);
        return;
    }
    let now = crate::catalog::now();
    println!(
        "{:>6}  {:<19} {:<11} {:<6} {:<9} {:>11} {:>8}  REASON",
        "ID", "CREATED", "AGE", "CONS", "STATE", "ADDED", "TOOK"
    );
    for s in &l.snapshots {
        println!(
            "{:>6}  {:<19} {:<11} {:<6} {:<9} {:>11} {:>8}  {}",
            s.id,
            human::datetime(s.created_at),
            human::ago(s.created_at, now),
            s.consistency,
            s.state,
            human::bytes(s.bytes_added),
            s.duration_ms
                .map(|m| format!("{m}ms"))
                .unwrap_or_else(|| "-".into()),
            s.reason
        );
    }
}

fn open_local(data_dir: &Path) -> anyhow::Result<(Catalog, Store)> {
    let db = data_dir.join("catalog.sqlite");
    if !db.exists() {
        bail!(
            "no catalog in {}: has `rehost-server serve` run with this --data-dir?",
            data_dir.display()
        );
    }
    let catalog = Catalog::open(&db).context("open catalog")?;
    let store = Store::open(&data_dir.join("store")).context("open snapshot store")?;
    Ok((catalog, store))
}

fn find(catalog: &Catalog, machine: &str, snapshot: &str) -> anyhow::Result<SnapshotInfo> {
    let id = catalog
        .resolve_machine(machine)
        .context("read catalog")?
        .map_err(anyhow::Error::msg)?;
    let snaps = catalog.snapshots(id.as_str()).context("read catalog")?;
    let s = select(&snaps, snapshot).map_err(anyhow::Error::msg)?;
    if s.state != crate::states::SnapshotState::Complete {
        bail!("snapshot {} is {}, not complete", s.id, s.state);
    }
    Ok(s.clone())
}

pub fn run(cmd: &SnapshotCmd, admin: &str, data_dir: &Path) -> anyhow::Result<()> {
    let client = || AdminClient::new(admin, data_dir);
    match cmd {
        SnapshotCmd::Create {
            plan: Some(plan),
            json,
            ..
        } => {
            let g: GroupPoint = client()?.post_long(
                &format!("/v1/plans/{}/points", super::plans::seg(plan)),
                &(),
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                print_group(&g);
            }
            Ok(())
        }
        SnapshotCmd::Create {
            machine: None,
            plan: None,
            ..
        } => bail!("name a machine or a --plan"),
        SnapshotCmd::Create {
            machine: Some(machine),
            plan: None,
            wait,
            stream_point,
            json,
        } => {
            let v: SnapshotCreated = client()?.post_long(
                &format!("/v1/machines/{machine}/snapshots"),
                &CreateSnapshot {
                    wait: *wait,
                    stream_point: *stream_point,
                },
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if *wait {
                let SnapshotCreated::Complete(s) = v else {
                    bail!("POST /v1/machines/{machine}/snapshots: unexpected answer");
                };
                println!(
                    "snapshot {} of {} complete: {} disk(s), {} added, took {} ms",
                    s.id,
                    s.machine_id,
                    s.disks.len(),
                    human::bytes(s.bytes_added),
                    s.duration_ms.unwrap_or(0)
                );
            } else {
                let id = match &v {
                    SnapshotCreated::Requested(r) => &r.machine_id,
                    SnapshotCreated::Complete(s) => &s.machine_id,
                };
                println!("snapshot of {id} requested (see `rehost-server snapshots {machine}`)");
            }
            Ok(())
        }
        SnapshotCmd::Delete { machine, snapshot } => {
            let v: SnapshotDeleted = client()?.post(
                &format!("/v1/machines/{machine}/snapshots/{snapshot}/delete"),
                &serde_json::json!({}),
            )?;
            println!("snapshot {} deleted", v.deleted);
            Ok(())
        }
        SnapshotCmd::Export {
            machine,
            snapshot,
            disk,
            output,
            format,
            mode,
            force,
        } => {
            if !force && output.symlink_metadata().is_ok() {
                bail!(
                    "{} exists: give --force to overwrite it, or choose another --output",
                    output.display()
                );
            }
            let (catalog, store) = open_local(data_dir)?;
            let s = find(&catalog, machine, snapshot)?;
            let d = match disk {
                Some(want) => s
                    .disks
                    .iter()
                    .find(|d| &d.device == want || d.disk_id.to_string() == *want),
                None if s.disks.len() == 1 => s.disks.first(),
                None => bail!(
                    "snapshot {} has {} disks; choose one with --disk ({})",
                    s.id,
                    s.disks.len(),
                    s.disks
                        .iter()
                        .map(|d| d.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let d = d.with_context(|| {
                format!(
                    "snapshot {} has no disk {}",
                    s.id,
                    disk.as_deref().unwrap_or("")
                )
            })?;
            let root = d.root_id().context("damaged root id in the catalog")?;
            let raw_path = match format {
                Format::Raw => output.clone(),
                Format::Qcow2 => {
                    let mut p = output.clone().into_os_string();
                    p.push(".raw.partial");
                    PathBuf::from(p)
                }
            };
            // The raw file of a qcow2 export is ours alone; the image gets the asked mode.
            let raw_mode = match format {
                Format::Raw => *mode,
                Format::Qcow2 => 0o600,
            };
            // Without --force, an output that appeared since the check above is not overwritten
            // (the qcow2 path's `.raw.partial` is this command's own scratch file).
            let out = crate::private::create_with_mode(
                &raw_path,
                raw_mode,
                !force && raw_path == *output,
            )
            .with_context(|| format!("create {}", raw_path.display()))?;
            let start = Instant::now();
            let mut last = Instant::now();
            let mut progress = |done: u64, total: u64| {
                if last.elapsed() >= Duration::from_secs(1) || done == total {
                    last = Instant::now();
                    let pct = if total == 0 {
                        100.0
                    } else {
                        done as f64 * 100.0 / total as f64
                    };
                    eprint!(
                        "\rexport: {} of {} ({pct:.0}%)   ",
                        human::bytes(done),
                        human::bytes(total)
                    );
                    let _ = std::io::stderr().flush();
                }
            };
            let r = export_raw(&store, &root, &out, &raw_path, &mut progress);
            eprintln!();
            let stats = match r {
                Ok(st) => st,
                Err(e) => {
                    let _ = std::fs::remove_file(&raw_path);
                    return Err(e)
                        .with_context(|| format!("export snapshot {} disk {}", s.id, d.device));
                }
            };
            drop(out);
            if let Format::Qcow2 = format {
                // Made first with its mode, so the image is never readable by others meanwhile
                // (qemu-img writes into the existing file).
                crate::private::create_with_mode(output, *mode, !force)
                    .with_context(|| format!("create {}", output.display()))?;
                let st = std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw_path)
                    .arg(output)
                    .status();
                let _ = std::fs::remove_file(&raw_path);
                match st {
                    Ok(st) if st.success() => {
                        use std::os::unix::fs::PermissionsExt as _;
                        std::fs::set_permissions(output, std::fs::Permissions::from_mode(*mode))
                            .with_context(|| format!("set the mode of {}", output.display()))?;
                    }
                    Ok(st) => bail!("qemu-img convert to qcow2 failed: {st}"),
                    Err(e) => {
                        return Err(e).context("run qemu-img (install qemu-utils for qcow2 output)")
                    }
                }
            }
            eprintln!(
                "exported snapshot {} disk {} to {}: {} ({} of data) in {:.1} s",
                s.id,
                d.device,
                output.display(),
                human::bytes(stats.size_bytes),
                human::bytes(stats.data_bytes),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        SnapshotCmd::Verify {
            machine,
            snapshot,
            repair,
            json,
        } => {
            let (catalog, store) = open_local(data_dir)?;
            let s = find(&catalog, machine, snapshot)?;
            let (report, fix) = verify(&store, &catalog, data_dir, &s, *repair)
                .with_context(|| format!("verify snapshot {}", s.id))?;
            if *json {
                let mut v = serde_json::to_value(&report)?;
                v["repair"] = serde_json::to_value(&fix)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "snapshot {} of {}: {} disk(s), {} pages, {} chunk references, {} of chunk data checked",
                    s.id,
                    s.machine_id,
                    report.disks,
                    report.pages,
                    report.chunks,
                    human::bytes(report.bytes)
                );
                for r in &fix.repaired {
                    println!(
                        "REPAIRED chunk {} from {} of {} at byte {}",
                        r.chunk, r.device, r.machine_id, r.offset
                    );
                }
                for d in &report.damaged {
                    println!("DAMAGED {} {} ({}): {}", d.kind, d.id, d.path, d.problem);
                    for a in &d.affected {
                        println!(
                            "  snapshot {} of {} disk {} bytes {}..{}",
                            a.snapshot, a.machine_id, a.device, a.start, a.end
                        );
                    }
                }
                for q in &fix.quarantined {
                    println!(
                        "QUARANTINED chunk {q} (moved to {})",
                        store.quarantine_dir().display()
                    );
                }
                if *repair {
                    for sd in &fix.still_damaged {
                        println!(
                            "STAYS DAMAGED snapshot {} of {}: no volume holds {} any more",
                            sd.snapshot,
                            sd.machine_id,
                            sd.objects.join(", ")
                        );
                    }
                } else if !report.damaged.is_empty() {
                    println!("(`snapshot verify --repair` restores what the volumes still hold)");
                }
            }
            if !report.damaged.is_empty() {
                bail!(
                    "snapshot {} is damaged: {} object(s) unreadable",
                    s.id,
                    report.damaged.len()
                );
            }
            if !*json {
                println!("OK");
            }
            Ok(())
        }
    }
}

/// A group point in text: its id, consistency, window and skew, then each machine's point.
fn print_group(g: &GroupPoint) {
    let measured = match (g.window_ms, g.skew_ms) {
        (Some(w), Some(k)) => format!(", window {w} ms, mark skew {k} ms"),
        _ => String::new(),
    };
    println!(
        "group point {} of plan {}: {} machine(s), {}{measured}",
        g.id,
        g.group,
        g.snapshots.len(),
        g.consistency
    );
    for s in &g.snapshots {
        println!(
            "  {:<20} snapshot {:>6}  {:<5} {}",
            s.machine_id,
            s.id,
            s.consistency,
            human::datetime(s.completed_at.unwrap_or(s.created_at))
        );
    }
    println!("  {}", g.note);
}

/// `snapshots --plan NAME`: the plan's group points.
pub fn list_plan(admin: &str, data_dir: &Path, plan: &str, json: bool) -> anyhow::Result<()> {
    let l: GroupPointList = AdminClient::new(admin, data_dir)?
        .get(&format!("/v1/plans/{}/points", super::plans::seg(plan)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else if l.points.is_empty() {
        println!("no group points of plan {} yet", l.plan);
    } else {
        for g in &l.points {
            print_group(g);
        }
    }
    Ok(())
}

pub fn list(admin: &str, data_dir: &Path, machine: &str, json: bool) -> anyhow::Result<()> {
    let l: SnapshotList =
        AdminClient::new(admin, data_dir)?.get(&format!("/v1/machines/{machine}/snapshots"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        print_list(&l);
    }
    Ok(())
}

pub fn gc(admin: &str, data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let st: GcStats =
        AdminClient::new(admin, data_dir)?.post_long("/v1/gc", &serde_json::json!({}))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!(
            "gc: {} snapshots, {} live objects; removed {} objects ({}) and {} partial files in {} ms",
            st.snapshots,
            st.live_objects,
            st.removed_objects,
            human::bytes(st.removed_bytes),
            st.removed_partials,
            st.duration_ms
        );
    }
    Ok(())
}

pub fn retention(cmd: &RetentionCmd, admin: &str, data_dir: &Path) -> anyhow::Result<()> {
    let c = AdminClient::new(admin, data_dir)?;
    let v: RetentionView = match cmd {
        RetentionCmd::Show { machine } => match machine {
            Some(m) => c.get(&format!("/v1/retention?machine={m}"))?,
            None => c.get("/v1/retention")?,
        },
        RetentionCmd::Set { policy, machine } => c.post(
            "/v1/retention",
            &SetRetention {
                machine: machine.clone(),
                policy: Some(policy.clone()),
            },
        )?,
        RetentionCmd::Reset { machine } => c.post(
            "/v1/retention",
            &SetRetention {
                machine: machine.clone(),
                policy: None,
            },
        )?,
    };
    println!(
        "{}: {} ({})",
        v.machine_id.as_deref().unwrap_or("server"),
        v.policy,
        v.source
    );
    Ok(())
}
