//! `kalandra`: a Kalandra client on the command line.
//!
//! Each invocation opens the device in `--dir` (an encrypted client-core
//! store), connects to the server it was initialised with, does one thing
//! and exits; `tail` stays connected and prints messages as they are
//! sequenced, and `chat` also sends the lines typed. While `tail` or `chat`
//! runs, `send`, `history`, `whoami` and `room list` on the same device are
//! handed to it over a Unix socket ([`device_socket`]). Exit codes: 0 success, 1 other failure, 2 usage, 3 server
//! unreachable or connection lost, or the other domain of a federated
//! request unreachable now (retry later), 4 refused by the server (also an
//! unknown or refused federation domain), 5 not found
//! here (unknown room, no invitation, not initialised, not or no longer a
//! member), 6 the server's certificate refused (fingerprint mismatch,
//! untrusted chain or name), 7 the device's store damaged or unreadable.
//!
//! A command about one room is not stopped by trouble in another: when
//! connecting catches every room up, a room that fails is named on
//! standard error (`kalandra: room ROOM: …`) and the command goes on.

mod admin;
mod device_socket;
mod live;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use client_core::client::{
    Client, ClientError, DomainName, Message, MessageBody, RoomFailure, ServerAddress, ServerTarget,
    ServerTrust,
};
use client_core::connection::{parse_fingerprint, ConnectionError};
use client_core::store::{StoreError, StoreKey, STORE_KEY_BYTES};
use client_core::tls::fingerprint_of_pem_file;
use device_socket::{Answer, DeviceSocket, ForwardError, Request};
use kalandra_proto::payload::JoinRule;
use kalandra_proto::{RoomId, SenderId};
use live::LiveOptions;

/// File holding the store key when `KALANDRA_STORE_KEY` is not set.
const KEY_FILE_NAME: &str = "store.key";
/// Default wait for an invitation.
const JOIN_WAIT_MS_DEFAULT: u64 = 10_000;
/// Default number of history entries shown.
const HISTORY_LIMIT_DEFAULT: usize = 100;
/// How long a command waits for another short command to release the device.
const DEVICE_BUSY_WAIT_MS: u64 = 3_000;
/// Pause between attempts to open a busy device.
const DEVICE_BUSY_RETRY_MS: u64 = 100;

const _: () = assert!(DEVICE_BUSY_RETRY_MS < DEVICE_BUSY_WAIT_MS);

/// The device is open in another process that does not serve it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the device in {dir} is in use by another kalandra command: while `tail` or `chat` runs, \
     `send`, `history`, `whoami` and `room list` go through it; other commands wait until it exits"
)]
struct DeviceBusy {
    dir: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    name = "kalandra",
    version,
    about = "Kalandra client: end-to-end encrypted rooms over a Kalandra server"
)]
struct Cli {
    /// The device's directory (identity, encrypted store).
    #[arg(long, global = true, env = "KALANDRA_CLIENT_DIR", default_value = "kalandra-client")]
    dir: PathBuf,
    /// Seconds to wait for each answer from the server.
    #[arg(long, global = true, default_value_t = 10)]
    timeout_secs: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Operator commands over the server's admin API (rooms, roles, kick, ban, audit).
    Admin(admin::AdminArgs),
    /// Create this device: an identity and an encrypted store, and remember the server.
    #[command(group(clap::ArgGroup::new("trust").required(true).args(["fingerprint", "server_cert", "ca_file", "system_roots"])))]
    Init {
        /// The server's QUIC address: a host name or IP address, and a port
        /// (default port 4433). Host names are resolved at every connect.
        #[arg(long, default_value = "127.0.0.1:4433")]
        server: String,
        /// Pin the server certificate's SHA-256 fingerprint (the server prints it at start).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Pin the certificate in this file instead (e.g. kalandra-data/tls/cert.pem).
        #[arg(long)]
        server_cert: Option<PathBuf>,
        /// Trust certificates issued by the roots in this PEM file (checks the chain and the server name).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Trust the system's root certificates (checks the chain and the server name).
        #[arg(long)]
        system_roots: bool,
        /// TLS server name the certificate must be valid for (default: the host of --server).
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Print this device's sender id (others invite you with it).
    Whoami,
    /// Rooms.
    Room {
        #[command(subcommand)]
        command: RoomCommand,
    },
    /// Add users to a room by sender id; with --domain, users of another domain.
    ///
    /// Users of another domain are invited through this device's server:
    /// `kalandra invite --room ROOM --domain b.example SENDER...` claims
    /// their key packages from b.example (a federation peer of this
    /// device's server) and sends them the Welcome through it; they join
    /// with `kalandra join` on their own server. Users of several domains:
    /// one `invite` per domain.
    Invite {
        /// The room.
        #[arg(long)]
        room: String,
        /// The users' home domain, when it is not this device's server's
        /// (e.g. b.example; it must be a federation peer of this server).
        #[arg(long)]
        domain: Option<String>,
        /// Sender ids (16 hex digits each) of the users to add.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove users from a room by sender id (a commit: they cannot read what follows).
    Remove {
        /// The room.
        #[arg(long)]
        room: String,
        /// Sender ids of the members to remove.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Leave a room (proposes this device's removal; the next commit by another member applies it).
    Leave {
        /// The room.
        #[arg(long)]
        room: String,
    },
    /// Rotate this device's keys in a room (a self-update commit).
    Update {
        /// The room.
        #[arg(long)]
        room: String,
    },
    /// As the room's admin or a moderator: remove a member (the server
    /// proposes the removal; the members' next commit applies it).
    Kick {
        /// The room.
        #[arg(long)]
        room: String,
        /// The member's sender id.
        member: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// As the room's admin or a moderator: remove a user and refuse their return.
    Ban {
        /// The room.
        #[arg(long)]
        room: String,
        /// The user's sender id.
        user: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// For how long (default: for good).
        #[arg(long)]
        duration_ms: Option<u64>,
    },
    /// As the room's admin or a moderator: lift a ban.
    Unban {
        /// The room.
        #[arg(long)]
        room: String,
        /// The user's sender id.
        user: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// As the room's admin: grant or revoke the moderator role.
    Moderator {
        /// The room.
        #[arg(long)]
        room: String,
        /// The user's sender id.
        user: String,
        /// Revoke instead of grant.
        #[arg(long)]
        revoke: bool,
    },
    /// Erase a message's content on the server (yours, or anyone's as a moderator).
    Redact {
        /// The room.
        #[arg(long)]
        room: String,
        /// The message's log index.
        log_index: u64,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Join a room you were invited to (or, with --external, any room by external commit).
    Join {
        /// The room.
        #[arg(long)]
        room: String,
        /// How long to wait for the invitation.
        #[arg(long, default_value_t = JOIN_WAIT_MS_DEFAULT)]
        wait_ms: u64,
        /// Join from the room's published GroupInfo instead of an invitation.
        #[arg(long)]
        external: bool,
    },
    /// Send a message (`-` reads it from standard input).
    Send {
        /// The room.
        #[arg(long)]
        room: String,
        /// The message.
        text: String,
    },
    /// Print messages as they arrive.
    Tail {
        /// The room.
        #[arg(long)]
        room: String,
        /// Stop after this many milliseconds (default: run until interrupted).
        #[arg(long)]
        for_ms: Option<u64>,
        /// Stop after this many entries.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Chat in a room: print messages as they arrive and send each line
    /// typed (Ctrl-D or Ctrl-C to leave).
    Chat {
        /// The room.
        #[arg(long)]
        room: String,
    },
    /// Print a room's history on this device (after catching up with the server).
    History {
        /// The room.
        #[arg(long)]
        room: String,
        /// Most entries shown (the latest).
        #[arg(long, default_value_t = HISTORY_LIMIT_DEFAULT)]
        limit: usize,
        /// Do not contact the server.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RoomCommand {
    /// Create a room (invite-only unless `--open`); prints its id.
    Create {
        /// Let any user who is not banned join by external commit.
        #[arg(long)]
        open: bool,
    },
    /// List the rooms this device is in.
    List,
    /// List a room's members, each with its home domain as its leaf's home
    /// certificate shows it, checked here with the keys this device's
    /// server accepts for that domain.
    Members {
        /// Room id (hex).
        #[arg(long)]
        room: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kalandra: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kalandra: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(error) = error.downcast_ref::<admin::AdminError>() {
        return error.exit_code();
    }
    if let Some(error) = error.downcast_ref::<device_socket::ForwardError>() {
        return error.exit_code();
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Connection(
            ConnectionError::Unreachable(_)
            | ConnectionError::Lost(_)
            | ConnectionError::Closed
            | ConnectionError::TimedOut,
        )) => 3,
        Some(ClientError::DomainUnreachable { .. }) => 3,
        Some(
            ClientError::Refused { .. }
            | ClientError::NoKeyPackage(_)
            | ClientError::UnknownDomain { .. }
            | ClientError::FederationRefused { .. },
        ) => 4,
        Some(
            ClientError::UnknownRoom(_)
            | ClientError::NotMember(_)
            | ClientError::RemovalPending(_)
            | ClientError::Undelivered { .. }
            | ClientError::NoWelcome { .. }
            | ClientError::UnknownMember(_)
            | ClientError::NotInitialised { .. },
        ) => 5,
        Some(ClientError::Connection(ConnectionError::Certificate(_))) => 6,
        Some(
            ClientError::Store(
                StoreError::Damaged { .. } | StoreError::Unreadable { .. } | StoreError::Corrupt { .. },
            )
            | ClientError::Corrupt(_),
        ) => EXIT_STORE_DAMAGED,
        _ => 1,
    }
}

/// Exit code of a device whose store is damaged or cannot be read.
const EXIT_STORE_DAMAGED: u8 = 7;

/// Names each room that failed while connecting; the command goes on (it
/// concerns another room, or fails by itself on its own room).
fn report_room_failures(failures: &[RoomFailure]) {
    for failure in failures {
        eprintln!("kalandra: room {}: {}", failure.room_id, failure.error);
    }
}

/// The store key: `KALANDRA_STORE_KEY` (64 hex digits) if set, else the
/// key file in the device directory (created by `init`, mode 0600).
fn store_key(dir: &Path, create: bool) -> anyhow::Result<StoreKey> {
    if let Ok(hex_key) = std::env::var("KALANDRA_STORE_KEY") {
        let bytes = hex::decode(hex_key.trim()).context("KALANDRA_STORE_KEY is not hex")?;
        let bytes: [u8; STORE_KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("KALANDRA_STORE_KEY must be {STORE_KEY_BYTES} bytes"))?;
        return Ok(StoreKey::from_bytes(bytes));
    }
    let path = dir.join(KEY_FILE_NAME);
    if create && !path.exists() {
        let key = StoreKey::generate();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_private(&path, hex::encode(key.as_bytes()).as_bytes())?;
        return Ok(key);
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NotInitialised { path: dir.to_owned() }.into())
        }
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let bytes = hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()))?;
    let bytes: [u8; STORE_KEY_BYTES] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} must hold {STORE_KEY_BYTES} bytes", path.display()))?;
    Ok(StoreKey::from_bytes(bytes))
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("creating {}", path.display()))
}

fn parse_room(text: &str) -> anyhow::Result<RoomId> {
    let bytes = hex::decode(text.trim()).with_context(|| format!("room id {text:?} is not hex"))?;
    let bytes: [u8; 16] =
        bytes.try_into().map_err(|_| anyhow::anyhow!("room id {text:?} must be 32 hex digits"))?;
    Ok(RoomId(bytes))
}

fn parse_sender(text: &str) -> anyhow::Result<SenderId> {
    let value = u64::from_str_radix(text.trim(), 16)
        .with_context(|| format!("sender id {text:?} must be 16 hex digits"))?;
    Ok(SenderId(value))
}

fn print_message(out: &mut impl std::io::Write, message: &Message) -> std::io::Result<()> {
    let sender = SenderId(message.sender);
    match &message.body {
        MessageBody::Text(text) => {
            writeln!(out, "{}\t{sender}\t{}", message.log_index, String::from_utf8_lossy(text))
        }
        MessageBody::Membership { epoch, added, removed } => {
            let list =
                |ids: &[u64]| ids.iter().map(|id| SenderId(*id).to_string()).collect::<Vec<_>>().join(",");
            writeln!(
                out,
                "{}\t{sender}\t* epoch {epoch}: added [{}] removed [{}]",
                message.log_index,
                list(added),
                list(removed)
            )
        }
        MessageBody::Unreadable(reason) => {
            writeln!(out, "{}\t{sender}\t* unreadable: {reason}", message.log_index)
        }
        MessageBody::Redacted => writeln!(out, "{}\t{sender}\t* redacted", message.log_index),
    }
}

/// Opens the device and connects. Callers close the connection politely on
/// every path: a connection dropped without a close looks alive to the
/// server until its idle timeout.
async fn open_connected(cli: &Cli) -> anyhow::Result<Client> {
    let mut client = open_device(cli).await?;
    client.set_request_timeout(Duration::from_secs(cli.timeout_secs));
    match client.connect().await {
        Ok(failures) => report_room_failures(&failures),
        Err(error) => {
            client.disconnect().await;
            return Err(error.into());
        }
    }
    Ok(client)
}

/// Opens the device, waiting up to [`DEVICE_BUSY_WAIT_MS`] for another
/// short command to release it.
async fn open_device(cli: &Cli) -> anyhow::Result<Client> {
    let key = store_key(&cli.dir, false)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DEVICE_BUSY_WAIT_MS);
    loop {
        match Client::open(&cli.dir, &key) {
            Err(ClientError::Store(StoreError::InUse)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(DEVICE_BUSY_RETRY_MS)).await;
            }
            Err(ClientError::Store(StoreError::InUse)) => {
                return Err(DeviceBusy { dir: cli.dir.clone() }.into())
            }
            result => return Ok(result?),
        }
    }
}

/// Hands `request` to the `tail` or `chat` serving this device, if one
/// runs, and prints its answer. `false`: nobody serves the device.
async fn forwarded(cli: &Cli, request: &Request, out: &mut impl std::io::Write) -> anyhow::Result<bool> {
    let Some(answer) = device_socket::forward(&cli.dir, request).await? else { return Ok(false) };
    out.write_all(answer.stdout.as_bytes())?;
    out.flush()?;
    match answer.error {
        None => Ok(true),
        Some(message) => Err(ForwardError::Failed { message, exit_code: answer.exit_code }.into()),
    }
}

/// Answers a request forwarded by another invocation (see [`device_socket`]).
pub(crate) async fn serve_request(client: &mut Client, request: Request) -> Answer {
    let mut stdout = Vec::new();
    let result = match request {
        Request::Send { room, text } => match parse_room(&room) {
            Ok(room) => send(client, room, &text, &mut stdout).await,
            Err(error) => Err(error),
        },
        Request::History { room, limit, offline } => match parse_room(&room) {
            Ok(room) => history(client, room, limit, offline, &mut stdout).await,
            Err(error) => Err(error),
        },
        Request::Whoami => writeln!(stdout, "{}", client.sender_id()).map_err(Into::into),
        Request::RoomList => room_list(client, &mut stdout),
    };
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    match result {
        Ok(()) => Answer { stdout, error: None, exit_code: 0 },
        Err(error) => Answer { stdout, error: Some(format!("{error:#}")), exit_code: exit_code(&error) },
    }
}

async fn send(
    client: &mut Client,
    room: RoomId,
    text: &str,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let log_index = client.send(room, text.as_bytes()).await?;
    writeln!(out, "{log_index}")?;
    Ok(())
}

async fn history(
    client: &mut Client,
    room: RoomId,
    limit: usize,
    offline: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if !offline {
        client.sync(room).await?;
    }
    let all = client.history(room, 0, client_core::store::MESSAGES_PER_READ_MAX)?;
    for message in &all[all.len().saturating_sub(limit)..] {
        print_message(out, message)?;
    }
    Ok(())
}

/// A member's home domain as `room members` prints it.
fn home_text(home: &client_core::client::HomeCheck) -> String {
    use client_core::client::HomeCheck;
    match home {
        HomeCheck::Certified { domain, not_after_ms } => {
            format!("{domain}\tcertified until {not_after_ms} ms")
        }
        HomeCheck::Expired { domain, not_after_ms } => format!("{domain}\texpired at {not_after_ms} ms"),
        HomeCheck::Uncertified => "-\tuncertified".to_owned(),
        HomeCheck::UnknownDomain { domain } => format!("{domain}\tunknown domain"),
        HomeCheck::Invalid { reason } => format!("-\tinvalid: {reason}"),
    }
}

fn room_list(client: &Client, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    for room in client.rooms() {
        let pending = if room.removal_pending { "\tremoval pending" } else { "" };
        writeln!(out, "{}\tepoch {}\t{} members{pending}", room.room_id, room.epoch, room.members.len())?;
    }
    for room_id in client.left_rooms() {
        writeln!(out, "{room_id}\tleft")?;
    }
    Ok(())
}

/// `tail` and `chat`: open the device, serve it to other invocations,
/// connect, and run until told to stop.
async fn live(cli: &Cli, out: &mut impl std::io::Write, options: LiveOptions) -> anyhow::Result<()> {
    // First: from here on Ctrl-C ends the command cleanly, also while it connects.
    let mut signals = live::StopSignals::install()?;
    let mut client = open_device(cli).await?;
    let (socket, requests) = match DeviceSocket::bind(&cli.dir) {
        Ok((socket, requests)) => (Some(socket), Some(requests)),
        Err(error) => {
            eprintln!(
                "kalandra: other commands cannot use this device while this one runs \
                 (no socket {}: {error})",
                cli.dir.join(device_socket::SOCKET_FILE_NAME).display()
            );
            (None, None)
        }
    };
    client.set_request_timeout(Duration::from_secs(cli.timeout_secs));
    // Connecting catches up: what it reads is printed too.
    let from_log_index = live::cursor(&client, options.room);
    let connected = tokio::select! {
        biased;
        () = signals.recv() => None,
        connected = client.connect() => Some(connected),
    };
    match connected {
        None => {
            drop(socket);
            client.disconnect().await;
            return Ok(());
        }
        Some(Err(error)) => {
            client.disconnect().await;
            return Err(error.into());
        }
        Some(Ok(failures)) => report_room_failures(&failures),
    }
    if options.chat {
        eprintln!(
            "kalandra: chatting in {} as {}; Ctrl-D or Ctrl-C to leave",
            options.room,
            client.sender_id()
        );
    }
    let result = live::run(&mut client, out, &options, from_log_index, requests, signals).await;
    drop(socket);
    client.disconnect().await;
    result
}

/// The trust `init` was given (exactly one, clap's group ensures it).
fn init_trust(
    fingerprint: Option<&str>,
    server_cert: Option<&Path>,
    ca_file: Option<&Path>,
    system_roots: bool,
) -> anyhow::Result<ServerTrust> {
    Ok(match (fingerprint, server_cert, ca_file) {
        (Some(text), _, _) => ServerTrust::Fingerprint(
            parse_fingerprint(text).ok_or_else(|| anyhow::anyhow!("--fingerprint must be 64 hex digits"))?,
        ),
        (None, Some(path), _) => ServerTrust::Fingerprint(fingerprint_of_pem_file(path)?),
        (None, None, Some(path)) => {
            let absolute =
                std::fs::canonicalize(path).with_context(|| format!("--ca-file {}", path.display()))?;
            // Fails now on a file without certificates rather than at the first connect.
            client_core::tls::client_tls(&ServerTrust::CaFile(absolute.clone()))?;
            ServerTrust::CaFile(absolute)
        }
        (None, None, None) if system_roots => ServerTrust::SystemRoots,
        (None, None, None) => anyhow::bail!("give --fingerprint, --server-cert, --ca-file or --system-roots"),
    })
}

/// Creates the device and publishes its key packages. When the server's
/// certificate is refused, the device is removed again: a device pinned to
/// the wrong server is of no use.
async fn init(cli: &Cli, out: &mut impl std::io::Write, target: ServerTarget) -> anyhow::Result<()> {
    let created = DeviceFiles::before_init(&cli.dir);
    let key = store_key(&cli.dir, true)?;
    let mut client = Client::init(&cli.dir, &key)?;
    client.set_server(target)?;
    client.set_request_timeout(Duration::from_secs(cli.timeout_secs));
    // Publish key packages so that others can invite this device at once.
    let connected = client.connect().await;
    client.disconnect().await;
    match connected {
        Ok(_) => {}
        Err(error @ ClientError::Connection(ConnectionError::Certificate(_) | ConnectionError::Tls(_))) => {
            drop(client);
            created.remove();
            return Err(anyhow::Error::new(error).context("no device was created"));
        }
        Err(error) => {
            writeln!(out, "{}", client.sender_id())?;
            return Err(anyhow::Error::new(error).context(
                "the device was created, but its key packages are not published yet \
                 (any later command that reaches the server publishes them)",
            ));
        }
    }
    writeln!(out, "{}", client.sender_id())?;
    out.flush()?;
    Ok(())
}

/// What `init` may create, to remove it again if `init` fails.
struct DeviceFiles {
    dir: PathBuf,
    dir_existed: bool,
    key_file_existed: bool,
}

impl DeviceFiles {
    fn before_init(dir: &Path) -> DeviceFiles {
        DeviceFiles {
            dir: dir.to_owned(),
            dir_existed: dir.exists(),
            key_file_existed: dir.join(KEY_FILE_NAME).exists(),
        }
    }

    fn remove(self) {
        if !self.dir_existed {
            let _ = std::fs::remove_dir_all(&self.dir);
            return;
        }
        let _ = std::fs::remove_file(self.dir.join(client_core::client::STORE_FILE_NAME));
        // The device writes its push-key cache as it opens.
        let _ = std::fs::remove_file(self.dir.join(client_core::client::KEY_CACHE_FILE_NAME));
        if !self.key_file_existed {
            let _ = std::fs::remove_file(self.dir.join(KEY_FILE_NAME));
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Admin(args) => admin::run(args, Duration::from_secs(cli.timeout_secs)).await?,
        Command::Init { server, fingerprint, server_cert, ca_file, system_roots, server_name } => {
            let trust = init_trust(
                fingerprint.as_deref(),
                server_cert.as_deref(),
                ca_file.as_deref(),
                *system_roots,
            )?;
            let address = ServerAddress::parse(server).map_err(|e| anyhow::anyhow!("--server: {e}"))?;
            let server_name = server_name.clone().unwrap_or_else(|| address.host.clone());
            init(&cli, &mut out, ServerTarget { address, server_name, trust }).await?;
        }
        Command::Whoami => {
            if !forwarded(&cli, &Request::Whoami, &mut out).await? {
                writeln!(out, "{}", open_device(&cli).await?.sender_id())?;
            }
        }
        Command::Room { command: RoomCommand::Create { open } } => {
            let mut client = open_connected(&cli).await?;
            let join_rule = if *open { JoinRule::Open } else { JoinRule::InviteOnly };
            let result = client.create_room_with(join_rule).await;
            client.disconnect().await;
            writeln!(out, "{}", result?)?;
        }
        Command::Room { command: RoomCommand::List } => {
            if !forwarded(&cli, &Request::RoomList, &mut out).await? {
                room_list(&open_device(&cli).await?, &mut out)?;
            }
        }
        Command::Room { command: RoomCommand::Members { room } } => {
            let room_id = parse_room(room)?;
            let mut client = open_connected(&cli).await?;
            let result = client.member_homes(room_id).await;
            client.disconnect().await;
            for member in result? {
                let sender = member.sender.map_or_else(|| "-".to_owned(), |sender| sender.to_string());
                writeln!(out, "{sender}\tleaf {}\t{}", member.leaf_index, home_text(&member.home))?;
            }
        }
        Command::Invite { room, domain, members } => {
            let room = parse_room(room)?;
            let domain = domain
                .as_deref()
                .map(|text| DomainName::parse(text).map_err(|e| anyhow::anyhow!("--domain {text:?}: {e}")))
                .transpose()?;
            let members = members.iter().map(|m| parse_sender(m)).collect::<anyhow::Result<Vec<_>>>()?;
            let mut client = open_connected(&cli).await?;
            let result = match &domain {
                Some(domain) => client.invite_remote(room, domain, &members).await,
                None => client.invite(room, &members).await,
            };
            client.disconnect().await;
            writeln!(out, "epoch {}", result?)?;
        }
        Command::Remove { room, members } => {
            let room = parse_room(room)?;
            let members = members.iter().map(|m| parse_sender(m)).collect::<anyhow::Result<Vec<_>>>()?;
            let mut client = open_connected(&cli).await?;
            let result = client.remove(room, &members).await;
            client.disconnect().await;
            writeln!(out, "epoch {}", result?)?;
        }
        Command::Leave { room } => {
            let room = parse_room(room)?;
            let mut client = open_connected(&cli).await?;
            let result = client.leave(room).await;
            client.disconnect().await;
            writeln!(out, "leave proposed at {}", result?)?;
        }
        Command::Update { room } => {
            let room = parse_room(room)?;
            let mut client = open_connected(&cli).await?;
            let result = client.self_update(room).await;
            client.disconnect().await;
            writeln!(out, "epoch {}", result?)?;
        }
        Command::Kick { room, member, reason } => {
            let (room, member) = (parse_room(room)?, parse_sender(member)?);
            let mut client = open_connected(&cli).await?;
            let result = client.kick(room, member, reason).await;
            client.disconnect().await;
            writeln!(out, "removal proposed at {}", result?)?;
        }
        Command::Ban { room, user, reason, duration_ms } => {
            let (room, user) = (parse_room(room)?, parse_sender(user)?);
            let mut client = open_connected(&cli).await?;
            let result = client.ban(room, user, reason, *duration_ms).await;
            client.disconnect().await;
            match result? {
                u64::MAX => writeln!(out, "banned")?,
                index => writeln!(out, "banned; removal proposed at {index}")?,
            }
        }
        Command::Unban { room, user, reason } => {
            let (room, user) = (parse_room(room)?, parse_sender(user)?);
            let mut client = open_connected(&cli).await?;
            let result = client.unban(room, user, reason).await;
            client.disconnect().await;
            result?;
            writeln!(out, "unbanned")?;
        }
        Command::Moderator { room, user, revoke } => {
            let (room, user) = (parse_room(room)?, parse_sender(user)?);
            let mut client = open_connected(&cli).await?;
            let result = client.set_role(room, user, "moderator", !*revoke).await;
            client.disconnect().await;
            result?;
            writeln!(out, "{}", if *revoke { "revoked" } else { "granted" })?;
        }
        Command::Redact { room, log_index, reason } => {
            let room = parse_room(room)?;
            let mut client = open_connected(&cli).await?;
            let result = client.redact(room, *log_index, reason).await;
            client.disconnect().await;
            result?;
            writeln!(out, "redacted {log_index}")?;
        }
        Command::Join { room, wait_ms, external } => {
            let room = parse_room(room)?;
            let mut client = open_connected(&cli).await?;
            let result = if *external {
                client.join_external(room).await
            } else {
                client.join(room, Duration::from_millis(*wait_ms)).await
            };
            client.disconnect().await;
            writeln!(out, "joined {room} at epoch {}", result?)?;
        }
        Command::Send { room, text } => {
            let room_id = parse_room(room)?;
            let text = if text == "-" {
                let mut buffer = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut buffer)?;
                buffer
            } else {
                text.clone()
            };
            let request = Request::Send { room: room.clone(), text };
            if !forwarded(&cli, &request, &mut out).await? {
                let Request::Send { text, .. } = request else { unreachable!("built above") };
                let mut client = open_connected(&cli).await?;
                let result = send(&mut client, room_id, &text, &mut out).await;
                client.disconnect().await;
                result?;
            }
        }
        Command::Tail { room, for_ms, count } => {
            let options =
                LiveOptions { room: parse_room(room)?, for_ms: *for_ms, count: *count, chat: false };
            live(&cli, &mut out, options).await?;
        }
        Command::Chat { room } => {
            let options = LiveOptions { room: parse_room(room)?, for_ms: None, count: None, chat: true };
            live(&cli, &mut out, options).await?;
        }
        Command::History { room, limit, offline } => {
            let room_id = parse_room(room)?;
            let request = Request::History { room: room.clone(), limit: *limit, offline: *offline };
            if !forwarded(&cli, &request, &mut out).await? {
                let mut client =
                    if *offline { open_device(&cli).await? } else { open_connected(&cli).await? };
                let result = history(&mut client, room_id, *limit, *offline, &mut out).await;
                client.disconnect().await;
                result?;
            }
        }
    }
    Ok(())
}
