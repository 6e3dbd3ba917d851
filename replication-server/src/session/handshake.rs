//! The handshake of a replication session: the protocol version both sides speak, who the
//! agent is (an install token registers a new machine, a machine credential proves an existing
//! one), and the machine's one session slot.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use rehost_proto::msg::{Auth, Hello};
use rehost_proto::MachineId;
use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};

use super::{blocking, internal, SessionError};
use crate::auth::RegisterRefusal;
use crate::catalog::Refusal;
use crate::Shared;

pub(super) fn negotiate(h: &Hello) -> Result<u32, SessionError> {
    let v = h.max_version.min(rehost_proto::PROTOCOL_VERSION);
    if v < h.min_version.max(rehost_proto::MIN_PROTOCOL_VERSION) {
        return Err(SessionError::Version(h.min_version, h.max_version));
    }
    Ok(v)
}

pub(super) async fn authenticate(
    shared: &Arc<Shared>,
    hello: &Hello,
) -> Result<(MachineId, Option<[u8; 32]>), SessionError> {
    let shared = shared.clone();
    let auth = hello.auth.clone();
    blocking(move || match auth {
        Auth::Register {
            token_id,
            token_secret,
            hostname,
            source_id,
        } => {
            let id = hex::encode(token_id);
            match shared
                .catalog
                .check_token(&id, &token_secret)
                .map_err(internal)?
            {
                Ok(()) => {}
                Err(Refusal::Unknown) => {
                    return Err(SessionError::Unauthorized(format!(
                        "unknown install token {id}"
                    )))
                }
                Err(Refusal::Revoked) => {
                    return Err(SessionError::Revoked(format!(
                        "install token {id} was revoked"
                    )))
                }
                Err(Refusal::Expired) => {
                    return Err(SessionError::Revoked(format!(
                        "install token {id} has expired"
                    )))
                }
            }
            let mut secret = [0u8; 32];
            rehost_proto::random_bytes(&mut secret);
            let r = match shared
                .catalog
                .register(&id, &hostname, &source_id, &secret)
                .map_err(internal)?
            {
                Ok(r) => r,
                Err(e @ RegisterRefusal::MachineRevoked(_)) => {
                    return Err(SessionError::Revoked(e.to_string()))
                }
                Err(e) => return Err(SessionError::Unauthorized(e.to_string())),
            };
            match &r.duplicate_of {
                _ if r.reinstalled => {
                    info!(machine = %r.machine, %hostname, token = %id, "machine re-registered with its reinstall token (new credential; id, disks and replica kept)")
                }
                Some(dup) => warn!(
                    machine = %r.machine, %hostname, token = %id, duplicate_of = %dup,
                    "new machine registered with the hostname or source id of an existing one: duplicate of {dup}, not merged"
                ),
                None => info!(machine = %r.machine, %hostname, token = %id, "machine registered"),
            }
            Ok((r.machine, Some(secret)))
        }
        Auth::Machine { machine_id, secret } => match shared
            .catalog
            .check_machine(&machine_id, &secret)
            .map_err(internal)?
        {
            Ok(()) => Ok((machine_id, None)),
            Err(Refusal::Revoked) => Err(SessionError::Revoked(format!(
                "machine {machine_id}'s credential was revoked"
            ))),
            Err(_) => Err(SessionError::Unauthorized(format!(
                "unknown machine or wrong credential for {machine_id}"
            ))),
        },
    })
    .await
}

pub(super) async fn claim_slot(
    shared: &Arc<Shared>,
    machine: &MachineId,
    peer: SocketAddr,
) -> Result<OwnedMutexGuard<()>, SessionError> {
    let slot = shared.slot(machine);
    if let Ok(g) = slot.lock.clone().try_lock_owned() {
        return Ok(g);
    }
    slot.kick.replace(machine, peer);
    match tokio::time::timeout(Duration::from_secs(30), slot.lock.clone().lock_owned()).await {
        Ok(g) => Ok(g),
        Err(_) => Err(SessionError::Internal(
            "previous session of this machine did not end".into(),
        )),
    }
}
