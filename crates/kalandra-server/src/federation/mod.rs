//! Federation: the server's domain identity, the authenticated
//! server-to-server QUIC links to the peer domains the operator configured
//! (`docs/FEDERATION.md`), requests over those links, the key-package
//! directory across domains with home certificates, Welcomes routed to
//! remote users' homes, the relay of clients' frames to the rooms'
//! authorities, and replicas of other domains' rooms.
//!
//! [`handshake`] is the pure state machine of the link handshake and the
//! link messages, [`requests`] the pure request/response layer, [`links`]
//! the per-peer state the admin API and metrics show, [`peers`] the peers'
//! accepted keys (reloadable while running), [`directory`] the
//! remote claim (the home side's answer, the pure check of an answer, and
//! the claiming side), [`registry`] the links that are up, [`rooms`] the
//! rooms other domains order, [`welcomes`] the routing of Welcomes (the
//! room's side) and their storage at the home (the home's),
//! [`recipient_homes`] how a room's authority learns the homes of users a
//! member of another domain invites (kept per room's Welcome in
//! [`named_homes`]), [`relay`] the
//! countersigned relay of clients' frames, [`replica`] the feeds and
//! follows of replicas (over [`follow`], the pure state of a home's follows), [`codes`] the metrics' labels, and [`quic`] the
//! thin driver that runs it all over quinn: the listener and one dialer
//! per peer with an address.

pub mod codes;
pub mod directory;
pub mod follow;
pub mod handshake;
pub mod links;
pub mod named_homes;
pub mod peers;
pub mod quic;
pub mod recipient_homes;
pub mod registry;
pub mod relay;
pub mod replica;
pub mod requests;
pub mod rooms;
pub mod welcomes;

/// Named limits of the server-to-server links.
pub mod limits {
    /// ALPN protocol id of server-to-server links.
    pub const S2S_ALPN: &[u8] = b"kalandra-s2s/1";
    /// Handshakes in progress at once on the listener; more are refused.
    pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 32;
    /// Authenticated links one peer may have dialed at once (a restarted
    /// peer's new link may overlap its old one until that times out).
    pub const INBOUND_LINKS_PER_PEER_MAX: u32 = 4;
    /// Interval of the dialer's keepalive pings.
    pub const PING_INTERVAL_MS: u64 = 2_000;
    /// Silence after which a link is considered lost (no ping or pong).
    pub const LINK_SILENCE_MS_MAX: u64 = 3 * PING_INTERVAL_MS;
    /// QUIC idle timeout of a server-to-server connection.
    pub const IDLE_TIMEOUT_MS: u64 = 10_000;
    /// First wait of the dialer after a failure; it doubles each time.
    pub const BACKOFF_INITIAL_MS: u64 = 250;
    /// Longest wait of the dialer between attempts.
    pub const BACKOFF_MAX_MS: u64 = 30_000;
    /// Longest wait on shutdown for peers to learn that the links closed.
    pub const CLOSE_WAIT_MS: u64 = 1_000;
    /// Bytes a peer may send on a link's stream ahead of it being read.
    pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024;

    const _: () = assert!(INBOUND_LINKS_PER_PEER_MAX >= 2, "a reconnecting peer overlaps its old link");
    const _: () = assert!(BACKOFF_INITIAL_MS < BACKOFF_MAX_MS);
    const _: () = assert!(BACKOFF_MAX_MS <= 30_000, "reconnection waits at most 30 s");
    const _: () = assert!(PING_INTERVAL_MS < LINK_SILENCE_MS_MAX);
    const _: () = assert!(PING_INTERVAL_MS < IDLE_TIMEOUT_MS, "pings keep a link from idling out");
    const _: () = assert!(
        STREAM_RECEIVE_WINDOW_BYTES as usize
            >= 2 * (super::handshake::LINK_MESSAGE_BYTES_MAX + super::handshake::LINK_LENGTH_PREFIX_BYTES)
    );
}

/// The dialer's next wait after `current_ms`: doubled, at most
/// [`limits::BACKOFF_MAX_MS`].
pub fn next_backoff_ms(current_ms: u64) -> u64 {
    current_ms.saturating_mul(2).clamp(limits::BACKOFF_INITIAL_MS, limits::BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federation_backoff_doubles_up_to_thirty_seconds() {
        let mut wait = limits::BACKOFF_INITIAL_MS;
        let mut waits = vec![wait];
        for _ in 0..20 {
            wait = next_backoff_ms(wait);
            waits.push(wait);
        }
        assert_eq!(&waits[..4], &[250, 500, 1_000, 2_000]);
        assert!(waits.iter().all(|wait| *wait <= limits::BACKOFF_MAX_MS));
        assert_eq!(waits.last(), Some(&limits::BACKOFF_MAX_MS));
    }
}
