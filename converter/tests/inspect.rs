//! Inspection of small synthetic images (built with sfdisk + mkfs.ext4 -d, nothing mounted by the test):
//! a separate /boot partition named in fstab is found and mounted under the guest root.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn mkfs(img: &Path, tree: &Path, offset_mib: u64, size_mib: u64) {
    let st = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            &format!("offset={}", offset_mib << 20),
            "-d",
        ])
        .arg(tree)
        .arg(img)
        .arg(format!("{size_mib}M"))
        .status()
        .unwrap();
    assert!(st.success());
}

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
    std::fs::File::create(&img)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(
            b"label: dos\nstart=1MiB, size=40MiB, type=83\nstart=41MiB, size=38MiB, type=83\n",
        )
        .unwrap();
    assert!(sf.wait().unwrap().success());
    mkfs(&img, &root, 1, 40);
    mkfs(&img, &boot, 41, 38);

    let o = run_in(dir.path(), &["inspect", "--json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
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
    assert!(leftovers(dir.path()).is_empty());
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
    std::fs::File::create(&img)
        .unwrap()
        .set_len(202 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=1MiB, size=200MiB, type=83\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let st = Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", img.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
        .status()
        .unwrap();
    assert!(st.success());

    let o = run_in(dir.path(), &["inspect", "--json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
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
    assert!(leftovers(dir.path()).is_empty());
}
