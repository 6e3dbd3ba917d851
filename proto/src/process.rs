//! What every rehost binary does first: its log on stderr, and how it takes a closed stdout.

/// Logs to stderr at the level `env` names (a `tracing` filter: `debug`,
/// `rehost_server=trace`), `default` when it is unset or unreadable; coloured only on a terminal.
pub fn init_logging(env: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Restores the default action of SIGPIPE, so that a command whose reader went away
/// (`rehost-server token list | head -3`) ends quietly, as `ls` does, instead of panicking in
/// `println!` on EPIPE (Rust starts programs with SIGPIPE ignored).
///
/// Only for work that may stop at any write: a daemon keeps SIGPIPE ignored (it must not die
/// with its log's pipe), and so does work that holds something to release (an install half-way,
/// the converter's mounts).
pub fn die_quietly_on_sigpipe() {
    // SAFETY: SIG_DFL is a valid action for SIGPIPE and installs no handler code, so there is no
    // handler to race with any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Returns once the process is asked to stop: SIGTERM (systemd, `kill`) or SIGINT (Ctrl-C).
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // Only when the runtime has no signal driver: Ctrl-C still stops it.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
