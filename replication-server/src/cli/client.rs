//! The operator commands' side of the admin API: finds the server at `--admin`, authenticates with
//! the admin credential read from `--data-dir`.
//!
//! Transport: a loopback `--admin` (127.x, ::1, localhost) is plain HTTP; any other address is
//! HTTPS, trusting only the server CA (`ca.crt` in the data dir, or `--admin-ca`). An explicit
//! `https://HOST:PORT` asks for HTTPS on loopback too (a server bound to 0.0.0.0 serves only
//! HTTPS); `http://` to a non-loopback host is refused, so the credential never goes in clear.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct AdminClient {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

/// The CA file given with `--admin-ca`, set once by `main` before any command runs.
static ADMIN_CA: OnceLock<PathBuf> = OnceLock::new();

/// Trust `path` (PEM) instead of the data dir's `ca.crt` for an HTTPS admin API.
pub fn set_admin_ca(path: PathBuf) {
    let _ = ADMIN_CA.set(path);
}

/// Where the admin API is and whether it speaks HTTPS.
#[derive(Debug, PartialEq, Eq)]
pub struct AdminUrl {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub base: String,
    pub tls: bool,
}

fn loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Parses `--admin`: `HOST:PORT` (plain HTTP on loopback, HTTPS otherwise), `https://HOST:PORT`,
/// or `http://HOST:PORT` (loopback only).
pub fn admin_url(admin: &str) -> anyhow::Result<AdminUrl> {
    let (scheme, rest) = match admin.split_once("://") {
        Some((s, r)) => (Some(s.to_ascii_lowercase()), r),
        None => (None, admin),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        bail!("--admin `{admin}`: expected HOST:PORT, https://HOST:PORT or http://HOST:PORT");
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, _)) => h,
            None => bail!("--admin `{admin}`: unclosed `[` in the address"),
        },
        None => authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority),
    };
    let loopback = loopback_host(host);
    let tls = match scheme.as_deref() {
        None => !loopback,
        Some("https") => true,
        Some("http") if loopback => false,
        Some("http") => bail!(
            "--admin `{admin}`: refusing plain HTTP to a non-loopback address (the admin \
             credential would cross the network in clear); use https:// or HOST:PORT"
        ),
        Some(other) => bail!("--admin `{admin}`: unknown scheme `{other}` (use https or http)"),
    };
    let scheme = if tls { "https" } else { "http" };
    Ok(AdminUrl {
        base: format!("{scheme}://{authority}"),
        tls,
    })
}

/// The TLS settings of an HTTPS admin API: only the server CA is trusted.
fn tls_config(data_dir: &Path) -> anyhow::Result<ureq::tls::TlsConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let path = ADMIN_CA
        .get()
        .cloned()
        .unwrap_or_else(|| data_dir.join(crate::pki::CA_CERT_FILE));
    let pem = rehost_proto::fsutil::read_capped(&path, 1 << 20).with_context(|| {
        format!(
            "read the server CA {} to check the admin API's HTTPS certificate (copy the server's \
             ca.crt and pass --admin-ca, or point --data-dir at its data dir)",
            path.display()
        )
    })?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse the CA certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    let roots = certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect::<Vec<_>>();
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

impl AdminClient {
    pub fn new(admin: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let p = data_dir.join(crate::pki::ADMIN_TOKEN);
        if let Err(e) = std::fs::symlink_metadata(&p) {
            if e.kind() == std::io::ErrorKind::NotFound {
                bail!(
                    "no admin credential in {}: has `rehost-server serve` run with this --data-dir?",
                    data_dir.display()
                );
            }
        }
        let token = rehost_proto::fsutil::read_capped(&p, 4096).with_context(|| {
            format!(
                "read the admin credential {} (run this as the user that runs `rehost-server serve`, \
                 or point --data-dir at its data dir)",
                p.display()
            )
        })?;
        let url = admin_url(admin)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)));
        if url.tls {
            config = config.tls_config(tls_config(data_dir)?);
        }
        let agent = config.build().new_agent();
        Ok(Self {
            base: url.base,
            auth: format!("Bearer {}", String::from_utf8_lossy(&token).trim()),
            agent,
        })
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut resp = r.with_context(|| {
            format!("reach the rehost-server admin API at {} (is `rehost-server serve` running? see --admin)", self.base)
        })?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("{what}: read the answer"))?;
        if !status.is_success() {
            let msg = body
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no details");
            bail!("{what}: server answered {status}: {msg}");
        }
        serde_json::from_value(body).with_context(|| format!("{what}: unexpected answer"))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .call();
        self.finish(&format!("GET {path}"), r)
    }

    /// A POST that may take long (e.g. a snapshot with `wait`): no overall timeout.
    pub fn post_long<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(path, body, true)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(path, body, false)
    }

    pub fn put<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        let r = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .send_json(body);
        self.finish(&format!("PUT {path}"), r)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .call();
        self.finish(&format!("DELETE {path}"), r)
    }

    fn send<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        long: bool,
    ) -> anyhow::Result<T> {
        let req = self.agent.post(format!("{}{path}", self.base));
        let req = if long {
            req.config().timeout_global(None).build()
        } else {
            req
        };
        let r = req.header("Authorization", &self.auth).send_json(body);
        self.finish(&format!("POST {path}"), r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> (String, bool) {
        let u = admin_url(s).unwrap();
        (u.base, u.tls)
    }

    #[test]
    fn loopback_is_plain_http_everything_else_https() {
        assert_eq!(u("127.0.0.1:1501"), ("http://127.0.0.1:1501".into(), false));
        assert_eq!(u("localhost:1501"), ("http://localhost:1501".into(), false));
        assert_eq!(u("[::1]:1501"), ("http://[::1]:1501".into(), false));
        assert_eq!(u("127.0.0.2:9"), ("http://127.0.0.2:9".into(), false));
        assert_eq!(u("192.0.2.2:1501"), ("https://192.0.2.2:1501".into(), true));
        assert_eq!(
            u("[2001:db8::1]:1501"),
            ("https://[2001:db8::1]:1501".into(), true)
        );
        assert_eq!(
            u("admin.example:1501"),
            ("https://admin.example:1501".into(), true)
        );
        assert_eq!(
            u("https://127.0.0.1:1501"),
            ("https://127.0.0.1:1501".into(), true)
        );
        assert_eq!(
            u("http://127.0.0.1:1501/"),
            ("http://127.0.0.1:1501".into(), false)
        );
    }

    #[test]
    fn plain_http_to_a_remote_address_is_refused() {
        let e = admin_url("http://192.0.2.2:1501").unwrap_err().to_string();
        assert!(e.contains("refusing plain HTTP"), "{e}");
        assert!(admin_url("ftp://127.0.0.1:1").is_err());
        assert!(admin_url("127.0.0.1:1/v1").is_err());
        assert!(admin_url("[::1:1501").is_err());
    }
}
