//! `rehost-agent uninstall`: leaves nothing of the agent on the source. In order: refuse while a
//! filesystem freeze is in progress; stop the service (or a foreground `rehost-agent run` of this
//! state dir); tell the server, which marks the machine disconnected ("agent uninstalled") and
//! keeps its replica and recovery points; remove the kernel trace instances of this machine (and
//! no other), the systemd unit and the binary the installer placed; remove the state dir.
//!
//! Every step is skipped when there is nothing to do, so a second run, or a run on a machine
//! where `install` stopped half-way, ends cleanly and says what it found.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rehost_proto::msg::{Auth, Hello};
use rehost_proto::{MachineId, Message};

use crate::freeze::FreezeMarker;
use crate::install::{InstallManifest, UNIT_NAME, UNIT_PATH};
use crate::state::{AgentState, Status};

/// The reason the server records.
pub const REASON: &str = "agent uninstalled";

#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub state_dir: PathBuf,
    pub keep_state: bool,
    /// Where the unit would be (the tests point it elsewhere).
    pub unit_path: PathBuf,
    /// How long a running agent has to stop after SIGTERM before it is killed.
    pub stop_timeout: Duration,
}

impl UninstallOptions {
    pub fn new(state_dir: PathBuf, keep_state: bool) -> Self {
        Self {
            state_dir,
            keep_state,
            unit_path: PathBuf::from(UNIT_PATH),
            stop_timeout: Duration::from_secs(60),
        }
    }
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// The pid of a `rehost-agent run` of `state_dir`, from its status file, if that process lives
/// and really is one (a recycled pid is not).
fn running_agent(state_dir: &Path) -> Option<u32> {
    let st = Status::load(state_dir).ok().flatten()?;
    if st.pid == 0 || st.pid == std::process::id() {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", st.pid)).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let is_agent = args
        .first()
        .is_some_and(|a| a.ends_with("rehost-agent") || a == "/proc/self/exe");
    let is_run = args.iter().any(|a| a == "run");
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.into());
    let same_dir = match args.iter().position(|a| a == "--state-dir") {
        Some(i) => args
            .get(i + 1)
            .is_some_and(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.into()) == dir),
        None => dir == Path::new(crate::state::DEFAULT_STATE_DIR),
    };
    (is_agent && is_run && same_dir).then_some(st.pid)
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// SIGTERM, then SIGKILL after `timeout`; waits until the process is gone.
fn stop_process(pid: u32, timeout: Duration) -> anyhow::Result<bool> {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    kill(p, Signal::SIGTERM).with_context(|| format!("signal the agent (pid {pid})"))?;
    let start = Instant::now();
    while alive(pid) && !is_zombie(pid) {
        if start.elapsed() > timeout {
            let _ = kill(p, Signal::SIGKILL);
            let until = Instant::now() + Duration::from_secs(10);
            while alive(pid) && !is_zombie(pid) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

/// A process that has exited but not been reaped by its parent counts as gone.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|c| c == "Z"))
        })
        .unwrap_or(false)
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("systemctl")
        .args(args)
        .output()
        .context("run systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether the unit at `path` runs the agent of `state_dir`.
fn unit_is_ours(path: &Path, state_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let dir = state_dir.display().to_string();
    text.lines().any(|l| {
        l.starts_with("ExecStart=")
            && l.contains(" run ")
            && (l.contains(&format!("--state-dir {dir}"))
                || (!l.contains("--state-dir") && dir == crate::state::DEFAULT_STATE_DIR))
    })
}

/// Tells the server the agent is going away. `Ok(message)` says what became of it.
async fn tell_server(state: &AgentState) -> anyhow::Result<String> {
    let pin = state.pin().context("the saved server pin is damaged")?;
    let machine_id = MachineId::parse(&state.machine_id).context("the saved machine id")?;
    let secret = state
        .secret()
        .context("the saved machine credential is damaged")?;
    let mut tls = crate::conn::connect(&state.server, pin).await?;
    let hello = Hello {
        detach: Some(REASON.into()),
        ..crate::conn::hello(Auth::Machine { machine_id, secret }, [])
    };
    let reply = crate::conn::hello_reply(&mut tls, hello).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    match reply? {
        Message::Detach { .. } => Ok(format!(
            "the server marked machine {} disconnected ({REASON}); it keeps its replica and \
             recovery points until an operator archives or deletes the machine",
            state.machine_id
        )),
        Message::Welcome(w) => Ok(format!(
            "the server (rehost {}, protocol {}) is too old to record an uninstall: machine {} \
             shows there as disconnected",
            w.server_version, w.version, state.machine_id
        )),
        m => bail!("the server answered {} to the uninstall", m.kind()),
    }
}

/// The kernel trace instances of `machine` (named `rehost-<machine>-<disk id>`).
pub fn trace_instances(machine: &str) -> Vec<PathBuf> {
    let prefix = format!("rehost-{machine}-");
    let mut out = Vec::new();
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let Ok(entries) = std::fs::read_dir(Path::new(root).join("instances")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix(&prefix)
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
                && !out
                    .iter()
                    .any(|p: &PathBuf| p.file_name() == Some(e.file_name().as_os_str()))
            {
                out.push(e.path());
            }
        }
    }
    out
}

fn remove_trace_instance(path: &Path) -> std::io::Result<()> {
    let _ = std::fs::write(path.join("events/block/block_rq_complete/enable"), "0");
    let _ = std::fs::write(path.join("tracing_on"), "0");
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Runs the uninstall; prints each step to `out`. Errors only when something that exists could
/// not be removed (or a freeze is in progress): the steps before it stay done, and a rerun
/// continues.
pub async fn uninstall(
    opts: &UninstallOptions,
    out: &mut (impl Write + Send),
) -> anyhow::Result<()> {
    writeln!(out, "rehost agent uninstaller {}", crate::VERSION)?;
    let dir = &opts.state_dir;
    if let Some(m) = FreezeMarker::in_progress(dir) {
        bail!(
            "a filesystem freeze is in progress ({} frozen by agent pid {} for a consistency \
             point, at most {} ms, thaw guard pid {}): try again once it ends",
            m.mounts
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            m.agent_pid,
            m.cap_ms,
            m.guard_pid
        );
    }
    let state = match AgentState::load(dir) {
        Ok(s) => Some(s),
        Err(crate::state::StateError::Missing(_)) => None,
        Err(e) => {
            writeln!(
                out,
                "The agent state in {} cannot be read ({:#}): the server cannot be told and \
                 this machine's trace instances cannot be found",
                dir.display(),
                anyhow::Error::from(e)
            )?;
            None
        }
    };
    let manifest = InstallManifest::load(dir);
    let mut did = 0;

    // 1. Stop the agent.
    let unit = if unit_is_ours(&opts.unit_path, dir) {
        Some(opts.unit_path.clone())
    } else {
        None
    };
    if unit.is_some() && systemd_running() {
        systemctl(&["disable", "--now", UNIT_NAME])?;
        writeln!(out, "Stopped and disabled the {UNIT_NAME} service.")?;
        did += 1;
    }
    if let Some(pid) = running_agent(dir) {
        let killed = stop_process(pid, opts.stop_timeout)?;
        writeln!(
            out,
            "Stopped the agent (pid {pid}{}).",
            if killed {
                ", killed: it did not stop in time"
            } else {
                ""
            }
        )?;
        did += 1;
    }
    // A stop mid-freeze leaves the guard to thaw; wait for it rather than remove the state
    // under it.
    if let Some(m) = FreezeMarker::in_progress(dir) {
        let until = Instant::now() + Duration::from_millis(m.cap_ms) + Duration::from_secs(5);
        while FreezeMarker::in_progress(dir).is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // 2. Tell the server.
    if let Some(state) = &state {
        match tokio::time::timeout(Duration::from_secs(30), tell_server(state)).await {
            Ok(Ok(msg)) => {
                writeln!(out, "Told the server: {msg}.")?;
                did += 1;
            }
            Ok(Err(e)) => writeln!(
                out,
                "Could not tell the server {} ({e:#}); machine {} shows there as disconnected.",
                state.server, state.machine_id
            )?,
            Err(_) => writeln!(
                out,
                "The server {} did not answer within 30 s; machine {} shows there as disconnected.",
                state.server, state.machine_id
            )?,
        }
    }

    // 3. Kernel trace instances of this machine.
    if let Some(state) = &state {
        for inst in trace_instances(&state.machine_id) {
            remove_trace_instance(&inst)
                .with_context(|| format!("remove the kernel trace instance {}", inst.display()))?;
            writeln!(out, "Removed the kernel trace instance {}.", inst.display())?;
            did += 1;
        }
    }

    // 4. The unit and the binary the installer placed.
    if let Some(unit) = &unit {
        std::fs::remove_file(unit).with_context(|| format!("remove {}", unit.display()))?;
        if let Some(parent) = unit.parent() {
            let wants = parent.join("multi-user.target.wants").join(UNIT_NAME);
            let _ = std::fs::remove_file(wants);
        }
        if systemd_running() {
            systemctl(&["daemon-reload"])?;
        }
        writeln!(out, "Removed {}.", unit.display())?;
        did += 1;
    }
    if let Some(bin) = manifest.as_ref().and_then(|m| m.binary.clone()) {
        match std::fs::remove_file(&bin) {
            Ok(()) => {
                writeln!(out, "Removed {}.", bin.display())?;
                did += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", bin.display())),
        }
    }

    // 5. The state dir, credential included.
    if dir.exists() {
        if opts.keep_state {
            writeln!(
                out,
                "Kept {} (--keep-state): it holds the machine's credential.",
                dir.display()
            )?;
        } else {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
            writeln!(
                out,
                "Removed {} (agent state and credential).",
                dir.display()
            )?;
            did += 1;
        }
    }
    if did == 0 {
        writeln!(
            out,
            "Nothing to remove: no agent is installed with state dir {}.",
            dir.display()
        )?;
    } else {
        writeln!(out, "The rehost agent is uninstalled.")?;
    }
    Ok(())
}
