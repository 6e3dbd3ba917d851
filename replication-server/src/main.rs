//! `rehost-server`: parses arguments, sets up logging, calls into the library ([`rehost_server::cli`]).

use clap::Parser as _;
use rehost_server::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    if cli::prints_only(&cli) {
        cli::die_quietly_on_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = cli::run(cli) {
        eprintln!("rehost-server: error: {e:#}");
        std::process::exit(1);
    }
}
