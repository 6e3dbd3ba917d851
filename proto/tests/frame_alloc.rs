//! The frame reader allocates with the bytes that arrive, not with the length a peer declares: a
//! peer that announces the largest frame and then stalls makes the reader hold little memory.
//! (Its own test binary: it counts every allocation of the process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rehost_proto::frame::read_message_capped;
use rehost_proto::MAX_FRAME;
use tokio::io::AsyncWriteExt;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_stalled_large_frame_holds_little_memory() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(4 << 20);
        // Declares the largest frame, sends 1,000 bytes of it, then stalls (keeps the pipe open).
        client
            .write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&[0u8; 1000]).await.unwrap();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            read_message_capped(&mut server, MAX_FRAME),
        )
        .await;
        assert!(r.is_err(), "the read must still wait for the body");
        let grew = PEAK.load(Ordering::Relaxed) - before;
        assert!(
            grew < 64 << 10,
            "reading 1,000 bytes of a declared {MAX_FRAME}-byte frame allocated {grew} bytes"
        );

        // Sent in full, the same frame is read (and refused as a bad message, not for its size).
        client
            .write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        let mut w = client;
        let feed = tokio::spawn(async move {
            w.write_all(&vec![0u8; MAX_FRAME]).await.unwrap();
            w
        });
        let r = read_message_capped(&mut server, MAX_FRAME).await;
        assert!(
            matches!(r, Err(rehost_proto::FrameError::Decode(_))),
            "{r:?}"
        );
        drop(feed.await.unwrap());
    });
}
