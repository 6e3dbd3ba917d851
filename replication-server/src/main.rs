//! `rehost-server`: parses arguments, sets up logging, calls into the library.

mod jobcmd;
mod snapcmd;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rehost_server::admin::{CreatedToken, MachinesView};
use rehost_server::client::AdminClient;

/// rehost replication server: receives block replication from rehost agents over TLS, keeps a
/// staging volume per source disk, and serves the operator commands below.
#[derive(Parser)]
#[command(name = "rehost-server", version)]
struct Cli {
    /// Data directory: certificates, admin credential, catalog, staging volumes.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/rehost",
        env = "REHOST_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Address of the running server's admin API (operator commands connect here; `serve`
    /// listens here unless --admin-listen says otherwise).
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:1501",
        env = "REHOST_ADMIN"
    )]
    admin: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server: TLS replication listener and the admin API.
    Serve {
        /// Where agents connect (TLS 1.3).
        #[arg(long, default_value = "0.0.0.0:1500")]
        listen: String,
        /// Where the admin API listens (default: the --admin address). Keep it on loopback.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Seconds between rounds of the recovery point scheduler (due points, expiry, GC);
        /// 0 turns scheduled points off.
        #[arg(long, default_value_t = 30)]
        snapshot_tick: u64,
        /// Connections that have not logged in yet (TLS handshake and Hello), at most, from all
        /// addresses together; more are closed at once. Logged-in agents do not count.
        #[arg(long, default_value_t = rehost_server::admission::Limits::default().max_unauthenticated as u64, value_parser = clap::value_parser!(u64).range(1..))]
        max_unauthenticated: u64,
        /// Connections that have not logged in yet, at most, from one source address (for IPv6,
        /// one /64); more are closed at once. Agents behind one NAT share this.
        #[arg(long, default_value_t = rehost_server::admission::Limits::default().max_unauthenticated_per_address as u64, value_parser = clap::value_parser!(u64).range(1..))]
        max_unauthenticated_per_address: u64,
    },
    /// Install tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Machines and the replication state of each disk.
    Machines {
        /// Machine-readable output (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Act on one machine.
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Recovery points: create, export, delete, verify.
    #[command(subcommand)]
    Snapshot(snapcmd::SnapshotCmd),
    /// List a machine's recovery points.
    Snapshots {
        /// Machine id or hostname.
        machine: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove store objects no snapshot references (the scheduler also does this).
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Retention policy of scheduled recovery points.
    #[command(subcommand)]
    Retention(snapcmd::RetentionCmd),
    /// A machine's target hardware and launch method (CPUs, memory, disk bus, NIC, boot mode,
    /// image format, target dir, launch method, network).
    #[command(subcommand)]
    Blueprint(jobcmd::BlueprintCmd),
    /// Launch a target VM from a recovery point: a test (replication goes on; a new test replaces
    /// the previous one) or the cutover (a final consistency point, then replication stops).
    Launch(jobcmd::LaunchCmd),
    /// Launch jobs, or one job's timestamped progress log.
    Jobs {
        /// A job id: show its progress log.
        job: Option<i64>,
        /// Only this machine's jobs (id or hostname).
        #[arg(long)]
        machine: Option<String>,
        /// Machine-readable output (format documented in the README).
        #[arg(long)]
        json: bool,
        /// Print the log as it grows until the job ends (exit status 1 if it failed).
        #[arg(long, requires = "job")]
        follow: bool,
    },
    /// Set a machine's lifecycle by hand: ready-for-cutover (after a good test),
    /// ready-for-testing, or archived (its agent is refused from then on).
    Mark {
        /// Machine id or hostname.
        machine: String,
        #[arg(value_enum)]
        state: jobcmd::MarkState,
    },
    /// Test launches.
    #[command(subcommand)]
    Test(jobcmd::TestCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an install token and print it (nothing else on stdout).
    Create {
        /// Expire the token after this long (e.g. 30m, 24h, 7d). Default: never.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
        /// A note shown by `token list`.
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// List install tokens (ids only; secrets are never shown again).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an install token: no new machine can register with it.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum MachineCmd {
    /// Revoke a machine's credential: its agent is disconnected and refused from now on.
    Revoke { machine_id: String },
    /// Cap the bandwidth a machine's agent uses for replication; a connected agent applies it at
    /// once, and it stays in force across reconnects until changed. 0 removes the cap.
    Throttle {
        /// Machine id or hostname.
        machine: String,
        /// Megabits per second (0: no cap).
        #[arg(long)]
        mbps: u64,
    },
    /// Every lifecycle transition of a machine, with its reason.
    History {
        /// Machine id or hostname.
        machine: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too long"))
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn time(t: Option<i64>) -> String {
    t.map(|t| format!("@{t}")).unwrap_or_else(|| "-".into())
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("rehost-server: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let client = || AdminClient::new(&cli.admin, &cli.data_dir);
    match &cli.cmd {
        Cmd::Serve {
            listen,
            admin_listen,
            snapshot_tick,
            max_unauthenticated,
            max_unauthenticated_per_address,
        } => serve(
            &cli,
            listen,
            admin_listen.as_deref().unwrap_or(&cli.admin),
            *snapshot_tick,
            rehost_server::admission::Limits {
                max_unauthenticated: usize::try_from(*max_unauthenticated).unwrap_or(usize::MAX),
                max_unauthenticated_per_address: usize::try_from(*max_unauthenticated_per_address)
                    .unwrap_or(usize::MAX),
            },
        ),
        Cmd::Snapshot(cmd) => snapcmd::run(cmd, &cli.admin, &cli.data_dir),
        Cmd::Snapshots { machine, json } => {
            snapcmd::list(&cli.admin, &cli.data_dir, machine, *json)
        }
        Cmd::Gc { json } => snapcmd::gc(&cli.admin, &cli.data_dir, *json),
        Cmd::Retention(cmd) => snapcmd::retention(cmd, &cli.admin, &cli.data_dir),
        Cmd::Blueprint(cmd) => jobcmd::blueprint(cmd, &cli.admin, &cli.data_dir),
        Cmd::Launch(cmd) => jobcmd::launch(cmd, &cli.admin, &cli.data_dir),
        Cmd::Jobs {
            job,
            machine,
            json,
            follow,
        } => jobcmd::jobs(
            &cli.admin,
            &cli.data_dir,
            *job,
            machine.as_deref(),
            *json,
            *follow,
        ),
        Cmd::Mark { machine, state } => jobcmd::mark(&cli.admin, &cli.data_dir, machine, *state),
        Cmd::Test(cmd) => jobcmd::test(cmd, &cli.admin, &cli.data_dir),
        Cmd::Machine(MachineCmd::History { machine, json }) => {
            jobcmd::history(&cli.admin, &cli.data_dir, machine, *json)
        }
        Cmd::Token(TokenCmd::Create {
            expires,
            description,
            json,
        }) => {
            let t: CreatedToken = client()?.post(
                "/v1/tokens",
                &serde_json::json!({ "description": description, "expires_in_seconds": expires }),
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::List { json }) => {
            let v: serde_json::Value = client()?.get("/v1/tokens")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<18} {:<12} {:<12} {:<9} {:>5}  DESCRIPTION",
                "ID", "CREATED", "EXPIRES", "STATUS", "USED"
            );
            for t in v["tokens"].as_array().into_iter().flatten() {
                let now = rehost_server::catalog::now();
                let status = if !t["revoked_at"].is_null() {
                    "revoked"
                } else if t["expires_at"].as_i64().is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<18} {:<12} {:<12} {:<9} {:>5}  {}",
                    t["id"].as_str().unwrap_or("?"),
                    time(t["created_at"].as_i64()),
                    time(t["expires_at"].as_i64()),
                    status,
                    t["registrations"].as_i64().unwrap_or(0),
                    t["description"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            let _: serde_json::Value =
                client()?.post(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}))?;
            println!("token {id} revoked");
            Ok(())
        }
        Cmd::Machine(MachineCmd::Throttle { machine, mbps }) => {
            let v: serde_json::Value = client()?.post(
                &format!("/v1/machines/{machine}/throttle"),
                &serde_json::json!({ "max_mbps": mbps }),
            )?;
            let now = if v["applied_now"] == true {
                "applied now"
            } else {
                "applies when its agent connects"
            };
            match v["max_mbps"].as_u64() {
                Some(m) => println!(
                    "{}: bandwidth capped at {m} Mbit/s ({now})",
                    v["machine_id"].as_str().unwrap_or("?")
                ),
                None => println!(
                    "{}: no bandwidth cap ({now})",
                    v["machine_id"].as_str().unwrap_or("?")
                ),
            }
            Ok(())
        }
        Cmd::Machine(MachineCmd::Revoke { machine_id }) => {
            let _: serde_json::Value = client()?.post(
                &format!("/v1/machines/{machine_id}/revoke"),
                &serde_json::json!({}),
            )?;
            println!("machine {machine_id} revoked");
            Ok(())
        }
        Cmd::Machines { json } => {
            let v: MachinesView = client()?.get("/v1/machines")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if v.machines.is_empty() {
                println!(
                    "no machines registered yet (create a token with `rehost-server token create`)"
                );
            }
            for m in &v.machines {
                let agent = match (&m.agent_address, m.revoked) {
                    (_, true) => "revoked".to_string(),
                    (Some(a), _) => format!("connected from {a}"),
                    (None, _) => format!("disconnected since {}", time(m.last_seen)),
                };
                println!(
                    "{}  {}  {}  agent {}",
                    m.machine_id, m.hostname, m.lifecycle, agent
                );
                println!(
                    "  {:<24} {:>10} {:<13} {:>7} {:>11} {:>11} {:>6}",
                    "DEVICE", "SIZE", "STATE", "PROG", "REPLICATED", "BACKLOG", "LAG"
                );
                for d in &m.disks {
                    println!(
                        "  {:<24} {:>10} {:<13} {:>6.1}% {:>11} {:>11} {:>6}",
                        d.device,
                        human_bytes(d.size_bytes),
                        d.state,
                        d.progress_percent,
                        human_bytes(d.replicated_bytes),
                        human_bytes(d.backlog_bytes),
                        d.lag_seconds
                            .map(|l| format!("{l}s"))
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
            Ok(())
        }
    }
}

fn serve(
    cli: &Cli,
    listen: &str,
    admin_listen: &str,
    snapshot_tick: u64,
    limits: rehost_server::admission::Limits,
) -> anyhow::Result<()> {
    // Every agent holds a socket and its disks' files open: the default soft limit (1,024) is
    // too low for a few hundred agents.
    match rehost_server::admission::raise_nofile_limit() {
        Ok(l) if l.soft > l.before => tracing::info!(
            from = l.before,
            to = l.soft,
            hard = l.hard,
            "raised the open-file limit"
        ),
        Ok(l) => tracing::info!(soft = l.soft, hard = l.hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    rt.block_on(async {
        let shared = rehost_server::open(&cli.data_dir)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen for agents on {listen}"))?;
        let admin = tokio::net::TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("listen for the admin API on {admin_listen}"))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            admin = %admin.local_addr()?,
            data_dir = %cli.data_dir.display(),
            "rehost-server ready"
        );
        if snapshot_tick > 0 {
            let tick = std::time::Duration::from_secs(snapshot_tick);
            tokio::spawn(rehost_server::retention::scheduler(shared.clone(), tick));
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        rehost_server::run_with_limits(shared, listener, admin, limits, shutdown).await
    })
}
