//! `rehost-converter`: argument parsing, logging, and exit codes; the work is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rehost_converter::{bootcheck, convert, inspect, manifest, sys};
use std::path::PathBuf;
use std::time::Duration;

/// Make a replicated Linux disk image boot on KVM/virtio, and prove it by booting it.
///
/// Exit codes: 0 success; 1 error; 2 usage; 3 the image cannot be made bootable; 4 boot check failed.
#[derive(Parser, Debug)]
#[command(name = "rehost-converter", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Parent of the converter's private work directory (mount points live only there).
    #[arg(long, global = true, env = "REHOST_CONVERTER_WORKDIR")]
    work_dir: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum OutFormat {
    Raw,
    Qcow2,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Target {
    KvmVirtio,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show partitions, filesystems, OS, kernels, bootloader, and what a conversion would change.
    /// Read-only: the image is attached read-only and mounted without journal replay.
    Inspect {
        /// Raw disk images; the first is the boot disk.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Convert raw images into a new image that boots on KVM with virtio. Inputs are never modified.
    Convert {
        /// Raw input image (repeat for more disks; the first is the boot disk).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Output image for the boot disk; further disks get `-diskN` added to the name.
        #[arg(long)]
        output: PathBuf,
        /// Target platform.
        #[arg(long, value_enum, default_value = "kvm-virtio")]
        target: Target,
        /// Output format.
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
        /// Write the JSON report (every change with file, old and new text) here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Boot the result under QEMU and fail unless it reaches a login prompt or marker.
        #[arg(long)]
        boot_check: bool,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Boot an image under QEMU (virtio disk and NIC, the image is not written) and wait for a marker.
    BootCheck {
        image: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Print the content manifest of a raw image (what "same output" compares; timestamps excluded).
    Manifest { image: PathBuf },
}

#[derive(clap::Args, Debug)]
struct BootArgs {
    /// Seconds to wait for the marker.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// Serial console text that means "booted" (repeatable).
    #[arg(long = "boot-marker", default_values_t = vec!["login:".to_string(), "REHOST-BOOT-OK".to_string()])]
    boot_markers: Vec<String>,
    /// Where to keep the serial console log (default: next to the output).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// QEMU accelerator (tcg works everywhere; kvm where nested virtualisation boots Linux).
    #[arg(long, default_value = "tcg")]
    accel: String,
}

/// Called once the work is done and only the output remains to be printed: from then on, a reader
/// that went away (`rehost-converter inspect IMG | head -3`) ends the converter quietly by SIGPIPE,
/// as it ends `ls`, instead of a panic in `println!` on EPIPE (Rust starts programs with SIGPIPE
/// ignored). Not earlier: while loop devices and mounts are held, a write to a closed pipe must
/// stay an error, so that the guards release them.
fn die_quietly_on_sigpipe() {
    // SAFETY: SIG_DFL is a valid action for SIGPIPE and installs no handler code; the
    // signal-cleanup thread waits for other signals only.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn fmt_of(f: OutFormat) -> convert::Format {
    match f {
        OutFormat::Raw => convert::Format::Raw,
        OutFormat::Qcow2 => convert::Format::Qcow2,
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let work = cli.work_dir.unwrap_or_else(std::env::temp_dir);
    match cli.cmd {
        Cmd::Inspect { images, json } => {
            let ins = match inspect::inspect_images(&images, &work) {
                Ok(ins) => ins,
                Err(e) if e.is_not_convertible() => {
                    eprintln!(
                        "rehost-converter: the image cannot be made bootable on KVM/virtio: {e}"
                    );
                    return Ok(3);
                }
                Err(e) => return Err(e).context("inspect"),
            };
            // Plan the changes on a read-only session (nothing is written with apply == false);
            // an image that cannot be converted gets its blockers, not a plan.
            let plan = if ins.blockers.is_empty() {
                let disks = ins.disks.clone();
                let (mut s, _, _) =
                    inspect::open_guest(&images, &disks, &work, true).context("open guest")?;
                inspect::mount_boot(&mut s, &images, &disks, &ins.volumes(), true)
                    .context("mount /boot")?;
                convert::plan_changes(&s.root, &ins, false)
                    .context("plan changes")?
                    .0
            } else {
                Vec::new()
            };
            die_quietly_on_sigpipe();
            if json {
                let v = serde_json::json!({ "inspection": ins, "planned_changes": plan });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", ins.summary());
                println!("would change ({}):", plan.len());
                print!("{}", rehost_converter::report::changes_summary(&plan));
            }
            Ok(if ins.blockers.is_empty() { 0 } else { 3 })
        }
        Cmd::Convert {
            inputs,
            output,
            target: Target::KvmVirtio,
            format,
            report,
            boot_check,
            boot,
        } => {
            let opts = convert::ConvertOptions {
                inputs,
                output,
                format: fmt_of(format),
                work_parent: work,
                boot_check,
                boot_timeout: Duration::from_secs(boot.boot_timeout),
                boot_markers: boot.boot_markers,
                serial_log: boot.serial_log,
                accel: boot.accel,
            };
            let r = match convert::convert(&opts) {
                Ok(r) => r,
                Err(e @ convert::ConvertError::NotConvertible(_)) => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(3);
                }
                Err(e) => return Err(e).context("convert"),
            };
            if let Some(p) = &report {
                std::fs::write(p, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("write report {}", p.display()))?;
            }
            die_quietly_on_sigpipe();
            print!("{}", r.summary());
            match &r.boot_check {
                Some(b) if !b.booted => {
                    eprintln!(
                        "rehost-converter: the converted image did not boot: {} (serial log {})",
                        b.evidence, b.serial_log
                    );
                    Ok(4)
                }
                _ => Ok(0),
            }
        }
        Cmd::BootCheck {
            image,
            format,
            boot,
        } => {
            let serial_log = boot
                .serial_log
                .unwrap_or_else(|| image.with_extension("serial.log"));
            let b = bootcheck::boot(&bootcheck::BootOptions {
                image,
                format: fmt_of(format).name().into(),
                timeout: Duration::from_secs(boot.boot_timeout),
                markers: boot.boot_markers,
                serial_log,
                accel: boot.accel,
                memory_mib: 1024,
            })?;
            die_quietly_on_sigpipe();
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(if b.booted { 0 } else { 4 })
        }
        Cmd::Manifest { image } => {
            let lines = manifest::manifest(&image, &work)?;
            die_quietly_on_sigpipe();
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REHOST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = sys::install_signal_cleanup() {
        eprintln!("rehost-converter: cannot install the signal handler: {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let result = run(cli);
    if sys::interrupted().is_some() {
        // The signal thread is releasing mounts and loop devices and will exit with 128+signal.
        loop {
            std::thread::park();
        }
    }
    let code = match result {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rehost-converter: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
