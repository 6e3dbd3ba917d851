//! `rehost-server`: parses arguments, sets up logging, calls into the library.

#[cfg(test)]
mod cli_help;
mod jobcmd;
mod snapcmd;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rehost_server::admin::{CreatedToken, MachinesView};
use rehost_server::client::AdminClient;
use rehost_server::human;

/// rehost replication server: receives block replication from rehost agents over TLS, keeps a
/// staging volume per source disk, and serves the operator commands below.
#[derive(Parser)]
#[command(name = "rehost-server", version)]
struct Cli {
    /// Data directory: certificates, admin credential, catalog, staging volumes.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "/var/lib/rehost",
        env = "REHOST_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Address of the running server's admin API (operator commands connect here; `serve`
    /// listens here unless --admin-listen says otherwise). A loopback address is plain HTTP;
    /// any other is HTTPS, checked against the server CA (the data dir's ca.crt, or
    /// --admin-ca). `https://HOST:PORT` asks for HTTPS on loopback too (e.g. a server that
    /// listens on 0.0.0.0).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "127.0.0.1:1501",
        env = "REHOST_ADMIN"
    )]
    admin: String,
    /// CA certificate (PEM) that the admin API's HTTPS certificate must chain to (default: ca.crt
    /// in --data-dir). For operator commands run away from the server's data dir.
    #[arg(long, global = true, env = "REHOST_ADMIN_CA")]
    admin_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `rehost-server serve`: where it listens and how it runs.
#[derive(clap::Args)]
struct ServeArgs {
    /// Where agents connect (TLS 1.3).
    #[arg(long, default_value = "0.0.0.0:1500")]
    listen: String,
    /// Where the admin API listens (default: the --admin address). On a loopback address it
    /// serves plain HTTP (HTTPS if given as https://HOST:PORT); on any other (0.0.0.0
    /// included) only HTTPS, with a certificate
    /// issued at start by the server CA for that address (every local address for
    /// 0.0.0.0), the host name and each --admin-cert-san. Plain HTTP is never served off
    /// loopback.
    #[arg(long)]
    admin_listen: Option<String>,
    /// An extra name (DNS name or IP address) for the admin API's HTTPS certificate, e.g. the
    /// name operators or Prometheus use to reach it. Repeatable.
    #[arg(long = "admin-cert-san", value_name = "NAME")]
    admin_cert_san: Vec<String>,
    /// Serve /metrics without a credential. This shows machine ids, device paths, disk
    /// sizes and replication states to anyone who can reach the admin address. Without it,
    /// /metrics needs the metrics token (see `metrics-token`) or the admin credential.
    #[arg(long)]
    metrics_public: bool,
    /// Seconds between rounds of the recovery point scheduler (due points, expiry, GC);
    /// 0 turns scheduled points off.
    #[arg(long, default_value_t = 30)]
    snapshot_tick: u64,
    /// How often to scrub the snapshot store (re-read every chunk complete recovery points
    /// use, quarantine damaged ones, restore them from the volumes where they still hold
    /// the data; result in /metrics), e.g. 12h or 7d; 0 turns it off.
    #[arg(long, default_value = "24h", value_parser = rehost_server::snapshot::scrub::parse_interval)]
    scrub_interval: std::time::Duration,
    /// The largest disk an agent may declare, e.g. 64TiB, 500GiB, 2T (binary units) or a
    /// byte count; a larger one is refused at the handshake (OutOfRange).
    #[arg(long, default_value = "64TiB", value_parser = parse_size)]
    max_disk_size: u64,
    /// Connections that have not logged in yet (TLS handshake and Hello), at most, from all
    /// addresses together; more are closed at once. Logged-in agents do not count.
    #[arg(long, default_value_t = rehost_server::admission::Limits::default().max_unauthenticated as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated: u64,
    /// Connections that have not logged in yet, at most, from one source address (for IPv6,
    /// one /64); more are closed at once. Agents behind one NAT share this.
    #[arg(long, default_value_t = rehost_server::admission::Limits::default().max_unauthenticated_per_address as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated_per_address: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server: TLS replication listener and the admin API.
    Serve(ServeArgs),
    /// Install tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print the read-only metrics token (metrics.token in the data dir, 0600; created if
    /// missing). Prometheus sends it as `Authorization: Bearer` (`authorization: {credentials_file:
    /// ...}` or `bearer_token_file`); it opens /metrics and nothing else. Works with or without a
    /// running server, as the user that runs `serve`.
    MetricsToken {
        /// Replace the token with a new one; the old one stops working at once.
        #[arg(long)]
        rotate: bool,
    },
    /// Machines and the replication state of each disk.
    Machines {
        /// Machine-readable output (format documented in the README).
        #[arg(long)]
        json: bool,
        /// Only machines whose agent (the one last seen) is older than this server, with the
        /// version each runs.
        #[arg(long)]
        outdated: bool,
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
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Remove store objects no snapshot references (the scheduler also does this).
    Gc {
        /// Print JSON instead of text (format documented in the README).
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
        /// The lifecycle state to set.
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
        /// Make a reinstall token for this existing machine (id or hostname) instead: used once,
        /// it re-registers that machine (same id, disks and replica; a new credential). Needed
        /// only when the agent's state dir is lost: `install` over an intact state dir uses the
        /// machine's own credential. Refused for a revoked machine (`machine unrevoke` first).
        #[arg(long, value_name = "MACHINE")]
        reinstall: Option<String>,
        /// Print JSON (id, token, expiry) instead of the token alone.
        #[arg(long)]
        json: bool,
    },
    /// List install tokens (ids only; secrets are never shown again).
    List {
        /// Print JSON instead of text (format documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Revoke an install token: no new machine can register with it.
    Revoke {
        /// Token id, as `token list` shows it (not the secret token).
        id: String,
    },
}

#[derive(Subcommand)]
enum MachineCmd {
    /// Revoke a machine's credential: its agent is disconnected and refused from now on (no
    /// install or reinstall token undoes this; `machine unrevoke` does).
    Revoke {
        /// Machine id (as `machines` shows it).
        machine_id: String,
    },
    /// Lift a machine's revocation: its agent (with the credential it has) may connect again.
    Unrevoke {
        /// Machine id or hostname.
        machine: String,
    },
    /// Cap the bandwidth a machine's agent uses for replication; a connected agent applies it at
    /// once, and it stays in force across reconnects until changed. 0 removes the cap.
    Throttle {
        /// Machine id or hostname.
        machine: String,
        /// Megabits per second (0: no cap).
        #[arg(long)]
        mbps: u64,
    },
    /// Delete a machine for good: its staging volumes, its recovery points (then garbage
    /// collection frees the store data only they used) and its catalog rows (disks, reinstall
    /// tokens, jobs, history). Launched targets in the target dir are left alone. Refused while
    /// its agent is connected and while a launch job of it runs.
    Delete {
        /// Machine id or hostname.
        machine: String,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Every lifecycle transition of a machine, with its reason.
    History {
        /// Machine id or hostname.
        machine: String,
        /// Print JSON instead of text (format documented in the README).
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

/// `64TiB`, `500GiB`, `2T`, `1048576`: binary units (K, M, G, T, P, with or without `iB`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 64TiB, 500GiB or 1048576"))?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            return Err(format!(
                "unknown unit in `{s}` (use K, M, G, T or P, e.g. 64TiB)"
            ))
        }
    };
    match n.checked_mul(1u64 << shift) {
        Some(0) | None => Err(format!("`{s}` is not a usable size")),
        Some(v) => Ok(v),
    }
}

fn time(t: Option<i64>) -> String {
    t.map(human::datetime).unwrap_or_else(|| "-".into())
}

/// Restores the default action of SIGPIPE: an operator command whose reader goes away
/// (`rehost-server token list | head -3`) ends quietly, as `ls` or `cat` do. Rust starts
/// programs with SIGPIPE ignored, which turns that into an EPIPE error and a panic in `println!`.
/// `serve` keeps SIGPIPE ignored: a server must not die because the pipe of its log closed.
fn die_quietly_on_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action
    // for SIGPIPE and no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        die_quietly_on_sigpipe();
    }
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
    if let Some(ca) = &cli.admin_ca {
        rehost_server::client::set_admin_ca(ca.clone());
    }
    let client = || AdminClient::new(&cli.admin, &cli.data_dir);
    match &cli.cmd {
        Cmd::Serve(args) => serve(&cli, args),
        Cmd::MetricsToken { rotate } => {
            if !cli.data_dir.is_dir() {
                anyhow::bail!(
                    "data dir {} does not exist (start `rehost-server serve` once, or point \
                     --data-dir at its data dir)",
                    cli.data_dir.display()
                );
            }
            let t = rehost_server::pki::metrics_token(&cli.data_dir, *rotate)
                .context("read or create the metrics token")?;
            println!("{t}");
            Ok(())
        }
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
        Cmd::Machine(MachineCmd::Delete { machine, yes }) => {
            delete_machine(&client()?, machine, *yes)
        }
        Cmd::Machine(MachineCmd::History { machine, json }) => {
            jobcmd::history(&cli.admin, &cli.data_dir, machine, *json)
        }
        Cmd::Token(TokenCmd::Create {
            expires,
            description,
            reinstall,
            json,
        }) => {
            // A reinstall token is bound to its machine; either reply carries `token`.
            let (token, text) = match reinstall {
                Some(machine) => {
                    let t: rehost_server::auth::CreatedReinstallToken = client()?.post(
                        &format!("/v1/machines/{machine}/reinstall-token"),
                        &serde_json::json!({ "description": description, "expires_in_seconds": expires }),
                    )?;
                    (t.token.clone(), serde_json::to_string_pretty(&t)?)
                }
                None => {
                    let t: CreatedToken = client()?.post(
                        "/v1/tokens",
                        &serde_json::json!({ "description": description, "expires_in_seconds": expires }),
                    )?;
                    (t.token.clone(), serde_json::to_string_pretty(&t)?)
                }
            };
            println!("{}", if *json { text } else { token });
            Ok(())
        }
        Cmd::Token(TokenCmd::List { json }) => {
            let v: serde_json::Value = client()?.get("/v1/tokens")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<18} {:<19} {:<19} {:<9} {:>5}  DESCRIPTION",
                "ID", "CREATED", "EXPIRES", "STATUS", "USED"
            );
            for t in v["tokens"].as_array().into_iter().flatten() {
                let now = rehost_server::catalog::now();
                let status = if !t["revoked_at"].is_null() {
                    "revoked"
                } else if !t["machine_id"].is_null() && t["registrations"].as_i64() > Some(0) {
                    "used"
                } else if t["expires_at"].as_i64().is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<18} {:<19} {:<19} {:<9} {:>5}  {}",
                    t["id"].as_str().unwrap_or("?"),
                    time(t["created_at"].as_i64()),
                    t["expires_at"]
                        .as_i64()
                        .map(human::datetime)
                        .unwrap_or_else(|| "never".into()),
                    status,
                    t["registrations"].as_i64().unwrap_or(0),
                    match t["machine_id"].as_str() {
                        Some(m) =>
                            format!("reinstall {m} {}", t["description"].as_str().unwrap_or("")),
                        None => t["description"].as_str().unwrap_or("").to_string(),
                    }
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
        Cmd::Machine(MachineCmd::Unrevoke { machine }) => {
            let v: serde_json::Value = client()?.post(
                &format!("/v1/machines/{machine}/unrevoke"),
                &serde_json::json!({}),
            )?;
            let id = v["machine_id"].as_str().unwrap_or("?");
            if v["unrevoked"] == true {
                println!("machine {id} unrevoked: its agent may connect again");
            } else {
                println!("machine {id} was not revoked");
            }
            Ok(())
        }
        Cmd::Machines { json, outdated } => {
            let mut v: MachinesView = client()?.get("/v1/machines")?;
            if *outdated {
                let server = v.server_version.clone();
                v.machines.retain(|m| {
                    m.agent_version
                        .as_deref()
                        .and_then(|a| rehost_server::admin::older_version(a, &server))
                        == Some(true)
                });
                if !*json {
                    if v.machines.is_empty() {
                        println!("no machine runs an agent older than this server ({server})");
                    }
                    for m in &v.machines {
                        println!(
                            "{}  {}  agent {} (server {server}){}",
                            m.machine_id,
                            m.hostname,
                            m.agent_version.as_deref().unwrap_or("?"),
                            if m.connected { "" } else { "  disconnected" }
                        );
                    }
                    return Ok(());
                }
            }
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
                    (None, _) => match m.last_seen {
                        Some(t) if m.disconnected_reason.is_some() => format!(
                            "disconnected ({}) since {}",
                            m.disconnected_reason.as_deref().unwrap_or_default(),
                            human::when(t, rehost_server::catalog::now())
                        ),
                        Some(t) => format!(
                            "disconnected since {}",
                            human::when(t, rehost_server::catalog::now())
                        ),
                        None => "never connected".to_string(),
                    },
                };
                println!(
                    "{}  {}  {}  agent {}{}{}",
                    m.machine_id,
                    m.hostname,
                    m.lifecycle,
                    m.agent_version
                        .as_ref()
                        .map(|v| format!("{v} "))
                        .unwrap_or_default(),
                    agent,
                    m.duplicate_of
                        .as_ref()
                        .map(|d| format!("  (duplicate of {d}: same hostname or source id)"))
                        .unwrap_or_default()
                );
                println!(
                    "  {:<24} {:>10} {:<13} {:>7} {:>11} {:>11} {:>6}",
                    "DEVICE", "SIZE", "STATE", "PROG", "REPLICATED", "BACKLOG", "LAG"
                );
                for d in &m.disks {
                    println!(
                        "  {:<24} {:>10} {:<13} {:>6.1}% {:>11} {:>11} {:>6}",
                        d.device,
                        human::bytes(d.size_bytes),
                        d.state,
                        d.progress_percent,
                        human::bytes(d.replicated_bytes),
                        match (d.backlog_lower_bound, d.backlog_bytes) {
                            (false, b) => human::bytes(b),
                            (true, 0) => "unknown".into(),
                            (true, b) => format!(">={}", human::bytes(b)),
                        },
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

/// `machine delete`: says what goes, asks on a terminal (or needs `--yes`), deletes.
fn delete_machine(c: &AdminClient, machine: &str, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let v: MachinesView = c.get("/v1/machines")?;
    let by_id = v.machines.iter().find(|m| m.machine_id == machine);
    let mut by_name = v.machines.iter().filter(|m| m.hostname == machine);
    let m = match (by_id, by_name.next(), by_name.next()) {
        (Some(m), _, _) | (None, Some(m), None) => m,
        (None, None, _) => anyhow::bail!("no machine {machine}"),
        (None, Some(_), Some(_)) => {
            anyhow::bail!("several machines are named {machine}: give the machine id")
        }
    };
    let id = &m.machine_id;
    if m.connected {
        anyhow::bail!(
            "the agent of machine {id} is connected: uninstall the agent or `rehost-server machine revoke {id}` it first"
        );
    }
    let points: serde_json::Value = c.get(&format!("/v1/machines/{id}/snapshots"))?;
    let points = points["snapshots"].as_array().map_or(0, Vec::len);
    let data: u64 = m.disks.iter().map(|d| d.replicated_bytes).sum();
    let what = format!(
        "machine {id} ({}): {} disks, {points} recovery points, {} of replica data",
        m.hostname,
        m.disks.len(),
        human::bytes(data)
    );
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("not deleting {what}: not on a terminal to confirm (pass --yes)");
        }
        eprint!("Delete {what}? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            anyhow::bail!("not deleted");
        }
    }
    let d: rehost_server::admin::MachineDeleted =
        c.post_long(&format!("/v1/machines/{id}/delete"), &serde_json::json!({}))?;
    println!(
        "machine {} ({}) deleted: {} disks ({} of volumes), {} recovery points",
        d.machine_id,
        d.hostname,
        d.disks,
        human::bytes(d.volume_bytes),
        d.recovery_points
    );
    match (&d.gc, &d.gc_error) {
        (Some(g), _) => println!(
            "gc: removed {} store objects ({})",
            g.removed_objects,
            human::bytes(g.removed_bytes)
        ),
        (None, Some(e)) => println!(
            "gc did not run ({e}): `rehost-server gc` or the scheduler frees the store data"
        ),
        (None, None) => {}
    }
    Ok(())
}

/// The address to bind from `HOST:PORT` or `SCHEME://HOST:PORT`.
fn admin_address(a: &str) -> &str {
    a.split_once("://")
        .map_or(a, |(_, rest)| rest.trim_end_matches('/'))
}

fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let listen = args.listen.as_str();
    let admin_given = args.admin_listen.as_deref().unwrap_or(&cli.admin);
    // `https://HOST:PORT` serves HTTPS even on loopback; the scheme is not bound.
    let admin_listen = admin_address(admin_given);
    let admin_opts = &rehost_server::admin_tls::AdminOptions {
        metrics_public: args.metrics_public,
        cert_sans: args.admin_cert_san.clone(),
        force_tls: admin_given.to_ascii_lowercase().starts_with("https://"),
    };
    let (snapshot_tick, scrub_interval, max_disk_size) =
        (args.snapshot_tick, args.scrub_interval, args.max_disk_size);
    let limits = rehost_server::admission::Limits {
        max_unauthenticated: usize::try_from(args.max_unauthenticated).unwrap_or(usize::MAX),
        max_unauthenticated_per_address: usize::try_from(args.max_unauthenticated_per_address)
            .unwrap_or(usize::MAX),
    };
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
        shared
            .max_disk_size
            .store(max_disk_size, std::sync::atomic::Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen for agents on {listen}"))?;
        let admin = tokio::net::TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("listen for the admin API on {admin_listen}"))?;
        let admin = rehost_server::admin_tls::Endpoint::new(admin, &shared, admin_opts)?;
        if admin.transport() == rehost_server::admin_tls::Transport::Tls {
            tracing::info!(
                admin = %admin.local_addr()?,
                names = ?admin.cert_names(),
                "admin API: serving HTTPS only (plain HTTP is for loopback addresses), with a \
                 certificate from the server CA for these names"
            );
        }
        if admin_opts.metrics_public {
            tracing::warn!("--metrics-public: /metrics shows machine ids and device paths to anyone who can reach the admin address");
        }
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
        if !scrub_interval.is_zero() {
            let scrub = rehost_server::snapshot::scrub::scheduler(shared.clone(), scrub_interval);
            tokio::spawn(scrub);
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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(super::parse_size("64TiB"), Ok(64 << 40));
        assert_eq!(super::parse_size("2T"), Ok(2 << 40));
        assert_eq!(super::parse_size("500GiB"), Ok(500 << 30));
        assert_eq!(super::parse_size("1048576"), Ok(1 << 20));
        assert!(super::parse_size("0").is_err());
        assert!(super::parse_size("3X").is_err());
        assert!(super::parse_size("99999999P").is_err());
    }
}
