//! The outbound side of one connection: a bounded queue shared by the room
//! shards (fan-out, replies) and the connection's writer task.
//!
//! The writer takes everything queued in one step and writes it to the QUIC
//! stream in one call, so a burst of deliveries to one connection costs one
//! wake-up and one stream write, not one per frame. The queue is bounded in
//! frames and in bytes, and part of it is kept for replies: live fan-out
//! and history may fill at most [`Outbox::bulk_frames_max`] frames and
//! [`Outbox::bulk_bytes_max`] bytes, so a reader that falls behind on the
//! room's traffic is dropped from fan-out (and told to resync) while the
//! answers to its own requests still fit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::room::ConnectionId;
use kalandra_proto::SenderId;

/// Every bound of an outbox, in one place.
pub mod limits {
    /// Control notices (resync, close) queued for one connection.
    pub const NOTICES_PER_CONNECTION_MAX: usize = 64;
    /// Bytes of notices queued for one connection (a reply that finds the
    /// queue full waits as a notice, and a GroupInfo reply can be a whole
    /// frame); beyond it the connection is closed.
    pub const NOTICE_BYTES_PER_CONNECTION_MAX: usize = 2 * FRAME_BYTES_MAX;
    /// Default byte bound of one connection's queue (`outbox_bytes_max`,
    /// the `send_queue_bytes_max` setting).
    pub const OUTBOX_BYTES_MAX_DEFAULT: usize = 32 * 1024 * 1024;
    /// Smallest byte bound of a connection's queue: fan-out's share of it
    /// holds the largest frame, so any frame fits an empty queue's share.
    pub const OUTBOX_BYTES_MAX_MIN: usize = 2 * FRAME_BYTES_MAX;
    /// Largest byte bound of a connection's queue.
    pub const OUTBOX_BYTES_MAX_LIMIT: usize = 1024 * 1024 * 1024;
    /// The share of a connection's queue kept for replies (acknowledgements
    /// and errors answering its own requests): one part in this many. Live
    /// fan-out and history stop at the rest, so a member that lags behind
    /// the room's traffic still gets its acknowledgements.
    pub const REPLY_RESERVE_DIVISOR: usize = 4;
    /// Frames a batch buffer keeps room for once written; a larger one is
    /// released. The writer and the queue trade their buffers at each
    /// batch, so a connection that has gone idle keeps at most two buffers
    /// of this many frames (512 bytes each), and one that never received
    /// anything keeps none.
    pub const WRITER_BATCH_RETAINED_FRAMES_MAX: usize = 16;

    const _: () = assert!(REPLY_RESERVE_DIVISOR >= 2, "fan-out keeps at least half of the queue");
    const _: () = assert!(
        OUTBOX_BYTES_MAX_MIN - OUTBOX_BYTES_MAX_MIN / REPLY_RESERVE_DIVISOR >= FRAME_BYTES_MAX,
        "the fan-out share of the smallest queue holds the largest frame"
    );
    const _: () =
        assert!(NOTICE_BYTES_PER_CONNECTION_MAX >= FRAME_BYTES_MAX, "a whole reply fits as a notice");
    const _: () = assert!(OUTBOX_BYTES_MAX_MIN <= OUTBOX_BYTES_MAX_DEFAULT);
    const _: () = assert!(OUTBOX_BYTES_MAX_DEFAULT <= OUTBOX_BYTES_MAX_LIMIT);
    use kalandra_proto::limits::FRAME_BYTES_MAX;
}

use limits::*;

/// The outbound side of one connection, shared by shards and the writer task.
///
/// Frames go through a bounded queue; a reader that falls behind is dropped
/// from live fan-out and told to resync (a notice), never buffered without
/// bound.
pub struct Outbox {
    connection: ConnectionId,
    sender: SenderId,
    frames_max: usize,
    bulk_frames_max: usize,
    bytes_max: usize,
    bulk_bytes_max: usize,
    queue: Mutex<Queue>,
    /// Wakes the writer: something was queued, or the outbox is closing.
    wake: Notify,
    /// Wakes tasks waiting for room in the queue.
    room: Notify,
    closing: AtomicBool,
    /// Pending Welcomes were handed to this connection: the first time the
    /// recipient reads a room, its Welcomes for that room are deleted.
    welcomes_delivered: AtomicBool,
    /// One-shot history readers running for this connection.
    sync_readers: std::sync::Arc<AtomicUsize>,
    /// A peer domain's feed for its replicas ([`crate::room::Peer::reads_everything`]).
    replica_feed: bool,
}

/// The queued frames and notices of one connection.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    bytes: usize,
    notices: VecDeque<Bytes>,
    /// Bytes in `notices`.
    notice_bytes: usize,
    /// The writer is gone: nothing queued will be written.
    writer_gone: bool,
}

/// The receiving half of an [`Outbox`], owned by the connection's writer.
pub struct OutboxReceiver {
    outbox: std::sync::Arc<Outbox>,
}

/// What the writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// Write the frames now in the batch, in order.
    Frames,
    /// Write the frames now in the batch (what was left), then close the connection.
    Close,
}

impl Outbox {
    /// A new outbox for `connection` (authenticated as `sender`) holding at
    /// most `frames_max` frames and `bytes_max` bytes (raised to
    /// [`OUTBOX_BYTES_MAX_MIN`]), of which at most
    /// [`Outbox::bulk_frames_max`] and [`Outbox::bulk_bytes_max`] are
    /// fan-out or history.
    pub fn new(
        connection: ConnectionId,
        sender: SenderId,
        frames_max: usize,
        bytes_max: usize,
    ) -> (std::sync::Arc<Outbox>, OutboxReceiver) {
        Outbox::build(connection, sender, frames_max, bytes_max, false)
    }

    fn build(
        connection: ConnectionId,
        sender: SenderId,
        frames_max: usize,
        bytes_max: usize,
        replica_feed: bool,
    ) -> (std::sync::Arc<Outbox>, OutboxReceiver) {
        let frames_max = frames_max.max(1);
        let bulk_frames_max = (frames_max - frames_max / REPLY_RESERVE_DIVISOR).max(1);
        let bytes_max = bytes_max.max(OUTBOX_BYTES_MAX_MIN);
        let outbox = std::sync::Arc::new(Outbox {
            connection,
            sender,
            frames_max,
            bulk_frames_max,
            bytes_max,
            bulk_bytes_max: bytes_max - bytes_max / REPLY_RESERVE_DIVISOR,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            room: Notify::new(),
            closing: AtomicBool::new(false),
            welcomes_delivered: AtomicBool::new(false),
            sync_readers: std::sync::Arc::new(AtomicUsize::new(0)),
            replica_feed,
        });
        (std::sync::Arc::clone(&outbox), OutboxReceiver { outbox })
    }

    /// The outbox of a peer domain's feed for its replicas: it reads whole
    /// rooms, as `sender` (the server's own id, never a member).
    pub fn replica_feed(
        connection: ConnectionId,
        sender: SenderId,
        frames_max: usize,
        bytes_max: usize,
    ) -> (std::sync::Arc<Outbox>, OutboxReceiver) {
        Outbox::build(connection, sender, frames_max, bytes_max, true)
    }
    /// The connection's id.
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }
    /// The authenticated identity.
    pub fn sender(&self) -> SenderId {
        self.sender
    }
    /// Frames of fan-out and history the queue holds at most.
    pub fn bulk_frames_max(&self) -> usize {
        self.bulk_frames_max
    }
    /// Bytes of fan-out and history the queue holds at most.
    pub fn bulk_bytes_max(&self) -> usize {
        self.bulk_bytes_max
    }
    /// Fan-out or history frames the queue can take right now.
    pub fn free_capacity(&self) -> usize {
        let queue = self.lock();
        if queue.writer_gone {
            return 0;
        }
        self.bulk_frames_max.saturating_sub(queue.frames.len())
    }
    /// Bytes of fan-out or history the queue can take right now.
    pub fn free_bytes(&self) -> usize {
        let queue = self.lock();
        if queue.writer_gone {
            return 0;
        }
        self.bulk_bytes_max.saturating_sub(queue.bytes)
    }
    /// Queues a fan-out or history frame if there is room; `false` if the
    /// reader is too far behind (or gone).
    pub fn try_send(&self, frame: Bytes) -> bool {
        self.push(frame, self.bulk_frames_max, self.bulk_bytes_max)
    }
    /// Queues a reply to one of the connection's own requests if there is
    /// room, using the part of the queue kept for replies; `false` if even
    /// that is full (or the writer is gone).
    pub fn try_reply(&self, frame: Bytes) -> bool {
        self.push(frame, self.frames_max, self.bytes_max)
    }
    /// Queues a frame, waiting for room among the fan-out and history
    /// frames (history reads apply backpressure this way); `false` if the
    /// writer is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        let mut frame = Some(frame);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut queue = self.lock();
                if queue.writer_gone {
                    return false;
                }
                if let Some(frame) =
                    frame.take_if(|frame| queue.fits(frame, self.bulk_frames_max, self.bulk_bytes_max))
                {
                    let was_empty = queue.frames.is_empty();
                    queue.bytes += frame.len();
                    queue.frames.push_back(frame);
                    drop(queue);
                    if was_empty {
                        self.wake.notify_one();
                    }
                    return true;
                }
            }
            room.await;
        }
    }
    /// Queues a control notice, written once the frames queued before it
    /// are (or at once if the connection is closing). If too many are queued
    /// the connection is closed instead.
    pub fn notice(&self, frame: Bytes) {
        let mut queue = self.lock();
        if queue.notices.len() >= NOTICES_PER_CONNECTION_MAX
            || queue.notice_bytes.saturating_add(frame.len()) > NOTICE_BYTES_PER_CONNECTION_MAX
        {
            self.closing.store(true, Ordering::Release);
        } else {
            queue.notice_bytes += frame.len();
            queue.notices.push_back(frame);
        }
        drop(queue);
        self.wake.notify_one();
    }
    /// Asks the writer to close the connection after the queued notices.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }
    /// Pending Welcomes were handed to this connection.
    pub fn mark_welcomes_delivered(&self) {
        self.welcomes_delivered.store(true, Ordering::Release);
    }
    /// Whether pending Welcomes were handed to this connection: when the
    /// recipient reads a room, its Welcomes for the room can go.
    pub fn welcomes_delivered(&self) -> bool {
        self.welcomes_delivered.load(Ordering::Acquire)
    }
    /// Whether the connection is being closed.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn push(&self, frame: Bytes, frames_max: usize, bytes_max: usize) -> bool {
        let mut queue = self.lock();
        if queue.writer_gone || !queue.fits(&frame, frames_max, bytes_max) {
            return false;
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        drop(queue);
        // The writer takes the whole queue at once: it needs waking only
        // when the queue stops being empty.
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("outbox lock")
    }
}

impl Queue {
    /// Whether `frame` fits within `frames_max` frames and `bytes_max`
    /// bytes; an empty queue takes any frame (the bounds' relations make
    /// the largest frame fit anyway).
    fn fits(&self, frame: &Bytes, frames_max: usize, bytes_max: usize) -> bool {
        self.frames.is_empty()
            || (self.frames.len() < frames_max && self.bytes.saturating_add(frame.len()) <= bytes_max)
    }
}

impl OutboxReceiver {
    /// Waits for something to write and moves it into `batch` (which must
    /// be empty): every queued frame, then every queued notice, so a notice
    /// (such as a resync request naming the first index not delivered)
    /// follows the frames it refers to. [`Outgoing::Close`] once the outbox
    /// is closing: the batch then holds the last frames to write.
    pub async fn next_batch(&mut self, batch: &mut VecDeque<Bytes>) -> Outgoing {
        debug_assert!(batch.is_empty(), "the previous batch was written");
        loop {
            let wake = self.outbox.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let closing = self.outbox.is_closing();
            {
                let mut queue = self.outbox.lock();
                if !queue.frames.is_empty() {
                    // Swap, not copy: the batch's (empty) buffer becomes the queue's.
                    std::mem::swap(batch, &mut queue.frames);
                    queue.bytes = 0;
                }
                batch.extend(queue.notices.drain(..));
                queue.notice_bytes = 0;
            }
            if !batch.is_empty() {
                self.outbox.room.notify_waiters();
            }
            if closing {
                return Outgoing::Close;
            }
            if !batch.is_empty() {
                return Outgoing::Frames;
            }
            wake.await;
        }
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut queue = self.outbox.lock();
        queue.writer_gone = true;
        queue.frames = VecDeque::new();
        queue.bytes = 0;
        queue.notices = VecDeque::new();
        queue.notice_bytes = 0;
        drop(queue);
        self.outbox.room.notify_waiters();
    }
}

/// Releases a written batch's buffer if it grew beyond
/// [`WRITER_BATCH_RETAINED_FRAMES_MAX`] frames, so an idle connection keeps
/// no large buffer (a burst costs a few allocations, not one per frame).
pub fn recycle_batch(batch: &mut VecDeque<Bytes>) {
    batch.clear();
    if batch.capacity() > WRITER_BATCH_RETAINED_FRAMES_MAX {
        *batch = VecDeque::new();
    }
}

/// The room core writes to a connection through its outbox.
impl crate::room::Peer for std::sync::Arc<Outbox> {
    fn connection(&self) -> ConnectionId {
        Outbox::connection(self)
    }
    fn sender(&self) -> SenderId {
        Outbox::sender(self)
    }
    fn try_send(&self, frame: Bytes) -> bool {
        Outbox::try_send(self, frame)
    }
    fn try_reply(&self, frame: Bytes) -> bool {
        Outbox::try_reply(self, frame)
    }
    fn notice(&self, frame: Bytes) {
        Outbox::notice(self, frame)
    }
    fn free_capacity(&self) -> usize {
        Outbox::free_capacity(self)
    }
    fn free_bytes(&self) -> usize {
        Outbox::free_bytes(self)
    }
    fn sync_readers(&self) -> &std::sync::Arc<AtomicUsize> {
        &self.sync_readers
    }
    fn reads_everything(&self) -> bool {
        self.replica_feed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(byte: u8) -> Bytes {
        Bytes::from(vec![byte; 4])
    }

    #[tokio::test]
    async fn writer_takes_every_queued_frame_then_the_notices_in_one_batch() {
        let (outbox, mut receiver) = Outbox::new(1, SenderId(7), 8, OUTBOX_BYTES_MAX_MIN);
        assert!(outbox.try_send(frame(1)));
        outbox.notice(frame(9));
        assert!(outbox.try_send(frame(2)));
        assert!(outbox.try_reply(frame(3)));
        let mut batch = VecDeque::new();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Frames);
        let bytes: Vec<u8> = batch.iter().map(|frame| frame[0]).collect();
        assert_eq!(bytes, vec![1, 2, 3, 9]);
        recycle_batch(&mut batch);
        outbox.close();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Close);
    }

    #[tokio::test]
    async fn fan_out_leaves_room_for_replies() {
        let (outbox, mut receiver) = Outbox::new(1, SenderId(7), 8, OUTBOX_BYTES_MAX_MIN);
        assert_eq!(outbox.bulk_frames_max(), 6);
        for byte in 0..6 {
            assert!(outbox.try_send(frame(byte)), "fan-out frame {byte} fits");
        }
        assert_eq!(outbox.free_capacity(), 0);
        assert!(!outbox.try_send(frame(6)), "fan-out stops at its share");
        assert!(outbox.try_reply(frame(7)));
        assert!(outbox.try_reply(frame(8)));
        assert!(!outbox.try_reply(frame(9)), "the whole queue is bounded");
        let mut batch = VecDeque::new();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Frames);
        assert_eq!(batch.len(), 8);
        assert_eq!(outbox.free_capacity(), 6);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_too() {
        let (outbox, mut receiver) = Outbox::new(1, SenderId(7), 10_000, OUTBOX_BYTES_MAX_MIN);
        let bulk = outbox.bulk_bytes_max();
        assert_eq!(bulk, OUTBOX_BYTES_MAX_MIN - OUTBOX_BYTES_MAX_MIN / REPLY_RESERVE_DIVISOR);
        let chunk = bulk / 4;
        for byte in 0..4 {
            assert!(outbox.try_send(Bytes::from(vec![byte; chunk])), "fan-out chunk {byte} fits");
        }
        assert_eq!(outbox.free_bytes(), bulk - 4 * chunk);
        assert!(!outbox.try_send(Bytes::from(vec![9; chunk])), "fan-out stops at its share of the bytes");
        assert!(outbox.free_capacity() > 7_000, "though far from the frame bound");
        assert!(
            outbox.try_reply(Bytes::from(vec![8; OUTBOX_BYTES_MAX_MIN - 4 * chunk])),
            "replies use the rest"
        );
        assert!(!outbox.try_reply(frame(1)), "the whole queue is bounded");
        // Notices are bounded in bytes: beyond it the connection closes.
        outbox.notice(Bytes::from(vec![0; NOTICE_BYTES_PER_CONNECTION_MAX]));
        assert!(!outbox.is_closing());
        outbox.notice(frame(2));
        assert!(outbox.is_closing());
        let mut batch = VecDeque::new();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Close);
        assert_eq!(batch.len(), 6);
        // An empty queue takes the largest frame.
        let (outbox, _receiver) = Outbox::new(2, SenderId(7), 1, OUTBOX_BYTES_MAX_MIN);
        assert!(outbox.try_send(Bytes::from(vec![0; kalandra_proto::limits::FRAME_BYTES_MAX])));
    }

    #[tokio::test]
    async fn send_waits_for_room_and_fails_once_the_writer_is_gone() {
        let (outbox, mut receiver) = Outbox::new(1, SenderId(7), 1, OUTBOX_BYTES_MAX_MIN);
        assert!(outbox.send(frame(1)).await);
        let waiting = {
            let outbox = std::sync::Arc::clone(&outbox);
            tokio::spawn(async move { outbox.send(frame(2)).await })
        };
        let mut batch = VecDeque::new();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Frames);
        assert_eq!(batch.len(), 1);
        assert!(waiting.await.expect("sender task"), "room was made");
        drop(receiver);
        assert!(!outbox.send(frame(3)).await);
        assert!(!outbox.try_reply(frame(4)));
    }

    #[tokio::test]
    async fn too_many_notices_close_the_connection_after_writing_what_is_queued() {
        let (outbox, mut receiver) = Outbox::new(1, SenderId(7), 4, OUTBOX_BYTES_MAX_MIN);
        for _ in 0..=NOTICES_PER_CONNECTION_MAX {
            outbox.notice(frame(0));
        }
        assert!(outbox.is_closing());
        let mut batch = VecDeque::new();
        assert_eq!(receiver.next_batch(&mut batch).await, Outgoing::Close);
        assert_eq!(batch.len(), NOTICES_PER_CONNECTION_MAX, "written before closing");
    }
}
