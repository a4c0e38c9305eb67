//! Authority handover for federated Kalandra rooms, as a pure core.
//!
//! A room has exactly one authoritative domain at a time, which sequences
//! it. This crate decides how that authority moves from one domain to
//! another without two domains ever sequencing the same generation or
//! index: the old authority seals the room at its last index, both domains
//! sign a certificate naming the next generation, and every domain fences
//! out what an older generation sends beyond its seal. The protocol is
//! described in `docs/HANDOVER.md`.
//!
//! Everything here is sans-IO: [`DomainRoom`] takes inputs (messages, the
//! time, the keys in a [`Context`]) and returns [`Output`]s as data; no
//! sockets, clocks, threads or randomness. Servers will drive it once
//! federation exists; the model checker in this crate's tests drives it now.

#![forbid(unsafe_code)]

pub mod chain;
pub mod client;
pub mod error;
pub mod ids;
pub mod limits;
pub mod message;
pub mod record;
pub mod room;
pub mod sign;

#[cfg(test)]
mod boundaries;
#[cfg(test)]
mod model;

pub use error::{
    AbortError, AcceptError, BeginError, DeclineError, JoinError, MessageError, RecoverError, SequenceError,
};
pub use ids::{ChainHead, DomainId, Epoch, FrameDigest, Generation, LogIndex, RoomId, StateDigest};
pub use message::{Acceptance, LogEntry, LogHead, Message, Refusal};
pub use record::{AuthorityRecord, Certificate, Genesis, GroupSummary, HandoverBody, Resume};
pub use room::{Context, DomainRoom, Durable, Output, Role, RoomRecord, Route, Sequenced};
pub use sign::{Ed25519Directory, Ed25519Signer, Signature, SignatureError, Signer, Verifier};
