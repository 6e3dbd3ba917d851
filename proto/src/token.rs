//! Install tokens. A token carries everything an agent needs to trust the server on first contact
//! (the blake3 digest of the server's CA certificate: no trust on first use) and the secret that
//! authorises one registration. Text form: `rh1_` + base64url(id ‖ secret ‖ pin ‖ check[4]).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::msg::Hash;

const PREFIX: &str = "rh1_";
const RAW_LEN: usize = 8 + 24 + 32 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a rehost install token (it must start with `rh1_`)")]
    Prefix,
    #[error(
        "install token is damaged or truncated (copy it again from `rehost-server token create`)"
    )]
    Damaged,
}

#[derive(Clone, PartialEq, Eq)]
pub struct InstallToken {
    pub id: [u8; 8],
    pub secret: [u8; 24],
    /// blake3 of the server CA certificate (DER).
    pub server_pin: Hash,
}

impl std::fmt::Debug for InstallToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallToken")
            .field("id", &self.id_hex())
            .finish_non_exhaustive()
    }
}

impl InstallToken {
    pub fn generate(server_pin: Hash) -> Self {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 24];
        crate::msg::getrandom_fill(&mut id);
        crate::msg::getrandom_fill(&mut secret);
        Self {
            id,
            secret,
            server_pin,
        }
    }

    /// The public part, used to list and revoke.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(RAW_LEN);
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(&self.secret);
        raw.extend_from_slice(&self.server_pin);
        let check = blake3::hash(&raw);
        raw.extend_from_slice(&check.as_bytes()[..4]);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        if raw.len() != RAW_LEN {
            return Err(TokenError::Damaged);
        }
        let (data, check) = raw.split_at(RAW_LEN - 4);
        if &blake3::hash(data).as_bytes()[..4] != check {
            return Err(TokenError::Damaged);
        }
        Ok(Self {
            id: data[..8].try_into().expect("8"),
            secret: data[8..32].try_into().expect("24"),
            server_pin: data[32..64].try_into().expect("32"),
        })
    }
}
