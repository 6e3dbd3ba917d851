//! Hostile and broken images are refused cleanly: no panic, a clear error, no output written, nothing on
//! the host touched, and no mount or loop device left behind.

mod common;
use common::*;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

/// A 64 MiB image with an MBR whose only partition runs far past the end of the disk.
fn bad_mbr_image(path: &Path) {
    let mut d = vec![0u8; 512];
    mbr(&mut d, 0x83, 0x7FFF_0000);
    write_image(path, &d, 64 << 20);
}

/// An MBR in `d` whose only partition (bootable, of type `kind`) starts at sector 2048 and has
/// `sectors` sectors.
fn mbr(d: &mut [u8], kind: u8, sectors: u32) {
    d[446] = 0x80;
    d[446 + 4] = kind;
    d[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xAA;
}

/// `d` written to `path`, which is then extended (sparse) to `size` bytes.
fn write_image(path: &Path, d: &[u8], size: u64) {
    std::fs::write(path, d).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(size)
        .unwrap();
}

#[test]
fn corrupted_partition_table_is_refused() {
    // Needs no root: the table is refused before anything is attached or mounted.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.raw");
    bad_mbr_image(&img);
    let out = dir.path().join("out.raw");
    let o = run(&["inspect", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("partition 1") && err.contains("outside"),
        "{err}"
    );
    let o = run(&[
        "convert",
        "--input",
        img.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside"));
    assert!(!out.exists(), "an output was written for a refused input");
    // A GPT whose header checksum does not match (primary and backup) is refused too.
    let mut d = std::fs::read(&img).unwrap();
    d[446 + 4] = 0xEE;
    d[512..520].copy_from_slice(b"EFI PART");
    d[512 + 12..512 + 16].copy_from_slice(&92u32.to_le_bytes());
    std::fs::write(&img, &d).unwrap();
    let o = run(&["inspect", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("GPT header is invalid"));
}

/// Build a raw disk with one ext4 partition populated from `tree` (mkfs.ext4 -d, nothing mounted).
fn ext4_image(tree: &Path, img: &Path) {
    partitioned_image(img, 64, "label: dos\nstart=2048, type=83, bootable\n");
    mkfs_ext4(img, 1 << 20, 60 << 20, Some(tree), &[]);
}

#[test]
fn escaping_symlinks_in_the_guest_never_reach_the_host() {
    if !ready(&["sfdisk", "mkfs.ext4", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Host files the guest points at; their content must never show up or change.
    let host_fstab = dir.path().join("host-fstab");
    std::fs::write(&host_fstab, "/dev/sda9 /HOSTSECRET ext4 defaults 0 0\n").unwrap();
    let host_grub = dir.path().join("host-grub.cfg");
    std::fs::write(&host_grub, "linux /vmlinuz root=/dev/HOSTSECRET\n").unwrap();
    let tree = dir.path().join("tree");
    for d in ["etc/network", "boot/grub", "usr/lib/modules"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::write(
        tree.join("etc/os-release"),
        "ID=debian\nVERSION_ID=12\nPRETTY_NAME=\"hostile\"\n",
    )
    .unwrap();
    symlink(
        format!("/../../../../../..{}", host_fstab.display()),
        tree.join("etc/fstab"),
    )
    .unwrap();
    symlink(&host_grub, tree.join("boot/grub/grub.cfg")).unwrap();
    symlink(
        "../../../../../../../../../etc",
        tree.join("etc/network/interfaces"),
    )
    .unwrap();
    symlink("/proc/self/root/etc/passwd", tree.join("etc/default")).unwrap();
    std::fs::write(tree.join("boot/vmlinuz-6.1.0-hostile"), b"not a kernel").unwrap();
    let img = dir.path().join("hostile.raw");
    ext4_image(&tree, &img);
    let before = file_hash(&img);
    let work = dir.path().join("work");

    let o = run(&[
        "--work-dir",
        work.to_str().unwrap(),
        "inspect",
        "--json",
        img.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        !stdout.contains("HOSTSECRET"),
        "host file content leaked into the inspection"
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "the image must be reported as not convertible"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let blockers = v["inspection"]["blockers"].to_string();
    assert!(blockers.contains("bootloader"), "{blockers}");
    assert!(blockers.contains("virtio"), "{blockers}");

    assert_convert_refused(dir.path(), &img, 3, "cannot be made bootable");
    assert_eq!(
        std::fs::read_to_string(&host_fstab).unwrap(),
        "/dev/sda9 /HOSTSECRET ext4 defaults 0 0\n"
    );
    assert_eq!(
        std::fs::read_to_string(&host_grub).unwrap(),
        "linux /vmlinuz root=/dev/HOSTSECRET\n"
    );
    assert_eq!(file_hash(&img), before, "input modified");
    assert_no_leftovers(dir.path());
    // The work directory holds nothing afterwards.
    assert_eq!(std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0), 0);
}

#[test]
fn escaping_symlinks_in_a_convertible_guest_are_not_followed_out() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let src = fixture("xen");
    let dir = scratch();
    let host_fstab = dir.path().join("host-fstab");
    std::fs::write(&host_fstab, "/dev/xvda1 / ext4 defaults 0 1\n").unwrap();
    let host_grub = dir.path().join("host-default-grub");
    std::fs::write(&host_grub, "GRUB_CMDLINE_LINUX=\"root=/dev/xvda1\"\n").unwrap();
    // A hostile variant of the real image: /etc/fstab climbs out with "..", /etc/default/grub is an
    // absolute symlink to a host path.
    let img = dir.path().join("hostile.raw");
    assert!(Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&img)
        .status()
        .unwrap()
        .success());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let lo = Command::new("losetup")
        .args(["--find", "--show", "--offset", "1048576", "--sizelimit"])
        .arg(format!("{}", 1407u64 << 20))
        .arg(&img)
        .output()
        .unwrap();
    let lo = String::from_utf8_lossy(&lo.stdout).trim().to_string();
    assert!(Command::new("mount")
        .arg(&lo)
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    std::fs::remove_file(mnt.join("etc/fstab")).unwrap();
    symlink(
        format!("/../../../../../../..{}", host_fstab.display()),
        mnt.join("etc/fstab"),
    )
    .unwrap();
    std::fs::remove_file(mnt.join("etc/default/grub")).unwrap();
    symlink(&host_grub, mnt.join("etc/default/grub")).unwrap();
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert!(Command::new("losetup")
        .arg("-d")
        .arg(&lo)
        .status()
        .unwrap()
        .success());

    let out = dir.path().join("out.raw");
    let report = dir.path().join("report.json");
    let (o, r) = convert_with_report(dir.path(), &[&img], &out, &report, &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&host_fstab).unwrap(),
        "/dev/xvda1 / ext4 defaults 0 1\n"
    );
    assert_eq!(
        std::fs::read_to_string(&host_grub).unwrap(),
        "GRUB_CMDLINE_LINUX=\"root=/dev/xvda1\"\n"
    );
    assert!(!dir.path().join("host-fstab.rehost-orig").exists());
    assert!(!dir.path().join("host-default-grub.rehost-orig").exists());
    let files: Vec<&str> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["file"].as_str().unwrap())
        .collect();
    assert!(
        !files.contains(&"/etc/fstab") && !files.contains(&"/etc/default/grub"),
        "{files:?}"
    );
    assert!(files.contains(&"/boot/grub/grub.cfg"));
    assert_no_leftovers(dir.path());
}

#[test]
fn output_that_is_the_input_is_refused_and_kept() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let src = fixture("xen");
    let dir = scratch();
    let link = dir.path().join("same.raw");
    std::fs::hard_link(&src, &link).unwrap();
    let before = file_hash(&src);
    let o = convert_in(dir.path(), &src, &link);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the input itself"));
    assert!(
        link.exists(),
        "the refused output (= the input) was removed"
    );
    assert_eq!(file_hash(&src), before);
    assert_no_leftovers(dir.path());
}

/// A 32 MiB MBR disk whose only partition starts with `header` (at byte `at` of the partition).
fn disk_with_header(path: &Path, at: usize, header: &[u8], kind: u8) {
    let mut d = vec![0u8; 2 << 20];
    mbr(&mut d, kind, (30u32 << 20) / 512);
    d[(1 << 20) + at..(1 << 20) + at + header.len()].copy_from_slice(header);
    write_image(path, &d, 32 << 20);
}

#[test]
fn encrypted_and_lvm_roots_are_refused_with_the_reason() {
    // Needs no root: neither is ever attached or mounted.
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let luks = dir.path().join("luks.raw");
    disk_with_header(&luks, 0, b"LUKS\xba\xbe\x00\x02", 0x83);
    let mut lvm_label = b"LABELONE".to_vec();
    lvm_label.resize(24, 0);
    lvm_label.extend_from_slice(b"LVM2 001");
    let lvm = dir.path().join("lvm.raw");
    disk_with_header(&lvm, 512, &lvm_label, 0x8e);
    for (img, why) in [(&luks, "LUKS-encrypted"), (&lvm, "LVM")] {
        let o = run(&[
            "--work-dir",
            work.to_str().unwrap(),
            "inspect",
            img.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&o.stderr).contains(why));
        assert_convert_refused(dir.path(), img, 3, why);
    }
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
}
