//! Plan-run benchmark (not run in CI; root, QEMU, debootstrap): what running a machine through a
//! recovery plan's drill adds to launching it alone. One bootable Debian machine (the
//! converter's fixture on a loop device, replicated by the real agent) is launched, each round,
//! first alone (`launch --mode test --wait`: the baseline) and then as the one machine of a plan's
//! drill (`plan drill --wait`), both booting under TCG. Prints each round's two times, their
//! difference and ratio, and the step line of the run's log (the slowest launch, the guest's boot,
//! and the time beyond the boot).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p rehost-tests --bench plan_run                       # 2 rounds
//! REHOST_BENCH_ROUNDS=5 cargo bench -p rehost-tests --bench plan_run
//! ```

use std::time::{Duration, Instant};

use rehost_tests::*;

#[path = "../tests/launch_env/mod.rs"]
mod launch_env;
use launch_env::{tcg_blueprint, tools_ready, Source};

fn main() {
    if !tools_ready() {
        return;
    }
    let rounds: usize = std::env::var("REHOST_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let tmp = tempfile::Builder::new()
        .prefix("rehost-benchplan")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path();
    let server = Server::start(dir);
    let source = Source::new(dir);
    let (_agent, _id, _trace) = replicate(&server, dir, "bench", &[&source.dev], &[]);
    tcg_blueprint(&server, "bench", "qemu", &dir.join("targets"));
    wait_until("the initial sync", Duration::from_secs(300), || {
        let v = server.json(&["machines", "--json"]);
        (v["machines"][0]["lifecycle"] == "ready-for-testing").then_some(())
    });
    server.ok(&["snapshot", "create", "bench", "--wait"]);
    server.ok(&["plan", "create", "bench"]);
    server.ok(&["plan", "add", "bench", "bench", "--step", "1"]);
    // The drill runs on the plan's test network; the lone launch gets the same.
    server.ok(&["blueprint", "set", "bench", "--network", "none"]);
    let timed = |args: &[&str]| {
        let t = Instant::now();
        let out = server.ok(args);
        (t.elapsed().as_secs_f64(), out)
    };
    println!("round  alone_s  in_plan_s  plan_minus_alone_s  ratio  step line");
    for round in 1..=rounds {
        let (alone, _) = timed(&["launch", "bench", "--mode", "test", "--wait"]);
        let (in_plan, log) = timed(&["plan", "drill", "bench", "--wait"]);
        let step = log
            .lines()
            .find(|l| l.contains("step 1 done in"))
            .map(|l| {
                l.split("step 1 done in")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        println!(
            "{round:>5}  {alone:>7.1}  {in_plan:>9.1}  {:>18.1}  {:>5.3}  step 1 done in {step}",
            in_plan - alone,
            in_plan / alone
        );
        server.ok(&["plan", "cleanup", "bench"]);
    }
}
