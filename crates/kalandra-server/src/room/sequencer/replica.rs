//! A replica of a room another domain orders (its authority): the frames
//! it sequenced are applied here in its order, as a stored frame is on
//! recovery, and then wait for durability here like a submitted frame —
//! fanned out to this server's readers once stored, never acknowledged
//! (the authority acknowledges). A replica never assigns an index.

use std::collections::VecDeque;

use kalandra_proto::chain::{LogChain, LogHead, GENESIS_LOG_HEAD};
use kalandra_proto::payload::CreateRoom;
use kalandra_proto::{Frame, Opcode, RoomId};

use super::{CommitFollowUp, GroupState, InFlight, ReplayError, RoomSequencer, Sequenced, SERVER_SENDER_ID};
use crate::room::limits::REPLICA_HEADS_KEPT_MAX;
use crate::room::roles::RoomPolicy;

impl<G: GroupState> RoomSequencer<G> {
    /// The replica of `room_id` from its `CreateRoom` frame as the authority
    /// sequenced it (index 0); `group` is the room's epoch-0 state built from it.
    pub fn replica(
        room_id: RoomId,
        group: G,
        frame: Frame,
    ) -> Result<(RoomSequencer<G>, Sequenced), ReplayError> {
        let found = frame.header().log_index();
        if frame.opcode() != Opcode::CreateRoom || found != 0 {
            return Err(ReplayError::NotDense { expected: 0, found });
        }
        let create: CreateRoom =
            frame.decode_payload().map_err(|error| ReplayError::Malformed { log_index: 0, error })?;
        let policy = RoomPolicy::new(frame.header().sender_id(), create.join_rule());
        let mut replica = RoomSequencer {
            room_id,
            next_log_index: 0,
            epoch_started_at_log_index: 0,
            epoch_tag_cache: None,
            last_timestamp_ms: 0,
            server_proposals_pending: Vec::new(),
            rejoined_while_closed: Vec::new(),
            server_proposals_since: None,
            reannounce_at_ms: 0,
            bans: super::bans::Bans::default(),
            in_flight: VecDeque::new(),
            durable_through: None,
            chain: LogChain::genesis(),
            durable_log_head: GENESIS_LOG_HEAD,
            recovering: false,
            group_info: Some((group.epoch(), bytes::Bytes::from(create.group_info))),
            policy,
            group,
            void: super::void::VoidState::default(),
            replica_heads: VecDeque::new(),
        };
        let sequenced = replica.replicate(frame)?;
        Ok((replica, sequenced))
    }

    /// Takes the next frame the authority sequenced (it must carry the next
    /// index): applied to the replica's state, then in flight until
    /// [`RoomSequencer::durable`] here.
    pub fn replicate(&mut self, frame: Frame) -> Result<Sequenced, ReplayError> {
        let summary = self.apply_ordered(&frame)?;
        let log_index = frame.header().log_index();
        if self.replica_heads.len() == REPLICA_HEADS_KEPT_MAX {
            self.replica_heads.pop_front();
        }
        self.replica_heads.push_back((log_index, self.chain.head));
        let ratchet_tree = bytes::Bytes::new();
        self.in_flight.push_back(InFlight {
            log_index,
            log_head: self.chain.head,
            // Never acknowledged here: the authority acknowledged it.
            sender: SERVER_SENDER_ID,
            request_id: 0,
            epoch_after: self.group.epoch(),
            frame: frame.clone(),
            commit: summary.map(|summary| Box::new(CommitFollowUp { summary, welcome: None, ratchet_tree })),
        });
        Ok(Sequenced { log_index, frame })
    }

    /// The chain's head after the frame at `log_index`, if it is among the
    /// latest the replica took, or is its durable end.
    pub fn head_at(&self, log_index: u64) -> Option<LogHead> {
        let kept = self.replica_heads.iter().rev().find(|(index, _)| *index == log_index);
        let durable = self.durable_log_head().filter(|(last, _)| *last == log_index);
        kept.or(durable.as_ref()).map(|(_, head)| *head)
    }
}
