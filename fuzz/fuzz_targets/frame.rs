//! The frame decoder and message checks: the input is a byte stream as read from a connection.
//! Every complete frame is split off (`split_frame`) and decoded (`Message::try_from(wire::Frame)`);
//! a message that decodes must survive encode → split → decode unchanged. The whole input is also
//! decoded as one frame body (`decode`).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rehost_proto::frame::{decode, encode, split_frame};
use rehost_proto::Message;

fn round_trip(m: &Message) {
    let mut buf = BytesMut::new();
    encode(m.clone(), &mut buf);
    let again = split_frame(&mut buf)
        .expect("an encoded message splits")
        .expect("an encoded message is complete");
    assert_eq!(&again, m, "encode → decode changed the message");
    assert!(buf.is_empty(), "encode wrote bytes past its frame");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(Bytes::copy_from_slice(data)) {
        round_trip(&m);
    }
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match split_frame(&mut buf) {
            Ok(Some(m)) => {
                assert!(
                    buf.len() < before,
                    "a frame was split without consuming input"
                );
                round_trip(&m);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed input");
                break;
            }
            Err(_) => break,
        }
    }
});
