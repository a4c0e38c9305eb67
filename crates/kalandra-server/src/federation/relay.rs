//! The relay of a client's room traffic between its home domain and the
//! domain that orders the room (its authority), over their link.
//!
//! Home side ([`RelayHome`]): a frame of a local client for a room
//! recorded in [`RemoteRooms`] is countersigned with the home's federation
//! key (with the client's home certificate, `wire-protocol.md` §10) and
//! sent as [`LinkMessage::Relay`], tagged with the client's connection id.
//! What the authority sends back for that connection
//! ([`LinkMessage::Deliver`]: acknowledgements, errors, fan-out, history)
//! goes to the client's queue, and only frames of rooms that authority
//! orders.
//!
//! Authority side ([`RelayAuthority`]): each envelope is verified
//! ([`RelayEnvelope::verify_with`]: origin, destination, countersignature,
//! home certificate (once per certificate, [`VerifiedCertificates`]),
//! sender, client signature; up to [`RELAY_CHECKS_IN_FLIGHT_MAX`] of a
//! link's envelopes at once, on the runtime's threads), then, in the
//! link's order, its relay sequence is checked and it is handed to a
//! *remote connection*: an [`Outbox`] and a session
//! authenticated as the certified user, one per (home domain, client
//! connection), which the room core serves exactly as a local connection
//! (membership, roles, bans, rate limits). Its queue is pumped back over
//! the link. A remote connection ends when its client leaves, the link goes
//! down, or its queue closes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{
    DomainName, HomeCertificate, RelayEnvelope, RelayError, VerifiedCertificates,
};
use kalandra_proto::limits::PUBLIC_KEY_BYTES;
use kalandra_proto::payload::Ack;
use kalandra_proto::{ErrorCode, Flags, Frame, Opcode, RoomId};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::admin::metrics::Metrics;
use crate::federation::directory::HOME_CERTIFICATE_VALIDITY_MS;
use crate::federation::handshake::{encode_established, LinkMessage, RecipientHomes, RefusedDomains};
use crate::federation::peers::SharedPeers;
use crate::federation::registry::LinkRegistry;
use crate::federation::requests::{LinkRequestError, LINK_ESTABLISHED_MESSAGE_BYTES_MAX};
use crate::federation::rooms::RemoteRooms;
use crate::node::{error_frame, Clock, Outbox};
use crate::room::error_frame_with;
use crate::store::Store;

/// Remote connections one peer domain may have open at this authority.
pub const RELAYED_CONNECTIONS_PER_PEER_MAX: usize = 10_000;
/// Relayed frames of one remote connection waiting to be handled; more
/// are refused `RateLimited`.
pub const RELAYED_INBOX_FRAMES_MAX: usize = 64;
/// Bytes of frames one `Deliver` message gathers (one larger frame goes alone).
pub const DELIVER_BYTES_TARGET: usize = 256 * 1024;
/// Relay sequence numbers per ms of the clock: a home starts each run at
/// the clock's ms times this, so numbers keep rising across restarts.
pub const RELAY_SEQUENCE_PER_MS: u64 = 1 << 20;
/// A home certificate is issued again when it has less than this left.
pub const HOME_CERTIFICATE_RENEW_BEFORE_MS: u64 = 60 * 60 * 1000;
/// Wait suggested to a client whose frame could not be relayed now.
pub const RELAY_RETRY_AFTER_MS: u64 = 1_000;
/// Rooms per relayed client whose acknowledged index the home keeps, so
/// that the client's reads there reach its own frames; past it, a room's
/// reads are served by the replica as it stands.
pub const RELAYED_CLIENT_ACKED_ROOMS_MAX: usize = 1_024;

const _: () = assert!(DELIVER_BYTES_TARGET < LINK_ESTABLISHED_MESSAGE_BYTES_MAX);
const _: () = assert!(HOME_CERTIFICATE_RENEW_BEFORE_MS < HOME_CERTIFICATE_VALIDITY_MS / 2);
const _: () = assert!(u64::MAX / RELAY_SEQUENCE_PER_MS > 4_102_444_800_000, "sequences last past 2100");

/// The counter label of a refused envelope.
pub fn relay_error_code(error: &RelayError) -> &'static str {
    match error {
        RelayError::OriginMismatch { .. } => "origin_mismatch",
        RelayError::WrongDestination { .. } => "wrong_destination",
        RelayError::Replayed { .. } => "replayed",
        RelayError::MalformedFrame(_) => "malformed_frame",
        RelayError::NotCountersigned => "not_countersigned",
        RelayError::BadCountersignature { .. } => "bad_countersignature",
        RelayError::ForeignUser { .. } => "foreign_user",
        RelayError::HomeCertificate(_) => "bad_home_certificate",
        RelayError::SenderMismatch { .. } => "sender_mismatch",
        RelayError::ClientSignature(_) => "client_signature",
    }
}

/// The error code a client's frame is refused with for `error`.
fn relay_error_to_client(error: &RelayError) -> ErrorCode {
    match error {
        RelayError::SenderMismatch { .. } => ErrorCode::SenderMismatch,
        RelayError::ClientSignature(_) => ErrorCode::BadSignature,
        _ => ErrorCode::FederationRefused,
    }
}

/// Why a client's frame was not relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayForwardError {
    /// No link with the authority is up, or its queue is full (retryable).
    #[error("the room's domain {0}")]
    Unreachable(LinkRequestError),
    /// The frame with its envelope would not fit in a link message (caller misuse).
    #[error("relayed frame of {len_bytes} bytes does not fit a link message")]
    TooLarge {
        /// The encoded message's length.
        len_bytes: usize,
    },
}

/// A local client with frames relayed to other domains.
struct RelayedClient {
    outbox: Arc<Outbox>,
    certificate: HomeCertificate,
    authorities: BTreeSet<DomainName>,
    /// Per room, one past the highest index an authority acknowledged to
    /// the client: its reads must reach it (at most
    /// [`RELAYED_CLIENT_ACKED_ROOMS_MAX`] rooms).
    acked_next: HashMap<RoomId, u64>,
}

/// The home side: relays local clients' frames to the rooms' authorities
/// and hands back what they send.
pub struct RelayHome {
    domain: DomainName,
    key: SigningKey,
    registry: Arc<LinkRegistry>,
    rooms: Arc<RemoteRooms>,
    clock: Clock,
    metrics: Metrics,
    /// The last relay sequence number used (held while a message is queued,
    /// so numbers reach each link in order).
    sequence: Mutex<u64>,
    clients: Mutex<HashMap<u64, RelayedClient>>,
}

impl RelayHome {
    /// The home side of `domain`, countersigning with `key`.
    pub fn new(
        domain: DomainName,
        key: SigningKey,
        registry: Arc<LinkRegistry>,
        rooms: Arc<RemoteRooms>,
        clock: Clock,
        metrics: Metrics,
    ) -> RelayHome {
        let start = clock().saturating_mul(RELAY_SEQUENCE_PER_MS);
        RelayHome {
            domain,
            key,
            registry,
            rooms,
            clock,
            metrics,
            sequence: Mutex::new(start),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The domain ordering `room_id`, when it is another domain's room.
    pub fn authority_of(&self, room_id: RoomId) -> Option<DomainName> {
        if room_id == RoomId::default() {
            return None;
        }
        self.rooms.authority_of(room_id).filter(|authority| *authority != self.domain)
    }

    /// Relays `frame` of the client on `outbox` (whose identity key is
    /// `identity_key`; its signature was checked) to `authority`, with the
    /// homes of its Welcome's recipients this server knows (left out when
    /// they would not fit the message).
    pub fn forward(
        &self,
        outbox: &Arc<Outbox>,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        frame: Frame,
        authority: &DomainName,
        recipient_homes: Vec<RecipientHomes>,
    ) -> Result<(), RelayForwardError> {
        let certificate = self.certificate_for(outbox, identity_key, authority);
        let mut sequence = lock(&self.sequence);
        let next = sequence.saturating_add(1).max((self.clock)().saturating_mul(RELAY_SEQUENCE_PER_MS));
        let envelope = RelayEnvelope::countersign(
            &self.key,
            self.domain.clone(),
            authority.clone(),
            next,
            certificate,
            frame,
        );
        let (connection, with_homes) = (outbox.connection(), !recipient_homes.is_empty());
        let mut message = LinkMessage::Relay { connection, envelope, recipient_homes };
        let mut encoded = encode_established(&message);
        if let (Err(len_bytes), true, LinkMessage::Relay { recipient_homes, .. }) =
            (&encoded, with_homes, &mut message)
        {
            // The frame goes without the homes; its Welcome may then stay at the authority.
            tracing::warn!(%authority, len_bytes, "recipient homes left out of a relayed commit too large with them");
            recipient_homes.clear();
            encoded = encode_established(&message);
        }
        let bytes = encoded.map_err(|len_bytes| RelayForwardError::TooLarge { len_bytes })?;
        self.registry.try_send(authority, bytes).map_err(RelayForwardError::Unreachable)?;
        *sequence = next;
        drop(sequence);
        self.metrics.relayed("out");
        Ok(())
    }

    /// The client's home certificate, issued again when it nears its end;
    /// notes that the client relays to `authority`.
    fn certificate_for(
        &self,
        outbox: &Arc<Outbox>,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        authority: &DomainName,
    ) -> HomeCertificate {
        let now_ms = (self.clock)();
        let mut clients = lock(&self.clients);
        let client = clients.entry(outbox.connection()).or_insert_with(|| RelayedClient {
            outbox: Arc::clone(outbox),
            certificate: self.issue(identity_key, now_ms),
            authorities: BTreeSet::new(),
            acked_next: HashMap::new(),
        });
        if client.certificate.not_after_ms.saturating_sub(now_ms) < HOME_CERTIFICATE_RENEW_BEFORE_MS {
            client.certificate = self.issue(identity_key, now_ms);
        }
        client.authorities.insert(authority.clone());
        client.certificate.clone()
    }

    fn issue(&self, identity_key: [u8; PUBLIC_KEY_BYTES], now_ms: u64) -> HomeCertificate {
        let not_after_ms = now_ms.saturating_add(HOME_CERTIFICATE_VALIDITY_MS);
        HomeCertificate::issue(&self.key, self.domain.clone(), identity_key, not_after_ms)
    }

    /// Frames `peer` sends back for the client connection `connection`.
    /// Frames of a room `peer` does not order are dropped and counted; a
    /// client whose queue cannot take them is closed (it reconnects and
    /// reads again).
    pub fn deliver(&self, peer: &DomainName, connection: u64, frames: Vec<ByteBuf>) {
        let Some(outbox) = lock(&self.clients).get(&connection).map(|client| Arc::clone(&client.outbox))
        else {
            return;
        };
        for frame in frames {
            let frame = Bytes::from(frame.into_vec());
            let decoded = match Frame::decode(&frame) {
                Ok(decoded) => decoded,
                Err(_) => {
                    self.metrics.relay_refused(peer.as_str(), "malformed_frame");
                    continue;
                }
            };
            let room_id = decoded.header().room_id();
            if room_id != RoomId::default() && self.authority_of(room_id).as_ref() != Some(peer) {
                tracing::warn!(%peer, %room_id, "a peer sent a frame of a room it does not order");
                self.metrics.relay_refused(peer.as_str(), "foreign_room");
                continue;
            }
            if let Some(next) = acknowledged_next(&decoded) {
                // Before the client can read the Ack and then the room.
                self.note_acknowledged(connection, room_id, next);
            }
            if !outbox.try_send(frame) {
                let notice = error_frame(
                    RoomId::default(),
                    0,
                    ErrorCode::ResyncRequired,
                    "too slow for a room of another domain; reconnect and read again",
                );
                outbox.notice(notice);
                outbox.close();
                return;
            }
        }
    }

    /// Notes that the client of `connection` must read `room_id` up to
    /// `next` (exclusive).
    fn note_acknowledged(&self, connection: u64, room_id: RoomId, next: u64) {
        let mut clients = lock(&self.clients);
        let Some(client) = clients.get_mut(&connection) else { return };
        let room_count = client.acked_next.len();
        match client.acked_next.get_mut(&room_id) {
            Some(known) => *known = (*known).max(next),
            None if room_count < RELAYED_CLIENT_ACKED_ROOMS_MAX => {
                client.acked_next.insert(room_id, next);
            }
            None => {}
        }
    }

    /// One past the highest index of `room_id` an authority acknowledged
    /// to the client of `connection` (0 when none).
    pub fn acknowledged_next(&self, connection: u64, room_id: RoomId) -> u64 {
        let clients = lock(&self.clients);
        clients.get(&connection).and_then(|client| client.acked_next.get(&room_id).copied()).unwrap_or(0)
    }

    /// The authority dropped the relayed connection (or its link went
    /// down): the client is closed so that it reconnects and reads again.
    pub fn dropped_by(&self, peer: &DomainName, connection: Option<u64>) {
        let clients = lock(&self.clients);
        for (id, client) in clients.iter() {
            if connection.is_some_and(|connection| connection != *id) || !client.authorities.contains(peer) {
                continue;
            }
            let message = format!("the link to {peer} was lost; reconnect and read again");
            client.outbox.notice(error_frame_with(
                RoomId::default(),
                0,
                ErrorCode::DomainUnreachable,
                &message,
                None,
                None,
                Some(RELAY_RETRY_AFTER_MS),
            ));
            client.outbox.close();
        }
    }

    /// The client connection closed: each authority it relayed to is told.
    pub fn connection_closed(&self, connection: u64) {
        let Some(client) = lock(&self.clients).remove(&connection) else { return };
        for authority in client.authorities {
            if let Ok(bytes) = encode_established(&LinkMessage::RelayClosed { connection }) {
                // A link that is down has dropped the remote connection already.
                let _ = self.registry.try_send(&authority, bytes);
            }
        }
    }
}

/// Serves remote connections as local ones (the listener): opens one for
/// the user with `identity_key` whose client is `connection` at its home,
/// taking its frames from `frames` and delivering its queue over
/// `outgoing`; returns its queue and the task that serves it.
pub trait RemoteConnectionHost: Send + Sync {
    /// Opens remote connection `id`; `None` if the identity key is not a key.
    fn open_remote(
        &self,
        id: u64,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        frames: mpsc::Receiver<RelayedFrame>,
        outgoing: mpsc::Sender<Vec<u8>>,
        connection: u64,
    ) -> Option<(Arc<Outbox>, RemoteConnectionTask)>;
}

/// A relayed frame handed to its remote connection.
#[derive(Debug)]
pub struct RelayedFrame {
    /// The frame, as its client sent it.
    pub frame: Frame,
    /// The homes its relay named for the recipients of its Welcome, if any.
    pub named: Option<NamedHomesOf>,
}

/// Recipient homes as one relaying domain named them.
#[derive(Debug)]
pub struct NamedHomesOf {
    /// The relaying domain.
    pub by: DomainName,
    /// What it named (not empty).
    pub homes: Vec<RecipientHomes>,
}

/// The task serving one remote connection.
pub type RemoteConnectionTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A client connection of another domain, served here.
struct RemoteConnection {
    inbox: mpsc::Sender<RelayedFrame>,
    outbox: Arc<Outbox>,
}

/// What the authority checks one peer's next envelope against.
#[derive(Default)]
struct FromPeer {
    /// The last relay sequence number accepted.
    last_sequence: Option<u64>,
    /// Home certificates of the peer's users already verified.
    verified: Arc<Mutex<VerifiedCertificates>>,
}

/// Relayed envelopes of one link being checked at once, at most; the
/// link's read loop waits for the oldest beyond that.
pub const RELAY_CHECKS_IN_FLIGHT_MAX: usize = 32;

const _: () = assert!(RELAY_CHECKS_IN_FLIGHT_MAX <= RELAYED_INBOX_FRAMES_MAX);

/// What a link's read loop hands to [`RelayAuthority::admit_in_order`].
pub enum Intake {
    /// An envelope for `connection`, being checked.
    Relayed {
        /// The home's client connection.
        connection: u64,
        /// The check: the envelope and what [`RelayAuthority::check`] found.
        check: tokio::task::JoinHandle<(RelayEnvelope, Result<Frame, RelayRefusal>)>,
        /// The homes the relay named for the frame's Welcome recipients.
        recipient_homes: Vec<RecipientHomes>,
    },
    /// The home's client of `connection` left.
    Closed {
        /// The home's client connection.
        connection: u64,
    },
}

/// Why the authority refuses a relayed envelope.
#[derive(Debug)]
pub struct RelayRefusal {
    /// The label of `kalandra_federation_relay_refused_total`.
    pub code: &'static str,
    /// The error code the client gets.
    pub client: ErrorCode,
    /// What the client and the log are told.
    pub message: String,
}

impl RelayRefusal {
    fn of(error: &RelayError) -> RelayRefusal {
        RelayRefusal {
            code: relay_error_code(error),
            client: relay_error_to_client(error),
            message: error.to_string(),
        }
    }
}

/// The authority side: verifies relayed frames and serves them on remote
/// connections.
pub struct RelayAuthority {
    domain: DomainName,
    peers: Arc<SharedPeers>,
    refused: RefusedDomains,
    host: Arc<dyn RemoteConnectionHost>,
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Metrics,
    /// What each peer's envelopes are checked against.
    from_peers: Mutex<HashMap<DomainName, FromPeer>>,
    /// Open remote connections, by peer and by the client's connection id
    /// at the peer (a peer's count is read without a scan of the others).
    connections: Mutex<HashMap<DomainName, HashMap<u64, RemoteConnection>>>,
    next_connection_id: AtomicU64,
}

impl RelayAuthority {
    /// The authority side of `domain`, serving remote connections through `host`.
    pub fn new(
        domain: DomainName,
        peers: Arc<SharedPeers>,
        refused: RefusedDomains,
        host: Arc<dyn RemoteConnectionHost>,
        store: Arc<dyn Store>,
        clock: Clock,
        metrics: Metrics,
    ) -> RelayAuthority {
        RelayAuthority {
            domain,
            peers,
            refused,
            host,
            store,
            clock,
            metrics,
            from_peers: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            // Above every id the local listener hands out.
            next_connection_id: AtomicU64::new(1 << 62),
        }
    }

    /// The peers' keys were reloaded: home certificates are verified again
    /// (a key's acceptance may have ended sooner than a cached check knew).
    /// Each peer gets a new, empty cache: a check under way with the old
    /// keys fills the old one, which is dropped.
    pub fn peer_keys_replaced(&self) {
        for from in lock(&self.from_peers).values_mut() {
            from.verified = Arc::new(Mutex::new(VerifiedCertificates::new()));
        }
    }

    /// Everything about an envelope but its place in the link's order
    /// (origin, destination, countersignature, home certificate, sender,
    /// client signature): the costly part, which may run for several
    /// envelopes of a link at once, on any thread.
    pub fn check(&self, peer: &DomainName, envelope: &RelayEnvelope) -> Result<Frame, RelayRefusal> {
        if self.refused.contains(peer) {
            let message = format!("{peer} is refused here");
            return Err(RelayRefusal {
                code: "refused_domain",
                client: ErrorCode::FederationRefused,
                message,
            });
        }
        // The cache before the keys: a reload replaces the keys, then the
        // caches, so a check never fills a new cache under old keys.
        let verified = self.with_peer_state(peer, |from| Arc::clone(&from.verified));
        let peers = self.peers.current();
        let Some(keys) = peers.get(peer) else {
            let message = format!("{peer} is not a peer");
            return Err(RelayRefusal { code: "refused_domain", client: ErrorCode::UnknownDomain, message });
        };
        // The sequence is checked in the link's order, by `admit`.
        let mut frame = envelope
            .verify_with(keys, &self.domain, None, (self.clock)(), Some(&verified))
            .map_err(|error| RelayRefusal::of(&error))?;
        // The flag belongs to the envelope, checked above: the frame is
        // sequenced as its client sent it (wire-protocol §4: only the log
        // index and the timestamp change), or the sender's own record of
        // it, and so its hash chain, would differ from every other member's.
        let signed = frame.header().flags().contains(Flags::SIGNED);
        frame.header_mut().set_signature_flags(signed, false);
        Ok(frame)
    }

    /// In the link's order, an envelope [`RelayAuthority::check`]ed: its
    /// relay sequence must rise, then its frame goes to the remote
    /// connection; a refusal goes back to the client.
    pub fn admit(
        &self,
        peer: &DomainName,
        connection: u64,
        envelope: RelayEnvelope,
        checked: Result<Frame, RelayRefusal>,
        recipient_homes: Vec<RecipientHomes>,
        outgoing: &mpsc::Sender<Vec<u8>>,
    ) {
        let frame = match checked.and_then(|frame| self.in_sequence(peer, &envelope).map(|()| frame)) {
            Ok(frame) => frame,
            Err(refusal) => {
                self.metrics.relay_refused(peer.as_str(), refusal.code);
                tracing::info!(%peer, connection, code = refusal.code, message = %refusal.message, "relayed frame refused");
                if let Some((room_id, request_id)) = request_of(&envelope.frame) {
                    let error = error_frame(room_id, request_id, refusal.client, &refusal.message);
                    deliver_now(outgoing, connection, vec![error]);
                }
                return;
            }
        };
        self.metrics.relayed("in");
        let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
        let Some(inbox) = self.connection(peer, connection, &envelope.home_certificate, outgoing) else {
            self.metrics.relay_refused(peer.as_str(), "too_many_connections");
            let message = format!("{RELAYED_CONNECTIONS_PER_PEER_MAX} connections of {peer} are open");
            let error = error_frame(room_id, request_id, ErrorCode::TooManyConnections, &message);
            deliver_now(outgoing, connection, vec![error]);
            return;
        };
        let named =
            (!recipient_homes.is_empty()).then(|| NamedHomesOf { by: peer.clone(), homes: recipient_homes });
        let inbox_frame = match inbox.try_send(RelayedFrame { frame, named }) {
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                // The remote connection ended on its own (its queue closed): open it again.
                remove_connection(&mut lock(&self.connections), peer, connection);
                match self.connection(peer, connection, &envelope.home_certificate, outgoing) {
                    Some(inbox) => inbox.try_send(frame).map_err(|_| ()),
                    None => Err(()),
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(()),
            Ok(()) => Ok(()),
        };
        if inbox_frame.is_err() {
            let error = error_frame_with(
                room_id,
                request_id,
                ErrorCode::RateLimited,
                "too many relayed frames waiting",
                None,
                None,
                Some(RELAY_RETRY_AFTER_MS),
            );
            deliver_now(outgoing, connection, vec![error]);
        }
    }

    /// Starts [`RelayAuthority::check`]ing `envelope` on the runtime (beside
    /// the link's other envelopes); [`RelayAuthority::admit_in_order`]
    /// admits it when its turn comes.
    pub fn start_check(
        self: &Arc<Self>,
        peer: &DomainName,
        connection: u64,
        envelope: RelayEnvelope,
        recipient_homes: Vec<RecipientHomes>,
    ) -> Intake {
        let (authority, peer) = (Arc::clone(self), peer.clone());
        let check = tokio::spawn(async move {
            let checked = authority.check(&peer, &envelope);
            (envelope, checked)
        });
        Intake::Relayed { connection, check, recipient_homes }
    }

    /// Admits what a link's read loop queued (checked envelopes, closed
    /// connections) in the order it read them, until the queue ends: a
    /// client's frames reach its remote connection in the order it sent
    /// them, and none after its `RelayClosed`.
    pub async fn admit_in_order(
        &self,
        peer: &DomainName,
        intake: &mut mpsc::Receiver<Intake>,
        outgoing: &mpsc::Sender<Vec<u8>>,
    ) {
        while let Some(next) = intake.recv().await {
            match next {
                Intake::Closed { connection } => self.closed(peer, connection),
                Intake::Relayed { connection, check, recipient_homes } => match check.await {
                    Ok((envelope, checked)) => {
                        self.admit(peer, connection, envelope, checked, recipient_homes, outgoing)
                    }
                    // A panic in a check is a bug here; the client's request times out.
                    Err(error) => {
                        tracing::error!(%peer, connection, %error, "a relayed frame's check failed")
                    }
                },
            }
        }
    }

    /// Accepts `envelope`'s relay sequence if it is above the last one
    /// accepted from `peer` (a replayed or reordered envelope is refused).
    fn in_sequence(&self, peer: &DomainName, envelope: &RelayEnvelope) -> Result<(), RelayRefusal> {
        self.with_peer_state(peer, |from| {
            envelope.check_sequence(from.last_sequence).map_err(|error| RelayRefusal::of(&error))?;
            from.last_sequence = Some(envelope.relay_sequence);
            Ok(())
        })
    }

    /// Runs `f` on what `peer`'s envelopes are checked against (its name is
    /// copied only the first time, not for every frame).
    fn with_peer_state<R>(&self, peer: &DomainName, f: impl FnOnce(&mut FromPeer) -> R) -> R {
        let mut from_peers = lock(&self.from_peers);
        match from_peers.get_mut(peer) {
            Some(from) => f(from),
            None => f(from_peers.entry(peer.clone()).or_default()),
        }
    }

    /// The remote connection for (`peer`, `connection`), opened on first use.
    fn connection(
        &self,
        peer: &DomainName,
        connection: u64,
        certificate: &HomeCertificate,
        outgoing: &mpsc::Sender<Vec<u8>>,
    ) -> Option<mpsc::Sender<RelayedFrame>> {
        let mut connections = lock(&self.connections);
        let of_peer = connections.get(peer);
        if let Some(open) = of_peer.and_then(|open| open.get(&connection)) {
            return Some(open.inbox.clone());
        }
        if of_peer.map_or(0, HashMap::len) >= RELAYED_CONNECTIONS_PER_PEER_MAX {
            return None;
        }
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let (inbox, frames) = mpsc::channel(RELAYED_INBOX_FRAMES_MAX);
        let (outbox, handled) =
            self.host.open_remote(id, certificate.identity_key, frames, outgoing.clone(), connection)?;
        let of_peer = connections.entry(peer.clone()).or_default();
        of_peer.insert(connection, RemoteConnection { inbox: inbox.clone(), outbox });
        assert!(
            of_peer.len() <= RELAYED_CONNECTIONS_PER_PEER_MAX,
            "a peer's remote connections beyond their bound"
        );
        drop(connections);
        tokio::spawn(handled);
        // The certificate names the user's home: its domain may follow the
        // rooms the user is a member of. Only a user with no home recorded
        // yet: a domain's word about a key never replaces the home a claim
        // through that user's own domain recorded (Welcomes are routed there).
        let (store, user, home) = (Arc::clone(&self.store), certificate.identity_key, peer.clone());
        tokio::task::spawn_blocking(move || {
            let user = kalandra_proto::SenderId::from_identity_key(&user);
            let recorded = store.remote_user_home(user.0).map(|known| known.is_some());
            if let Err(error) = recorded.and_then(|known| match known {
                true => Ok(()),
                false => store.record_remote_user(user.0, &home),
            }) {
                tracing::warn!(%user, %home, %error, "could not record a remote user's home");
            }
        });
        Some(inbox)
    }

    /// The client of `peer`'s connection `connection` left.
    pub fn closed(&self, peer: &DomainName, connection: u64) {
        if let Some(open) = remove_connection(&mut lock(&self.connections), peer, connection) {
            open.outbox.close();
        }
    }

    /// The link with `peer` went down: its remote connections end.
    pub fn link_down(&self, peer: &DomainName) {
        let ended = lock(&self.connections).remove(peer);
        for open in ended.into_iter().flat_map(HashMap::into_values) {
            open.outbox.close();
        }
    }
}

/// Removes `peer`'s remote connection for its client connection
/// `connection` (and the peer's entry with its last one).
fn remove_connection(
    connections: &mut HashMap<DomainName, HashMap<u64, RemoteConnection>>,
    peer: &DomainName,
    connection: u64,
) -> Option<RemoteConnection> {
    let of_peer = connections.get_mut(peer)?;
    let removed = of_peer.remove(&connection);
    if of_peer.is_empty() {
        connections.remove(peer);
    }
    removed
}

/// The room and request id of a relayed frame, if its header is readable.
fn request_of(frame: &[u8]) -> Option<(RoomId, u32)> {
    let frame = Frame::decode(&Bytes::copy_from_slice(frame)).ok()?;
    Some((frame.header().room_id(), frame.header().request_id()))
}

/// Queues a `Deliver` of `frames` for `connection` on the link without
/// waiting (dropped when the link's queue is full: errors are best effort).
fn deliver_now(outgoing: &mpsc::Sender<Vec<u8>>, connection: u64, frames: Vec<Bytes>) {
    let frames = frames.into_iter().map(|frame| ByteBuf::from(frame.to_vec())).collect();
    if let Ok(bytes) = encode_established(&LinkMessage::Deliver { connection, frames }) {
        let _ = outgoing.try_send(bytes);
    }
}

/// Splits `batch` into `Deliver` messages of about [`DELIVER_BYTES_TARGET`].
pub fn deliver_messages(connection: u64, batch: impl IntoIterator<Item = Bytes>) -> Vec<Vec<u8>> {
    frame_messages(batch, |frames| LinkMessage::Deliver { connection, frames })
}

/// Splits `batch` into messages of about [`DELIVER_BYTES_TARGET`] made by
/// `message` (a frame larger than that goes alone).
pub fn frame_messages(
    batch: impl IntoIterator<Item = Bytes>,
    message: impl Fn(Vec<ByteBuf>) -> LinkMessage,
) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let (mut frames, mut bytes) = (Vec::new(), 0usize);
    for frame in batch {
        if !frames.is_empty() && bytes + frame.len() > DELIVER_BYTES_TARGET {
            messages.extend(encode_established(&message(std::mem::take(&mut frames))).ok());
            bytes = 0;
        }
        bytes += frame.len();
        frames.push(ByteBuf::from(frame.to_vec()));
    }
    if !frames.is_empty() {
        messages.extend(encode_established(&message(frames)).ok());
    }
    messages
}

/// One past the log index an `Ack` names.
fn acknowledged_next(frame: &Frame) -> Option<u64> {
    if frame.opcode() != Opcode::Ack {
        return None;
    }
    let ack = frame.decode_payload::<Ack>().ok()?;
    // `u64::MAX`: a moderation act that sequenced nothing.
    (ack.log_index != u64::MAX).then(|| ack.log_index.saturating_add(1))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
