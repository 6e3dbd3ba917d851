//! Boot proof: start an image under QEMU (TCG by default: KVM cannot boot Linux guests on every host)
//! with a virtio disk and a virtio NIC on QEMU's user network, watch the serial console for a success
//! marker (a login prompt or a given string) or a known failure (initramfs shell, kernel panic), then
//! stop QEMU. The image is attached with `snapshot=on`, so the boot writes nothing to it.

use crate::report::BootCheckResult;
use crate::sys::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Serial console texts that mean the boot failed.
pub const FAILURE_MARKERS: &[&str] = &[
    "does not exist.  Dropping to a shell",
    "Dropping to a shell",
    "Kernel panic",
    "You are in emergency mode",
    "Give root password for maintenance",
    "Gave up waiting for root",
    "No bootable device",
    "error: no such device",
];

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    /// "raw" or "qcow2".
    pub format: String,
    pub timeout: Duration,
    /// Any of these on the console means success.
    pub markers: Vec<String>,
    pub serial_log: PathBuf,
    /// "tcg" or "kvm".
    pub accel: String,
    pub memory_mib: u32,
}

/// Errors starting QEMU (a guest that does not boot is not an error, it is a result).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("start qemu-system-x86_64 (is the qemu-system-x86 package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("read serial log {0}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// First IPv4 address other than loopback printed as `inet A.B.C.D/N` on the console.
pub fn guest_ipv4(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("inet ")?;
        let addr = rest.split('/').next()?.trim();
        (!addr.starts_with("127.") && addr.parse::<std::net::Ipv4Addr>().is_ok())
            .then(|| addr.to_string())
    })
}

fn read_log(path: &Path) -> Result<String, BootError> {
    match std::fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(BootError::Log(path.to_path_buf(), e)),
    }
}

/// Boot the image and report what the console showed.
pub fn boot(o: &BootOptions) -> Result<BootCheckResult, BootError> {
    let _ = std::fs::remove_file(&o.serial_log);
    let drive = format!(
        "file={},format={},if=virtio,snapshot=on,cache=unsafe",
        o.image.display(),
        o.format
    );
    let mut child = Command::new("qemu-system-x86_64");
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .args([
            "-accel",
            &o.accel,
            "-m",
            &o.memory_mib.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        // Keep a VGA device: GRUB on BIOS hangs after "Welcome to GRUB!" on a machine without one.
        .args(["-vga", "std"])
        .args(["-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", o.serial_log.display()))
        .args(["-drive", &drive])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BootError::Spawn)?;
    let _guard = ChildGuard::new(child.id());
    crate::progress::step(&format!(
        "boot check: booting {} under QEMU ({}), waiting up to {} s for {}; console in {}",
        o.image.display(),
        o.accel,
        o.timeout.as_secs(),
        o.markers.join(" or "),
        o.serial_log.display()
    ));
    let mut waiting = |elapsed: Duration, last: &str| {
        crate::progress::note(&waiting_line(&o.markers, elapsed, o.timeout, last));
    };
    let w = watch_reporting(
        &o.serial_log,
        &o.markers,
        o.timeout,
        &mut waiting,
        &mut || {
            let status = child.try_wait().ok().flatten()?;
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            Some(format!("qemu exited ({status}) {}", err.trim()))
        },
    )?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(BootCheckResult {
        booted: w.booted,
        seconds: w.seconds,
        evidence: w.evidence,
        guest_ipv4: w.guest_ipv4,
        serial_log: o.serial_log.display().to_string(),
    })
}

/// What a serial console showed while a guest booted.
#[derive(Debug, Clone)]
pub struct Watched {
    /// A success marker was seen (else a failure marker, the VM's end, or the timeout).
    pub booted: bool,
    /// Which marker was seen, or why the boot counts as failed.
    pub evidence: String,
    pub seconds: f64,
    pub guest_ipv4: Option<String>,
}

/// Watches the serial console log of a booting guest (however it was started) until it shows one
/// of `markers` (booted), a known failure ([`FAILURE_MARKERS`]), the VM ends (`exited` returns
/// why), or `timeout` passes.
pub fn watch(
    serial_log: &Path,
    markers: &[String],
    timeout: Duration,
    exited: &mut dyn FnMut() -> Option<String>,
) -> Result<Watched, BootError> {
    watch_reporting(serial_log, markers, timeout, &mut |_, _| {}, exited)
}

/// How often [`watch_reporting`] says that it is still waiting.
pub const WAITING_EVERY: Duration = Duration::from_secs(10);

/// "still waiting for login: or REHOST-BOOT-OK (30 s of 120 s); console: <last line>".
pub fn waiting_line(
    markers: &[String],
    elapsed: Duration,
    timeout: Duration,
    last: &str,
) -> String {
    format!(
        "still waiting for {} ({} s of {} s); console: {}",
        markers.join(" or "),
        elapsed.as_secs(),
        timeout.as_secs(),
        if last.is_empty() {
            "(nothing yet)"
        } else {
            last
        }
    )
}

/// The last line of a serial console log with text in it, without control characters (escape
/// sequences, carriage returns), at most 120 characters.
pub fn last_console_line(log: &str) -> String {
    let line = log
        .split(['\n', '\r'])
        .rev()
        .map(|l| {
            // Drop ANSI CSI sequences (ESC [ ... final byte), then any other control character.
            let mut out = String::new();
            let mut chars = l.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    if chars.peek() == Some(&'[') {
                        chars.next();
                        for d in chars.by_ref() {
                            if ('@'..='~').contains(&d) {
                                break;
                            }
                        }
                    }
                    continue;
                }
                if !c.is_control() {
                    out.push(c);
                }
            }
            out.trim().to_string()
        })
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    if line.chars().count() > 120 {
        format!("{}…", line.chars().take(120).collect::<String>())
    } else {
        line
    }
}

/// [`watch`], calling `waiting(elapsed, last console line)` every [`WAITING_EVERY`] while no
/// marker has shown up.
pub fn watch_reporting(
    serial_log: &Path,
    markers: &[String],
    timeout: Duration,
    waiting: &mut dyn FnMut(Duration, &str),
    exited: &mut dyn FnMut() -> Option<String>,
) -> Result<Watched, BootError> {
    let start = Instant::now();
    let mut next_report = WAITING_EVERY;
    let (booted, evidence) = loop {
        std::thread::sleep(Duration::from_millis(250));
        let log = read_log(serial_log)?;
        if start.elapsed() >= next_report && start.elapsed() < timeout {
            waiting(start.elapsed(), &last_console_line(&log));
            next_report += WAITING_EVERY;
        }
        if let Some(m) = markers.iter().find(|m| log.contains(m.as_str())) {
            // Give the marker unit a moment to print the rest (its address lines).
            if log.contains("REHOST-BOOT-OK")
                && !log.contains("REHOST-MARKER-END")
                && start.elapsed() < timeout
            {
                continue;
            }
            break (true, format!("saw {m:?}"));
        }
        if let Some(f) = FAILURE_MARKERS.iter().find(|f| log.contains(*f)) {
            break (false, format!("saw {f:?}"));
        }
        if let Some(why) = exited() {
            break (false, why);
        }
        if start.elapsed() >= timeout {
            break (
                false,
                format!(
                    "no boot marker ({}) within {} s",
                    markers.join(", "),
                    timeout.as_secs()
                ),
            );
        }
    };
    let log = read_log(serial_log)?;
    Ok(Watched {
        booted,
        evidence,
        seconds: start.elapsed().as_secs_f64(),
        guest_ipv4: guest_ipv4(&log),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_shows_markers_failures_and_the_vm_s_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let markers = vec!["login:".to_string()];
        let t = Duration::from_secs(5);
        std::fs::write(&log, "Booting\nweb-1 login: ").unwrap();
        let w = watch(&log, &markers, t, &mut || None).unwrap();
        assert!(w.booted && w.evidence == "saw \"login:\"", "{w:?}");
        std::fs::write(
            &log,
            "ALERT!  /dev/xvda1 does not exist.  Dropping to a shell!",
        )
        .unwrap();
        let w = watch(&log, &markers, t, &mut || None).unwrap();
        assert!(
            !w.booted && w.evidence.contains("Dropping to a shell"),
            "{w:?}"
        );
        std::fs::write(&log, "Booting").unwrap();
        let w = watch(&log, &markers, t, &mut || Some("qemu exited".into())).unwrap();
        assert!(!w.booted && w.evidence == "qemu exited", "{w:?}");
        let w = watch(&log, &markers, Duration::from_secs(1), &mut || None).unwrap();
        assert_eq!(w.evidence, "no boot marker (login:) within 1 s");
    }

    #[test]
    fn waiting_shows_the_console_s_last_line() {
        assert_eq!(
            last_console_line("Booting\r\n\x1b[0;32m  OK  \x1b[0m Started udev.\r\n\r\n"),
            "OK   Started udev."
        );
        assert_eq!(last_console_line(""), "");
        assert_eq!(last_console_line(&"x".repeat(300)).chars().count(), 121);
        let m = vec!["REHOST-BOOT-OK".to_string()];
        assert_eq!(
            waiting_line(
                &m,
                Duration::from_secs(30),
                Duration::from_secs(120),
                "GRUB"
            ),
            "still waiting for REHOST-BOOT-OK (30 s of 120 s); console: GRUB"
        );
        // Reported every WAITING_EVERY while nothing shows up.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "Loading Linux 6.1.0 ...\n").unwrap();
        let mut seen = Vec::new();
        let w = watch_reporting(
            &log,
            &m,
            WAITING_EVERY + Duration::from_secs(2),
            &mut |t, l| seen.push((t.as_secs(), l.to_string())),
            &mut || None,
        )
        .unwrap();
        assert!(!w.booted);
        assert_eq!(seen, vec![(10, "Loading Linux 6.1.0 ...".to_string())]);
    }

    #[test]
    fn ipv4_from_ip_addr_output() {
        let log = "REHOST-BOOT-OK\n1: lo: <LOOPBACK,UP>\n    inet 127.0.0.1/8 scope host lo\n2: eth0: <UP>\n    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic eth0\n";
        assert_eq!(guest_ipv4(log).as_deref(), Some("10.0.2.15"));
        assert_eq!(guest_ipv4("inet 999.1.1.1/3"), None);
    }
}
