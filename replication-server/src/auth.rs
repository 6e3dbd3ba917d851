//! Who may connect as which machine.
//!
//! - An install token only ever creates a **new** machine. A source that claims the hostname or
//!   source id of an existing machine gets a machine of its own, shown as a duplicate of the older
//!   one (`machines`, the register log); nothing is merged, and the existing machine keeps its
//!   credential.
//! - An existing machine is reinstalled with its own credential (the agent's `install` over an
//!   existing state dir), or with a **reinstall token** (`token create --reinstall MACHINE`):
//!   bound to that machine, used once; registering with it keeps the machine id, its disks and
//!   replica, and gives the machine a new credential (the old one stops working).
//! - A revoked machine stays revoked: no token un-revokes it; a reinstall token for it is refused
//!   (when created and when used) until an operator runs `machine unrevoke`.
//!
//! Also here: [`Kicker`], which ends a
//! machine's live session with its reason and notices two agents sharing one credential.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rehost_proto::{Hash, MachineId};
use rusqlite::{params, OptionalExtension};

use crate::catalog::{now, now_ms, secret_hash, Catalog, CatalogError};

/// What a registration did. (Registration order is the machines table's rowid order, which
/// the v5 rebuild keeps.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub machine: MachineId,
    /// A reinstall token re-registered this existing machine.
    pub reinstalled: bool,
    /// A new machine with the source id or hostname of this older one.
    pub duplicate_of: Option<String>,
}

/// Why a valid token still cannot register.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterRefusal {
    #[error("reinstall token {0} was already used (a reinstall token works once; create another with `rehost-server token create --reinstall MACHINE`)")]
    Used(String),
    #[error("reinstall token {0} is for machine {1}, which no longer exists")]
    MachineGone(String, String),
    #[error("machine {0} is revoked, and a reinstall does not undo that: run `rehost-server machine unrevoke {0}` first")]
    MachineRevoked(String),
}

impl Catalog {
    /// Registers with the install token `token_id` (already checked: known, not revoked, not
    /// expired), giving the machine `secret`: a new machine, or, for a reinstall token, its
    /// machine (once, and never a revoked one).
    pub fn register(
        &self,
        token_id: &str,
        hostname: &str,
        source_id: &Hash,
        secret: &[u8],
    ) -> Result<Result<Registered, RegisterRefusal>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let (bound, used): (Option<String>, i64) = tx.query_row(
                "SELECT machine_id, registrations FROM tokens WHERE id = ?1",
                [token_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let registered = match bound {
                None => {
                    let (machine, duplicate_of) =
                        crate::catalog::insert_machine(&tx, hostname, source_id, token_id, secret)?;
                    Registered {
                        machine,
                        reinstalled: false,
                        duplicate_of,
                    }
                }
                Some(_) if used > 0 => return Ok(Err(RegisterRefusal::Used(token_id.into()))),
                Some(m) => {
                    let revoked: Option<Option<i64>> = tx
                        .query_row("SELECT revoked_at FROM machines WHERE id = ?1", [&m], |r| {
                            r.get(0)
                        })
                        .optional()?;
                    let machine = match (revoked, MachineId::parse(&m)) {
                        (None, _) | (_, Err(_)) => {
                            return Ok(Err(RegisterRefusal::MachineGone(token_id.into(), m)))
                        }
                        (Some(Some(_)), _) => return Ok(Err(RegisterRefusal::MachineRevoked(m))),
                        (Some(None), Ok(id)) => id,
                    };
                    tx.execute(
                        "UPDATE machines SET hostname = ?2, source_id = ?3, secret_hash = ?4, token_id = ?5 WHERE id = ?1",
                        params![machine.as_str(), hostname, &source_id[..], secret_hash(secret), token_id],
                    )?;
                    Registered {
                        machine,
                        reinstalled: true,
                        duplicate_of: None,
                    }
                }
            };
            tx.execute(
                "UPDATE tokens SET registrations = registrations + 1 WHERE id = ?1",
                [token_id],
            )?;
            tx.commit()?;
            Ok(Ok(registered))
        })
    }

    /// Creates a reinstall token bound to `machine`. Refused (with the reason) when the machine
    /// does not exist or is revoked.
    pub fn create_reinstall_token(
        &self,
        id: &str,
        secret: &[u8],
        description: &str,
        expires_at: Option<i64>,
        machine: &MachineId,
    ) -> Result<Result<(), String>, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let revoked: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at FROM machines WHERE id = ?1",
                    [machine.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            match revoked {
                None => return Ok(Err(format!("no machine {machine}"))),
                Some(Some(_)) => {
                    return Ok(Err(RegisterRefusal::MachineRevoked(machine.to_string()).to_string()))
                }
                Some(None) => {}
            }
            tx.execute(
                "INSERT INTO tokens (id, secret_hash, description, created_at, expires_at, machine_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, secret_hash(secret), description, now(), expires_at, machine.as_str()],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    /// Lifts a machine's revocation. `None`: no such machine; `Some(false)`: it was not revoked.
    pub fn unrevoke_machine(&self, id: &MachineId) -> Result<Option<bool>, CatalogError> {
        self.with(|c| {
            let revoked: Option<Option<i64>> = c
                .query_row(
                    "SELECT revoked_at FROM machines WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            match revoked {
                None => Ok(None),
                Some(None) => Ok(Some(false)),
                Some(Some(_)) => {
                    c.execute(
                        "UPDATE machines SET revoked_at = NULL WHERE id = ?1",
                        [id.as_str()],
                    )?;
                    Ok(Some(true))
                }
            }
        })
    }
}

/// Why a machine's live session is ended from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection authenticated as the same machine; `shared` when this keeps happening
    /// to live sessions (two agents with one credential).
    Replaced { by: SocketAddr, shared: bool },
    /// The operator revoked the machine.
    Revoked,
    /// Replication of the machine stopped (cut over, archived): the reason, for the agent.
    Stopped(String),
}

/// A live session counts as replaced "while alive" if it received a frame this recently; a
/// connection that silently died (what a reconnecting agent legitimately replaces) has not.
const LIVE_WITHIN_MS: i64 = 15_000;
/// This many replacements of live sessions within [`SHARED_WINDOW_MS`] mean two agents share the
/// machine's credential.
pub const SHARED_AFTER: usize = 3;
const SHARED_WINDOW_MS: i64 = 10 * 60 * 1000;
/// At most one server WARN about a shared credential per machine in this long.
const WARN_EVERY_MS: i64 = 60_000;

struct Current {
    peer: SocketAddr,
    last_frame_ms: Arc<AtomicI64>,
}

#[derive(Default)]
struct History {
    current: Option<Current>,
    /// When live sessions of this machine were replaced, within the window.
    replaced_ms: VecDeque<i64>,
    last_warn_ms: i64,
}

/// Ends a machine's live session with a reason ([`Kick`]), and watches replacements.
pub struct Kicker {
    tx: tokio::sync::watch::Sender<Option<Kick>>,
    history: Mutex<History>,
}

impl Default for Kicker {
    fn default() -> Self {
        Self {
            tx: tokio::sync::watch::channel(None).0,
            history: Mutex::default(),
        }
    }
}

impl Kicker {
    /// Ends the live session, if any, with `why`. Never lost: the session watches a value.
    pub fn kick(&self, why: Kick) {
        self.tx.send_replace(Some(why));
    }

    /// Called by a session that now owns the machine: where its kicks come, and the clock it
    /// sets at each frame it receives.
    pub fn attach(
        &self,
        peer: SocketAddr,
    ) -> (tokio::sync::watch::Receiver<Option<Kick>>, Arc<AtomicI64>) {
        let last = Arc::new(AtomicI64::new(now_ms()));
        self.lock().current = Some(Current {
            peer,
            last_frame_ms: last.clone(),
        });
        let mut rx = self.tx.subscribe();
        rx.mark_unchanged();
        (rx, last)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a new session of the machine from `by` when another session still holds it:
    /// kicks that one, telling it (and the log) when the credential seems to be shared.
    pub fn replace(&self, machine: &MachineId, by: SocketAddr) {
        let now = now_ms();
        let mut h = self.lock();
        let (old_peer, live) = match &h.current {
            Some(c) => (
                Some(c.peer),
                now - c.last_frame_ms.load(Ordering::Relaxed) < LIVE_WITHIN_MS,
            ),
            None => (None, false),
        };
        while h
            .replaced_ms
            .front()
            .is_some_and(|t| now - t > SHARED_WINDOW_MS)
        {
            h.replaced_ms.pop_front();
        }
        if live {
            h.replaced_ms.push_back(now);
        }
        let shared = live && h.replaced_ms.len() >= SHARED_AFTER;
        if shared && now - h.last_warn_ms >= WARN_EVERY_MS {
            h.last_warn_ms = now;
            tracing::warn!(
                %machine,
                new = %by,
                old = ?old_peer,
                replacements = h.replaced_ms.len(),
                "another agent is using this machine's credential: its live sessions keep replacing each other (a cloned source or a copied agent state dir?)"
            );
        }
        drop(h);
        self.kick(Kick::Replaced { by, shared });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rehost_proto::msg::DiskInfo;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.sqlite")).unwrap();
        (dir, cat)
    }

    fn token(cat: &Catalog, id: &str) {
        cat.create_token(id, b"t", "", None).unwrap();
    }

    #[test]
    fn an_install_token_always_creates_a_new_machine_and_names_the_duplicate() {
        let (_d, cat) = catalog();
        token(&cat, "t1");
        let a = cat.register("t1", "web", &[1; 32], b"a").unwrap().unwrap();
        assert_eq!(a.duplicate_of, None);
        // Same source id and hostname: a new machine, the first keeps its credential.
        let b = cat.register("t1", "web", &[1; 32], b"b").unwrap().unwrap();
        assert_ne!(a.machine, b.machine);
        assert!(!b.reinstalled);
        assert_eq!(b.duplicate_of.as_deref(), Some(a.machine.as_str()));
        assert_eq!(cat.check_machine(&a.machine, b"a").unwrap(), Ok(()));
        assert!(cat.check_machine(&a.machine, b"b").unwrap().is_err());
        // Same hostname only is a duplicate too.
        let c = cat.register("t1", "web", &[2; 32], b"c").unwrap().unwrap();
        assert_eq!(c.duplicate_of.as_deref(), Some(a.machine.as_str()));
        let rows = cat.machines().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].0.duplicate_of, None);
        assert_eq!(rows[1].0.duplicate_of.as_deref(), Some(a.machine.as_str()));
    }

    #[test]
    fn no_token_unrevokes_a_machine_and_unrevoke_does() {
        let (_d, cat) = catalog();
        token(&cat, "t1");
        let a = cat.register("t1", "web", &[1; 32], b"a").unwrap().unwrap();
        assert!(cat.revoke_machine(a.machine.as_str()).unwrap());
        let b = cat.register("t1", "web", &[1; 32], b"b").unwrap().unwrap();
        assert_ne!(b.machine, a.machine);
        assert_eq!(
            cat.check_machine(&a.machine, b"a").unwrap(),
            Err(crate::catalog::Refusal::Revoked)
        );
        // A reinstall token for a revoked machine is refused, with the way out.
        let why = cat
            .create_reinstall_token("r1", b"r", "", None, &a.machine)
            .unwrap()
            .unwrap_err();
        assert!(why.contains("unrevoke"), "{why}");
        assert_eq!(cat.unrevoke_machine(&a.machine).unwrap(), Some(true));
        assert_eq!(cat.unrevoke_machine(&a.machine).unwrap(), Some(false));
        assert_eq!(cat.check_machine(&a.machine, b"a").unwrap(), Ok(()));
        assert_eq!(cat.unrevoke_machine(&MachineId::random()).unwrap(), None);
    }

    #[test]
    fn a_reinstall_token_works_once_for_its_machine_and_keeps_its_disks() {
        let (_d, cat) = catalog();
        token(&cat, "t1");
        let a = cat.register("t1", "web", &[1; 32], b"a").unwrap().unwrap();
        let disks = [DiskInfo {
            device: "/dev/vda".into(),
            size_bytes: 1 << 20,
        }];
        let before = cat.ensure_disks(&a.machine, &disks, 65536).unwrap();
        cat.create_reinstall_token("r1", b"r", "", None, &a.machine)
            .unwrap()
            .unwrap();
        let r = cat
            .register("r1", "web-renamed", &[9; 32], b"new")
            .unwrap()
            .unwrap();
        assert_eq!(r.machine, a.machine);
        assert!(r.reinstalled);
        assert!(cat.check_machine(&a.machine, b"a").unwrap().is_err());
        assert_eq!(cat.check_machine(&a.machine, b"new").unwrap(), Ok(()));
        let after = cat.ensure_disks(&a.machine, &disks, 65536).unwrap();
        assert_eq!(before[0].id, after[0].id);
        assert_eq!(cat.machines().unwrap().len(), 1);
        // Used once.
        assert_eq!(
            cat.register("r1", "web", &[1; 32], b"x").unwrap(),
            Err(RegisterRefusal::Used("r1".into()))
        );
        // Revoked after the token was made: refused when used.
        cat.create_reinstall_token("r2", b"r", "", None, &a.machine)
            .unwrap()
            .unwrap();
        cat.revoke_machine(a.machine.as_str()).unwrap();
        assert_eq!(
            cat.register("r2", "web", &[1; 32], b"x").unwrap(),
            Err(RegisterRefusal::MachineRevoked(a.machine.to_string()))
        );
        assert!(cat
            .create_reinstall_token("r3", b"r", "", None, &MachineId::random())
            .unwrap()
            .is_err());
    }

    #[test]
    fn a_failed_volume_leaves_no_disk_row() {
        let (_d, cat) = catalog();
        token(&cat, "t1");
        let a = cat.register("t1", "web", &[1; 32], b"a").unwrap().unwrap();
        let disks = [
            DiskInfo {
                device: "/dev/vda".into(),
                size_bytes: 1 << 20,
            },
            DiskInfo {
                device: "/dev/vdb".into(),
                size_bytes: 1 << 20,
            },
        ];
        let r = cat
            .ensure_disks_with(&a.machine, &disks, 65536, |row, new| {
                assert!(new);
                if row.device == "/dev/vdb" {
                    Err("no space")
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(r.unwrap_err(), "no space");
        assert!(cat.machines().unwrap()[0].1.is_empty());
    }

    #[test]
    fn a_version_4_catalog_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "{} PRAGMA user_version = 4;",
                crate::catalog::LADDER[..4].join("\n")
            ))
            .unwrap();
            c.execute_batch(
                "INSERT INTO tokens (id, secret_hash, created_at, registrations) VALUES ('t', x'00', 1, 1);
                 INSERT INTO machines (id, hostname, source_id, secret_hash, token_id, registered_at, revoked_at, lifecycle, max_mbps)
                   VALUES ('m-0000000000000001', 'old-host', x'01', x'02', 't', 1, 7, 'ready-for-testing', 50);
                 INSERT INTO disks (machine_id, device, size_bytes, block_size, durable_bytes, sync_complete)
                   VALUES ('m-0000000000000001', '/dev/vda', 4096, 4096, 4096, 1);
                 INSERT INTO snapshots (machine_id, created_at, completed_at, consistency, state)
                   VALUES ('m-0000000000000001', 2, 3, 'crash', 'complete');
                 INSERT INTO blueprints (machine_id, body) VALUES ('m-0000000000000001', '{}');",
            )
            .unwrap();
        }
        let cat = Catalog::open(&path).unwrap();
        let v: i64 = cat
            .with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        // Climbed every later step too.
        assert_eq!(v, crate::catalog::SCHEMA_VERSION);
        let (m, disks) = &cat.machines().unwrap()[0];
        assert_eq!(
            (m.hostname.as_str(), m.revoked_at, m.lifecycle.as_str()),
            ("old-host", Some(7), "ready-for-testing")
        );
        assert_eq!(cat.max_mbps(&m.id).unwrap(), Some(50));
        assert_eq!(disks.len(), 1);
        assert!(disks[0].sync_complete);
        assert_eq!(cat.snapshots(&m.id).unwrap().len(), 1);
        let fk: bool = cat
            .with(|c| c.pragma_query_value(None, "foreign_keys", |r| r.get(0)))
            .unwrap();
        assert!(fk, "foreign keys are on again after the migration");
        // A second machine of the same name is no longer merged into the old one.
        let (second, dup) = cat
            .register_machine("old-host", &[1; 32], "t", b"s")
            .unwrap();
        assert_ne!(second.as_str(), m.id);
        assert_eq!(dup.as_deref(), Some(m.id.as_str()));
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.machines().unwrap().len(), 2);
    }

    #[test]
    fn only_repeated_replacements_of_live_sessions_count_as_sharing() {
        let k = Kicker::default();
        let m = MachineId::random();
        let (a, b): (SocketAddr, SocketAddr) =
            ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        // A dead predecessor (no frame for long) is replaced without suspicion, however often.
        for _ in 0..5 {
            let (mut rx, last) = k.attach(a);
            last.store(now_ms() - 60_000, Ordering::Relaxed);
            k.replace(&m, b);
            assert!(rx.has_changed().unwrap());
            assert_eq!(
                rx.borrow_and_update().clone(),
                Some(Kick::Replaced {
                    by: b,
                    shared: false
                })
            );
        }
        // Live sessions replaced again and again: shared from the SHARED_AFTER-th time.
        for i in 1..=SHARED_AFTER + 1 {
            let (rx, _) = k.attach(if i % 2 == 0 { a } else { b });
            k.replace(&m, if i % 2 == 0 { b } else { a });
            let Some(Kick::Replaced { shared, .. }) = rx.borrow().clone() else {
                panic!("kicked")
            };
            assert_eq!(shared, i >= SHARED_AFTER, "replacement {i}");
        }
    }
}
