//! Shared helpers of the converter's end-to-end tests: environment checks (skip without root unless
//! CI=true, where a missing prerequisite fails the test), fixture images, running the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_rehost-converter");

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Check what a test needs. Returns false (after printing why) when the test must be skipped; panics
/// when it cannot run and CI=true.
pub fn ready(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for t in tools {
        if !have(t) {
            missing.push(t.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("converter end-to-end test needs: {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    // Straight to stderr (not eprintln!, which the test harness captures) so the skip is visible.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {msg}");
    false
}

pub const BOOT_TOOLS: &[&str] = &[
    "debootstrap",
    "qemu-system-x86_64",
    "qemu-img",
    "losetup",
    "partx",
    "sfdisk",
    "mkfs.ext4",
];

/// Build (or take from the cache) a fixture image and return its path.
pub fn fixture(variant: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/build-debian-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(variant)
        .output()
        .expect("run fixture builder");
    assert!(
        out.status.success(),
        "fixture builder failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        Path::new(&path).is_file(),
        "fixture builder printed {path:?}"
    );
    PathBuf::from(path)
}

/// A scratch directory for outputs (on /var/tmp: outputs are sparse 1.5 GiB images).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rehost-converter-test")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

pub fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("start rehost-converter");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown: String = stdout.chars().take(6000).collect();
    eprintln!(
        "$ rehost-converter {}\n-> {:?}\n--- stdout{}\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status.code(),
        if shown.len() < stdout.len() {
            " (truncated)"
        } else {
            ""
        },
        shown,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run the converter with its work directory inside `dir` (so leftovers can be checked per test).
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    let work = dir.join("work");
    let mut all = vec!["--work-dir", work.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all)
}

/// blake3 of a whole file.
pub fn file_hash(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    h.finalize().to_hex().to_string()
}

/// Mounts and loop devices under `dir` (the test's scratch directory, which holds the converter's work
/// directory and its outputs).
pub fn leftovers(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut v: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(String::from)
        .collect();
    let lo = Command::new("losetup")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    v.extend(lo.lines().filter(|l| l.contains(&needle)).map(String::from));
    v
}

/// A sparse raw image of `mib` MiB at `path`, partitioned by `sfdisk` from `script`.
pub fn partitioned_image(path: &Path, mib: u64, script: &str) {
    use std::io::Write;
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    sf.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sf.wait().unwrap().success(), "sfdisk {}", path.display());
}

/// Copies the filesystem image `fs` into `img` at `offset_mib` MiB, keeping holes.
pub fn place_filesystem(fs: &Path, img: &Path, offset_mib: u64) {
    let st = Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", img.display()))
        .arg("bs=1M")
        .arg(format!("seek={offset_mib}"))
        .args(["conv=notrunc,sparse", "status=none"])
        .status()
        .unwrap();
    assert!(st.success(), "dd {} into {}", fs.display(), img.display());
}

/// Fails the test with the list when a mount or loop device under `dir` is left behind.
pub fn assert_no_leftovers(dir: &Path) {
    let left = leftovers(dir);
    assert!(left.is_empty(), "{left:#?}");
}

/// JSON parsed from a command's output or a file's content; null when it is none.
pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

/// `inspect --json IMG` with the work directory inside `dir`: the output and the JSON printed
/// (null when none was).
pub fn inspect_json(dir: &Path, img: &Path) -> (Output, serde_json::Value) {
    let o = run_in(dir, &["inspect", "--json", img.to_str().unwrap()]);
    let v = json(&o.stdout);
    (o, v)
}

/// `convert` of `inputs` (the first is the boot disk) to `output` with `--report report` and
/// `extra` arguments, the work directory inside `dir`: the output and the report (null when none
/// was written).
pub fn convert_with_report(
    dir: &Path,
    inputs: &[&Path],
    output: &Path,
    report: &Path,
    extra: &[&str],
) -> (Output, serde_json::Value) {
    let mut args = vec!["convert"];
    for i in inputs {
        args.extend(["--input", i.to_str().unwrap()]);
    }
    args.extend([
        "--output",
        output.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    let o = run_in(dir, &args);
    let r = std::fs::read(report)
        .map(|b| json(&b))
        .unwrap_or(serde_json::Value::Null);
    (o, r)
}

/// An ext4 filesystem of `size` bytes at byte `offset` of `img` (`mkfs.ext4 -E offset=`, nothing
/// mounted), populated from `tree` when given (`-d`), with `extra` mkfs arguments.
pub fn mkfs_ext4(img: &Path, offset: u64, size: u64, tree: Option<&Path>, extra: &[&str]) {
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E", &format!("offset={offset}")])
        .args(extra);
    if let Some(t) = tree {
        mkfs.arg("-d").arg(t);
    }
    let st = mkfs
        .arg(img)
        .arg(format!("{}k", size >> 10))
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 {}", img.display());
}

/// `convert --input IMG --output OUT` with the work directory inside `dir`.
pub fn convert_in(dir: &Path, img: &Path, out: &Path) -> Output {
    run_in(
        dir,
        &[
            "convert",
            "--input",
            img.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    )
}

/// A `convert` of `img` (to `dir/out.raw`, the work directory inside `dir`) is refused: it exits
/// with `code`, says `why` on stderr, and writes no output.
pub fn assert_convert_refused(dir: &Path, img: &Path, code: i32, why: &str) {
    let out = dir.join("out.raw");
    let o = convert_in(dir, img, &out);
    assert_eq!(o.status.code(), Some(code), "convert {}", img.display());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(why), "{err}");
    assert!(!out.exists(), "an output was written for a refused input");
}
