//! The new authority's side of a handover: catch up to the seal, sign an
//! acceptance (binding: only the old authority decides from then on), and
//! take over when the certificate arrives.

use super::{Context, DomainRoom, Output};
use crate::error::{AcceptError, DeclineError, MessageError};
use crate::ids::DomainId;
use crate::message::{Acceptance, LogEntry, Message};
use crate::record::{GroupSummary, HandoverBody};

impl DomainRoom {
    /// Whether `body` is a current offer to this domain from its authority.
    fn is_current_offer(&self, body: &HandoverBody) -> bool {
        body.to == self.me
            && self.top().authority() != self.me
            && self.top().check_successor_body(body).is_ok()
    }

    /// The old authority asks this domain to take the room over.
    pub(super) fn on_prepare(
        &mut self,
        from: DomainId,
        body: HandoverBody,
    ) -> Result<Vec<Output>, MessageError> {
        if body.room != self.record.room || body.to != self.me {
            return Err(MessageError::Misaddressed);
        }
        if body.generation <= self.generation() {
            return Ok(Vec::new()); // Decided already; the decision reaches us as a record.
        }
        if Some(body.generation) != self.generation().next() {
            let after = self.generation();
            return Ok(vec![Output::Send { to: from, message: Message::RecordsWanted { after } }]);
        }
        if from != body.from {
            return Err(MessageError::WrongSender { expected: body.from, found: from });
        }
        self.top().check_successor_body(&body)?;
        if let Some(acceptance) = &self.record.accepted {
            if acceptance.body != body {
                return Err(MessageError::ConflictingOffer);
            }
            let message = Message::Accept(acceptance.clone());
            return Ok(vec![Output::Send { to: from, message }]);
        }
        self.offer_when_caught_up(body)
    }

    /// Asks for the missing entries, or reports the offer ready.
    fn offer_when_caught_up(&mut self, body: HandoverBody) -> Result<Vec<Output>, MessageError> {
        let first = body
            .first_index()
            .ok_or(MessageError::Fenced { generation: body.generation, index: body.sealed_index })?;
        if self.log.next_index > first {
            return Err(MessageError::ForkedLog(first));
        }
        if self.log.next_index == first {
            if self.log.chain_head != body.chain_head || self.log.last_timestamp_ms != body.last_timestamp_ms
            {
                return Err(MessageError::ForkedLog(body.sealed_index));
            }
            self.awaiting_log = Some(body.clone());
            return Ok(vec![Output::ReadyToAccept(body)]);
        }
        let fetch = Message::FetchLog { from: self.log.next_index, generation: self.generation() };
        let to = body.from;
        self.awaiting_log = Some(body);
        Ok(vec![Output::Send { to, message: fetch }])
    }

    /// After an entry was appended: the offer waiting for it may be ready.
    pub(super) fn offer_ready_after(&mut self, entry: &LogEntry) -> Vec<Output> {
        match &self.awaiting_log {
            Some(body) if body.sealed_index == entry.index && body.chain_head == entry.chain_head => {
                vec![Output::ReadyToAccept(body.clone())]
            }
            _ => Vec::new(),
        }
    }

    /// Signs this domain's half of the certificate for `body`, after the
    /// driver checked that `group` (the local group and policy state at the
    /// seal) is what was sealed and that this domain takes the room. Binding:
    /// from the returned persist on, this domain takes the room over as
    /// soon as the certificate arrives, and cannot decline any more.
    pub fn accept_handover(
        &mut self,
        body: &HandoverBody,
        group: GroupSummary,
        ctx: &Context<'_>,
    ) -> Result<Vec<Output>, AcceptError> {
        if !self.is_current_offer(body) {
            return Err(AcceptError::NotOffered);
        }
        if let Some(acceptance) = &self.record.accepted {
            if &acceptance.body != body {
                return Err(AcceptError::AlreadyAccepted);
            }
            return Ok(vec![Output::Send { to: body.from, message: Message::Accept(acceptance.clone()) }]);
        }
        if Some(self.log.next_index) != body.first_index() {
            return Err(AcceptError::LogNotAtSeal { next: self.log.next_index, sealed: body.sealed_index });
        }
        if self.log.chain_head != body.chain_head {
            return Err(AcceptError::ChainHeadMismatch { local: self.log.chain_head });
        }
        if group != body.group {
            return Err(AcceptError::GroupMismatch { local: group });
        }
        let signature = ctx.signer.sign(&body.certificate_bytes());
        let acceptance = Acceptance { body: body.clone(), signature };
        self.record.accepted = Some(acceptance.clone());
        self.awaiting_log = None;
        self.check_invariants();
        Ok(vec![self.persist_record(), Output::Send { to: body.from, message: Message::Accept(acceptance) }])
    }

    /// Tells the old authority this domain will not take the room (it then
    /// aborts). Only before this domain signed its acceptance.
    pub fn decline_handover(&mut self, body: &HandoverBody) -> Result<Vec<Output>, DeclineError> {
        if self.record.accepted.is_some() {
            return Err(DeclineError::AlreadyAccepted);
        }
        if !self.is_current_offer(body) {
            return Err(DeclineError::NotOffered);
        }
        self.awaiting_log = None;
        Ok(vec![Output::Send { to: body.from, message: Message::Decline(body.clone()) }])
    }
}
