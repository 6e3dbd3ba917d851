//! Why a launch step failed. The text of each is the line the job log and `jobs JOB` show, so
//! these errors are printed with `Display` alone (the causes are part of it).

use std::path::PathBuf;

use rehost_proto::error::chain;

use super::target::TargetError;
use crate::catalog::CatalogError;
use crate::snapshot::SnapshotError;
use crate::task::TaskFailed;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The catalog could not be read or written.
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    /// A blocking task of the step panicked.
    #[error("task failed: {0}")]
    Task(#[from] TaskFailed),
    /// The recovery point asked for, or the one the launch needs, cannot be used.
    #[error("{0}")]
    Point(String),
    /// Taking a recovery point for the launch failed.
    #[error("snapshot failed: {}", chain(.0))]
    Snapshot(SnapshotError),
    /// Exporting a disk of the point failed.
    #[error("export {device}: {}", chain(.error))]
    Export {
        device: String,
        error: SnapshotError,
    },
    /// A file or directory of the target could not be made.
    #[error("{action} {}: {error}", .path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The converter could not run, or failed (its own words when it gave them).
    #[error("{0}")]
    Conversion(String),
    /// What the target needs is missing (firmware, an output image).
    #[error("{0}")]
    Target(String),
    /// The VM or libvirt domain did not start.
    #[error("launch failed: {}", chain(.0))]
    Launch(TargetError),
    /// The target did not show its boot marker.
    #[error("boot check failed: {0}")]
    BootCheck(String),
    /// A planned cutover's source action failed before the final point.
    #[error("source action failed: {0}; no cutover was made and the source keeps running")]
    SourceAction(SourceActionError),
}

impl StepError {
    pub(super) fn file(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| StepError::File {
            action,
            path,
            error,
        }
    }
}

/// Why a source action (stop services, power off) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SourceActionError {
    #[error("the machine's agent is not connected")]
    NotConnected,
    #[error("the machine's agent disconnected")]
    Disconnected,
    #[error("the agent's session ended before it answered")]
    SessionEnded,
    #[error("no answer within {0} s")]
    NoAnswer(u64),
    /// The agent's own words.
    #[error("{0}")]
    Refused(String),
}
