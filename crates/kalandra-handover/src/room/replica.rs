//! Every domain's side: messages in, fencing, the log copy, records, relaying.

use super::{Context, DomainRoom, Durable, Output, Route};
use crate::chain::chain_extend;
use crate::error::MessageError;
use crate::ids::{DomainId, FrameDigest, Generation, LogIndex};
use crate::limits::{LOG_PAGE_ENTRIES_MAX, RECORDS_PAGE_MAX};
use crate::message::{LogEntry, Message, Refusal};
use crate::record::AuthorityRecord;

impl DomainRoom {
    /// Handles a message from domain `from` (authenticated by the transport).
    pub fn handle_message(
        &mut self,
        from: DomainId,
        message: Message,
        ctx: &Context<'_>,
    ) -> Result<Vec<Output>, MessageError> {
        if from == self.me {
            return Err(MessageError::WrongSender { expected: self.top().authority(), found: from });
        }
        let outputs = match message {
            Message::Relay { frame, generation } => Ok(self.on_relay(from, frame, generation, ctx)),
            Message::RelayAck { frame, index, generation } => {
                self.on_relay_ack(from, frame, index, generation)
            }
            Message::RelayRefused { frame, refusal } => Ok(vec![Output::Refused { frame, refusal }]),
            Message::Entry(entry) => self.on_entry(from, entry),
            Message::FetchLog { from: start, generation } => Ok(self.on_fetch_log(from, start, generation)),
            Message::Prepare(body) => self.on_prepare(from, body),
            Message::Accept(acceptance) => self.on_accept(from, acceptance, ctx),
            Message::Decline(body) => self.on_decline(from, body, ctx),
            Message::Records(records) => self.on_records(from, records, ctx),
            Message::RecordsWanted { after } => Ok(self.records_after(from, after)),
        }?;
        self.check_invariants();
        Ok(outputs)
    }

    /// What to resend now: the driver calls this periodically (every few
    /// hundred milliseconds, and when a link to a domain comes back). It
    /// never changes the room's state, and no timer does: a seal ends only
    /// with a signed record.
    pub fn retry_tick(&self, ctx: &Context<'_>) -> Vec<Output> {
        let mut outputs = Vec::new();
        if ctx.mutated(super::Mutation::NoRetries) {
            return outputs;
        }
        if let Some(body) = &self.record.sealed {
            outputs.push(Output::Send { to: body.to, message: Message::Prepare(body.clone()) });
        }
        if let Some(acceptance) = &self.record.accepted {
            outputs.push(Output::Send {
                to: acceptance.body.from,
                message: Message::Accept(acceptance.clone()),
            });
        }
        let fetch = Message::FetchLog { from: self.log.next_index, generation: self.generation() };
        if let Some(body) = &self.awaiting_log {
            outputs.push(Output::Send { to: body.from, message: fetch.clone() });
        }
        let authority = self.top().authority();
        if authority != self.me {
            outputs.push(Output::Send { to: authority, message: fetch });
        }
        outputs
    }

    /// A relay's frame: sequence it here (after validation), or refuse it
    /// with where to go, sending the relay the records it lacks.
    fn on_relay(
        &self,
        origin: DomainId,
        frame: FrameDigest,
        generation: Generation,
        ctx: &Context<'_>,
    ) -> Vec<Output> {
        let mut outputs = Vec::new();
        let current = self.generation();
        if generation > current {
            outputs.push(Output::Send { to: origin, message: Message::RecordsWanted { after: current } });
        }
        if generation < current {
            outputs.extend(self.records_after(origin, generation));
        }
        let refusal = match self.route(ctx) {
            Route::SequenceHere if generation == current => {
                outputs.push(Output::ValidateRelayed { origin, frame });
                return outputs;
            }
            Route::SequenceHere => Refusal::RouteStale { generation: current },
            Route::Refuse(refusal) => refusal,
            Route::Forward { to, generation } => Refusal::NotAuthority { authority: to, generation },
        };
        outputs.push(Output::Send { to: origin, message: Message::RelayRefused { frame, refusal } });
        outputs
    }

    /// The authority's acknowledgement of a frame this domain relayed:
    /// passed on only if that generation's authority sent it for an index
    /// the generation covers.
    fn on_relay_ack(
        &self,
        from: DomainId,
        frame: FrameDigest,
        index: LogIndex,
        generation: Generation,
    ) -> Result<Vec<Output>, MessageError> {
        let record = self.record_of(generation).ok_or(MessageError::UnknownGeneration(generation))?;
        if record.authority() != from {
            return Err(MessageError::WrongSender { expected: record.authority(), found: from });
        }
        self.check_in_range(generation, index)?;
        Ok(vec![Output::Acknowledged { frame, index, generation }])
    }

    /// Fencing: `index` lies within `generation`'s range, and beyond a seal
    /// this domain knows of (its own, or one it accepted).
    fn check_in_range(&self, generation: Generation, index: LogIndex) -> Result<(), MessageError> {
        let fenced = MessageError::Fenced { generation, index };
        let (first, end) =
            self.generation_range(generation).ok_or(MessageError::UnknownGeneration(generation))?;
        if index < first || end.is_some_and(|end| index > end) {
            return Err(fenced);
        }
        if generation == self.generation() {
            let sealed = self.record.sealed.as_ref().or(self.record.accepted.as_ref().map(|a| &a.body));
            if sealed.is_some_and(|body| index > body.sealed_index) {
                return Err(fenced);
            }
        }
        Ok(())
    }

    /// A log entry, live or fetched.
    fn on_entry(&mut self, from: DomainId, entry: LogEntry) -> Result<Vec<Output>, MessageError> {
        if entry.generation > self.generation() {
            let after = self.generation();
            return Ok(vec![Output::Send { to: from, message: Message::RecordsWanted { after } }]);
        }
        self.check_in_range(entry.generation, entry.index)?;
        let (_, end) =
            self.generation_range(entry.generation).ok_or(MessageError::Internal("range vanished"))?;
        let author = self.record_of(entry.generation).map(AuthorityRecord::authority);
        if end.is_none() && author != Some(from) {
            let expected = author.unwrap_or(from);
            return Err(MessageError::WrongSender { expected, found: from });
        }
        if entry.index < self.log.next_index {
            return Ok(Vec::new());
        }
        if author == Some(self.me) && end.is_none() {
            return Err(MessageError::ForkedLog(entry.index)); // Our own open generation, beyond our log.
        }
        if entry.index > self.log.next_index {
            let message = Message::FetchLog { from: self.log.next_index, generation: self.generation() };
            return Ok(vec![Output::Send { to: from, message }]);
        }
        self.append(entry, end)
    }

    /// Appends the entry at the next index, if it continues the chain.
    fn append(&mut self, entry: LogEntry, end: Option<LogIndex>) -> Result<Vec<Output>, MessageError> {
        let expected =
            chain_extend(self.log.chain_head, entry.index, entry.generation, entry.timestamp_ms, entry.frame);
        if entry.chain_head != expected {
            return Err(MessageError::ForkedLog(entry.index));
        }
        if entry.timestamp_ms < self.log.last_timestamp_ms {
            return Err(MessageError::TimestampRegressed(entry.index));
        }
        if end == Some(entry.index) {
            let sealed =
                self.record_of(entry.generation.next().unwrap_or(entry.generation)).and_then(|r| r.body());
            if sealed.is_some_and(|body| body.chain_head != entry.chain_head) {
                return Err(MessageError::ForkedLog(entry.index));
            }
        }
        let next_index = entry
            .index
            .next()
            .ok_or(MessageError::Fenced { generation: entry.generation, index: entry.index })?;
        self.log.next_index = next_index;
        self.log.chain_head = entry.chain_head;
        self.log.last_timestamp_ms = entry.timestamp_ms;
        let mut outputs = self.offer_ready_after(&entry);
        outputs.insert(0, Output::Persist(Durable::Append(entry)));
        Ok(outputs)
    }

    /// Answers a `FetchLog`: the records the asker lacks, and a page of entries.
    fn on_fetch_log(&self, to: DomainId, start: LogIndex, generation: Generation) -> Vec<Output> {
        let mut outputs = Vec::new();
        if generation < self.generation() {
            outputs.extend(self.records_after(to, generation));
        }
        if start < self.log.next_index {
            let last = LogIndex(self.log.next_index.0 - 1);
            let through = LogIndex(start.0.saturating_add(LOG_PAGE_ENTRIES_MAX - 1).min(last.0));
            outputs.push(Output::SendLog { to, from: start, through });
        }
        outputs
    }

    /// A page of the records after `after`, for `to`.
    fn records_after(&self, to: DomainId, after: Generation) -> Vec<Output> {
        let start = usize::try_from(after.0).unwrap_or(usize::MAX).saturating_add(1);
        let Some(rest) = self.record.records.get(start..) else {
            return Vec::new();
        };
        if rest.is_empty() {
            return Vec::new();
        }
        let page = rest[..rest.len().min(RECORDS_PAGE_MAX)].to_vec();
        vec![Output::Send { to, message: Message::Records(page) }]
    }

    /// Authority records: adopt those that continue the chain, all or nothing.
    fn on_records(
        &mut self,
        from: DomainId,
        records: Vec<AuthorityRecord>,
        ctx: &Context<'_>,
    ) -> Result<Vec<Output>, MessageError> {
        if records.len() > RECORDS_PAGE_MAX {
            return Err(MessageError::TooManyRecords);
        }
        let mut next = self.clone();
        let mut outputs = Vec::new();
        for record in records {
            let generation = record.generation();
            if generation <= next.generation() {
                if next.record_of(generation) != Some(&record) {
                    return Err(MessageError::Equivocation(generation));
                }
                continue;
            }
            if Some(generation) != next.generation().next() {
                let after = next.generation();
                outputs.push(Output::Send { to: from, message: Message::RecordsWanted { after } });
                break;
            }
            next.adopt(record, ctx)?;
        }
        if next.record.records.len() == self.record.records.len() {
            return Ok(outputs);
        }
        next.check_invariants();
        let installed = next.top().authority() == next.me && self.top().authority() != self.me;
        *self = next;
        outputs.insert(0, self.persist_record());
        if installed {
            outputs.push(Output::Broadcast(Message::Records(vec![self.top().clone()])));
        }
        Ok(outputs)
    }

    /// Adopts the record of the next generation after checking it and the
    /// local log against it.
    fn adopt(&mut self, record: AuthorityRecord, ctx: &Context<'_>) -> Result<(), MessageError> {
        self.top().verify_successor(&record, ctx.verifier)?;
        let body = record.body().ok_or(MessageError::Internal("a verified successor has a body"))?;
        let first =
            body.first_index().ok_or(MessageError::Internal("a verified seal has a successor index"))?;
        if self.log.next_index > first {
            return Err(MessageError::ForkedLog(first));
        }
        if self.log.next_index == first && self.log.chain_head != body.chain_head {
            return Err(MessageError::ForkedLog(body.sealed_index));
        }
        if record.authority() == self.me && self.log.next_index != first {
            return Err(MessageError::Internal("a record names this domain, whose log is behind its seal"));
        }
        let generation = record.generation();
        if self.record.sealed.as_ref().is_some_and(|sealed| sealed.generation == generation) {
            self.record.sealed = None;
        }
        if self.record.accepted.as_ref().is_some_and(|accepted| accepted.body.generation == generation) {
            self.record.accepted = None;
        }
        if self.awaiting_log.as_ref().is_some_and(|awaiting| awaiting.generation <= generation) {
            self.awaiting_log = None;
        }
        self.record.records.push(record);
        Ok(())
    }
}
