//! The listener's part in the relay between domains
//! ([`crate::federation::relay`]): a local client's frame for a room of
//! another domain goes to that domain instead of a shard here, and a
//! client of another domain relayed here is served as a *remote
//! connection*, through the same checks and routing as a local one.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use kalandra_proto::federation::DomainName;
use kalandra_proto::limits::PUBLIC_KEY_BYTES;
use kalandra_proto::sign::parse_identity_key;
use kalandra_proto::{ErrorCode, Frame, RoomId};
use tokio::sync::mpsc;

use super::Listener;
use crate::federation::handshake::{encode_established, LinkMessage};
use crate::federation::relay::{
    deliver_messages, RelayForwardError, RemoteConnectionHost, RemoteConnectionTask, RELAY_RETRY_AFTER_MS,
};
use crate::node::{error_frame, Outbox, OutboxReceiver, Outgoing};
use crate::protocol::session::{Route, Session, Step};
use crate::room::error_frame_with;
use crate::transport::rate_limit::TokenBucket;

impl Listener {
    /// The other domain ordering the room `route` addresses, if it is one.
    /// Key packages are always this server's business.
    /// Reads of a room this server holds a live replica of (or any replica
    /// of, while its authority is unreachable) are served here.
    pub(super) fn relayed_to(&self, route: &Route, frame: &Frame) -> Option<DomainName> {
        let room_id = frame.header().room_id();
        match route {
            Route::KeyPackageUpload { .. } | Route::KeyPackageClaim { .. } => None,
            Route::Subscribe { .. } | Route::Sync { .. } | Route::GroupInfo { .. } => {
                let authority = self.relay_home.authority_of(room_id)?;
                if self.replicas.reads_here(room_id, &authority) {
                    return None;
                }
                self.replicas.follow_if_idle(room_id);
                Some(authority)
            }
            _ => self.relay_home.authority_of(room_id),
        }
    }

    /// Relays the client's `frame` (checked by its session) to `authority`;
    /// the answer comes back over the link. A link that is down or busy is
    /// answered at once with a retryable `DomainUnreachable`.
    pub(super) async fn relay(
        &self,
        outbox: &Arc<Outbox>,
        session: &Session,
        frame: Frame,
        authority: &DomainName,
    ) {
        let Some(identity_key) = session.identity_key() else { return };
        let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
        if matches!(frame.opcode(), kalandra_proto::Opcode::Subscribe | kalandra_proto::Opcode::Sync) {
            self.node.room_read_remotely(outbox, room_id);
        }
        let (code, message) = match self.relay_home.forward(outbox, identity_key, frame, authority) {
            Ok(()) => return,
            Err(error @ RelayForwardError::Unreachable(_)) => {
                (ErrorCode::DomainUnreachable, error.to_string())
            }
            Err(error @ RelayForwardError::TooLarge { .. }) => {
                (ErrorCode::PayloadTooLarge, error.to_string())
            }
        };
        self.metrics.rejected(code);
        let retry_after_ms = (code == ErrorCode::DomainUnreachable).then_some(RELAY_RETRY_AFTER_MS);
        let error = error_frame_with(room_id, request_id, code, &message, None, None, retry_after_ms);
        let _ = outbox.send(error).await;
    }

    /// Opens the remote connection `id` of the user with `identity_key`
    /// (certified by its home, the link's peer), whose client is
    /// `connection` at its home. Returns its queue and the task serving it:
    /// frames from `frames` are handled in order as a local connection's,
    /// and what the queue gathers is delivered over `outgoing`.
    fn open_relayed(
        listener: &Arc<Listener>,
        id: u64,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        mut frames: mpsc::Receiver<Frame>,
        outgoing: mpsc::Sender<Vec<u8>>,
        connection: u64,
    ) -> Option<(Arc<Outbox>, impl Future<Output = ()> + Send + 'static)> {
        let identity = parse_identity_key(&identity_key).ok()?;
        let mut session = Session::relayed(identity, listener.server_key);
        let sender = session.sender()?;
        let limits = &listener.limits;
        let (outbox, receiver) =
            Outbox::new(id, sender, limits.send_queue_frames_max, limits.send_queue_bytes_max);
        let mut bucket = TokenBucket::new(
            f64::from(limits.frames_per_second_per_connection),
            f64::from(limits.frames_burst_per_connection),
        );
        let (listener, served) = (Arc::clone(listener), Arc::clone(&outbox));
        let task = async move {
            let handle = async {
                while let Some(frame) = frames.recv().await {
                    if !listener.handle_relayed(&served, &mut session, &mut bucket, frame).await {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = pump(receiver, outgoing.clone(), connection) => {}
                _ = handle => {}
            }
            served.close();
            listener.node.connection_closed(&served).await;
            if let Ok(bytes) = encode_established(&LinkMessage::RelayDropped { connection }) {
                // The home may be gone already, or have closed the client itself.
                let _ = outgoing.try_send(bytes);
            }
        };
        Some((outbox, task))
    }

    /// One frame of a remote connection; `false` when the connection must end.
    async fn handle_relayed(
        &self,
        outbox: &Arc<Outbox>,
        session: &mut Session,
        bucket: &mut TokenBucket,
        frame: Frame,
    ) -> bool {
        let now_ms = (self.clock)();
        self.metrics.frame_in(frame.opcode());
        let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
        if let Err(retry_after_ms) = self.admit(outbox.sender(), bucket, &frame, now_ms) {
            self.metrics.rejected(ErrorCode::RateLimited);
            let message = "rate limit exceeded";
            let error = error_frame_with(
                room_id,
                request_id,
                ErrorCode::RateLimited,
                message,
                None,
                None,
                Some(retry_after_ms),
            );
            let _ = outbox.send(error).await;
            return true;
        }
        match session.on_frame(frame, now_ms) {
            Step::Ignore | Step::Authenticated { .. } => true,
            Step::Reply(reply) => outbox.send(reply).await,
            Step::Route(
                _,
                Route::KeyPackageUpload { request_id, .. } | Route::KeyPackageClaim { request_id, .. },
            ) => {
                self.metrics.rejected(ErrorCode::Forbidden);
                let message = "key packages are the home domain's; relay only room traffic";
                outbox.send(error_frame(RoomId::default(), request_id, ErrorCode::Forbidden, message)).await
            }
            Step::Route(_, route) => {
                self.route(outbox, route).await;
                true
            }
            Step::Close(error) => {
                let _ = outbox.send(error).await;
                false
            }
            Step::Goodbye => false,
        }
    }
}

/// The listener serves remote connections (through an `Arc` of itself,
/// which their tasks hold).
pub struct ListenerHost(pub Arc<Listener>);

impl RemoteConnectionHost for ListenerHost {
    fn open_remote(
        &self,
        id: u64,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        frames: mpsc::Receiver<Frame>,
        outgoing: mpsc::Sender<Vec<u8>>,
        connection: u64,
    ) -> Option<(Arc<Outbox>, RemoteConnectionTask)> {
        let (outbox, task) = Listener::open_relayed(&self.0, id, identity_key, frames, outgoing, connection)?;
        Some((outbox, Box::pin(task)))
    }
}

/// Delivers what a remote connection's queue gathers over the link, until
/// the queue closes or the link is gone.
async fn pump(mut receiver: OutboxReceiver, outgoing: mpsc::Sender<Vec<u8>>, connection: u64) {
    let mut batch = VecDeque::new();
    loop {
        let next = receiver.next_batch(&mut batch).await;
        for message in deliver_messages(connection, batch.drain(..)) {
            if outgoing.send(message).await.is_err() {
                return;
            }
        }
        if next == Outgoing::Close {
            return;
        }
    }
}
