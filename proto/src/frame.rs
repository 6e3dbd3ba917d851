//! Length-prefixed framing: a 4-byte big-endian length, then one prost-encoded [`wire::Frame`].
//! A length above [`MAX_FRAME`] (or a caller's smaller cap, see [`read_message_capped`]) is refused
//! before anything is allocated for it, and a body's buffer grows only as its bytes arrive.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::msg::Message;
use crate::{wire, DecodeError, FrameError, MAX_FRAME};

/// Appends one frame (length prefix and body) to `out`.
pub fn encode(msg: Message, out: &mut BytesMut) {
    let frame: wire::Frame = msg.into();
    let len = frame.encoded_len();
    out.reserve(4 + len);
    out.put_u32(len as u32);
    frame.encode(out).expect("reserved capacity");
}

/// Decodes one frame body (without its length prefix) into a checked message.
pub fn decode(body: Bytes) -> Result<Message, DecodeError> {
    if body.len() > MAX_FRAME {
        return Err(DecodeError::Field("frame length"));
    }
    let frame = wire::Frame::decode(body).map_err(|e| DecodeError::Prost(e.to_string()))?;
    Message::try_from(frame)
}

/// Reads one frame of at most [`MAX_FRAME`] bytes. `Ok(None)` is a clean end of stream at a
/// frame boundary.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, FrameError> {
    read_message_capped(r, MAX_FRAME).await
}

/// Memory given to a frame body before its bytes arrive; it grows (doubling, never past the
/// declared length) only as the peer actually sends them.
const FIRST_CHUNK: usize = 16 << 10;

/// Reads one frame whose body may be at most `cap` bytes (itself at most [`MAX_FRAME`]): a longer
/// declared length is refused before anything is allocated for it, and the body's buffer grows
/// with the bytes received, so a peer that declares a large frame and then stalls holds at most
/// [`FIRST_CHUNK`] (or twice what it sent) of the reader's memory. `Ok(None)` is a clean end of
/// stream at a frame boundary.
pub async fn read_message_capped<R: AsyncRead + Unpin>(
    r: &mut R,
    cap: usize,
) -> Result<Option<Message>, FrameError> {
    let mut len = [0u8; 4];
    match r.read(&mut len[..1]).await? {
        0 => return Ok(None),
        _ => r.read_exact(&mut len[1..]).await?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > cap.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    let mut body: Vec<u8> = Vec::with_capacity(len.min(FIRST_CHUNK));
    while body.len() < len {
        if body.len() == body.capacity() {
            body.reserve_exact(body.len().min(len - body.len()));
        }
        let room = (body.capacity() - body.len()).min(len - body.len());
        let n = (&mut *r).take(room as u64).read_buf(&mut body).await?;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Some(decode(Bytes::from(body))?))
}

/// Writes one frame and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: Message,
) -> Result<(), FrameError> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Splits complete frames off the front of `buf` (for callers that read in bulk).
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let _ = buf.split_to(4);
    Ok(Some(decode(buf.split_to(len).freeze())?))
}
