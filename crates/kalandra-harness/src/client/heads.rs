//! The room log's hash chain as each simulated client holds it: the
//! server's signed heads (in acknowledgements and `SyncDone`s) go to
//! client-core's check, a violation it finds is a finding, and every head
//! the client reaches is traced for the agreement checker
//! ([`crate::check::check_heads_agree`]).

use kalandra_proto::payload::{self, Payload};
use kalandra_proto::{Frame, Opcode, RoomId};

use super::Client;

impl Client {
    /// After `frame` of `room_id` was handled: the signed heads it carries
    /// are checked, and the room's head traced.
    pub(super) fn after_frame(&mut self, room_id: RoomId, frame: &Frame) {
        let Some(log) = self.room_mut(room_id).and_then(|room| room.log.as_mut()) else { return };
        let checked = match frame.opcode() {
            Opcode::Ack => payload::Ack::decode(frame.payload()).ok().map(|ack| log.acknowledged(&ack)),
            Opcode::SyncDone => {
                payload::SyncDone::decode(frame.payload()).ok().map(|done| log.sync_done(&done))
            }
            _ => None,
        };
        let chain = log.applied_chain();
        let violation = log.chain_violation();
        if let Some(Err(error)) = checked {
            self.trace().rooms.entry(room_id).or_default().chain_violated = violation.is_some();
            self.violation(format!("log head: {error}"));
        } else if let Some(violation) = violation {
            let mut record = self.trace();
            let trace = record.rooms.entry(room_id).or_default();
            if !trace.chain_violated {
                trace.chain_violated = true;
                drop(record);
                self.violation(format!("room {room_id}: log head: {violation}"));
            }
        }
        if let Some((last, head)) = chain.and_then(|c| c.last_log_index().map(|last| (last, c.head))) {
            let mut record = self.trace();
            let heads = &mut record.rooms.entry(room_id).or_default().heads;
            if heads.last() != Some(&(last, head)) {
                heads.push((last, head));
            }
        }
    }
}
