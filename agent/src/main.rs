//! `rehost-agent`: parses arguments, sets up logging, calls into the library.

#[cfg(test)]
mod cli_help;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rehost_agent::install::{install, InstallOptions};
use rehost_agent::replicate::{self, Agent, Options};
use rehost_agent::state::{AgentState, ConnectionState, Status, DEFAULT_STATE_DIR};

/// rehost agent: replicates this machine's disks, block by block over TLS, to a rehost
/// replication server. No kernel module, no reboot.
#[derive(Parser)]
#[command(name = "rehost-agent", version = rehost_agent::VERSION)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--state-dir`, the same for every command that reads or writes the agent's state.
#[derive(clap::Args)]
struct StateDir {
    /// The agent's state dir: its state and the machine's credential (as given to `install`).
    #[arg(long, default_value = DEFAULT_STATE_DIR, env = "REHOST_AGENT_STATE_DIR")]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Identify the disks, register with the server using an install token, and start replicating
    /// (as the systemd service `rehost-agent`, unless --no-service).
    Install {
        /// Replication server, HOST[:PORT] (port 1500 by default).
        #[arg(long)]
        server: String,
        /// Install token from `rehost-server token create` (a new machine), or from `token create
        /// --reinstall MACHINE` (re-registers that machine). Over an existing state dir for the
        /// same server, the machine's own credential is used instead and the token only vouches
        /// for the server.
        #[arg(long, env = "REHOST_TOKEN", hide_env_values = true)]
        token: String,
        /// Replicate exactly these block devices or image files (comma separated) instead of
        /// every disk found in /sys/block.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<PathBuf>>,
        /// Do not ask for confirmation.
        #[arg(long)]
        no_prompt: bool,
        /// Do not install a systemd service; run `rehost-agent run` yourself.
        #[arg(long)]
        no_service: bool,
        #[command(flatten)]
        dir: StateDir,
        /// Name to register under (default: the system hostname).
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Run the replication daemon in the foreground (what the service runs).
    Run {
        #[command(flatten)]
        dir: StateDir,
        /// Seconds between passes of the scan tracker once the initial sync is done.
        #[arg(long, default_value_t = 60)]
        scan_interval: u64,
        /// Hash/compress threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Cap replication bandwidth at this many megabits per second (default: unlimited).
        #[arg(long)]
        max_mbps: Option<u64>,
        /// Seconds between keepalive pings to the server (also the TCP keepalive interval).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        keepalive: u64,
        /// Seconds without any answer from the server, while data or a ping awaits one, after
        /// which the connection counts as stalled: the agent shows `stalled` and reconnects.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        stall_timeout: u64,
        /// Seconds between progress lines (percent, rate, time left) during an initial sync or
        /// rescan (default: 5 on a terminal, 20 otherwise).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        progress_interval: Option<u64>,
    },
    /// Internal: thaws MOUNTS unless the agent says so on stdin within --max-ms (started by the
    /// agent around each filesystem freeze, so no freeze outlives a killed agent).
    #[command(hide = true)]
    ThawGuard {
        /// Thaw after this many milliseconds unless told otherwise.
        #[arg(long)]
        max_ms: u64,
        /// Keep a freeze marker (JSON) at this path while the guard runs.
        #[arg(long)]
        marker: Option<PathBuf>,
        /// Mount points of the frozen filesystems.
        mounts: Vec<PathBuf>,
    },
    /// Remove the agent from this machine: stop it, tell the server (which marks the machine
    /// disconnected, "agent uninstalled", and keeps its replica and recovery points), remove the
    /// kernel trace instances it created, its systemd unit, the binary the installer placed and
    /// the state dir with the machine's credential. Safe to run again, or after an install that
    /// stopped half-way. Refused while a filesystem freeze is in progress.
    Uninstall {
        #[command(flatten)]
        dir: StateDir,
        /// Keep the state dir (and the machine's credential in it); remove everything else.
        #[arg(long)]
        keep_state: bool,
        /// Seconds a running agent has to stop after SIGTERM before it is killed.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        stop_timeout: u64,
    },
    /// Print the systemd unit that `install` writes (to review it, or to deploy the agent with
    /// configuration management).
    ServiceUnit {
        /// The state dir the service is to use.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The binary the service runs (default: where `install` places it).
        #[arg(long, default_value = rehost_agent::install::INSTALLED_BINARY)]
        binary: PathBuf,
    },
    /// Print the blake3 digest of devices or image files (to compare a source with its replica).
    Checksum {
        /// Block devices or image files; one `DIGEST  PATH` line is printed for each.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the replication state of each disk, as the running agent last reported it.
    Status {
        #[command(flatten)]
        dir: StateDir,
        /// Machine-readable output (format documented in the README).
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Status { .. } | Cmd::Checksum { .. } | Cmd::ServiceUnit { .. }
    ) {
        // The commands that only print end quietly when their reader goes away. `run` and
        // `install` keep SIGPIPE ignored: the daemon must not die with its log's pipe, and an
        // install stopped half-way would leave a registration without an agent.
        rehost_proto::process::die_quietly_on_sigpipe();
    }
    rehost_proto::process::init_logging("RUST_LOG", "info");
    if let Err(e) = real_main(cli) {
        eprintln!("rehost-agent: error: {e:#}");
        let fatal = e
            .downcast_ref::<replicate::RunError>()
            .is_some_and(|r| r.is_fatal());
        std::process::exit(if fatal {
            rehost_agent::install::EXIT_FATAL
        } else {
            1
        });
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start runtime")
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Install {
            server,
            token,
            devices,
            no_prompt,
            no_service,
            dir: StateDir { state_dir },
            hostname,
        } => {
            let opts = InstallOptions {
                server,
                token,
                devices,
                no_prompt,
                no_service,
                state_dir,
                hostname,
            };
            runtime()?.block_on(async { install(&opts, &mut std::io::stdout()).await.map(drop) })
        }
        Cmd::Run {
            dir: StateDir { state_dir },
            scan_interval,
            workers,
            max_mbps,
            keepalive,
            stall_timeout,
            progress_interval,
        } => {
            let state = AgentState::load(&state_dir)?;
            let workers = workers.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            });
            let opts = Options {
                scan_interval: Duration::from_secs(scan_interval.max(1)),
                workers,
                max_mbps,
                timeouts: rehost_agent::watchdog::Timeouts {
                    keepalive: Duration::from_secs(keepalive),
                    stall: Duration::from_secs(stall_timeout),
                },
                progress_every: progress_interval
                    .map(Duration::from_secs)
                    .unwrap_or_else(rehost_agent::progress::interval),
            };
            runtime()?.block_on(async {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    rehost_proto::process::terminated().await;
                    tracing::info!("stopping");
                    let _ = tx.send(true);
                });
                let agent = Agent::new(state_dir, state);
                replicate::run(agent, opts, rx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Cmd::Status {
            dir: StateDir { state_dir },
            json,
        } => status(&state_dir, json),
        Cmd::Uninstall {
            dir: StateDir { state_dir },
            keep_state,
            stop_timeout,
        } => {
            let mut opts = rehost_agent::uninstall::UninstallOptions::new(state_dir, keep_state);
            opts.stop_timeout = Duration::from_secs(stop_timeout);
            runtime()?.block_on(rehost_agent::uninstall::uninstall(
                &opts,
                &mut std::io::stdout(),
            ))
        }
        Cmd::ServiceUnit { state_dir, binary } => {
            if !state_dir.is_absolute() || !binary.is_absolute() {
                anyhow::bail!("--state-dir and --binary must be absolute paths");
            }
            print!("{}", rehost_agent::install::unit_text(&binary, &state_dir));
            Ok(())
        }
        Cmd::ThawGuard {
            max_ms,
            marker,
            mounts,
        } => rehost_agent::freeze::guard_main(
            Duration::from_millis(max_ms),
            &mounts,
            marker.as_deref(),
        )
        .context("thaw guard"),
        Cmd::Checksum { paths } => {
            for p in paths {
                // A block device is read with O_DIRECT, as the agent reads it: its page cache
                // can differ from the device while a filesystem is mounted from it.
                let direct = rehost_agent::tracker::kernel_dev(&p).is_some();
                let f = rehost_agent::direct::open_read(&p, direct)
                    .with_context(|| format!("open {}", p.display()))?;
                let (size, _) = rehost_agent::disks::size_of(&f, &p)?;
                let mut h = blake3::Hasher::new();
                let mut buf = rehost_agent::direct::Aligned::new(1 << 20);
                let mut off = 0u64;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], off)
                        .with_context(|| format!("read {} at {off}", p.display()))?;
                    h.update(&buf[..n]);
                    off += n as u64;
                }
                println!("{}  {}", h.finalize().to_hex(), p.display());
            }
            Ok(())
        }
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn status(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let state = AgentState::load(dir)?;
    let mut st = Status::load(dir)?.unwrap_or_else(|| Status {
        machine_id: state.machine_id.clone(),
        hostname: state.hostname.clone(),
        server: state.server.clone(),
        connection: ConnectionState::NeverStarted,
        agent_version: rehost_agent::VERSION.into(),
        ..Default::default()
    });
    let fresh = replicate::now() - st.updated_at <= 10;
    st.running = st.running && fresh && alive(st.pid);
    if !st.running
        && st.connection != ConnectionState::Failed
        && st.connection != ConnectionState::NeverStarted
    {
        st.connection = ConnectionState::Stopped;
        for d in &mut st.disks {
            d.state = rehost_proto::msg::ReplicationState::Disconnected;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!(
        "machine {} ({}) -> {}",
        st.machine_id, st.hostname, st.server
    );
    println!(
        "agent {}: {}{}",
        if st.agent_version.is_empty() {
            rehost_agent::VERSION
        } else {
            &st.agent_version
        },
        if st.running {
            format!("running (pid {}), ", st.pid)
        } else {
            "not running, ".into()
        },
        st.connection
    );
    if let Some(e) = &st.last_error {
        println!("last error: {e}");
    }
    if let Some(offer) = &st.uninstall_offer {
        println!("replication ended: {offer}");
    }
    if let Some(r) = &st.stall {
        println!("stalled: {r}");
    } else if let Some(r) = &st.last_stall {
        println!(
            "last stall: {} s ago: {}{}",
            (replicate::now() - r.at).max(0),
            r.reason,
            if r.reconnected { "; reconnected" } else { "" }
        );
    }
    if let Some(c) = &st.credential_conflict {
        println!(
            "WARNING ({} s ago): {}",
            (replicate::now() - c.at).max(0),
            c.message
        );
    }
    use rehost_agent::disks::human_bytes as hb;
    if st.disks.is_empty() {
        if st.connection == ConnectionState::NeverStarted {
            println!("replication: not started yet (start it with `rehost-agent run` or the rehost-agent service)");
        } else {
            println!("replication: no disk granted by the server yet");
        }
        return Ok(());
    }
    println!(
        "  {:<24} {:>10} {:<13} {:>7} {:>11} {:>11} {:>6} {:>11}",
        "DEVICE", "SIZE", "STATE", "PROG", "REPLICATED", "BACKLOG", "LAG", "SENT"
    );
    for d in &st.disks {
        println!(
            "  {:<24} {:>10} {:<13} {:>6.1}% {:>11} {:>11} {:>6} {:>11}",
            d.device,
            hb(d.size_bytes),
            d.state,
            d.progress_percent,
            hb(d.replicated_bytes),
            match (d.backlog_lower_bound, d.backlog_bytes) {
                (false, b) => hb(b),
                (true, 0) => "unknown".into(),
                (true, b) => format!(">={}", hb(b)),
            },
            d.lag_seconds
                .map(|l| format!("{l}s"))
                .unwrap_or_else(|| "-".into()),
            hb(d.sent_bytes)
        );
        match &d.start {
            Some(s) => println!(
                "    tracker: {}; this run began with {}: {}",
                d.tracker, s.kind, s.reason
            ),
            None if !d.tracker.is_empty() => println!("    tracker: {}", d.tracker),
            None => {}
        }
        if let Some(r) = &d.last_rescan {
            println!(
                "    last rescan{}: {}; scanned {}, {} differing blocks, sent {}",
                if r.finished { "" } else { " (running)" },
                r.reason,
                hb(r.scanned_bytes),
                r.differing_blocks,
                hb(r.sent_bytes)
            );
        }
    }
    Ok(())
}
