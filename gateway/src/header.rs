//! Length-prefixed protobuf frames that open a tunnel stream: a 2-byte
//! big-endian length, then the encoded `TunnelRequest` or
//! `TunnelResponse` (at most [`MAX_HEADER_BYTES`]).

use isthmus_proto::tunnel::v1::MAX_HEADER_BYTES;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("stream ended before a complete header")]
    Closed,
    #[error("header of {0} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("header is not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream error: {0}")]
    Io(std::io::Error),
}

/// Writes one frame in a single write.
///
/// # Cancel safety
/// Not cancel safe (a partial frame may have been written).
pub async fn write_frame<W: AsyncWrite + Unpin, M: Message>(
    w: &mut W,
    msg: &M,
) -> std::io::Result<()> {
    let len = msg.encoded_len();
    debug_assert!(len <= MAX_HEADER_BYTES);
    let mut buf = Vec::with_capacity(2 + len);
    buf.extend_from_slice(&(len as u16).to_be_bytes());
    msg.encode(&mut buf).expect("Vec has capacity");
    w.write_all(&buf).await
}

/// Reads one frame.
///
/// # Cancel safety
/// Not cancel safe; callers bound it with a timeout and drop the stream.
pub async fn read_frame<R: AsyncRead + Unpin, M: Message + Default>(
    r: &mut R,
) -> Result<M, HeaderError> {
    let mut len = [0u8; 2];
    read_exact(r, &mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER_BYTES {
        return Err(HeaderError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    read_exact(r, &mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), HeaderError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HeaderError::Closed),
        Err(e) => Err(HeaderError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::tunnel::v1::TunnelRequest;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let req = TunnelRequest {
            service: "a.b.svc.cluster.local".into(),
            port: 80,
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).await.unwrap();
        let back: TunnelRequest = read_frame(&mut &buf[..]).await.unwrap();
        assert_eq!(back, req);
        assert!(matches!(
            read_frame::<_, TunnelRequest>(&mut &buf[..3]).await,
            Err(HeaderError::Closed)
        ));
        let big = [0xff, 0xff];
        assert!(matches!(
            read_frame::<_, TunnelRequest>(&mut &big[..]).await,
            Err(HeaderError::TooLarge(65535))
        ));
        let garbage = [0x00, 0x03, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, TunnelRequest>(&mut &garbage[..]).await,
            Err(HeaderError::Decode(_))
        ));
    }
}
