//! `rehost-converter`: argument parsing, logging, and exit codes; the work is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rehost_converter::{bootcheck, convert, input, inspect, manifest, progress, sys};
use std::path::PathBuf;
use std::time::Duration;

/// Make a replicated Linux disk image boot on KVM/virtio, and prove it by booting it.
///
/// Inputs are raw disk images (or block devices) or qcow2 images (read through a temporary raw
/// copy made with qemu-img); other formats (VMDK, VHDX, VHD, VDI, ...) are refused by name.
/// Each step is announced on stderr as it starts; results go to stdout.
///
/// Exit codes: 0 success; 1 error; 2 usage, or an input in a format the converter does not read;
/// 3 the image cannot be made bootable; 4 boot check failed.
#[derive(Parser, Debug)]
#[command(name = "rehost-converter", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Parent of the converter's private work directory (mount points live only there; default:
    /// $TMPDIR or /tmp). `inspect` and `manifest` also put the temporary raw copy of a qcow2
    /// input here (it needs space for the image's data).
    #[arg(long, global = true, env = "REHOST_CONVERTER_WORKDIR")]
    work_dir: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum OutFormat {
    /// Raw disk image.
    Raw,
    /// qcow2 image (a convert output is made from the raw result with qemu-img).
    Qcow2,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Target {
    /// KVM with virtio disk and network devices (the only target).
    KvmVirtio,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show partitions, filesystems, OS, kernels, bootloader, and what a conversion would change.
    /// Read-only: the image is attached read-only and mounted without journal replay.
    Inspect {
        /// Disk images (raw or qcow2) of one machine; the first is the boot disk.
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<PathBuf>,
        /// Print JSON (the inspection and the planned changes) instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Convert disk images into new images that boot on KVM with virtio. Inputs are never modified.
    Convert {
        /// Input disk image, raw or qcow2 (repeat for more disks; the first is the boot disk). A
        /// qcow2 input is first converted to a temporary raw image in the output's directory.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Output image for the boot disk; further disks get `-diskN` added to the name.
        #[arg(long)]
        output: PathBuf,
        /// Target platform.
        #[arg(long, value_enum, default_value = "kvm-virtio")]
        target: Target,
        /// Format of the output images.
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
        /// Write the JSON report (every change with file, old and new text) here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Boot the result under QEMU and fail (exit 4) unless it reaches a boot marker.
        #[arg(long)]
        boot_check: bool,
        /// With --boot-check: where to keep the serial console log (default: the output's name
        /// with the extension `.serial.log`).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Boot an image under QEMU (virtio disk and NIC, the image is not written) and wait for a
    /// marker; prints the result as JSON.
    BootCheck {
        /// The disk image to boot (raw or qcow2).
        image: PathBuf,
        /// The image's format (default: told from its first bytes).
        #[arg(long, value_enum)]
        format: Option<OutFormat>,
        /// Where to keep the serial console log (default: the image's name with the extension
        /// `.serial.log`).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Print the content manifest of an image (what "same output" compares; timestamps excluded).
    Manifest {
        /// The disk image (raw or qcow2).
        image: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct BootArgs {
    /// Seconds to wait for a boot marker (the wait is reported on stderr every 10 s).
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// Serial console text that means "booted" (repeatable; any one of them counts).
    #[arg(long = "boot-marker", default_values_t = vec!["login:".to_string(), "REHOST-BOOT-OK".to_string()])]
    boot_markers: Vec<String>,
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
    // The signal-cleanup thread waits for other signals only.
    rehost_proto::process::die_quietly_on_sigpipe();
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
        Cmd::Inspect {
            images: given,
            json,
        } => {
            let prepared = match input::prepare(&given, &work) {
                Ok(p) => p,
                Err(e) if e.is_refused() => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(2);
                }
                Err(e) => return Err(e).context("inspect"),
            };
            let images = prepared.raws.clone();
            let ins = match inspect::inspect_images(&images, &work) {
                Ok(mut ins) => {
                    input::name_disks(&mut ins, &given, &prepared);
                    ins
                }
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
                progress::step("planning the changes (nothing is written)");
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
            serial_log,
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
                serial_log,
                accel: boot.accel,
            };
            let r = match convert::convert(&opts) {
                Ok(r) => r,
                Err(e @ convert::ConvertError::NotConvertible(_)) => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(3);
                }
                Err(convert::ConvertError::Input(e)) if e.is_refused() => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(2);
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
            serial_log,
            boot,
        } => {
            let detected = match input::detect(&image) {
                Ok(k) => k,
                Err(e) if e.is_refused() => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(2);
                }
                Err(e) => return Err(e).context("boot-check"),
            };
            let format = match format {
                None => detected.name(),
                Some(f) if fmt_of(f).name() == detected.name() => detected.name(),
                Some(f) => {
                    eprintln!(
                        "rehost-converter: --format {} given, but {} is a {} image",
                        fmt_of(f).name(),
                        image.display(),
                        detected.name()
                    );
                    return Ok(2);
                }
            };
            let serial_log = serial_log.unwrap_or_else(|| image.with_extension("serial.log"));
            let b = bootcheck::boot(&bootcheck::BootOptions {
                image,
                format: format.into(),
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
            let prepared = match input::prepare(std::slice::from_ref(&image), &work) {
                Ok(p) => p,
                Err(e) if e.is_refused() => {
                    eprintln!("rehost-converter: {e}");
                    return Ok(2);
                }
                Err(e) => return Err(e).context("manifest"),
            };
            let lines = manifest::manifest(&prepared.raws[0], &work)?;
            die_quietly_on_sigpipe();
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
    }
}

fn main() {
    rehost_proto::process::init_logging("REHOST_LOG", "warn");
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_argument_of_every_subcommand_is_described() {
        let cli = Cli::command();
        let mut undescribed = Vec::new();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    undescribed.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        for a in cli.get_arguments() {
            if a.get_help().is_none() && !["help", "version"].contains(&a.get_id().as_str()) {
                undescribed.push(a.get_id().to_string());
            }
        }
        assert!(undescribed.is_empty(), "no description: {undescribed:?}");
        // boot-check has no output: its --serial-log help must not speak of one.
        let bc = cli.find_subcommand("boot-check").unwrap();
        let log = bc
            .get_arguments()
            .find(|a| a.get_id() == "serial_log")
            .unwrap();
        assert!(!log.get_help().unwrap().to_string().contains("output"));
    }
}
