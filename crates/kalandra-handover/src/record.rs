//! Authority records: the signed statements that say which domain
//! sequences a room in which generation, and from which log index.
//!
//! A room's records form a chain. Generation 0 is the [`Genesis`] signed by
//! the creating domain. Every later generation `g + 1` has exactly one
//! record, signed by the authority of generation `g`:
//!
//! - a [`Certificate`] (both domains signed the same [`HandoverBody`]): the
//!   body's `to` sequences from `sealed_index + 1`;
//! - a [`Resume`] (the old authority alone signed the body of a handover it
//!   prepared and then aborted): the body's `from` sequences again, from
//!   `sealed_index + 1`.
//!
//! The old authority signs at most one of the two for a generation, and
//! records its choice durably before anything leaves; that is what makes a
//! completed handover and an aborted one mutually exclusive.

use crate::ids::{ChainHead, DomainId, Epoch, Generation, LogIndex, RoomId, StateDigest};
use crate::sign::{Signature, SignatureError, Signer, Verifier};

const CERTIFICATE_LABEL: &[u8] = b"kalandra-handover-v1 certificate\0";
const RESUME_LABEL: &[u8] = b"kalandra-handover-v1 resume\0";
const GENESIS_LABEL: &[u8] = b"kalandra-handover-v1 genesis\0";

/// What a new authority must hold of the room's server-side state, by digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupSummary {
    /// The MLS epoch after the sealed index.
    pub epoch: Epoch,
    /// Digest of the room's MLS public group state after the sealed index.
    pub group_state: StateDigest,
    /// Digest of the room's server-side policy: roles, bans, join rule,
    /// retention, pending server proposals and erased indices.
    pub policy_state: StateDigest,
}

/// The content both domains sign in a handover.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandoverBody {
    /// The room.
    pub room: RoomId,
    /// The authority of generation `generation - 1`, which sealed the room.
    pub from: DomainId,
    /// The domain that takes the room over.
    pub to: DomainId,
    /// The generation this handover creates.
    pub generation: Generation,
    /// The last index of the old generation; the new one starts after it.
    pub sealed_index: LogIndex,
    /// The log's hash-chain head at `sealed_index`.
    pub chain_head: ChainHead,
    /// Server time of the entry at `sealed_index`: the new authority never
    /// stamps an earlier time, whatever its clock says.
    pub last_timestamp_ms: u64,
    /// The group and policy state at `sealed_index`.
    pub group: GroupSummary,
}

impl HandoverBody {
    /// The first index of the generation this body creates.
    pub fn first_index(&self) -> Option<LogIndex> {
        self.sealed_index.next()
    }

    fn signed_bytes(&self, label: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(label.len() + 16 + 32 * 6 + 8 * 4);
        bytes.extend_from_slice(label);
        bytes.extend_from_slice(&self.room.0);
        bytes.extend_from_slice(&self.from.0);
        bytes.extend_from_slice(&self.to.0);
        bytes.extend_from_slice(&self.generation.0.to_be_bytes());
        bytes.extend_from_slice(&self.sealed_index.0.to_be_bytes());
        bytes.extend_from_slice(&self.chain_head.0);
        bytes.extend_from_slice(&self.last_timestamp_ms.to_be_bytes());
        bytes.extend_from_slice(&self.group.epoch.0.to_be_bytes());
        bytes.extend_from_slice(&self.group.group_state.0);
        bytes.extend_from_slice(&self.group.policy_state.0);
        bytes
    }

    /// The bytes each domain signs for a certificate.
    pub fn certificate_bytes(&self) -> Vec<u8> {
        self.signed_bytes(CERTIFICATE_LABEL)
    }

    /// The bytes the old authority signs to abort this handover and resume.
    pub fn resume_bytes(&self) -> Vec<u8> {
        self.signed_bytes(RESUME_LABEL)
    }
}

/// Generation 0: the creating domain sequences the room from index 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Genesis {
    /// The room.
    pub room: RoomId,
    /// The creating domain.
    pub authority: DomainId,
    /// The creating domain's signature.
    pub signature: Signature,
}

impl Genesis {
    fn signed_bytes(room: RoomId, authority: DomainId) -> Vec<u8> {
        let mut bytes = GENESIS_LABEL.to_vec();
        bytes.extend_from_slice(&room.0);
        bytes.extend_from_slice(&authority.0);
        bytes
    }

    /// The genesis record of `room`, signed by its creator.
    pub fn sign(room: RoomId, signer: &dyn Signer) -> Genesis {
        let authority = signer.domain();
        let signature = signer.sign(&Genesis::signed_bytes(room, authority));
        Genesis { room, authority, signature }
    }
}

/// A handover signed by both domains.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Certificate {
    /// What both signed.
    pub body: HandoverBody,
    /// The old authority's signature over [`HandoverBody::certificate_bytes`].
    pub from_signature: Signature,
    /// The new authority's signature over the same bytes.
    pub to_signature: Signature,
}

/// An aborted handover: the old authority resumes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resume {
    /// The handover that was prepared and will not happen.
    pub body: HandoverBody,
    /// The old authority's signature over [`HandoverBody::resume_bytes`].
    pub signature: Signature,
}

/// One generation's authority record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthorityRecord {
    /// Generation 0.
    Genesis(Genesis),
    /// A completed handover.
    Handover(Certificate),
    /// An aborted handover.
    Resume(Resume),
}

/// Why an authority record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record is for another room.
    #[error("record for room {found:?}, expected {expected:?}")]
    WrongRoom {
        /// This room.
        expected: RoomId,
        /// The record's room.
        found: RoomId,
    },
    /// The record does not follow the previous generation.
    #[error("record of generation {found:?} where {expected:?} follows")]
    WrongGeneration {
        /// The generation that would follow.
        expected: Generation,
        /// The record's generation.
        found: Generation,
    },
    /// The record is signed off by a domain that was not the authority.
    #[error("record hands over from {found:?}, but {expected:?} was the authority")]
    WrongPredecessor {
        /// The previous generation's authority.
        expected: DomainId,
        /// The body's `from`.
        found: DomainId,
    },
    /// A certificate from a domain to itself.
    #[error("a handover from a domain to itself")]
    SelfHandover,
    /// The seal lies before the start of the generation it ends.
    #[error("sealed index {sealed:?} is before the generation's first index {first:?}")]
    SealBeforeStart {
        /// The body's sealed index.
        sealed: LogIndex,
        /// The first index of the generation being sealed.
        first: LogIndex,
    },
    /// The seal is at the end of the index range.
    #[error("sealed index is the last possible index")]
    SealAtEnd,
    /// A generation that sequenced nothing sealed at a head other than its predecessor's.
    #[error("empty generation sealed at a different chain head")]
    ChainHeadMismatch,
    /// A genesis record where a successor was expected, or the reverse.
    #[error("genesis record out of place")]
    GenesisOutOfPlace,
    /// A signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl AuthorityRecord {
    /// The generation this record opens.
    pub fn generation(&self) -> Generation {
        match self {
            AuthorityRecord::Genesis(_) => Generation(0),
            AuthorityRecord::Handover(certificate) => certificate.body.generation,
            AuthorityRecord::Resume(resume) => resume.body.generation,
        }
    }

    /// The domain that sequences the room in this generation.
    pub fn authority(&self) -> DomainId {
        match self {
            AuthorityRecord::Genesis(genesis) => genesis.authority,
            AuthorityRecord::Handover(certificate) => certificate.body.to,
            AuthorityRecord::Resume(resume) => resume.body.from,
        }
    }

    /// The room.
    pub fn room(&self) -> RoomId {
        match self {
            AuthorityRecord::Genesis(genesis) => genesis.room,
            AuthorityRecord::Handover(certificate) => certificate.body.room,
            AuthorityRecord::Resume(resume) => resume.body.room,
        }
    }

    /// The handover body, for every record but the genesis.
    pub fn body(&self) -> Option<&HandoverBody> {
        match self {
            AuthorityRecord::Genesis(_) => None,
            AuthorityRecord::Handover(certificate) => Some(&certificate.body),
            AuthorityRecord::Resume(resume) => Some(&resume.body),
        }
    }

    /// The first index this generation sequences.
    pub fn first_index(&self) -> LogIndex {
        // A body's first index exists: `verify_successor` refuses a seal at the end.
        self.body().and_then(HandoverBody::first_index).unwrap_or(LogIndex(0))
    }

    /// Checks a genesis record: the creator signed it for this room.
    pub fn verify_genesis(&self, room: RoomId, verifier: &dyn Verifier) -> Result<(), RecordError> {
        let AuthorityRecord::Genesis(genesis) = self else {
            return Err(RecordError::GenesisOutOfPlace);
        };
        if genesis.room != room {
            return Err(RecordError::WrongRoom { expected: room, found: genesis.room });
        }
        let bytes = Genesis::signed_bytes(genesis.room, genesis.authority);
        verifier.verify(genesis.authority, &bytes, &genesis.signature)?;
        Ok(())
    }

    /// Checks that `next` is a valid record of the generation after this one.
    pub fn verify_successor(
        &self,
        next: &AuthorityRecord,
        verifier: &dyn Verifier,
    ) -> Result<(), RecordError> {
        let body = next.body().ok_or(RecordError::GenesisOutOfPlace)?;
        self.check_successor_body(body)?;
        match next {
            AuthorityRecord::Genesis(_) => Err(RecordError::GenesisOutOfPlace),
            AuthorityRecord::Handover(certificate) => {
                if body.to == body.from {
                    return Err(RecordError::SelfHandover);
                }
                let bytes = body.certificate_bytes();
                verifier.verify(body.from, &bytes, &certificate.from_signature)?;
                verifier.verify(body.to, &bytes, &certificate.to_signature)?;
                Ok(())
            }
            AuthorityRecord::Resume(resume) => {
                verifier.verify(body.from, &body.resume_bytes(), &resume.signature)?;
                Ok(())
            }
        }
    }

    /// The checks of a successor's body that need no signature: room,
    /// generation, predecessor, and a seal inside the generation it ends.
    pub fn check_successor_body(&self, body: &HandoverBody) -> Result<(), RecordError> {
        if body.room != self.room() {
            return Err(RecordError::WrongRoom { expected: self.room(), found: body.room });
        }
        let expected = self.generation().next().ok_or(RecordError::SealAtEnd)?;
        if body.generation != expected {
            return Err(RecordError::WrongGeneration { expected, found: body.generation });
        }
        if body.from != self.authority() {
            return Err(RecordError::WrongPredecessor { expected: self.authority(), found: body.from });
        }
        let first = self.first_index();
        if body.first_index().ok_or(RecordError::SealAtEnd)? < first {
            return Err(RecordError::SealBeforeStart { sealed: body.sealed_index, first });
        }
        // A generation that sequenced nothing ends where its predecessor did.
        if let Some(previous) = self.body() {
            if body.sealed_index == previous.sealed_index && body.chain_head != previous.chain_head {
                return Err(RecordError::ChainHeadMismatch);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ChainHead;
    use crate::sign::{Ed25519Directory, Ed25519Signer};
    use ed25519_dalek::SigningKey;

    struct Keys {
        a: Ed25519Signer,
        b: Ed25519Signer,
        directory: Ed25519Directory,
    }

    fn keys() -> Keys {
        let a = Ed25519Signer::new(DomainId::from_name("a.example"), SigningKey::from_bytes(&[1; 32]));
        let b = Ed25519Signer::new(DomainId::from_name("b.example"), SigningKey::from_bytes(&[2; 32]));
        let mut directory = Ed25519Directory::default();
        directory.insert(a.domain(), a.verifying_key()).unwrap();
        directory.insert(b.domain(), b.verifying_key()).unwrap();
        Keys { a, b, directory }
    }

    fn body(keys: &Keys, room: RoomId) -> HandoverBody {
        HandoverBody {
            room,
            from: keys.a.domain(),
            to: keys.b.domain(),
            generation: Generation(1),
            sealed_index: LogIndex(7),
            chain_head: ChainHead([7; 32]),
            last_timestamp_ms: 1_000,
            group: GroupSummary {
                epoch: Epoch(3),
                group_state: StateDigest([3; 32]),
                policy_state: StateDigest([4; 32]),
            },
        }
    }

    #[test]
    fn an_ed25519_certificate_verifies_and_any_change_breaks_it() {
        let keys = keys();
        let room = RoomId([9; 16]);
        let genesis = AuthorityRecord::Genesis(Genesis::sign(room, &keys.a));
        genesis.verify_genesis(room, &keys.directory).unwrap();

        let body = body(&keys, room);
        let bytes = body.certificate_bytes();
        let certificate = Certificate {
            body: body.clone(),
            from_signature: keys.a.sign(&bytes),
            to_signature: keys.b.sign(&bytes),
        };
        let record = AuthorityRecord::Handover(certificate.clone());
        genesis.verify_successor(&record, &keys.directory).unwrap();
        assert_eq!(record.authority(), keys.b.domain());
        assert_eq!(record.first_index(), LogIndex(8));

        let mut tampered = certificate.clone();
        tampered.body.sealed_index = LogIndex(6);
        assert!(matches!(
            genesis.verify_successor(&AuthorityRecord::Handover(tampered), &keys.directory),
            Err(RecordError::Signature(SignatureError::Invalid(_)))
        ));

        // One domain's signature twice is not consent of both.
        let mut one_sided = certificate;
        one_sided.to_signature = one_sided.from_signature;
        assert_eq!(
            genesis.verify_successor(&AuthorityRecord::Handover(one_sided), &keys.directory),
            Err(RecordError::Signature(SignatureError::Invalid(keys.b.domain())))
        );
    }

    #[test]
    fn a_resume_signature_cannot_stand_for_a_certificate_half() {
        let keys = keys();
        let room = RoomId([9; 16]);
        let genesis = AuthorityRecord::Genesis(Genesis::sign(room, &keys.a));
        let body = body(&keys, room);
        let resume_signature = keys.a.sign(&body.resume_bytes());
        let resume = AuthorityRecord::Resume(Resume { body: body.clone(), signature: resume_signature });
        genesis.verify_successor(&resume, &keys.directory).unwrap();
        assert_eq!(resume.authority(), keys.a.domain());

        let forged = AuthorityRecord::Handover(Certificate {
            body: body.clone(),
            from_signature: resume_signature,
            to_signature: keys.b.sign(&body.certificate_bytes()),
        });
        assert!(genesis.verify_successor(&forged, &keys.directory).is_err());
    }

    #[test]
    fn successors_must_continue_the_chain() {
        let keys = keys();
        let room = RoomId([9; 16]);
        let genesis = AuthorityRecord::Genesis(Genesis::sign(room, &keys.a));
        let mut skipping = body(&keys, room);
        skipping.generation = Generation(2);
        assert!(matches!(genesis.check_successor_body(&skipping), Err(RecordError::WrongGeneration { .. })));
        let mut usurper = body(&keys, room);
        usurper.from = keys.b.domain();
        assert!(matches!(genesis.check_successor_body(&usurper), Err(RecordError::WrongPredecessor { .. })));
        let mut elsewhere = body(&keys, room);
        elsewhere.room = RoomId([8; 16]);
        assert!(matches!(genesis.check_successor_body(&elsewhere), Err(RecordError::WrongRoom { .. })));
        let mut at_end = body(&keys, room);
        at_end.sealed_index = LogIndex(u64::MAX);
        assert_eq!(genesis.check_successor_body(&at_end), Err(RecordError::SealAtEnd));
    }
}
