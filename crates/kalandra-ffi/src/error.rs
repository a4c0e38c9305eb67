//! The error the bindings raise: one exception type for the device, with a
//! variant per failure class, carrying the server's error code and
//! name when the server refused.

use client_core::client::ClientError;
use kalandra_proto::ErrorCode;

/// Why a device call failed (raised as `KalandraException` in Kotlin,
/// `KalandraError` in Swift and Python).
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum KalandraError {
    /// The server refused the request: `code` and `name` are those of the
    /// wire protocol's error codes (docs/wire-protocol.md).
    #[error("the server refused: {name} ({code}): {detail}")]
    Refused {
        /// The error code.
        code: u16,
        /// Its name, e.g. `NotMember`.
        name: String,
        /// The server's message.
        detail: String,
    },
    /// No connection, or the connection failed: retry once connected.
    #[error("connection: {detail}")]
    Connection {
        /// What happened.
        detail: String,
    },
    /// The call was not valid here (unknown room, not a member, a message
    /// too long, an argument of the wrong length, no client in the
    /// directory, ...).
    #[error("invalid call: {detail}")]
    InvalidCall {
        /// What was wrong.
        detail: String,
    },
    /// The device's store or a file failed, or is damaged.
    #[error("storage: {detail}")]
    Storage {
        /// What failed.
        detail: String,
    },
    /// The server broke the protocol.
    #[error("server misbehaved: {detail}")]
    Protocol {
        /// What it did.
        detail: String,
    },
    /// The room kept moving, or MLS refused: the intent stays undone.
    #[error("failed: {detail}")]
    Failed {
        /// What failed.
        detail: String,
    },
    /// A bug in this library.
    #[error("internal error: {detail}")]
    Internal {
        /// The bug.
        detail: String,
    },
}

impl KalandraError {
    /// An argument the caller got wrong.
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        KalandraError::InvalidCall { detail: detail.into() }
    }
}

impl From<ClientError> for KalandraError {
    fn from(error: ClientError) -> Self {
        let detail = error.to_string();
        let code = error.code();
        match error {
            ClientError::Refused { code, name, message } => {
                KalandraError::Refused { code, name: name.to_owned(), detail: message }
            }
            ClientError::UnknownDomain { message }
            | ClientError::FederationRefused { message }
            | ClientError::DomainUnreachable { message, .. } => {
                let name = code.and_then(ErrorCode::from_u16).map_or("Unknown", ErrorCode::name);
                KalandraError::Refused {
                    code: code.unwrap_or_default(),
                    name: name.to_owned(),
                    detail: message,
                }
            }
            ClientError::NotConnected | ClientError::Connection(_) => KalandraError::Connection { detail },
            ClientError::NotInitialised { .. }
            | ClientError::AlreadyInitialised { .. }
            | ClientError::UnknownRoom(_)
            | ClientError::NotMember(_)
            | ClientError::RemovalPending(_)
            | ClientError::Undelivered { .. }
            | ClientError::UnknownMember(_)
            | ClientError::NoKeyPackage(_)
            | ClientError::OutboxFull
            | ClientError::MessageTooLarge { .. }
            | ClientError::SealPush(_) => KalandraError::InvalidCall { detail },
            ClientError::Store(_) | ClientError::Corrupt(_) | ClientError::MlsStorage(_) => {
                KalandraError::Storage { detail }
            }
            ClientError::Protocol(_) | ClientError::Process(_) | ClientError::LogHead(_) => {
                KalandraError::Protocol { detail }
            }
            ClientError::Internal(_) => KalandraError::Internal { detail },
            _ => KalandraError::Failed { detail },
        }
    }
}
