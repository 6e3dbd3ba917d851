//! The operator commands of `rehost-server` and `serve`: arguments ([`Cli`]) and what each command
//! does. Every command but `serve`, `metrics-token` and the snapshot export and verify goes through
//! the admin API ([`client`]), with the request and reply types of [`crate::api::model`].
//!
//! - [`machines`]: tokens, machines;
//! - [`snapshots`]: recovery points, retention, GC;
//! - [`jobs`]: blueprints, launches, jobs, marks, test reverts, history;
//! - [`plans`]: recovery plans;
//! - [`serve`]: the server itself.

pub mod client;
#[cfg(test)]
mod help;
mod jobs;
mod machines;
mod plan_runs;
mod plans;
mod serve;
mod snapshots;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use client::AdminClient;

/// rehost replication server: receives block replication from rehost agents over TLS, keeps a
/// staging volume per source disk, and serves the operator commands below.
#[derive(Parser)]
#[command(name = "rehost-server", version)]
pub struct Cli {
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
pub struct ServeArgs {
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
    #[arg(long, default_value = "24h", value_parser = crate::snapshot::scrub::parse_interval)]
    scrub_interval: std::time::Duration,
    /// The largest disk an agent may declare, e.g. 64TiB, 500GiB, 2T (binary units) or a
    /// byte count; a larger one is refused at the handshake (OutOfRange).
    #[arg(long, default_value = "64TiB", value_parser = serve::parse_size)]
    max_disk_size: u64,
    /// Connections that have not logged in yet (TLS handshake and Hello), at most, from all
    /// addresses together; more are closed at once. Logged-in agents do not count.
    #[arg(long, default_value_t = crate::admission::Limits::default().max_unauthenticated as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated: u64,
    /// Connections that have not logged in yet, at most, from one source address (for IPv6,
    /// one /64); more are closed at once. Agents behind one NAT share this.
    #[arg(long, default_value_t = crate::admission::Limits::default().max_unauthenticated_per_address as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated_per_address: u64,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    Snapshot(snapshots::SnapshotCmd),
    /// List a machine's recovery points.
    Snapshots {
        /// Machine id or hostname.
        #[arg(required_unless_present = "plan", conflicts_with = "plan")]
        machine: Option<String>,
        /// List the group points of this recovery plan instead (`snapshot create --plan`).
        #[arg(long)]
        plan: Option<String>,
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
    Retention(snapshots::RetentionCmd),
    /// A machine's target hardware and launch method (CPUs, memory, disk bus, NIC, boot mode,
    /// image format, target dir, launch method, network).
    #[command(subcommand)]
    Blueprint(jobs::BlueprintCmd),
    /// Launch a target VM from a recovery point: a test (replication goes on; a new test replaces
    /// the previous one) or the cutover (a final consistency point, then replication stops).
    Launch(jobs::LaunchCmd),
    /// Launch jobs, or one job's timestamped progress log.
    Jobs {
        /// A job id: show its progress log; or a plan run, `P<id>`: its log across machines.
        job: Option<String>,
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
        state: jobs::MarkState,
    },
    /// Test launches.
    #[command(subcommand)]
    Test(jobs::TestCmd),
    /// Recovery plans: named, ordered sets of machines recovered together (step by step, with
    /// hooks, on a production or a test network). These commands define plans.
    #[command(subcommand)]
    Plan(plans::PlanCmd),
}

#[derive(Subcommand)]
pub enum TokenCmd {
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
pub enum MachineCmd {
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
    /// tokens, jobs, history, its places in recovery plans). Launched targets in the target dir are left alone. Refused while
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
    use crate::human::DurationError;
    crate::human::duration_secs(s, false).map_err(|e| match e {
        DurationError::NotANumber => format!("`{s}` is not a duration like 30m, 24h or 7d"),
        DurationError::Unit(unit) => format!("unknown unit `{unit}` in `{s}` (use s, m, h or d)"),
        DurationError::TooLong => format!("`{s}` is too long"),
    })
}

/// Whether the command only prints (everything but `serve`): such a command ends quietly when its
/// reader goes away (`rehost-server token list | head -3`), see
/// [`rehost_proto::process::die_quietly_on_sigpipe`]. `serve` keeps SIGPIPE ignored: a server must
/// not die because the pipe of its log closed.
pub fn prints_only(cli: &Cli) -> bool {
    !matches!(cli.cmd, Cmd::Serve(_))
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(ca) = &cli.admin_ca {
        client::set_admin_ca(ca.clone());
    }
    let client = || AdminClient::new(&cli.admin, &cli.data_dir);
    match &cli.cmd {
        Cmd::Serve(args) => serve::serve(&cli, args),
        Cmd::MetricsToken { rotate } => {
            if !cli.data_dir.is_dir() {
                anyhow::bail!(
                    "data dir {} does not exist (start `rehost-server serve` once, or point \
                     --data-dir at its data dir)",
                    cli.data_dir.display()
                );
            }
            let t = crate::pki::metrics_token(&cli.data_dir, *rotate)
                .context("read or create the metrics token")?;
            println!("{t}");
            Ok(())
        }
        Cmd::Snapshot(cmd) => snapshots::run(cmd, &cli.admin, &cli.data_dir),
        Cmd::Snapshots {
            plan: Some(plan),
            json,
            ..
        } => snapshots::list_plan(&cli.admin, &cli.data_dir, plan, *json),
        Cmd::Snapshots {
            machine: Some(machine),
            json,
            ..
        } => snapshots::list(&cli.admin, &cli.data_dir, machine, *json),
        Cmd::Snapshots { .. } => anyhow::bail!("name a machine or a --plan"),
        Cmd::Gc { json } => snapshots::gc(&cli.admin, &cli.data_dir, *json),
        Cmd::Retention(cmd) => snapshots::retention(cmd, &cli.admin, &cli.data_dir),
        Cmd::Blueprint(cmd) => jobs::blueprint(cmd, &cli.admin, &cli.data_dir),
        Cmd::Launch(cmd) => jobs::launch(cmd, &cli.admin, &cli.data_dir),
        Cmd::Jobs {
            job,
            machine,
            json,
            follow,
        } => jobs::jobs(
            &cli.admin,
            &cli.data_dir,
            job.as_deref(),
            machine.as_deref(),
            *json,
            *follow,
        ),
        Cmd::Mark { machine, state } => jobs::mark(&cli.admin, &cli.data_dir, machine, *state),
        Cmd::Test(cmd) => jobs::test(cmd, &cli.admin, &cli.data_dir),
        Cmd::Machine(cmd) => machines::machine(cmd, &client()?),
        Cmd::Token(cmd) => machines::token(cmd, &client()?),
        Cmd::Machines { json, outdated } => machines::machines(&client()?, *json, *outdated),
        Cmd::Plan(cmd) => plans::run(cmd, &client()?),
    }
}
