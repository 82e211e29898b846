//! NRI's connection multiplexer: one unix stream carries two ttrpc
//! connections, each frame an 8-byte header (connection id, payload
//! length; both u32 big-endian) and the payload. Connection 1 carries the
//! plugin's service (the runtime calls the plugin), connection 2 the
//! runtime's (the plugin calls the runtime). Both ends use this code: the
//! plugin, and the test's runtime.
//!
//! [`split`] turns the stream into two in-memory byte streams that ttrpc
//! reads and writes as if each were its own socket. Outgoing bytes are cut
//! at ttrpc message boundaries and each message goes out as two frames,
//! its 10-byte header, then its payload: the runtime's reader hands out one
//! frame per read and reads a message's first bytes into a 4096-byte
//! buffer, so a frame must never hold two messages, nor a first frame
//! more than 4096 bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The connection of the plugin's service (the runtime is the client).
pub const PLUGIN_CONN: u32 = 1;
/// The connection of the runtime's service (the plugin is the client).
pub const RUNTIME_CONN: u32 = 2;
/// ttrpc's message header: length (u32), stream id (u32), type, flags.
const TTRPC_HEADER: usize = 10;
/// ttrpc's largest message payload.
const TTRPC_MAX: usize = 4 << 20;
/// In-memory buffer of each logical connection.
const PIPE: usize = 64 << 10;

/// The two logical connections of one multiplexed stream.
pub struct Conns {
    /// Connection 1: the plugin's service.
    pub plugin: DuplexStream,
    /// Connection 2: the runtime's service.
    pub runtime: DuplexStream,
    /// Ends with the stream (EOF or error); the logical connections see
    /// EOF then.
    pub done: JoinHandle<io::Result<()>>,
}

/// Splits `stream` into its two logical connections.
pub fn split<S>(stream: S) -> Conns
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (plugin, plugin_inner) = tokio::io::duplex(PIPE);
    let (runtime, runtime_inner) = tokio::io::duplex(PIPE);
    let (plugin_rd, mut plugin_wr) = tokio::io::split(plugin_inner);
    let (runtime_rd, mut runtime_wr) = tokio::io::split(runtime_inner);
    let (frames, mut outgoing) = mpsc::channel::<(u32, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((id, payload)) = outgoing.recv().await {
            let mut frame = Vec::with_capacity(8 + payload.len());
            frame.extend_from_slice(&id.to_be_bytes());
            frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frame.extend_from_slice(&payload);
            wr.write_all(&frame).await?;
        }
        wr.shutdown().await
    });
    let senders = [
        tokio::spawn(send_messages(PLUGIN_CONN, plugin_rd, frames.clone())),
        tokio::spawn(send_messages(RUNTIME_CONN, runtime_rd, frames)),
    ];
    // Aborting `done` (or its end) stops the other tasks too, so the
    // stream closes: the peer sees the connection go.
    let tasks = AbortOnDrop(vec![
        writer.abort_handle(),
        senders[0].abort_handle(),
        senders[1].abort_handle(),
    ]);
    let done = tokio::spawn(async move {
        let _tasks = tasks;
        let read = async {
            let mut header = [0u8; 8];
            loop {
                match rd.read_exact(&mut header).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                let id = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
                let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
                if len > TTRPC_HEADER + TTRPC_MAX {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("NRI frame of {len} bytes on connection {id}"),
                    ));
                }
                let mut payload = vec![0u8; len];
                rd.read_exact(&mut payload).await?;
                // A connection nobody opened: dropped, as the runtime does.
                match id {
                    PLUGIN_CONN => plugin_wr.write_all(&payload).await?,
                    RUNTIME_CONN => runtime_wr.write_all(&payload).await?,
                    _ => {}
                }
            }
        };
        let result = read.await;
        // The logical connections end with the stream.
        let _ = plugin_wr.shutdown().await;
        let _ = runtime_wr.shutdown().await;
        result
    });
    Conns {
        plugin,
        runtime,
        done,
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Cuts what ttrpc writes on connection `id` into messages, each sent as
/// two frames (header, payload).
async fn send_messages<R: AsyncRead + Unpin>(
    id: u32,
    mut from: R,
    frames: mpsc::Sender<(u32, Vec<u8>)>,
) -> io::Result<()> {
    let mut header = [0u8; TTRPC_HEADER];
    loop {
        match from.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > TTRPC_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ttrpc message of {len} bytes on connection {id}"),
            ));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the NRI stream is closed");
        frames
            .send((id, header.to_vec()))
            .await
            .map_err(|_| gone())?;
        if !payload.is_empty() {
            frames.send((id, payload)).await.map_err(|_| gone())?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ttrpc-shaped message: header with `len`, then `len` bytes.
    fn message(stream: u32, body: &[u8]) -> Vec<u8> {
        let mut m = (body.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&stream.to_be_bytes());
        m.extend_from_slice(&[1, 0]);
        m.extend_from_slice(body);
        m
    }

    /// Reads one frame from the raw side.
    async fn frame<R: AsyncRead + Unpin>(r: &mut R) -> (u32, Vec<u8>) {
        let mut h = [0u8; 8];
        r.read_exact(&mut h).await.unwrap();
        let id = u32::from_be_bytes(h[..4].try_into().unwrap());
        let len = u32::from_be_bytes(h[4..].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        r.read_exact(&mut p).await.unwrap();
        (id, p)
    }

    #[tokio::test]
    async fn frames_are_routed_by_connection_and_messages_cut_header_then_payload() {
        let (ours, mut raw) = tokio::io::duplex(1 << 20);
        let mut conns = split(ours);
        // Two messages written at once on connection 2: four frames, never
        // two messages in one, the first of each 10 bytes.
        let big = vec![7u8; 9000];
        let mut both = message(1, b"hello");
        both.extend(message(3, &big));
        conns.runtime.write_all(&both).await.unwrap();
        assert_eq!(
            frame(&mut raw).await,
            (2, message(1, b"hello")[..10].to_vec())
        );
        let (id, p) = frame(&mut raw).await;
        assert_eq!((id, p.as_slice()), (2, b"hello".as_slice()));
        let (id, h) = frame(&mut raw).await;
        assert_eq!((id, h.len()), (2, 10));
        let (id, p) = frame(&mut raw).await;
        assert_eq!((id, p), (2, big));

        // Incoming frames reach their connection as one byte stream, a
        // message split over two frames included; unknown ids are dropped.
        let m = message(5, b"to the plugin");
        for (id, part) in [(1u32, &m[..4]), (9, &b"noise"[..]), (1, &m[4..])] {
            let mut f = id.to_be_bytes().to_vec();
            f.extend_from_slice(&(part.len() as u32).to_be_bytes());
            f.extend_from_slice(part);
            raw.write_all(&f).await.unwrap();
        }
        let mut got = vec![0u8; m.len()];
        conns.plugin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, m);

        // The stream's end ends both connections.
        drop(raw);
        conns.done.await.unwrap().unwrap();
        let mut rest = Vec::new();
        conns.plugin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
