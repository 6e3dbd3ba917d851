//! Progress lines for `rehost-agent run` while a disk is in its initial sync or a rescan:
//! percent, rate and time left, logged every few seconds on a terminal and every
//! [`QUIET_EVERY`] otherwise (a journal gets a line now and then, not a flood).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehost_proto::msg::ReplicationState;

use crate::disks::human_bytes;
use crate::replicate::Agent;

/// Between lines when stderr is a terminal.
pub const TERMINAL_EVERY: Duration = Duration::from_secs(5);
/// Between lines when stderr is a file or the journal.
pub const QUIET_EVERY: Duration = Duration::from_secs(20);

/// The interval for this process's stderr.
pub fn interval() -> Duration {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        TERMINAL_EVERY
    } else {
        QUIET_EVERY
    }
}

/// A rate estimate per disk: bytes done at the previous sample, smoothed bytes per second.
#[derive(Debug, Default)]
pub struct Rates {
    last: HashMap<(u64, String), (Instant, u64, Option<f64>)>,
}

impl Rates {
    /// Records `done` bytes of the phase `what` of `disk` at `now`; returns the smoothed rate in
    /// bytes per second once two samples exist.
    pub fn sample(&mut self, disk: u64, what: &str, done: u64, now: Instant) -> Option<f64> {
        let key = (disk, what.to_string());
        let rate = match self.last.get(&key) {
            Some((t, d, prev)) if now > *t && done >= *d => {
                let r = (done - d) as f64 / (now - *t).as_secs_f64();
                Some(match prev {
                    Some(p) => 0.5 * p + 0.5 * r,
                    None => r,
                })
            }
            _ => None,
        };
        self.last.insert(key, (now, done, rate));
        rate
    }
}

/// `3 min 20 s`, `2 h 5 min`, `40 s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// One progress line: `initial sync of /dev/vdb: 42.3% (8.5 GiB of 20.0 GiB), 112.0 MiB/s,
/// about 1 min 50 s left`.
pub fn line(what: &str, device: &str, done: u64, size: u64, rate: Option<f64>) -> String {
    let pct = if size == 0 {
        100.0
    } else {
        (done as f64 * 1000.0 / size as f64).floor() / 10.0
    };
    let mut s = format!(
        "{what} of {device}: {pct:.1}% ({} of {})",
        human_bytes(done),
        human_bytes(size)
    );
    match rate {
        Some(r) if r >= 1.0 => {
            let left = (size.saturating_sub(done) as f64 / r).ceil() as u64;
            s.push_str(&format!(
                ", {}/s, about {} left",
                human_bytes(r as u64),
                human_duration(left)
            ));
        }
        Some(_) => s.push_str(", no progress since the last report"),
        None => s.push_str(", rate not known yet"),
    }
    s
}

/// Logs a progress line per disk in initial sync or rescan every `every`, for the life of the
/// daemon.
pub async fn report(agent: Arc<Agent>, every: Duration) {
    let mut rates = Rates::default();
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let now = Instant::now();
        let disks = agent
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disks
            .clone();
        for d in disks {
            let (what, done) = match d.state {
                ReplicationState::InitialSync => ("initial sync", d.replicated_bytes),
                ReplicationState::Rescan => (
                    "rescan",
                    (d.progress_percent / 100.0 * d.size_bytes as f64) as u64,
                ),
                _ => continue,
            };
            let rate = rates.sample(d.disk_id, what, done, now);
            tracing::info!("{}", line(what, &d.device, done, d.size_bytes, rate));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_percent_rate_and_time_left() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        assert_eq!(r.sample(1, "initial sync", 0, t0), None);
        let rate = r
            .sample(1, "initial sync", 100 << 20, t0 + Duration::from_secs(10))
            .expect("two samples give a rate");
        assert!((rate - 10.0 * 1024.0 * 1024.0).abs() < 1.0, "{rate}");
        let l = line("initial sync", "/dev/vdb", 100 << 20, 1 << 30, Some(rate));
        assert_eq!(
            l,
            "initial sync of /dev/vdb: 9.7% (100.0 MiB of 1.0 GiB), 10.0 MiB/s, about 1 min 33 s left"
        );
        assert!(line("rescan", "/dev/vdb", 0, 10, None).ends_with("rate not known yet"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(40), "40 s");
        assert_eq!(human_duration(200), "3 min 20 s");
        assert_eq!(human_duration(7500), "2 h 5 min");
    }
}
