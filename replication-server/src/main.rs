//! `rehost-server`: parses arguments, sets up logging, calls into the library ([`rehost_server::cli`]).

use clap::Parser as _;
use rehost_server::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    if cli::prints_only(&cli) {
        rehost_proto::process::die_quietly_on_sigpipe();
    }
    rehost_proto::process::init_logging("RUST_LOG", "info");
    if let Err(e) = cli::run(cli) {
        eprintln!("rehost-server: error: {e:#}");
        std::process::exit(1);
    }
}
