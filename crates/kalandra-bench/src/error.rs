//! Why a benchmark run failed.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit code: the server could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: the server process could not be started.
pub const EXIT_SERVER_START: u8 = 4;
/// Exit code: the server refused or broke off the run.
pub const EXIT_SERVER_FAILED: u8 = 5;
/// Exit code: invalid arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: any other failure (client-side MLS, the baseline, timeouts).
pub const EXIT_OTHER: u8 = 1;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No server answered at the address.
    #[error("cannot reach the server at {address}: {detail}")]
    Unreachable {
        /// The address tried.
        address: SocketAddr,
        /// What the QUIC client reported.
        detail: String,
    },
    /// The server binary could not be started or did not come up.
    #[error("cannot start the server {path}: {detail}")]
    ServerStart {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The server answered a request with an error.
    #[error("the server refused {request}: error {code}: {message}")]
    Refused {
        /// What was asked.
        request: &'static str,
        /// The error code.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// A connection failed after it was established.
    #[error("connection failed during {during}: {detail}")]
    Connection {
        /// What the generator was doing.
        during: &'static str,
        /// What the client reported.
        detail: String,
    },
    /// The server sent something the generator did not expect.
    #[error("unexpected answer to {request}: {detail}")]
    Unexpected {
        /// What was asked.
        request: &'static str,
        /// What came back.
        detail: String,
    },
    /// Client-side MLS or sender-key work failed (a bug in the generator or client-core).
    #[error("client {what}: {detail}")]
    Client {
        /// The operation.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// Arguments out of range.
    #[error("invalid arguments: {0}")]
    Usage(String),
    /// The run's timed part did not finish in time.
    #[error("{what} did not finish within {timeout_ms} ms")]
    TimedOut {
        /// What was waited for.
        what: &'static str,
        /// The bound.
        timeout_ms: u64,
    },
    /// The JetStream baseline failed.
    #[error("JetStream baseline: {0}")]
    JetStream(String),
    /// Reading /proc or the local file system failed.
    #[error("{what}: {detail}")]
    Io {
        /// What was read or written.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

impl BenchError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Unreachable { .. } => EXIT_UNREACHABLE,
            BenchError::ServerStart { .. } => EXIT_SERVER_START,
            BenchError::Refused { .. } | BenchError::Connection { .. } | BenchError::Unexpected { .. } => {
                EXIT_SERVER_FAILED
            }
            BenchError::Usage(_) => EXIT_USAGE,
            BenchError::Client { .. }
            | BenchError::TimedOut { .. }
            | BenchError::JetStream(_)
            | BenchError::Io { .. } => EXIT_OTHER,
        }
    }

    /// A client-side error.
    pub fn client(what: &'static str, error: impl std::fmt::Display) -> BenchError {
        BenchError::Client { what, detail: error.to_string() }
    }
}
