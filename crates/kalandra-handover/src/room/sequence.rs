//! The authority's side: sequencing frames.

use super::{Context, DomainRoom, Durable, Mutation, Output, Route};
use crate::chain::chain_extend;
use crate::error::SequenceError;
use crate::ids::{DomainId, FrameDigest, Generation};
use crate::message::{LogEntry, Message};

/// A frame sequenced: its entry and what to do, in order (persist the
/// entry; then acknowledge and fan out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequenced {
    /// The entry.
    pub entry: LogEntry,
    /// The outputs.
    pub outputs: Vec<Output>,
}

impl DomainRoom {
    /// Whether this domain sequences frames now.
    pub(super) fn sequences_now(&self, ctx: &Context<'_>) -> bool {
        let authority = self.top().authority() == self.me && self.record.sealed.is_none();
        authority || (ctx.mutated(Mutation::StartOnAcceptance) && self.record.accepted.is_some())
    }

    fn sequencing_generation(&self, ctx: &Context<'_>) -> Generation {
        match &self.record.accepted {
            Some(acceptance) if ctx.mutated(Mutation::StartOnAcceptance) => acceptance.body.generation,
            _ => self.generation(),
        }
    }

    /// Sequences a validated frame at the next index, stamped with
    /// `max(now_ms, the last entry's time)`. `origin` is the relaying domain
    /// of a relayed frame (acknowledged through the outputs), `None` for a
    /// local user's (the driver acknowledges after the outputs).
    pub fn sequence(
        &mut self,
        frame: FrameDigest,
        origin: Option<DomainId>,
        now_ms: u64,
        ctx: &Context<'_>,
    ) -> Result<Sequenced, SequenceError> {
        if !self.sequences_now(ctx) {
            let Route::Refuse(refusal) = self.route(ctx) else {
                let (authority, generation) = (self.top().authority(), self.generation());
                return Err(SequenceError::NotSequencing(crate::message::Refusal::NotAuthority {
                    authority,
                    generation,
                }));
            };
            return Err(SequenceError::NotSequencing(refusal));
        }
        let index = self.log.next_index;
        let next_index = index.next().ok_or(SequenceError::IndexExhausted)?;
        let generation = self.sequencing_generation(ctx);
        let timestamp_ms = now_ms.max(self.log.last_timestamp_ms);
        let chain_head = chain_extend(self.log.chain_head, index, generation, timestamp_ms, frame);
        let entry = LogEntry { index, generation, frame, timestamp_ms, chain_head };

        assert!(timestamp_ms >= self.log.last_timestamp_ms, "server time never goes backwards");
        self.log.next_index = next_index;
        self.log.chain_head = chain_head;
        self.log.last_timestamp_ms = timestamp_ms;
        self.check_invariants();

        let mut outputs = vec![
            Output::Persist(Durable::Append(entry.clone())),
            Output::Broadcast(Message::Entry(entry.clone())),
        ];
        if let Some(origin) = origin {
            outputs
                .push(Output::Send { to: origin, message: Message::RelayAck { frame, index, generation } });
        }
        Ok(Sequenced { entry, outputs })
    }
}
