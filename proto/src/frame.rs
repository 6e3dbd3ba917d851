//! Length-prefixed framing: a 4-byte big-endian length, then one prost-encoded [`wire::Frame`].
//! A length above [`MAX_FRAME`] is refused before anything is allocated for it.

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

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, FrameError> {
    let mut len = [0u8; 4];
    match r.read(&mut len[..1]).await? {
        0 => return Ok(None),
        _ => r.read_exact(&mut len[1..]).await?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).await?;
    Ok(Some(decode(body.freeze())?))
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
