//! History readers: stored frames of one room streamed to one connection
//! with backpressure, for a one-shot `Sync` or to catch a live subscriber
//! up before the shard hands it over to fan-out.

use std::future::Future;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use kalandra_proto::{payload, ErrorCode, RoomId};

use crate::room::limits::HISTORY_READ_FRAMES_MAX;
use crate::room::{error_frame, reply_frame, HistoryRead, Peer};
use crate::store::{EntryContent, StoredEntry};
use crate::transport::outbox::Outbox;

/// What history sends for a stored entry: its frame, or for an erased
/// entry a typed placeholder at its index.
pub fn history_bytes(room_id: RoomId, entry: StoredEntry) -> Bytes {
    match entry.content {
        EntryContent::Frame(frame) => frame,
        EntryContent::Erased(erasure) => crate::room::erased_placeholder(room_id, entry.log_index, &erasure),
    }
}

/// Sends the range `read` asks for into `outbox` (the outbox of
/// `read.peer`), reading it page by page with
/// `read_range(from, count)`. For a one-shot range it ends with `SyncDone`
/// and returns `None`; for a live subscription it returns the first index
/// not sent, for [`crate::room::Shard::handle_caught_up`]. `None` too when
/// the subscription was cancelled, the connection went away, or a read
/// failed (the connection is told).
pub async fn send_history<P, F, Fut>(read: &HistoryRead<P>, outbox: &Outbox, mut read_range: F) -> Option<u64>
where
    P: Peer,
    F: FnMut(u64, usize) -> Fut,
    Fut: Future<Output = Result<Vec<StoredEntry>, String>>,
{
    let mut next = read.from;
    while next < read.through {
        let count = usize::try_from(read.through - next).unwrap_or(usize::MAX).min(HISTORY_READ_FRAMES_MAX);
        let entries = match read_range(next, count).await {
            Ok(entries) if !entries.is_empty() => entries,
            _ => {
                let message = "history read failed";
                let error =
                    error_frame(read.room_id, read.request_id, ErrorCode::StorageUnavailable, message);
                read.peer.notice(error);
                return None;
            }
        };
        for entry in entries {
            assert_eq!(entry.log_index, next, "history is dense");
            let bytes = history_bytes(read.room_id, entry);
            if read.cancelled.load(Ordering::Acquire) || !outbox.send(bytes).await {
                return None;
            }
            next += 1;
            if next >= read.through {
                break;
            }
        }
    }
    if read.subscription != 0 {
        return Some(next);
    }
    // The signed head is the durable end's: only a read that got there carries it.
    let log_head = read.end_head.filter(|head| head.log_index.checked_add(1) == Some(next));
    let done = reply_frame(
        read.room_id,
        read.request_id,
        &payload::SyncDone { next_log_index: next, live: false, log_head },
    );
    let _ = outbox.send(done).await;
    None
}
