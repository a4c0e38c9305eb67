//! Push notifications for members who are not connected.
//!
//! A sender may attach a push payload to an `Application` frame (sealed with
//! the room's push key, see client-core's `push` module; the server cannot
//! read it). When the frame is durable, the room core offers one
//! [`PushNotification`] per member without an authenticated connection to a
//! bounded [`PushQueue`], whose worker hands them to a [`PushSink`]. A full
//! queue drops the notification (and counts it): pushes are best effort, the
//! message itself is in the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kalandra_proto::{RoomId, SenderId};
use tokio::sync::mpsc;

/// Notifications waiting for the sink.
pub const PUSH_QUEUE_NOTIFICATIONS_MAX: usize = 16_384;
/// Notifications a [`MemoryPushSink`] keeps.
pub const MEMORY_SINK_NOTIFICATIONS_MAX: usize = 65_536;

/// One push for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushNotification {
    /// Who it is for.
    pub recipient: SenderId,
    /// The room of the message.
    pub room_id: RoomId,
    /// The message's log index (the app fetches it with a sync from there).
    pub log_index: u64,
    /// The sealed push payload, forwarded as the sender made it.
    pub payload: Bytes,
}

/// Why a sink could not deliver a notification.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The sink refused or failed.
    #[error("push sink: {0}")]
    Sink(String),
}

/// Where notifications go (an APNs/FCM gateway, a webhook, a test buffer).
pub trait PushSink: Send + Sync + 'static {
    /// Delivers one notification.
    fn deliver(
        &self,
        notification: PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + '_>>;
}

/// A sink that keeps what it is given, for tests and local development.
#[derive(Debug, Default)]
pub struct MemoryPushSink {
    delivered: Mutex<Vec<PushNotification>>,
}

impl MemoryPushSink {
    /// Everything delivered so far, taken out of the sink.
    pub fn take(&self) -> Vec<PushNotification> {
        std::mem::take(&mut *self.delivered.lock().expect("sink lock"))
    }
}

impl PushSink for MemoryPushSink {
    fn deliver(
        &self,
        notification: PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + '_>> {
        let mut delivered = self.delivered.lock().expect("sink lock");
        let result = if delivered.len() < MEMORY_SINK_NOTIFICATIONS_MAX {
            delivered.push(notification);
            Ok(())
        } else {
            Err(PushError::Sink("memory sink is full".into()))
        };
        Box::pin(async move { result })
    }
}

/// The bounded queue in front of a sink, drained by one worker task.
#[derive(Clone)]
pub struct PushQueue {
    sender: mpsc::Sender<PushNotification>,
}

impl PushQueue {
    /// Starts the worker that hands queued notifications to `sink`.
    pub fn start(sink: Arc<dyn PushSink>) -> PushQueue {
        let (sender, mut receiver) = mpsc::channel::<PushNotification>(PUSH_QUEUE_NOTIFICATIONS_MAX);
        tokio::spawn(async move {
            while let Some(notification) = receiver.recv().await {
                let recipient = notification.recipient;
                if let Err(error) = sink.deliver(notification).await {
                    tracing::warn!(recipient = recipient.0, %error, "push not delivered");
                }
            }
        });
        PushQueue { sender }
    }

    /// Queues a notification; `false` if the queue is full (it is dropped).
    pub fn offer(&self, notification: PushNotification) -> bool {
        self.sender.try_send(notification).is_ok()
    }
}
