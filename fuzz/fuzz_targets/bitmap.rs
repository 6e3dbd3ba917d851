//! The agent's saved dirty bitmap (`cleanstop::decode`). The input is decoded as it is, and again
//! with its last 32 bytes replaced by the blake3 of the rest, so that the fuzzer gets past the
//! checksum and reaches the header and geometry checks. A bitmap that decodes is re-encoded to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rehost_agent::cleanstop::{decode, encode};

fn check(b: &[u8]) {
    if let Ok(saved) = decode(b) {
        assert_eq!(encode(&saved), b, "decode → encode changed the file");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 32 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 32;
        let sum = blake3::hash(&fixed[..body]);
        fixed[body..].copy_from_slice(sum.as_bytes());
        check(&fixed);
    }
});
