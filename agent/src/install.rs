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
use rehost_proto::msg::Auth;
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
    writeln!(out, "rehost agent installer {}", crate::VERSION)?;
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
    if existing.is_some() {
        if let Some(state) = upgrade_in_place(opts, &chosen) {
            writeln!(
                out,
                "Upgrading in place: machine {} keeps its identity and disks; the agent resumes \
                 from its saved state (a clean stop's dirty bitmap: no rescan)",
                state.machine_id
            )?;
            finish(opts, out)?;
            return Ok(state);
        }
    }
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
    let hello = crate::conn::hello(
        auth,
        chosen.iter().map(|d| (d.path.as_path(), d.size_bytes)),
    );
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
            state.disks.push(crate::state::DiskRecord {
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
    finish(opts, out)?;
    Ok(state)
}

/// The saved state, untouched, when this install only replaces the agent: same server (checked
/// by the caller), the same name if one is given, exactly the disks it already replicates (each
/// known to the server), and an agent that did not last end with a refusal (revoked, cut over:
/// then the server is asked, and says why). Nothing is sent to the server, so a clean stop
/// recorded there stays for the new agent's first start, which resumes from the saved dirty
/// bitmap.
fn upgrade_in_place(opts: &InstallOptions, chosen: &[Disk]) -> Option<AgentState> {
    let state = AgentState::load(&opts.state_dir).ok()?;
    let mut have: Vec<&Path> = state.disks.iter().map(|d| d.device.as_path()).collect();
    let mut want: Vec<&Path> = chosen.iter().map(|d| d.path.as_path()).collect();
    have.sort();
    want.sort();
    let same_name = opts.hostname.as_ref().is_none_or(|h| *h == state.hostname);
    let failed = crate::state::Status::load(&opts.state_dir)
        .ok()
        .flatten()
        .is_some_and(|s| s.connection == crate::state::ConnectionState::Failed);
    (same_name && !failed && have == want && state.disks.iter().all(|d| d.disk_id != 0))
        .then_some(state)
}

/// Installs (or restarts) the service, or says how to start the agent.
fn finish(opts: &InstallOptions, out: &mut impl Write) -> anyhow::Result<()> {
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
    Ok(())
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

pub const UNIT_NAME: &str = "rehost-agent.service";
pub const UNIT_PATH: &str = "/etc/systemd/system/rehost-agent.service";
/// Where `install` places the binary the service runs.
pub const INSTALLED_BINARY: &str = "/usr/local/sbin/rehost-agent";
/// The exit status of `rehost-agent run` on an error a restart cannot fix (a revoked or unknown
/// machine, a machine whose replication has ended, no common protocol version): the unit does
/// not restart on it.
pub const EXIT_FATAL: i32 = 3;

/// What `install` put on the machine outside the state dir and outside fixed paths (the unit
/// is always [`UNIT_PATH`]), for `uninstall`: `install.json` in the state dir.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct InstallManifest {
    /// The binary the installer copied into place (none when it ran from there already, or
    /// with `--no-service`).
    pub binary: Option<PathBuf>,
}

pub const MANIFEST_FILE: &str = "install.json";

impl InstallManifest {
    pub fn load(dir: &Path) -> Option<Self> {
        let raw = rehost_proto::fsutil::read_capped(&dir.join(MANIFEST_FILE), 1 << 16).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let data = serde_json::to_vec_pretty(self).expect("manifest serialises");
        rehost_proto::fsutil::write_atomic(&p, &data, 0o600)
            .with_context(|| format!("write {}", p.display()))
    }
}

/// The systemd unit `install` writes: the agent runs as root (it reads block devices, freezes
/// filesystems and creates kernel trace instances) in a read-only view of the system with only
/// its state dir writable.
///
/// - `KillMode=mixed`: a stop sends SIGTERM to the agent alone, which thaws what it froze and
///   exits; the thaw guard of a freeze in progress is not signalled and thaws when the agent is
///   gone (it ignores SIGTERM in any case).
/// - `Restart=on-failure` with at most 5 starts in 5 minutes, and no restart on exit status 3
///   (errors a restart cannot fix).
/// - No `PrivateDevices` (it reads the disks), no `ProtectKernelTunables` (tracefs under /sys
///   must stay writable), no capability filter (FIFREEZE and tracefs need CAP_SYS_ADMIN).
pub fn unit_text(exe: &Path, state_dir: &Path) -> String {
    format!(
        "[Unit]
Description=rehost replication agent
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
ExecStart={exe} run --state-dir {dir}
Restart=on-failure
RestartSec=5
RestartPreventExitStatus={EXIT_FATAL}
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=60
LimitNOFILE=65536
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={dir}
ProtectHome=read-only
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
",
        exe = exe.display(),
        dir = state_dir.display()
    )
}

/// Copies the running binary to [`INSTALLED_BINARY`] (atomically: a running agent keeps its
/// old file until it restarts). `None` when it runs from there already.
fn place_binary() -> anyhow::Result<Option<PathBuf>> {
    let exe = std::env::current_exe().context("find the agent binary")?;
    let target = Path::new(INSTALLED_BINARY);
    if std::fs::canonicalize(&exe).ok() == std::fs::canonicalize(target).ok() {
        return Ok(None);
    }
    let data = std::fs::read(&exe).with_context(|| format!("read {}", exe.display()))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    rehost_proto::fsutil::write_atomic(target, &data, 0o755)
        .with_context(|| format!("write {}", target.display()))?;
    Ok(Some(target.to_path_buf()))
}

fn install_service(state_dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let path = Path::new(UNIT_PATH);
    if !Path::new("/run/systemd/system").exists() {
        bail!("systemd is not running here, so no service can be installed; rerun with --no-service and start `rehost-agent run` yourself");
    }
    let placed = place_binary()?;
    let exe = placed
        .clone()
        .unwrap_or_else(|| PathBuf::from(INSTALLED_BINARY));
    let previous = InstallManifest::load(state_dir);
    InstallManifest {
        binary: placed.or(previous.and_then(|m| m.binary)),
    }
    .save(state_dir)?;
    let unit = unit_text(&exe, state_dir);
    rehost_proto::fsutil::write_atomic(path, unit.as_bytes(), 0o644)
        .with_context(|| format!("write {}", path.display()))?;
    // `restart` (not `start`): over a running agent, an upgrade takes effect now; the agent
    // stops cleanly and the new one resumes from its saved dirty bitmap.
    for args in [
        &["daemon-reload"][..],
        &["enable", UNIT_NAME][..],
        &["restart", UNIT_NAME][..],
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
