//! Per-peer link state: which peers are linked, since when, with which key,
//! and the last failure; what `GET /v1/federation` shows and what the
//! federation metrics follow. No I/O: the link driver reports to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kalandra_proto::federation::DomainName;
use serde::{Deserialize, Serialize};

use crate::admin::metrics::Metrics;
use crate::federation::handshake::LinkHandshakeError;
use crate::federation::limits::INBOUND_LINKS_PER_PEER_MAX;

/// A failure, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFailure {
    /// Stable snake_case code (`key_not_accepted`, `timeout`, ...).
    pub code: String,
    /// Human-readable detail.
    pub message: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// One peer's links, as the admin API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLinkView {
    /// The peer's domain.
    pub domain: String,
    /// Where this server dials it; absent: it only accepts the peer's links.
    pub address: Option<String>,
    /// Whether at least one authenticated link is up.
    pub connected: bool,
    /// Since when `connected` has its value, ms since the Unix epoch (the
    /// server's start if it never changed).
    pub since_ms: u64,
    /// Whether the link this server dialed is up.
    pub dialed_up: bool,
    /// Authenticated links the peer dialed that are open.
    pub inbound_links: u32,
    /// The federation key the peer last proved, 64 hex digits.
    pub proven_key: Option<String>,
    /// Keepalives exchanged over its links.
    pub keepalives: u64,
    /// The last failure of a link or handshake with it.
    pub last_error: Option<LinkFailure>,
    /// Whether the operator refuses the domain (`refused = true`): never
    /// dialed, its links refused, its users' key packages never claimed.
    #[serde(default)]
    pub refused: bool,
    /// Rooms shared with the peer: replica feeds and replicas.
    #[serde(default)]
    pub rooms: PeerRoomsView,
}

/// What flows between this server and one peer for shared rooms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoomsView {
    /// Frames this server (the rooms' authority) holds for the peer's
    /// replica feed and has not sent yet, as of the feed's last batch.
    pub feed_queued_frames: u64,
    /// Age of the newest frame this server's replicas took from the peer
    /// (local clock minus the peer's timestamp), as it was taken, ms.
    pub replica_lag_ms: u64,
    /// Replicas here of rooms the peer orders that are catching up.
    pub replicas_catching_up: u64,
    /// Replicas that are live (this server's members read them).
    pub replicas_live: u64,
    /// Replicas the peer refused to feed, or whose signed head did not hold.
    pub replicas_refused: u64,
    /// Relayed and replicated frames of or for the peer refused or
    /// dropped, by code (codes never counted are left out).
    pub refusals: BTreeMap<String, u64>,
}

/// `GET /v1/federation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationView {
    /// This server's domain.
    pub domain: String,
    /// This server's federation public key, 64 hex digits.
    pub public_key: String,
    /// Address of the server-to-server listener; absent: federation is off.
    pub listen: Option<String>,
    /// The configured peers, in domain order.
    pub peers: Vec<PeerLinkView>,
}

#[derive(Debug, Clone)]
struct PeerLink {
    address: Option<String>,
    dialed_up: bool,
    inbound: u32,
    since_ms: u64,
    proven_key: Option<[u8; 32]>,
    keepalives: u64,
    last_error: Option<LinkFailure>,
    refused: bool,
}

impl PeerLink {
    fn connected(&self) -> bool {
        self.dialed_up || self.inbound > 0
    }
}

#[derive(Debug)]
struct Registry {
    domain: DomainName,
    public_key: [u8; 32],
    listen: Option<String>,
    peers: BTreeMap<DomainName, PeerLink>,
}

/// The shared per-peer link state; cheap to clone.
#[derive(Debug, Clone)]
pub struct FederationLinks {
    registry: Arc<Mutex<Registry>>,
    metrics: Metrics,
}

impl FederationLinks {
    /// State for `domain` (whose federation key is `public_key`) and its
    /// configured peers (domain and dial address), none linked, at `now_ms`.
    pub fn new(
        domain: DomainName,
        public_key: [u8; 32],
        peers: impl IntoIterator<Item = (DomainName, Option<String>)>,
        metrics: Metrics,
        now_ms: u64,
    ) -> FederationLinks {
        let peers: BTreeMap<DomainName, PeerLink> = peers
            .into_iter()
            .map(|(domain, address)| {
                let link = PeerLink {
                    address,
                    dialed_up: false,
                    inbound: 0,
                    since_ms: now_ms,
                    proven_key: None,
                    keepalives: 0,
                    last_error: None,
                    refused: false,
                };
                (domain, link)
            })
            .collect();
        metrics.set_federation_peers(peers.keys().map(DomainName::to_string).collect());
        let registry = Registry { domain, public_key, listen: None, peers };
        FederationLinks { registry: Arc::new(Mutex::new(registry)), metrics }
    }

    /// Lists `refused` as refused peers, at `now_ms`: shown, never linked.
    pub fn set_refused(&self, refused: impl IntoIterator<Item = DomainName>, now_ms: u64) {
        self.with(|registry| {
            for domain in refused {
                let link = PeerLink {
                    address: None,
                    dialed_up: false,
                    inbound: 0,
                    since_ms: now_ms,
                    proven_key: None,
                    keepalives: 0,
                    last_error: None,
                    refused: true,
                };
                registry.peers.insert(domain, link);
            }
        });
    }

    /// Records the listener's address.
    pub fn set_listen(&self, address: std::net::SocketAddr) {
        self.with(|registry| registry.listen = Some(address.to_string()));
    }

    fn with<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> T {
        // The registry holds plain values: a panic elsewhere leaves it usable.
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut registry)
    }

    /// Applies `change` to `peer`'s state and follows `connected` (its
    /// `since_ms`, the metric).
    fn change_peer(&self, peer: &DomainName, now_ms: u64, change: impl FnOnce(&mut PeerLink)) {
        let up = self.with(|registry| {
            let link = registry.peers.get_mut(peer)?;
            let before = link.connected();
            change(link);
            let after = link.connected();
            if before != after {
                link.since_ms = now_ms;
            }
            Some(after)
        });
        if let Some(up) = up {
            self.metrics.federation_link_up(peer.as_str(), up);
        }
    }

    /// The link this server dialed to `peer` is up, `key` proven.
    pub fn dialed_up(&self, peer: &DomainName, key: [u8; 32], now_ms: u64) {
        self.change_peer(peer, now_ms, |link| {
            link.dialed_up = true;
            link.proven_key = Some(key);
        });
    }

    /// The link this server dialed to `peer` is down, for `reason`.
    pub fn dialed_down(&self, peer: &DomainName, reason: &LinkHandshakeError, now_ms: u64) {
        self.change_peer(peer, now_ms, |link| {
            link.dialed_up = false;
            link.last_error = Some(failure(reason, now_ms));
        });
    }

    /// A link `peer` dialed is authenticated with `key`: counted, unless
    /// the peer holds [`INBOUND_LINKS_PER_PEER_MAX`] already.
    pub fn inbound_opened(
        &self,
        peer: &DomainName,
        key: [u8; 32],
        now_ms: u64,
    ) -> Result<(), LinkHandshakeError> {
        let mut refused = None;
        self.change_peer(peer, now_ms, |link| {
            if link.inbound >= INBOUND_LINKS_PER_PEER_MAX {
                refused = Some(link.inbound);
            } else {
                link.inbound += 1;
                link.proven_key = Some(key);
            }
        });
        match refused {
            Some(links) => Err(LinkHandshakeError::TooManyLinks { domain: peer.clone(), links }),
            None => Ok(()),
        }
    }

    /// A link `peer` dialed closed, for `reason`.
    pub fn inbound_closed(&self, peer: &DomainName, reason: &LinkHandshakeError, now_ms: u64) {
        self.change_peer(peer, now_ms, |link| {
            link.inbound = link.inbound.saturating_sub(1);
            link.last_error = Some(failure(reason, now_ms));
        });
    }

    /// A handshake failed: counted by code, and noted on its peer if known.
    pub fn handshake_failed(&self, error: &LinkHandshakeError, now_ms: u64) {
        self.metrics.federation_handshake_failed(error.code());
        if let Some(peer) = error.peer() {
            self.change_peer(peer, now_ms, |link| link.last_error = Some(failure(error, now_ms)));
        }
    }

    /// A keepalive was exchanged with `peer`.
    pub fn keepalive(&self, peer: &DomainName) {
        self.with(|registry| {
            if let Some(link) = registry.peers.get_mut(peer) {
                link.keepalives += 1;
            }
        });
    }

    /// Everything, for the admin API.
    pub fn view(&self) -> FederationView {
        self.with(|registry| FederationView {
            domain: registry.domain.to_string(),
            public_key: hex::encode(registry.public_key),
            listen: registry.listen.clone(),
            peers: registry
                .peers
                .iter()
                .map(|(domain, link)| PeerLinkView {
                    domain: domain.to_string(),
                    address: link.address.clone(),
                    connected: link.connected(),
                    since_ms: link.since_ms,
                    dialed_up: link.dialed_up,
                    inbound_links: link.inbound,
                    proven_key: link.proven_key.map(hex::encode),
                    keepalives: link.keepalives,
                    last_error: link.last_error.clone(),
                    refused: link.refused,
                    rooms: self.rooms_view(domain),
                })
                .collect(),
        })
    }

    fn rooms_view(&self, peer: &DomainName) -> PeerRoomsView {
        let Some(numbers) = self.metrics.peer_numbers(peer.as_str()) else { return PeerRoomsView::default() };
        let [replicas_catching_up, replicas_live, replicas_refused] = numbers.replicas;
        PeerRoomsView {
            feed_queued_frames: numbers.feed_queued_frames,
            replica_lag_ms: numbers.replica_lag_ms,
            replicas_catching_up,
            replicas_live,
            replicas_refused,
            refusals: numbers.refusals.into_iter().map(|(code, count)| (code.to_owned(), count)).collect(),
        }
    }
}

fn failure(error: &LinkHandshakeError, at_ms: u64) -> LinkFailure {
    LinkFailure { code: error.code().to_owned(), message: error.to_string(), at_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    #[test]
    fn federation_link_state_follows_the_links_of_each_peer() {
        let metrics = Metrics::new().unwrap();
        let b = domain("b.test");
        let links = FederationLinks::new(
            domain("a.test"),
            [1; 32],
            [(b.clone(), Some("b.test:4434".to_owned())), (domain("c.test"), None)],
            metrics.clone(),
            10,
        );
        assert!(metrics.render().unwrap().contains("kalandra_federation_link_up{peer=\"b.test\"} 0\n"));
        links.dialed_up(&b, [2; 32], 20);
        links.inbound_opened(&b, [2; 32], 30).unwrap();
        let view = links.view();
        assert_eq!(view.public_key, hex::encode([1; 32]));
        let peer = &view.peers[0];
        assert!(peer.connected && peer.dialed_up);
        assert_eq!((peer.since_ms, peer.inbound_links), (20, 1));
        assert!(metrics.render().unwrap().contains("kalandra_federation_link_up{peer=\"b.test\"} 1\n"));
        links.dialed_down(&b, &LinkHandshakeError::Transport("lost".into()), 40);
        links.inbound_closed(&b, &LinkHandshakeError::Timeout { timeout_ms: 1 }, 50);
        let peer = &links.view().peers[0];
        assert!(!peer.connected);
        assert_eq!(peer.since_ms, 50);
        assert_eq!(peer.last_error.as_ref().map(|e| e.code.as_str()), Some("timeout"));
        for _ in 0..INBOUND_LINKS_PER_PEER_MAX {
            links.inbound_opened(&b, [2; 32], 60).unwrap();
        }
        assert_eq!(links.inbound_opened(&b, [2; 32], 60).unwrap_err().code(), "too_many_links");
        links.handshake_failed(&LinkHandshakeError::KeyNotAccepted { domain: domain("c.test") }, 70);
        assert_eq!(links.view().peers[1].last_error.as_ref().map(|e| e.at_ms), Some(70));
        let page = metrics.render().unwrap();
        assert!(
            page.contains("kalandra_federation_handshake_failures_total{code=\"key_not_accepted\"} 1\n"),
            "{page}"
        );
    }
}
