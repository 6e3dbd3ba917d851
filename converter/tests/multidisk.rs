//! Two input disks: a device of the second disk named in fstab (`/dev/xvdb1`) is mapped to its UUID
//! instead of getting `nofail`, and the second disk is copied unchanged to `<output>-disk1`.

mod common;
use common::*;

#[test]
fn second_disk_devices_are_mapped_to_uuids() {
    if !ready(BOOT_TOOLS) {
        return;
    }
    let img = fixture("xen");
    let dir = scratch();
    let data = dir.path().join("data.raw");
    partitioned_image(&data, 64, "label: dos\nstart=1MiB, type=83\n");
    let uuid = "6c0d2c54-1f0b-4b57-9d5e-3b7c1f0e9a11";
    mkfs_ext4(&data, 1 << 20, 62 << 20, None, &["-U", uuid]);
    let data_hash = file_hash(&data);
    let out = dir.path().join("vm.raw");
    let report = dir.path().join("report.json");
    let (o, r) = convert_with_report(dir.path(), &[&img, &data], &out, &report, &[]);
    assert_eq!(o.status.code(), Some(0));
    let fstab: Vec<(String, String)> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "fstab")
        .map(|c| {
            (
                c["old"].as_str().unwrap_or("").to_string(),
                c["new"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        fstab
            .iter()
            .any(|(old, new)| old.starts_with("/dev/xvdb1")
                && new.starts_with(&format!("UUID={uuid}"))),
        "{fstab:#?}"
    );
    assert!(!fstab.iter().any(|(_, new)| new.contains("nofail")));
    let disk1 = dir.path().join("vm-disk1.raw");
    assert_eq!(r["outputs"][1], disk1.to_str().unwrap());
    assert_eq!(
        file_hash(&disk1),
        data_hash,
        "the data disk must be copied unchanged"
    );
    assert_eq!(file_hash(&data), data_hash);
    assert_no_leftovers(dir.path());
}
