//! The launch commands: `blueprint show|set`, `launch`, `jobs`, `mark`, `test revert` and
//! `machine history`, all through the admin API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::AdminClient;
use crate::api::model::{
    BlueprintChanges, BlueprintView, History, JobList, JobRow, JobView, LaunchRequest, MarkRequest,
    Marked, Reverted,
};
use crate::states::JobState;
use anyhow::bail;
use clap::{Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum BlueprintCmd {
    /// Show the target hardware and launch settings of a machine (its own, or the defaults).
    Show {
        /// Machine id or hostname.
        machine: String,
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Change some settings of a machine's blueprint; the others keep their values.
    Set {
        /// Machine id or hostname.
        machine: String,
        /// Virtual CPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Bus of the target's disks (the converter makes the guest able to boot from each).
        #[arg(long, value_enum)]
        disk_bus: Option<DiskBus>,
        /// NIC model.
        #[arg(long, value_enum)]
        nic: Option<Nic>,
        /// Firmware: bios, uefi (needs the ovmf package), or source (uefi when the source's boot
        /// disk is GPT with an EFI system partition).
        #[arg(long, value_enum)]
        boot: Option<Boot>,
        /// Format of the converted target image.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Parent of the per-job target dirs (default: DATA_DIR/targets); an absolute path.
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// none: image, qemu.sh and domain.xml only; qemu: the server starts the VM; libvirt:
        /// virsh define + start.
        #[arg(long, value_enum)]
        launch: Option<Launch>,
        /// user (QEMU user networking, isolated from production), bridge:NAME, or none.
        #[arg(long)]
        network: Option<String>,
        /// QEMU accelerator: auto (KVM when /dev/kvm opens), kvm, or tcg.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// Seconds the launched target gets to show its boot marker.
        #[arg(long)]
        boot_timeout: Option<u64>,
        /// Serial console text that means "booted" (repeat for several; replaces the list).
        #[arg(long = "boot-marker")]
        boot_markers: Vec<String>,
    },
}

macro_rules! value_enum {
    ($name:ident { $($v:ident),* }) => {
        #[derive(Clone, Copy, ValueEnum)]
        pub enum $name { $($v),* }
        impl $name {
            fn json(self) -> serde_json::Value {
                let v = self.to_possible_value().expect("no skipped variants");
                serde_json::Value::String(v.get_name().to_string())
            }
        }
    };
}
value_enum!(DiskBus { Virtio, Scsi, Nvme });
value_enum!(Nic { Virtio, E1000 });
value_enum!(Boot { Bios, Uefi, Source });
value_enum!(Format { Qcow2, Raw });
value_enum!(Launch {
    None,
    Qemu,
    Libvirt
});
value_enum!(Accel { Auto, Kvm, Tcg });

/// What `launch` takes.
#[derive(clap::Args)]
pub struct LaunchCmd {
    /// Machine id or hostname.
    machine: String,
    /// test: a target from a recovery point while replication goes on; cutover: the final one.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Snapshot id or `latest`. Default: the latest point for a test; for a cutover, a final
    /// point asked of the agent (the latest point if none comes within 60 s).
    #[arg(long)]
    snapshot: Option<String>,
    /// Planned failover (cutover only), done by the agent: `stop-services:UNIT[,UNIT...]`
    /// stops those systemd units before the final point (if that fails, nothing is cut over),
    /// `poweroff` powers the source off once the final point is taken.
    #[arg(long)]
    source_action: Option<String>,
    /// Cutover only: seconds the agent gets to make the final consistency point before the
    /// latest recovery point is used instead.
    #[arg(long, default_value_t = 60)]
    final_point_timeout: u64,
    /// Follow the job's progress log until it ends; exit non-zero if it failed.
    #[arg(long)]
    wait: bool,
    /// Print the job as JSON (with --wait: once it has ended, after its log).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Test,
    Cutover,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MarkState {
    ReadyForCutover,
    ReadyForTesting,
    Archived,
}

#[derive(Subcommand)]
pub enum TestCmd {
    /// Stop and remove the machine's test target (VM and images); back to ready-for-testing.
    Revert {
        /// Machine id or hostname.
        machine: String,
    },
}

/// A blueprint value as it is written on the command line and in JSON.
fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn print_blueprint(v: &BlueprintView) {
    let b = &v.blueprint;
    println!("blueprint of {} ({})", v.machine_id, v.source);
    println!("  cpus          {}", b.cpus);
    println!("  memory        {} MiB", b.memory_mib);
    println!("  disk bus      {}", name(&b.disk_bus));
    println!("  nic           {}", name(&b.nic));
    println!("  boot          {}", name(&b.boot));
    println!("  format        {}", b.format.name());
    println!(
        "  target dir    {}",
        b.target_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "DATA_DIR/targets".into())
    );
    println!("  launch        {}", name(&b.launch));
    println!("  network       {}", b.network);
    println!("  accel         {}", name(&b.accel));
    println!("  boot timeout  {} s", b.boot_timeout_s);
    println!("  boot markers  {}", b.boot_markers.join(", "));
}

pub fn blueprint(cmd: &BlueprintCmd, admin: &str, data_dir: &Path) -> anyhow::Result<()> {
    let client = AdminClient::new(admin, data_dir)?;
    match cmd {
        BlueprintCmd::Show { machine, json } => {
            let v: BlueprintView = client.get(&format!("/v1/machines/{machine}/blueprint"))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_blueprint(&v);
            }
        }
        BlueprintCmd::Set {
            machine,
            cpus,
            memory,
            disk_bus,
            nic,
            boot,
            format,
            target_dir,
            launch,
            network,
            accel,
            boot_timeout,
            boot_markers,
        } => {
            let mut ch = BlueprintChanges::new();
            let mut put = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    ch.insert(k.into(), v);
                }
            };
            put("cpus", cpus.map(Into::into));
            put("memory_mib", memory.map(Into::into));
            put("disk_bus", disk_bus.map(DiskBus::json));
            put("nic", nic.map(Nic::json));
            put("boot", boot.map(Boot::json));
            put("format", format.map(Format::json));
            if let Some(d) = target_dir {
                if !d.is_absolute() {
                    bail!(
                        "--target-dir {} is a relative path: give an absolute one (the server \
                         makes the dirs, and it does not run in this directory)",
                        d.display()
                    );
                }
                put("target_dir", Some(d.display().to_string().into()));
            }
            put("launch", launch.map(Launch::json));
            put("network", network.clone().map(Into::into));
            put("accel", accel.map(Accel::json));
            put("boot_timeout_s", boot_timeout.map(Into::into));
            if !boot_markers.is_empty() {
                put("boot_markers", Some(boot_markers.clone().into()));
            }
            if ch.is_empty() {
                bail!("nothing to change: give at least one setting (see `rehost-server blueprint set --help`)");
            }
            let v: BlueprintView = client.post(
                &format!("/v1/machines/{machine}/blueprint"),
                &serde_json::Value::Object(ch),
            )?;
            print_blueprint(&v);
        }
    }
    Ok(())
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the epoch.
pub(super) fn clock(ms: i64) -> String {
    let s = ms.div_euclid(1000);
    let (h, m, sec) = ((s / 3600) % 24, (s / 60) % 60, s % 60);
    format!("{h:02}:{m:02}:{sec:02}.{:03}", ms.rem_euclid(1000))
}

fn print_line(l: &crate::launch::LogLine, start_ms: i64) {
    println!(
        "{}  +{:>6.1}s  {:<10}  {}",
        clock(l.at_ms),
        (l.at_ms - start_ms) as f64 / 1000.0,
        l.step,
        l.message
    );
}

fn print_jobs(jobs: &[JobRow]) {
    if jobs.is_empty() {
        println!("no jobs yet (start one with `rehost-server launch MACHINE --mode test`)");
        return;
    }
    println!(
        "{:>5}  {:<20} {:<16} {:<8} {:<10} {:>8} {:<8} {:<7} {:<5}  RESULT",
        "JOB", "MACHINE", "HOST", "MODE", "STATE", "SNAPSHOT", "LAUNCH", "TARGET", "RUN"
    );
    for j in jobs {
        println!(
            "{:>5}  {:<20} {:<16} {:<8} {:<10} {:>8} {:<8} {:<7} {:<5}  {}",
            j.id,
            j.machine_id,
            j.hostname,
            j.mode,
            j.state,
            j.snapshot_id
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            j.launch,
            if j.active { "active" } else { "-" },
            j.plan_run
                .map(|r| format!("P{r}"))
                .unwrap_or_else(|| "-".into()),
            j.error
                .as_deref()
                .unwrap_or(if j.state == JobState::Succeeded {
                    "ok"
                } else {
                    ""
                })
        );
    }
}

/// Prints a job's log (all of it, or as it grows with `follow`); returns the job at the end.
fn show_job(client: &AdminClient, id: i64, follow: bool) -> anyhow::Result<JobRow> {
    let mut after = 0;
    let mut start_ms = None;
    let mut printed_head = false;
    loop {
        let v: JobView = client.get(&format!("/v1/jobs/{id}?after={after}"))?;
        if !printed_head {
            let j = &v.job;
            println!(
                "job {} — {} launch of {} ({}), {}",
                j.id, j.mode, j.hostname, j.machine_id, j.state
            );
            printed_head = true;
        }
        for l in &v.log {
            let s = *start_ms.get_or_insert(l.at_ms);
            print_line(l, s);
            after = l.seq;
        }
        if !follow || v.job.state != JobState::Running {
            // A last read catches lines written between the two reads of a finished job.
            if follow {
                let tail: JobView = client.get(&format!("/v1/jobs/{id}?after={after}"))?;
                for l in &tail.log {
                    print_line(l, start_ms.unwrap_or(l.at_ms));
                }
            }
            let j = v.job;
            match (j.state.as_str(), &j.error) {
                ("running", _) => println!("job {id} is running (follow it with --follow)"),
                ("failed", Some(e)) => println!("job {id} failed: {e}"),
                (state, _) => println!("job {id} {state}"),
            }
            return Ok(j);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn launch(cmd: &LaunchCmd, admin: &str, data_dir: &Path) -> anyhow::Result<()> {
    let LaunchCmd {
        machine,
        mode,
        snapshot,
        source_action,
        final_point_timeout,
        wait,
        json,
    } = cmd;
    let (wait, json) = (*wait, *json);
    let client = AdminClient::new(admin, data_dir)?;
    let mode = match *mode {
        Mode::Test => "test",
        Mode::Cutover => "cutover",
    };
    let job: JobRow = client.post(
        &format!("/v1/machines/{machine}/launch"),
        &LaunchRequest {
            mode: mode.into(),
            snapshot: snapshot.clone(),
            source_action: source_action.clone(),
            final_point_timeout_s: Some(*final_point_timeout),
        },
    )?;
    if json && !wait {
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(());
    }
    if !wait {
        println!(
            "job {} started: {mode} launch of {} (follow it with `rehost-server jobs {} --follow`)",
            job.id, job.hostname, job.id
        );
        return Ok(());
    }
    let end = show_job(&client, job.id, true)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    }
    if end.state != JobState::Succeeded {
        // The log above ends with the error; saying it a third time would not help.
        std::process::exit(1);
    }
    Ok(())
}

pub fn jobs(
    admin: &str,
    data_dir: &Path,
    job: Option<&str>,
    machine: Option<&str>,
    json: bool,
    follow: bool,
) -> anyhow::Result<()> {
    let client = AdminClient::new(admin, data_dir)?;
    if let Some(run) = job.and_then(|j| j.strip_prefix('P')) {
        let Ok(run) = run.parse::<i64>() else {
            bail!(
                "`{}` is neither a job id nor a plan run (P<number>)",
                job.unwrap_or_default()
            );
        };
        return super::plan_runs::show_run(&client, run, follow, json);
    }
    let job = match job {
        Some(j) => Some(j.parse::<i64>().map_err(|_| {
            anyhow::anyhow!("`{j}` is neither a job id nor a plan run (P<number>)")
        })?),
        None => None,
    };
    match job {
        Some(id) if json && !follow => {
            let v: JobView = client.get(&format!("/v1/jobs/{id}"))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Some(id) => {
            let end = show_job(&client, id, follow)?;
            if follow && end.state == JobState::Failed {
                std::process::exit(1);
            }
        }
        None => {
            let path = match machine {
                Some(m) => format!("/v1/jobs?machine={m}"),
                None => "/v1/jobs".into(),
            };
            let v: JobList = client.get(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_jobs(&v.jobs);
                if !v.plan_runs.is_empty() {
                    println!();
                    super::plan_runs::print_runs(&v.plan_runs);
                }
            }
        }
    }
    Ok(())
}

pub fn mark(admin: &str, data_dir: &Path, machine: &str, state: MarkState) -> anyhow::Result<()> {
    let state = match state {
        MarkState::ReadyForCutover => "ready-for-cutover",
        MarkState::ReadyForTesting => "ready-for-testing",
        MarkState::Archived => "archived",
    };
    let v: Marked = AdminClient::new(admin, data_dir)?.post(
        &format!("/v1/machines/{machine}/mark"),
        &MarkRequest {
            state: state.into(),
        },
    )?;
    println!("{}: {} -> {state}", v.machine_id, v.from);
    Ok(())
}

pub fn test(cmd: &TestCmd, admin: &str, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        TestCmd::Revert { machine } => {
            let v: Reverted = AdminClient::new(admin, data_dir)?.post(
                &format!("/v1/machines/{machine}/test/revert"),
                &serde_json::json!({}),
            )?;
            let removed = &v.removed;
            println!(
                "{}: test reverted, ready-for-testing{}",
                v.machine_id,
                if removed.is_empty() {
                    " (no test target was running)".to_string()
                } else {
                    format!(" ({})", removed.join("; "))
                }
            );
        }
    }
    Ok(())
}

pub fn history(c: &AdminClient, machine: &str, json: bool) -> anyhow::Result<()> {
    let v: History = c.get(&format!("/v1/machines/{machine}/history"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("lifecycle of {}", v.machine_id);
    for t in &v.transitions {
        // An event that left the lifecycle as it was (the agent was uninstalled).
        let states = if t.from == t.to {
            t.to.to_string()
        } else {
            format!("{} -> {}", t.from, t.to)
        };
        println!(
            "  {}  {states}  ({})",
            crate::human::datetime(t.at),
            t.reason
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(super::clock(0), "00:00:00.000");
        assert_eq!(super::clock(86_400_000 + 3_723_045), "01:02:03.045");
    }
}
