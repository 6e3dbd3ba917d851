//! A step's hooks: their environment, their run with a timeout, their output in the run's log.

use super::*;

/// A hook's environment (documented in the README):
///
/// - `REHOST_PLAN`, `REHOST_RUN` (`P<id>`), `REHOST_MODE` (`drill`, `failover-planned`,
///   `failover-unplanned`), `REHOST_STEP`, `REHOST_HOOK` (`pre` or `post`);
/// - `REHOST_MACHINE_IDS` and `REHOST_HOSTNAMES`: the step's machines, space-separated, in one
///   order that the next variables follow;
/// - post hooks only: `REHOST_JOB_IDS`, `REHOST_TARGET_DIRS` and `REHOST_TARGET_ADDRESSES` (the
///   guest address its boot check saw), `-` for a machine without one (not awaited, or unknown).
pub fn hook_env(
    plan: &Plan,
    run: &PlanRun,
    mode: RunMode,
    step: u32,
    kind: HookKind,
    members: &[impl MemberLike],
    jobs: &HashMap<String, StepJob>,
) -> Vec<(String, String)> {
    let join = |f: &dyn Fn(&str, &str) -> String| {
        members
            .iter()
            .map(|m| f(m.machine_id(), m.hostname()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut env = vec![
        ("REHOST_PLAN".into(), plan.name.clone()),
        ("REHOST_RUN".into(), format!("P{}", run.id)),
        ("REHOST_MODE".into(), mode.to_string()),
        ("REHOST_STEP".into(), step.to_string()),
        ("REHOST_HOOK".into(), kind.to_string()),
        ("REHOST_MACHINE_IDS".into(), join(&|id, _| id.to_string())),
        ("REHOST_HOSTNAMES".into(), join(&|_, h| h.to_string())),
    ];
    if kind == HookKind::Post {
        let of = |f: &dyn Fn(&StepJob) -> Option<String>| {
            join(&|id, _| jobs.get(id).and_then(f).unwrap_or_else(|| "-".into()))
        };
        env.push((
            "REHOST_JOB_IDS".into(),
            of(&|(j, _)| Some(j.id.to_string())),
        ));
        env.push((
            "REHOST_TARGET_DIRS".into(),
            of(&|(j, _)| j.target_dir.clone()),
        ));
        env.push(("REHOST_TARGET_ADDRESSES".into(), of(&|(_, a)| a.clone())));
    }
    env
}

/// What [`hook_env`] reads of a step's machine.
pub trait MemberLike {
    fn machine_id(&self) -> &str;
    fn hostname(&self) -> &str;
}

impl MemberLike for Unit {
    fn machine_id(&self) -> &str {
        &self.member.machine_id
    }
    fn hostname(&self) -> &str {
        &self.member.hostname
    }
}

impl MemberLike for Member {
    fn machine_id(&self) -> &str {
        &self.machine_id
    }
    fn hostname(&self) -> &str {
        &self.hostname
    }
}

/// Runs a hook with its environment and timeout, its output into the run's log. A failure (an
/// exit status other than 0, a signal, the timeout, or not starting) stops the run unless the
/// hook continues on error.
pub(super) async fn run_hook(
    log: &RunLog,
    step: u32,
    kind: HookKind,
    hook: &Hook,
    env: Vec<(String, String)>,
) -> Result<(), Stop> {
    let name = format!("hook-{kind}");
    let t = Instant::now();
    log.log(
        None,
        &name,
        format!(
            "step {step} {kind} hook start: {} (timeout {} s)",
            hook.path, hook.timeout_s
        ),
    )
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let copy = {
        let (log, name) = (log.clone(), name.clone());
        tokio::spawn(async move {
            while let Some(l) = rx.recv().await {
                log.log(None, &name, l).await;
            }
        })
    };
    let outcome = hook_outcome(hook, env, tx).await;
    // Every line is in the log before the hook's end is.
    let _ = copy.await;
    let secs = t.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            log.log(
                None,
                &name,
                format!("step {step} {kind} hook succeeded in {secs:.1} s"),
            )
            .await;
            Ok(())
        }
        Err(why) if hook.continue_on_error => {
            log.log(
                None,
                &name,
                format!("step {step} {kind} hook failed after {secs:.1} s ({why}); the plan goes on (continue-on-error)"),
            )
            .await;
            Ok(())
        }
        Err(why) => Err(Stop {
            machine: None,
            why: format!("step {step} {kind} hook {} failed: {why}", hook.path),
        }),
    }
}

/// Runs a hook to its end or its timeout; each line of its output goes to `lines` (stderr's
/// prefixed `stderr: `).
async fn hook_outcome(
    hook: &Hook,
    env: Vec<(String, String)>,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&hook.path);
    cmd.envs(env)
        .current_dir(Path::new(&hook.path).parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start it: {e}"))?;
    let pgid = child.id();
    let out = child.stdout.take().map(tokio::io::BufReader::new);
    let err = child.stderr.take().map(tokio::io::BufReader::new);
    let reader = async move {
        let mut readers = Vec::new();
        if let Some(o) = out {
            readers.push(tokio::spawn(copy_lines(lines.clone(), o, "")));
        }
        if let Some(e) = err {
            readers.push(tokio::spawn(copy_lines(lines, e, "stderr: ")));
        }
        for r in readers {
            let _ = r.await;
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(hook.timeout_s), async {
        let status = child.wait().await;
        reader.await;
        status
    })
    .await;
    match waited {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(match st.code() {
            Some(c) => format!("exit status {c}"),
            None => format!("ended by {st}"),
        }),
        Ok(Err(e)) => Err(format!("wait: {e}")),
        Err(_) => {
            if let Some(p) = pgid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Err(format!(
                "still running after its timeout of {} s: stopped (SIGKILL to its process group)",
                hook.timeout_s
            ))
        }
    }
}

async fn copy_lines<R: tokio::io::AsyncBufRead + Unpin>(
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    r: R,
    prefix: &str,
) {
    let mut r = r;
    let mut n = 0usize;
    let mut buf = Vec::new();
    // Bytes, not text: a hook's output that is not UTF-8 is kept (lossily), and read to its end.
    while r.read_until(b'\n', &mut buf).await.is_ok_and(|got| got > 0) {
        n += 1;
        if n <= HOOK_LINES {
            let mut l = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if l.len() > HOOK_LINE_BYTES {
                let mut cut = HOOK_LINE_BYTES;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
                l.push('…');
            }
            let _ = tx.send(format!("{prefix}{l}"));
        }
        buf.clear();
    }
    if n > HOOK_LINES {
        let _ = tx.send(format!("{prefix}({} more lines not kept)", n - HOOK_LINES));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` as a hook with `timeout_s`; its outcome and output lines.
    fn hook(script: &str, timeout_s: u64) -> (Result<(), String>, Vec<String>, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let h = Hook {
            path: path.display().to_string(),
            timeout_s,
            continue_on_error: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let env = vec![("REHOST_STEP".to_string(), "3".to_string())];
        let r = rt.block_on(hook_outcome(&h, env, tx));
        let took = t.elapsed();
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        (r, lines, took)
    }

    #[test]
    fn a_hook_gets_its_environment_and_its_output_is_kept_line_by_line() {
        let (r, lines, _) = hook(
            "echo step $REHOST_STEP in $(pwd)\necho oops >&2\nprintf 'bad \\377 byte\\n'\n",
            10,
        );
        assert_eq!(r, Ok(()));
        assert!(
            lines.iter().any(|l| l.starts_with("step 3 in /")),
            "{lines:?}"
        );
        assert!(lines.contains(&"stderr: oops".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"bad \u{fffd} byte".to_string()),
            "{lines:?}"
        );
        let (r, lines, _) = hook("seq 1 250\n", 10);
        assert_eq!(r, Ok(()));
        assert_eq!(lines.len(), HOOK_LINES + 1, "{lines:?}");
        assert_eq!(lines.last().unwrap(), "(50 more lines not kept)");
    }

    #[test]
    fn a_failing_hook_says_how_and_one_past_its_timeout_is_stopped_with_its_children() {
        let (r, _, _) = hook("exit 3\n", 10);
        assert_eq!(r, Err("exit status 3".into()));
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let (r, _, took) = hook(
            &format!("sleep 300 &\necho $! > {}\nwait\n", pidfile.display()),
            1,
        );
        let e = r.unwrap_err();
        assert!(e.contains("timeout of 1 s"), "{e}");
        assert!(took < Duration::from_secs(30), "{took:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed with its process group (reaped by init once its parent is gone).
        let gone = (0..50).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = state.is_empty() || state.split(' ').nth(2) == Some("Z");
            if !dead {
                std::thread::sleep(Duration::from_millis(100));
            }
            dead
        });
        assert!(gone, "the hook's child {pid} outlived it");
        let missing = Hook {
            path: "/nonexistent/hook".into(),
            timeout_s: 1,
            continue_on_error: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let e = rt
            .block_on(hook_outcome(&missing, Vec::new(), tx))
            .unwrap_err();
        assert!(e.starts_with("could not start it"), "{e}");
    }
}
