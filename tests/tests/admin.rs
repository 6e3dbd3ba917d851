//! The admin API's front door, against the real server: `/metrics` needs the metrics token or the
//! admin credential (unless `--metrics-public`), the metrics token opens nothing else,
//! `/v1/health` shows no machine data, label values are escaped (promtool accepts the page), and
//! a non-loopback admin address serves only HTTPS that the operator commands check against the
//! server CA.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rehost_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// One plain HTTP/1.1 request; (status, body).
fn http(addr: &str, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the admin API");
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = if method == "POST" { "{}" } else { "" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: rehost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).expect("send the request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("read the answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn stdout_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A label's value in a Prometheus text sample line, unescaped (`\\`, `\"`, `\n`).
fn label(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}=\""))? + key.len() + 2;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                c @ ('\\' | '"') => out.push(c),
                c => panic!("bad escape \\{c} in {line:?}"),
            },
            c => out.push(c),
        }
    }
}

/// `promtool check metrics` on `text`: CI installs it (scripts/install-deps.sh); elsewhere a
/// missing promtool skips this check with a message.
fn promtool_accepts(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool is missing in CI: scripts/install-deps.sh installs Debian's prometheus"
            );
            eprintln!("SKIP promtool check: promtool not installed (scripts/install-deps.sh)");
            return;
        }
        Err(e) => panic!("run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the page: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_need_a_credential_and_escape_labels() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    // A device path with a quote and a backslash, ending in a backslash (control characters,
    // a newline among them, are refused by the protocol decoder; the encoder's escaping of
    // them is a unit test of rehost-server's metrics module).
    let img = dir.path().join("evil\"disk\\");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let token = server.token();
    let agent = Agent::new(dir.path(), "evil");
    let out = agent.install(&server, &token, &[&img], "evil-host");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let machine = server.machines()["machines"][0]["machine_id"]
        .as_str()
        .unwrap()
        .to_string();
    let device = img.display().to_string();

    let admin = std::fs::read_to_string(server.data.join("admin.token")).unwrap();
    let metrics_token = stdout_ok(&server, &["metrics-token"]);
    assert_eq!(metrics_token.len(), 64, "{metrics_token}");
    let mode = std::fs::metadata(server.data.join("metrics.token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // No credential, or a wrong one: 401, and nothing about machines.
    for bearer in [None, Some("0123"), Some(token.as_str())] {
        let (status, body) = http(&server.admin, "GET", "/metrics", bearer);
        assert_eq!(status, 401, "{bearer:?}: {body}");
        assert!(!body.contains(&machine), "{body}");
    }
    // /v1/health: `ok` and no machine data, with or without a credential.
    let (status, body) = http(&server.admin, "GET", "/v1/health", None);
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health, serde_json::json!({ "ok": true }));
    assert!(!body.contains(&machine) && !body.contains("evil"), "{body}");

    // The metrics token reads /metrics, and nothing else.
    let (status, page) = http(&server.admin, "GET", "/metrics", Some(&metrics_token));
    assert_eq!(status, 200, "{page}");
    let (status, _) = http(&server.admin, "GET", "/metrics", Some(admin.trim()));
    assert_eq!(status, 200);
    for (method, path) in [
        ("GET", "/v1/machines"),
        ("GET", "/v1/tokens"),
        ("POST", "/v1/tokens"),
        ("POST", &*format!("/v1/machines/{machine}/revoke")),
    ] {
        let (status, body) = http(&server.admin, method, path, Some(&metrics_token));
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("metrics token"), "{body}");
    }
    assert_eq!(server.machines()["machines"][0]["revoked"], false);

    // The page: valid Prometheus text, and the device label comes back as it was.
    promtool_accepts(&page);
    for name in [
        "rehost_disk_size_bytes",
        "rehost_disk_replicated_bytes",
        "rehost_disk_backlog_bytes",
    ] {
        let line = page
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name} sample in\n{page}"));
        assert_eq!(
            label(line, "device").as_deref(),
            Some(device.as_str()),
            "{line}"
        );
        assert_eq!(label(line, "machine").as_deref(), Some(machine.as_str()));
    }
    assert!(
        page.contains(&format!(
            "rehost_disk_size_bytes{{machine=\"{machine}\",device=\"{}\",state=",
            device.replace('\\', "\\\\").replace('"', "\\\"")
        )),
        "{page}"
    );
    assert!(page.contains("rehost_agents_connected 0"), "{page}");

    // A rotated token replaces the old one at once, without a restart.
    let rotated = stdout_ok(&server, &["metrics-token", "--rotate"]);
    assert_ne!(rotated, metrics_token);
    assert_eq!(
        http(&server.admin, "GET", "/metrics", Some(&metrics_token)).0,
        401
    );
    assert_eq!(
        http(&server.admin, "GET", "/metrics", Some(&rotated)).0,
        200
    );
    assert_eq!(stdout_ok(&server, &["metrics-token"]), rotated);
}

/// A `rehost-server serve` started by the test with its own flags; killed on drop.
struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(data: &Path, log: &Path, args: &[&str]) -> Self {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), data.as_os_str()])
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start rehost-server");
        Serve {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin address from the "ready" log line.
    fn admin_addr(&mut self) -> std::net::SocketAddr {
        wait_until("the server's ready line", LIMIT, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("rehost-server exited ({st}):\n{}", self.log());
            }
            let log = self.log();
            let line = log.lines().find(|l| l.contains("rehost-server ready"))?;
            let a = line.split("admin=").nth(1)?.split_whitespace().next()?;
            a.parse().ok()
        })
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn metrics_public_opens_only_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Serve::start(
        &dir.path().join("server"),
        &dir.path().join("server.log"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--metrics-public",
        ],
    );
    let admin = s.admin_addr().to_string();
    assert!(s.log().contains("--metrics-public"), "{}", s.log());
    let (status, page) = http(&admin, "GET", "/metrics", None);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("# TYPE rehost_agents_connected gauge"),
        "{page}"
    );
    promtool_accepts(&page);
    assert_eq!(http(&admin, "GET", "/v1/machines", None).0, 401);
    assert_eq!(http(&admin, "GET", "/v1/tokens", None).0, 401);
}

/// The names of the admin certificate, from the server's log line.
fn cert_names(log: &str) -> Vec<String> {
    let line = log
        .lines()
        .find(|l| l.contains("serving HTTPS only"))
        .unwrap_or_else(|| panic!("no HTTPS line in the log:\n{log}"));
    let list = line
        .split("names=[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no names in {line}"));
    list.split(", ")
        .map(|n| n.trim_matches('"').to_string())
        .collect()
}

#[test]
fn non_loopback_admin_serves_only_https() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut s = Serve::start(
        &data,
        &dir.path().join("server.log"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--admin-cert-san",
            "rehost-admin.example",
        ],
    );
    let addr = s.admin_addr();
    assert!(addr.ip().is_unspecified(), "{addr}");
    let port = addr.port();
    let names = cert_names(&s.log());
    assert!(
        names.contains(&"rehost-admin.example".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"127.0.0.1".to_string()), "{names:?}");

    let cli = |admin: &str, extra: &[&str]| {
        Command::new(bin("rehost-server"))
            .args(["--data-dir".as_ref(), data.as_os_str()])
            .args(["--admin", admin])
            .args(extra)
            .output()
            .expect("run rehost-server")
    };

    // A plain HTTP request gets no HTTP answer: the TLS handshake fails and the connection
    // closes.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: rehost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered: {}",
        String::from_utf8_lossy(&answer)
    );
    // The operator command talking plain HTTP to it fails too.
    let out = cli(&format!("127.0.0.1:{port}"), &["machines"]);
    assert!(!out.status.success());

    // HTTPS, checked against the server CA from the data dir: on loopback by asking for it, and
    // on a non-loopback address of this machine by default.
    let out = cli(
        &format!("https://127.0.0.1:{port}"),
        &["machines", "--json"],
    );
    assert!(
        out.status.success(),
        "machines over HTTPS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["machines"].as_array().unwrap().is_empty());
    let remote = names
        .iter()
        .filter_map(|n| n.parse::<std::net::IpAddr>().ok())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .expect("this machine has a non-loopback IPv4 address for the HTTPS test");
    let out = cli(&format!("{remote}:{port}"), &["machines", "--json"]);
    assert!(
        out.status.success(),
        "machines at {remote}:{port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&format!("{remote}:{port}"), &["token", "create"]);
    assert!(out.status.success());

    // Another CA (a second data dir's) is not trusted.
    let other = dir.path().join("other");
    {
        let mut o = Serve::start(
            &other,
            &dir.path().join("other.log"),
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        );
        o.admin_addr();
    }
    let out = cli(
        &format!("{remote}:{port}"),
        &[
            "--admin-ca",
            other.join("ca.crt").to_str().unwrap(),
            "machines",
        ],
    );
    assert!(!out.status.success(), "a foreign CA was trusted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reach the rehost-server admin API"), "{err}");
    // An address the certificate does not name is refused (127.0.0.2 reaches the 0.0.0.0
    // listener, but only 127.0.0.1 and the interface addresses are in the certificate).
    let out = cli(&format!("https://127.0.0.2:{port}"), &["machines"]);
    assert!(
        !out.status.success(),
        "a name outside the certificate was accepted"
    );
}

#[test]
fn non_loopback_admin_never_falls_back_to_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    {
        let mut s = Serve::start(
            &data,
            &dir.path().join("first.log"),
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        );
        s.admin_addr();
    }
    // Without the CA key no HTTPS certificate can be issued: the server refuses to start on a
    // non-loopback admin address rather than serve plain HTTP there.
    std::fs::remove_file(data.join("ca.key")).unwrap();
    let out = Command::new(bin("rehost-server"))
        .args(["--data-dir".as_ref(), data.as_os_str()])
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .output()
        .expect("run rehost-server");
    assert!(!out.status.success(), "started without HTTPS");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only over HTTPS"), "{err}");
    // On loopback it still starts (plain HTTP needs no certificate).
    let mut s = Serve::start(
        &data,
        &dir.path().join("loopback.log"),
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
    );
    let admin = s.admin_addr().to_string();
    assert_eq!(http(&admin, "GET", "/v1/health", None).0, 200);
}

#[test]
fn https_on_loopback_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut s = Serve::start(
        &data,
        &dir.path().join("server.log"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "https://127.0.0.1:0",
        ],
    );
    let addr = s.admin_addr();
    assert!(cert_names(&s.log()).contains(&"127.0.0.1".to_string()));
    let out = Command::new(bin("rehost-server"))
        .args(["--data-dir".as_ref(), data.as_os_str()])
        .args(["--admin", &format!("https://{addr}"), "token", "list"])
        .output()
        .expect("run rehost-server");
    assert!(
        out.status.success(),
        "token list over HTTPS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("rehost-server"))
        .args(["--data-dir".as_ref(), data.as_os_str()])
        .args(["--admin", &addr.to_string(), "token", "list"])
        .output()
        .expect("run rehost-server");
    assert!(
        !out.status.success(),
        "plain HTTP answered an HTTPS listener"
    );
}

/// Prometheus itself (Debian's, from scripts/install-deps.sh) scrapes the HTTPS admin API with the
/// configuration the README gives: the server CA as `ca_file`, the metrics token as
/// `credentials_file`; a job without the token is refused (401).
#[test]
fn prometheus_scrapes_https_metrics_with_the_token() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prometheus is missing in CI: scripts/install-deps.sh installs it"
        );
        eprintln!("SKIP: prometheus not installed (scripts/install-deps.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut s = Serve::start(
        &data,
        &dir.path().join("server.log"),
        &["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"],
    );
    let port = s.admin_addr().port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s }}\n\
             scrape_configs:\n\
             - job_name: with_token\n  scheme: https\n\
             \x20 authorization: {{ credentials_file: {token} }}\n\
             \x20 tls_config: {{ ca_file: {ca} }}\n\
             \x20 static_configs: [ {{ targets: [\"127.0.0.1:{port}\"] }} ]\n\
             - job_name: without_token\n  scheme: https\n\
             \x20 tls_config: {{ ca_file: {ca} }}\n\
             \x20 static_configs: [ {{ targets: [\"127.0.0.1:{port}\"] }} ]\n",
            token = data.join("metrics.token").display(),
            ca = data.join("ca.crt").display(),
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prom = Serve {
        child: Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
        log: dir.path().join("prometheus.log"),
    };
    let health = wait_until("both scrapes", LIMIT, || {
        if let Ok(Some(st)) = prom.child.try_wait() {
            panic!("prometheus exited ({st}):\n{}", prom.log());
        }
        // Not listening yet: try again (http() below expects a listener).
        std::net::TcpStream::connect(&web).ok()?;
        let (status, body) = http(&web, "GET", "/api/v1/targets", None);
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut out = std::collections::BTreeMap::new();
        for t in v["data"]["activeTargets"].as_array()? {
            let h = t["health"].as_str()?;
            if h == "unknown" {
                return None;
            }
            out.insert(
                t["labels"]["job"].as_str()?.to_string(),
                (h.to_string(), t["lastError"].as_str()?.to_string()),
            );
        }
        (out.len() == 2).then_some(out)
    });
    assert_eq!(health["with_token"].0, "up", "{health:?}");
    assert_eq!(health["without_token"].0, "down", "{health:?}");
    assert!(health["without_token"].1.contains("401"), "{health:?}");
    let (_, q) = http(
        &web,
        "GET",
        "/api/v1/query?query=rehost_agents_connected",
        None,
    );
    assert!(q.contains("\"job\":\"with_token\""), "{q}");
}
