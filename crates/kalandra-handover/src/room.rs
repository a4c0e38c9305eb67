//! One domain's state machine for one federated room: which generation
//! sequences it, this domain's part in a handover, and where its copy of
//! the log ends. Inputs come with what they need (`now`, keys); outputs are
//! data. The driver carries the outputs out **in order**, and a
//! [`Output::Persist`] must be durable before any later output is carried
//! out (consecutive persists may share one transaction). If a write fails
//! the driver stops and restarts from what is durable
//! ([`DomainRoom::recover`]).

mod incoming;
mod outgoing;
mod replica;
mod sequence;

use crate::chain::chain_start;
use crate::error::{JoinError, RecoverError};
use crate::ids::{DomainId, Generation, LogIndex, RoomId};
use crate::limits::AUTHORITY_RECORDS_MAX;
use crate::message::{Acceptance, LogEntry, LogHead, Message, Refusal};
use crate::record::{AuthorityRecord, Genesis, HandoverBody};
use crate::sign::{Signer, Verifier};

pub use sequence::Sequenced;

/// What a domain keeps durably about a room, besides the log entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoomRecord {
    /// The room.
    pub room: RoomId,
    /// Every authority record, generation `i` at position `i`.
    pub records: Vec<AuthorityRecord>,
    /// As the authority: the handover the room is sealed for, not yet decided.
    pub sealed: Option<HandoverBody>,
    /// As the new authority: the handover this domain signed, not yet decided.
    pub accepted: Option<Acceptance>,
}

/// A durable write.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Durable {
    /// Replace the room's record.
    Record(Box<RoomRecord>),
    /// Append one entry to the room's log (it continues the stored log densely).
    Append(LogEntry),
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Write durably before carrying out anything after it.
    Persist(Durable),
    /// Send to one domain.
    Send {
        /// The addressee.
        to: DomainId,
        /// The message.
        message: Message,
    },
    /// Send to every other domain taking part in the room.
    Broadcast(Message),
    /// Read the stored entries `from..=through` and send each to `to` as a
    /// [`Message::Entry`].
    SendLog {
        /// The addressee.
        to: DomainId,
        /// The first entry.
        from: LogIndex,
        /// The last entry.
        through: LogIndex,
    },
    /// A relayed frame this domain may sequence: validate it (MLS, policy)
    /// and call [`DomainRoom::sequence`], or answer `origin` with a
    /// [`Message::RelayRefused`].
    ValidateRelayed {
        /// The relaying domain.
        origin: DomainId,
        /// The frame.
        frame: crate::ids::FrameDigest,
    },
    /// A frame a local user sent through this relay was sequenced.
    Acknowledged {
        /// The frame.
        frame: crate::ids::FrameDigest,
        /// Where.
        index: LogIndex,
        /// By which generation.
        generation: Generation,
    },
    /// A frame a local user sent through this relay was refused.
    Refused {
        /// The frame.
        frame: crate::ids::FrameDigest,
        /// Why.
        refusal: Refusal,
    },
    /// This replica holds the log up to a handover's seal: check the group
    /// and policy state at the seal and this domain's willingness, then call
    /// [`DomainRoom::accept_handover`] or [`DomainRoom::decline_handover`].
    ReadyToAccept(HandoverBody),
}

/// What to do with a frame a local user submits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Validate it and call [`DomainRoom::sequence`].
    SequenceHere,
    /// Relay it to the authority with [`Message::Relay`].
    Forward {
        /// The authority.
        to: DomainId,
        /// Its generation.
        generation: Generation,
    },
    /// Refuse it (retryable: see [`Refusal::is_retryable`]).
    Refuse(Refusal),
}

/// This domain's part in the room at the moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// It sequences the room.
    Authority {
        /// Its generation.
        generation: Generation,
    },
    /// It sealed the room for a handover it has not decided.
    Sealed {
        /// The handover.
        body: HandoverBody,
    },
    /// Another domain sequences the room.
    Replica {
        /// That domain.
        authority: DomainId,
        /// Its generation.
        generation: Generation,
        /// A handover to this domain that it signed and that is not decided.
        accepted: Option<HandoverBody>,
    },
}

/// Deliberate protocol bugs, for showing that the model checker finds them.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Mutation {
    /// The new authority sequences as soon as it has signed its acceptance.
    StartOnAcceptance,
    /// The old authority may abort after it signed the certificate.
    AbortAfterSigning,
    /// Nothing is ever resent (a liveness bug: a lost message is never replaced).
    NoRetries,
}

/// The keys a call may need, and (in tests) a deliberate bug.
pub struct Context<'a> {
    /// This domain's federation key.
    pub signer: &'a dyn Signer,
    /// Every domain's published key.
    pub verifier: &'a dyn Verifier,
    #[cfg(test)]
    pub(crate) mutation: Option<Mutation>,
}

impl<'a> Context<'a> {
    /// The context of calls made with these keys.
    pub fn new(signer: &'a dyn Signer, verifier: &'a dyn Verifier) -> Context<'a> {
        Context {
            signer,
            verifier,
            #[cfg(test)]
            mutation: None,
        }
    }

    pub(crate) fn mutated(&self, mutation: Mutation) -> bool {
        #[cfg(test)]
        let mutated = self.mutation == Some(mutation);
        #[cfg(not(test))]
        let mutated = {
            let _ = mutation;
            false
        };
        mutated
    }
}

/// One domain's view of one federated room.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DomainRoom {
    me: DomainId,
    record: RoomRecord,
    log: LogHead,
    /// A handover offer to this domain, waiting for the local log to reach
    /// its seal (volatile: the old authority sends the offer again).
    awaiting_log: Option<HandoverBody>,
}

fn empty_log(room: RoomId) -> LogHead {
    LogHead { next_index: LogIndex(0), chain_head: chain_start(room), last_timestamp_ms: 0 }
}

impl DomainRoom {
    /// A room this domain creates: it is the authority of generation 0. The
    /// driver then sequences the `CreateRoom` frame at index 0.
    pub fn create(room: RoomId, ctx: &Context<'_>) -> (DomainRoom, Vec<Output>) {
        let genesis = AuthorityRecord::Genesis(Genesis::sign(room, ctx.signer));
        let record = RoomRecord { room, records: vec![genesis], sealed: None, accepted: None };
        let domain = DomainRoom { me: ctx.signer.domain(), record, log: empty_log(room), awaiting_log: None };
        domain.check_invariants();
        let outputs = vec![Output::Persist(Durable::Record(Box::new(domain.record.clone())))];
        (domain, outputs)
    }

    /// A room another domain created, replicated here from its genesis record.
    pub fn join(genesis: AuthorityRecord, ctx: &Context<'_>) -> Result<(DomainRoom, Vec<Output>), JoinError> {
        let room = genesis.room();
        genesis.verify_genesis(room, ctx.verifier)?;
        if genesis.authority() == ctx.signer.domain() {
            return Err(JoinError::OwnRoom);
        }
        let record = RoomRecord { room, records: vec![genesis], sealed: None, accepted: None };
        let domain = DomainRoom { me: ctx.signer.domain(), record, log: empty_log(room), awaiting_log: None };
        domain.check_invariants();
        let outputs = vec![Output::Persist(Durable::Record(Box::new(domain.record.clone())))];
        Ok((domain, outputs))
    }

    /// Rebuilds the room from what was durable: its record and the head of
    /// its stored log.
    pub fn recover(me: DomainId, record: RoomRecord, log: LogHead) -> Result<DomainRoom, RecoverError> {
        check_record(me, &record, &log)?;
        let log = if log.next_index == LogIndex(0) { empty_log(record.room) } else { log };
        let domain = DomainRoom { me, record, log, awaiting_log: None };
        domain.check_invariants();
        Ok(domain)
    }

    /// This domain.
    pub fn me(&self) -> DomainId {
        self.me
    }

    /// The durable record (as last persisted through the outputs).
    pub fn record(&self) -> &RoomRecord {
        &self.record
    }

    /// Where the local log ends.
    pub fn log_head(&self) -> LogHead {
        self.log
    }

    /// The newest authority record.
    pub fn top(&self) -> &AuthorityRecord {
        // Invariant: never empty (checked at construction and after every change).
        &self.record.records[self.record.records.len() - 1]
    }

    /// The newest generation this domain knows.
    pub fn generation(&self) -> Generation {
        self.top().generation()
    }

    /// This domain's part in the room.
    pub fn role(&self) -> Role {
        if let Some(body) = &self.record.sealed {
            return Role::Sealed { body: body.clone() };
        }
        let top = self.top();
        if top.authority() == self.me {
            return Role::Authority { generation: top.generation() };
        }
        Role::Replica {
            authority: top.authority(),
            generation: top.generation(),
            accepted: self.record.accepted.as_ref().map(|acceptance| acceptance.body.clone()),
        }
    }

    /// What to do with a frame a local user submits.
    pub fn route(&self, ctx: &Context<'_>) -> Route {
        if self.sequences_now(ctx) {
            return Route::SequenceHere;
        }
        if let Some(body) = &self.record.sealed {
            return Route::Refuse(Refusal::Moving { to: body.to, generation: body.generation });
        }
        Route::Forward { to: self.top().authority(), generation: self.generation() }
    }

    /// Whether the old authority may still abort (it sealed and has not decided).
    pub fn may_abort(&self, ctx: &Context<'_>) -> bool {
        self.record.sealed.is_some()
            || (ctx.mutated(Mutation::AbortAfterSigning) && self.signed_top_handover())
    }

    /// The first index and the range end (inclusive, if closed) of a generation.
    fn generation_range(&self, generation: Generation) -> Option<(LogIndex, Option<LogIndex>)> {
        let position = usize::try_from(generation.0).ok()?;
        let record = self.record.records.get(position)?;
        let end = self
            .record
            .records
            .get(position + 1)
            .and_then(AuthorityRecord::body)
            .map(|body| body.sealed_index);
        Some((record.first_index(), end))
    }

    fn record_of(&self, generation: Generation) -> Option<&AuthorityRecord> {
        self.record.records.get(usize::try_from(generation.0).ok()?)
    }

    fn persist_record(&self) -> Output {
        Output::Persist(Durable::Record(Box::new(self.record.clone())))
    }

    fn signed_top_handover(&self) -> bool {
        matches!(self.top(), AuthorityRecord::Handover(certificate) if certificate.body.from == self.me)
    }

    /// Asserts the invariants of the state (in release builds too).
    fn check_invariants(&self) {
        let records = &self.record.records;
        assert!(
            !records.is_empty() && records.len() <= AUTHORITY_RECORDS_MAX,
            "authority records out of bounds"
        );
        for (position, record) in records.iter().enumerate() {
            assert_eq!(record.generation().0, position as u64, "records are indexed by generation");
            assert_eq!(record.room(), self.record.room, "records of one room");
        }
        if let Some(body) = &self.record.sealed {
            assert_eq!(self.top().authority(), self.me, "only the authority seals");
            assert_eq!(
                Some(body.generation),
                self.generation().next(),
                "a seal prepares the next generation"
            );
            assert_eq!(body.first_index(), Some(self.log.next_index), "nothing is sequenced after the seal");
            assert!(self.record.accepted.is_none(), "an authority does not accept a handover");
        }
        if let Some(acceptance) = &self.record.accepted {
            assert_eq!(acceptance.body.to, self.me, "only the addressee accepts");
            assert_eq!(
                Some(acceptance.body.generation),
                self.generation().next(),
                "acceptance of the next generation"
            );
            assert!(self.log.next_index >= acceptance.body.first_index().unwrap_or(LogIndex(u64::MAX)));
        }
        if self.top().authority() == self.me {
            assert!(
                self.log.next_index >= self.top().first_index(),
                "an authority's log reaches its first index"
            );
        }
    }
}

/// The checks of a stored record against its log.
fn check_record(me: DomainId, record: &RoomRecord, log: &LogHead) -> Result<(), RecoverError> {
    let Some((first, rest)) = record.records.split_first() else {
        return Err(RecoverError::Inconsistent("no genesis record"));
    };
    if !matches!(first, AuthorityRecord::Genesis(_)) || record.records.len() > AUTHORITY_RECORDS_MAX {
        return Err(RecoverError::Inconsistent("records do not start at genesis or exceed the limit"));
    }
    let mut previous = first;
    for next in rest {
        let body = next.body().ok_or(RecoverError::Inconsistent("genesis after generation 0"))?;
        previous.check_successor_body(body)?;
        previous = next;
    }
    if let Some(body) = &record.sealed {
        if previous.authority() != me
            || body.first_index() != Some(log.next_index)
            || record.accepted.is_some()
        {
            return Err(RecoverError::Inconsistent("seal does not match the authority or the log"));
        }
        previous.check_successor_body(body)?;
    }
    if let Some(acceptance) = &record.accepted {
        if acceptance.body.to != me || previous.authority() == me {
            return Err(RecoverError::Inconsistent("acceptance by a domain that is not its addressee"));
        }
        previous.check_successor_body(&acceptance.body)?;
    }
    if previous.authority() == me && log.next_index < previous.first_index() {
        return Err(RecoverError::Inconsistent("the authority's log ends before its generation starts"));
    }
    Ok(())
}
