//! Property tests for the frame reader with a caller-chosen cap (`read_message_capped`): frames
//! within the cap round-trip however the bytes are split, longer ones are refused from their
//! length alone, and the largest legitimate `Hello` fits the pre-login cap.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use proptest::prelude::*;
use rehost_proto::frame::{decode, encode, read_message_capped};
use rehost_proto::msg::{Auth, DiskInfo, Hello};
use rehost_proto::{FrameError, Message, MAX_FRAME, MAX_HELLO_FRAME};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` in the given chunk sizes (cycling), like a network that splits frames.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let step = self.sizes[self.turn % self.sizes.len()].max(1);
        self.turn += 1;
        let n = step.min(self.data.len() - self.pos).min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn hello(disks: usize, device_len: usize) -> Message {
    Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "v".repeat(64),
        detach: Some("r".repeat(rehost_proto::msg::MAX_DETACH_REASON)),
        auth: Auth::Register {
            token_id: [0xff; 8],
            token_secret: [0xff; 24],
            hostname: "h".repeat(255),
            source_id: [0xff; 32],
        },
        disks: (0..disks)
            .map(|i| DiskInfo {
                device: format!("{i:0>width$}", width = device_len),
                size_bytes: u64::MAX,
            })
            .collect(),
    })
}

fn encoded(m: Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(m, &mut b);
    b.to_vec()
}

fn block_of(len: usize) -> Message {
    use rehost_proto::msg::{Block, Compression};
    Message::Block(Block {
        seq: 1,
        disk_id: rehost_proto::DiskId(1),
        offset: 0,
        length: len as u32,
        hash: [3; 32],
        compression: Compression::None,
        payload: bytes::Bytes::from(vec![5u8; len]),
    })
}

fn read(data: Vec<u8>, sizes: Vec<usize>, cap: usize) -> Result<Option<Message>, FrameError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut r = Chunked {
        data,
        pos: 0,
        sizes,
        turn: 0,
    };
    rt.block_on(read_message_capped(&mut r, cap))
}

proptest! {
    #[test]
    fn frames_within_the_cap_round_trip_however_split(
        len in 1usize..200_000,
        sizes in proptest::collection::vec(1usize..70_000, 1..8),
    ) {
        let msg = block_of(len);
        let bytes = encoded(msg.clone());
        let body = bytes.len() - 4;
        let back = read(bytes, sizes, body).unwrap();
        prop_assert_eq!(back, Some(msg));
    }

    #[test]
    fn frames_over_the_cap_are_refused_from_their_length(
        len in 1usize..200_000,
        short in 1usize..1000,
    ) {
        let bytes = encoded(block_of(len));
        let body = bytes.len() - 4;
        // Only the length prefix is there: the refusal cannot depend on reading the body.
        let err = read(bytes[..4].to_vec(), vec![4], body.saturating_sub(short)).unwrap_err();
        prop_assert!(matches!(err, FrameError::TooLarge(n) if n == body));
    }

    #[test]
    fn a_body_cut_short_is_an_error_not_a_frame(
        len in 1usize..100_000,
        cut in 1usize..1000,
        sizes in proptest::collection::vec(1usize..70_000, 1..4),
    ) {
        let bytes = encoded(block_of(len));
        let keep = bytes.len().saturating_sub(cut).max(5);
        let err = read(bytes[..keep].to_vec(), sizes, MAX_FRAME).unwrap_err();
        prop_assert!(matches!(err, FrameError::Io(ref e) if e.kind() == std::io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_capped_reader(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        cap in 0usize..8192,
    ) {
        let _ = read(data, vec![7, 1, 300], cap);
    }
}

#[test]
fn the_cap_never_exceeds_max_frame() {
    let mut b = Vec::new();
    b.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
    assert!(matches!(
        read(b, vec![4], usize::MAX),
        Err(FrameError::TooLarge(_))
    ));
}

#[test]
fn hello_cap_fits_the_largest_legitimate_hello() {
    // 256 disks is the most a Hello may list; 230-byte device paths are far longer than any
    // /dev/disk/by-id name.
    let largest = encoded(hello(256, 230));
    assert!(
        largest.len() - 4 <= MAX_HELLO_FRAME,
        "{} bytes",
        largest.len() - 4
    );
    assert!(read(largest.clone(), vec![1500], MAX_HELLO_FRAME)
        .unwrap()
        .is_some());
    // One disk more is not a valid Hello at all.
    assert!(decode(bytes::Bytes::from(encoded(hello(257, 10))[4..].to_vec())).is_err());
}
