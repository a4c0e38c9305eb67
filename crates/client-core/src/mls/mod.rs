//! MLS (RFC 9420) through OpenMLS: the seeded provider, device identities,
//! key packages and room groups.
//!
//! Everything here is sans-IO: inputs and outputs are bytes, time is passed
//! in as seconds since the Unix epoch, and randomness comes from the
//! [`MlsProvider`] (seeded for tests and simulation, OS-seeded in
//! production).
//!
//! Wire encodings: key packages, commits, proposals, Welcomes and GroupInfos
//! travel as TLS-serialised `MLSMessage`s (RFC 9420 §6); ratchet trees travel
//! as the TLS-serialised `ratchet_tree` extension content (RFC 9420 §12.4.3.3),
//! never inside the GroupInfo, because the server holds the current tree.

mod error;
mod group;
mod identity;
mod key_package;
mod policy;
mod provider;

pub use error::{
    BoxError, CommitError, CreateRoomError, ExportError, IdentityError, JoinError, KeyPackageError,
    PendingCommitError, ProcessError, StorageError,
};
pub use group::{
    CommitApplied, CommitOutput, ExternalJoinOutput, HandshakeOutcome, LeafHome, LeafHomeCertificate,
    MemberInfo, ProposalOutput, ProposalSender, RoomCreated, RoomGroup,
};
pub use identity::{Identity, IDENTITY_SECRET_LEN};
pub use key_package::{generate_key_packages, generate_last_resort_key_package, GeneratedKeyPackage};
pub use policy::PolicyViolation;
pub use provider::{MlsProvider, RandError, SeededCrypto, SEED_LEN};

use openmls::prelude::{Capabilities, CredentialType, ExtensionType, Lifetime, ProtocolVersion};

pub use kalandra_mls::CIPHERSUITE;

/// Length of a room id, which is also the MLS group id.
pub const ROOM_ID_LEN: usize = 16;

/// Length of an Ed25519 public key, which is also a member's identity.
pub const IDENTITY_LEN: usize = 32;

/// Clock skew tolerated before a key package's validity starts.
pub const KEY_PACKAGE_SKEW_SECS: u64 = 60 * 60;

/// How long a key package (and a leaf never updated since it joined) stays
/// valid: 84 days, the longest range OpenMLS accepts together with the skew.
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 84 * 24 * 60 * 60;

/// The lifetime of a key package or initial leaf created at `now_unix_secs`.
fn lifetime_at(now_unix_secs: u64) -> Lifetime {
    Lifetime::init(
        now_unix_secs.saturating_sub(KEY_PACKAGE_SKEW_SECS),
        now_unix_secs.saturating_add(KEY_PACKAGE_LIFETIME_SECS),
    )
}

/// Capabilities advertised by every Kalandra leaf: protocol 1.0, our
/// ciphersuite, basic credentials, the last-resort extension and the home
/// certificate extension (each must be listed to appear in a leaf or key
/// package).
fn leaf_capabilities() -> Capabilities {
    Capabilities::new(
        Some(&[ProtocolVersion::Mls10]),
        Some(&[CIPHERSUITE]),
        Some(&[ExtensionType::LastResort, kalandra_mls::home_certificate_extension_type()]),
        None,
        Some(&[CredentialType::Basic]),
    )
}
