//! Welcomes across domains.
//!
//! The room's side ([`WelcomeRouter`]): a Welcome is stored with its
//! commit's batch for every recipient, local or not. For recipients whose
//! home is another domain (recorded when their key package was claimed
//! through this server, [`record_remote_users`]; or, for one room's
//! Welcome only, named by the domain that relayed their inviter's commit,
//! [`super::named_homes`]), the router sends the
//! Welcome frame to that domain with `DeliverWelcome` once its commit is
//! durable (the same [`welcome_standing`] check local delivery makes, so a
//! Welcome of a commit that was refused is never sent), and deletes its
//! own copy for those recipients once the home answers `WelcomeStored`.
//! A Welcome the home could not take yet (no link, a timeout, the home's
//! storage failed) stays and is sent again when a link to the domain comes
//! up and on a periodic retry. One the home refuses as a bad request (the
//! room is its own, another domain orders it, the frame is not a Welcome
//! of the room) can never be taken: it is dropped, logged and counted; so
//! is one for users of a domain the operator refuses.
//!
//! The home's side ([`WelcomeInbox`]): a peer's Welcome is checked (a
//! Welcome frame of the room it names, within the size bound, carrying an
//! MLS Welcome; the room not one this server orders nor one recorded under
//! another authority; its recipients only users whose key package the MLS
//! Welcome is encrypted to was handed out here, to a local client or a
//! peer, as recorded by [`Store::record_handed_out_claims`]), the
//! room is recorded as the peer's ([`RemoteRooms`]), and the Welcome is
//! stored for its recipients and held until they read the room, as a local
//! one, and handed at once to those connected.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::Welcome;
use kalandra_proto::{Frame, Opcode, RoomId, SenderId};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::admin::metrics::Metrics;
use crate::federation::handshake::RefusedDomains;
use crate::federation::named_homes::{NamedHome, NamedHomes};
use crate::federation::registry::LinkRegistry;
use crate::federation::requests::{
    refusal, LinkRequest, LinkRequestError, LinkResponse, RefusalCode, DELIVER_WELCOME_RECIPIENTS_MAX,
    FORWARDED_WELCOME_BYTES_MAX,
};
use crate::federation::rooms::{RecordRoomError, RemoteRoomError, RemoteRooms};
use crate::node::{welcome_standing, Clock, WelcomeStanding};
use crate::store::limits::{HANDED_OUT_CLAIM_RECORD_MS, REMOTE_USERS_PAGE_MAX, WELCOMES_PAGE_ENTRIES_MAX};
use crate::store::{PendingWelcome, RemoteRecordError, Store, UserId, WelcomeId};
use crate::transport::directory::welcome_key_package_refs;

/// Batches of Welcome recipients queued for the router; when it is full a
/// batch waits for the periodic retry.
pub const WELCOME_ROUTING_QUEUE_MAX: usize = 256;
/// Interval of the router's retry of Welcomes not yet taken by their home.
pub const WELCOME_RETRY_INTERVAL_MS: u64 = 10_000;
/// Remote users whose pending Welcomes one round of the router reads.
pub const WELCOME_ROUND_USERS_MAX: usize = 256;
/// Welcomes one round of the router sends at most.
pub const WELCOME_ROUND_FORWARDS_MAX: usize = 64;

const _: () = assert!(WELCOME_ROUND_USERS_MAX <= REMOTE_USERS_PAGE_MAX, "a round reads one page of users");
const _: () =
    assert!(WELCOME_ROUND_FORWARDS_MAX >= WELCOMES_PAGE_ENTRIES_MAX, "one user's page fits a round");
const _: () = assert!(
    WELCOME_RETRY_INTERVAL_MS > crate::federation::requests::LINK_REQUEST_TIMEOUT_MS,
    "a retry does not overtake the request it repeats"
);

/// Why a peer's Welcome was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeRefusal {
    /// The room is one this server orders.
    #[error("room {room_id} is ordered by this server")]
    LocalRoom {
        /// The room.
        room_id: RoomId,
    },
    /// The room is recorded as ordered by another domain than the peer.
    #[error("room {room_id} is ordered by {authority}")]
    OtherAuthority {
        /// The room.
        room_id: RoomId,
        /// Its recorded authority.
        authority: DomainName,
    },
    /// Not a Welcome frame of the room, no recipient or too many, or too large.
    #[error("not a Welcome of room {room_id}: {detail}")]
    BadWelcome {
        /// The room named.
        room_id: RoomId,
        /// What is wrong.
        detail: String,
    },
    /// The peer has as many rooms recorded here as one authority may.
    #[error("room {room_id}: {authority} has as many rooms recorded here as one domain may")]
    TooManyRooms {
        /// The room named.
        room_id: RoomId,
        /// The peer.
        authority: DomainName,
    },
    /// No recipient's key package named in the Welcome was handed out by
    /// this server (made-up recipients, or a package of another).
    #[error("Welcome of room {room_id}: none of its {recipients} recipients has a key package it names claimed at this server")]
    UnclaimedRecipients {
        /// The room named.
        room_id: RoomId,
        /// How many recipients the request named.
        recipients: usize,
    },
}

impl WelcomeRefusal {
    /// A stable snake_case name, one of
    /// [`FEDERATION_REFUSAL_CODES`](super::codes::FEDERATION_REFUSAL_CODES).
    pub fn code(&self) -> &'static str {
        match self {
            WelcomeRefusal::LocalRoom { .. } => "local_room",
            WelcomeRefusal::OtherAuthority { .. } => "other_authority",
            WelcomeRefusal::BadWelcome { .. } => "bad_welcome",
            WelcomeRefusal::UnclaimedRecipients { .. } => "unclaimed_recipient",
            WelcomeRefusal::TooManyRooms { .. } => "too_many_rooms",
        }
    }
}

/// Why a peer's Welcome was not stored.
#[derive(Debug, Clone, thiserror::Error)]
enum InboxError {
    /// The peer's doing: refused for good.
    #[error(transparent)]
    Refused(#[from] WelcomeRefusal),
    /// This server's storage failed: the peer may send it again.
    #[error("storage: {0}")]
    Unavailable(String),
}

/// A peer's Welcome frame as checked, with the `KeyPackageRef`s its MLS
/// Welcome is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredWelcome {
    /// The Welcome frame.
    pub frame: Bytes,
    /// One per new member of the commit, in any domain.
    pub key_package_refs: BTreeSet<Vec<u8>>,
}

/// Checks a peer's `DeliverWelcome` (pure): 1 to
/// [`DELIVER_WELCOME_RECIPIENTS_MAX`] recipients, and a Welcome frame of
/// `room_id` within [`FORWARDED_WELCOME_BYTES_MAX`] whose payload decodes
/// and carries an MLS Welcome.
pub fn check_delivered_welcome(
    room_id: RoomId,
    recipients: &[u64],
    welcome: Vec<u8>,
) -> Result<DeliveredWelcome, WelcomeRefusal> {
    let bad = |detail: String| WelcomeRefusal::BadWelcome { room_id, detail };
    if recipients.is_empty() || recipients.len() > DELIVER_WELCOME_RECIPIENTS_MAX {
        return Err(bad(format!("{} recipients, 1 to {DELIVER_WELCOME_RECIPIENTS_MAX}", recipients.len())));
    }
    if welcome.len() > FORWARDED_WELCOME_BYTES_MAX {
        return Err(bad(format!("{} bytes, at most {FORWARDED_WELCOME_BYTES_MAX}", welcome.len())));
    }
    let welcome = Bytes::from(welcome);
    let frame = Frame::decode(&welcome).map_err(|error| bad(error.to_string()))?;
    if frame.opcode() != Opcode::Welcome {
        return Err(bad(format!("a {:?} frame", frame.opcode())));
    }
    if frame.header().room_id() != room_id {
        return Err(bad(format!("a Welcome of room {}", frame.header().room_id())));
    }
    let payload = frame.decode_payload::<Welcome>().map_err(|error| bad(error.to_string()))?;
    let key_package_refs = welcome_key_package_refs(&payload.welcome).map_err(bad)?;
    Ok(DeliveredWelcome { frame: welcome, key_package_refs: key_package_refs.into_iter().collect() })
}

/// Hands stored Welcomes to those of the recipients who are connected.
pub type WelcomesArrived = Arc<dyn Fn(Vec<SenderId>) + Send + Sync>;

/// The home side: stores peers' Welcomes for this server's users (blocking:
/// storage).
pub struct WelcomeInbox {
    /// This server's store.
    pub store: Arc<dyn Store>,
    /// The rooms other domains order.
    pub rooms: Arc<RemoteRooms>,
    /// Counts refusals and received Welcomes.
    pub metrics: Metrics,
    /// Delivers to connected recipients.
    pub arrived: WelcomesArrived,
    /// ms since the Unix epoch (the age of claims).
    pub clock: Clock,
}

impl WelcomeInbox {
    /// The answer to `peer`'s `DeliverWelcome`.
    pub fn accept(
        &self,
        peer: &DomainName,
        room_id: RoomId,
        recipients: Vec<u64>,
        welcome: Vec<u8>,
    ) -> LinkResponse {
        match self.store_from(peer, room_id, &recipients, welcome) {
            Ok(stored) => {
                self.metrics.federation_welcome("received");
                tracing::debug!(%peer, %room_id, recipients = stored.len(), "Welcome of a remote room stored");
                (self.arrived)(stored);
                LinkResponse::WelcomeStored {}
            }
            Err(InboxError::Refused(error)) => {
                tracing::warn!(%peer, %error, "a peer's Welcome refused");
                self.metrics.federation_refused(error.code());
                refusal(RefusalCode::BadRequest, &error.to_string())
            }
            Err(InboxError::Unavailable(error)) => {
                tracing::warn!(%peer, %room_id, %error, "a peer's Welcome could not be stored");
                refusal(RefusalCode::Unavailable, &error)
            }
        }
    }

    /// Checks and stores the Welcome; the recipients it was stored for.
    fn store_from(
        &self,
        peer: &DomainName,
        room_id: RoomId,
        recipients: &[u64],
        welcome: Vec<u8>,
    ) -> Result<Vec<SenderId>, InboxError> {
        let welcome = check_delivered_welcome(room_id, recipients, welcome)?;
        // A room recorded as another domain's has a log here when this
        // server keeps its replica: it is not local.
        if self.rooms.authority_of(room_id).is_none() && self.is_local(room_id)? {
            return Err(WelcomeRefusal::LocalRoom { room_id }.into());
        }
        let recipients = self.claimed_recipients(peer, room_id, recipients, &welcome.key_package_refs)?;
        self.rooms.record_durably(self.store.as_ref(), room_id, peer).map_err(|error| match error {
            RecordRoomError::Room(RemoteRoomError::OtherAuthority { room_id, authority }) => {
                WelcomeRefusal::OtherAuthority { room_id, authority }.into()
            }
            RecordRoomError::Room(RemoteRoomError::AuthorityFull { authority }) => {
                WelcomeRefusal::TooManyRooms { room_id, authority }.into()
            }
            other => InboxError::Unavailable(other.to_string()),
        })?;
        let stored = self
            .store
            .put_welcomes(room_id, &recipients, welcome.frame)
            .map_err(|error| InboxError::Unavailable(error.to_string()))?;
        for recipient in &stored.full {
            tracing::warn!(recipient, %room_id, "Welcome queue full; a peer's Welcome is not stored for this recipient");
        }
        let full: BTreeSet<u64> = stored.full.into_iter().collect();
        let stored_for: BTreeSet<u64> = recipients.iter().copied().filter(|r| !full.contains(r)).collect();
        Ok(stored_for.into_iter().map(SenderId).collect())
    }

    /// The recipients for whom a key package the Welcome names was handed
    /// out by this server within [`HANDED_OUT_CLAIM_RECORD_MS`]: a peer
    /// holds Welcomes here only for users whose packages were claimed here,
    /// by a local client or through a link (the record does not name the
    /// claimant: a user of this domain may invite another into a room a
    /// third domain orders). The others are left out and counted; refused
    /// when none is left.
    fn claimed_recipients(
        &self,
        peer: &DomainName,
        room_id: RoomId,
        recipients: &[u64],
        key_package_refs: &BTreeSet<Vec<u8>>,
    ) -> Result<Vec<u64>, InboxError> {
        let now_ms = (self.clock)();
        let distinct: BTreeSet<u64> = recipients.iter().copied().collect();
        let named_count = distinct.len();
        let mut claimed = Vec::with_capacity(named_count);
        for recipient in distinct {
            let claims = self
                .store
                .handed_out_claims(recipient)
                .map_err(|error| InboxError::Unavailable(error.to_string()))?;
            let named = claims.iter().any(|claim| {
                claim.claimed_at_ms.saturating_add(HANDED_OUT_CLAIM_RECORD_MS) >= now_ms
                    && key_package_refs.contains(&claim.key_package_ref)
            });
            if named {
                claimed.push(recipient);
            }
        }
        let unclaimed = named_count - claimed.len();
        if claimed.is_empty() {
            return Err(WelcomeRefusal::UnclaimedRecipients { room_id, recipients: named_count }.into());
        }
        if unclaimed > 0 {
            tracing::warn!(%peer, %room_id, unclaimed, "a peer's Welcome names recipients none of whose named key packages was claimed here; left out");
            self.metrics.federation_refused(
                WelcomeRefusal::UnclaimedRecipients { room_id, recipients: unclaimed }.code(),
            );
        }
        Ok(claimed)
    }

    /// Whether this server orders `room_id`: it has a log or metadata for it.
    fn is_local(&self, room_id: RoomId) -> Result<bool, InboxError> {
        let unavailable = |error: String| InboxError::Unavailable(error);
        let next = self.store.next_log_index(room_id).map_err(|error| unavailable(error.to_string()))?;
        let metadata = self.store.room_metadata(room_id).map_err(|error| unavailable(error.to_string()))?;
        Ok(next > 0 || metadata.is_some())
    }
}

/// Records, durably, that `users` are users of `home` (on a blocking
/// thread): their Welcomes are routed there. Called when their key
/// packages were claimed through `home`; a relay of their frames may call
/// it too. A failure is logged: their Welcomes then stay here.
pub async fn record_remote_users(store: &Arc<dyn Store>, home: &DomainName, users: Vec<UserId>) {
    if users.is_empty() {
        return;
    }
    let (store, owned) = (Arc::clone(store), home.clone());
    let recorded = tokio::task::spawn_blocking(move || -> Result<(), RemoteRecordError> {
        users.iter().try_for_each(|user| store.record_remote_user(*user, &owned))
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%home, %error, "remote users not recorded; their Welcomes stay here")
        }
        Err(error) => tracing::warn!(%home, %error, "recording remote users failed"),
    }
}

/// A user whose pending Welcomes go to `home`: all of them, or only
/// those of `room_id` (a home named for that room's Welcome).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    user: UserId,
    home: DomainName,
    room_id: Option<RoomId>,
}

/// One Welcome to send to one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    welcome_id: WelcomeId,
    room_id: RoomId,
    welcome: Bytes,
    home: DomainName,
    recipients: Vec<UserId>,
}

/// What became of one sent Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Stored at the home: delete here.
    Stored,
    /// Not taken yet: keep, send again.
    Deferred,
    /// Never to be taken: delete here.
    Dropped,
}

/// The room side: routes Welcomes of this server's rooms to their remote
/// recipients' home domains.
pub struct WelcomeRouter {
    /// This server's store (the Welcomes, the log, the remote users).
    pub store: Arc<dyn Store>,
    /// The links that are up.
    pub registry: Arc<LinkRegistry>,
    /// The rooms other domains order: their Welcomes are not routed from here.
    pub rooms: Arc<RemoteRooms>,
    /// Counts what became of each Welcome.
    pub metrics: Metrics,
    /// Domains the operator refuses: their users' Welcomes can never be
    /// taken, and are dropped instead of being sent again for ever.
    pub refused: RefusedDomains,
    /// Homes named for one room's Welcome of users with none recorded.
    pub named: Arc<NamedHomes>,
}

impl WelcomeRouter {
    /// Runs the router: it routes the recipients the node sends on
    /// `routed` (a commit with Welcomes is durable), and retries Welcomes
    /// not yet taken when a link comes up and every
    /// [`WELCOME_RETRY_INTERVAL_MS`].
    pub fn start(self, routed: mpsc::Receiver<Vec<SenderId>>) -> JoinHandle<()> {
        tokio::spawn(self.run(routed))
    }

    async fn run(self, mut routed: mpsc::Receiver<Vec<SenderId>>) {
        let mut links_up = self.registry.subscribe_links_up();
        let mut retry = tokio::time::interval(Duration::from_millis(WELCOME_RETRY_INTERVAL_MS));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cursor = None;
        loop {
            tokio::select! {
                recipients = routed.recv() => match recipients {
                    Some(recipients) => self.route_recipients(recipients).await,
                    None => return,
                },
                up = links_up.recv() => match up {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.sweep_all().await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = retry.tick() => cursor = self.sweep_round(cursor).await,
            }
        }
    }

    /// Routes the Welcomes pending for those of `recipients` who are remote.
    async fn route_recipients(&self, recipients: Vec<SenderId>) {
        let (store, named) = (Arc::clone(&self.store), Arc::clone(&self.named));
        let remote = tokio::task::spawn_blocking(move || {
            let mut remote = Vec::new();
            for SenderId(user) in recipients {
                match store.remote_user_home(user)? {
                    Some(home) => remote.push(Target { user, home, room_id: None }),
                    None => remote.extend(named.of_user(user).into_iter().map(named_target)),
                }
            }
            Ok::<_, RemoteRecordError>(remote)
        })
        .await;
        match remote {
            Ok(Ok(users)) => self.forward_users(users).await,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read remote users; the retry routes their Welcomes")
            }
            Err(error) => tracing::warn!(%error, "reading remote users failed"),
        }
    }

    /// Rounds over every remote user (a link came up), then the named homes.
    async fn sweep_all(&self) {
        let mut cursor = self.sweep_round(None).await;
        while cursor.is_some() {
            cursor = self.sweep_round(cursor).await;
        }
        let mut after = None;
        loop {
            let page = self.named.page(after, WELCOME_ROUND_USERS_MAX);
            after = page.last().map(|last| (last.user, last.room_id));
            let full = page.len() == WELCOME_ROUND_USERS_MAX;
            self.forward_users(page.into_iter().map(named_target).collect()).await;
            if !full {
                return;
            }
        }
    }

    /// One round: the Welcomes of at most [`WELCOME_ROUND_USERS_MAX`]
    /// remote users after `after`; the cursor of the next round (`None`:
    /// start again).
    async fn sweep_round(&self, after: Option<UserId>) -> Option<UserId> {
        let store = Arc::clone(&self.store);
        let page =
            tokio::task::spawn_blocking(move || store.remote_users(after, WELCOME_ROUND_USERS_MAX)).await;
        let users = match page {
            Ok(Ok(users)) => users,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read remote users");
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, "reading remote users failed");
                return None;
            }
        };
        let next =
            (users.len() == WELCOME_ROUND_USERS_MAX).then(|| users.last().map(|(user, _)| *user)).flatten();
        let targets = users.into_iter().map(|(user, home)| Target { user, home, room_id: None });
        self.forward_users(targets.collect()).await;
        if after.is_none() {
            // Once per pass over the recorded users: the named homes' first page.
            let named = self.named.page(None, WELCOME_ROUND_USERS_MAX);
            self.forward_users(named.into_iter().map(named_target).collect()).await;
        }
        next
    }

    /// Sends the durable Welcomes pending for `users`, at most
    /// [`WELCOME_ROUND_FORWARDS_MAX`]; a domain that did not take one is
    /// not sent more in this round.
    async fn forward_users(&self, users: Vec<Target>) {
        if users.is_empty() {
            return;
        }
        let (store, rooms) = (Arc::clone(&self.store), Arc::clone(&self.rooms));
        let forwards = match tokio::task::spawn_blocking(move || collect(store.as_ref(), &rooms, users)).await
        {
            Ok(Ok(forwards)) => forwards,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read Welcomes to route");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "reading Welcomes to route failed");
                return;
            }
        };
        let mut deferred: BTreeSet<DomainName> = BTreeSet::new();
        for forward in forwards {
            if deferred.contains(&forward.home) {
                continue;
            }
            let sent = self.send(&forward).await;
            self.metrics.federation_welcome(match sent {
                Sent::Stored => "forwarded",
                Sent::Deferred => "deferred",
                Sent::Dropped => "dropped",
            });
            match sent {
                Sent::Deferred => {
                    deferred.insert(forward.home.clone());
                }
                Sent::Stored | Sent::Dropped => self.forget(forward).await,
            }
        }
    }

    /// Sends one Welcome to its recipients' home.
    async fn send(&self, forward: &Forward) -> Sent {
        let (home, room_id) = (&forward.home, forward.room_id);
        if self.refused.contains(home) {
            tracing::info!(%home, %room_id, "a Welcome for users of a refused domain is dropped");
            return Sent::Dropped;
        }
        if forward.welcome.len() > FORWARDED_WELCOME_BYTES_MAX {
            tracing::error!(%home, %room_id, bytes = forward.welcome.len(), "a Welcome too large to route is dropped");
            return Sent::Dropped;
        }
        let request = LinkRequest::DeliverWelcome {
            room_id: room_id.0,
            recipients: forward.recipients.clone(),
            welcome: forward.welcome.to_vec(),
        };
        match self.registry.request(home, request).await {
            Ok(LinkResponse::WelcomeStored {}) => Sent::Stored,
            Ok(LinkResponse::Refused { code: RefusalCode::BadRequest, message }) => {
                tracing::warn!(%home, %room_id, %message, "the home refused a Welcome for good; dropped");
                Sent::Dropped
            }
            Ok(LinkResponse::Refused { code, message }) => {
                tracing::info!(%home, %room_id, code = code.as_str(), %message, "Welcome not taken yet");
                Sent::Deferred
            }
            Ok(LinkResponse::Claimed { .. }) => {
                tracing::warn!(%home, %room_id, "a claim's answer to a Welcome; sent again later");
                Sent::Deferred
            }
            Err(error @ LinkRequestError::TooLarge { .. }) => {
                tracing::error!(%home, %room_id, %error, "a Welcome too large to route is dropped");
                Sent::Dropped
            }
            Err(error) => {
                tracing::debug!(%home, %room_id, %error, "Welcome not routed yet");
                Sent::Deferred
            }
        }
    }

    /// Deletes this server's copy of a routed Welcome for its recipients,
    /// and the homes named for it.
    async fn forget(&self, forward: Forward) {
        for recipient in &forward.recipients {
            self.named.forget(*recipient, forward.room_id);
        }
        let store = Arc::clone(&self.store);
        let deleted = tokio::task::spawn_blocking(move || {
            forward.recipients.iter().try_for_each(|recipient| {
                store.delete_welcomes(*recipient, &[forward.welcome_id]).map(|_| ())
            })
        })
        .await;
        if !matches!(deleted, Ok(Ok(()))) {
            tracing::warn!("could not delete a routed Welcome; it may be sent again");
        }
    }
}

/// The Welcomes to send for `users` (blocks on storage): for each user, its
/// first page of pending Welcomes of this server's rooms whose commit is
/// durable, grouped by Welcome and home; Welcomes whose commit is not in
/// the log are forgotten as local delivery forgets them.
fn collect(store: &dyn Store, rooms: &RemoteRooms, users: Vec<Target>) -> Result<Vec<Forward>, String> {
    let mut forwards: BTreeMap<(WelcomeId, DomainName), Forward> = BTreeMap::new();
    for Target { user, home, room_id } in users {
        for pending in store.pending_welcomes(user, None).map_err(|error| error.to_string())? {
            if rooms.authority_of(pending.room_id).is_some()
                || room_id.is_some_and(|room_id| room_id != pending.room_id)
            {
                continue;
            }
            match standing(store, &pending)? {
                WelcomeStanding::Deliver => {}
                WelcomeStanding::NotYetDurable => continue,
                WelcomeStanding::Orphaned => {
                    store.delete_welcomes(user, &[pending.welcome_id]).map_err(|error| error.to_string())?;
                    continue;
                }
            }
            let key = (pending.welcome_id, home.clone());
            let forward = forwards.entry(key).or_insert_with(|| Forward {
                welcome_id: pending.welcome_id,
                room_id: pending.room_id,
                welcome: pending.welcome.clone(),
                home: home.clone(),
                recipients: Vec::new(),
            });
            forward.recipients.push(user);
        }
    }
    let mut forwards: Vec<Forward> = forwards.into_values().collect();
    forwards.truncate(WELCOME_ROUND_FORWARDS_MAX);
    for forward in &mut forwards {
        forward.recipients.truncate(DELIVER_WELCOME_RECIPIENTS_MAX);
    }
    Ok(forwards)
}

fn named_target(named: NamedHome) -> Target {
    Target { user: named.user, home: named.home, room_id: Some(named.room_id) }
}

/// Where a stored Welcome of this server's room stands against its log
/// (blocks on storage).
fn standing(store: &dyn Store, pending: &PendingWelcome) -> Result<WelcomeStanding, String> {
    let Ok(frame) = Frame::decode(&pending.welcome) else { return Ok(WelcomeStanding::Orphaned) };
    let log_index = frame.header().log_index();
    let entry = store.read_range(pending.room_id, log_index, 1).map_err(|error| error.to_string())?;
    Ok(welcome_standing(&pending.welcome, entry.first()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::FEDERATION_REFUSALS_TOTAL;
    use crate::room::frames::welcome_frame;
    use crate::store::{LogEntry, MemoryStore};
    use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
    use kalandra_proto::payload::Commit;
    use kalandra_proto::{FrameHeaderBuf, Payload};

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn welcome(room_id: RoomId, log_index: u64) -> Bytes {
        welcome_frame(
            room_id,
            &Bytes::from_static(b"mls welcome"),
            &Bytes::new(),
            (log_index, 1_000),
            &[0; 32],
        )
        .unwrap()
    }

    fn commit(room_id: RoomId, log_index: u64) -> LogEntry {
        let payload = Commit {
            commit: vec![1],
            welcome: Some(b"mls welcome".to_vec()),
            welcome_recipients: vec![2],
            group_info: None,
        };
        let mut header = FrameHeaderBuf::new(Commit::OPCODE);
        header.set_room_id(room_id).set_log_index(log_index).set_server_timestamp_ms(1_000);
        LogEntry { room_id, log_index, frame: Frame::with_payload(header, &payload).unwrap().to_bytes() }
    }

    /// ms since the Unix epoch of the inbox tests (key packages are checked
    /// against the system clock; claims against this one).
    const NOW_MS: u64 = 1_800_000_000_000;

    fn now_unix_secs() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    /// A user of this server (by seed) with one key package: its id, the
    /// package and the package's reference.
    fn user(seed: u8) -> (u64, Vec<u8>, Vec<u8>) {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let package = generate_key_packages(&provider, &identity, 1, now_unix_secs()).unwrap().remove(0);
        (SenderId::from_identity_key(identity.public_key()).0, package.message, package.key_package_ref)
    }

    /// A real Welcome frame of `room_id` adding the members of `packages`.
    fn mls_welcome(room_id: RoomId, packages: &[&[u8]]) -> Vec<u8> {
        let provider = MlsProvider::from_seed([0xee; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let server_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
        let (mut group, _) =
            RoomGroup::create(&provider, &identity, room_id.0, &server_key, now_unix_secs()).unwrap();
        let output = group.add_members(&provider, &identity, packages).unwrap();
        let mls = Bytes::from(output.welcome.unwrap());
        welcome_frame(room_id, &mls, &Bytes::new(), (3, 1_000), &[0; 32]).unwrap().to_vec()
    }

    #[test]
    fn federation_delivered_welcome_must_be_a_welcome_frame_of_its_room() {
        let room = RoomId([4; 16]);
        let (_, package, reference) = user(1);
        let delivered = check_delivered_welcome(room, &[1], mls_welcome(room, &[&package])).unwrap();
        assert_eq!(delivered.key_package_refs, BTreeSet::from([reference]), "the package it is encrypted to");
        let not_mls = check_delivered_welcome(room, &[1], welcome(room, 3).to_vec());
        assert_eq!(not_mls.unwrap_err().code(), "bad_welcome", "the frame carries no MLS Welcome");
        let other_room = check_delivered_welcome(room, &[1], mls_welcome(RoomId([5; 16]), &[&package]));
        assert_eq!(other_room.unwrap_err().code(), "bad_welcome");
        let commit_frame = commit(room, 3).frame.to_vec();
        assert_eq!(check_delivered_welcome(room, &[1], commit_frame).unwrap_err().code(), "bad_welcome");
        assert_eq!(check_delivered_welcome(room, &[1], vec![0; 10]).unwrap_err().code(), "bad_welcome");
        assert!(check_delivered_welcome(room, &[], mls_welcome(room, &[&package])).is_err(), "no recipient");
        let too_many = vec![1; DELIVER_WELCOME_RECIPIENTS_MAX + 1];
        assert!(check_delivered_welcome(room, &too_many, mls_welcome(room, &[&package])).is_err());
        let huge = vec![0; FORWARDED_WELCOME_BYTES_MAX + 1];
        assert!(check_delivered_welcome(room, &[1], huge).is_err());
    }

    fn inbox(store: &Arc<MemoryStore>, now_ms: u64) -> WelcomeInbox {
        WelcomeInbox {
            store: Arc::clone(store) as Arc<dyn Store>,
            rooms: Arc::new(RemoteRooms::default()),
            metrics: Metrics::new().unwrap(),
            arrived: Arc::new(|_| {}),
            clock: Arc::new(move || now_ms),
        }
    }

    fn answer_code(response: LinkResponse) -> String {
        match response {
            LinkResponse::WelcomeStored {} => "stored".to_owned(),
            LinkResponse::Refused { code, .. } => code.as_str().to_owned(),
            other => format!("{other:?}"),
        }
    }

    fn pending(store: &MemoryStore, user_id: u64) -> usize {
        store.pending_welcomes(user_id, None).unwrap().len()
    }

    #[test]
    fn a_peers_welcome_is_held_only_for_recipients_whose_named_package_was_claimed_here() {
        let store = Arc::new(MemoryStore::new());
        let home = inbox(&store, NOW_MS);
        let a = domain("a.test");
        let (bob, bob_package, bob_ref) = user(2);
        let (carol, carol_package, carol_ref) = user(3);
        let made_up = 0xca201;
        let room = RoomId([6; 16]);
        let to_bob = mls_welcome(room, &[&bob_package]);

        // Nothing handed out yet: refused, and the room is not recorded.
        let refused = home.accept(&a, room, vec![bob], to_bob.clone());
        assert_eq!(answer_code(refused), "bad_request");
        assert_eq!(home.rooms.authority_of(room), None, "a refused Welcome takes no slot");
        assert_eq!(pending(&store, bob), 0);

        store.record_handed_out_claims(&[(bob, bob_ref), (carol, carol_ref)], NOW_MS - 1_000).unwrap();
        // Made-up recipients, and carol named on a Welcome to bob's package.
        for recipients in [vec![made_up], vec![carol], vec![made_up, carol]] {
            let answer = home.accept(&a, room, recipients.clone(), to_bob.clone());
            assert_eq!(answer_code(answer), "bad_request", "{recipients:?}");
        }
        assert_eq!(pending(&store, carol), 0);
        assert_eq!(pending(&store, made_up), 0);

        // bob's own: stored for bob alone, the others left out.
        let answer = home.accept(&a, room, vec![made_up, bob, carol], to_bob.clone());
        assert_eq!(answer_code(answer), "stored");
        assert_eq!((pending(&store, bob), pending(&store, carol), pending(&store, made_up)), (1, 0, 0));
        assert_eq!(home.rooms.authority_of(room), Some(a.clone()));
        let page = home.metrics.render().unwrap();
        let unclaimed = format!("{FEDERATION_REFUSALS_TOTAL}{{code=\"unclaimed_recipient\"}} 5");
        assert!(page.contains(&unclaimed), "four refusals and one request with recipients left out:\n{page}");

        // A claim older than the record time no longer admits a Welcome.
        let late = inbox(&store, NOW_MS + HANDED_OUT_CLAIM_RECORD_MS + 1_001);
        let to_carol = mls_welcome(RoomId([7; 16]), &[&carol_package]);
        assert_eq!(
            answer_code(late.accept(&a, RoomId([7; 16]), vec![carol], to_carol.clone())),
            "bad_request"
        );
        assert_eq!(answer_code(home.accept(&a, RoomId([7; 16]), vec![carol], to_carol)), "stored");
    }

    #[test]
    fn federation_routes_only_durable_welcomes_of_its_own_rooms_grouped_by_home() {
        let store = MemoryStore::new();
        let (b, c) = (domain("b.test"), domain("c.test"));
        let (own, pending, remote) = (RoomId([1; 16]), RoomId([2; 16]), RoomId([3; 16]));
        store.append_batch(&[commit(own, 0)]).unwrap();
        store.put_welcomes(own, &[10, 11, 12], welcome(own, 0)).unwrap();
        // Its commit is not durable yet: not routed, kept.
        store.put_welcomes(pending, &[10], welcome(pending, 0)).unwrap();
        // A remote room's Welcome (held here for a local user) is never routed.
        store.put_welcomes(remote, &[10], welcome(remote, 0)).unwrap();
        let rooms = RemoteRooms::new([(remote, c.clone())]);
        let all = |user, home: &DomainName| Target { user, home: home.clone(), room_id: None };
        let users = vec![all(10, &b), all(11, &b), all(12, &c)];
        let forwards = collect(&store, &rooms, users).unwrap();
        let routed: Vec<(RoomId, DomainName, Vec<u64>)> =
            forwards.iter().map(|f| (f.room_id, f.home.clone(), f.recipients.clone())).collect();
        assert_eq!(routed, vec![(own, b.clone(), vec![10, 11]), (own, c.clone(), vec![12])]);
        assert_eq!(forwards[0].welcome, welcome(own, 0), "the frame exactly as stored");
        assert_eq!(store.pending_welcomes(10, None).unwrap().len(), 3, "nothing deleted by looking");
        // A home named for one room's Welcome routes that room's only.
        let other = RoomId([4; 16]);
        store.append_batch(&[commit(other, 0)]).unwrap();
        store.put_welcomes(other, &[13], welcome(other, 0)).unwrap();
        store.put_welcomes(own, &[13], welcome(own, 0)).unwrap();
        let named = vec![Target { user: 13, home: c.clone(), room_id: Some(other) }];
        let forwards = collect(&store, &rooms, named).unwrap();
        let routed: Vec<(RoomId, DomainName, Vec<u64>)> =
            forwards.iter().map(|f| (f.room_id, f.home.clone(), f.recipients.clone())).collect();
        assert_eq!(routed, vec![(other, c, vec![13])]);
    }

    #[test]
    fn federation_welcome_of_a_commit_not_in_the_log_is_forgotten_not_routed() {
        let store = MemoryStore::new();
        let room = RoomId([1; 16]);
        // Index 0 holds another commit (the Welcome's batch failed).
        let mut other = commit(room, 0);
        let mut header = FrameHeaderBuf::new(Commit::OPCODE);
        header.set_room_id(room).set_log_index(0).set_server_timestamp_ms(1_000);
        let payload = Commit { commit: vec![1], welcome: None, welcome_recipients: vec![], group_info: None };
        other.frame = Frame::with_payload(header, &payload).unwrap().to_bytes();
        store.append_batch(&[other]).unwrap();
        store.put_welcomes(room, &[10], welcome(room, 0)).unwrap();
        let target = Target { user: 10, home: domain("b.test"), room_id: None };
        let forwards = collect(&store, &RemoteRooms::default(), vec![target]).unwrap();
        assert!(forwards.is_empty());
        assert!(store.pending_welcomes(10, None).unwrap().is_empty(), "forgotten");
    }
}
