//! Failpoints for crash tests: in debug builds (what `cargo build` and the end-to-end tests use) or
//! with the `failpoints` feature, `REHOST_FAILPOINT=NAME` makes the process abort when it reaches
//! the point called NAME. In release builds without the feature [`hit`] compiles to nothing.
//!
//! Points: `snapshot-after-chunks` (a snapshot's objects are durable, the catalog still says
//! `creating`), `gc-mid-sweep` (GC removed some unreferenced objects, not all),
//! `quarantine-mid-way` (the first of several damaged chunks is quarantined, the others not).

#[cfg(any(feature = "failpoints", debug_assertions))]
pub fn hit(name: &str) {
    if std::env::var("REHOST_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(not(any(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn hit(_name: &str) {}
