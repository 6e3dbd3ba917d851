//! The server's trust material in the data dir: a CA, a TLS certificate for
//! [`rehost_proto::SERVER_NAME`] issued by it, and the admin credential the operator commands use.
//! Created on first start, loaded afterwards. Every file is written 0600 (see [`crate::private`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rehost_proto::fsutil::{read_capped, write_atomic};
use rehost_proto::Hash;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generate certificates")]
    Generate(#[from] rcgen::Error),
    #[error("read or write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("build TLS configuration")]
    Tls(#[from] rustls::Error),
}

pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub tls: Arc<rustls::ServerConfig>,
    /// blake3 of the CA certificate: what install tokens pin.
    pub pin: Hash,
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
pub const ADMIN_TOKEN: &str = "admin.token";
/// The read-only credential of `/metrics` (for Prometheus' `bearer_token_file`).
pub const METRICS_TOKEN: &str = "metrics.token";
/// The CA certificate file: what the agents pin and the operator commands trust for HTTPS.
pub const CA_CERT_FILE: &str = CA_CERT;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The CA's parameters: what it was created with, and what it issues certificates as.
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "rehost replication CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(ca)
}

fn create(dir: &Path) -> Result<(), PkiError> {
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, &ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![rehost_proto::SERVER_NAME.to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, rehost_proto::SERVER_NAME);
    leaf.not_before = rcgen::date_time_ymd(2024, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2124, 1, 1);
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&key, &issuer)?;

    // Keys first: a crash leaves no certificate without its key.
    for (name, data, mode) in [
        (CA_KEY, ca_key.serialize_pem(), 0o600),
        (SERVER_KEY, key.serialize_pem(), 0o600),
        (SERVER_CERT, leaf_cert.pem(), 0o600),
        (CA_CERT, ca_cert.pem(), 0o600),
    ] {
        let p = dir.join(name);
        write_atomic(&p, data.as_bytes(), mode).map_err(io(&p))?;
    }
    Ok(())
}

/// Loads the PKI from `dir`, creating it on first start.
pub fn load_or_create(dir: &Path) -> Result<Pki, PkiError> {
    if !dir.join(CA_CERT).exists() {
        create(dir)?;
    }
    let read = |name: &str| -> Result<Vec<u8>, PkiError> {
        let p = dir.join(name);
        read_capped(&p, 1 << 20).map_err(io(&p))
    };
    let pem_err = |name: &str| {
        let path = dir.join(name);
        move |source| PkiError::Pem { path, source }
    };
    let ca_der = CertificateDer::from_pem_slice(&read(CA_CERT)?).map_err(pem_err(CA_CERT))?;
    let leaf = CertificateDer::from_pem_slice(&read(SERVER_CERT)?).map_err(pem_err(SERVER_CERT))?;
    let key = PrivateKeyDer::from_pem_slice(&read(SERVER_KEY)?).map_err(pem_err(SERVER_KEY))?;
    let pin = *blake3::hash(&ca_der).as_bytes();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![leaf, ca_der.clone()], key)?;
    Ok(Pki {
        ca_der,
        tls: Arc::new(tls),
        pin,
    })
}

/// The admin credential (hex), created on first start, 0600.
pub fn admin_token(dir: &Path) -> Result<String, PkiError> {
    secret_file(dir, ADMIN_TOKEN, false)
}

/// The metrics token (hex), created when missing (or replaced when `rotate`), 0600.
pub fn metrics_token(dir: &Path, rotate: bool) -> Result<String, PkiError> {
    secret_file(dir, METRICS_TOKEN, rotate)
}

/// The metrics token as it is now on disk; None when there is none (or it cannot be read).
/// Read at each use, so a rotation takes effect without a restart.
pub fn current_metrics_token(dir: &Path) -> Option<String> {
    let t = read_capped(&dir.join(METRICS_TOKEN), 4096).ok()?;
    let t = String::from_utf8_lossy(&t).trim().to_string();
    (!t.is_empty()).then_some(t)
}

fn secret_file(dir: &Path, name: &str, replace: bool) -> Result<String, PkiError> {
    let p = dir.join(name);
    if replace || !p.exists() {
        let mut b = [0u8; 32];
        rehost_proto::random_bytes(&mut b);
        write_atomic(&p, hex::encode(b).as_bytes(), 0o600).map_err(io(&p))?;
    }
    let t = read_capped(&p, 4096).map_err(io(&p))?;
    Ok(String::from_utf8_lossy(&t).trim().to_string())
}

/// A TLS configuration for the admin API: a new key and a certificate for `names` (IP addresses
/// or host names) issued by the CA in `dir`. Kept in memory only; clients trust the CA.
pub fn admin_tls(dir: &Path, names: &[String]) -> Result<rustls::ServerConfig, PkiError> {
    let read = |name: &str| -> Result<String, PkiError> {
        let p = dir.join(name);
        let b = read_capped(&p, 1 << 20).map_err(io(&p))?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY)?)?;
    let issuer = rcgen::Issuer::new(ca_params()?, &ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, "rehost admin API");
    leaf.not_before = rcgen::date_time_ymd(2024, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2124, 1, 1);
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    let ca_der = CertificateDer::from_pem_slice(read(CA_CERT)?.as_bytes()).map_err(|source| {
        PkiError::Pem {
            path: dir.join(CA_CERT),
            source,
        }
    })?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| PkiError::Tls(rustls::Error::General(format!("admin key: {e}"))))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca_der], key_der)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}
