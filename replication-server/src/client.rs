//! The operator commands' side of the admin API: finds the server at `--admin`, authenticates with
//! the admin credential read from `--data-dir`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::de::DeserializeOwned;

pub struct AdminClient {
    base: String,
    auth: String,
    agent: ureq::Agent,
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
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(Self {
            base: format!("http://{admin}"),
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
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .config()
            .timeout_global(None)
            .build()
            .header("Authorization", &self.auth)
            .send_json(body);
        self.finish(&format!("POST {path}"), r)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .send_json(body);
        self.finish(&format!("POST {path}"), r)
    }
}
