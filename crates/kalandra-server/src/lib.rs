//! Kalandra server: the per-room sequencer and the shells that drive it
//! (storage, transport, admin HTTP, metrics).
//!
//! The modules are private. What the binary, the tests and the command
//! line's tests need is re-exported here: [`Server::start`] and what it
//! returns, the configuration, the room core's handle ([`Node`]) and the
//! audit log. [`store`] is public as a whole: its `Store` trait is the seam
//! the simulation puts a simulated disk behind. [`sim`] names the internals
//! the deterministic simulation and the benchmarks drive directly.
#![forbid(unsafe_code)]

mod admin;
#[cfg(feature = "injected-bugs")]
pub mod bugs;
mod config;
mod federation;
mod node;
mod protocol;
mod room;
mod server;
mod server_key;
pub mod store;
mod transport;

pub use crate::admin::api::{export_audit, verify_store, AUDIT_EXPORT_RECORDS_MAX, OPENAPI_JSON};
pub use crate::admin::metrics::Metrics;
pub use crate::admin::routes::ROUTES;
pub use crate::config::{
    init_logging, AuditCommand, CliArgs, ConfigError, FederationCommand, FederationConfig,
    Limits as ConnectionLimits, LogFormat, PeerConfig, PeerKeyConfig, Secret, ServerCommand, ServerConfig,
    ADMIN_LISTEN_DEFAULT,
};
pub use crate::federation::handshake::{LinkHandshakeError, LINK_FAILURE_CODES};
pub use crate::federation::limits::S2S_ALPN;
pub use crate::federation::links::{
    FederationLinks, FederationView, LinkFailure, PeerLinkView, PeerRoomsView,
};
pub use crate::federation::quic::client_config as federation_client_config;
pub use crate::federation::welcomes::WELCOME_RETRY_INTERVAL_MS;

/// The server-to-server link protocol, for tests that play a peer domain.
pub mod federation_link {
    pub use crate::federation::handshake::{
        body_len, decode, decode_established, encode, encode_established, established_body_len,
        LinkHandshake, LinkMessage, PeerTable, Step, LINK_LENGTH_PREFIX_BYTES,
    };
    pub use crate::federation::quic::server_config;
    pub use crate::federation::replica::FOLLOWS_IN_FLIGHT_PER_LINK_MAX;
    pub use crate::federation::requests::{
        LinkRequest, LinkResponse, RefusalCode, RemoteKeyPackage, LINK_ESTABLISHED_LENGTH_PREFIX_BYTES,
    };
}
pub use crate::federation::peers::PeerKeysReload;
pub use crate::node::erasure::{RedactAuthority, RetentionSweeper};
pub use crate::node::push::{MemoryPushSink, PushNotification, PushSink};
pub use crate::node::{Clock, Node, NodeHealth};
pub use crate::room::audit;
pub use crate::room::roles::Role;
pub use crate::server::{
    ReloadKeysError, RunningServer, Server, ShutdownError, StartError, StartOptions, Stopped,
    DATABASE_FILE_NAME,
};
pub use crate::server_key::{load_or_create_federation_key, FEDERATION_KEY_FILE_NAME};
pub use crate::transport::tls::load_or_create_server_identity;

/// The core's internals, for the deterministic simulation
/// (`kalandra-harness`), which drives the production room core, session,
/// outbox, history reader, Welcome storage and recovery without the tokio
/// node and the QUIC listener around them, and for the benchmarks.
pub mod sim {
    pub use crate::config::ROOMS_PER_USER_MAX_DEFAULT;
    pub use crate::federation::follow::{FeedItem, FollowState, Following, LiveStep};
    pub use crate::federation::handshake::{
        decode_established, encode_established, ErasureRecord, LinkMessage,
    };
    pub use crate::federation::peers::domain_keys;
    pub use crate::federation::relay::frame_messages;
    pub use crate::federation::replica::{
        ERASURE_PAGES_PER_FOLLOW_MAX, REPLICA_ERASURE_TASKS_MAX, REPLICA_FEED_BYTES_MAX,
        REPLICA_FEED_FRAMES_MAX,
    };
    pub use crate::federation::requests::{
        LINK_ESTABLISHED_LENGTH_PREFIX_BYTES, LINK_ESTABLISHED_MESSAGE_BYTES_MAX,
    };
    pub use crate::node::erasure::{
        member_authority, plan_redaction, plan_replica_erasure, redact_reply, redact_request,
        store_redact_error, RedactAsk, RedactError, RedactPlan, RedactReport, ReplicaErasurePlan,
    };
    pub use crate::node::{
        deliver_pending_welcomes_with, forget_welcomes_for_room, history_bytes, recover_room_state,
        recover_rooms, send_history, store_welcome, welcomes_used_by, WelcomeSource,
    };
    pub use crate::protocol::session::{HomeIssuer, Route, Session, Step};
    pub use crate::room::limits::{
        COMMITS_PER_SNAPSHOT, SYNC_READERS_PER_CONNECTION_MAX, TICKETS_IN_FLIGHT_MAX,
    };
    pub use crate::room::mls_state::{RoomGroupState, ServerSigner};
    pub use crate::room::room_group::MlsRoomGroup;
    pub use crate::room::sequencer::{
        CommitRules, CommitSummary, Effect, GroupError, GroupState, PersistentGroup, ProposalRef, RoomPolicy,
        RoomSequencer, SERVER_PROPOSAL_REANNOUNCE_MS, SERVER_SENDER_ID,
    };
    pub use crate::room::{
        error_frame, moderation_reply, moderation_request, reply_frame, server_frame, AppendBatch,
        Completion, ConnectionId, HistoryRead, ModerationDone, ModerationFailure, OtherRoute, Output, Peer,
        RecoveredRoom, RoomRequest, Routed, Shard, ShardConfig, MODERATION_TICK_MS,
    };
    pub use crate::store::group_commit::write_parts;
    pub use crate::transport::directory;
    pub use crate::transport::outbox::limits::{OUTBOX_BYTES_MAX_DEFAULT, OUTBOX_BYTES_MAX_MIN};
    pub use crate::transport::outbox::{Outbox, OutboxReceiver, Outgoing};
}
