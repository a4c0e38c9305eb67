//! The old authority's side of a handover: seal, then decide once —
//! complete (sign the certificate) or abort (sign a resume record).

use super::{Context, DomainRoom, Output};
use crate::error::{AbortError, BeginError, MessageError};
use crate::ids::{DomainId, LogIndex};
use crate::limits::AUTHORITY_RECORDS_MAX;
use crate::message::{Acceptance, Message};
use crate::record::{AuthorityRecord, Certificate, GroupSummary, HandoverBody, Resume};

impl DomainRoom {
    /// Seals the room at its last entry for a handover to `to`. From the
    /// returned persist on, this domain sequences nothing in this room
    /// unless it aborts. `group` is the group and policy state after the
    /// last entry (the sequencer's).
    pub fn begin_handover(&mut self, to: DomainId, group: GroupSummary) -> Result<Vec<Output>, BeginError> {
        if let Some(body) = &self.record.sealed {
            return Err(BeginError::AlreadySealed { to: body.to });
        }
        if self.top().authority() != self.me {
            return Err(BeginError::NotAuthority);
        }
        if to == self.me {
            return Err(BeginError::TargetIsSelf);
        }
        if self.record.records.len() >= AUTHORITY_RECORDS_MAX {
            return Err(BeginError::TooManyRecords);
        }
        let sealed_index = LogIndex(self.log.next_index.0.checked_sub(1).ok_or(BeginError::EmptyLog)?);
        let generation = self.generation().next().ok_or(BeginError::TooManyRecords)?;
        let body = HandoverBody {
            room: self.record.room,
            from: self.me,
            to,
            generation,
            sealed_index,
            chain_head: self.log.chain_head,
            last_timestamp_ms: self.log.last_timestamp_ms,
            group,
        };
        // Refused only if this domain's own records are inconsistent.
        self.top().check_successor_body(&body).map_err(|_| BeginError::NotAuthority)?;
        self.record.sealed = Some(body.clone());
        self.check_invariants();
        Ok(vec![self.persist_record(), Output::Send { to, message: Message::Prepare(body) }])
    }

    /// Aborts the undecided handover: signs a resume record, after which
    /// this domain sequences again, at the next generation. Refused once the
    /// certificate is signed.
    pub fn abort_handover(&mut self, ctx: &Context<'_>) -> Result<Vec<Output>, AbortError> {
        let body = match self.record.sealed.take() {
            Some(body) => body,
            None if self.may_abort(ctx) => self.unsign_top_handover(),
            None => return Err(AbortError::NotSealed),
        };
        let signature = ctx.signer.sign(&body.resume_bytes());
        let record = AuthorityRecord::Resume(Resume { body: body.clone(), signature });
        self.record.records.push(record.clone());
        self.check_invariants();
        Ok(vec![
            self.persist_record(),
            Output::Send { to: body.to, message: Message::Records(vec![record.clone()]) },
            Output::Broadcast(Message::Records(vec![record])),
        ])
    }

    /// Only under the `AbortAfterSigning` mutation: forget the signed certificate.
    fn unsign_top_handover(&mut self) -> HandoverBody {
        match self.record.records.pop() {
            Some(AuthorityRecord::Handover(certificate)) => certificate.body,
            _ => unreachable!("may_abort checked that the top record is a handover this domain signed"),
        }
    }

    /// The addressee signed its half: complete the certificate, or answer
    /// with the decision already taken.
    pub(super) fn on_accept(
        &mut self,
        from: DomainId,
        acceptance: Acceptance,
        ctx: &Context<'_>,
    ) -> Result<Vec<Output>, MessageError> {
        let body = &acceptance.body;
        if from != body.to {
            return Err(MessageError::WrongSender { expected: body.to, found: from });
        }
        if self.record.sealed.as_ref() == Some(body) {
            ctx.verifier
                .verify(body.to, &body.certificate_bytes(), &acceptance.signature)
                .map_err(|error| MessageError::Record(error.into()))?;
            return Ok(self.complete(acceptance, ctx));
        }
        // Decided already: send the decision again.
        match self.record_of(body.generation) {
            Some(record) if record.body() == Some(body) => {
                Ok(vec![Output::Send { to: from, message: Message::Records(vec![record.clone()]) }])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn complete(&mut self, acceptance: Acceptance, ctx: &Context<'_>) -> Vec<Output> {
        let body = acceptance.body;
        let from_signature = ctx.signer.sign(&body.certificate_bytes());
        let to = body.to;
        let record = AuthorityRecord::Handover(Certificate {
            body,
            from_signature,
            to_signature: acceptance.signature,
        });
        self.record.sealed = None;
        self.record.records.push(record.clone());
        self.check_invariants();
        vec![
            self.persist_record(),
            Output::Send { to, message: Message::Records(vec![record.clone()]) },
            Output::Broadcast(Message::Records(vec![record])),
        ]
    }

    /// The addressee will not take the room: abort.
    pub(super) fn on_decline(
        &mut self,
        from: DomainId,
        body: HandoverBody,
        ctx: &Context<'_>,
    ) -> Result<Vec<Output>, MessageError> {
        if from != body.to {
            return Err(MessageError::WrongSender { expected: body.to, found: from });
        }
        if self.record.sealed.as_ref() != Some(&body) {
            return Ok(Vec::new());
        }
        self.abort_handover(ctx).map_err(|_| MessageError::Internal("sealed handover could not be aborted"))
    }
}
