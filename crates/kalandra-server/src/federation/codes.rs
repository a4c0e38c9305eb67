//! The label values of the federation metrics: the codes and outcomes the
//! links, the directory, the relay and the Welcome router count under. A
//! leaf module, so that the metrics and the federation code both use it
//! without depending on each other.

/// Every `LinkHandshakeError::code`, for the failure counter's labels.
pub const LINK_FAILURE_CODES: [&str; 15] = [
    "unknown_domain",
    "refused_domain",
    "wrong_domain",
    "key_not_accepted",
    "reflected",
    "wrong_role",
    "bad_signature",
    "unexpected_message",
    "malformed",
    "message_too_large",
    "timeout",
    "too_many_links",
    "too_many_handshakes",
    "refused_by_peer",
    "transport",
];

/// Every `ClaimAnswerError::code`, `unknown_domain` (a client's
/// request naming a domain that is not a peer), `refused_domain` (one
/// naming a domain the operator refuses) and every
/// `WelcomeRefusal::code` (a
/// peer's Welcome refused, or recipients left out of one) and
/// `claim_rate` (a peer's claim beyond its rate), for the refusal
/// counter's labels.
pub const FEDERATION_REFUSAL_CODES: [&str; 14] = [
    "refused_domain",
    "unknown_domain",
    "wrong_answer",
    "missing_certificate",
    "foreign_user",
    "bad_home_certificate",
    "certificate_sender_mismatch",
    "identity_mismatch",
    "local_room",
    "other_authority",
    "bad_welcome",
    "unclaimed_recipient",
    "too_many_rooms",
    "claim_rate",
];

/// Every code of refused relay traffic, for the refusal counter's labels.
pub const RELAY_REFUSAL_CODES: [&str; 17] = [
    "origin_mismatch",
    "wrong_destination",
    "replayed",
    "malformed_frame",
    "not_countersigned",
    "bad_countersignature",
    "foreign_user",
    "bad_home_certificate",
    "sender_mismatch",
    "client_signature",
    "refused_domain",
    "not_relayed_here",
    "too_many_connections",
    "foreign_room",
    "not_followed_here",
    "replica_diverged",
    "malformed_link_message",
];

/// Directions of the relayed-frames counter.
pub const RELAY_DIRECTIONS: [&str; 2] = ["out", "in"];

/// Outcomes counted by `kalandra_federation_welcomes_total{outcome}`:
/// `forwarded` (stored at the recipients' home, this server's copy
/// deleted), `deferred` (not taken yet, sent again later), `dropped`
/// (refused by the home for good, or too large to send: deleted here),
/// `received` (a peer's Welcome stored here).
pub const FEDERATION_WELCOME_OUTCOMES: [&str; 4] = ["forwarded", "deferred", "dropped", "received"];

/// Outcomes of a replica's part in its authority's erasures, per entry
/// (`erased`, `refused`: not content the authority may erase) or per
/// notice or journal record (`not_held`: not durable here in time;
/// `dropped`: too many erasures under way, the room is followed again).
pub const REPLICA_ERASURE_OUTCOMES: [&str; 4] = ["erased", "refused", "not_held", "dropped"];

/// Outcomes of a replica's check of its authority's signed head.
pub const REPLICA_HEAD_OUTCOMES: [&str; 5] =
    ["matched", "not_comparable", "equivocation", "bad_signature", "no_authority_key"];
