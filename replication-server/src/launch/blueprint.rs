//! A machine's **blueprint**: the virtual hardware and launch method of its target VM (as in
//! MGN's launch settings). Kept per machine in the catalog as JSON; every field has a default, so
//! a machine without a blueprint launches with [`Blueprint::default`].
//!
//! From a blueprint and a converted image this module builds the QEMU command line and the
//! libvirt domain XML that every launch writes into its target dir (`qemu.sh`, `domain.xml`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Virtio,
    Scsi,
    Nvme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Nic {
    Virtio,
    E1000,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    Bios,
    Uefi,
    /// What the source used: UEFI when its boot disk is GPT with an EFI system partition.
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMethod {
    /// Converted image, `qemu.sh` and `domain.xml` in the target dir; nothing is started.
    None,
    /// The server starts QEMU, logs its serial console and waits for the boot marker.
    Qemu,
    /// `virsh define` + `virsh start` of `domain.xml`.
    Libvirt,
}

/// The target's network: QEMU user networking (NAT, isolated from production: the default), a
/// host bridge, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    User,
    Bridge(String),
    None,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Network::User),
            "none" => Ok(Network::None),
            _ => match s.strip_prefix("bridge:") {
                Some(b) if valid_bridge(b) => Ok(Network::Bridge(b.to_string())),
                Some(b) => Err(format!(
                    "bridge name `{b}` is not a Linux interface name (1-15 of A-Z a-z 0-9 . _ -, not . or ..)"
                )),
                None => Err(format!(
                    "network `{s}` is not one of user, bridge:NAME, none"
                )),
            },
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Network::User => f.write_str("user"),
            Network::None => f.write_str("none"),
            Network::Bridge(b) => write!(f, "bridge:{b}"),
        }
    }
}

impl Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A Linux interface name (as the kernel's `dev_valid_name`, narrowed to a safe set): 1-15 bytes,
/// not `.` or `..`.
fn valid_bridge(b: &str) -> bool {
    (1..=15).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b != "."
        && b != ".."
}

/// QEMU accelerator: `kvm`, `tcg`, or `auto` (KVM when /dev/kvm can be opened, else TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn resolve(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => {
                let kvm = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if kvm {
                    "kvm"
                } else {
                    "tcg"
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Blueprint {
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_bus: DiskBus,
    pub nic: Nic,
    pub boot: BootMode,
    pub format: Format,
    /// Parent of the per-job target dirs (default: `DATA_DIR/targets`).
    pub target_dir: Option<PathBuf>,
    pub launch: LaunchMethod,
    pub network: Network,
    pub accel: Accel,
    /// Seconds a launched target gets to show its boot marker on the serial console.
    pub boot_timeout_s: u64,
    /// Serial console texts that mean "booted".
    pub boot_markers: Vec<String>,
}

impl Default for Blueprint {
    fn default() -> Self {
        Blueprint {
            cpus: 2,
            memory_mib: 2048,
            disk_bus: DiskBus::Virtio,
            nic: Nic::Virtio,
            boot: BootMode::Source,
            format: Format::Qcow2,
            target_dir: None,
            launch: LaunchMethod::Qemu,
            network: Network::User,
            accel: Accel::Auto,
            boot_timeout_s: 300,
            boot_markers: vec!["login:".into(), "REHOST-BOOT-OK".into()],
        }
    }
}

impl Blueprint {
    /// Checks the bounds a launch relies on.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.cpus) {
            return Err(format!("cpus {} is not within 1..=64", self.cpus));
        }
        if !(128..=1_048_576).contains(&self.memory_mib) {
            return Err(format!(
                "memory {} MiB is not within 128..=1048576",
                self.memory_mib
            ));
        }
        if !(5..=3600).contains(&self.boot_timeout_s) {
            return Err(format!(
                "boot timeout {} s is not within 5..=3600",
                self.boot_timeout_s
            ));
        }
        if self.boot_markers.is_empty() || self.boot_markers.iter().any(|m| m.trim().is_empty()) {
            return Err("boot markers must be non-empty texts".into());
        }
        if let Some(d) = &self.target_dir {
            if !d.is_absolute() {
                return Err(format!(
                    "target dir {} must be an absolute path",
                    d.display()
                ));
            }
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "{} vCPU, {} memory, disk {:?}, NIC {:?}, boot {:?}, {}, launch {:?}, network {}, accel {:?}",
            self.cpus,
            crate::human::bytes(u64::from(self.memory_mib) << 20),
            self.disk_bus,
            self.nic,
            self.boot,
            self.format.name(),
            self.launch,
            self.network,
            self.accel
        )
        .to_lowercase()
    }
}

/// UEFI firmware (OVMF) code and variable-store templates, as Debian's `ovmf` package installs them.
pub fn find_ovmf() -> Option<(PathBuf, PathBuf)> {
    [
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
        ("OVMF_CODE.fd", "OVMF_VARS.fd"),
    ]
    .iter()
    .map(|(c, v)| {
        (
            Path::new("/usr/share/OVMF").join(c),
            Path::new("/usr/share/OVMF").join(v),
        )
    })
    .find(|(c, v)| c.is_file() && v.is_file())
}

/// What a launch of one converted target needs, resolved from the blueprint.
#[derive(Debug, Clone)]
pub struct Target {
    /// Domain / VM name.
    pub name: String,
    /// Converted disk images, boot disk first.
    pub disks: Vec<PathBuf>,
    pub format: Format,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
    /// `(code, vars)` for UEFI: read-only firmware and this target's own variable store.
    pub uefi: Option<(PathBuf, PathBuf)>,
    pub accel: &'static str,
}

/// The QEMU argument list (without the program name) that starts `t` per `bp`, daemonized.
pub fn qemu_args(bp: &Blueprint, t: &Target) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},process={}", t.name, t.name),
        "-accel".into(),
        t.accel.into(),
        "-machine".into(),
        "q35".into(),
        "-cpu".into(),
        if t.accel == "kvm" { "host" } else { "max" }.into(),
        "-smp".into(),
        bp.cpus.to_string(),
        "-m".into(),
        bp.memory_mib.to_string(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        // GRUB on BIOS hangs after "Welcome to GRUB!" on a machine without a display adapter.
        "-vga".into(),
        "std".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", t.serial_log.display()),
    ];
    if let Some((code, vars)) = &t.uefi {
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ));
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ));
    }
    if bp.disk_bus == DiskBus::Scsi {
        a.push("-device".into());
        a.push("virtio-scsi-pci,id=scsi0".into());
    }
    for (i, d) in t.disks.iter().enumerate() {
        a.push("-drive".into());
        a.push(format!(
            "file={},format={},if=none,id=disk{i},cache=none,aio=threads",
            d.display(),
            t.format.name()
        ));
        a.push("-device".into());
        let boot = if i == 0 { ",bootindex=0" } else { "" };
        a.push(match bp.disk_bus {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=disk{i}{boot}"),
            DiskBus::Scsi => format!("scsi-hd,bus=scsi0.0,drive=disk{i}{boot}"),
            DiskBus::Nvme => format!("nvme,drive=disk{i},serial=rehost{i}{boot}"),
        });
    }
    let model = match bp.nic {
        Nic::Virtio => "virtio-net-pci",
        Nic::E1000 => "e1000",
    };
    match &bp.network {
        Network::None => {}
        Network::User => {
            a.push("-netdev".into());
            a.push("user,id=net0".into());
            a.push("-device".into());
            a.push(format!("{model},netdev=net0"));
        }
        Network::Bridge(br) => {
            a.push("-netdev".into());
            a.push(format!("bridge,id=net0,br={br}"));
            a.push("-device".into());
            a.push(format!("{model},netdev=net0"));
        }
    }
    a.push("-pidfile".into());
    a.push(t.pidfile.display().to_string());
    a.push("-daemonize".into());
    a
}

/// A shell script that starts the target by hand: the same command line, quoted.
pub fn qemu_script(args: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# Starts this target VM (written by rehost-server; the converted image is next to it).\nexec qemu-system-x86_64",
    );
    for a in args {
        s.push_str(" \\\n  ");
        s.push_str(&shell_quote(a));
    }
    s.push('\n');
    s
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_=,./:+@".contains(&c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// A libvirt domain for the target (valid for `virt-xml-validate FILE domain`).
pub fn libvirt_xml(bp: &Blueprint, t: &Target) -> String {
    let mut x = String::new();
    let kvm = t.accel == "kvm";
    let nvme = bp.disk_bus == DiskBus::Nvme;
    // libvirt before 10 has no NVMe disk bus: those disks go through QEMU arguments.
    let _ = writeln!(
        x,
        "<domain type='{}'{}>",
        if kvm { "kvm" } else { "qemu" },
        if nvme {
            " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
        } else {
            ""
        }
    );
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(&t.name));
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", bp.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", bp.cpus);
    x.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
    if let Some((code, vars)) = &t.uefi {
        let _ = writeln!(
            x,
            "    <loader readonly='yes' type='pflash'>{}</loader>\n    <nvram>{}</nvram>",
            xml_escape(&code.display().to_string()),
            xml_escape(&vars.display().to_string())
        );
    }
    x.push_str("  </os>\n  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    if kvm {
        x.push_str("  <cpu mode='host-passthrough'/>\n");
    }
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n");
    x.push_str("    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n");
    let (bus, prefix) = match bp.disk_bus {
        DiskBus::Scsi => ("scsi", "sd"),
        DiskBus::Virtio | DiskBus::Nvme => ("virtio", "vd"),
    };
    if bp.disk_bus == DiskBus::Scsi {
        x.push_str("    <controller type='scsi' index='0' model='virtio-scsi'/>\n");
    }
    for (i, d) in t.disks.iter().enumerate().filter(|_| !nvme) {
        let dev = format!("{prefix}{}", (b'a' + (i as u8 % 26)) as char);
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}' cache='none'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='{bus}'/>{}\n    </disk>",
            t.format.name(),
            xml_escape(&d.display().to_string()),
            if i == 0 { "\n      <boot order='1'/>" } else { "" }
        );
    }
    let model = match bp.nic {
        Nic::Virtio => "virtio",
        Nic::E1000 => "e1000",
    };
    match &bp.network {
        Network::None => {}
        Network::User => {
            let _ = writeln!(
                x,
                "    <interface type='user'>\n      <model type='{model}'/>\n    </interface>"
            );
        }
        Network::Bridge(br) => {
            let _ = writeln!(
                x,
                "    <interface type='bridge'>\n      <source bridge='{}'/>\n      <model type='{model}'/>\n    </interface>",
                xml_escape(br)
            );
        }
    }
    let _ = writeln!(
        x,
        "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n    <console type='file'>\n      <source path='{}'/>\n      <target type='serial' port='0'/>\n    </console>",
        xml_escape(&t.serial_log.display().to_string()),
        xml_escape(&t.serial_log.display().to_string())
    );
    x.push_str("    <video>\n      <model type='vga'/>\n    </video>\n  </devices>\n");
    if nvme {
        x.push_str("  <qemu:commandline>\n");
        for (i, d) in t.disks.iter().enumerate() {
            let drive = format!(
                "file={},format={},if=none,id=nvme{i},cache=none",
                d.display(),
                t.format.name()
            );
            let dev = format!(
                "nvme,drive=nvme{i},serial=rehost{i}{}",
                if i == 0 { ",bootindex=1" } else { "" }
            );
            for arg in ["-drive", &drive, "-device", &dev] {
                let _ = writeln!(x, "    <qemu:arg value='{}'/>", xml_escape(arg));
            }
        }
        x.push_str("  </qemu:commandline>\n");
    }
    x.push_str("</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            name: "rehost-web-1-test-3".into(),
            disks: vec!["/t/web-1.qcow2".into(), "/t/web-1-disk2.qcow2".into()],
            format: Format::Qcow2,
            serial_log: "/t/serial.log".into(),
            pidfile: "/t/qemu.pid".into(),
            uefi: None,
            accel: "tcg",
        }
    }

    #[test]
    fn json_round_trip_and_defaults_for_missing_fields() {
        let bp = Blueprint {
            network: Network::Bridge("br0".into()),
            disk_bus: DiskBus::Nvme,
            ..Blueprint::default()
        };
        let j = serde_json::to_string(&bp).unwrap();
        assert!(j.contains("\"network\":\"bridge:br0\""), "{j}");
        assert_eq!(serde_json::from_str::<Blueprint>(&j).unwrap(), bp);
        let partial: Blueprint = serde_json::from_str(r#"{"cpus": 4}"#).unwrap();
        assert_eq!(partial.cpus, 4);
        assert_eq!(partial.memory_mib, Blueprint::default().memory_mib);
        assert!(serde_json::from_str::<Blueprint>(r#"{"cpu": 4}"#).is_err());
        assert!(serde_json::from_str::<Blueprint>(r#"{"network": "bridge:a b"}"#).is_err());
    }

    #[test]
    fn validation_names_the_bad_field() {
        let bad = Blueprint {
            cpus: 0,
            ..Blueprint::default()
        };
        assert!(bad.validate().unwrap_err().contains("cpus"));
        let bad = Blueprint {
            target_dir: Some("relative/dir".into()),
            ..Blueprint::default()
        };
        assert!(bad.validate().unwrap_err().contains("absolute"));
        assert!(Blueprint::default().validate().is_ok());
    }

    #[test]
    fn qemu_args_follow_the_blueprint() {
        let bp = Blueprint {
            disk_bus: DiskBus::Scsi,
            nic: Nic::E1000,
            ..Blueprint::default()
        };
        let a = qemu_args(&bp, &target()).join(" ");
        assert!(a.contains("virtio-scsi-pci,id=scsi0"), "{a}");
        assert!(
            a.contains("scsi-hd,bus=scsi0.0,drive=disk0,bootindex=0"),
            "{a}"
        );
        assert!(a.contains("scsi-hd,bus=scsi0.0,drive=disk1 "), "{a}");
        assert!(
            a.contains("-netdev user,id=net0 -device e1000,netdev=net0"),
            "{a}"
        );
        assert!(a.contains("-serial file:/t/serial.log"), "{a}");
        assert!(a.ends_with("-pidfile /t/qemu.pid -daemonize"), "{a}");
        let none = Blueprint {
            network: Network::None,
            ..Blueprint::default()
        };
        assert!(!qemu_args(&none, &target()).join(" ").contains("netdev"));
    }

    #[test]
    fn script_quotes_what_the_shell_would_split() {
        let s = qemu_script(&["-name".into(), "a b'c".into()]);
        assert!(s.contains("'a b'\\''c'"), "{s}");
    }

    /// Every shape of domain the blueprints can produce passes libvirt's own schema check.
    #[test]
    fn libvirt_xml_is_valid_for_virt_xml_validate() {
        let have = std::process::Command::new("virt-xml-validate")
            .arg("--help")
            .output()
            .is_ok();
        if !have {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "virt-xml-validate is missing and CI=true (scripts/install-deps.sh installs libvirt-clients)"
            );
            eprintln!("SKIPPED: virt-xml-validate is not installed (apt-get install libvirt-clients libxml2-utils)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cases = Vec::new();
        for bus in [DiskBus::Virtio, DiskBus::Scsi, DiskBus::Nvme] {
            for (nic, net) in [
                (Nic::Virtio, Network::User),
                (Nic::E1000, Network::Bridge("br0".into())),
                (Nic::Virtio, Network::None),
            ] {
                cases.push((
                    Blueprint {
                        disk_bus: bus,
                        nic,
                        network: net,
                        ..Blueprint::default()
                    },
                    target(),
                ));
            }
        }
        let mut uefi = target();
        uefi.uefi = Some((
            "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            "/t/OVMF_VARS.fd".into(),
        ));
        uefi.accel = "kvm";
        cases.push((Blueprint::default(), uefi));
        for (i, (bp, t)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("domain-{i}.xml"));
            std::fs::write(&path, libvirt_xml(bp, t)).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}\n{}{}",
                libvirt_xml(bp, t),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn libvirt_xml_escapes_and_names_every_disk() {
        let mut t = target();
        t.name = "a<b>&'".into();
        let x = libvirt_xml(&Blueprint::default(), &t);
        assert!(x.contains("<name>a&lt;b&gt;&amp;&apos;</name>"), "{x}");
        assert!(x.contains("<target dev='vda' bus='virtio'/>"), "{x}");
        assert!(x.contains("<target dev='vdb' bus='virtio'/>"), "{x}");
        assert!(x.contains("<domain type='qemu'>"), "{x}");
        assert!(x.contains("<interface type='user'>"), "{x}");
    }
}
