//! Crash recovery of the real server binary: acknowledged frames survive a
//! SIGKILL in the middle of a pipelined load, the log stays dense, the room's
//! MLS state is rebuilt (a member can still commit), and SIGTERM drains and
//! exits 0. An online backup taken under load restores, on a new server,
//! every frame acknowledged before it began.
//!
//! Every test starts `kalandra-server` as a child process on loopback with a
//! fresh data directory and talks to it with real OpenMLS clients over QUIC.
#![allow(missing_docs)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use client_core::connection::{client_config_pinned, parse_fingerprint, Connection, ConnectionError};
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, Identity, MlsProvider, RoomGroup,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use kalandra_proto::payload::{
    Ack, Application, Commit, CreateRoom, Error, GroupInfo, GroupInfoRequest, KeyPackageClaim,
    KeyPackageClaimed, KeyPackageStatus, KeyPackageUpload, Sync, SyncDone, Welcome,
};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};

/// Time one request may take before the test fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the binary gets to print its address.
const STARTUP_BOUND: Duration = Duration::from_secs(20);
/// Time SIGTERM gets to end the process.
const TERMINATE_BOUND: Duration = Duration::from_secs(10);
/// Requests one load client keeps in flight.
const PIPELINE_DEPTH: usize = 32;
/// Acknowledgements after which the server is killed.
const ACKS_BEFORE_KILL: u64 = 2_000;
/// Longest load before the kill, whatever the count.
const LOAD_BOUND: Duration = Duration::from_secs(10);
/// Longest life of one load task.
const LOAD_TASK_BOUND: Duration = Duration::from_secs(25);
/// Silence after the kill after which a load task stops reading.
const QUIET_AFTER_KILL: Duration = Duration::from_secs(1);
/// How long a load task waits for a frame before it looks at the kill flag again.
const READ_SLICE: Duration = Duration::from_millis(50);
/// Self-update commits before the load: more than the server's snapshot
/// interval (16 commits), so recovery goes through a snapshot and a replay.
const SETUP_COMMITS: u64 = 20;
/// Frames per `Sync` page (the protocol's maximum).
const SYNC_PAGE: u32 = 4_096;
/// Bytes of every load message.
const MESSAGE_BYTES: usize = 96;

const ROOM: RoomId = RoomId(*b"crash-recovery-1");

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// The server as a child process.

/// Owns the child process; kills it (by its own pid) when dropped, and shows
/// the end of its log if the test is failing.
struct ChildGuard {
    child: Child,
    log_path: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- last lines of {} ---\n{}", self.log_path.display(), tail.join("\n"));
        }
    }
}

/// A running `kalandra-server` process.
struct ServerProcess {
    guard: ChildGuard,
    address: SocketAddr,
    /// The admin HTTP listener.
    admin: SocketAddr,
    fingerprint: [u8; 32],
    /// From spawning the process to its "listening" line (includes recovery).
    startup: Duration,
}

/// Raises the rate limits so that the load is limited by the server's
/// sequencing and storage, not by its token buckets.
fn write_config(dir: &Path) -> PathBuf {
    write_config_with(dir, "")
}

/// [`write_config`] with `top` (top-level keys) before the limits.
fn write_config_with(dir: &Path, top: &str) -> PathBuf {
    let path = dir.join("kalandra.toml");
    let limits = "[limits]\n\
        frames_per_second_per_connection = 1000000\n\
        frames_burst_per_connection = 1000000\n\
        frames_per_second_per_user = 1000000\n\
        frames_burst_per_user = 1000000\n\
        drain_timeout_ms = 5000\n";
    std::fs::write(&path, format!("{top}{limits}")).expect("write the config file");
    path
}

impl ServerProcess {
    /// Starts the binary on `dir` (run number `run` names its log file) and
    /// waits until it listens. Blocking.
    fn start_blocking(dir: &Path, run: u32) -> ServerProcess {
        ServerProcess::start_blocking_on(dir, &dir.join("data"), run)
    }

    /// [`Self::start_blocking`] with the data directory `data_dir`.
    fn start_blocking_on(dir: &Path, data_dir: &Path, run: u32) -> ServerProcess {
        let log_path = dir.join(format!("server-{run}.log"));
        let log = std::fs::File::create(&log_path).expect("create the log file");
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kalandra-server"));
        command
            .arg("--config")
            .arg(dir.join("kalandra.toml"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--log-format")
            .arg("text")
            .arg("--log-filter")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for variable in [
            "KALANDRA_CONFIG",
            "KALANDRA_DATA_DIR",
            "KALANDRA_LISTEN",
            "KALANDRA_ADMIN_LISTEN",
            "KALANDRA_LOG_FORMAT",
            "KALANDRA_LOG",
        ] {
            command.env_remove(variable);
        }
        let mut child = command.spawn().expect("start kalandra-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut guard = ChildGuard { child, log_path };

        // Read stdout on a thread; it keeps draining after the lines we need.
        let (lines_in, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_in.send(line);
            }
        });

        let deadline = started + STARTUP_BOUND;
        let mut fingerprint = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(remaining) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("kalandra-server did not listen within {STARTUP_BOUND:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = guard.child.wait().ok();
                    panic!("kalandra-server exited before listening: {status:?}")
                }
            };
            if let Some(hex) = line.strip_prefix("certificate fingerprint (sha256): ") {
                fingerprint = Some(parse_fingerprint(hex.trim()).expect("a valid fingerprint"));
            } else if let Some(rest) = line.strip_prefix("listening on quic://") {
                let (address, admin) = rest.split_once(" (admin http://").expect("both addresses");
                let address = address.parse().expect("a socket address");
                let admin = admin.trim_end_matches(')').parse().expect("an admin address");
                let fingerprint = fingerprint.expect("the fingerprint is printed before the address");
                return ServerProcess { guard, address, admin, fingerprint, startup: started.elapsed() };
            }
        }
    }

    async fn start(dir: &Path, run: u32) -> ServerProcess {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || ServerProcess::start_blocking(&dir, run))
            .await
            .expect("the start task")
    }

    async fn connect(&self, key: &SigningKey) -> Connection {
        let config = client_config_pinned(self.fingerprint).expect("client TLS config");
        Connection::connect(self.address, "localhost", config, key, REQUEST_TIMEOUT)
            .await
            .expect("connect and authenticate")
    }

    /// SIGKILL (what `Child::kill` sends on unix) and reap.
    fn kill(&mut self) {
        self.guard.child.kill().expect("SIGKILL the server");
        let status = self.guard.child.wait().expect("reap the server");
        assert!(!status.success(), "a killed process does not exit successfully: {status}");
    }

    /// SIGTERM to our child's pid; waits (bounded) for it to exit.
    async fn terminate(&mut self) -> (ExitStatus, Duration) {
        let pid = self.guard.child.id().to_string();
        let sent = Instant::now();
        let kill = Command::new("kill")
            .arg("-TERM")
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM {pid}: {kill}");
        loop {
            if let Some(status) = self.guard.child.try_wait().expect("poll the server") {
                return (status, sent.elapsed());
            }
            assert!(sent.elapsed() < TERMINATE_BOUND, "the server did not exit within {TERMINATE_BOUND:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The "rooms recovered" time the server logged, if any (for the report only).
    fn logged_recovery_ms(&self) -> Option<u64> {
        let log = strip_ansi(&std::fs::read_to_string(&self.guard.log_path).ok()?);
        let line = log.lines().find(|line| line.contains("rooms recovered"))?;
        let value = line.split("elapsed_ms=").nth(1)?;
        value.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }
}

/// The text without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// MLS-speaking members.

fn header(opcode: Opcode, room: RoomId, sender: SenderId, epoch: u64, request_id: u32) -> FrameHeaderBuf {
    let mut header = FrameHeaderBuf::new(opcode);
    header.set_room_id(room).set_sender_id(sender).set_epoch(epoch).set_request_id(request_id);
    header
}

fn decode_ok<P: Payload>(frame: &Frame) -> P {
    if frame.opcode() == Opcode::Error {
        let error: Error = frame.decode_payload().expect("an Error payload");
        panic!("server refused: {} {}", error.code, error.message);
    }
    frame.decode_payload().unwrap_or_else(|e| panic!("{:?}: {e}", frame.opcode()))
}

struct Member {
    name: &'static str,
    identity: Identity,
    key: SigningKey,
    provider: MlsProvider,
    connection: Option<Connection>,
    group: Option<RoomGroup>,
}

impl Member {
    fn new(name: &'static str, seed: u8) -> Member {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).expect("an identity");
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        Member { name, identity, key, provider, connection: None, group: None }
    }

    async fn connect(&mut self, server: &ServerProcess) {
        self.connection = Some(server.connect(&self.key).await);
    }

    fn conn(&mut self) -> &mut Connection {
        self.connection.as_mut().expect("connected")
    }

    fn sender(&self) -> SenderId {
        SenderId::from_identity_key(self.key.verifying_key().as_bytes())
    }

    fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, RoomGroup::epoch)
    }

    fn frame<P: Payload>(&mut self, payload: &P) -> Frame {
        let request_id = self.conn().next_request_id();
        let mut frame =
            Frame::with_payload(header(P::OPCODE, ROOM, self.sender(), self.epoch(), request_id), payload)
                .expect("a valid frame");
        frame.sign(&self.key);
        frame
    }

    async fn request<P: Payload>(&mut self, payload: &P) -> Frame {
        let frame = self.frame(payload);
        let name = self.name;
        self.conn().request(&frame).await.unwrap_or_else(|e| panic!("{name}: {:?}: {e}", P::OPCODE))
    }

    async fn upload_key_packages(&mut self, count: usize) -> KeyPackageStatus {
        let packages =
            generate_key_packages(&self.provider, &self.identity, count, now_secs()).expect("key packages");
        let last_resort = generate_last_resort_key_package(&self.provider, &self.identity, now_secs())
            .expect("a last-resort key package");
        let upload = KeyPackageUpload {
            key_packages: packages.into_iter().map(|p| p.message.into()).collect(),
            last_resort: Some(last_resort.message),
        };
        decode_ok(&self.request(&upload).await)
    }

    async fn create_room(&mut self) -> Ack {
        let server_key = self.conn().server_key();
        let (group, created) =
            RoomGroup::create(&self.provider, &self.identity, ROOM.0, &server_key, now_secs())
                .expect("create the MLS group");
        self.group = Some(group);
        let create = CreateRoom {
            group_info: created.group_info,
            ratchet_tree: created.ratchet_tree,
            join_rule: None,
        };
        decode_ok(&self.request(&create).await)
    }

    async fn add(&mut self, members: &[SenderId]) -> Ack {
        let reply = self
            .request(&KeyPackageClaim { sender_ids: members.iter().map(|s| s.0).collect(), domain: None })
            .await;
        let claimed: KeyPackageClaimed = decode_ok(&reply);
        let key_packages: Vec<Vec<u8>> =
            claimed.key_packages.into_iter().map(|entry| entry.key_package.expect("a key package")).collect();
        let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
        let output = self
            .group
            .as_mut()
            .expect("a group")
            .add_members(&self.provider, &self.identity, &refs)
            .expect("an add commit");
        let commit = Commit {
            commit: output.commit,
            welcome: output.welcome,
            welcome_recipients: members.iter().map(|s| s.0).collect(),
            group_info: Some(output.group_info),
        };
        let reply = self.request(&commit).await;
        self.settle_commit(&reply);
        decode_ok(&reply)
    }

    async fn self_update(&mut self) -> Ack {
        let output = self
            .group
            .as_mut()
            .expect("a group")
            .self_update(&self.provider, &self.identity)
            .expect("a self-update commit");
        let commit = Commit {
            commit: output.commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        let reply = self.request(&commit).await;
        self.settle_commit(&reply);
        decode_ok(&reply)
    }

    fn settle_commit(&mut self, reply: &Frame) {
        let group = self.group.as_mut().expect("a group");
        if reply.opcode() == Opcode::Ack {
            group.confirm_pending_commit(&self.provider).expect("confirm our commit");
        } else {
            group.discard_pending_commit(&self.provider).expect("discard our commit");
        }
    }

    async fn join_from_welcome(&mut self) {
        for _ in 0..1_000 {
            let name = self.name;
            let frame =
                self.conn().recv().await.unwrap_or_else(|e| panic!("{name}: waiting for a Welcome: {e}"));
            if frame.opcode() != Opcode::Welcome {
                continue;
            }
            let welcome: Welcome = decode_ok(&frame);
            let group = RoomGroup::join_from_welcome(
                &self.provider,
                &welcome.welcome,
                welcome.ratchet_tree.as_deref(),
            )
            .expect("join from the Welcome");
            assert_eq!(group.room_id(), ROOM.0);
            self.group = Some(group);
            return;
        }
        panic!("{}: no Welcome in 1,000 frames", self.name);
    }

    /// Applies a sequenced commit from the log to our MLS state.
    fn apply(&mut self, frame: &Frame) {
        if frame.opcode() == Opcode::Commit {
            let commit: Commit = decode_ok(frame);
            self.group
                .as_mut()
                .expect("a group")
                .process_handshake(&self.provider, &commit.commit)
                .expect("apply a sequenced commit");
        }
    }

    async fn send_text(&mut self, text: &str) -> Ack {
        let payload = Application {
            generation: 0,
            ciphertext: Bytes::copy_from_slice(text.as_bytes()),
            push: None,
            epoch_tag: None,
        };
        decode_ok(&self.request(&payload).await)
    }

    /// One `Sync` page: the frames `[from, SyncDone.next_log_index)`, checked dense.
    async fn sync_page(&mut self, from: u64, count_max: u32) -> (Vec<Frame>, SyncDone) {
        let request = self.frame(&Sync { from_log_index: from, count_max });
        let request_id = request.header().request_id();
        let name = self.name;
        self.conn().send(&request).await.unwrap_or_else(|e| panic!("{name}: Sync: {e}"));
        let mut frames = Vec::new();
        let bound = usize::try_from(count_max).expect("u32 fits usize") + 64;
        for _ in 0..bound {
            let frame =
                self.conn().recv().await.unwrap_or_else(|e| panic!("{name}: syncing from {from}: {e}"));
            match frame.opcode() {
                Opcode::SyncDone if frame.header().request_id() == request_id => {
                    let done: SyncDone = decode_ok(&frame);
                    assert!(!done.live, "a Sync is not live");
                    let expected: Vec<u64> = (from..done.next_log_index).collect();
                    let got: Vec<u64> = frames.iter().map(|f: &Frame| f.header().log_index()).collect();
                    assert_eq!(got, expected, "a Sync page is dense and in order");
                    return (frames, done);
                }
                Opcode::Error => {
                    let error: Error = frame.decode_payload().expect("an Error payload");
                    panic!("{name}: Sync from {from} refused: {} {}", error.code, error.message);
                }
                Opcode::CreateRoom | Opcode::Commit | Opcode::Proposal | Opcode::Application => {
                    frames.push(frame);
                }
                // Welcomes and other notices are not part of the log.
                _ => {}
            }
        }
        panic!("{name}: no SyncDone within {bound} frames");
    }

    /// The room's whole log, in pages.
    async fn sync_all(&mut self) -> Vec<Frame> {
        let mut log = Vec::new();
        let mut from = 0;
        for _ in 0..10_000 {
            let (frames, done) = self.sync_page(from, SYNC_PAGE).await;
            if frames.is_empty() {
                return log;
            }
            log.extend(frames);
            from = done.next_log_index;
        }
        panic!("the log did not end within 10,000 pages");
    }
}

fn assert_converged(members: &[Member]) {
    let first = members[0].group.as_ref().expect("a group");
    for member in &members[1..] {
        let group = member.group.as_ref().expect("a group");
        assert_eq!(group.epoch(), first.epoch(), "{} epoch", member.name);
        assert_eq!(group.tree_hash(), first.tree_hash(), "{} tree hash", member.name);
    }
}

// ---------------------------------------------------------------------------
// Pipelined load.

/// The message a load client sends as its `seq`-th: unique, and recognisable in the log.
fn message(name: &str, seq: u64) -> Bytes {
    let mut text = format!("{name}/{seq:010}/").into_bytes();
    text.resize(MESSAGE_BYTES, b'.');
    Bytes::from(text)
}

/// Reads back a load message: (name, seq), if the bytes are exactly one.
fn parse_message(bytes: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '/');
    let name = parts.next()?.to_owned();
    let seq = parts.next()?.parse().ok()?;
    (message(&name, seq) == bytes).then_some((name, seq))
}

struct Acked {
    log_index: u64,
    seq: u64,
    epoch: u64,
    /// Received before the load's mark was set (a backup began after it).
    before_mark: bool,
}

struct LoadReport {
    name: &'static str,
    sender: SenderId,
    /// Messages whose sending was attempted: every load message in the log has `seq < attempted`.
    attempted: u64,
    acked: Vec<Acked>,
    errors: BTreeMap<u16, u64>,
    stray_replies: u64,
    ended_by: String,
}

struct LoadClient {
    name: &'static str,
    key: SigningKey,
    connection: Connection,
    epoch: u64,
}

/// Sends application messages as fast as the server takes them (up to
/// [`PIPELINE_DEPTH`] in flight), recording every acknowledgement, until the
/// connection dies or, once `killed` is set, until it falls quiet.
async fn run_load(client: LoadClient, acks: Arc<AtomicU64>, killed: Arc<AtomicBool>) -> LoadReport {
    run_load_marked(client, acks, killed, Arc::new(AtomicBool::new(false))).await
}

/// [`run_load`], noting for each acknowledgement whether `mark` was set
/// when it arrived.
async fn run_load_marked(
    client: LoadClient,
    acks: Arc<AtomicU64>,
    killed: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
) -> LoadReport {
    let LoadClient { name, key, mut connection, epoch } = client;
    let sender = connection.sender_id();
    let mut report = LoadReport {
        name,
        sender,
        attempted: 0,
        acked: Vec::new(),
        errors: BTreeMap::new(),
        stray_replies: 0,
        ended_by: String::new(),
    };
    let mut in_flight: HashMap<u32, u64> = HashMap::new();
    let deadline = Instant::now() + LOAD_TASK_BOUND;
    let mut last_frame = Instant::now();
    let ended_by = 'load: loop {
        if Instant::now() > deadline {
            break 'load "task bound".to_owned();
        }
        let stopping = killed.load(Ordering::Acquire);
        while !stopping && in_flight.len() < PIPELINE_DEPTH {
            let seq = report.attempted;
            let request_id = connection.next_request_id();
            let payload =
                Application { generation: 0, ciphertext: message(name, seq), push: None, epoch_tag: None };
            let mut frame =
                Frame::with_payload(header(Opcode::Application, ROOM, sender, epoch, request_id), &payload)
                    .expect("a valid frame");
            frame.sign(&key);
            report.attempted += 1;
            match tokio::time::timeout(REQUEST_TIMEOUT, connection.send(&frame)).await {
                Ok(Ok(())) => {
                    in_flight.insert(request_id, seq);
                }
                Ok(Err(error)) => break 'load format!("send: {error}"),
                Err(_) => break 'load "send stalled".to_owned(),
            }
        }
        // Wait in short slices so that the kill is noticed at once (reading
        // a frame is cancel-safe: the decoder keeps partial input).
        let frame = match tokio::time::timeout(READ_SLICE, connection.recv()).await {
            Err(_) if stopping && last_frame.elapsed() >= QUIET_AFTER_KILL => {
                break 'load "quiet after the kill".to_owned()
            }
            Err(_) if !stopping && last_frame.elapsed() >= REQUEST_TIMEOUT => {
                break 'load "no reply while the server was up".to_owned()
            }
            Err(_) => continue,
            Ok(Err(error)) => break 'load format!("recv: {error}"),
            Ok(Ok(frame)) => frame,
        };
        last_frame = Instant::now();
        let request_id = frame.header().request_id();
        match (frame.opcode(), in_flight.remove(&request_id)) {
            (Opcode::Ack, Some(seq)) => {
                let ack: Ack = decode_ok(&frame);
                let before_mark = !mark.load(Ordering::SeqCst);
                report.acked.push(Acked { log_index: ack.log_index, seq, epoch: ack.epoch, before_mark });
                acks.fetch_add(1, Ordering::AcqRel);
            }
            (Opcode::Error, _) => {
                let error: Error = frame.decode_payload().expect("an Error payload");
                *report.errors.entry(error.code).or_insert(0) += 1;
            }
            _ => report.stray_replies += 1,
        }
    };
    report.ended_by = ended_by;
    // The server is gone: drop the connection without waiting for a polite close.
    drop(connection);
    report
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_frames_survive_sigkill() {
    let dir = tempfile::tempdir().expect("a temp dir");
    write_config(dir.path());
    let mut server = ServerProcess::start(dir.path(), 1).await;
    let (first_startup, fingerprint) = (server.startup, server.fingerprint);

    // A room with three members and enough commits for a snapshot.
    let mut members = [Member::new("alice", 1), Member::new("bob", 2), Member::new("carol", 3)];
    for member in &mut members {
        member.connect(&server).await;
    }
    for member in &mut members[1..] {
        assert_eq!(member.upload_key_packages(2).await.available, 2);
    }
    assert_eq!(members[0].create_room().await.log_index, 0);
    let invited = [members[1].sender(), members[2].sender()];
    let added = members[0].add(&invited).await;
    assert_eq!((added.log_index, added.epoch), (1, 1));
    for member in &mut members[1..] {
        member.join_from_welcome().await;
    }
    for round in 0..SETUP_COMMITS {
        let committer = usize::try_from(round % 3).expect("small");
        let ack = members[committer].self_update().await;
        let log_index = 2 + round;
        assert_eq!((ack.log_index, ack.epoch), (log_index, log_index), "commit {round}");
        for other in (0..members.len()).filter(|m| *m != committer) {
            let (frames, _) = members[other].sync_page(log_index, 1).await;
            assert_eq!(frames.len(), 1);
            members[other].apply(&frames[0]);
        }
    }
    assert_converged(&members);
    let epoch = members[0].epoch();
    assert_eq!(epoch, SETUP_COMMITS + 1);
    let first_application = SETUP_COMMITS + 2;

    // Load from all three members, each on its own connection; SIGKILL mid-load.
    let acks = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for member in &mut members {
        let client = LoadClient {
            name: member.name,
            key: member.key.clone(),
            connection: member.connection.take().expect("connected"),
            epoch,
        };
        tasks.push(tokio::spawn(run_load(client, Arc::clone(&acks), Arc::clone(&killed))));
    }
    let load_started = Instant::now();
    while acks.load(Ordering::Acquire) < ACKS_BEFORE_KILL
        && load_started.elapsed() < LOAD_BOUND
        && !tasks.iter().all(tokio::task::JoinHandle::is_finished)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let acks_at_kill = acks.load(Ordering::Acquire);
    let finished_before_kill: Vec<bool> = tasks.iter().map(tokio::task::JoinHandle::is_finished).collect();
    server.kill();
    let load_ms = millis(load_started.elapsed());
    killed.store(true, Ordering::Release);
    let mut reports = Vec::new();
    for task in tasks {
        let report = tokio::time::timeout(LOAD_TASK_BOUND, task)
            .await
            .expect("load task ends after the kill")
            .expect("load task does not panic");
        reports.push(report);
    }
    for (report, finished) in reports.iter().zip(&finished_before_kill) {
        assert!(!finished, "{}: the load stopped before the kill: {}", report.name, report.ended_by);
        assert_eq!(report.stray_replies, 0, "{}: replies to requests not in flight", report.name);
        for code in report.errors.keys() {
            assert_eq!(
                *code,
                ErrorCode::RateLimited.to_u16(),
                "{}: unexpected error {code} (errors {:?}, ended by {})",
                report.name,
                report.errors,
                report.ended_by
            );
        }
    }
    let acked_total: usize = reports.iter().map(|r| r.acked.len()).sum();
    assert!(acked_total > 0, "no message was acknowledged before the kill");

    // Restart on the same data directory.
    let server = ServerProcess::start(dir.path(), 2).await;
    assert_eq!(server.fingerprint, fingerprint, "the certificate is reused");
    members[0].connect(&server).await;
    let log = members[0].sync_all().await;

    // Dense from 0 (checked per page, and here across pages), setup frames first.
    for (position, frame) in log.iter().enumerate() {
        assert_eq!(frame.header().log_index(), u64::try_from(position).expect("fits"), "dense log");
    }
    assert!(log.len() >= usize::try_from(first_application).expect("fits"), "setup frames are durable");
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    for frame in &log[1..usize::try_from(first_application).expect("fits")] {
        assert_eq!(frame.opcode(), Opcode::Commit, "index {}", frame.header().log_index());
    }

    // Every load frame in the log is one a member sent, signed by it, once, in its sending order.
    let keys: HashMap<SenderId, (&'static str, VerifyingKey)> =
        members.iter().map(|m| (m.sender(), (m.name, m.key.verifying_key()))).collect();
    let attempted: HashMap<&str, u64> = reports.iter().map(|r| (r.name, r.attempted)).collect();
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let start = usize::try_from(first_application).expect("fits");
    for frame in &log[start..] {
        let index = frame.header().log_index();
        assert_eq!(frame.opcode(), Opcode::Application, "index {index}");
        let (name, key) =
            keys.get(&frame.header().sender_id()).unwrap_or_else(|| panic!("index {index}: unknown sender"));
        frame.verify(key).unwrap_or_else(|e| panic!("index {index}: signature: {e}"));
        assert_eq!(frame.header().epoch(), epoch, "index {index}");
        let payload: Application = decode_ok(frame);
        let (sent_by, seq) =
            parse_message(&payload.ciphertext).unwrap_or_else(|| panic!("index {index}: not a load message"));
        assert_eq!(sent_by, *name, "index {index}: payload and sender agree");
        assert!(seq < attempted[name], "index {index}: {name} never sent #{seq}");
        assert!(seen.insert((sent_by, seq)), "index {index}: {name} #{seq} is in the log twice");
        if let Some(previous) = last_seq.insert(name, seq) {
            assert!(previous < seq, "index {index}: {name} #{seq} after #{previous}");
        }
    }

    // Every acknowledged frame is at its acknowledged index, with its sender and payload.
    for report in &reports {
        for acked in &report.acked {
            assert_eq!(acked.epoch, epoch, "{} #{}: ack epoch", report.name, acked.seq);
            let position = usize::try_from(acked.log_index).expect("fits");
            let frame = log.get(position).unwrap_or_else(|| {
                panic!(
                    "{} #{} was acknowledged at index {} but the recovered log ends at {}",
                    report.name,
                    acked.seq,
                    acked.log_index,
                    log.len()
                )
            });
            assert_eq!(frame.opcode(), Opcode::Application, "index {}", acked.log_index);
            assert_eq!(frame.header().sender_id(), report.sender, "index {}", acked.log_index);
            let payload: Application = decode_ok(frame);
            assert_eq!(payload.ciphertext, message(report.name, acked.seq), "index {}", acked.log_index);
        }
    }

    // The server goes on at the next index, and its MLS state was rebuilt: a member can still commit.
    let next = u64::try_from(log.len()).expect("fits");
    let ack = members[0].send_text("after the restart").await;
    assert_eq!((ack.log_index, ack.epoch), (next, epoch), "no index is reused");
    let ack = members[0].self_update().await;
    assert_eq!((ack.log_index, ack.epoch), (next + 1, epoch + 1), "a commit after recovery");
    for member in &mut members[1..] {
        member.connect(&server).await;
        let (frames, done) = member.sync_page(next, SYNC_PAGE).await;
        assert_eq!(done.next_log_index, next + 2);
        for frame in &frames {
            member.apply(frame);
        }
    }
    // Recovery rebuilt the log's hash chain: the head the server signs after
    // the restart is the chain over the log it recovered and the frames since.
    let (since, done) = members[1].sync_page(next, SYNC_PAGE).await;
    let mut chain = kalandra_proto::chain::LogChain::genesis();
    for frame in log.iter().chain(&since) {
        chain.extend(ROOM, &kalandra_proto::chain::log_entry_digest(frame));
    }
    let signed = done.log_head.expect("a sync that reaches the end carries the signed head");
    assert_eq!((signed.log_index, signed.head), (next + 1, chain.head), "the recovered chain");
    let server_key = members[1].group.as_ref().and_then(|group| group.server_key()).expect("a server key");
    signed.verify(ROOM, &VerifyingKey::from_bytes(&server_key).expect("a valid key")).expect("signed by it");
    assert_converged(&members);
    let info: GroupInfo = decode_ok(&members[1].request(&GroupInfoRequest {}).await);
    assert_eq!(info.epoch, epoch + 1, "the server's epoch");
    let tree = members[1].group.as_ref().expect("a group").ratchet_tree().expect("a ratchet tree");
    assert_eq!(info.ratchet_tree, tree, "the server's ratchet tree equals the members'");
    let ack = members[2].send_text("in the new epoch").await;
    assert_eq!((ack.log_index, ack.epoch), (next + 2, epoch + 1));

    let attempted_total: u64 = reports.iter().map(|r| r.attempted).sum();
    let recovered_load = log.len() - start;
    println!(
        "sigkill: {acks_at_kill} acks when killed after {load_ms} ms of load; {acked_total} acked in all, \
         {attempted_total} sent; recovered {} frames ({recovered_load} load frames, {} durable but unacknowledged); \
         start {} ms, restart {} ms (server-logged recovery {:?} ms); ended by {:?}",
        log.len(),
        recovered_load - acked_total,
        millis(first_startup),
        millis(server.startup),
        server.logged_recovery_ms(),
        reports.iter().map(|r| r.ended_by.as_str()).collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    const ACKED_FIRST: u64 = 5;
    const PIPELINED: u64 = 50;
    let dir = tempfile::tempdir().expect("a temp dir");
    write_config(dir.path());
    let mut server = ServerProcess::start(dir.path(), 1).await;
    let mut alice = Member::new("alice", 1);
    alice.connect(&server).await;
    assert_eq!(alice.create_room().await.log_index, 0);
    for seq in 0..ACKED_FIRST {
        let ack = alice.send_text(std::str::from_utf8(&message("alice", seq)).expect("text")).await;
        assert_eq!(ack.log_index, seq + 1);
    }

    // More messages in flight, then SIGTERM without waiting for their answers.
    let mut in_flight = HashMap::new();
    for seq in ACKED_FIRST..ACKED_FIRST + PIPELINED {
        let frame = alice.frame(&Application {
            generation: 0,
            ciphertext: message("alice", seq),
            push: None,
            epoch_tag: None,
        });
        in_flight.insert(frame.header().request_id(), seq);
        alice.conn().send(&frame).await.expect("send");
    }
    let (status, took) = server.terminate().await;
    assert!(status.success(), "SIGTERM: the server exits with status 0, got {status}");

    // Whatever was answered before the connection closed: acks are durable, and the close is announced.
    let mut acked = vec![];
    let mut refused = BTreeMap::new();
    let mut ended_by = String::new();
    for _ in 0..PIPELINED + 16 {
        match tokio::time::timeout(REQUEST_TIMEOUT, alice.conn().recv()).await {
            Err(_) => panic!("the connection was neither answered nor closed after the server exited"),
            Ok(Err(ConnectionError::Closed | ConnectionError::Lost(_))) => {
                ended_by = "connection closed".to_owned();
                break;
            }
            Ok(Err(error)) => panic!("unexpected connection error after SIGTERM: {error}"),
            Ok(Ok(frame)) => {
                let seq = in_flight.get(&frame.header().request_id()).copied();
                match (frame.opcode(), seq) {
                    (Opcode::Ack, Some(seq)) => acked.push((decode_ok::<Ack>(&frame).log_index, seq)),
                    (Opcode::Error, _) => {
                        let error: Error = frame.decode_payload().expect("an Error payload");
                        *refused.entry(error.code).or_insert(0u64) += 1;
                    }
                    (opcode, _) => panic!("unexpected {opcode:?} after SIGTERM"),
                }
            }
        }
    }
    assert!(!ended_by.is_empty(), "the connection is closed after the server exited");
    for code in refused.keys() {
        assert_eq!(*code, ErrorCode::ShuttingDown.to_u16(), "refusals after SIGTERM: {refused:?}");
    }
    alice.connection = None;

    // Restart: everything acknowledged is there, in order, and the log goes on.
    let server = ServerProcess::start(dir.path(), 2).await;
    alice.connect(&server).await;
    let log = alice.sync_all().await;
    for (position, frame) in log.iter().enumerate() {
        assert_eq!(frame.header().log_index(), u64::try_from(position).expect("fits"));
    }
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    for (position, frame) in log.iter().enumerate().skip(1) {
        let payload: Application = decode_ok(frame);
        let seq = u64::try_from(position - 1).expect("fits");
        assert_eq!(payload.ciphertext, message("alice", seq), "index {position}: messages in sending order");
        assert_eq!(frame.header().sender_id(), alice.sender());
    }
    let acked_first = usize::try_from(ACKED_FIRST).expect("fits");
    assert!(log.len() > acked_first, "the acknowledged messages are durable");
    for (log_index, seq) in &acked {
        assert_eq!(*log_index, seq + 1, "#{seq} was acknowledged at {log_index}");
        assert!(usize::try_from(*log_index).expect("fits") < log.len(), "acknowledged #{seq} is durable");
    }
    // The drain acknowledged everything it made durable, then said goodbye.
    assert_eq!(
        acked.len(),
        log.len() - 1 - acked_first,
        "every frame persisted during the drain was acknowledged before the connection closed"
    );
    assert_eq!(refused.get(&ErrorCode::ShuttingDown.to_u16()), Some(&1), "one ShuttingDown goodbye");
    let next = u64::try_from(log.len()).expect("fits");
    assert_eq!(alice.send_text("after the restart").await.log_index, next);
    println!(
        "sigterm: exited 0 in {} ms; {} of {PIPELINED} pipelined acked, refused {refused:?}; {} frames after restart; restart {} ms",
        millis(took),
        acked.len(),
        log.len(),
        millis(server.startup),
    );
}

// ---------------------------------------------------------------------------
// Online backup.

const OPERATOR_TOKEN: &str = "backup-test-operator-token-01";
const READ_TOKEN: &str = "backup-test-read-only-token-01";
/// Acknowledgements before the backup is asked for.
const ACKS_BEFORE_BACKUP: u64 = 1_500;
/// Acknowledgements after the backup's answer before the kill: more than
/// the requests the load keeps in flight, so some of them were sequenced
/// after the snapshot.
const ACKS_AFTER_BACKUP: u64 = 500;
const _: () = assert!(ACKS_AFTER_BACKUP > 3 * PIPELINE_DEPTH as u64);
/// Longest wait for one admin API answer (a backup included).
const ADMIN_BOUND: Duration = Duration::from_secs(60);

/// One admin API `POST` with a JSON body: the status and the JSON answer.
async fn admin_post(
    admin: SocketAddr,
    token: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.to_string();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await.expect("connect to the admin listener");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read the answer");
        raw
    };
    let raw = tokio::time::timeout(ADMIN_BOUND, exchange).await.expect("the admin API answers in time");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "a sized body: {head}");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

/// A room of three members whose MLS state has been through
/// [`SETUP_COMMITS`] self-updates (so its snapshot is taken and replayed).
async fn room_of_three(server: &ServerProcess) -> [Member; 3] {
    let mut members = [Member::new("alice", 1), Member::new("bob", 2), Member::new("carol", 3)];
    for member in &mut members {
        member.connect(server).await;
    }
    for member in &mut members[1..] {
        assert_eq!(member.upload_key_packages(2).await.available, 2);
    }
    assert_eq!(members[0].create_room().await.log_index, 0);
    let invited = [members[1].sender(), members[2].sender()];
    assert_eq!(members[0].add(&invited).await.log_index, 1);
    for member in &mut members[1..] {
        member.join_from_welcome().await;
    }
    for round in 0..SETUP_COMMITS {
        let committer = usize::try_from(round % 3).expect("small");
        let log_index = members[committer].self_update().await.log_index;
        for other in (0..members.len()).filter(|m| *m != committer) {
            let (frames, _) = members[other].sync_page(log_index, 1).await;
            members[other].apply(&frames[0]);
        }
    }
    assert_converged(&members);
    members
}

/// A data directory holding `database` as its database and the TLS
/// identity and server signing key of `data_dir`: what an operator restores.
fn restore_dir(data_dir: &Path, database: &Path, restored: &Path) {
    std::fs::create_dir_all(restored.join("tls")).expect("create the restored data directory");
    std::fs::copy(database, restored.join("kalandra.redb")).expect("copy the backup");
    for file in ["tls/cert.pem", "tls/key.pem", "server-signing.key"] {
        std::fs::copy(data_dir.join(file), restored.join(file))
            .unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_frame_acknowledged_before_it() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let backups = dir.path().join("backups");
    let top = format!(
        "admin_token = \"{OPERATOR_TOKEN}\"\nadmin_read_token = \"{READ_TOKEN}\"\nbackup_dir = \"{}\"\n",
        backups.display()
    );
    write_config_with(dir.path(), &top);
    let mut server = ServerProcess::start(dir.path(), 1).await;
    let mut members = room_of_three(&server).await;
    let epoch = members[0].epoch();
    let first_application = SETUP_COMMITS + 2;
    let grant = serde_json::json!({ "user_id": members[1].sender().to_string(), "role": "moderator" });
    let (status, granted) =
        admin_post(server.admin, OPERATOR_TOKEN, &format!("/v1/rooms/{ROOM}/roles"), &grant).await;
    assert_eq!(status, 200, "{granted}");

    // Refusals: the read-only token, and names that are paths.
    let backup = |name: &str| serde_json::json!({ "name": name });
    let (status, refused) = admin_post(server.admin, READ_TOKEN, "/v1/backup", &backup("read.redb")).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("insufficient_scope")), "{refused}");
    for name in ["../escaped.redb", "/tmp/escaped.redb", "..", ".hidden", "a/b.redb"] {
        let (status, refused) = admin_post(server.admin, OPERATOR_TOKEN, "/v1/backup", &backup(name)).await;
        assert_eq!(
            (status, refused["code"].as_str()),
            (400, Some("invalid_backup_name")),
            "{name}: {refused}"
        );
    }
    assert!(!dir.path().join("escaped.redb").exists() && !backups.join("a").exists());
    assert_eq!(std::fs::read_dir(&backups).expect("the backup directory").count(), 0, "nothing written");

    // Load from all three members; the backup is taken in the middle of it.
    let (acks, killed, mark) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let mut tasks = Vec::new();
    for member in &mut members {
        let client = LoadClient {
            name: member.name,
            key: member.key.clone(),
            connection: member.connection.take().expect("connected"),
            epoch,
        };
        let (acks, killed, mark) = (Arc::clone(&acks), Arc::clone(&killed), Arc::clone(&mark));
        tasks.push(tokio::spawn(run_load_marked(client, acks, killed, mark)));
    }
    let wait_for_acks = |count: u64| {
        let (acks, started) = (Arc::clone(&acks), Instant::now());
        async move {
            while acks.load(Ordering::Acquire) < count && started.elapsed() < LOAD_BOUND {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    wait_for_acks(ACKS_BEFORE_BACKUP).await;
    mark.store(true, Ordering::SeqCst);
    let acks_at_backup = acks.load(Ordering::Acquire);
    let (status, done) =
        admin_post(server.admin, OPERATOR_TOKEN, "/v1/backup", &backup("under-load.redb")).await;
    assert_eq!(status, 200, "{done}");
    let acks_at_answer = acks.load(Ordering::Acquire);
    wait_for_acks(acks_at_answer + ACKS_AFTER_BACKUP).await;
    let (status, refused) =
        admin_post(server.admin, OPERATOR_TOKEN, "/v1/backup", &backup("under-load.redb")).await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("backup_exists")), "{refused}");
    assert!(tasks.iter().all(|task| !task.is_finished()), "the load ran until the kill");
    server.kill();
    killed.store(true, Ordering::Release);
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(tokio::time::timeout(LOAD_TASK_BOUND, task).await.expect("ends").expect("no panic"));
    }
    let acked_before: usize = reports.iter().map(|r| r.acked.iter().filter(|a| a.before_mark).count()).sum();
    assert!(acked_before > 0, "frames were acknowledged before the backup");

    // The backup verifies offline, and its audit head is the one it reported.
    let backup_file = backups.join("under-load.redb");
    assert_eq!(done["path"], backup_file.display().to_string());
    let restored = dir.path().join("restored");
    restore_dir(&dir.path().join("data"), &backup_file, &restored);
    let verify = Command::new(env!("CARGO_BIN_EXE_kalandra-server"))
        .arg("--data-dir")
        .arg(&restored)
        .args(["audit", "verify"])
        .env_remove("KALANDRA_CONFIG")
        .env_remove("KALANDRA_DATA_DIR")
        .output()
        .expect("run audit verify");
    let verified = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(verify.status.success(), "audit verify: {verified} {}", String::from_utf8_lossy(&verify.stderr));
    let head = &done["audit_head"];
    let expected =
        format!("audit log intact: 1 records, head {} {}", head["seq"], head["hash"].as_str().unwrap());
    assert_eq!(verified.trim(), expected);

    // A new server on the backup: the log is dense and holds every frame
    // acknowledged before the backup began, at its index.
    let server = tokio::task::spawn_blocking({
        let (dir, restored) = (dir.path().to_owned(), restored.clone());
        move || ServerProcess::start_blocking_on(&dir, &restored, 2)
    })
    .await
    .expect("the start task");
    members[0].connect(&server).await;
    let log = members[0].sync_all().await;
    for (position, frame) in log.iter().enumerate() {
        assert_eq!(frame.header().log_index(), u64::try_from(position).expect("fits"), "dense log");
    }
    assert_eq!(done["log_entries"], log.len(), "the backup's report counts the log");
    let start = usize::try_from(first_application).expect("fits");
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    assert!(log[1..start].iter().all(|frame| frame.opcode() == Opcode::Commit));
    let senders: HashMap<SenderId, (&str, VerifyingKey)> =
        members.iter().map(|m| (m.sender(), (m.name, m.key.verifying_key()))).collect();
    let mut seen = HashSet::new();
    for frame in &log[start..] {
        let (name, key) = senders[&frame.header().sender_id()];
        frame.verify(&key).expect("signed by its sender");
        let (sent_by, seq) =
            parse_message(&decode_ok::<Application>(frame).ciphertext).expect("a load message");
        assert_eq!(sent_by, name);
        assert!(seen.insert((sent_by, seq)), "{name} #{seq} is in the log once");
    }
    let mut latest_acked = 0;
    for report in &reports {
        for acked in &report.acked {
            latest_acked = latest_acked.max(acked.log_index);
            if !acked.before_mark {
                continue;
            }
            let frame = log.get(usize::try_from(acked.log_index).expect("fits")).unwrap_or_else(|| {
                panic!(
                    "{} #{} acknowledged at {} before the backup is not in it",
                    report.name, acked.seq, acked.log_index
                )
            });
            assert_eq!(frame.header().sender_id(), report.sender, "index {}", acked.log_index);
            let payload: Application = decode_ok(frame);
            assert_eq!(payload.ciphertext, message(report.name, acked.seq), "index {}", acked.log_index);
        }
    }
    // A point in time: frames acknowledged well after it are not in it.
    assert!(latest_acked >= u64::try_from(log.len()).expect("fits"), "the copy stops at its snapshot");

    // The room's MLS state is rebuilt from the copy: a commit is accepted
    // and every member follows it.
    let next = u64::try_from(log.len()).expect("fits");
    let ack = members[0].send_text("after the restore").await;
    assert_eq!((ack.log_index, ack.epoch), (next, epoch));
    let ack = members[0].self_update().await;
    assert_eq!((ack.log_index, ack.epoch), (next + 1, epoch + 1), "a commit on the restored server");
    for member in &mut members[1..] {
        member.connect(&server).await;
        let (frames, done) = member.sync_page(next, SYNC_PAGE).await;
        assert_eq!(done.next_log_index, next + 2);
        for frame in &frames {
            member.apply(frame);
        }
    }
    assert_converged(&members);
    let info: GroupInfo = decode_ok(&members[1].request(&GroupInfoRequest {}).await);
    assert_eq!(info.epoch, epoch + 1, "the server's epoch");
    println!(
        "backup under load: {} ms, {} bytes, {} log entries, {} rows; {acks_at_backup} acks when asked, \
         {acks_at_answer} when answered; {acked_before} acknowledged before it, all restored; latest ack {latest_acked}",
        done["duration_ms"], done["bytes"], done["log_entries"], done["rows"],
    );
}
