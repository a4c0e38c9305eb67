//! The link handshake between two domains' servers, without I/O: the
//! messages, their length-prefixed CBOR encoding, and the state machine
//! each end runs over them.
//!
//! On one bidirectional stream the initiator (the end that dialed) sends
//! its `Hello`; the responder answers with its own `Hello` and its `Proof`;
//! the initiator checks that proof and sends its own; the responder checks
//! it and answers `Accepted`. Proofs are `kalandra_proto::federation` link
//! proofs, bound to both hellos, the prover's role and the TLS exporter of
//! the connection. Afterwards messages have a 4-byte length, and the stream
//! carries `Ping`/`Pong` and `Request`/`Response`
//! ([`super::requests`]) only.

pub use crate::federation::codes::LINK_FAILURE_CODES;
use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{
    sign_link_proof, verify_link_proof, DomainName, LinkError, LinkHello, LinkRole, PeerKeys, RelayEnvelope,
    DOMAIN_NAME_BYTES_MAX, LINK_NONCE_BYTES, LINK_TLS_BINDING_BYTES,
};
use kalandra_proto::limits::{PUBLIC_KEY_BYTES, SIGNATURE_BYTES};
use serde::{Deserialize, Serialize};

use crate::federation::requests::{
    LinkRequest, LinkResponse, LINK_ESTABLISHED_LENGTH_PREFIX_BYTES, LINK_ESTABLISHED_MESSAGE_BYTES_MAX,
};

/// Largest link message, bytes (without its length prefix).
pub const LINK_MESSAGE_BYTES_MAX: usize = 1024;

const _: () = assert!(LINK_ESTABLISHED_MESSAGE_BYTES_MAX >= LINK_MESSAGE_BYTES_MAX);
/// Bytes of the big-endian length before each link message.
pub const LINK_LENGTH_PREFIX_BYTES: usize = 2;
/// CBOR framing allowed around a hello's fields (map, keys, headers).
const HELLO_CBOR_OVERHEAD_BYTES_MAX: usize = 128;

const _: () = assert!(LINK_MESSAGE_BYTES_MAX <= u16::MAX as usize, "the length prefix is two bytes");
const _: () = assert!(
    LINK_MESSAGE_BYTES_MAX
        >= DOMAIN_NAME_BYTES_MAX + PUBLIC_KEY_BYTES + LINK_NONCE_BYTES + HELLO_CBOR_OVERHEAD_BYTES_MAX,
    "a hello with the longest domain name fits"
);

/// The peers a server accepts links from: each domain with its keys.
pub type PeerTable = BTreeMap<DomainName, PeerKeys>;

/// The domains an operator refuses (`refused = true`): never linked,
/// never dialed, their users' key packages never claimed.
pub type RefusedDomains = BTreeSet<DomainName>;

/// A role as link messages carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireRole {
    /// The end that dialed.
    Initiator,
    /// The end that accepted.
    Responder,
}

impl std::fmt::Display for WireRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireRole::Initiator => "initiator",
            WireRole::Responder => "responder",
        })
    }
}

/// One record of a room's erasure journal, as a link carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// Its position in the journal (1 for the room's first erasure).
    pub seq: u64,
    /// The entries erased.
    pub log_indices: Vec<u64>,
}

/// Users of one home domain among a relayed commit's Welcome recipients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientHomes {
    /// Their home.
    pub home: DomainName,
    /// Their sender ids.
    pub users: Vec<u64>,
}

/// What travels on a link's stream.
// Each message is decoded, matched and consumed at once; `Relay`, the
// largest, is also the most frequent, and boxing its envelope would add an
// allocation to every relayed frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMessage {
    /// The sender's domain, key and nonce.
    Hello {
        /// The sender's role.
        role: WireRole,
        /// Its hello.
        hello: LinkHello,
    },
    /// The sender's link proof.
    Proof {
        /// The sender's role.
        role: WireRole,
        /// The signature ([`SIGNATURE_BYTES`]).
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// The responder accepts the link.
    Accepted,
    /// Keepalive from the initiator.
    Ping {
        /// Echoed in the `Pong`.
        sequence: u64,
    },
    /// Answer to a `Ping`.
    Pong {
        /// The `Ping`'s.
        sequence: u64,
    },
    /// A request on an established link, from either end.
    Request {
        /// Chosen by the sender, repeated in the `Response`.
        id: u64,
        /// What is asked.
        request: LinkRequest,
    },
    /// The answer to the `Request` with the same id.
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        response: LinkResponse,
    },
    /// A client's frame, relayed by its home server (the sender of this
    /// message) to the room's authority (see the relay module).
    Relay {
        /// The client's connection at its home server.
        connection: u64,
        /// The countersigned frame.
        envelope: RelayEnvelope,
        /// With a commit whose Welcome goes to users the authority may not
        /// know: their homes as the relaying domain knows them (its own
        /// users, and those it claimed through their home). The relaying
        /// domain's word, noted by the authority only once the commit is
        /// accepted and only for users whose home it does not know.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        recipient_homes: Vec<RecipientHomes>,
    },
    /// Frames for a relayed connection, authority to home, in order:
    /// answers, fan-out, history, notices.
    Deliver {
        /// The client's connection at its home server.
        connection: u64,
        /// Whole frames.
        frames: Vec<serde_bytes::ByteBuf>,
    },
    /// Home to authority: send the frames of this room from this index on,
    /// then live, once for all of the home's members (see the replica module).
    Follow {
        /// The room.
        room_id: [u8; 16],
        /// First index wanted.
        from_log_index: u64,
        /// How far the home applied the room's erasure journal: the
        /// authority answers with the erasures after it (`Erasures`).
        #[serde(default)]
        erasures_after: u64,
    },
    /// Authority to home, answering a `Follow` (read once its feed subscribed): one page
    /// of the room's erasure journal after the follow's `erasures_after`,
    /// so that the home's replica erases what was erased while it did not
    /// follow.
    Erasures {
        /// The room.
        room_id: [u8; 16],
        /// The follow's first index: entries from there on come with the
        /// follow, erased ones as their placeholders.
        from_log_index: u64,
        /// Journal records, in order.
        erasures: Vec<ErasureRecord>,
    },
    /// Authority to home: frames of followed rooms, in each room's order,
    /// and the notices of the follow (`SyncDone`, `Error`).
    Replicate {
        /// Whole frames.
        frames: Vec<serde_bytes::ByteBuf>,
    },
    /// A relayed connection's client left (home to authority).
    RelayClosed {
        /// The client's connection at its home server.
        connection: u64,
    },
    /// The authority ended a relayed connection (authority to home): the
    /// client must read again.
    RelayDropped {
        /// The client's connection at its home server.
        connection: u64,
    },
}

impl LinkMessage {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            LinkMessage::Hello { .. } => "hello",
            LinkMessage::Proof { .. } => "proof",
            LinkMessage::Accepted => "accepted",
            LinkMessage::Ping { .. } => "ping",
            LinkMessage::Pong { .. } => "pong",
            LinkMessage::Request { .. } => "request",
            LinkMessage::Response { .. } => "response",
            LinkMessage::Relay { .. } => "relay",
            LinkMessage::Deliver { .. } => "deliver",
            LinkMessage::Follow { .. } => "follow",
            LinkMessage::Erasures { .. } => "erasures",
            LinkMessage::Replicate { .. } => "replicate",
            LinkMessage::RelayClosed { .. } => "relay_closed",
            LinkMessage::RelayDropped { .. } => "relay_dropped",
        }
    }
}

/// Why a link handshake failed, or an established link was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkHandshakeError {
    /// The peer names a domain that is not configured as a peer.
    #[error("{domain} is not a configured peer")]
    UnknownDomain {
        /// The domain it names.
        domain: DomainName,
    },
    /// The peer names a domain this server's operator refuses.
    #[error("{domain} is refused by this server's operator")]
    RefusedDomain {
        /// The domain it names.
        domain: DomainName,
    },
    /// The dialed peer names another domain than the one dialed.
    #[error("expected domain {expected}, the peer says {claimed}")]
    WrongDomain {
        /// The domain dialed.
        expected: DomainName,
        /// The domain claimed.
        claimed: DomainName,
    },
    /// The peer's key is not (or no longer: past its overlap) accepted for its domain.
    #[error("key not accepted for {domain} at this time")]
    KeyNotAccepted {
        /// The peer.
        domain: DomainName,
    },
    /// The peer sent back this server's own nonce, key or proof.
    #[error("the peer reflected this server's own hello or proof")]
    Reflected,
    /// A message from the wrong end (the peer speaking as this server's role).
    #[error("a message of the {got} where the {expected} speaks")]
    WrongRole {
        /// The peer's role.
        expected: WireRole,
        /// The role the message carries.
        got: WireRole,
    },
    /// The peer's link proof does not verify under its key.
    #[error("link proof of {domain} does not verify")]
    BadSignature {
        /// The peer.
        domain: DomainName,
    },
    /// A message out of turn.
    #[error("{message} message out of turn")]
    UnexpectedMessage {
        /// Its name.
        message: &'static str,
    },
    /// Bytes that are not a link message.
    #[error("malformed link message: {0}")]
    Malformed(String),
    /// A length prefix above the limit ([`LINK_MESSAGE_BYTES_MAX`] in the handshake).
    #[error("link message of {len_bytes} bytes, over the limit")]
    MessageTooLarge {
        /// The announced length.
        len_bytes: usize,
    },
    /// The handshake did not complete in time.
    #[error("handshake not completed within {timeout_ms} ms")]
    Timeout {
        /// The limit.
        timeout_ms: u64,
    },
    /// The peer already holds as many links as a peer may.
    #[error("{domain} already has {links} links open")]
    TooManyLinks {
        /// The peer.
        domain: DomainName,
        /// Its open links.
        links: u32,
    },
    /// Too many handshakes in progress at once.
    #[error("too many link handshakes in progress")]
    TooManyHandshakes,
    /// The peer closed the connection with a refusal.
    #[error("refused by the peer: {code}")]
    RefusedByPeer {
        /// The peer's reason.
        code: String,
    },
    /// The connection failed (unreachable, closed, reset).
    #[error("connection: {0}")]
    Transport(String),
}

impl LinkHandshakeError {
    /// A stable snake_case name, one of [`LINK_FAILURE_CODES`].
    pub fn code(&self) -> &'static str {
        match self {
            LinkHandshakeError::UnknownDomain { .. } => "unknown_domain",
            LinkHandshakeError::RefusedDomain { .. } => "refused_domain",
            LinkHandshakeError::WrongDomain { .. } => "wrong_domain",
            LinkHandshakeError::KeyNotAccepted { .. } => "key_not_accepted",
            LinkHandshakeError::Reflected => "reflected",
            LinkHandshakeError::WrongRole { .. } => "wrong_role",
            LinkHandshakeError::BadSignature { .. } => "bad_signature",
            LinkHandshakeError::UnexpectedMessage { .. } => "unexpected_message",
            LinkHandshakeError::Malformed(_) => "malformed",
            LinkHandshakeError::MessageTooLarge { .. } => "message_too_large",
            LinkHandshakeError::Timeout { .. } => "timeout",
            LinkHandshakeError::TooManyLinks { .. } => "too_many_links",
            LinkHandshakeError::TooManyHandshakes => "too_many_handshakes",
            LinkHandshakeError::RefusedByPeer { .. } => "refused_by_peer",
            LinkHandshakeError::Transport(_) => "transport",
        }
    }

    /// The configured peer the failure concerns, when known.
    pub fn peer(&self) -> Option<&DomainName> {
        match self {
            LinkHandshakeError::WrongDomain { expected: domain, .. }
            | LinkHandshakeError::RefusedDomain { domain }
            | LinkHandshakeError::KeyNotAccepted { domain }
            | LinkHandshakeError::BadSignature { domain }
            | LinkHandshakeError::TooManyLinks { domain, .. } => Some(domain),
            _ => None,
        }
    }
}

/// `message` with its length prefix.
pub fn encode(message: &LinkMessage) -> Vec<u8> {
    let mut body = Vec::with_capacity(LINK_MESSAGE_BYTES_MAX);
    // Writing CBOR into a Vec fails only on allocation failure.
    let _ = ciborium::into_writer(message, &mut body);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(LINK_LENGTH_PREFIX_BYTES + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a prefix announces, if within [`LINK_MESSAGE_BYTES_MAX`].
pub fn body_len(prefix: [u8; LINK_LENGTH_PREFIX_BYTES]) -> Result<usize, LinkHandshakeError> {
    let len_bytes = usize::from(u16::from_be_bytes(prefix));
    if len_bytes > LINK_MESSAGE_BYTES_MAX {
        return Err(LinkHandshakeError::MessageTooLarge { len_bytes });
    }
    if len_bytes == 0 {
        return Err(LinkHandshakeError::Malformed("empty message".to_owned()));
    }
    Ok(len_bytes)
}

/// Decodes a message body (what follows the prefix): exactly one message.
pub fn decode(body: &[u8]) -> Result<LinkMessage, LinkHandshakeError> {
    let mut reader = std::io::Cursor::new(body);
    let message = ciborium::from_reader(&mut reader)
        .map_err(|error| LinkHandshakeError::Malformed(error.to_string()))?;
    if usize::try_from(reader.position()).ok() != Some(body.len()) {
        return Err(LinkHandshakeError::Malformed("bytes follow the message".to_owned()));
    }
    Ok(message)
}

/// `message` with the 4-byte length prefix of an established link, or
/// its length when that exceeds [`LINK_ESTABLISHED_MESSAGE_BYTES_MAX`].
pub fn encode_established(message: &LinkMessage) -> Result<Vec<u8>, usize> {
    let mut out = vec![0u8; LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
    // Writing CBOR into a Vec fails only on allocation failure.
    let _ = ciborium::into_writer(message, &mut out);
    let len_bytes = out.len() - LINK_ESTABLISHED_LENGTH_PREFIX_BYTES;
    let len = u32::try_from(len_bytes).ok().filter(|_| len_bytes <= LINK_ESTABLISHED_MESSAGE_BYTES_MAX);
    let len = len.ok_or(len_bytes)?;
    out[..LINK_ESTABLISHED_LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// The body length an established link's prefix announces, if within
/// [`LINK_ESTABLISHED_MESSAGE_BYTES_MAX`].
pub fn established_body_len(
    prefix: [u8; LINK_ESTABLISHED_LENGTH_PREFIX_BYTES],
) -> Result<usize, LinkHandshakeError> {
    let len_bytes = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len_bytes > LINK_ESTABLISHED_MESSAGE_BYTES_MAX {
        return Err(LinkHandshakeError::MessageTooLarge { len_bytes });
    }
    if len_bytes == 0 {
        return Err(LinkHandshakeError::Malformed("empty message".to_owned()));
    }
    Ok(len_bytes)
}

/// Decodes a message body of an established link: exactly one message,
/// and none of the handshake's.
pub fn decode_established(body: &[u8]) -> Result<LinkMessage, LinkHandshakeError> {
    let message = decode(body)?;
    match message {
        LinkMessage::Hello { .. } | LinkMessage::Proof { .. } | LinkMessage::Accepted => {
            Err(LinkHandshakeError::UnexpectedMessage { message: message.name() })
        }
        _ => Ok(message),
    }
}

/// What a handshake step asks of its driver.
#[derive(Debug)]
pub enum Step {
    /// Send these messages (possibly none) and read the next.
    Send(Vec<LinkMessage>),
    /// Send these messages: the link is up.
    Established(Established),
}

/// An authenticated link's peer.
#[derive(Debug)]
pub struct Established {
    /// Its domain.
    pub peer: DomainName,
    /// The key it proved.
    pub key: [u8; PUBLIC_KEY_BYTES],
    /// Messages still to send.
    pub send: Vec<LinkMessage>,
}

enum State {
    AwaitHello,
    AwaitProof { peer: PeerKeys, hello: LinkHello, our_proof: Option<[u8; SIGNATURE_BYTES]> },
    AwaitAccepted { peer: DomainName, key: [u8; PUBLIC_KEY_BYTES] },
    Done,
}

/// One end's handshake.
pub struct LinkHandshake {
    role: LinkRole,
    key: SigningKey,
    ours: LinkHello,
    tls_binding: [u8; LINK_TLS_BINDING_BYTES],
    /// The initiator's: the domain it dialed.
    dialed: Option<DomainName>,
    /// Domains refused whatever their keys.
    refused: RefusedDomains,
    state: State,
}

impl LinkHandshake {
    /// The dialing end, towards `dialed`; returns the hello to send first.
    pub fn initiator(
        key: SigningKey,
        domain: DomainName,
        nonce: [u8; LINK_NONCE_BYTES],
        tls_binding: [u8; LINK_TLS_BINDING_BYTES],
        dialed: DomainName,
    ) -> (LinkHandshake, LinkMessage) {
        let handshake =
            LinkHandshake::new(LinkRole::Initiator, key, domain, nonce, tls_binding, Some(dialed));
        let hello = LinkMessage::Hello { role: WireRole::Initiator, hello: handshake.ours.clone() };
        (handshake, hello)
    }

    /// The accepting end.
    pub fn responder(
        key: SigningKey,
        domain: DomainName,
        nonce: [u8; LINK_NONCE_BYTES],
        tls_binding: [u8; LINK_TLS_BINDING_BYTES],
    ) -> LinkHandshake {
        LinkHandshake::new(LinkRole::Responder, key, domain, nonce, tls_binding, None)
    }

    fn new(
        role: LinkRole,
        key: SigningKey,
        domain: DomainName,
        nonce: [u8; LINK_NONCE_BYTES],
        tls_binding: [u8; LINK_TLS_BINDING_BYTES],
        dialed: Option<DomainName>,
    ) -> LinkHandshake {
        let ours = LinkHello { domain, federation_key: key.verifying_key().to_bytes(), nonce };
        let refused = RefusedDomains::new();
        LinkHandshake { role, key, ours, tls_binding, dialed, refused, state: State::AwaitHello }
    }

    /// Refuses a peer naming any of `refused`, before its keys are looked at.
    pub fn refusing(&mut self, refused: &RefusedDomains) {
        self.refused.clone_from(refused);
    }

    fn peer_role(&self) -> WireRole {
        match self.role {
            LinkRole::Initiator => WireRole::Responder,
            LinkRole::Responder => WireRole::Initiator,
        }
    }

    /// Takes the peer's next message, checked against `peers` at `now_ms`.
    pub fn receive(
        &mut self,
        message: LinkMessage,
        peers: &PeerTable,
        now_ms: u64,
    ) -> Result<Step, LinkHandshakeError> {
        if let LinkMessage::Hello { role, .. } | LinkMessage::Proof { role, .. } = &message {
            if *role != self.peer_role() {
                return Err(LinkHandshakeError::WrongRole { expected: self.peer_role(), got: *role });
            }
        }
        match (std::mem::replace(&mut self.state, State::Done), message) {
            (State::AwaitHello, LinkMessage::Hello { hello, .. }) => self.on_hello(hello, peers, now_ms),
            (State::AwaitProof { peer, hello, our_proof }, LinkMessage::Proof { proof, .. }) => {
                self.on_proof(&peer, &hello, our_proof, &proof, now_ms)
            }
            (State::AwaitAccepted { peer, key }, LinkMessage::Accepted) => {
                Ok(Step::Established(Established { peer, key, send: Vec::new() }))
            }
            (_, message) => Err(LinkHandshakeError::UnexpectedMessage { message: message.name() }),
        }
    }

    fn on_hello(
        &mut self,
        hello: LinkHello,
        peers: &PeerTable,
        now_ms: u64,
    ) -> Result<Step, LinkHandshakeError> {
        if hello.nonce == self.ours.nonce || hello.federation_key == self.ours.federation_key {
            return Err(LinkHandshakeError::Reflected);
        }
        if let Some(dialed) = self.dialed.as_ref().filter(|dialed| **dialed != hello.domain) {
            return Err(LinkHandshakeError::WrongDomain { expected: dialed.clone(), claimed: hello.domain });
        }
        if self.refused.contains(&hello.domain) {
            return Err(LinkHandshakeError::RefusedDomain { domain: hello.domain });
        }
        let peer = peers
            .get(&hello.domain)
            .ok_or_else(|| LinkHandshakeError::UnknownDomain { domain: hello.domain.clone() })?;
        if peer.accept(&hello.federation_key, now_ms).is_none() {
            return Err(LinkHandshakeError::KeyNotAccepted { domain: hello.domain });
        }
        let peer = peer.clone();
        match self.role {
            LinkRole::Initiator => {
                self.state = State::AwaitProof { peer, hello, our_proof: None };
                Ok(Step::Send(Vec::new()))
            }
            LinkRole::Responder => {
                let proof = self.sign(&hello);
                let ours = LinkMessage::Hello { role: WireRole::Responder, hello: self.ours.clone() };
                let proof_message = LinkMessage::Proof { role: WireRole::Responder, proof: proof.to_vec() };
                self.state = State::AwaitProof { peer, hello, our_proof: Some(proof) };
                Ok(Step::Send(vec![ours, proof_message]))
            }
        }
    }

    fn on_proof(
        &mut self,
        peer: &PeerKeys,
        hello: &LinkHello,
        our_proof: Option<[u8; SIGNATURE_BYTES]>,
        proof: &[u8],
        now_ms: u64,
    ) -> Result<Step, LinkHandshakeError> {
        if our_proof.is_some_and(|ours| ours.as_slice() == proof) {
            return Err(LinkHandshakeError::Reflected);
        }
        let signature: [u8; SIGNATURE_BYTES] = proof
            .try_into()
            .map_err(|_| LinkHandshakeError::Malformed(format!("proof of {} bytes", proof.len())))?;
        let (initiator, responder) = self.ordered(hello);
        let peer_role = match self.role {
            LinkRole::Initiator => LinkRole::Responder,
            LinkRole::Responder => LinkRole::Initiator,
        };
        let key =
            verify_link_proof(peer, initiator, responder, &self.tls_binding, peer_role, &signature, now_ms)
                .map_err(|error| match error {
                LinkError::WrongDomain { expected, claimed } => {
                    LinkHandshakeError::WrongDomain { expected, claimed }
                }
                LinkError::KeyNotAccepted { domain } => LinkHandshakeError::KeyNotAccepted { domain },
                LinkError::BadLinkProof { domain } => LinkHandshakeError::BadSignature { domain },
            })?;
        let domain = peer.domain().clone();
        match self.role {
            LinkRole::Initiator => {
                let proof = self.sign(hello);
                self.state = State::AwaitAccepted { peer: domain, key: key.to_bytes() };
                Ok(Step::Send(vec![LinkMessage::Proof { role: WireRole::Initiator, proof: proof.to_vec() }]))
            }
            LinkRole::Responder => Ok(Step::Established(Established {
                peer: domain,
                key: key.to_bytes(),
                send: vec![LinkMessage::Accepted],
            })),
        }
    }

    /// The initiator's hello and the responder's, given the peer's.
    fn ordered<'a>(&'a self, peer: &'a LinkHello) -> (&'a LinkHello, &'a LinkHello) {
        match self.role {
            LinkRole::Initiator => (&self.ours, peer),
            LinkRole::Responder => (peer, &self.ours),
        }
    }

    fn sign(&self, peer: &LinkHello) -> [u8; SIGNATURE_BYTES] {
        let (initiator, responder) = self.ordered(peer);
        sign_link_proof(&self.key, initiator, responder, &self.tls_binding, self.role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kalandra_proto::federation::PeerKey;

    const BINDING: [u8; LINK_TLS_BINDING_BYTES] = [5; LINK_TLS_BINDING_BYTES];
    const NOW_MS: u64 = 1_000;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn table(name: &str, keys: &[(u8, Option<u64>)]) -> PeerTable {
        let keys = keys
            .iter()
            .map(|(seed, until)| PeerKey { key: key(*seed).verifying_key(), valid_until_ms: *until });
        PeerTable::from([(domain(name), PeerKeys::new(domain(name), keys.collect()).unwrap())])
    }

    fn send(step: Step) -> Vec<LinkMessage> {
        match step {
            Step::Send(messages) => messages,
            Step::Established(_) => panic!("established too early"),
        }
    }

    /// `a.test` (key 1) dials `b.test` (key 2); each side's table as given.
    fn run(
        a_peers: &PeerTable,
        b_peers: &PeerTable,
    ) -> Result<(Established, Established), LinkHandshakeError> {
        let (mut a, hello) =
            LinkHandshake::initiator(key(1), domain("a.test"), [1; 32], BINDING, domain("b.test"));
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        let replies = send(b.receive(hello, b_peers, NOW_MS)?);
        assert!(send(a.receive(replies[0].clone(), a_peers, NOW_MS)?).is_empty());
        let proof = send(a.receive(replies[1].clone(), a_peers, NOW_MS)?);
        let Step::Established(at_b) = b.receive(proof[0].clone(), b_peers, NOW_MS)? else {
            panic!("b not up")
        };
        let Step::Established(at_a) = a.receive(at_b.send[0].clone(), a_peers, NOW_MS)? else {
            panic!("a not up")
        };
        Ok((at_a, at_b))
    }

    #[test]
    fn federation_handshake_authenticates_both_ends() {
        let (at_a, at_b) = run(&table("b.test", &[(2, None)]), &table("a.test", &[(1, None)])).unwrap();
        assert_eq!(at_a.peer, domain("b.test"));
        assert_eq!(at_a.key, key(2).verifying_key().to_bytes());
        assert_eq!(at_b.peer, domain("a.test"));
        assert_eq!(at_b.key, key(1).verifying_key().to_bytes());
    }

    #[test]
    fn federation_handshake_refusals_are_typed() {
        let a_knows_b = table("b.test", &[(2, None)]);
        let b_knows_a = table("a.test", &[(1, None)]);
        let unknown = run(&a_knows_b, &table("c.test", &[(1, None)])).unwrap_err();
        assert_eq!(unknown, LinkHandshakeError::UnknownDomain { domain: domain("a.test") });
        let other_key = run(&a_knows_b, &table("a.test", &[(9, None)])).unwrap_err();
        assert_eq!(other_key.code(), "key_not_accepted");
        let past_overlap = run(&a_knows_b, &table("a.test", &[(1, Some(NOW_MS)), (9, None)])).unwrap_err();
        assert_eq!(past_overlap, LinkHandshakeError::KeyNotAccepted { domain: domain("a.test") });
        assert!(
            run(&a_knows_b, &table("a.test", &[(1, Some(NOW_MS + 1)), (9, None)])).is_ok(),
            "within the overlap"
        );
        let b_rotated_away = run(&table("b.test", &[(9, None)]), &b_knows_a).unwrap_err();
        assert_eq!(b_rotated_away, LinkHandshakeError::KeyNotAccepted { domain: domain("b.test") });
    }

    #[test]
    fn federation_handshake_refuses_a_refused_domain_whatever_its_keys() {
        let hello = |seed: u8, name: &str| LinkMessage::Hello {
            role: WireRole::Initiator,
            hello: LinkHello {
                domain: domain(name),
                federation_key: key(seed).verifying_key().to_bytes(),
                nonce: [seed; 32],
            },
        };
        let refused = RefusedDomains::from([domain("a.test")]);
        let mut peers = table("a.test", &[(1, None)]);
        peers.extend(table("c.test", &[(3, None)]));
        // Refused even though its key would be accepted.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        b.refusing(&refused);
        let error = b.receive(hello(1, "a.test"), &peers, NOW_MS).unwrap_err();
        assert_eq!(error, LinkHandshakeError::RefusedDomain { domain: domain("a.test") });
        assert_eq!(error.code(), "refused_domain");
        assert!(LINK_FAILURE_CODES.contains(&error.code()));
        // Refused with keys unknown too: the refusal comes first.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        b.refusing(&refused);
        let error = b.receive(hello(1, "a.test"), &PeerTable::new(), NOW_MS).unwrap_err();
        assert_eq!(error.code(), "refused_domain");
        // Another domain is unaffected.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        b.refusing(&refused);
        assert_eq!(send(b.receive(hello(3, "c.test"), &peers, NOW_MS).unwrap()).len(), 2);
    }

    #[test]
    fn federation_handshake_refuses_another_domain_than_the_one_dialed() {
        let (mut a, _) =
            LinkHandshake::initiator(key(1), domain("a.test"), [1; 32], BINDING, domain("b.test"));
        let mut c = LinkHandshake::responder(key(3), domain("c.test"), [3; 32], BINDING);
        let hello = LinkMessage::Hello {
            role: WireRole::Initiator,
            hello: LinkHello {
                domain: domain("a.test"),
                federation_key: key(1).verifying_key().to_bytes(),
                nonce: [1; 32],
            },
        };
        let replies = send(c.receive(hello, &table("a.test", &[(1, None)]), NOW_MS).unwrap());
        let peers = table("c.test", &[(3, None)]);
        assert_eq!(
            a.receive(replies[0].clone(), &peers, NOW_MS).unwrap_err(),
            LinkHandshakeError::WrongDomain { expected: domain("b.test"), claimed: domain("c.test") }
        );
    }

    #[test]
    fn federation_handshake_refuses_reflection_wrong_roles_and_bad_proofs() {
        let a_peers = table("b.test", &[(2, None)]);
        let b_peers = table("a.test", &[(1, None)]);
        // Our own hello sent back.
        let (mut a, hello) =
            LinkHandshake::initiator(key(1), domain("a.test"), [1; 32], BINDING, domain("b.test"));
        let LinkMessage::Hello { hello: ours, .. } = hello.clone() else { panic!() };
        let echoed = LinkMessage::Hello { role: WireRole::Responder, hello: ours };
        assert_eq!(a.receive(echoed, &a_peers, NOW_MS).unwrap_err(), LinkHandshakeError::Reflected);
        // A hello in the wrong role.
        let (mut a, hello) =
            LinkHandshake::initiator(key(1), domain("a.test"), [1; 32], BINDING, domain("b.test"));
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        let LinkMessage::Hello { hello: a_hello, .. } = hello.clone() else { panic!() };
        let as_responder = LinkMessage::Hello { role: WireRole::Responder, hello: a_hello };
        assert_eq!(b.receive(as_responder, &b_peers, NOW_MS).unwrap_err().code(), "wrong_role");
        // The responder's own proof reflected back as the initiator's.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        let replies = send(b.receive(hello.clone(), &b_peers, NOW_MS).unwrap());
        let LinkMessage::Proof { proof, .. } = replies[1].clone() else { panic!() };
        let reflected = LinkMessage::Proof { role: WireRole::Initiator, proof };
        assert_eq!(b.receive(reflected, &b_peers, NOW_MS).unwrap_err(), LinkHandshakeError::Reflected);
        // A proof for another TLS connection.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], [6; 32]);
        let replies = send(b.receive(hello, &b_peers, NOW_MS).unwrap());
        a.receive(replies[0].clone(), &a_peers, NOW_MS).unwrap();
        assert_eq!(
            a.receive(replies[1].clone(), &a_peers, NOW_MS).unwrap_err(),
            LinkHandshakeError::BadSignature { domain: domain("b.test") }
        );
        // Out of turn.
        let mut b = LinkHandshake::responder(key(2), domain("b.test"), [2; 32], BINDING);
        assert_eq!(
            b.receive(LinkMessage::Accepted, &b_peers, NOW_MS).unwrap_err().code(),
            "unexpected_message"
        );
    }

    #[test]
    fn federation_messages_round_trip_within_their_bound() {
        let hello = LinkMessage::Hello {
            role: WireRole::Initiator,
            hello: LinkHello {
                domain: domain(&["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".")),
                federation_key: [7; 32],
                nonce: [8; 32],
            },
        };
        for message in [
            hello,
            LinkMessage::Proof { role: WireRole::Responder, proof: vec![1; 64] },
            LinkMessage::Accepted,
            LinkMessage::Ping { sequence: u64::MAX },
        ] {
            let bytes = encode(&message);
            let len = body_len([bytes[0], bytes[1]]).unwrap();
            assert_eq!(len, bytes.len() - LINK_LENGTH_PREFIX_BYTES);
            assert!(len <= LINK_MESSAGE_BYTES_MAX);
            assert_eq!(decode(&bytes[LINK_LENGTH_PREFIX_BYTES..]).unwrap(), message);
        }
        assert_eq!(body_len([0xff, 0xff]).unwrap_err().code(), "message_too_large");
        assert_eq!(body_len([0, 0]).unwrap_err().code(), "malformed");
        assert_eq!(decode(b"\xff\x00garbage").unwrap_err().code(), "malformed");
        let mut trailing = encode(&LinkMessage::Accepted)[LINK_LENGTH_PREFIX_BYTES..].to_vec();
        trailing.push(0);
        assert_eq!(decode(&trailing).unwrap_err().code(), "malformed");
        let every = [
            LinkHandshakeError::UnknownDomain { domain: domain("x.test") },
            LinkHandshakeError::RefusedDomain { domain: domain("x.test") },
            LinkHandshakeError::Timeout { timeout_ms: 1 },
            LinkHandshakeError::Transport(String::new()),
        ];
        assert!(every.iter().all(|error| LINK_FAILURE_CODES.contains(&error.code())));
    }
}
