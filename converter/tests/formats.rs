//! Input formats: the bootable Debian fixture converted to qcow2 (as `rehost-server snapshot
//! export --format qcow2` writes it) is inspected and converted like the raw image, through a
//! temporary raw copy that is gone afterwards; VMDK and VHDX inputs are refused by name before
//! anything is written. The steps are announced on stderr.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn qemu_img_convert(from: &Path, format: &str, to: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", format])
        .arg(from)
        .arg(to)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img convert -O {format}");
}

/// Files in `dir` (not recursive), sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn qcow2_input_is_inspected_and_converted_like_raw() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let raw = fixture("xen");
    let dir = scratch();
    let qcow = dir.path().join("fx.qcow2");
    qemu_img_convert(&raw, "qcow2", &qcow);
    let before = file_hash(&qcow);

    let (o, from_raw) = inspect_json(dir.path(), &raw);
    assert_eq!(o.status.code(), Some(0));
    let (o, from_qcow) = inspect_json(dir.path(), &qcow);
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("converting the qcow2 input") && err.contains("inspecting partitions"),
        "{err}"
    );
    let d = &from_qcow["inspection"]["disks"][0];
    assert_eq!(d["path"], qcow.to_str().unwrap());
    assert_eq!(d["format"], "qcow2");
    assert_eq!(from_raw["inspection"]["disks"][0]["format"], "raw");
    for k in ["os", "root", "root_fs", "kernels", "bootloader", "blockers"] {
        assert_eq!(
            from_qcow["inspection"][k], from_raw["inspection"][k],
            "inspection field {k}"
        );
    }
    assert_eq!(from_qcow["planned_changes"], from_raw["planned_changes"]);
    // The human summary names the qcow2 input.
    let o = run_in(dir.path(), &["inspect", qcow.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("qcow2 input"));

    let out = dir.path().join("out.raw");
    let report = dir.path().join("report.json");
    let (o, r) = convert_with_report(dir.path(), &[&qcow], &out, &report, &[]);
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    for step in [
        "converting the qcow2 input",
        "inspecting partitions",
        "copying",
        "regenerating initramfs with update-initramfs",
    ] {
        assert!(err.contains(step), "no step {step:?} on stderr:\n{err}");
    }
    assert_eq!(r["inputs"][0], qcow.to_str().unwrap());
    // The same changes as planned on the raw image.
    let kinds = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| (c["kind"].to_string(), c["file"].to_string()))
            .collect()
    };
    assert_eq!(kinds(&r["changes"]), kinds(&from_raw["planned_changes"]));
    // The result is a raw image that inspects as converted (nothing left to change in fstab).
    let (o, again) = inspect_json(dir.path(), &out);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        !again["planned_changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "fstab"),
        "{}",
        again["planned_changes"]
    );

    assert_eq!(file_hash(&qcow), before, "the qcow2 input was modified");
    // No temporary raw copy left, next to the output or in the work directory.
    assert_eq!(
        files_in(dir.path()),
        ["fx.qcow2", "out.raw", "report.json", "work"]
    );
    assert!(files_in(&dir.path().join("work")).is_empty());
    assert_no_leftovers(dir.path());
}

#[test]
fn other_formats_are_refused_by_name() {
    if !ready(&["sfdisk", "qemu-img"]) {
        return;
    }
    let dir = scratch();
    let raw = dir.path().join("small.raw");
    partitioned_image(&raw, 16, "label: dos\nstart=1MiB, type=83\n");
    for (format, name) in [("vmdk", "VMDK"), ("vhdx", "VHDX"), ("vpc", "VHD")] {
        let img = dir.path().join(format!("small.{format}"));
        qemu_img_convert(&raw, format, &img);
        let want = format!(
            "input {} is a {name} image; convert it to raw or qcow2 first",
            img.display()
        );
        let o = run_in(dir.path(), &["inspect", img.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "inspect {format}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&want), "{err}");
        assert_convert_refused(dir.path(), &img, 2, &want);
        let o = run_in(dir.path(), &["boot-check", img.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "boot-check {format}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(&want));
    }
    // A compressed image: told to decompress it.
    let gz = dir.path().join("small.raw.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", raw.display(), gz.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let o = run_in(dir.path(), &["inspect", gz.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("is a gzip-compressed file; decompress it first"));
    assert_no_leftovers(dir.path());
}
