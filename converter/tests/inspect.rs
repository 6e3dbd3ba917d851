//! Inspection of small synthetic images (built with sfdisk + mkfs.ext4 -d, nothing mounted by the test):
//! a separate /boot partition named in fstab is found and mounted under the guest root.

mod common;
use common::*;
use std::process::Command;

#[test]
fn separate_boot_partition_is_found() {
    if !ready(&["sfdisk", "mkfs.ext4", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/modules/6.1.0-9-amd64")).unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "ID=debian\nVERSION_ID=12\nPRETTY_NAME=\"Debian 12\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/fstab"),
        "/dev/sda1 / ext4 defaults 0 1\n/dev/sda2 /boot ext4 defaults 0 2\n",
    )
    .unwrap();
    std::fs::write(
        root.join("usr/lib/modules/6.1.0-9-amd64/modules.dep"),
        "kernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/block/virtio_blk.ko:\n",
    )
    .unwrap();
    std::fs::create_dir_all(boot.join("grub")).unwrap();
    std::fs::write(
        boot.join("grub/grub.cfg"),
        "menuentry x {\n linux /vmlinuz-6.1.0-9-amd64 root=/dev/sda1 ro\n}\n",
    )
    .unwrap();
    std::fs::write(boot.join("vmlinuz-6.1.0-9-amd64"), b"kernel").unwrap();
    let img = dir.path().join("disk.raw");
    partitioned_image(
        &img,
        80,
        "label: dos\nstart=1MiB, size=40MiB, type=83\nstart=41MiB, size=38MiB, type=83\n",
    );
    mkfs_ext4(&img, 1 << 20, 40 << 20, Some(&root), &[]);
    mkfs_ext4(&img, 41 << 20, 38 << 20, Some(&boot), &[]);

    let (o, v) = inspect_json(dir.path(), &img);
    let ins = &v["inspection"];
    assert_eq!(ins["boot"], serde_json::json!([0, 2]));
    assert_eq!(ins["bootloader"], "grub2");
    assert_eq!(ins["kernels"][0]["version"], "6.1.0-9-amd64");
    assert_eq!(ins["kernels"][0]["initramfs"], serde_json::Value::Null);
    assert_eq!(ins["os"]["pretty_name"], "Debian 12");
    // Drivers exist as modules but there is no initramfs and no tool to build one: refused, exit 3.
    assert_eq!(o.status.code(), Some(3));
    assert!(
        ins["blockers"].to_string().contains("initramfs"),
        "{}",
        ins["blockers"]
    );
    assert_no_leftovers(dir.path());
}

#[test]
fn btrfs_root_is_found() {
    if !ready(&["sfdisk", "mkfs.btrfs", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "ID=opensuse-leap\nVERSION_ID=15.5\nPRETTY_NAME=\"openSUSE Leap 15.5\"\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/fstab"), "/dev/vda1 / btrfs defaults 0 0\n").unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        "linux /boot/vmlinuz-6.4 root=/dev/vda1\n",
    )
    .unwrap();
    // The filesystem is built in a separate file and copied in at the partition's offset.
    let fs = dir.path().join("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let st = Command::new("mkfs.btrfs")
        .arg("-q")
        .arg("-f")
        .arg("--rootdir")
        .arg(&root)
        .arg(&fs)
        .status()
        .unwrap();
    assert!(st.success());
    let img = dir.path().join("disk.raw");
    partitioned_image(&img, 202, "label: dos\nstart=1MiB, size=200MiB, type=83\n");
    place_filesystem(&fs, &img, 1);

    let (o, v) = inspect_json(dir.path(), &img);
    let ins = &v["inspection"];
    assert_eq!(ins["root_fs"]["kind"], "btrfs");
    assert_eq!(ins["os"]["id"], "opensuse-leap");
    assert_eq!(ins["bootloader"], "grub2");
    // No kernel: refused with that reason.
    assert_eq!(o.status.code(), Some(3));
    assert!(
        ins["blockers"].to_string().contains("no kernel"),
        "{}",
        ins["blockers"]
    );
    assert_no_leftovers(dir.path());
}

#[test]
fn xfs_root_is_found() {
    if !ready(&["sfdisk", "mkfs.xfs", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let file = |name: &str, text: &str| {
        let p = src.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let os = file(
        "os-release",
        "NAME=\"Rocky Linux\"\nID=\"rocky\"\nVERSION_ID=\"9.3\"\nPRETTY_NAME=\"Rocky Linux 9.3 (Blue Onyx)\"\n",
    );
    let fstab = file(
        "fstab",
        "/dev/sda1 / xfs defaults 0 0\n/dev/sdb1 /data xfs defaults 0 0\n",
    );
    let grub = file(
        "grub.cfg",
        "menuentry 'Rocky' {\n linux /boot/vmlinuz-5.14.0-362.el9.x86_64 root=/dev/sda1 ro\n}\n",
    );
    let kernel = file("vmlinuz", "kernel");
    let dep = file(
        "modules.dep",
        "kernel/drivers/virtio/virtio_pci.ko.xz:\nkernel/drivers/block/virtio_blk.ko.xz:\n",
    );
    let dracut = file("dracut", "#!/bin/sh\n");
    // mkfs.xfs -p: a prototype file describes the tree (no mount needed to populate it).
    let proto = format!(
        "dummy\n0 0\nd--755 0 0\n\
         etc d--755 0 0\n os-release ---644 0 0 {os}\n fstab ---644 0 0 {fstab}\n$\n\
         boot d--755 0 0\n vmlinuz-5.14.0-362.el9.x86_64 ---644 0 0 {kernel}\n\
          grub2 d--755 0 0\n  grub.cfg ---644 0 0 {grub}\n $\n$\n\
         usr d--755 0 0\n lib d--755 0 0\n  modules d--755 0 0\n   5.14.0-362.el9.x86_64 d--755 0 0\n    modules.dep ---644 0 0 {dep}\n   $\n  $\n $\n\
          bin d--755 0 0\n  dracut ---755 0 0 {dracut}\n $\n$\n$\n"
    );
    let proto_path = dir.path().join("proto");
    std::fs::write(&proto_path, proto).unwrap();
    // xfs wants at least 300 MiB.
    let fs = dir.path().join("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let o = Command::new("mkfs.xfs")
        .args(["-q", "-f", "-L", "root", "-p"])
        .arg(&proto_path)
        .arg(&fs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = dir.path().join("disk.raw");
    partitioned_image(
        &img,
        302,
        "label: dos\nstart=1MiB, size=300MiB, type=83, bootable\n",
    );
    place_filesystem(&fs, &img, 1);

    let (o, v) = inspect_json(dir.path(), &img);
    let ins = &v["inspection"];
    assert_eq!(ins["root_fs"]["kind"], "xfs");
    assert_eq!(ins["root_fs"]["label"], "root");
    let uuid = ins["root_fs"]["uuid"].as_str().unwrap().to_string();
    assert_eq!(ins["os"]["id"], "rocky");
    assert_eq!(ins["os"]["pretty_name"], "Rocky Linux 9.3 (Blue Onyx)");
    assert_eq!(ins["grub_cfg"], "/boot/grub2/grub.cfg");
    assert_eq!(ins["initramfs_tool"], "dracut");
    assert_eq!(ins["kernels"][0]["version"], "5.14.0-362.el9.x86_64");
    // The fstab was read: its root line is planned to name the xfs UUID, the missing disk gets nofail.
    let plan = v["planned_changes"].as_array().unwrap();
    let show = serde_json::to_string_pretty(plan).unwrap();
    assert!(
        plan.iter().any(|c| c["file"] == "/etc/fstab"
            && c["old"] == "/dev/sda1 / xfs defaults 0 0"
            && c["new"] == format!("UUID={uuid} / xfs defaults 0 0")),
        "{show}"
    );
    assert!(
        plan.iter()
            .any(|c| c["file"] == "/etc/fstab"
                && c["new"] == "/dev/sdb1 /data xfs defaults,nofail 0 0"),
        "{show}"
    );
    assert!(
        plan.iter()
            .any(|c| c["file"] == "/etc/dracut.conf.d/90-rehost-virtio.conf"),
        "{show}"
    );
    assert!(
        plan.iter()
            .any(|c| c["file"] == "/boot/initramfs-5.14.0-362.el9.x86_64.img"),
        "{show}"
    );
    assert_eq!(o.status.code(), Some(0));
    assert_no_leftovers(dir.path());
}
