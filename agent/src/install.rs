//! `rehost-agent install`: identify the disks, show what will be replicated, register with the
//! server using the install token (whose pin authenticates the server), save the machine's own
//! credential (0600), and install the agent as a systemd service unless told not to.
//!
//! Over an existing state dir whose `agent.json` is for the same server, `install` reinstalls
//! that machine with its own credential (the token only vouches for the server): an install
//! token would make a new machine. Without the state dir, an operator's reinstall token
//! (`rehost-server token create --reinstall MACHINE`) re-registers the machine.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rehost_proto::msg::{Auth, DiskInfo, Hello};
use rehost_proto::token::InstallToken;

use crate::disks::{self, human_bytes, Disk};
use crate::state::{AgentState, Phase};

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub server: String,
    pub token: String,
    pub devices: Option<Vec<PathBuf>>,
    pub no_prompt: bool,
    pub no_service: bool,
    pub state_dir: PathBuf,
    pub hostname: Option<String>,
}

pub fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A stable identity for this source that is not derived from any hardware address: the OS
/// installation's machine-id and the name it registers under.
pub fn source_id(hostname: &str) -> [u8; 32] {
    let machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(b"rehost-source-v1\0");
    h.update(machine_id.trim().as_bytes());
    h.update(b"\0");
    h.update(hostname.as_bytes());
    *h.finalize().as_bytes()
}

fn with_port(server: &str) -> String {
    if server
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !server.ends_with(']')
    {
        server.to_string()
    } else {
        format!("{server}:{}", rehost_proto::DEFAULT_PORT)
    }
}

fn select_disks(opts: &InstallOptions, out: &mut impl Write) -> anyhow::Result<Vec<Disk>> {
    let chosen = match &opts.devices {
        Some(devs) => {
            let mut v = Vec::new();
            for d in devs {
                v.push(
                    disks::probe(d).with_context(|| format!("cannot replicate {}", d.display()))?,
                );
            }
            v
        }
        None => {
            let all = disks::discover().context("identify disks")?;
            writeln!(out, "Identified the following disks:")?;
            for d in &all {
                let what = match &d.skipped {
                    None => "will replicate".to_string(),
                    Some(why) => format!("skipped: {why} (name it with --devices to replicate it)"),
                };
                writeln!(
                    out,
                    "  {:<20} {:>10}  {:<24} {what}",
                    d.path.display(),
                    human_bytes(d.size_bytes),
                    d.model
                )?;
            }
            all.into_iter().filter(|d| d.skipped.is_none()).collect()
        }
    };
    if chosen.is_empty() {
        bail!("no disk to replicate (name the disks with --devices)");
    }
    let mut seen = std::collections::HashSet::new();
    for d in &chosen {
        if !seen.insert(d.path.clone()) {
            bail!("{} is named twice", d.path.display());
        }
    }
    writeln!(out, "Disks to replicate:")?;
    let mut total = 0;
    for d in &chosen {
        total += d.size_bytes;
        writeln!(
            out,
            "  {:<20} {:>10}  {}",
            d.path.display(),
            human_bytes(d.size_bytes),
            d.model
        )?;
    }
    writeln!(
        out,
        "  {} disk(s), {} in total",
        chosen.len(),
        human_bytes(total)
    )?;
    Ok(chosen)
}

fn confirm(out: &mut impl Write) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("cannot ask for confirmation: stdin is not a terminal (pass --no-prompt to install unattended)");
    }
    write!(out, "Continue with the installation? [y/N] ")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        bail!("installation cancelled");
    }
    Ok(())
}

/// Registers this machine and saves its state. Returns the state written.
pub async fn install(
    opts: &InstallOptions,
    out: &mut (impl Write + Send),
) -> anyhow::Result<AgentState> {
    let token = InstallToken::parse(&opts.token).context("read the install token")?;
    let server = with_port(&opts.server);
    writeln!(out, "rehost agent installer {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(
        out,
        "Replication server: {server} (identity pinned by the install token)"
    )?;
    let chosen = select_disks(opts, out)?;
    if !opts.no_prompt {
        confirm(out)?;
    }
    let hostname = opts.hostname.clone().unwrap_or_else(system_hostname);
    let existing = existing_machine(opts, &server, &token.server_pin, out)?;
    let auth = match &existing {
        Some((machine_id, secret)) => {
            write!(
                out,
                "Reinstalling machine {machine_id} with its own credential from {} (the token is not used)... ",
                opts.state_dir.join(crate::state::STATE_FILE).display()
            )?;
            Auth::Machine {
                machine_id: machine_id.clone(),
                secret: *secret,
            }
        }
        None => {
            write!(
                out,
                "Registering {hostname} with the replication server... "
            )?;
            Auth::Register {
                token_id: token.id,
                token_secret: token.secret,
                hostname: hostname.clone(),
                source_id: source_id(&hostname),
            }
        }
    };
    out.flush()?;
    let mut tls = crate::conn::connect(&server, token.server_pin)
        .await
        .context("reach the replication server")?;
    let hello = Hello {
        min_version: rehost_proto::MIN_PROTOCOL_VERSION,
        max_version: rehost_proto::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        detach: None,
        auth,
        disks: chosen
            .iter()
            .map(|d| DiskInfo {
                device: d.path.display().to_string(),
                size_bytes: d.size_bytes,
            })
            .collect(),
    };
    let welcome =
        crate::conn::handshake(&mut tls, hello)
            .await
            .with_context(|| match &existing {
                Some((m, _)) => format!(
                "reinstall machine {m} with the credential in {} (if the server no longer knows \
                 this machine, move that state dir away to register a new one, or install with a \
                 reinstall token)",
                opts.state_dir.display()
            ),
                None => "register with the replication server".to_string(),
            })?;
    // End the TLS session properly (close_notify), so the server sees a clean close.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    let secret = match (welcome.machine_secret, &existing) {
        (Some(s), _) => s,
        (None, Some((_, s))) => *s,
        (None, None) => bail!("the server registered us but sent no machine credential"),
    };
    writeln!(out, "done: machine {}", welcome.machine_id)?;
    let mut state = AgentState::new(
        server,
        &token.server_pin,
        welcome.machine_id.to_string(),
        &secret,
        hostname,
    );
    // Disks start with no local phase: if the server already holds data for them (a reinstall),
    // the first run rescans instead of trusting it blindly.
    for g in &welcome.disks {
        if g.durable_bytes == 0 && !g.sync_complete {
            state.set_disk(Path::new(&g.device), g.disk_id.0, Phase::InitialSync);
        } else {
            writeln!(
                out,
                "  {}: the server already holds {} of it; the agent will rescan it",
                g.device,
                human_bytes(if g.sync_complete {
                    g.size_bytes
                } else {
                    g.durable_bytes
                })
            )?;
        }
    }
    for d in &chosen {
        if state.disk(&d.path).is_none() {
            state.disks.push(crate::state::DiskState {
                device: d.path.clone(),
                disk_id: 0,
                phase: Phase::InitialSync,
            });
        }
    }
    state.save(&opts.state_dir).context("save agent state")?;
    writeln!(
        out,
        "Agent state saved in {} (machine credential readable by root only)",
        opts.state_dir.display()
    )?;
    if opts.no_service {
        let exe = std::env::current_exe().unwrap_or_else(|_| "rehost-agent".into());
        writeln!(
            out,
            "No service installed. Start replication with:\n  {} run --state-dir {}",
            exe.display(),
            opts.state_dir.display()
        )?;
    } else {
        install_service(&opts.state_dir, out)?;
    }
    Ok(state)
}

/// The machine of an intact `agent.json` in the state dir for this same server: its id and
/// credential. `None` (say why) when there is none or it is for another server.
fn existing_machine(
    opts: &InstallOptions,
    server: &str,
    pin: &[u8; 32],
    out: &mut impl Write,
) -> anyhow::Result<Option<(rehost_proto::MachineId, [u8; 32])>> {
    let state = match AgentState::load(&opts.state_dir) {
        Ok(s) => s,
        Err(crate::state::StateError::Missing(_)) => return Ok(None),
        Err(e) => {
            writeln!(
                out,
                "Ignoring the existing agent state ({:#}): registering with the token",
                anyhow::Error::from(e)
            )?;
            return Ok(None);
        }
    };
    if state.server != server || state.pin() != Some(*pin) {
        writeln!(
            out,
            "The existing agent state is for another server ({}): registering with the token",
            state.server
        )?;
        return Ok(None);
    }
    let machine = rehost_proto::MachineId::parse(&state.machine_id).ok();
    match (machine, state.secret()) {
        (Some(m), Some(s)) => Ok(Some((m, s))),
        _ => {
            writeln!(
                out,
                "The existing agent state holds no usable machine credential: registering with the token"
            )?;
            Ok(None)
        }
    }
}

fn install_service(state_dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("find the agent binary")?;
    let unit = format!(
        "[Unit]\nDescription=rehost replication agent\nAfter=network-online.target\nWants=network-online.target\n\n\
         [Service]\nExecStart={} run --state-dir {}\nRestart=always\nRestartSec=5\nLimitNOFILE=65536\nKillSignal=SIGTERM\nTimeoutStopSec=60\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        exe.display(),
        state_dir.display()
    );
    let path = Path::new("/etc/systemd/system/rehost-agent.service");
    if !Path::new("/run/systemd/system").exists() {
        bail!("systemd is not running here, so no service can be installed; rerun with --no-service and start `rehost-agent run` yourself");
    }
    rehost_proto::fsutil::write_atomic(path, unit.as_bytes(), 0o644)
        .with_context(|| format!("write {}", path.display()))?;
    for args in [
        &["daemon-reload"][..],
        &["enable", "--now", "rehost-agent.service"][..],
    ] {
        let st = std::process::Command::new("systemctl")
            .args(args)
            .status()
            .context("run systemctl")?;
        if !st.success() {
            bail!("systemctl {} failed ({st})", args.join(" "));
        }
    }
    writeln!(
        out,
        "Service rehost-agent installed and started (systemctl status rehost-agent)."
    )?;
    Ok(())
}
