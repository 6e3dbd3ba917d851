//! The disks a session may write: each disk the agent announces is matched to the machine's
//! disk of that device (registered on first sight, with a volume of its size), checked, and
//! granted with the watermark the agent resumes from.

use std::collections::{HashMap, HashSet};

use rehost_proto::error::chain;
use rehost_proto::msg::DiskGrant;
use rehost_proto::{DiskId, MachineId};
use tracing::warn;

use super::{internal, SessionError};
use crate::volume::Volume;
use crate::writer::DiskCtx;
use crate::Shared;

pub(super) struct Granted {
    pub size: u64,
    pub block_size: u64,
}

type Opened = (Vec<DiskGrant>, HashMap<DiskId, DiskCtx>);

pub(super) fn open_disks(
    shared: &Shared,
    machine: &MachineId,
    disks: &[rehost_proto::msg::DiskInfo],
) -> Result<Opened, SessionError> {
    let mut seen = HashSet::new();
    if disks.is_empty() {
        return Err(SessionError::Protocol("no disks in hello".into()));
    }
    if let Some(d) = disks.iter().find(|d| !seen.insert(d.device.as_str())) {
        return Err(SessionError::Protocol(format!(
            "disk {} listed twice",
            d.device
        )));
    }
    let cap = shared
        .max_disk_size
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some(d) = disks.iter().find(|d| d.size_bytes > cap) {
        return Err(SessionError::OutOfRange(format!(
            "disk {} declares {} bytes, more than this server accepts ({cap} bytes, `serve --max-disk-size`)",
            d.device, d.size_bytes
        )));
    }
    let dir = shared.volume_dir(machine);
    // A disk's row and its volume go together: if a volume cannot be made, every row rolls back
    // and the files made for new disks are removed.
    let mut made = Vec::new();
    let opened = shared
        .catalog
        .ensure_disks_with(machine, disks, shared.block_size, |r, new| {
            if new {
                made.push(r.id);
            }
            Volume::open(&dir, r.id, r.size_bytes, r.block_size)
        })
        .map_err(internal)?;
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            for id in made {
                let (vol, idx) = Volume::paths(&dir, id);
                for p in [vol, idx] {
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(path = %p.display(), error = %e, "remove a file of a disk whose registration failed")
                        }
                    }
                }
            }
            return Err(SessionError::Internal(format!(
                "create the staging volume of a disk: {}",
                chain(&e)
            )));
        }
    };
    let mut grants = Vec::new();
    let mut ctxs = HashMap::new();
    for (r, volume) in opened {
        let id = DiskId(r.id);
        let clean_stop_generation = crate::volume::take_clean_stop(&dir, r.id).map_err(internal)?;
        grants.push(DiskGrant {
            disk_id: id,
            device: r.device,
            size_bytes: r.size_bytes,
            block_size: r.block_size,
            durable_bytes: r.durable_bytes,
            sync_complete: r.sync_complete,
            clean_stop_generation,
        });
        ctxs.insert(id, DiskCtx::new(volume, r.durable_bytes, r.sync_complete));
    }
    Ok((grants, ctxs))
}
