//! Pins of the converter's documented JSON (see `rehost_tests::pins`): the report that `convert
//! --report FILE` writes, what `inspect --json` prints, and what `boot-check` prints.
//!
//! The guest is small and synthetic but real: two disks with MBR tables (sfdisk) and ext4
//! filesystems populated with `mkfs.ext4 -d` (nothing mounted by the test), set up as on a Xen
//! host (fstab, GRUB and a static `eth0` naming `/dev/xvda1`/`/dev/xvdb1`, a MAC-bound udev rule,
//! Xen's guest tools enabled, SELinux permissive) with an initramfs that already carries the
//! virtio drivers, so the conversion runs no tool in the guest. A second, older kernel without
//! virtio drivers or an initramfs gives the inspection its warnings. The converter attaches and
//! mounts the filesystems, so the tests need root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rehost_tests::{bin, pins, require_root, run_ok};
use serde_json::Value;

const KVER: &str = "6.1.0-9-amd64";
const OLD_KVER: &str = "4.19.0-27-amd64";
const DATA_UUID: &str = "5f1c0a52-3d0e-4b8e-9a51-2c7d4e6f8a10";

/// Drivers the converter requires in the initramfs (`rehost_converter::initramfs::REQUIRED`),
/// with their paths below the kernel's module directory.
const DRIVERS: &[&str] = &[
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/scsi/virtio_scsi.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/nvme/host/nvme.ko",
];

fn write(root: &Path, path: &str, data: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("create dir");
    std::fs::write(p, data).expect("write file");
}

/// A newc cpio archive (uncompressed) holding empty files with these names.
fn cpio(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer = "TRAILER!!!".to_string();
    for (i, name) in names.iter().chain([&trailer]).enumerate() {
        let mode = if *name == trailer { 0 } else { 0o100644 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check
        let fields = [i + 1, mode, 0, 0, 1, 0, 0, 0, 0, 0, 0, name.len() + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    out
}

/// The guest's root filesystem tree.
fn root_tree(root: &Path) {
    write(
        root,
        "etc/os-release",
        b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
    );
    write(
        root,
        "etc/fstab",
        b"# from the Xen host\n/dev/xvda1 / ext4 errors=remount-ro 0 1\n/dev/xvdb1 /data ext4 defaults 0 2\n/dev/xvdc1 /scratch ext4 defaults 0 2\n",
    );
    write(
        root,
        "boot/grub/grub.cfg",
        format!(
            "menuentry 'Debian' {{\n\tlinux\t/boot/vmlinuz-{KVER} root=/dev/xvda1 ro console=hvc0 quiet\n\tinitrd\t/boot/initrd.img-{KVER}\n}}\nmenuentry 'Debian (old)' {{\n\tlinux\t/boot/vmlinuz-{OLD_KVER} root=/dev/xvda1 ro\n}}\n"
        )
        .as_bytes(),
    );
    write(
        root,
        "etc/default/grub",
        b"GRUB_DEFAULT=0\nGRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"console=hvc0 root=/dev/xvda1\"\n",
    );
    write(root, &format!("boot/vmlinuz-{KVER}"), b"kernel");
    write(root, &format!("boot/vmlinuz-{OLD_KVER}"), b"old kernel");
    let mut names = vec!["init".to_string()];
    names.extend(
        DRIVERS
            .iter()
            .map(|d| format!("usr/lib/modules/{KVER}/{d}")),
    );
    write(root, &format!("boot/initrd.img-{KVER}"), &cpio(&names));
    let dep: String = DRIVERS.iter().map(|d| format!("{d}:\n")).collect();
    write(
        root,
        &format!("usr/lib/modules/{KVER}/modules.dep"),
        dep.as_bytes(),
    );
    write(
        root,
        &format!("usr/lib/modules/{KVER}/modules.builtin"),
        b"kernel/drivers/virtio/virtio.ko\n",
    );
    write(root, "usr/sbin/update-initramfs", b"#!/bin/sh\n");
    write(
        root,
        "etc/network/interfaces",
        b"auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n",
    );
    write(
        root,
        "etc/udev/rules.d/70-persistent-net.rules",
        b"SUBSYSTEM==\"net\", ATTR{address}==\"00:16:3e:00:00:01\", NAME=\"eth0\"\n",
    );
    write(root, "lib/systemd/system/xe-daemon.service", b"[Unit]\n");
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).expect("create wants");
    std::os::unix::fs::symlink(
        "/lib/systemd/system/xe-daemon.service",
        wants.join("xe-daemon.service"),
    )
    .expect("symlink");
    write(
        root,
        "etc/selinux/config",
        b"SELINUX=permissive\nSELINUXTYPE=targeted\n",
    );
    for d in ["data", "scratch", "proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("create dir");
    }
}

/// A sparse raw image of `mib` MiB with one Linux partition from 1 MiB to the end, holding an
/// ext4 filesystem made from `tree`; `uuid` names the filesystem when given.
fn disk(img: &Path, mib: u64, tree: &Path, uuid: Option<&str>) {
    std::fs::File::create(img)
        .and_then(|f| f.set_len(mib << 20))
        .expect("create image");
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(img)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    std::io::Write::write_all(
        &mut sf.stdin.take().expect("stdin"),
        b"label: dos\nlabel-id: 0x5eed0001\nstart=1MiB, type=83, bootable\n",
    )
    .expect("write sfdisk script");
    assert!(sf.wait().expect("wait sfdisk").success(), "sfdisk");
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E", "offset=1048576", "-L", "pinned"]);
    if let Some(u) = uuid {
        mkfs.args(["-U", u]);
    }
    run_ok(
        mkfs.arg("-d")
            .arg(tree)
            .arg(img)
            .arg(format!("{}M", mib - 1)),
    );
}

/// The guest's boot disk and data disk in `dir`.
fn guest(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("root");
    root_tree(&root);
    let data = dir.join("data");
    write(&data, "README", b"data disk\n");
    let (boot_img, data_img) = (dir.join("boot.raw"), dir.join("data.raw"));
    disk(&boot_img, 64, &root, None);
    disk(&data_img, 16, &data, Some(DATA_UUID));
    (boot_img, data_img)
}

fn converter(dir: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let out = Command::new(bin("rehost-converter"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .args(args)
        .output()
        .expect("start rehost-converter");
    eprintln!(
        "$ rehost-converter {args:?}\n-> {:?}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}",
            String::from_utf8_lossy(bytes)
                .chars()
                .take(4000)
                .collect::<String>()
        )
    })
}

/// True when `tool` is on PATH; when it is not, says so and skips (fails when CI=true).
fn have(tool: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} needs {tool}, and CI=true: failing instead of skipping"
        );
        eprintln!("SKIPPED: {what} needs {tool} (scripts/install-deps.sh installs it)");
    }
    found
}

#[test]
fn convert_report_matches_its_pin() {
    let what = "the converter report pin";
    if !require_root(what) || !have("sfdisk", what) || !have("mkfs.ext4", what) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (boot, data) = guest(dir.path());
    let out = dir.path().join("out.raw");
    let report = dir.path().join("report.json");
    let o = converter(
        dir.path(),
        &[
            "convert".as_ref(),
            "--input".as_ref(),
            boot.as_os_str(),
            "--input".as_ref(),
            data.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "convert");
    let r = json(&std::fs::read(&report).expect("read report"));
    // What the pin is meant to cover: each kind of change, both disks, and the warnings.
    let kinds: Vec<&str> = r["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    for k in [
        "fstab",
        "grub-cfg",
        "default-grub",
        "network",
        "udev",
        "hypervisor-tools",
        "selinux",
    ] {
        assert!(kinds.contains(&k), "no {k} change in {kinds:?}");
    }
    assert_eq!(r["outputs"].as_array().map(Vec::len), Some(2));
    assert!(!r["warnings"].as_array().expect("warnings").is_empty());
    pins::check("converter-report", &r);
}

#[test]
fn inspect_json_matches_its_pin() {
    let what = "the converter inspect --json pin";
    if !require_root(what) || !have("sfdisk", what) || !have("mkfs.ext4", what) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (boot, data) = guest(dir.path());
    let o = converter(
        dir.path(),
        &[
            "inspect".as_ref(),
            "--json".as_ref(),
            boot.as_os_str(),
            data.as_os_str(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "inspect");
    let v = json(&o.stdout);
    assert!(!v["planned_changes"]
        .as_array()
        .expect("planned_changes")
        .is_empty());
    pins::check("converter-inspect", &v);
}

#[test]
fn boot_check_json_matches_its_pin() {
    // Needs no root: QEMU reads the image, nothing is attached or mounted. The image has no
    // bootloader, so the check ends at its timeout, not booted (exit 4).
    let what = "the converter boot-check pin";
    if !have("qemu-system-x86_64", what) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("blank.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create image");
    let log = dir.path().join("serial.log");
    let o = converter(
        dir.path(),
        &[
            "boot-check".as_ref(),
            img.as_os_str(),
            "--format".as_ref(),
            "raw".as_ref(),
            "--boot-timeout".as_ref(),
            "3".as_ref(),
            "--boot-marker".as_ref(),
            "REHOST-PIN-NEVER".as_ref(),
            "--serial-log".as_ref(),
            log.as_os_str(),
        ],
    );
    assert_eq!(o.status.code(), Some(4), "boot-check");
    let v = json(&o.stdout);
    assert_eq!(v["booted"], false);
    pins::check("converter-boot-check", &v);
}
