//! Which recovery point an operator or a launch means: by id, or `latest` (the newest complete
//! one).

use super::SnapshotInfo;

/// A snapshot of `snaps` by id or `latest` (the newest complete one).
pub fn select<'a>(snaps: &'a [SnapshotInfo], sel: &str) -> Result<&'a SnapshotInfo, String> {
    if sel == "latest" {
        return snaps
            .iter()
            .rev()
            .find(|s| s.state == crate::states::SnapshotState::Complete)
            .ok_or_else(|| "no complete snapshot yet".to_string());
    }
    let id: i64 = sel
        .parse()
        .map_err(|_| format!("`{sel}` is neither a snapshot id nor `latest`"))?;
    snaps
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(|| format!("no snapshot {id} of this machine"))
}
