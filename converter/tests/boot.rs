//! End-to-end: real Debian images (debootstrap, GRUB, configured as on Xen or VMware), converted by the
//! real binary and booted under QEMU/TCG with virtio. Needs root, debootstrap and qemu-system-x86.

mod common;
use common::*;
use rehost_converter::bootcheck::{self, BootOptions};
use std::path::Path;
use std::time::{Duration, Instant};

fn changes(report: &serde_json::Value) -> Vec<(String, String, String, String)> {
    report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            (s("kind"), s("file"), s("old"), s("new"))
        })
        .collect()
}

/// The report's boot check says booted, with an address from QEMU's user network.
fn assert_booted_with_dhcp(report: &serde_json::Value) {
    assert_eq!(report["boot_check"]["booted"], true);
    let ip = report["boot_check"]["guest_ipv4"].as_str().unwrap_or("");
    assert!(
        ip.starts_with("10.0.2."),
        "guest address {ip:?} is not from QEMU's user network"
    );
}

/// Converts `img` into `dir/name` (qcow2 or raw, by the name) with `--boot-check` to the fixture's
/// marker, prints the serial console's tail, and returns the exit code and the report (null when
/// none was written).
fn convert_and_boot(img: &Path, dir: &Path, name: &str) -> (Option<i32>, serde_json::Value) {
    let out = dir.join(name);
    let report = dir.join("report.json");
    let serial = dir.join("serial.log");
    let format = if name.ends_with(".qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let t = Instant::now();
    let (o, r) = convert_with_report(
        dir,
        &[img],
        &out,
        &report,
        &[
            "--target",
            "kvm-virtio",
            "--format",
            format,
            "--boot-check",
            "--boot-timeout",
            "300",
            "--boot-marker",
            "REHOST-BOOT-OK",
            "--serial-log",
            serial.to_str().unwrap(),
        ],
    );
    eprintln!("convert + boot check took {:?}", t.elapsed());
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    eprintln!("serial tail:\n{}", &log[log.len().saturating_sub(3000)..]);
    (o.status.code(), r)
}

#[test]
fn unconverted_xen_image_does_not_boot_on_virtio() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let img = fixture("xen");
    let dir = scratch();
    let t = Instant::now();
    let r = bootcheck::boot(&BootOptions {
        image: img,
        format: "raw".into(),
        timeout: Duration::from_secs(300),
        markers: vec!["REHOST-BOOT-OK".into(), "login:".into()],
        serial_log: dir.path().join("serial.log"),
        accel: "tcg".into(),
        memory_mib: 1024,
    })
    .unwrap();
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    eprintln!(
        "unconverted boot: {r:?} after {:?}\n{}",
        t.elapsed(),
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(!r.booted);
    assert!(
        log.contains("/dev/xvda1 does not exist"),
        "expected the initramfs failure on the console"
    );
}

#[test]
fn converted_xen_image_boots_gets_dhcp_and_reports_changes() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let img = fixture("xen");
    let before = file_hash(&img);
    let dir = scratch();
    let (code, r) = convert_and_boot(&img, dir.path(), "xen.qcow2");
    assert_eq!(code, Some(0));
    assert_eq!(file_hash(&img), before, "the input image was modified");
    assert_no_leftovers(dir.path());
    assert_booted_with_dhcp(&r);
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert!(log.contains("REHOST-BOOT-OK"));
    let ch = changes(&r);
    let has = |kind: &str, file: &str, old: &str, new: &str| {
        ch.iter()
            .any(|(k, f, o, n)| k == kind && f == file && o.contains(old) && n.contains(new))
    };
    assert!(has("fstab", "/etc/fstab", "/dev/xvda1", "UUID="), "{ch:#?}");
    assert!(has("fstab", "/etc/fstab", "/dev/xvda2", "UUID="));
    assert!(has("fstab", "/etc/fstab", "/dev/xvdb1", "nofail"));
    assert!(has(
        "grub-cfg",
        "/boot/grub/grub.cfg",
        "root=/dev/xvda1",
        "root=UUID="
    ));
    assert!(has(
        "grub-cfg",
        "/boot/grub/grub.cfg",
        "resume=/dev/xvda2",
        "resume=UUID="
    ));
    assert!(has(
        "default-grub",
        "/etc/default/grub",
        "GRUB_DISABLE_LINUX_UUID=true",
        "false"
    ));
    assert!(has(
        "initramfs",
        "/etc/initramfs-tools/modules",
        "",
        "virtio_blk"
    ));
    assert!(ch.iter().any(|(k, f, _, n)| k == "initramfs"
        && f.starts_with("/boot/initrd.img-")
        && n.contains("virtio_blk")));
    assert!(has(
        "network",
        "/etc/network/interfaces",
        "iface eth0 inet static",
        "iface eth0 inet dhcp"
    ));
    assert!(has(
        "network",
        "/etc/network/interfaces",
        "address 192.0.2.10/24",
        ""
    ));
    assert!(ch
        .iter()
        .any(|(k, f, _, _)| k == "udev" && f == "/etc/udev/rules.d/70-persistent-net.rules"));
    // The Xen image already had console=ttyS0: not added twice.
    assert!(!ch
        .iter()
        .any(|(_, _, _, n)| n.matches("console=ttyS0").count() > 1));
}

#[test]
fn converted_vmware_image_boots_with_tools_disabled() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let img = fixture("vmware");
    let dir = scratch();
    let (code, r) = convert_and_boot(&img, dir.path(), "vmw.raw");
    assert_eq!(code, Some(0));
    assert_booted_with_dhcp(&r);
    let ch = changes(&r);
    assert!(
        ch.iter()
            .any(|(k, f, _, _)| k == "hypervisor-tools" && f.ends_with("/open-vm-tools.service")),
        "{ch:#?}"
    );
    assert!(ch.iter().any(|(k, _, o, n)| k == "network"
        && o.contains("ens192")
        && n.contains("eth0 inet dhcp")));
    assert!(ch.iter().any(|(k, _, o, n)| k == "grub-cfg"
        && o.contains("root=/dev/sda1")
        && n.contains("console=ttyS0,115200")
        && n.contains("net.ifnames=0")));
}

#[test]
fn converting_twice_gives_the_same_output() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let img = fixture("xen");
    let dir = scratch();
    let mut manifests = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("out{i}.raw"));
        let report = dir.path().join(format!("report{i}.json"));
        let (o, mut r) = convert_with_report(dir.path(), &[&img], &out, &report, &[]);
        assert_eq!(o.status.code(), Some(0));
        let m = run_in(dir.path(), &["manifest", out.to_str().unwrap()]);
        assert!(m.status.success());
        r["outputs"] = serde_json::Value::Null;
        r["seconds"] = serde_json::Value::Null;
        manifests.push((String::from_utf8(m.stdout).unwrap(), r["changes"].clone()));
        std::fs::remove_file(&out).unwrap();
    }
    let (a, b) = (&manifests[0].0, &manifests[1].0);
    let diff: Vec<_> = a
        .lines()
        .zip(b.lines())
        .filter(|(x, y)| x != y)
        .take(20)
        .collect();
    assert!(
        a.lines().count() > 10_000,
        "manifest too small to mean anything"
    );
    assert!(
        diff.is_empty() && a.lines().count() == b.lines().count(),
        "outputs differ: {diff:#?}"
    );
    assert_eq!(
        manifests[0].1, manifests[1].1,
        "reports list different changes"
    );
    // The rebuilt initramfs is byte-identical (SOURCE_DATE_EPOCH).
    assert!(a
        .lines()
        .any(|l| l.contains("/boot/initrd.img-") && l.contains(" file ")));
}

#[test]
fn converted_lvm_image_boots_with_its_lvm_names_kept() {
    if !ready(&[BOOT_TOOLS, &["pvcreate", "lvcreate", "blkid"]].concat()) {
        return;
    }
    // Debian installer's layout: /boot on p1, the root on LV vg-sys/root of the PV on p2. The staging
    // host has no device-mapper: the converter attaches the LV by its extent range.
    let img = fixture("xen-lvm");
    let before = file_hash(&img);
    let dir = scratch();
    let (code, r) = convert_and_boot(&img, dir.path(), "lvm.raw");
    assert_eq!(code, Some(0));
    assert_eq!(file_hash(&img), before, "the input image was modified");
    assert_no_leftovers(dir.path());
    assert_eq!(r["inspection"]["root_lv"], "vg-sys/root");
    assert_booted_with_dhcp(&r);
    let ch = changes(&r);
    // The LVM names are stable: no fstab or kernel command line change touches them.
    assert!(
        !ch.iter().any(|(k, _, o, n)| (k == "fstab"
            && (o.contains("/dev/mapper/") || o.contains("/dev/vg-sys/")))
            || (k == "grub-cfg" && !n.contains("root=/dev/mapper/vg--sys-root"))),
        "{ch:#?}"
    );
    assert!(ch.iter().any(|(k, f, o, n)| k == "fstab"
        && f == "/etc/fstab"
        && o.contains("/dev/xvda1")
        && n.starts_with("UUID=")));
    // The rebuilt initramfs has the virtio drivers and still device-mapper.
    assert!(
        ch.iter().any(|(k, f, _, n)| k == "initramfs"
            && f.starts_with("/boot/initrd.img-")
            && n.contains("virtio_blk")
            && n.contains("dm_mod")),
        "{ch:#?}"
    );
}

#[test]
fn converted_dracut_image_boots() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    // As a RHEL-like guest: dracut, an initramfs built on the Xen host with its drivers only.
    let img = fixture("xen-dracut");
    let dir = scratch();
    let (code, r) = convert_and_boot(&img, dir.path(), "dracut.qcow2");
    assert_eq!(code, Some(0));
    assert_no_leftovers(dir.path());
    assert_eq!(r["inspection"]["initramfs_tool"], "dracut");
    assert_booted_with_dhcp(&r);
    let ch = changes(&r);
    assert!(
        ch.iter().any(|(k, f, _, n)| k == "initramfs"
            && f == "/etc/dracut.conf.d/90-rehost-virtio.conf"
            && n.contains("virtio_blk")),
        "{ch:#?}"
    );
    assert!(
        ch.iter().any(|(k, f, _, n)| k == "initramfs"
            && f.starts_with("/boot/initrd.img-")
            && n.contains("rebuilt with dracut")
            && n.contains("now contains virtio_pci, virtio_blk")),
        "{ch:#?}"
    );
}
