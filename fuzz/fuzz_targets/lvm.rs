//! LVM metadata text: the configuration parser and the volume group built from it, then the
//! placement of every logical volume (which must lie inside its PV's extents when it is found).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_converter::lvm::{parse_config, VolumeGroup};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_config(&text);
    if let Ok(vg) = VolumeGroup::from_text(&text) {
        for lv in &vg.lvs {
            if let Ok(p) = vg.placement(lv) {
                let end = p
                    .offset
                    .checked_add(p.len)
                    .expect("placement end overflows");
                let pv_end =
                    p.pv.pe_count
                        .checked_mul(vg.extent_size)
                        .and_then(|e| e.checked_add(p.pv.pe_start))
                        .and_then(|e| e.checked_mul(512));
                if let Some(pv_end) = pv_end {
                    assert!(end <= pv_end, "placement {p:?} past the PV's extents");
                }
            }
        }
    }
});
