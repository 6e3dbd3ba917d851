//! Rebuilds the agent when the version stamp `REHOST_AGENT_VERSION` (see `VERSION` in lib.rs)
//! changes.
fn main() {
    println!("cargo:rerun-if-env-changed=REHOST_AGENT_VERSION");
}
