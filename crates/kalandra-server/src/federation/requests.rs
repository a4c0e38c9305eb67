//! Requests over an established link, without I/O: the request and
//! response messages, their limits, and the table of a link's requests in
//! flight. Either end of a link may send requests; each carries an id the
//! response repeats.

use std::collections::BTreeMap;

use kalandra_proto::federation::{HomeCertificate, DOMAIN_NAME_BYTES_MAX};
use kalandra_proto::limits::{
    FRAME_BYTES_MAX, KEY_PACKAGES_PER_CLAIM_MAX, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, TEXT_BYTES_MAX,
    WELCOME_RECIPIENTS_MAX,
};
use serde::{Deserialize, Serialize};

use crate::store::limits::{KEY_PACKAGE_BYTES_MAX, WELCOME_BYTES_MAX};

/// Requests one end may have sent on one link and not had answered; more
/// are refused at once. The same bound holds for the requests a link's
/// peer may have this end working on.
pub const LINK_REQUESTS_IN_FLIGHT_MAX: usize = 32;
/// Time the peer has to answer a request.
pub const LINK_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// CBOR framing and a home certificate, per claimed key package.
const CLAIMED_ENTRY_OVERHEAD_BYTES_MAX: usize =
    128 + DOMAIN_NAME_BYTES_MAX + PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 16;
/// Largest answer to a claim, bytes.
const CLAIM_ANSWER_BYTES_MAX: usize =
    KEY_PACKAGES_PER_CLAIM_MAX as usize * (KEY_PACKAGE_BYTES_MAX + CLAIMED_ENTRY_OVERHEAD_BYTES_MAX) + 1024;
/// CBOR framing, domains, a home certificate and a countersignature around
/// one relayed frame, bytes.
pub const RELAYED_FRAME_OVERHEAD_BYTES_MAX: usize = 4096;
/// Largest message carrying one whole frame, bytes.
const FRAME_MESSAGE_BYTES_MAX: usize = FRAME_BYTES_MAX + RELAYED_FRAME_OVERHEAD_BYTES_MAX;
/// Largest message on an established link, bytes (without its length
/// prefix): an answer to the largest claim fits, and so does the largest
/// frame with what a relay wraps it in.
pub const LINK_ESTABLISHED_MESSAGE_BYTES_MAX: usize = if CLAIM_ANSWER_BYTES_MAX > FRAME_MESSAGE_BYTES_MAX {
    CLAIM_ANSWER_BYTES_MAX
} else {
    FRAME_MESSAGE_BYTES_MAX
};
/// Bytes of the big-endian length before each message on an established link.
pub const LINK_ESTABLISHED_LENGTH_PREFIX_BYTES: usize = 4;
/// Longest refusal message carried in a response, bytes.
pub const REFUSAL_MESSAGE_BYTES_MAX: usize = TEXT_BYTES_MAX;
/// Recipients one `DeliverWelcome` names at most: as many as one commit's
/// Welcome may have.
pub const DELIVER_WELCOME_RECIPIENTS_MAX: usize = WELCOME_RECIPIENTS_MAX;
/// CBOR of one recipient (a uint) at most, bytes.
const RECIPIENT_CBOR_BYTES_MAX: usize = 9;
/// CBOR framing of a `DeliverWelcome` besides its recipients and Welcome.
const DELIVER_WELCOME_OVERHEAD_BYTES_MAX: usize = 1024;
/// Largest Welcome frame sent to a peer, bytes: a `DeliverWelcome` with it
/// and the most recipients fits one link message. A larger Welcome (a very
/// large group's ratchet tree) is not routed to other domains.
pub const FORWARDED_WELCOME_BYTES_MAX: usize = LINK_ESTABLISHED_MESSAGE_BYTES_MAX
    - DELIVER_WELCOME_RECIPIENTS_MAX * RECIPIENT_CBOR_BYTES_MAX
    - DELIVER_WELCOME_OVERHEAD_BYTES_MAX;

const _: () = assert!(LINK_ESTABLISHED_MESSAGE_BYTES_MAX <= u32::MAX as usize, "the prefix is four bytes");
const _: () = assert!(
    LINK_REQUESTS_IN_FLIGHT_MAX * CLAIM_ANSWER_BYTES_MAX <= 256 * 1024 * 1024,
    "a link's answers in flight stay within 256 MiB"
);
const _: () = assert!(FORWARDED_WELCOME_BYTES_MAX <= WELCOME_BYTES_MAX, "a forwarded Welcome can be stored");
const _: () = assert!(FORWARDED_WELCOME_BYTES_MAX >= 4_000_000, "Welcomes of groups of thousands are routed");
const _: () = assert!(
    LINK_REQUEST_TIMEOUT_MS > crate::federation::limits::PING_INTERVAL_MS,
    "a slow answer is not mistaken for a dead link"
);

/// A request from one domain's server to a peer's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkRequest {
    /// Claim one key package of each of these users of the peer (their
    /// sender ids), exactly as a local claim would.
    ClaimKeyPackages {
        /// 1 to `KEY_PACKAGES_PER_CLAIM_MAX` sender ids.
        sender_ids: Vec<u64>,
    },
    /// Store a Welcome of a room the sender orders for these users of the
    /// peer, and hold it until they read the room, as a local Welcome.
    DeliverWelcome {
        /// The room the Welcome joins.
        #[serde(with = "serde_bytes")]
        room_id: [u8; 16],
        /// 1 to [`DELIVER_WELCOME_RECIPIENTS_MAX`] sender ids.
        recipients: Vec<u64>,
        /// The Welcome frame, exactly as a local recipient gets it; at most
        /// [`FORWARDED_WELCOME_BYTES_MAX`] bytes.
        #[serde(with = "serde_bytes")]
        welcome: Vec<u8>,
    },
}

/// One claimed key package, with its owner's home certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteKeyPackage {
    /// The user's sender id, as requested.
    pub sender_id: u64,
    /// The key package (an MLSMessage), absent when the user has none.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub key_package: Option<Vec<u8>>,
    /// The home domain's certificate of the key package's identity key;
    /// present with every key package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_certificate: Option<HomeCertificate>,
}

/// The answer to a [`LinkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkResponse {
    /// The answer to `ClaimKeyPackages`, one entry per sender id in request order.
    Claimed {
        /// The entries.
        key_packages: Vec<RemoteKeyPackage>,
    },
    /// The answer to `DeliverWelcome`: the Welcome is stored for the
    /// recipients (those whose queue had room) and held until read.
    WelcomeStored {},
    /// The peer refused the request.
    Refused {
        /// A stable code ([`RefusalCode`]).
        code: RefusalCode,
        /// Plain English, at most [`REFUSAL_MESSAGE_BYTES_MAX`] bytes.
        message: String,
    },
}

/// Why a peer refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The request breaks a limit or is not understood.
    BadRequest,
    /// The peer has [`LINK_REQUESTS_IN_FLIGHT_MAX`] requests of this link in progress.
    TooManyRequests,
    /// The peer's storage failed; nothing was claimed.
    Unavailable,
}

impl RefusalCode {
    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::TooManyRequests => "too_many_requests",
            RefusalCode::Unavailable => "unavailable",
        }
    }
}

/// `message` cut to [`REFUSAL_MESSAGE_BYTES_MAX`] bytes on a character boundary.
pub fn refusal(code: RefusalCode, message: &str) -> LinkResponse {
    let mut end = message.len().min(REFUSAL_MESSAGE_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    LinkResponse::Refused { code, message: message[..end].to_owned() }
}

/// Why a request over a link got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkRequestError {
    /// No link with the peer is up (retryable).
    #[error("no link with {domain} is up")]
    LinkDown {
        /// The peer.
        domain: String,
    },
    /// The link has [`LINK_REQUESTS_IN_FLIGHT_MAX`] requests unanswered (retryable).
    #[error("{LINK_REQUESTS_IN_FLIGHT_MAX} requests already in flight to {domain}")]
    TooManyInFlight {
        /// The peer.
        domain: String,
    },
    /// No answer within [`LINK_REQUEST_TIMEOUT_MS`] (retryable).
    #[error("{domain} did not answer within {LINK_REQUEST_TIMEOUT_MS} ms")]
    Timeout {
        /// The peer.
        domain: String,
    },
    /// The link's outgoing queue is full (retryable).
    #[error("the link to {domain} is busy")]
    Busy {
        /// The peer.
        domain: String,
    },
    /// The request would exceed [`LINK_ESTABLISHED_MESSAGE_BYTES_MAX`] (caller misuse).
    #[error("request of {len_bytes} bytes, limit {LINK_ESTABLISHED_MESSAGE_BYTES_MAX}")]
    TooLarge {
        /// Its encoded length.
        len_bytes: usize,
    },
}

/// The requests one end of a link has sent and awaits answers to, each
/// with what the driver needs to hand the answer over (`W`).
#[derive(Debug)]
pub struct PendingRequests<W> {
    next_id: u64,
    waiting: BTreeMap<u64, W>,
}

impl<W> Default for PendingRequests<W> {
    fn default() -> Self {
        PendingRequests { next_id: 1, waiting: BTreeMap::new() }
    }
}

impl<W> PendingRequests<W> {
    /// Registers a request; its id, or `None` when
    /// [`LINK_REQUESTS_IN_FLIGHT_MAX`] are already waiting.
    pub fn begin(&mut self, waiter: W) -> Option<u64> {
        if self.waiting.len() >= LINK_REQUESTS_IN_FLIGHT_MAX {
            return None;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.waiting.insert(id, waiter);
        Some(id)
    }

    /// The waiter of request `id`, removed; `None` for an id not waiting
    /// (never sent, answered already, or given up).
    pub fn finish(&mut self, id: u64) -> Option<W> {
        self.waiting.remove(&id)
    }

    /// Every waiter, removed: the link went down and none will be answered.
    pub fn abandon(&mut self) -> Vec<W> {
        std::mem::take(&mut self.waiting).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::handshake::{decode_established, encode_established, LinkMessage};

    #[test]
    fn federation_requests_in_flight_are_bounded_and_answered_once() {
        let mut pending = PendingRequests::default();
        let ids: Vec<u64> = (0..LINK_REQUESTS_IN_FLIGHT_MAX).map(|n| pending.begin(n).unwrap()).collect();
        assert_eq!(pending.begin(99), None, "one more than the bound is refused");
        assert_eq!(pending.finish(ids[3]), Some(3));
        assert_eq!(pending.finish(ids[3]), None, "a second answer to one id is not taken");
        assert_eq!(pending.finish(12_345), None, "an answer to an id never sent is not taken");
        let next = pending.begin(7).unwrap();
        assert!(!ids.contains(&next), "ids are not reused while others wait");
        assert_eq!(pending.begin(8), None, "the bound holds again");
        assert_eq!(
            pending.abandon().len(),
            LINK_REQUESTS_IN_FLIGHT_MAX,
            "a link down gives up every request"
        );
        assert_eq!(pending.finish(next), None);
        assert!(pending.begin(9).is_some());
    }

    #[test]
    fn federation_link_requests_round_trip_as_one_cbor_item() {
        let request =
            LinkMessage::Request { id: 7, request: LinkRequest::ClaimKeyPackages { sender_ids: vec![1, 2] } };
        let response = LinkMessage::Response {
            id: 7,
            response: LinkResponse::Claimed {
                key_packages: vec![RemoteKeyPackage {
                    sender_id: 1,
                    key_package: None,
                    home_certificate: None,
                }],
            },
        };
        let refused = LinkMessage::Response { id: 8, response: refusal(RefusalCode::Unavailable, "disk") };
        let welcome = LinkMessage::Request {
            id: 9,
            request: LinkRequest::DeliverWelcome {
                room_id: [3; 16],
                recipients: vec![4, u64::MAX],
                welcome: vec![5; 300],
            },
        };
        let stored = LinkMessage::Response { id: 9, response: LinkResponse::WelcomeStored {} };
        for message in [request, response, refused, welcome, stored] {
            let bytes = encode_established(&message).unwrap();
            let body = &bytes[LINK_ESTABLISHED_LENGTH_PREFIX_BYTES..];
            assert_eq!(decode_established(body).unwrap(), message);
        }
    }

    #[test]
    fn federation_established_link_refuses_oversize_empty_and_handshake_messages() {
        use crate::federation::handshake::{encode, established_body_len, LinkHandshakeError};
        let over = u32::try_from(LINK_ESTABLISHED_MESSAGE_BYTES_MAX + 1).unwrap().to_be_bytes();
        assert!(matches!(established_body_len(over), Err(LinkHandshakeError::MessageTooLarge { .. })));
        assert!(matches!(established_body_len([0; 4]), Err(LinkHandshakeError::Malformed(_))));
        let at = u32::try_from(LINK_ESTABLISHED_MESSAGE_BYTES_MAX).unwrap().to_be_bytes();
        assert_eq!(established_body_len(at), Ok(LINK_ESTABLISHED_MESSAGE_BYTES_MAX));
        let accepted = encode(&LinkMessage::Accepted);
        let error = decode_established(&accepted[crate::federation::handshake::LINK_LENGTH_PREFIX_BYTES..]);
        assert_eq!(error, Err(LinkHandshakeError::UnexpectedMessage { message: "accepted" }));
        let huge = LinkMessage::Response {
            id: 1,
            response: LinkResponse::Claimed {
                key_packages: vec![
                    RemoteKeyPackage {
                        sender_id: 1,
                        key_package: Some(vec![0; KEY_PACKAGE_BYTES_MAX * 3]),
                        home_certificate: None,
                    };
                    KEY_PACKAGES_PER_CLAIM_MAX as usize
                ],
            },
        };
        assert!(encode_established(&huge).is_err(), "an answer over the bound is not sent");
    }

    #[test]
    fn federation_largest_welcome_delivery_fits_one_link_message() {
        let request = LinkMessage::Request {
            id: u64::MAX,
            request: LinkRequest::DeliverWelcome {
                room_id: [0xff; 16],
                recipients: vec![u64::MAX; DELIVER_WELCOME_RECIPIENTS_MAX],
                welcome: vec![0xff; FORWARDED_WELCOME_BYTES_MAX],
            },
        };
        assert!(encode_established(&request).is_ok());
        let over = LinkMessage::Request {
            id: 1,
            request: LinkRequest::DeliverWelcome {
                room_id: [0; 16],
                recipients: vec![1],
                welcome: vec![0; LINK_ESTABLISHED_MESSAGE_BYTES_MAX],
            },
        };
        assert!(encode_established(&over).is_err(), "a Welcome over the bound is not sent");
    }

    #[test]
    fn federation_established_message_bound_is_the_documented_one() {
        assert_eq!(LINK_ESTABLISHED_MESSAGE_BYTES_MAX, 8_392_832, "docs/wire-protocol.md §10");
    }

    #[test]
    fn federation_refusal_message_is_cut_on_a_character_boundary() {
        let long = "é".repeat(REFUSAL_MESSAGE_BYTES_MAX);
        let LinkResponse::Refused { message, .. } = refusal(RefusalCode::BadRequest, &long) else {
            panic!("a refusal");
        };
        assert!(message.len() <= REFUSAL_MESSAGE_BYTES_MAX);
        assert!(message.chars().all(|c| c == 'é'));
    }
}
