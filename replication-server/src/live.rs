//! What is known only while agents are connected: which machines have a session and what their
//! agents last reported per disk. The catalog holds everything durable.

use std::collections::HashMap;
use std::sync::Mutex;

use rehost_proto::msg::{DiskState, Progress};

#[derive(Debug, Clone)]
pub struct LiveDisk {
    pub state: DiskState,
    pub done_bytes: u64,
    pub backlog_bytes: u64,
    pub sent_bytes: u64,
    /// The agent's lag when it reported, and when that was (unix seconds).
    pub lag_ms: u64,
    pub reported_at: i64,
    /// The backlog is only what is known to have changed (a scanned disk between passes).
    pub backlog_lower_bound: bool,
}

#[derive(Debug, Clone)]
pub struct LiveMachine {
    pub peer: String,
    pub agent_version: String,
    pub connected_at: i64,
    pub disks: HashMap<u64, LiveDisk>,
}

#[derive(Default)]
pub struct Live {
    machines: Mutex<HashMap<String, LiveMachine>>,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveMachine>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected(&self, machine: &str, peer: String, agent_version: String) {
        let m = LiveMachine {
            peer,
            agent_version,
            connected_at: crate::catalog::now(),
            disks: HashMap::new(),
        };
        self.lock().insert(machine.to_string(), m);
    }

    pub fn disconnected(&self, machine: &str) {
        self.lock().remove(machine);
    }

    pub fn progress(&self, machine: &str, p: &Progress) {
        let now = crate::catalog::now();
        if let Some(m) = self.lock().get_mut(machine) {
            m.disks.insert(
                p.disk_id.0,
                LiveDisk {
                    state: p.state,
                    done_bytes: p.done_bytes,
                    backlog_bytes: p.backlog_bytes,
                    sent_bytes: p.sent_bytes,
                    lag_ms: p.lag_ms,
                    reported_at: now,
                    backlog_lower_bound: p.backlog_lower_bound,
                },
            );
        }
    }

    pub fn get(&self, machine: &str) -> Option<LiveMachine> {
        self.lock().get(machine).cloned()
    }
}
