//! The links that are up, by peer: requests sent over the newest one and
//! their answers awaited with a timeout, messages queued without waiting,
//! and the news of each link that comes up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kalandra_proto::federation::DomainName;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::federation::handshake::{encode_established, LinkMessage};
use crate::federation::requests::{
    LinkRequest, LinkRequestError, LinkResponse, PendingRequests, LINK_REQUESTS_IN_FLIGHT_MAX,
    LINK_REQUEST_TIMEOUT_MS,
};

/// Messages queued for one link's writer: every request in flight, as
/// many answers and a few pings and pongs.
pub const LINK_OUTGOING_MESSAGES_MAX: usize = 2 * LINK_REQUESTS_IN_FLIGHT_MAX + 4;

const _: () = assert!(LINK_OUTGOING_MESSAGES_MAX > 2 * LINK_REQUESTS_IN_FLIGHT_MAX);

/// The requests a link awaits answers to.
pub type Pending = Arc<Mutex<PendingRequests<oneshot::Sender<LinkResponse>>>>;

/// What a request needs of one link that is up.
#[derive(Clone)]
pub struct LinkHandle {
    link_id: u64,
    outgoing: mpsc::Sender<Vec<u8>>,
    pending: Pending,
}

/// Links coming up that a slow subscriber may lag behind by; it then
/// sees them as one lag (and acts as for every peer).
pub const LINK_UP_EVENTS_MAX: usize = 64;

/// The links that are up, by peer.
pub struct LinkRegistry {
    links: Mutex<BTreeMap<DomainName, Vec<LinkHandle>>>,
    next_link_id: AtomicU64,
    /// The peer of each link that comes up.
    up: broadcast::Sender<DomainName>,
}

impl Default for LinkRegistry {
    fn default() -> Self {
        let (up, _) = broadcast::channel(LINK_UP_EVENTS_MAX);
        LinkRegistry { links: Mutex::default(), next_link_id: AtomicU64::new(0), up }
    }
}

impl LinkRegistry {
    /// Registers a link with `peer` that is up; returns its id (for
    /// [`LinkRegistry::remove`]).
    pub fn add(&self, peer: &DomainName, outgoing: mpsc::Sender<Vec<u8>>, pending: Pending) -> u64 {
        let link_id = self.next_link_id.fetch_add(1, Ordering::Relaxed);
        let handle = LinkHandle { link_id, outgoing, pending };
        self.lock().entry(peer.clone()).or_default().push(handle);
        // Nobody may be listening: nothing to tell then.
        let _ = self.up.send(peer.clone());
        link_id
    }

    /// The peers of links as they come up, from now on.
    pub fn subscribe_links_up(&self) -> broadcast::Receiver<DomainName> {
        self.up.subscribe()
    }

    /// Forgets a link that went down; its waiting requests see it down.
    pub fn remove(&self, peer: &DomainName, link_id: u64) {
        let mut links = self.lock();
        if let Some(handles) = links.get_mut(peer) {
            handles.retain(|handle| handle.link_id != link_id);
            if handles.is_empty() {
                links.remove(peer);
            }
        }
    }

    /// Whether a link with `peer` is up.
    pub fn is_up(&self, peer: &DomainName) -> bool {
        self.lock().get(peer).is_some_and(|handles| !handles.is_empty())
    }

    /// Queues an encoded message on the newest link with `peer` that is up,
    /// without waiting: `Err(LinkDown)` when there is none, `Err(Busy)`
    /// when its queue is full.
    pub fn try_send(&self, peer: &DomainName, message: Vec<u8>) -> Result<(), LinkRequestError> {
        let down = || LinkRequestError::LinkDown { domain: peer.to_string() };
        let handle = self.lock().get(peer).and_then(|handles| handles.last().cloned()).ok_or_else(down)?;
        handle.outgoing.try_send(message).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => LinkRequestError::Busy { domain: peer.to_string() },
            mpsc::error::TrySendError::Closed(_) => down(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<DomainName, Vec<LinkHandle>>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` over the newest link with `peer` that is up and
    /// waits for its answer, at most [`LINK_REQUEST_TIMEOUT_MS`].
    pub async fn request(
        &self,
        peer: &DomainName,
        request: LinkRequest,
    ) -> Result<LinkResponse, LinkRequestError> {
        let down = || LinkRequestError::LinkDown { domain: peer.to_string() };
        let handle = self.lock().get(peer).and_then(|handles| handles.last().cloned()).ok_or_else(down)?;
        let (answer, answered) = oneshot::channel();
        let id = lock_pending(&handle.pending)
            .begin(answer)
            .ok_or_else(|| LinkRequestError::TooManyInFlight { domain: peer.to_string() })?;
        let give_up = |error: LinkRequestError| {
            lock_pending(&handle.pending).finish(id);
            error
        };
        let message = LinkMessage::Request { id, request };
        let bytes = encode_established(&message)
            .map_err(|len_bytes| give_up(LinkRequestError::TooLarge { len_bytes }))?;
        if handle.outgoing.send(bytes).await.is_err() {
            return Err(give_up(down()));
        }
        match tokio::time::timeout(Duration::from_millis(LINK_REQUEST_TIMEOUT_MS), answered).await {
            Ok(Ok(response)) => Ok(response),
            // The link went down and dropped the waiter.
            Ok(Err(_)) => Err(down()),
            Err(_) => Err(give_up(LinkRequestError::Timeout { domain: peer.to_string() })),
        }
    }
}

/// The pending table, also after a panic elsewhere (its entries stay whole).
pub fn lock_pending(
    pending: &Pending,
) -> std::sync::MutexGuard<'_, PendingRequests<oneshot::Sender<LinkResponse>>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}
