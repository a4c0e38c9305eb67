//! What a connection asks of a room.

use kalandra_proto::{payload, Frame, RoomId};

use super::shard::{Peer, Shard};
use crate::protocol::session::Route;
use crate::room::sequencer::PersistentGroup;

/// A request from an authenticated connection to the shard of its room.
#[derive(Debug)]
pub enum RoomRequest {
    /// Sequence a frame (create room, commit, proposal, application,
    /// external join); its sender id was checked against the connection.
    Submit(Frame),
    /// Fan an ephemeral frame out to the room's live subscribers.
    Ephemeral(Frame),
    /// Stream history from an index, then live frames.
    Subscribe {
        /// The room.
        room_id: RoomId,
        /// First index wanted.
        from_log_index: u64,
        /// The request's id.
        request_id: u32,
    },
    /// A bounded range of the log, once.
    Sync {
        /// The room.
        room_id: RoomId,
        /// First index wanted.
        from_log_index: u64,
        /// Most frames.
        count_max: u32,
        /// The request's id.
        request_id: u32,
    },
    /// Stop streaming the room.
    Unsubscribe {
        /// The room.
        room_id: RoomId,
    },
    /// The room's current GroupInfo and ratchet tree.
    GroupInfo {
        /// The room.
        room_id: RoomId,
        /// The request's id.
        request_id: u32,
    },
    /// The sender cannot process a sequenced commit (`docs/RECOVERY.md`).
    CommitReport {
        /// The room.
        room_id: RoomId,
        /// The request's id.
        request_id: u32,
        /// The report.
        report: payload::CommitReport,
    },
}

/// A route that is not a room request: key packages, redaction and
/// moderation acts.
#[derive(Debug)]
pub enum OtherRoute {
    /// Upload or claim key packages (the directory answers).
    Directory(DirectoryRequest),
    /// A member's `Redact` (see [`crate::erasure::redact_request`]).
    Redact(Frame),
    /// A moderation request (kick, ban, unban, role change).
    Moderation(Frame),
    /// The federation keys this server accepts for some domains
    /// ([`crate::federation::peers::domain_keys`] answers).
    DomainKeys {
        /// Request id.
        request_id: u32,
        /// The domains.
        request: payload::DomainKeysRequest,
    },
}

/// A session's route, split by who answers it.
#[derive(Debug)]
pub enum Routed {
    /// The room's shard.
    Room(RoomRequest),
    /// The connection's driver (directory, moderation).
    Other(OtherRoute),
}

impl RoomRequest {
    /// The room request a session's route is, or what else it is.
    pub fn from_route(route: Route) -> Routed {
        Routed::Room(match route {
            Route::Sequence(frame) => RoomRequest::Submit(frame),
            Route::Ephemeral(frame) => RoomRequest::Ephemeral(frame),
            Route::Subscribe { room_id, from_log_index, request_id } => {
                RoomRequest::Subscribe { room_id, from_log_index, request_id }
            }
            Route::Sync { room_id, from_log_index, count_max, request_id } => {
                RoomRequest::Sync { room_id, from_log_index, count_max, request_id }
            }
            Route::Unsubscribe { room_id } => RoomRequest::Unsubscribe { room_id },
            Route::GroupInfo { room_id, request_id } => RoomRequest::GroupInfo { room_id, request_id },
            Route::CommitReport { room_id, request_id, report } => {
                RoomRequest::CommitReport { room_id, request_id, report }
            }
            Route::KeyPackageUpload { request_id, upload } => {
                return Routed::Other(OtherRoute::Directory(DirectoryRequest::Upload { request_id, upload }))
            }
            Route::KeyPackageClaim { request_id, claim } => {
                return Routed::Other(OtherRoute::Directory(DirectoryRequest::Claim { request_id, claim }))
            }
            Route::DomainKeys { request_id, request } => {
                return Routed::Other(OtherRoute::DomainKeys { request_id, request })
            }
            Route::Moderation(frame) if frame.opcode() == kalandra_proto::Opcode::Redact => {
                return Routed::Other(OtherRoute::Redact(frame))
            }
            Route::Moderation(frame) => return Routed::Other(OtherRoute::Moderation(frame)),
        })
    }

    /// The room it is for (which shard owns it).
    pub fn room_id(&self) -> RoomId {
        match self {
            RoomRequest::Submit(frame) | RoomRequest::Ephemeral(frame) => frame.header().room_id(),
            RoomRequest::Subscribe { room_id, .. }
            | RoomRequest::Sync { room_id, .. }
            | RoomRequest::Unsubscribe { room_id }
            | RoomRequest::GroupInfo { room_id, .. }
            | RoomRequest::CommitReport { room_id, .. } => *room_id,
        }
    }

    /// Whether the request reads the room (the recipient has used its
    /// Welcome for it).
    pub fn reads_room(&self) -> bool {
        matches!(self, RoomRequest::Subscribe { .. } | RoomRequest::Sync { .. })
    }

    /// Whether handling it validates MLS state (a cost worth measuring).
    pub fn validates_mls(&self) -> bool {
        use kalandra_proto::Opcode;
        matches!(self, RoomRequest::Submit(frame)
            if matches!(frame.opcode(), Opcode::CreateRoom | Opcode::Commit | Opcode::ExternalJoin))
    }
}

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// Handles a request of `peer`.
    pub fn handle_request(&mut self, peer: &P, request: RoomRequest, now_ms: u64) {
        match request {
            RoomRequest::Submit(frame) => self.handle_submit(peer, frame, now_ms),
            RoomRequest::Ephemeral(frame) => self.handle_ephemeral(peer, frame, now_ms),
            RoomRequest::Subscribe { room_id, from_log_index, request_id } => {
                self.handle_subscribe(peer, room_id, from_log_index, request_id, true, 0, now_ms)
            }
            RoomRequest::Sync { room_id, from_log_index, count_max, request_id } => {
                let count_max = u64::from(count_max);
                self.handle_subscribe(peer, room_id, from_log_index, request_id, false, count_max, now_ms)
            }
            RoomRequest::Unsubscribe { room_id } => self.handle_unsubscribe(peer.connection(), room_id),
            RoomRequest::GroupInfo { room_id, request_id } => {
                self.handle_group_info(peer, room_id, request_id, now_ms)
            }
            RoomRequest::CommitReport { room_id, request_id, report } => {
                self.handle_commit_report(peer, room_id, request_id, &report, now_ms)
            }
        }
    }
}

/// A key-package request of an authenticated connection.
#[derive(Debug)]
pub enum DirectoryRequest {
    /// Store key packages for the sender.
    Upload {
        /// Request id.
        request_id: u32,
        /// The upload.
        upload: payload::KeyPackageUpload,
    },
    /// Claim key packages of other identities.
    Claim {
        /// Request id.
        request_id: u32,
        /// The claim.
        claim: payload::KeyPackageClaim,
    },
}
