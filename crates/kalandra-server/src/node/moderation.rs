//! The moderation writer: one task that writes every moderation change
//! with its audit record, in the order the shards decided them, and
//! answers the act that waits for it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::NodeHealth;
use crate::room::{ModerationDone, ModerationFailure, ModerationWrite, MODERATION_WRITES_QUEUED_MAX};
use crate::store::Store;

/// The reply channel of a moderation act.
pub type ModerationReply = oneshot::Sender<Result<ModerationDone, ModerationFailure>>;

/// One write and who waits for it.
pub(super) struct WriterItem {
    write: ModerationWrite,
    reply: Option<ModerationReply>,
}

/// Starts the writer task.
pub(super) fn start_writer(
    store: Arc<dyn Store>,
    health: Arc<NodeHealth>,
) -> (mpsc::Sender<WriterItem>, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<WriterItem>(MODERATION_WRITES_QUEUED_MAX);
    let task = tokio::spawn(async move {
        while let Some(WriterItem { write, reply }) = receiver.recv().await {
            let store = Arc::clone(&store);
            let ModerationWrite { change, event, completion } = write;
            let result = tokio::task::spawn_blocking(move || store.record_moderation(&change, &event))
                .await
                .map_err(|error| error.to_string())
                .and_then(|result| result.map_err(|error| error.to_string()));
            if let Err(error) = &result {
                tracing::error!(%error, "storage failed writing a moderation act; the node stops and recovers on restart");
                health.failed.store(true, Ordering::Release);
            }
            if let (Some(reply), Some(completion)) = (reply, completion) {
                let _ = reply.send(completion.outcome(result));
            }
        }
    });
    (sender, task)
}

/// A shard's side of the writer: the acts it decides wait here, each with
/// its reserved slot in the writer's queue, until their write comes out
/// of the shard.
pub(super) struct ModerationDesk {
    writer: mpsc::Sender<WriterItem>,
    waiting: HashMap<u64, (ModerationReply, mpsc::OwnedPermit<WriterItem>)>,
    next_token: u64,
}

impl ModerationDesk {
    pub(super) fn new(writer: mpsc::Sender<WriterItem>) -> ModerationDesk {
        ModerationDesk { writer, waiting: HashMap::new(), next_token: 0 }
    }

    /// Reserves the act's writer slot; `None` (answered `Busy`) if the
    /// writer's queue is full.
    pub(super) fn admit(&mut self, reply: ModerationReply) -> Option<u64> {
        let Ok(slot) = self.writer.clone().try_reserve_owned() else {
            tracing::warn!("moderation writer queue full");
            let _ = reply.send(Err(ModerationFailure::Busy));
            return None;
        };
        self.next_token += 1;
        self.waiting.insert(self.next_token, (reply, slot));
        Some(self.next_token)
    }

    /// A write the shard decided.
    pub(super) fn write(&mut self, write: ModerationWrite) {
        match write.completion.and_then(|completion| self.waiting.remove(&completion.token)) {
            Some((reply, slot)) => {
                slot.send(WriterItem { write, reply: Some(reply) });
            }
            None => {
                if self.writer.try_send(WriterItem { write, reply: None }).is_err() {
                    tracing::warn!("moderation writer queue full; an unattended write is dropped");
                }
            }
        }
    }

    /// The shard refused the act.
    pub(super) fn refused(&mut self, token: u64, failure: ModerationFailure) {
        if let Some((reply, _slot)) = self.waiting.remove(&token) {
            let _ = reply.send(Err(failure));
        }
    }
}
