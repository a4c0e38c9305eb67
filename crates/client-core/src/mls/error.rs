//! Typed errors, one enum per family of operations.
//!
//! Variants separate what the caller must react to (bad input from a peer,
//! wrong epoch, wrong state) from internal failures (OpenMLS library errors,
//! storage), which carry the OpenMLS error as their source.

use openmls::prelude::{CryptoError, KeyPackageNewError, KeyPackageVerifyError};

/// An underlying error kept as the source of a typed variant.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Creating or restoring an [`Identity`](super::Identity).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The exported secret has the wrong length.
    #[error("identity secret must be {expected} bytes, got {actual}")]
    InvalidSecretLength {
        /// Required length.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// The crypto provider could not generate a key.
    #[error("signature key generation failed: {0:?}")]
    KeyGeneration(CryptoError),
}

/// Generating key packages.
#[derive(Debug, thiserror::Error)]
pub enum KeyPackageError {
    /// OpenMLS could not build or store the key package.
    #[error("building the key package failed")]
    Build(#[source] KeyPackageNewError),
    /// Serialising the key package failed.
    #[error("encoding the key package failed")]
    Encode(#[source] tls_codec::Error),
    /// An OpenMLS invariant failed.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Creating a room.
#[derive(Debug, thiserror::Error)]
pub enum CreateRoomError {
    /// The server's signature key is not 32 bytes long.
    #[error("server signature key must be 32 bytes, got {0}")]
    InvalidServerKeyLength(usize),
    /// The server's signature key is not a valid Ed25519 public key.
    #[error("server signature key is not a valid Ed25519 public key")]
    InvalidServerKey,
    /// A group with this room id already exists in the provider's storage.
    #[error("a group with this room id already exists")]
    AlreadyExists,
    /// OpenMLS failed to create the group or its GroupInfo, or storage failed.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Creating a commit or a proposal (add, remove, self-update, leave, commit
/// of pending proposals).
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A key package does not decode.
    #[error("key package {index} is malformed")]
    MalformedKeyPackage {
        /// Position in the input.
        index: usize,
        /// Decoding error.
        #[source]
        source: tls_codec::Error,
    },
    /// An input is a valid `MLSMessage` but not a key package.
    #[error("input {index} is not a key package")]
    NotAKeyPackage {
        /// Position in the input.
        index: usize,
    },
    /// A key package fails verification (signature, lifetime, ciphersuite).
    #[error("key package {index} is invalid")]
    InvalidKeyPackage {
        /// Position in the input.
        index: usize,
        /// Why.
        #[source]
        source: KeyPackageVerifyError,
    },
    /// Nothing to do: the input list is empty.
    #[error("no members given")]
    EmptyInput,
    /// There is no member at this leaf.
    #[error("no member at leaf {0}")]
    UnknownMember(u32),
    /// The committer cannot remove itself by commit; use `leave`.
    #[error("a member cannot commit its own removal")]
    SelfRemoval,
    /// A commit of ours is still waiting for the server's verdict.
    #[error("a commit is already pending")]
    CommitPending,
    /// We are no longer a member of this group.
    #[error("this device is no longer a member of the group")]
    NotAMember,
    /// OpenMLS rejected the operation (for example an invalid proposal set).
    #[error("OpenMLS refused the operation")]
    Rejected(#[source] BoxError),
    /// OpenMLS library error, storage or encoding failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Confirming or discarding a pending commit.
#[derive(Debug, thiserror::Error)]
pub enum PendingCommitError {
    /// There is no pending commit.
    #[error("no commit is pending")]
    NoPendingCommit,
    /// Merging or storing failed.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Joining a room (from a Welcome or by external commit).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The message does not decode.
    #[error("malformed message")]
    Malformed(#[source] tls_codec::Error),
    /// The message is not a Welcome.
    #[error("message is not a Welcome")]
    NotAWelcome,
    /// The message is not a GroupInfo.
    #[error("message is not a GroupInfo")]
    NotAGroupInfo,
    /// The ratchet tree does not decode.
    #[error("malformed ratchet tree")]
    MalformedRatchetTree(#[source] tls_codec::Error),
    /// The Welcome is not for any key package of ours.
    #[error("the Welcome is not addressed to this device")]
    NotForUs,
    /// The Welcome, GroupInfo or tree is invalid (signature, tree hash,
    /// missing tree, unsupported parameters).
    #[error("invalid Welcome, GroupInfo or ratchet tree")]
    Invalid(#[source] BoxError),
    /// OpenMLS library error, storage or encoding failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Processing an incoming handshake message.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The message does not decode.
    #[error("malformed message")]
    Malformed(#[source] tls_codec::Error),
    /// The message is not a `PublicMessage` (handshake messages must be).
    #[error("not a PublicMessage")]
    NotAPublicMessage,
    /// The message is for another group.
    #[error("message is for another group")]
    WrongGroup,
    /// The message is for another epoch.
    #[error("message is for epoch {message_epoch}, group is at {current_epoch}")]
    WrongEpoch {
        /// Epoch in the message.
        message_epoch: u64,
        /// Our epoch.
        current_epoch: u64,
    },
    /// The message is our own commit: confirm or discard the pending commit
    /// instead of processing it.
    #[error("message is our own commit")]
    OwnCommit,
    /// The message is an application message or an external join proposal,
    /// which Kalandra does not use.
    #[error("unsupported content")]
    Unsupported,
    /// OpenMLS rejected the message: the sender misbehaved (bad signature,
    /// membership tag, invalid proposals or path).
    #[error("invalid message")]
    Invalid(#[source] BoxError),
    /// We are no longer a member of this group.
    #[error("this device is no longer a member of the group")]
    NotAMember,
    /// OpenMLS library error or storage failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl ProcessError {
    /// Whether the message's sender is at fault (as opposed to us or a
    /// race with another commit).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Self::Malformed(_)
                | Self::NotAPublicMessage
                | Self::WrongGroup
                | Self::Unsupported
                | Self::Invalid(_)
        )
    }
}

/// Loading or deleting a group in the provider's storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The storage backend failed.
    #[error("storage failure")]
    Storage(#[source] BoxError),
}

/// Exporting a secret or the group state.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// OpenMLS refused (for example a length too large for the KDF).
    #[error("export failed")]
    Export(#[source] BoxError),
    /// Encoding failed.
    #[error("encoding failed")]
    Encode(#[source] tls_codec::Error),
}
