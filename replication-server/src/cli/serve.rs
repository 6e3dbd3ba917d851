//! `rehost-server serve`: binds the listeners, starts the schedulers, runs the server until
//! SIGTERM or Ctrl-C.

use anyhow::Context as _;

use super::{Cli, ServeArgs};

/// `64TiB`, `500GiB`, `2T`, `1048576`: binary units (K, M, G, T, P, with or without `iB`).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
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

/// The address to bind from `HOST:PORT` or `SCHEME://HOST:PORT`.
fn admin_address(a: &str) -> &str {
    a.split_once("://")
        .map_or(a, |(_, rest)| rest.trim_end_matches('/'))
}

pub(super) fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let listen = args.listen.as_str();
    let admin_given = args.admin_listen.as_deref().unwrap_or(&cli.admin);
    // `https://HOST:PORT` serves HTTPS even on loopback; the scheme is not bound.
    let admin_listen = admin_address(admin_given);
    let admin_opts = &crate::api::tls::AdminOptions {
        metrics_public: args.metrics_public,
        cert_sans: args.admin_cert_san.clone(),
        force_tls: admin_given.to_ascii_lowercase().starts_with("https://"),
    };
    let (snapshot_tick, scrub_interval, max_disk_size) =
        (args.snapshot_tick, args.scrub_interval, args.max_disk_size);
    let limits = crate::admission::Limits {
        max_unauthenticated: usize::try_from(args.max_unauthenticated).unwrap_or(usize::MAX),
        max_unauthenticated_per_address: usize::try_from(args.max_unauthenticated_per_address)
            .unwrap_or(usize::MAX),
    };
    // Every agent holds a socket and its disks' files open: the default soft limit (1,024) is
    // too low for a few hundred agents.
    match crate::admission::raise_nofile_limit() {
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
        let shared = crate::open(&cli.data_dir)?;
        shared
            .max_disk_size
            .store(max_disk_size, std::sync::atomic::Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen for agents on {listen}"))?;
        let admin = tokio::net::TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("listen for the admin API on {admin_listen}"))?;
        let admin = crate::api::tls::Endpoint::new(admin, &shared, admin_opts)?;
        if admin.transport() == crate::api::tls::Transport::Tls {
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
            tokio::spawn(crate::retention::scheduler(shared.clone(), tick));
        }
        tokio::spawn(crate::plan::run::cleanup_scheduler(shared.clone()));
        if !scrub_interval.is_zero() {
            let scrub = crate::snapshot::scrub::scheduler(shared.clone(), scrub_interval);
            tokio::spawn(scrub);
        }
        let shutdown = rehost_proto::process::terminated();
        crate::run_with_limits(shared, listener, admin, limits, shutdown).await
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
