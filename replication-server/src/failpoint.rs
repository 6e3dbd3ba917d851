//! Failpoints for crash tests: with the `failpoints` feature, `REHOST_FAILPOINT=NAME` makes the
//! process abort when it reaches the point called NAME. Without the feature (release builds)
//! [`hit`] compiles to nothing.
//!
//! Points: `snapshot-after-chunks` (a snapshot's objects are durable, the catalog still says
//! `creating`), `gc-mid-sweep` (GC removed some unreferenced objects, not all).

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var("REHOST_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
