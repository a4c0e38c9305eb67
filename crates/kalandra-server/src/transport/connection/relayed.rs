//! The listener's part in the relay between domains
//! ([`crate::federation::relay`]): a local client's frame for a room of
//! another domain goes to that domain instead of a shard here, and a
//! client of another domain relayed here is served as a *remote
//! connection*, through the same checks and routing as a local one.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use kalandra_proto::federation::DomainName;
use kalandra_proto::limits::PUBLIC_KEY_BYTES;
use kalandra_proto::sign::parse_identity_key;
use kalandra_proto::{ErrorCode, Frame, RoomId};
use tokio::sync::mpsc;

use super::Listener;
use crate::federation::handshake::{encode_established, LinkMessage, RecipientHomes};
use crate::federation::recipient_homes::{
    named_recipient_homes, recipient_homes_of, users_unknown_here, welcome_recipients_of, AnsweredHomes,
    PendingHomes,
};
use crate::federation::relay::{
    deliver_messages, NamedHomesOf, RelayForwardError, RelayedFrame, RemoteConnectionHost,
    RemoteConnectionTask, RELAY_RETRY_AFTER_MS,
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
    /// A read is served here only if the replica is durable through every
    /// frame the authority acknowledged to this client connection (read
    /// your own writes: a client that syncs after its commit's `Ack` finds
    /// the commit).
    pub(super) async fn relayed_to(
        &self,
        route: &Route,
        frame: &Frame,
        connection: u64,
    ) -> Option<DomainName> {
        let room_id = frame.header().room_id();
        match route {
            Route::KeyPackageUpload { .. } | Route::KeyPackageClaim { .. } => None,
            Route::Subscribe { .. } | Route::Sync { .. } | Route::GroupInfo { .. } => {
                let authority = self.relay_home.authority_of(room_id)?;
                if self.replicas.reads_here(room_id, &authority)
                    && self.replica_has_acknowledged(connection, room_id).await
                {
                    return None;
                }
                self.replicas.follow_if_idle(room_id);
                Some(authority)
            }
            _ => self.relay_home.authority_of(room_id),
        }
    }

    /// Whether the replica of `room_id` is durable through the frames its
    /// authority acknowledged to the client of `connection`.
    async fn replica_has_acknowledged(&self, connection: u64, room_id: RoomId) -> bool {
        let acknowledged_next = self.relay_home.acknowledged_next(connection, room_id);
        if acknowledged_next == 0 {
            return true;
        }
        self.node
            .replica_position(room_id)
            .await
            .is_some_and(|(_, durable_next)| durable_next >= acknowledged_next)
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
        let recipient_homes = self.recipient_homes(&frame, authority).await;
        let forwarded = self.relay_home.forward(outbox, identity_key, frame, authority, recipient_homes);
        let (code, message) = match forwarded {
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

    /// The homes this server knows of the recipients of `frame`'s Welcome,
    /// when it is a commit with one, for its relay to `authority`.
    async fn recipient_homes(&self, frame: &Frame, authority: &DomainName) -> Vec<RecipientHomes> {
        let Some(recipients) = welcome_recipients_of(frame) else { return Vec::new() };
        let (store, own, authority) =
            (Arc::clone(&self.store), self.remote_directory.domain.clone(), authority.clone());
        let homes = tokio::task::spawn_blocking(move || {
            recipient_homes_of(store.as_ref(), &own, &authority, &recipients)
        })
        .await;
        match homes {
            Ok(Ok(homes)) => homes,
            Ok(Err(error)) => {
                tracing::warn!(%error, "recipient homes not read; the commit is relayed without them");
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, "reading recipient homes failed");
                Vec::new()
            }
        }
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
        mut frames: mpsc::Receiver<RelayedFrame>,
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
        let pending = Mutex::new(PendingHomes::default());
        let task = async move {
            let handle = async {
                while let Some(RelayedFrame { frame, named }) = frames.recv().await {
                    if let Some(named) = named {
                        listener.hold_recipient_homes(&pending, &frame, named);
                    }
                    if !listener.handle_relayed(&served, &mut session, &mut bucket, frame).await {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = pump(receiver, outgoing.clone(), connection, &listener, &pending) => {}
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

impl Listener {
    /// Holds in `pending`, until the commit is answered, the recipient homes
    /// the relay named for `frame` that concern it.
    fn hold_recipient_homes(&self, pending: &Mutex<PendingHomes>, frame: &Frame, named: NamedHomesOf) {
        let Some(recipients) = welcome_recipients_of(frame) else { return };
        let directory = &self.remote_directory;
        let pairs = named_recipient_homes(
            &named.homes,
            &recipients,
            &directory.domain,
            &directory.peers.current(),
            &directory.refused,
        );
        if !pairs.is_empty() {
            let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
            lock(pending).hold(room_id, request_id, named.by, pairs);
        }
    }

    /// Keeps the recipient homes of the commits `batch` acknowledges, for
    /// users unknown here (read on a blocking thread), and hands them to
    /// the Welcome router.
    fn note_answered_homes(&self, pending: &Mutex<PendingHomes>, batch: &VecDeque<bytes::Bytes>) {
        let mut answered = Vec::new();
        {
            let mut pending = lock(pending);
            if pending.is_empty() {
                return;
            }
            for bytes in batch {
                answered.extend(Frame::decode(bytes).ok().and_then(|frame| pending.answered(&frame)));
            }
        }
        for commit in answered {
            let (store, named_homes) = (Arc::clone(&self.store), Arc::clone(&self.named_homes));
            let routing = self.welcome_routing.clone();
            tokio::spawn(async move {
                let AnsweredHomes { room_id, named_by, pairs } = commit;
                let unknown = tokio::task::spawn_blocking(move || users_unknown_here(store.as_ref(), pairs));
                match unknown.await {
                    Ok(Ok(pairs)) => {
                        let users = named_homes.name(&named_by, room_id, &pairs);
                        if let (false, Some(routing)) = (users.is_empty(), routing) {
                            // A full queue leaves them to the router's retry.
                            let _ = routing.try_send(users);
                        }
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "recipient homes not read; their Welcomes stay here")
                    }
                    Err(error) => tracing::warn!(%error, "reading recipient homes failed"),
                }
            });
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The listener serves remote connections (through an `Arc` of itself,
/// which their tasks hold).
pub struct ListenerHost(pub Arc<Listener>);

impl RemoteConnectionHost for ListenerHost {
    fn open_remote(
        &self,
        id: u64,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        frames: mpsc::Receiver<RelayedFrame>,
        outgoing: mpsc::Sender<Vec<u8>>,
        connection: u64,
    ) -> Option<(Arc<Outbox>, RemoteConnectionTask)> {
        let (outbox, task) = Listener::open_relayed(&self.0, id, identity_key, frames, outgoing, connection)?;
        Some((outbox, Box::pin(task)))
    }
}

/// Delivers what a remote connection's queue gathers over the link, until
/// the queue closes or the link is gone; notes the recipient homes of a
/// commit `pending` holds once the commit is acknowledged.
async fn pump(
    mut receiver: OutboxReceiver,
    outgoing: mpsc::Sender<Vec<u8>>,
    connection: u64,
    listener: &Listener,
    pending: &Mutex<PendingHomes>,
) {
    let mut batch = VecDeque::new();
    loop {
        let next = receiver.next_batch(&mut batch).await;
        listener.note_answered_homes(pending, &batch);
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
