//! The transport shell: Kalandra frames over turmoil's simulated TCP, with
//! the production codec ([`FrameDecoder`], [`Frame::encode_into`]).
//!
//! Packet loss on a reliable stream shows up as retransmission delay and
//! head-of-line blocking, so a lossy link is modelled on the sending side:
//! each frame is lost with the link's loss probability and sent again after
//! a retransmission timeout that doubles on every loss (capped), drawn from
//! a seeded generator. Partitions are turmoil's own: segments are dropped,
//! the stream stalls, and the peers' keep-alive timeouts end the connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kalandra_proto::{Frame, FrameDecoder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use turmoil::net::TcpStream;

/// The port the simulated server listens on.
pub const SERVER_PORT: u16 = 7000;
/// First retransmission timeout of a lost frame.
pub const RETRANSMIT_TIMEOUT_MS: u64 = 40;
/// Retransmission timeouts stop doubling here.
pub const RETRANSMIT_TIMEOUT_MAX_MS: u64 = 640;
/// Frames queued for one connection's writer before the connection is
/// dropped as too slow.
pub const OUTGOING_FRAMES_MAX: usize = 4096;
/// Bytes read from the socket at once.
const READ_CHUNK_BYTES: usize = 16 * 1024;

const _: () = assert!(RETRANSMIT_TIMEOUT_MS <= RETRANSMIT_TIMEOUT_MAX_MS);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed or closed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not frames.
    #[error("undecodable stream: {0}")]
    Decode(#[from] kalandra_proto::DecodeError),
    /// The peer closed the stream.
    #[error("closed by peer")]
    Closed,
}

/// Reads whole frames from a stream.
pub struct FrameReader {
    half: OwnedReadHalf,
    decoder: FrameDecoder,
    buffer: BytesMut,
}

impl FrameReader {
    /// Reads from `half`.
    pub fn new(half: OwnedReadHalf) -> FrameReader {
        FrameReader { half, decoder: FrameDecoder::new(), buffer: BytesMut::new() }
    }

    /// The next frame.
    pub async fn next(&mut self) -> Result<Frame, LinkError> {
        loop {
            if !self.buffer.is_empty() {
                let mut input: &[u8] = &self.buffer;
                let before = input.len();
                let decoded = self.decoder.decode(&mut input)?;
                let consumed = before - input.len();
                let _ = self.buffer.split_to(consumed);
                if let Some(frame) = decoded {
                    return Ok(frame);
                }
            }
            let mut chunk = vec![0u8; READ_CHUNK_BYTES];
            let read = self.half.read(&mut chunk).await?;
            if read == 0 {
                return Err(LinkError::Closed);
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Loss model of one direction of a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loss {
    /// Probability that one transmission of a frame is lost.
    pub rate: f64,
}

/// Spawns the writer of a connection: frames sent to the returned queue are
/// written in order, each after the retransmissions its losses cost.
/// Dropping every sender closes the stream.
pub fn spawn_writer(
    mut half: OwnedWriteHalf,
    loss: std::rc::Rc<std::cell::Cell<Loss>>,
    seed: u64,
) -> mpsc::Sender<Bytes> {
    let (sender, mut receiver) = mpsc::channel::<Bytes>(OUTGOING_FRAMES_MAX);
    tokio::task::spawn_local(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        while let Some(bytes) = receiver.recv().await {
            let mut timeout_ms = RETRANSMIT_TIMEOUT_MS;
            let rate = loss.get().rate.clamp(0.0, 0.95);
            while rng.gen_bool(rate) {
                tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
                timeout_ms = (timeout_ms * 2).min(RETRANSMIT_TIMEOUT_MAX_MS);
            }
            if half.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = half.shutdown().await;
    });
    sender
}

/// Connects to the server.
pub async fn connect() -> std::io::Result<TcpStream> {
    TcpStream::connect(("server", SERVER_PORT)).await
}
