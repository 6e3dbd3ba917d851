//! LVM roots without device-mapper: real LVM2 metadata written by the host's `pvcreate`/`vgcreate`/
//! `lvcreate` (`--driverloaded n --activate n`: no device-mapper is needed to write metadata) on a loop
//! partition, the root filesystem written at the logical volume's extent range with `mkfs.ext4 -E
//! offset=`, and the converter's userspace LVM reader finding it, attaching it as a loop device with an
//! offset and mounting it. LVM runs with a private configuration (LVM_SYSTEM_DIR) that sees only the
//! test's partition and writes no backups.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const LVM_TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.ext4",
    "losetup",
    "pvcreate",
    "vgcreate",
    "lvcreate",
];
const KVER: &str = "6.1.0-9-amd64";

/// A loop device over one partition of an image (offset and size limit, as the converter attaches
/// partitions), detached on drop even when the test fails. No partition nodes: `partx -a` (BLKPG)
/// fails with EBUSY on a recycled loop number whose stale partitions someone left behind.
struct Loop(String);

impl Loop {
    fn attach(img: &Path, offset: u64, size: u64) -> Self {
        let o = Command::new("losetup")
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(size.to_string())
            .arg(img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "losetup {}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Loop(String::from_utf8(o.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
        // The kernel detaches at the last close (a prober may still hold it): wait for it, so
        // that the converter's leftovers check below sees only what the converter left.
        let backing = format!(
            "/sys/block/{}/loop/backing_file",
            self.0.trim_start_matches("/dev/")
        );
        for _ in 0..100 {
            if !Path::new(&backing).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Run an LVM command with the private configuration; returns stdout.
fn lvm(conf: &Path, args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .env("LVM_SYSTEM_DIR", conf)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A newc cpio archive (uncompressed) holding empty files with these names.
fn cpio(names: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, name) in names.iter().chain(["TRAILER!!!"].iter()).enumerate() {
        let mode = if *name == "TRAILER!!!" { 0 } else { 0o100644 };
        out.extend_from_slice(
            format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                i + 1,
                mode,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            )
            .as_bytes(),
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    out
}

fn write(root: &Path, path: &str, data: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A Debian-like guest as on a Xen host with the installer's LVM layout: p1 = /boot (ext4, GRUB config,
/// kernel, an initramfs from Xen with neither virtio drivers nor lvm), p2 = LVM PV of VG `vg-sys` with
/// LVs `root` (ext4, the root filesystem), `home` and `swap`. With `split_root`, `root` is extended
/// after `home` was created, so it has two segments. Returns the image.
fn lvm_image(dir: &Path, split_root: bool) -> PathBuf {
    let boot = dir.join("boot");
    write(
        &boot,
        "grub/grub.cfg",
        format!(
            "insmod lvm\nmenuentry 'Debian' {{\n\tlinux\t/vmlinuz-{KVER} root=/dev/mapper/vg--sys-root ro resume=/dev/vg-sys/swap quiet\n\tinitrd\t/initrd.img-{KVER}\n}}\n"
        )
        .as_bytes(),
    );
    write(&boot, &format!("vmlinuz-{KVER}"), b"kernel");
    write(
        &boot,
        &format!("initrd.img-{KVER}"),
        &cpio(&[
            "init",
            &format!("usr/lib/modules/{KVER}/kernel/drivers/block/xen-blkfront.ko"),
            &format!("usr/lib/modules/{KVER}/kernel/fs/ext4/ext4.ko"),
        ]),
    );
    let root = dir.join("root");
    write(
        &root,
        "etc/os-release",
        b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
    );
    write(
        &root,
        "etc/fstab",
        b"# LVM layout from the installer\n/dev/mapper/vg--sys-root / ext4 errors=remount-ro 0 1\n/dev/xvda1 /boot ext4 defaults 0 2\n/dev/mapper/vg--sys-home /home ext4 defaults 0 2\n/dev/vg-sys/swap none swap sw 0 0\n",
    );
    write(
        &root,
        &format!("usr/lib/modules/{KVER}/modules.dep"),
        b"kernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/block/virtio_blk.ko:\nkernel/drivers/scsi/virtio_scsi.ko:\nkernel/drivers/net/virtio_net.ko:\nkernel/drivers/nvme/host/nvme.ko:\nkernel/drivers/md/dm-mod.ko:\n",
    );
    write(&root, "usr/sbin/update-initramfs", b"#!/bin/sh\n");
    write(&root, "usr/sbin/lvm", b"lvm2 binary stand-in\n");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("home")).unwrap();

    let img = dir.join("lvm.raw");
    partitioned_image(
        &img,
        200,
        "label: dos\nstart=1MiB, size=32MiB, type=83, bootable\nstart=33MiB, type=8e\n",
    );
    mkfs_ext4(&img, 1 << 20, 32 << 20, Some(&boot), &[]);

    // LVM metadata on p2 (33 MiB to the end), written through a loop device over the partition.
    let conf = dir.join("lvm-conf");
    let (pe_start, extent, first_pe, extents) = {
        let lo = Loop::attach(&img, 33 << 20, (200 - 33) << 20);
        let pv = lo.0.clone();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("lvm.conf"),
            format!(
                "devices {{ use_devicesfile = 0 scan = [ \"/dev\" ] filter = [ \"a|^{pv}$|\", \"r|.*|\" ] obtain_device_list_from_udev = 0 }}\n\
                 activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}\n\
                 backup {{ backup = 0 archive = 0 }}\n\
                 global {{ locking_dir = \"{}\" }}\n",
                conf.join("lock").display()
            ),
        )
        .unwrap();
        let nodm = ["--driverloaded", "n"];
        lvm(&conf, &["pvcreate", "-y", &pv]);
        lvm(&conf, &["vgcreate", "-s", "4m", "vg-sys", &pv]);
        let lv = |name: &str, size: &str| {
            let mut a = vec!["lvcreate"];
            a.extend(nodm);
            a.extend([
                "--activate",
                "n",
                "--zero",
                "n",
                "-n",
                name,
                "-L",
                size,
                "vg-sys",
            ]);
            lvm(&conf, &a);
        };
        lv("root", "80m");
        lv("home", "8m");
        lv("swap", "8m");
        if split_root {
            let mut a = vec!["lvextend"];
            a.extend(nodm);
            a.extend(["-L", "+8m", "vg-sys/root"]);
            lvm(&conf, &a);
        }
        let num = |args: &[&str]| -> u64 {
            lvm(&conf, args)
                .trim()
                .trim_end_matches('B')
                .parse()
                .unwrap()
        };
        let pe_start = num(&[
            "pvs",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "-o",
            "pe_start",
            &pv,
        ]);
        let extent = num(&[
            "vgs",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "-o",
            "vg_extent_size",
            "vg-sys",
        ]);
        // "/dev/loop3:0-19" (first segment of root).
        let ranges = lvm(
            &conf,
            &["lvs", "--noheadings", "-o", "seg_pe_ranges", "vg-sys/root"],
        );
        let first = ranges.lines().next().unwrap().trim().to_string();
        let (a, b) = first.rsplit_once(':').unwrap().1.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        (pe_start, extent, a, b - a + 1)
    };
    // The root filesystem, written where the first segment of vg-sys/root lies.
    let offset = (33 << 20) + pe_start + first_pe * extent;
    mkfs_ext4(&img, offset, extents * extent, Some(&root), &[]);
    img
}

#[test]
fn lvm_root_is_inspected_and_planned_without_device_mapper() {
    if !ready(LVM_TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = lvm_image(dir.path(), false);
    let before = file_hash(&img);
    let t = std::time::Instant::now();
    let (o, v) = inspect_json(dir.path(), &img);
    eprintln!("inspect took {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(0));
    let ins = &v["inspection"];
    assert_eq!(ins["os"]["id"], "debian");
    assert_eq!(ins["os"]["pretty_name"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(ins["root_lv"], "vg-sys/root");
    assert_eq!(ins["root_fs"]["kind"], "ext4");
    assert_eq!(ins["root"][0], 0);
    assert!(
        ins["root"][1].as_u64().unwrap() > u64::from(rehost_converter::inspect::LV_NUMBER_BASE)
    );
    // /boot found through the guest's fstab and mounted from partition 1.
    assert_eq!(ins["boot"], serde_json::json!([0, 1]));
    assert_eq!(ins["bootloader"], "grub2");
    assert_eq!(ins["kernels"][0]["version"], KVER);
    assert_eq!(ins["kernels"][0]["initramfs_has_lvm"], false);
    let lvs = ins["disks"][0]["logical_volumes"].as_array().unwrap();
    let names: Vec<&str> = lvs.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["root", "home", "swap"]);
    assert!(lvs
        .iter()
        .all(|l| l["refused"].is_null() && l["pv_part"] == 2));
    assert_eq!(lvs[0]["dm_name"], "vg--sys-root");

    let plan = v["planned_changes"].as_array().unwrap();
    let show = serde_json::to_string_pretty(plan).unwrap();
    // fstab: only /boot (a Xen device name) changes; the LVM names are stable and kept.
    let fstab: Vec<&serde_json::Value> = plan.iter().filter(|c| c["kind"] == "fstab").collect();
    assert_eq!(fstab.len(), 1, "{show}");
    assert_eq!(fstab[0]["old"], "/dev/xvda1 /boot ext4 defaults 0 2");
    assert!(fstab[0]["new"].as_str().unwrap().starts_with("UUID="));
    // GRUB: root= and resume= kept, the serial console added.
    let grub = plan
        .iter()
        .find(|c| c["kind"] == "grub-cfg")
        .expect("grub change");
    let new = grub["new"].as_str().unwrap();
    assert!(
        new.contains("root=/dev/mapper/vg--sys-root")
            && new.contains("resume=/dev/vg-sys/swap")
            && new.contains("console=ttyS0,115200"),
        "{show}"
    );
    // The initramfs: virtio drivers and dm_mod listed, rebuilt, lvm noted as missing.
    let modules = plan
        .iter()
        .find(|c| c["file"] == "/etc/initramfs-tools/modules")
        .expect("initramfs modules change");
    let m = modules["new"].as_str().unwrap();
    assert!(m.contains("virtio_blk") && m.contains("dm_mod"), "{show}");
    let rebuilt = plan
        .iter()
        .find(|c| c["file"] == format!("/boot/initrd.img-{KVER}"))
        .expect("initramfs rebuild");
    let old = rebuilt["old"].as_str().unwrap();
    assert!(old.contains("virtio_pci") && old.ends_with("lvm"), "{show}");

    // The human summary names the LV.
    let o = run_in(dir.path(), &["inspect", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("LV vg-sys/root"), "{text}");

    assert_eq!(file_hash(&img), before, "inspection modified the image");
    assert_no_leftovers(dir.path());
}

#[test]
fn multi_segment_lvm_root_and_corrupt_metadata_are_refused() {
    if !ready(&[LVM_TOOLS, &["lvextend"]].concat()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = lvm_image(dir.path(), true);
    let (o, _) = inspect_json(dir.path(), &img);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("vg-sys/root") && err.contains("2 segments"),
        "{err}"
    );
    assert_convert_refused(dir.path(), &img, 3, "2 segments");

    // One byte of the metadata text changed on disk: LVM's checksum no longer matches, refused.
    // (The metadata area keeps older copies too: change the word in every one of them.)
    let mut d = std::fs::read(&img).unwrap();
    let pv = 33 << 20;
    let mut changed = 0;
    for at in pv..pv + (1 << 20) {
        if &d[at..at + 11] == b"extent_size" {
            d[at] = b'E';
            changed += 1;
        }
    }
    assert!(changed > 0, "no metadata text on the PV");
    std::fs::write(&img, &d).unwrap();
    let o = run_in(dir.path(), &["inspect", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_no_leftovers(dir.path());
}
