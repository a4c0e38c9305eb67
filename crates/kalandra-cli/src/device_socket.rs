//! One device, several `kalandra` commands at once.
//!
//! A device's store is open in one process at a time (its MLS and
//! sender-key state lives in that process's memory: two processes writing it
//! would reuse a key generation). A long-running command (`tail`, `chat`)
//! therefore serves the device to other invocations over a Unix socket in
//! the device directory ([`SOCKET_FILE_NAME`], mode 0600): `send`,
//! `history`, `whoami` and `room list` find the socket, hand their request to
//! the running command, and print its answer. Requests are one JSON line
//! each way.
//!
//! A socket left behind by a killed command refuses connections; the next
//! command then opens the store itself, and the next long-running command
//! replaces the socket file (it holds the store's lock first, so two never
//! race for it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The socket's file name in the device directory.
pub const SOCKET_FILE_NAME: &str = "kalandra.sock";
/// Longest request or answer line (a longer answer is replaced by an error).
pub const LINE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Requests waiting for the serving command, at most.
pub const REQUESTS_QUEUED_MAX: usize = 16;
/// Connections to the socket served at once, at most.
pub const CONNECTIONS_MAX: usize = 8;
/// How long a connecting command has to send its request.
pub const REQUEST_READ_TIMEOUT_MS: u64 = 5_000;
/// How long a forwarding command waits for the answer.
pub const ANSWER_WAIT_MS_MAX: u64 = 120_000;

const _: () = assert!(REQUESTS_QUEUED_MAX >= CONNECTIONS_MAX);
// A send request of the longest message fits, even with every byte escaped in JSON.
const _: () = assert!(client_core::client::MESSAGE_BYTES_MAX * 6 + 1024 <= LINE_BYTES_MAX);

/// What another invocation asks the serving command to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// `send --room R TEXT`.
    Send {
        /// Room id (hex).
        room: String,
        /// The message.
        text: String,
    },
    /// `history --room R --limit N [--offline]`.
    History {
        /// Room id (hex).
        room: String,
        /// Most entries shown.
        limit: usize,
        /// Do not contact the server.
        offline: bool,
    },
    /// `whoami`.
    Whoami,
    /// `room list`.
    RoomList,
}

/// The serving command's answer: what the forwarding command prints and
/// how it exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Standard output.
    pub stdout: String,
    /// The error message, if the request failed.
    pub error: Option<String>,
    /// The exit code.
    pub exit_code: u8,
}

/// A request failed in the command that serves the device.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The serving command refused or failed the request.
    #[error("{message}")]
    Failed {
        /// Its message.
        message: String,
        /// The exit code it chose.
        exit_code: u8,
    },
    /// The serving command went away or answered nonsense.
    #[error("the command serving device {dir} did not answer: {detail}")]
    NoAnswer {
        /// The device directory.
        dir: PathBuf,
        /// What happened.
        detail: String,
    },
}

impl ForwardError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ForwardError::Failed { exit_code, .. } => *exit_code,
            ForwardError::NoAnswer { .. } => 3,
        }
    }
}

/// Hands `request` to the command serving the device in `dir`, if one runs.
/// `Ok(None)`: nobody serves it (no socket, or a stale one).
pub async fn forward(dir: &Path, request: &Request) -> Result<Option<Answer>, ForwardError> {
    let path = dir.join(SOCKET_FILE_NAME);
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(error) => {
            return Err(ForwardError::NoAnswer { dir: dir.to_owned(), detail: error.to_string() });
        }
    };
    let no_answer = |detail: String| ForwardError::NoAnswer { dir: dir.to_owned(), detail };
    let exchange = async {
        let mut stream = BufReader::new(stream);
        let mut line = serde_json::to_vec(request).map_err(|e| no_answer(e.to_string()))?;
        line.push(b'\n');
        stream.get_mut().write_all(&line).await.map_err(|e| no_answer(e.to_string()))?;
        let answer = read_line(&mut stream).await.map_err(no_answer)?;
        serde_json::from_slice::<Answer>(&answer).map_err(|e| no_answer(format!("bad answer: {e}")))
    };
    match tokio::time::timeout(Duration::from_millis(ANSWER_WAIT_MS_MAX), exchange).await {
        Ok(answer) => answer.map(Some),
        Err(_) => Err(no_answer(format!("no answer in {ANSWER_WAIT_MS_MAX} ms"))),
    }
}

/// Reads one `\n`-terminated line of at most [`LINE_BYTES_MAX`] bytes.
async fn read_line(stream: &mut BufReader<UnixStream>) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let limit = u64::try_from(LINE_BYTES_MAX).unwrap_or(u64::MAX);
    let read = (&mut *stream).take(limit).read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    if read == 0 {
        return Err("connection closed".into());
    }
    if line.last() != Some(&b'\n') {
        return Err(format!("line longer than {LINE_BYTES_MAX} bytes or cut short"));
    }
    line.pop();
    Ok(line)
}

/// A request waiting for the serving command, with where its answer goes.
pub type Pending = (Request, oneshot::Sender<Answer>);

/// The socket a long-running command serves; removed when dropped.
pub struct DeviceSocket {
    path: PathBuf,
    accepting: tokio::task::JoinHandle<()>,
}

impl DeviceSocket {
    /// Binds the socket in `dir` (replacing a stale one: the caller holds
    /// the device's store, so no other command serves it) and starts
    /// accepting. Requests arrive on the returned receiver.
    pub fn bind(dir: &Path) -> std::io::Result<(DeviceSocket, mpsc::Receiver<Pending>)> {
        let path = dir.join(SOCKET_FILE_NAME);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let (requests, received) = mpsc::channel(REQUESTS_QUEUED_MAX);
        let accepting = tokio::spawn(accept(listener, requests));
        Ok((DeviceSocket { path, accepting }, received))
    }
}

impl Drop for DeviceSocket {
    fn drop(&mut self) {
        self.accepting.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept(listener: UnixListener, requests: mpsc::Sender<Pending>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        // Over the limit: the connection is closed unanswered.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
        let requests = requests.clone();
        tokio::spawn(async move {
            serve_connection(stream, requests).await;
            drop(slot);
        });
    }
}

async fn serve_connection(stream: UnixStream, requests: mpsc::Sender<Pending>) {
    let mut stream = BufReader::new(stream);
    let read = tokio::time::timeout(Duration::from_millis(REQUEST_READ_TIMEOUT_MS), read_line(&mut stream));
    let answer = match read.await {
        Ok(Ok(line)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let (reply, answered) = oneshot::channel();
                if requests.send((request, reply)).await.is_err() {
                    return;
                }
                match answered.await {
                    Ok(answer) => answer,
                    Err(_) => return,
                }
            }
            Err(error) => failed(format!("bad request: {error}"), 2),
        },
        Ok(Err(_)) | Err(_) => return,
    };
    if let Ok(mut line) = serde_json::to_vec(&answer) {
        if line.len() >= LINE_BYTES_MAX {
            let message = format!("the answer exceeds {LINE_BYTES_MAX} bytes: ask for less (--limit)");
            line = serde_json::to_vec(&failed(message, 1)).unwrap_or_default();
        }
        line.push(b'\n');
        let _ = stream.get_mut().write_all(&line).await;
    }
}

/// An answer for a failed request.
pub fn failed(message: String, exit_code: u8) -> Answer {
    Answer { stdout: String::new(), error: Some(message), exit_code }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_reach_the_serving_command_and_a_stale_socket_is_nobody() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(forward(dir.path(), &Request::Whoami).await.unwrap(), None, "no socket");
        let (socket, mut requests) = DeviceSocket::bind(dir.path()).unwrap();
        let serving = tokio::spawn(async move {
            let (request, reply) = requests.recv().await.unwrap();
            let stdout = format!("{request:?}\n");
            reply.send(Answer { stdout, error: None, exit_code: 0 }).unwrap();
        });
        let request = Request::Send { room: "ab".into(), text: "two\nlines".into() };
        let answer = forward(dir.path(), &request).await.unwrap().unwrap();
        assert_eq!(answer.stdout, format!("{request:?}\n"));
        serving.await.unwrap();
        drop(socket);
        assert!(!dir.path().join(SOCKET_FILE_NAME).exists(), "removed when dropped");

        // A socket file nobody listens on (its command was killed).
        let stale = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_FILE_NAME)).unwrap();
        drop(stale);
        assert_eq!(forward(dir.path(), &Request::Whoami).await.unwrap(), None, "stale socket");
        // The next serving command replaces it.
        let (_socket, _requests) = DeviceSocket::bind(dir.path()).unwrap();
    }
}
