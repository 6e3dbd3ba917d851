//! The states of what the server keeps, as types: a machine's [`Lifecycle`] (with the table of
//! its allowed transitions), a recovery point's [`SnapshotState`] and [`Consistency`], a launch
//! job's [`JobMode`] and [`JobState`], what a recovery plan's step waits for ([`StepWait`]) and
//! when its hooks run ([`HookKind`]). Their serde and catalog names are the strings the catalog
//! stores and `--json` prints. This module is at the bottom of the server: it imports nothing of
//! the crate, and every layer may use it.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// Declares a string-named enum: `as_str`, `Display`, `FromStr` (the error names the value and
/// the accepted ones), `ALL`, and its SQLite mapping. Its serde names come from the same strings.
macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $s:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $s)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownState {
                        what: $what,
                        value: s.to_string(),
                        known: &[$($s,)+],
                    }),
                }
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e: UnknownState| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

/// A state name that is not one of its type's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a {what} (one of {})", known.join(", "))]
pub struct UnknownState {
    pub what: &'static str,
    pub value: String,
    pub known: &'static [&'static str],
}

named_enum! {
    /// Where a machine is in its migration. The allowed moves are [`TRANSITIONS`]:
    ///
    /// ```text
    ///                  initial sync
    ///   not-ready ─────────────────────▶ ready-for-testing ◀──────────── revert ─────────┐
    ///       │                             │  ▲      │  ▲                                │
    ///       │                    test launch  │  mark │  │ mark (from archived)         │
    ///       │                             ▼  │      ▼  │                                │
    ///       │            failed test ── testing ──mark──▶ ready-for-cutover ──revert────┤
    ///       │                             │  ▲ ◀── test launch ──┘   │                  │
    ///       │                 cutover launch  └─ failed cutover ─┐   │ cutover launch   │
    ///       │                             ▼                      │   ▼                  │
    ///       │                        cutting-over ───────────────┴───┘                  │
    ///       │                             │ cutover succeeded                           │
    ///       │                             ▼                                             │
    ///       │                      cutover-complete                                     │
    ///       │                             │                                             │
    ///       └──── mark archived ──────────┴──▶ archived ────────── mark ────────────────┘
    /// ```
    ///
    /// (`archived` is reached by `mark` from every state but `cutting-over`; a job that fails
    /// puts the machine back where it was when the job began, or in `ready-for-testing` when it
    /// removed the test target.)
    Lifecycle, "lifecycle state" {
        NotReady = "not-ready",
        ReadyForTesting = "ready-for-testing",
        Testing = "testing",
        ReadyForCutover = "ready-for-cutover",
        CuttingOver = "cutting-over",
        CutoverComplete = "cutover-complete",
        Archived = "archived",
    }
}

/// A new machine's state (the catalog's column default).
impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::NotReady
    }
}

/// What moves a machine from one lifecycle state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Every disk finished its initial sync.
    InitialSync,
    /// A launch job of this mode began.
    Launch(JobMode),
    /// A launch job of this mode succeeded.
    Succeeded(JobMode),
    /// A launch job failed, or was interrupted by a server stop: the machine goes back.
    Failed,
    /// `revert MACHINE`: the test target is removed.
    Revert,
    /// `mark MACHINE STATE`, by the operator.
    Mark,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::InitialSync => f.write_str("the end of the initial sync"),
            Cause::Launch(m) => write!(f, "a {m} launch"),
            Cause::Succeeded(m) => write!(f, "a succeeded {m} launch"),
            Cause::Failed => f.write_str("a failed launch"),
            Cause::Revert => f.write_str("a revert"),
            Cause::Mark => f.write_str("mark"),
        }
    }
}

use Cause::*;
use Lifecycle::*;

/// Every allowed lifecycle move: (from, to, cause). Staying in the same state is always allowed
/// and records nothing. For a cause and a target, the order of the sources here is the order in
/// which refusals list them.
pub const TRANSITIONS: &[(Lifecycle, Lifecycle, Cause)] = &[
    (NotReady, ReadyForTesting, InitialSync),
    (ReadyForTesting, Testing, Launch(JobMode::Test)),
    (Testing, Testing, Launch(JobMode::Test)),
    (ReadyForCutover, Testing, Launch(JobMode::Test)),
    (Testing, CuttingOver, Launch(JobMode::Cutover)),
    (ReadyForCutover, CuttingOver, Launch(JobMode::Cutover)),
    (Testing, Testing, Succeeded(JobMode::Test)),
    (CuttingOver, CutoverComplete, Succeeded(JobMode::Cutover)),
    (Testing, ReadyForTesting, Failed),
    (Testing, ReadyForCutover, Failed),
    (CuttingOver, Testing, Failed),
    (CuttingOver, ReadyForCutover, Failed),
    (CuttingOver, ReadyForTesting, Failed),
    (Testing, ReadyForTesting, Revert),
    (ReadyForCutover, ReadyForTesting, Revert),
    (ReadyForTesting, ReadyForCutover, Mark),
    (Testing, ReadyForCutover, Mark),
    (ReadyForCutover, ReadyForTesting, Mark),
    (Archived, ReadyForTesting, Mark),
    (NotReady, Archived, Mark),
    (ReadyForTesting, Archived, Mark),
    (Testing, Archived, Mark),
    (ReadyForCutover, Archived, Mark),
    (CutoverComplete, Archived, Mark),
];

/// A lifecycle move that [`TRANSITIONS`] does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a machine cannot go from {from} to {to} by {cause}")]
pub struct IllegalTransition {
    pub from: Lifecycle,
    pub to: Lifecycle,
    pub cause: Cause,
}

impl Lifecycle {
    /// Whether `cause` may move a machine from `self` to `to`.
    pub fn check(self, to: Lifecycle, cause: Cause) -> Result<(), IllegalTransition> {
        if self == to || TRANSITIONS.contains(&(self, to, cause)) {
            Ok(())
        } else {
            Err(IllegalTransition {
                from: self,
                to,
                cause,
            })
        }
    }

    /// The states from which `cause` may move a machine to `to`, in table order.
    pub fn sources(to: Lifecycle, cause: Cause) -> Vec<Lifecycle> {
        TRANSITIONS
            .iter()
            .filter(|(_, t, c)| *t == to && *c == cause)
            .map(|(f, _, _)| *f)
            .collect()
    }

    /// The state `cause` moves a machine to from `self`, when there is exactly one.
    pub fn target(self, cause: Cause) -> Option<Lifecycle> {
        let mut to = TRANSITIONS
            .iter()
            .filter(|(f, _, c)| *f == self && *c == cause)
            .map(|(_, t, _)| *t);
        match (to.next(), to.next()) {
            (Some(t), None) => Some(t),
            _ => None,
        }
    }

    /// A machine in this state has no replication any more: its agent is refused.
    pub fn ends_replication(self) -> bool {
        matches!(self, CutoverComplete | Archived)
    }
}

named_enum! {
    /// The two kinds of launch job.
    JobMode, "launch mode" {
        Test = "test",
        Cutover = "cutover",
    }
}

impl JobMode {
    /// Lifecycles a launch of this mode may start from.
    pub fn allowed_from(self) -> Vec<Lifecycle> {
        let to = self.running_state();
        TRANSITIONS
            .iter()
            .filter(|(_, t, c)| *t == to && *c == Launch(self))
            .map(|(f, _, _)| *f)
            .collect()
    }

    /// The lifecycle of a machine while a launch of this mode runs.
    pub fn running_state(self) -> Lifecycle {
        match self {
            JobMode::Test => Testing,
            JobMode::Cutover => CuttingOver,
        }
    }

    /// The lifecycle a succeeded launch of this mode leaves.
    pub fn done_state(self) -> Lifecycle {
        match self {
            JobMode::Test => Testing,
            JobMode::Cutover => CutoverComplete,
        }
    }
}

named_enum! {
    /// A launch job: running until it ends, succeeded or failed (an interrupted job is failed).
    JobState, "job state" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
    }
}

named_enum! {
    /// A recovery point's row: `creating` until every object is durable, `complete` once usable,
    /// `deleting` while it is removed. Startup removes what is not complete.
    SnapshotState, "snapshot state" {
        Creating = "creating",
        Complete = "complete",
        Deleting = "deleting",
    }
}

named_enum! {
    /// How consistent a recovery point is.
    Consistency, "consistency" {
        /// A point in the stream with no cooperation from the source.
        Crash = "crash",
        /// A point the agent made with the source's filesystems frozen.
        App = "app",
    }
}

named_enum! {
    /// What the next step of a recovery plan waits for once a machine of this step is launched.
    StepWait, "wait" {
        /// The machine's boot marker on its serial console.
        Boot = "boot",
        /// Nothing: the next step may start at once.
        None = "none",
    }
}

named_enum! {
    /// When a recovery plan's hook runs: before the machines of its step launch, or after.
    HookKind, "hook kind" {
        Pre = "pre",
        Post = "post",
    }
}

named_enum! {
    /// What a run of a recovery plan does: a drill launches test targets on the plan's test
    /// network while replication goes on; a failover cuts every machine over onto the production
    /// network, after the sources' own actions and a final group point (planned) or from the
    /// latest point, no source contacted (unplanned).
    RunMode, "plan run mode" {
        Drill = "drill",
        FailoverPlanned = "failover-planned",
        FailoverUnplanned = "failover-unplanned",
    }
}

impl RunMode {
    /// The launch mode of each machine of a run of this mode.
    pub fn job_mode(self) -> JobMode {
        match self {
            RunMode::Drill => JobMode::Test,
            RunMode::FailoverPlanned | RunMode::FailoverUnplanned => JobMode::Cutover,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_serde_and_sql() {
        for l in Lifecycle::ALL {
            assert_eq!(l.as_str().parse::<Lifecycle>().unwrap(), *l);
            assert_eq!(
                serde_json::to_value(l).unwrap(),
                serde_json::json!(l.as_str())
            );
        }
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let back: JobState = c
            .query_row("SELECT ?1", [JobState::Succeeded], |r| r.get(0))
            .unwrap();
        assert_eq!(back, JobState::Succeeded);
        let bad = c.query_row("SELECT 'lost'", [], |r| r.get::<_, SnapshotState>(0));
        assert!(bad.is_err());
        assert_eq!(
            "lost".parse::<JobMode>().unwrap_err().to_string(),
            "`lost` is not a launch mode (one of test, cutover)"
        );
    }

    #[test]
    fn the_table_gives_the_launch_and_mark_sources_in_their_documented_order() {
        assert_eq!(
            JobMode::Test.allowed_from(),
            [ReadyForTesting, Testing, ReadyForCutover]
        );
        assert_eq!(JobMode::Cutover.allowed_from(), [Testing, ReadyForCutover]);
        assert_eq!(
            Lifecycle::sources(ReadyForCutover, Mark),
            [ReadyForTesting, Testing]
        );
        assert_eq!(
            Lifecycle::sources(ReadyForTesting, Mark),
            [ReadyForCutover, Archived]
        );
        assert_eq!(
            Lifecycle::sources(Archived, Mark),
            [
                NotReady,
                ReadyForTesting,
                Testing,
                ReadyForCutover,
                CutoverComplete
            ]
        );
    }

    #[test]
    fn an_illegal_move_names_both_states() {
        let e = CutoverComplete
            .check(Testing, Launch(JobMode::Test))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a machine cannot go from cutover-complete to testing by a test launch"
        );
        assert!(NotReady.check(NotReady, Mark).is_ok());
        assert_eq!(NotReady.target(InitialSync), Some(ReadyForTesting));
        assert_eq!(Testing.target(Failed), None);
    }

    #[test]
    fn every_state_but_archived_is_reached_from_not_ready() {
        let mut seen = vec![NotReady];
        let mut i = 0;
        while i < seen.len() {
            for (f, t, _) in TRANSITIONS {
                if *f == seen[i] && !seen.contains(t) {
                    seen.push(*t);
                }
            }
            i += 1;
        }
        assert_eq!(seen.len(), Lifecycle::ALL.len());
    }
}
