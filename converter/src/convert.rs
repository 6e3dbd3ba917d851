//! The conversion: inspect the input read-only, refuse what cannot boot, copy every input to its output,
//! mount the output's root read-write inside the work directory, make each change where needed (fstab,
//! GRUB, initramfs drivers, network, hypervisor tools, serial console), verify the initramfs, release
//! everything, convert to qcow2 if asked, and optionally boot the result.

use crate::bootcheck::{self, BootError, BootOptions};
use crate::fstab;
use crate::grub::{self, CmdlinePolicy};
use crate::guestfs::{GuestError, GuestRoot};
use crate::image::{self, ImageError};
use crate::input::{self, InputError};
use crate::inspect::{self, InspectError, Inspection};
use crate::network;
use crate::progress;
use crate::report::{Change, Report};
use crate::sys::{self, SysError};
use nix::mount::MsFlags;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub format: Format,
    pub work_parent: PathBuf,
    pub boot_check: bool,
    pub boot_timeout: Duration,
    pub boot_markers: Vec<String>,
    pub serial_log: Option<PathBuf>,
    pub accel: String,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("inspect the input")]
    Inspect(#[from] InspectError),
    #[error("read the input")]
    Input(#[from] InputError),
    #[error("the image cannot be made bootable on KVM/virtio: {}", .0.join("; "))]
    NotConvertible(Vec<String>),
    #[error("prepare the output image")]
    Image(#[from] ImageError),
    #[error("edit the guest")]
    Guest(#[from] GuestError),
    #[error("host operation")]
    Sys(#[from] SysError),
    #[error("rebuild the initramfs with {tool} in the guest failed:\n{output}")]
    Rebuild { tool: String, output: String },
    #[error("after the rebuild, the initramfs of kernel {kernel} still lacks {missing}")]
    StillMissing { kernel: String, missing: String },
    #[error("boot check")]
    Boot(#[from] BootError),
}

/// The output path of input disk `i` (the boot disk gets `output` itself).
pub fn output_path(output: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    output.with_file_name(format!("{stem}-disk{i}{ext}"))
}

fn edit_file(
    g: &GuestRoot,
    apply: bool,
    kind: &str,
    file: &str,
    new: &str,
    edits: Vec<fstab::LineEdit>,
    changes: &mut Vec<Change>,
) -> Result<(), GuestError> {
    if edits.is_empty() {
        return Ok(());
    }
    let mut detail_suffix = String::new();
    if apply {
        if let Some(b) = g.backup(file)? {
            detail_suffix = format!(" (original kept as {b})");
        }
        g.write(file, new.as_bytes())?;
    }
    for e in edits {
        let old = (!e.old.is_empty()).then_some(e.old);
        let newl = (!e.new.is_empty()).then_some(e.new);
        changes.push(Change::new(
            kind,
            file,
            old,
            newl,
            format!("{}{detail_suffix}", e.detail),
        ));
    }
    Ok(())
}

/// Modules to add to the guest's initramfs configuration, over all kernels that can boot on virtio.
fn modules_to_add(ins: &Inspection) -> Vec<String> {
    let mut m: Vec<String> = ins
        .kernels
        .iter()
        .filter(|k| k.can_boot_virtio())
        .flat_map(|k| {
            k.missing
                .iter()
                .filter(|x| !k.unavailable.contains(x))
                .cloned()
        })
        .collect();
    m.sort();
    m.dedup();
    m
}

/// Make (or with `apply == false`, plan) every configuration change. Returns the changes and whether
/// the initramfs must be rebuilt.
pub fn plan_changes(
    g: &GuestRoot,
    ins: &Inspection,
    apply: bool,
) -> Result<(Vec<Change>, bool), ConvertError> {
    let mut changes = Vec::new();
    let volumes = ins.volumes();
    let root_spec = ins.root_spec();
    if let Some(text) = g.read_text("/etc/fstab")? {
        let (new, edits) = fstab::rewrite(&text, &volumes, &root_spec);
        edit_file(g, apply, "fstab", "/etc/fstab", &new, edits, &mut changes)?;
    }
    let net = network::convert(g, apply)?;
    changes.extend(net.changes);
    let mut ensure = vec!["console=ttyS0,115200"];
    if net.want_classic_names {
        ensure.push("net.ifnames=0");
    }
    let policy = CmdlinePolicy {
        volumes: &volumes,
        root_spec: &root_spec,
        ensure: &ensure,
    };
    if let Some(cfg) = &ins.grub_cfg {
        if let Some(text) = g.read_text(cfg)? {
            let (new, edits) = grub::rewrite_grub_cfg(&text, &policy);
            edit_file(g, apply, "grub-cfg", cfg, &new, edits, &mut changes)?;
        }
    }
    if let Some(text) = g.read_text("/etc/default/grub")? {
        let (new, edits) = grub::rewrite_default_grub(&text, &policy);
        edit_file(
            g,
            apply,
            "default-grub",
            "/etc/default/grub",
            &new,
            edits,
            &mut changes,
        )?;
    }
    changes.extend(network::disable_hypervisor_tools(g, apply)?);
    // SELinux guests: files written from outside carry no labels; relabel at first boot.
    if let Some(text) = g.read_text("/etc/selinux/config")? {
        let active = text
            .lines()
            .any(|l| matches!(l.trim(), "SELINUX=enforcing" | "SELINUX=permissive"));
        if active && g.kind("/.autorelabel")?.is_none() {
            if apply {
                g.write("/.autorelabel", b"")?;
            }
            changes.push(Change::new(
                "selinux",
                "/.autorelabel",
                None,
                Some(String::new()),
                "relabel at first boot",
            ));
        }
    }
    let add = modules_to_add(ins);
    // An LVM root needs the guest's lvm tool in every initramfs that is to boot.
    let lvm_missing: Vec<&inspect::KernelInfo> = match &ins.root_lv {
        Some(_) => ins
            .kernels
            .iter()
            .filter(|k| k.can_boot_virtio() && !k.initramfs_has_lvm)
            .collect(),
        None => Vec::new(),
    };
    let rebuild = !add.is_empty() || !lvm_missing.is_empty();
    if rebuild {
        match ins.initramfs_tool.as_deref() {
            Some("update-initramfs") => {
                let file = "/etc/initramfs-tools/modules";
                let old = g.read_text(file)?.unwrap_or_default();
                let listed: Vec<&str> = old
                    .lines()
                    .map(|l| l.split_whitespace().next().unwrap_or(""))
                    .collect();
                let lines: Vec<&String> = add
                    .iter()
                    .filter(|m| {
                        !listed.contains(&m.as_str())
                            && !listed.contains(&m.replace('_', "-").as_str())
                    })
                    .collect();
                if !lines.is_empty() {
                    let mut new = old.clone();
                    if !new.is_empty() && !new.ends_with('\n') {
                        new.push('\n');
                    }
                    new.push_str("# added by rehost-converter: drivers for KVM/virtio\n");
                    for m in &lines {
                        new.push_str(m);
                        new.push('\n');
                    }
                    let edits = vec![fstab::LineEdit {
                        old: String::new(),
                        new: lines
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join("\n"),
                        detail: "virtio drivers added to the initramfs module list".into(),
                    }];
                    edit_file(g, apply, "initramfs", file, &new, edits, &mut changes)?;
                }
                let conf = "/etc/initramfs-tools/initramfs.conf";
                if let Some(text) = g.read_text(conf)? {
                    if text.lines().any(|l| l.trim() == "MODULES=dep") {
                        let new = text.replace("\nMODULES=dep", "\nMODULES=most");
                        let edits = vec![fstab::LineEdit {
                            old: "MODULES=dep".into(),
                            new: "MODULES=most".into(),
                            detail: "MODULES=dep would probe the staging host's devices".into(),
                        }];
                        edit_file(g, apply, "initramfs", conf, &new, edits, &mut changes)?;
                    }
                }
            }
            Some("dracut") => {
                let file = "/etc/dracut.conf.d/90-rehost-virtio.conf";
                let mut text = format!(
                    "# written by rehost-converter\nadd_drivers+=\" {} \"\n",
                    add.join(" ")
                );
                if ins.root_lv.is_some() {
                    text.push_str("add_dracutmodules+=\" lvm \"\n");
                }
                if apply {
                    g.write(file, text.as_bytes())?;
                }
                changes.push(Change::new(
                    "initramfs",
                    file,
                    None,
                    Some(text),
                    "virtio drivers added to dracut",
                ));
            }
            _ => {}
        }
        for k in ins.kernels.iter().filter(|k| {
            k.can_boot_virtio()
                && (!k.missing.is_empty() || lvm_missing.iter().any(|l| l.version == k.version))
        }) {
            // The name the rebuild writes when there is no initramfs yet (see `rebuild_initramfs`).
            let file = k
                .initramfs
                .clone()
                .unwrap_or_else(|| match ins.initramfs_tool.as_deref() {
                    Some("dracut") => format!("/boot/initramfs-{}.img", k.version),
                    _ => format!("/boot/initrd.img-{}", k.version),
                });
            let mut lacks = k.missing.clone();
            if lvm_missing.iter().any(|l| l.version == k.version) {
                lacks.push("lvm".into());
            }
            changes.push(Change::new(
                "initramfs",
                &file,
                Some(format!("lacks {}", lacks.join(", "))),
                Some(format!(
                    "rebuilt with {} in a chroot",
                    ins.initramfs_tool.as_deref().unwrap_or("?")
                )),
                format!("kernel {}", k.version),
            ));
        }
    }
    Ok((changes, rebuild))
}

/// A reproducible timestamp for tools run in the guest: the newest kernel image's mtime.
fn source_date_epoch(g: &GuestRoot, ins: &Inspection) -> Result<i64, GuestError> {
    let mut t = 0;
    for k in &ins.kernels {
        if let Some(f) = g.open_read(&k.image)? {
            t = t.max(f.metadata().map(|m| m.mtime()).unwrap_or(0));
        }
    }
    Ok(t)
}

/// Rebuild the initramfs of every kernel with the guest's own tool, in a chroot with /proc, /sys and
/// /dev mounted (and unmounted again before returning).
fn rebuild_initramfs(s: &mut inspect::GuestSession, ins: &Inspection) -> Result<(), ConvertError> {
    let tool = ins.initramfs_tool.clone().unwrap_or_default();
    let epoch = source_date_epoch(&s.root, ins)?;
    let keep = s.mount_count();
    let result = (|| -> Result<(), ConvertError> {
        s.mount_in_guest(
            "proc",
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?;
        s.mount_in_guest(
            "sysfs",
            "/sys",
            Some("sysfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        )?;
        s.mount_in_guest("/dev", "/dev", None, MsFlags::MS_BIND)?;
        // Private tmpfs on /run and /tmp: what the tools leave there (blkid's cache, temp files) must
        // not land in the output (it would also make two conversions differ).
        let tmpfs = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        s.mount_in_guest("tmpfs", "/run", Some("tmpfs"), tmpfs)?;
        s.mount_in_guest("tmpfs", "/tmp", Some("tmpfs"), tmpfs)?;
        let root = s.root.host_path().to_path_buf();
        let mut runs: Vec<Vec<String>> = Vec::new();
        match tool.as_str() {
            "update-initramfs" => runs.push(vec![
                "update-initramfs".into(),
                "-u".into(),
                "-k".into(),
                "all".into(),
            ]),
            "dracut" => {
                for k in ins.kernels.iter().filter(|k| k.can_boot_virtio()) {
                    let img = k
                        .initramfs
                        .clone()
                        .unwrap_or_else(|| format!("/boot/initramfs-{}.img", k.version));
                    runs.push(vec![
                        "dracut".into(),
                        "-f".into(),
                        "--reproducible".into(),
                        "--kver".into(),
                        k.version.clone(),
                        img,
                    ]);
                }
            }
            other => {
                return Err(ConvertError::Rebuild {
                    tool: other.to_string(),
                    output: "no supported initramfs tool".into(),
                })
            }
        }
        for args in runs {
            // The guest's own tool runs as root: give it private mount, PID, network, IPC and UTS
            // namespaces on top of the chroot, so it cannot see or signal host processes, reach the
            // network, or change host mounts. (This is hardening, not a sandbox: root in a chroot is
            // still root.)
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
            ])
            .args(["--net", "--ipc", "--uts", "chroot"])
            .arg(&root)
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("LC_ALL", "C")
            .env("TMPDIR", "/tmp");
            tracing::info!(?args, "running in the guest chroot");
            progress::step(&format!(
                "regenerating initramfs with {} in chroot",
                args.join(" ")
            ));
            let (ok, out) = sys::run(&mut cmd, &args[0])?;
            if !ok {
                return Err(ConvertError::Rebuild {
                    tool: args.join(" "),
                    output: out,
                });
            }
        }
        Ok(())
    })();
    s.unmount_extras(keep);
    result
}

/// Steps 2-4 of [`convert`]: copy, change, verify, qcow2. `raws`/`outputs` collect the files written, so
/// that the caller can remove them when a step fails.
fn produce(
    o: &ConvertOptions,
    sources: &[PathBuf],
    ins: &Inspection,
    raws: &mut Vec<PathBuf>,
    outputs: &mut Vec<PathBuf>,
) -> Result<(Vec<Change>, Vec<String>), ConvertError> {
    // 2. Copy every input to its output (raw; a qcow2 output is made from a temporary raw copy).
    for (i, input) in sources.iter().enumerate() {
        let out = output_path(&o.output, i);
        let raw = match o.format {
            Format::Raw => out.clone(),
            Format::Qcow2 => out.with_extension("rehost-tmp.raw"),
        };
        tracing::info!(input = %input.display(), output = %raw.display(), "sparse copy");
        // Never write over (or, on failure, remove) an input.
        for inp in o.inputs.iter().chain(sources) {
            image::check_distinct(inp, &out)?;
            image::check_distinct(inp, &raw)?;
        }
        outputs.push(out);
        raws.push(raw.clone());
        progress::step(&format!(
            "copying {} to {} (sparse)",
            o.inputs[i].display(),
            raw.display()
        ));
        image::sparse_copy(input, &raw)?;
    }
    // 3. Open the copy read-write and change it.
    let disks = ins.disks.clone();
    let (changes, warnings) = {
        progress::step("mounting the copy read-write");
        let (mut s, _, _) = inspect::open_guest(raws, &disks, &o.work_parent, false)?;
        inspect::mount_boot(&mut s, raws, &disks, &ins.volumes(), false)?;
        progress::step("changing fstab, GRUB, network and initramfs configuration");
        let (mut changes, rebuild) = plan_changes(&s.root, ins, true)?;
        let mut warnings = ins.warnings.clone();
        if rebuild {
            rebuild_initramfs(&mut s, ins)?;
            progress::step("checking the drivers in the rebuilt initramfs");
            let after = inspect::inspect_guest(
                &s.root,
                disks.clone(),
                ins.root,
                ins.root_subvol.clone(),
                ins.boot,
            )?;
            for k in after.kernels.iter().filter(|k| k.can_boot_virtio()) {
                let lvm_root = ins.root_lv.is_some();
                let fatal: Vec<&String> = k
                    .missing
                    .iter()
                    .filter(|m| {
                        *m == "virtio_blk" || *m == "virtio_pci" || (lvm_root && *m == "dm_mod")
                    })
                    .collect();
                if !fatal.is_empty() || (lvm_root && !k.initramfs_has_lvm) {
                    let mut missing = k.missing.clone();
                    if lvm_root && !k.initramfs_has_lvm {
                        missing.push("lvm".into());
                    }
                    return Err(ConvertError::StillMissing {
                        kernel: k.version.clone(),
                        missing: missing.join(", "),
                    });
                }
                if !k.missing.is_empty() {
                    warnings.push(format!(
                        "initramfs of {} still lacks {}",
                        k.version,
                        k.missing.join(", ")
                    ));
                }
                for c in changes.iter_mut().filter(|c| {
                    c.kind == "initramfs" && c.detail == format!("kernel {}", k.version)
                }) {
                    c.new = Some(format!(
                        "{}; now contains {}",
                        c.new.clone().unwrap_or_default(),
                        k.in_initramfs.join(", ")
                    ));
                }
            }
        }
        (changes, warnings)
    };
    // 4. qcow2 output.
    if o.format == Format::Qcow2 {
        for (raw, out) in raws.iter().zip(outputs.iter()) {
            progress::step(&format!("writing the qcow2 output {}", out.display()));
            image::raw_to_qcow2(raw, out)?;
            let _ = std::fs::remove_file(raw);
        }
    }
    Ok((changes, warnings))
}

/// Convert `o.inputs` to `o.output`. The report is returned even when the boot check fails (see
/// `report.boot_check`); errors are returned for everything else.
pub fn convert(o: &ConvertOptions) -> Result<Report, ConvertError> {
    let started = Instant::now();
    // 0. Inputs in qcow2 are read through temporary raw copies next to the output (where the
    //    output's space is); other formats are refused by name.
    let temp_dir = match o.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prepared = input::prepare(&o.inputs, &temp_dir)?;
    // 1. Inspect the input itself, read-only: refuse early, before writing anything.
    let ins = match inspect::inspect_images(&prepared.raws, &o.work_parent) {
        Ok(mut ins) => {
            input::name_disks(&mut ins, &o.inputs, &prepared);
            ins
        }
        Err(e) if e.is_not_convertible() => {
            return Err(ConvertError::NotConvertible(vec![e.to_string()]))
        }
        Err(e) => return Err(e.into()),
    };
    if !ins.blockers.is_empty() {
        return Err(ConvertError::NotConvertible(ins.blockers.clone()));
    }
    let mut raws = Vec::new();
    let mut outputs = Vec::new();
    let (changes, warnings) = match produce(o, &prepared.raws, &ins, &mut raws, &mut outputs) {
        Ok(x) => x,
        Err(e) => {
            // A half-converted output must not be mistaken for a good one.
            for f in raws.iter().chain(&outputs) {
                let _ = std::fs::remove_file(f);
            }
            return Err(e);
        }
    };
    drop(prepared);
    let mut report = Report {
        inputs: o.inputs.iter().map(|p| p.display().to_string()).collect(),
        outputs: outputs.iter().map(|p| p.display().to_string()).collect(),
        target: "kvm-virtio".into(),
        format: o.format.name().into(),
        inspection: ins,
        changes,
        warnings,
        boot_check: None,
        seconds: 0.0,
    };
    // 5. Boot it.
    if o.boot_check {
        let serial_log = o
            .serial_log
            .clone()
            .unwrap_or_else(|| outputs[0].with_extension("serial.log"));
        let b = bootcheck::boot(&BootOptions {
            image: outputs[0].clone(),
            format: o.format.name().into(),
            timeout: o.boot_timeout,
            markers: o.boot_markers.clone(),
            serial_log,
            accel: o.accel.clone(),
            memory_mib: 1024,
        })?;
        report.boot_check = Some(b);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selinux_guest_gets_relabelled() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/selinux")).unwrap();
        std::fs::write(
            d.path().join("etc/selinux/config"),
            "SELINUXTYPE=targeted\nSELINUX=enforcing\n",
        )
        .unwrap();
        let g = GuestRoot::open(d.path()).unwrap();
        let ins = inspect::empty_inspection();
        let (plan, rebuild) = plan_changes(&g, &ins, false).unwrap();
        assert!(!rebuild);
        assert!(!d.path().join(".autorelabel").exists());
        let (done, _) = plan_changes(&g, &ins, true).unwrap();
        assert_eq!(plan, done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].file, "/.autorelabel");
        assert!(d.path().join(".autorelabel").exists());
        assert!(plan_changes(&g, &ins, true).unwrap().0.is_empty());
    }

    #[test]
    fn secondary_disks_get_numbered_outputs() {
        let o = Path::new("/x/vm.qcow2");
        assert_eq!(output_path(o, 0), PathBuf::from("/x/vm.qcow2"));
        assert_eq!(output_path(o, 2), PathBuf::from("/x/vm-disk2.qcow2"));
        assert_eq!(output_path(Path::new("out"), 1), PathBuf::from("out-disk1"));
    }
}
