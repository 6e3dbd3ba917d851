//! The steps of a launch job after its cleanup: choose (or take) the recovery point, export its
//! disks, convert them with `rehost-converter`, and launch the target per the blueprint.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::MachineId;

use super::blueprint::{self, Blueprint, BootMode, LaunchMethod};
use super::{converter_path, target, JobLog, JobRow, LaunchOptions, StepError};
use crate::snapshot::{Consistency, SnapshotInfo};
use crate::states::JobMode;
use crate::states::SnapshotState;
use crate::task::blocking;
use crate::Shared;

pub(super) async fn choose_point(
    shared: &Arc<Shared>,
    log: &JobLog,
    job: &JobRow,
    machine: &MachineId,
    mode: JobMode,
    opts: &LaunchOptions,
) -> Result<SnapshotInfo, StepError> {
    let (s, m) = (shared.clone(), machine.to_string());
    let snaps = blocking(move || s.catalog.snapshots(&m).map_err(StepError::from)).await?;
    let latest = crate::snapshot::select::select(&snaps, "latest")
        .ok()
        .cloned();
    let describe = |p: &SnapshotInfo| {
        format!(
            "recovery point {} ({}, {}, taken at {})",
            p.id,
            p.consistency,
            p.reason,
            crate::human::datetime(p.completed_at.unwrap_or(p.created_at))
        )
    };
    let point = match (opts.snapshot.as_deref(), mode) {
        (Some(sel), _) => {
            let p = crate::snapshot::select::select(&snaps, sel)
                .map_err(StepError::Point)?
                .clone();
            if p.state != SnapshotState::Complete {
                return Err(StepError::Point(format!(
                    "snapshot {} is {}, not complete",
                    p.id, p.state
                )));
            }
            log.log("snapshot", format!("using the chosen {}", describe(&p)))
                .await;
            p
        }
        (None, JobMode::Test) => match latest {
            Some(p) => {
                log.log("snapshot", format!("using the latest {}", describe(&p)))
                    .await;
                p
            }
            None => {
                log.log("snapshot", "no recovery point yet: taking one")
                    .await;
                let p = crate::snapshot::request(
                    shared.clone(),
                    machine.clone(),
                    Consistency::Crash,
                    format!("test job {}", job.id),
                    true,
                )
                .await
                .map_err(StepError::Snapshot)?;
                log.log("snapshot", format!("snapshot end: {}", describe(&p)))
                    .await;
                p
            }
        },
        (None, JobMode::Cutover) => {
            log.log(
                "snapshot",
                "snapshot start: asking the agent for a final consistency point (freeze, drain, mark, thaw)",
            )
            .await;
            let t = Instant::now();
            let fresh = crate::snapshot::final_point(
                shared.clone(),
                machine.clone(),
                format!("cutover job {}", job.id),
                opts.final_point_timeout,
            )
            .await;
            let why = match fresh {
                Ok(p) => {
                    log.log(
                        "snapshot",
                        format!(
                            "snapshot end: final {} in {:.1} s, {} bytes added",
                            describe(&p),
                            t.elapsed().as_secs_f64(),
                            p.bytes_added
                        ),
                    )
                    .await;
                    return finish_point(shared, job, p).await;
                }
                Err(e) => rehost_proto::error::chain(&e),
            };
            let p = latest.ok_or_else(|| {
                StepError::Point(format!(
                    "snapshot fail: no final point ({why}) and no earlier recovery point"
                ))
            })?;
            log.log(
                "snapshot",
                format!(
                    "snapshot fail: no final point ({why}); using previous snapshot: {}",
                    describe(&p)
                ),
            )
            .await;
            p
        }
    };
    finish_point(shared, job, point).await
}

async fn finish_point(
    shared: &Arc<Shared>,
    job: &JobRow,
    p: SnapshotInfo,
) -> Result<SnapshotInfo, StepError> {
    let (s, id, sid) = (shared.clone(), job.id, p.id);
    blocking(move || s.catalog.set_job_snapshot(id, sid).map_err(StepError::from)).await?;
    Ok(p)
}

/// Exports every disk of the point into `dir`; returns the raw images, boot disk first.
pub(super) async fn export(
    shared: &Arc<Shared>,
    log: &JobLog,
    point: &SnapshotInfo,
    dir: &Path,
) -> Result<Vec<PathBuf>, StepError> {
    let (s, l, p, dir) = (
        shared.clone(),
        log.clone(),
        point.clone(),
        dir.to_path_buf(),
    );
    blocking(move || {
        let mut out = Vec::new();
        for d in &p.disks {
            let root = d.root_id().ok_or_else(|| {
                StepError::Point(format!("damaged root id of {} in the catalog", d.device))
            })?;
            let path = dir.join(format!("source-disk{}.raw", d.disk_id));
            let file = crate::private::create(&path).map_err(StepError::file("create", &path))?;
            l.line(
                "export",
                format!(
                    "exporting {} ({}) to {}",
                    d.device,
                    crate::human::bytes(d.size_bytes),
                    path.display()
                ),
            );
            let t = Instant::now();
            let mut next = 25;
            let stats = crate::snapshot::export::export_raw(
                &s.store,
                &root,
                &file,
                &path,
                &mut |done, total| {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    if pct >= next && pct < 100 {
                        l.line("export", format!("{}: {pct}%", d.device));
                        next = (pct / 25 + 1) * 25;
                    }
                },
            )
            .map_err(|error| StepError::Export {
                device: d.device.clone(),
                error,
            })?;
            l.line(
                "export",
                format!(
                    "{}: 100%, {} of data in {:.1} s",
                    d.device,
                    crate::human::bytes(stats.data_bytes),
                    t.elapsed().as_secs_f64()
                ),
            );
            out.push(path);
        }
        Ok(out)
    })
    .await
}

/// Runs `rehost-converter convert` on the exported images; returns its JSON report.
pub(super) async fn convert(
    shared: &Arc<Shared>,
    log: &JobLog,
    job: &JobRow,
    bp: &Blueprint,
    dir: &Path,
    sources: &[PathBuf],
) -> Result<serde_json::Value, StepError> {
    let (s, l, id, dir) = (shared.clone(), log.clone(), job.id, dir.to_path_buf());
    let name = safe_name(&job.hostname);
    let output = dir.join(format!("{name}.{}", bp.format.name()));
    let report = dir.join("conversion.json");
    // The converted image holds the source's data: made 0600 before the converter writes into
    // it (it keeps an existing file's mode). The converter's own umask is left alone: it
    // creates files inside the guest, whose modes must stay the guest's.
    crate::private::create(&output).map_err(StepError::file("create", &output))?;
    let mut cmd = Command::new(converter_path());
    cmd.arg("--work-dir")
        .arg(dir.join("work"))
        .arg("convert")
        .arg("--target")
        .arg("kvm-virtio")
        .arg("--format")
        .arg(bp.format.name())
        .arg("--output")
        .arg(&output)
        .arg("--report")
        .arg(&report);
    for src in sources {
        cmd.arg("--input").arg(src);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    blocking(move || {
        // Spawned and waited for on this one thread: PR_SET_PDEATHSIG follows the thread.
        let t = Instant::now();
        l.line(
            "convert",
            format!(
                "conversion start: {} (its own process)",
                converter_path().display()
            ),
        );
        let mut child = cmd.spawn().map_err(|e| {
            StepError::Conversion(format!("start {}: {e}", converter_path().display()))
        })?;
        let _ = s.catalog.set_job_child(id, Some(child.id()));
        let stderr = child.stderr.take();
        let step_log = l.clone();
        let err_reader = std::thread::spawn(move || {
            // The converter announces each step on stderr ("rehost-converter: copying ……"): those
            // lines go to the job log as they come; the rest is the error, if any.
            let mut e = String::new();
            if let Some(r) = stderr {
                for line in
                    std::io::BufRead::lines(std::io::BufReader::new(r)).map_while(Result::ok)
                {
                    match line.strip_prefix("rehost-converter: ") {
                        Some(step) if step.ends_with('…') => step_log.line("convert", step),
                        _ => {
                            e.push_str(&line);
                            e.push('\n');
                        }
                    }
                }
            }
            e
        });
        if let Some(out) = child.stdout.take() {
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok)
            {
                if !line.trim().is_empty() {
                    l.line("convert", line);
                }
            }
        }
        let status = child
            .wait()
            .map_err(|e| StepError::Conversion(format!("wait for the converter: {e}")))?;
        let _ = s.catalog.set_job_child(id, None);
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            let why = converter_failure(&err);
            for line in &why.log {
                l.line("convert", format!("converter: {line}"));
            }
            return Err(StepError::Conversion(match (status.code(), why.reason) {
                // Exit 3: the converter's own words say the image cannot be made bootable.
                (Some(3), Some(r)) => format!("conversion fail: {r}"),
                (_, Some(r)) => {
                    format!("conversion fail: rehost-converter exited with {status}: {r}")
                }
                (_, None) => format!(
                    "conversion fail: rehost-converter exited with {status} without saying why"
                ),
            }));
        }
        let text = std::fs::read_to_string(&report)
            .map_err(StepError::file("read the conversion report", &report))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            StepError::Conversion(format!("conversion report {}: {e}", report.display()))
        })?;
        // Every image private (the other disks' images were not made beforehand).
        for out in v["outputs"].as_array().into_iter().flatten() {
            if let Some(p) = out.as_str() {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| StepError::Conversion(format!("make {p} private: {e}")))?;
            }
        }
        l.line(
            "convert",
            format!(
                "conversion end: {} in {:.1} s (report {})",
                output.display(),
                t.elapsed().as_secs_f64(),
                report.display()
            ),
        );
        Ok(v)
    })
    .await
}

/// What a failed converter said on stderr: its error (the last `rehost-converter: ` line, without
/// the prefix, so that the job's error does not repeat it) and the lines before it (warnings) for
/// the job log.
struct ConverterFailure {
    reason: Option<String>,
    log: Vec<String>,
}

fn converter_failure(stderr: &str) -> ConverterFailure {
    let mut lines: Vec<String> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let last = lines
        .iter()
        .rposition(|l| l.starts_with("rehost-converter: "))
        .or(lines.len().checked_sub(1));
    let reason = last.map(|i| {
        let l = lines.remove(i);
        l.strip_prefix("rehost-converter: ")
            .map(str::to_string)
            .unwrap_or(l)
    });
    ConverterFailure { reason, log: lines }
}

/// A name made of `[A-Za-z0-9._-]` only (hostnames come from agents).
fn safe_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    if n.is_empty() || n.starts_with('.') {
        format!("m{n}")
    } else {
        n
    }
}

/// Whether the source booted with UEFI: a GPT boot disk with an EFI system (vfat) partition.
fn source_is_uefi(report: &serde_json::Value) -> bool {
    let d = &report["inspection"]["disks"][0];
    d["table"]["scheme"] == "gpt"
        && d["filesystems"]
            .as_array()
            .is_some_and(|fs| fs.iter().any(|p| p["fs"]["kind"] == "vfat"))
}

pub(super) async fn launch(
    log: &JobLog,
    job: &JobRow,
    mode: JobMode,
    bp: &Blueprint,
    dir: &Path,
    report: &serde_json::Value,
) -> Result<(), StepError> {
    let disks: Vec<PathBuf> = report["outputs"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter_map(|v| v.as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    if disks.is_empty() {
        return Err(StepError::Target(
            "the conversion report names no output image".into(),
        ));
    }
    let uefi = match bp.boot {
        BootMode::Bios => false,
        BootMode::Uefi => true,
        BootMode::Source => source_is_uefi(report),
    };
    let uefi = if uefi {
        let (code, vars) = blueprint::find_ovmf().ok_or_else(|| {
            StepError::Target(
                "UEFI boot needs the OVMF firmware in /usr/share/OVMF (apt-get install ovmf)"
                    .into(),
            )
        })?;
        let own = dir.join("OVMF_VARS.fd");
        std::fs::copy(&vars, &own)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600))
            })
            .map_err(StepError::file("copy", &vars))?;
        Some((code, own))
    } else {
        None
    };
    let t = blueprint::Target {
        name: format!(
            "rehost-{}-{}-{}",
            safe_name(&job.hostname),
            mode.as_str(),
            job.id
        ),
        disks,
        format: bp.format,
        serial_log: dir.join(target::SERIAL_LOG),
        pidfile: dir.join(target::PIDFILE),
        uefi,
        accel: bp.accel.resolve(),
    };
    let args = blueprint::qemu_args(bp, &t);
    let script = dir.join("qemu.sh");
    let xml = dir.join("domain.xml");
    std::fs::write(&script, blueprint::qemu_script(&args))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(StepError::file("write", &script))?;
    crate::private::create(&xml)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, blueprint::libvirt_xml(bp, &t).as_bytes())
        })
        .map_err(StepError::file("write", &xml))?;
    match bp.launch {
        LaunchMethod::None => {
            log.log(
                "launch",
                format!(
                    "target ready, not started (launch method none): {}; start it with {} or `virsh define {}`",
                    t.disks[0].display(),
                    script.display(),
                    xml.display()
                ),
            )
            .await;
            return Ok(());
        }
        LaunchMethod::Qemu => {
            log.log(
                "launch",
                format!("launch start: QEMU ({} accel, {})", t.accel, bp.network),
            )
            .await;
            let (d, a) = (dir.to_path_buf(), args.clone());
            let pid =
                blocking(move || target::start_qemu(&d, &a).map_err(StepError::Launch)).await?;
            log.log(
                "launch",
                format!(
                    "VM {} started (qemu pid {pid}); serial console {}",
                    t.name,
                    t.serial_log.display()
                ),
            )
            .await;
        }
        LaunchMethod::Libvirt => {
            log.log("launch", format!("launch start: libvirt domain {}", t.name))
                .await;
            let (d, x, n) = (dir.to_path_buf(), xml.clone(), t.name.clone());
            blocking(move || target::start_libvirt(&d, &x, &n).map_err(StepError::Launch)).await?;
            log.log("launch", format!("domain {} started", t.name))
                .await;
        }
    }
    log.log(
        "boot-check",
        format!(
            "waiting up to {} s for the boot marker ({}) on the serial console",
            bp.boot_timeout_s,
            bp.boot_markers.join(", ")
        ),
    )
    .await;
    let (serial, markers, timeout, d, method) = (
        t.serial_log.clone(),
        bp.boot_markers.clone(),
        Duration::from_secs(bp.boot_timeout_s),
        dir.to_path_buf(),
        bp.launch,
    );
    let name = t.name.clone();
    let boot = blocking(move || {
        let running = || match method {
            LaunchMethod::Libvirt => Command::new("virsh")
                .args(["domstate", &name])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("running")),
            _ => target::vm_pid(&d).is_some(),
        };
        target::watch_boot(&serial, &markers, timeout, &running).map_err(StepError::BootCheck)
    })
    .await?;
    log.log(
        "boot-check",
        format!(
            "target booted: {} after {:.1} s{}",
            boot.evidence,
            boot.seconds,
            boot.guest_ipv4
                .map(|a| format!("; guest address {a}"))
                .unwrap_or_default()
        ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_agents_are_made_safe() {
        assert_eq!(safe_name("web-1.example"), "web-1.example");
        assert_eq!(safe_name("../../etc"), "m.._.._etc");
        assert_eq!(safe_name(""), "m");
        assert_eq!(safe_name("a b/c"), "a_b_c");
    }

    #[test]
    fn the_converters_error_is_said_once() {
        let f = converter_failure(
            "  WARN rehost_converter::grub: no grub.cfg\n\nrehost-converter: the image cannot be made bootable on KVM/virtio: no Linux root filesystem found\n",
        );
        assert_eq!(
            f.reason.as_deref(),
            Some("the image cannot be made bootable on KVM/virtio: no Linux root filesystem found")
        );
        assert_eq!(f.log, ["WARN rehost_converter::grub: no grub.cfg"]);
        let f = converter_failure("killed\n");
        assert_eq!(f.reason.as_deref(), Some("killed"));
        assert!(converter_failure("").reason.is_none());
    }

    #[test]
    fn uefi_is_detected_from_the_report() {
        let gpt = serde_json::json!({"inspection": {"disks": [{"table": {"scheme": "gpt"},
            "filesystems": [{"fs": {"kind": "vfat"}}, {"fs": {"kind": "ext4"}}]}]}});
        assert!(source_is_uefi(&gpt));
        let mbr = serde_json::json!({"inspection": {"disks": [{"table": {"scheme": "mbr"},
            "filesystems": [{"fs": {"kind": "ext4"}}]}]}});
        assert!(!source_is_uefi(&mbr));
    }
}
