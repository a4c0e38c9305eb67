//! Every way the server refuses a client, over real QUIC on loopback with
//! real OpenMLS clients: the handshake, framing, requests and limits.
//!
//! Each case checks the exact code of the `Error` frame, that the connection
//! is closed after a protocol violation (1xxx) and stays usable after a
//! refused request or a limit (2xxx, 3xxx), that nothing already accepted is
//! affected (the room's log is unchanged and the next accepted frame gets the
//! next dense index), and that the rejection is counted in
//! `kalandra_rejections_total` under its code.

#![allow(missing_docs)]

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client_core::connection::{client_config_pinned, Connection, ConnectionError};
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, Identity, MlsProvider, RoomGroup,
};
use common::{decode_ok, default_limits, header, now_ms, TestClient, TestServer};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{
    Ack, Application, AuthChallenge, AuthResponse, Ban, ByteString, Commit, CreateRoom,
    Error as ErrorPayload, ExternalJoin, GroupInfo, GroupInfoRequest, Hello, KeyPackageClaim,
    KeyPackageClaimed, KeyPackageStatus, KeyPackageUpload, Kick, Ping, Pong, Proposal, Redact, Subscribe,
    Sync, SyncDone, Typing,
};
use kalandra_proto::sign::sign_auth_challenge;
use kalandra_proto::{
    ErrorCode, Frame, FrameDecoder, FrameHeaderBuf, Opcode, OpcodeClass, Payload, RoomId, SenderId,
};
use kalandra_server::ConnectionLimits;

const ROOM: RoomId = RoomId(*b"rejections-room!");
const OTHER_ROOM: RoomId = RoomId(*b"second-room-id!!");
const NO_ROOM: RoomId = RoomId(*b"no-such-room-id!");

/// How long a client waits for any one frame: long enough for a loaded
/// machine, short enough that a connection left open fails a test quickly.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

const ALICE: u8 = 1;
const BOB: u8 = 2;
const CAROL: u8 = 3;

// ---------------------------------------------------------------------------
// An in-process server whose metrics the tests can read.

/// The shared in-process server, plus the server key rooms list.
struct Server {
    inner: TestServer,
    server_key: [u8; 32],
    address: SocketAddr,
    fingerprint: [u8; 32],
}

impl Server {
    async fn start(limits: ConnectionLimits) -> Server {
        let inner = TestServer::start(limits).await;
        let (server_key, address, fingerprint) = (inner.server_key, inner.address, inner.fingerprint);
        Server { inner, server_key, address, fingerprint }
    }

    async fn connect(&self, key: &SigningKey) -> Result<Connection, ConnectionError> {
        self.inner.connect(key).await
    }

    /// A device whose identity derives from `seed`, connected and authenticated.
    async fn client(&self, name: &'static str, seed: u8) -> TestClient {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        let connection = self.connect(&key).await.unwrap_or_else(|e| panic!("{name} connects: {e}"));
        TestClient {
            name,
            identity,
            key,
            provider,
            connection: Some(connection),
            group: None,
            room: RoomId::default(),
        }
    }

    /// Replaces the client's connection with a fresh one (the old one is dropped).
    async fn reconnect(&self, client: &mut TestClient) {
        let connection =
            self.connect(&client.key).await.unwrap_or_else(|e| panic!("{} reconnects: {e}", client.name));
        client.connection = Some(connection);
    }

    /// `kalandra_rejections_total` by `code` label, the codes counted at
    /// least once (every code's series exists from the start, at zero).
    fn rejections(&self) -> (BTreeMap<String, f64>, String) {
        let text = self.inner.metrics.render().unwrap();
        let counts = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("kalandra_rejections_total{")?;
                let (labels, value) = rest.split_once("} ")?;
                let code = labels.split(',').find_map(|label| label.strip_prefix("code=\""))?;
                Some((code.trim_end_matches('"').to_string(), value.trim().parse::<f64>().ok()?))
            })
            .filter(|(_, count)| *count != 0.0)
            .collect();
        (counts, text)
    }

    /// The rejection counters are exactly `expected` (codes may repeat; they add up).
    fn assert_rejections(&self, expected: &[(ErrorCode, u32)]) {
        let mut want: BTreeMap<String, f64> = BTreeMap::new();
        for (code, count) in expected {
            *want.entry(code.name().to_string()).or_default() += f64::from(*count);
        }
        let (found, text) = self.rejections();
        assert_eq!(found, want, "kalandra_rejections_total by code; metrics:\n{text}");
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

// ---------------------------------------------------------------------------
// A bare QUIC stream, for what happens before authentication.

#[derive(Debug)]
enum Ended {
    /// The server finished the stream.
    Closed,
    /// The connection is gone.
    Lost,
    /// Nothing arrived in time: the connection is still open.
    TimedOut,
}

struct Raw {
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    received: VecDeque<Frame>,
}

impl Raw {
    /// A QUIC connection with one bidirectional stream opened (the server
    /// sees the stream only once bytes are sent on it).
    async fn connect(server: &Server) -> Raw {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client_config_pinned(server.fingerprint).unwrap());
        let connection = endpoint.connect(server.address, "localhost").unwrap().await.unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        Raw {
            _endpoint: endpoint,
            connection,
            send,
            recv,
            decoder: FrameDecoder::new(),
            received: VecDeque::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("the server accepts bytes");
    }

    async fn recv(&mut self) -> Result<Frame, Ended> {
        if let Some(frame) = self.received.pop_front() {
            return Ok(frame);
        }
        let read = async {
            loop {
                let chunk = match self.recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => chunk.bytes,
                    Ok(None) => return Err(Ended::Closed),
                    Err(_) => return Err(Ended::Lost),
                };
                let mut input = &chunk[..];
                while !input.is_empty() {
                    match self.decoder.decode(&mut input) {
                        Ok(Some(frame)) => self.received.push_back(frame),
                        Ok(None) => break,
                        Err(error) => panic!("the server sent an invalid frame: {error}"),
                    }
                }
                if let Some(frame) = self.received.pop_front() {
                    return Ok(frame);
                }
            }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, read).await.unwrap_or(Err(Ended::TimedOut))
    }

    /// The next frame is an `Error` with `code`, and then the server closes.
    async fn expect_refused_and_closed(&mut self, code: ErrorCode, what: &str) {
        let frame =
            self.recv().await.unwrap_or_else(|e| panic!("{what}: expected an Error frame, got {e:?}"));
        assert_code(&frame, code, what);
        match self.recv().await {
            Err(Ended::Closed | Ended::Lost) => {}
            other => panic!("{what}: expected the server to close the connection, got {other:?}"),
        }
    }

    async fn challenge(&mut self) -> AuthChallenge {
        let frame = self.recv().await.expect("an AuthChallenge");
        assert_eq!(frame.opcode(), Opcode::AuthChallenge, "{frame:?}");
        decode_ok(&frame)
    }

    /// The full challenge-response with `key`.
    async fn authenticate(&mut self, key: &SigningKey) {
        self.send(&hello(key.verifying_key().to_bytes(), vec![1])).await;
        let challenge = self.challenge().await;
        let response = AuthResponse { signature: sign_auth_challenge(key, &challenge.nonce) };
        self.send(&frame_for(key, RoomId::default(), 0, 0, &response, false).to_bytes()).await;
        let ok = self.recv().await.expect("an AuthOk");
        assert_eq!(ok.opcode(), Opcode::AuthOk, "{ok:?}");
    }
}

// ---------------------------------------------------------------------------
// Frames and expectations.

fn frame_for<P: Payload>(
    key: &SigningKey,
    room: RoomId,
    epoch: u64,
    request_id: u32,
    payload: &P,
    sign: bool,
) -> Frame {
    let sender = SenderId::from_identity_key(key.verifying_key().as_bytes());
    let mut frame = Frame::with_payload(header(P::OPCODE, room, sender, epoch, request_id), payload).unwrap();
    if sign {
        frame.sign(key);
    }
    frame
}

/// A signed frame from `client` for `room` at `epoch`, with the next request id of its connection.
fn signed<P: Payload>(client: &mut TestClient, room: RoomId, epoch: u64, payload: &P) -> Frame {
    let request_id = client.conn().next_request_id();
    frame_for(&client.key, room, epoch, request_id, payload, true)
}

fn hello(identity_key: [u8; 32], versions: Vec<u8>) -> Bytes {
    let payload = Hello { versions, identity_key, client_name: "quic-rejections".into() };
    Frame::with_payload(FrameHeaderBuf::new(Opcode::Hello), &payload).unwrap().to_bytes()
}

fn text(body: &str) -> Application {
    Application {
        generation: 0,
        ciphertext: Bytes::copy_from_slice(body.as_bytes()),
        push: None,
        epoch_tag: None,
    }
}

fn garbage_commit() -> Commit {
    Commit {
        commit: b"not an MLS message".to_vec(),
        welcome: None,
        welcome_recipients: vec![],
        group_info: None,
    }
}

/// The `Error` payload of `frame`, which must carry `code`.
fn assert_code(frame: &Frame, code: ErrorCode, what: &str) -> ErrorPayload {
    assert_eq!(frame.opcode(), Opcode::Error, "{what}: expected an Error frame, got {frame:?}");
    let error: ErrorPayload = frame.decode_payload().unwrap();
    assert_eq!(
        error.code,
        code.to_u16(),
        "{what}: expected {} ({}), got {} ({:?}): {}",
        code.name(),
        code.to_u16(),
        error.code,
        ErrorCode::from_u16(error.code).map(ErrorCode::name),
        error.message
    );
    error
}

/// Sends `frame`, expects an `Error` with `code` in reply, and that the
/// connection still answers afterwards.
async fn refused(client: &mut TestClient, frame: &Frame, code: ErrorCode) -> ErrorPayload {
    let what = format!("{} sends {:?} for room {}", client.name, frame.opcode(), frame.header().room_id());
    let reply = client.conn().request(frame).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let error = assert_code(&reply, code, &what);
    assert_eq!(
        reply.header().request_id(),
        frame.header().request_id(),
        "{what}: the Error answers the request"
    );
    assert_open(client.conn()).await;
    error
}

/// [`refused`] for a signed frame with `payload` for `room` at `epoch`.
async fn refused_with<P: Payload>(
    client: &mut TestClient,
    room: RoomId,
    epoch: u64,
    payload: &P,
    code: ErrorCode,
) -> ErrorPayload {
    let frame = signed(client, room, epoch, payload);
    refused(client, &frame, code).await
}

/// [`refused`] for a signed frame with `payload` for the client's own room and epoch.
async fn refused_own<P: Payload>(client: &mut TestClient, payload: &P, code: ErrorCode) -> ErrorPayload {
    let frame = signed_request(client, payload);
    refused(client, &frame, code).await
}

async fn assert_open(conn: &mut Connection) {
    let request_id = conn.next_request_id();
    let nonce = u64::from(request_id) * 7919;
    let ping = Frame::with_payload(
        header(Opcode::Ping, RoomId::default(), conn.sender_id(), 0, request_id),
        &Ping { nonce },
    )
    .unwrap();
    let reply = conn.request(&ping).await.expect("the connection stays open");
    assert_eq!(reply.opcode(), Opcode::Pong, "{reply:?}");
    assert_eq!(decode_ok::<Pong>(&reply).nonce, nonce);
}

/// The server closes the connection (without a second `Error`).
async fn assert_closed(conn: &mut Connection, what: &str) {
    for _ in 0..64 {
        match conn.recv().await {
            Ok(frame) => assert_ne!(frame.opcode(), Opcode::Error, "{what}: a second Error frame"),
            Err(ConnectionError::TimedOut) => panic!("{what}: the server did not close the connection"),
            Err(_) => return,
        }
    }
    panic!("{what}: the server keeps sending instead of closing");
}

/// The next `Error` frame; fails if the frame sent with `bad_request` is
/// acknowledged instead (0: no such frame).
async fn next_error(conn: &mut Connection, bad_request: u32, what: &str) -> Frame {
    loop {
        let frame = conn.recv().await.unwrap_or_else(|e| panic!("{what}: waiting for an Error frame: {e}"));
        if frame.opcode() == Opcode::Error {
            return frame;
        }
        if bad_request != 0 && frame.opcode() == Opcode::Ack && frame.header().request_id() == bad_request {
            let ack: Ack = decode_ok(&frame);
            panic!("{what}: the server accepted the frame at log index {}", ack.log_index);
        }
    }
}

/// The room's whole log, read with `Sync` on a fresh connection of a member.
async fn room_log(server: &Server, key: &SigningKey, room: RoomId) -> Vec<Frame> {
    let mut conn = server.connect(key).await.unwrap();
    let request_id = conn.next_request_id();
    let sync = Frame::with_payload(
        header(Opcode::Sync, room, conn.sender_id(), 0, request_id),
        &Sync { from_log_index: 0, count_max: 4096 },
    )
    .unwrap();
    conn.send(&sync).await.unwrap();
    let mut log = Vec::new();
    loop {
        let frame = conn.recv().await.unwrap();
        match frame.opcode() {
            Opcode::SyncDone if frame.header().request_id() == request_id => {
                let done: SyncDone = decode_ok(&frame);
                assert_eq!(done.next_log_index, u64::try_from(log.len()).unwrap());
                break;
            }
            Opcode::Error => {
                panic!("reading the log of {room}: {:?}", frame.decode_payload::<ErrorPayload>())
            }
            _ if frame.opcode().class() == OpcodeClass::Sequenced && frame.header().room_id() == room => {
                log.push(frame);
            }
            _ => {}
        }
    }
    for (index, frame) in log.iter().enumerate() {
        assert_eq!(frame.header().log_index(), u64::try_from(index).unwrap(), "the log is dense");
    }
    log
}

fn encoded(log: &[Frame]) -> Vec<Bytes> {
    log.iter().map(Frame::to_bytes).collect()
}

fn ciphertext(frame: &Frame) -> Vec<u8> {
    assert_eq!(frame.opcode(), Opcode::Application, "{frame:?}");
    frame.decode_payload::<Application>().unwrap().ciphertext.to_vec()
}

/// A `CreateRoom` payload for `room` by the identity of `seed`, from fresh MLS state.
fn create_payload(seed: u8, room: RoomId, server_key: &[u8; 32]) -> CreateRoom {
    let provider = MlsProvider::from_seed([seed; 32]);
    let identity = Identity::generate(&provider).unwrap();
    let (_, created) = RoomGroup::create(&provider, &identity, room.0, server_key, now_ms() / 1000).unwrap();
    CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None }
}

/// Alice creates `ROOM` and adds Bob: the log holds `CreateRoom` at 0 and
/// the add at 1; the room is at epoch 1.
async fn two_member_room(server: &Server) -> (TestClient, TestClient) {
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    assert_eq!(bob.upload_key_packages(2).await.available, 2);
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let ack: Ack = decode_ok(&alice.add(&[bob.sender()]).await);
    assert_eq!((ack.log_index, ack.epoch), (1, 1));
    bob.join_from_welcome(ROOM).await;
    (alice, bob)
}

/// What an upload test sends: a description, the ordinary packages, the last-resort slot.
type UploadCase<'a> = (&'a str, Vec<&'a [u8]>, Option<&'a [u8]>);

async fn upload(client: &mut TestClient, ordinary: &[&[u8]], last_resort: Option<&[u8]>) -> Frame {
    let payload = KeyPackageUpload {
        key_packages: ordinary.iter().map(|package| ByteString(package.to_vec())).collect(),
        last_resort: last_resort.map(<[u8]>::to_vec),
    };
    let frame = client.frame(&payload);
    client.conn().request(&frame).await.unwrap()
}

async fn claim(client: &mut TestClient, owners: &[SenderId]) -> Vec<Option<Vec<u8>>> {
    let reply = client
        .request(&KeyPackageClaim { sender_ids: owners.iter().map(|s| s.0).collect(), domain: None })
        .await;
    let claimed: KeyPackageClaimed = decode_ok(&reply);
    assert_eq!(claimed.key_packages.len(), owners.len());
    for (entry, owner) in claimed.key_packages.iter().zip(owners) {
        assert_eq!(entry.sender_id, owner.0, "claims are answered in request order");
    }
    claimed.key_packages.into_iter().map(|entry| entry.key_package).collect()
}

// ---------------------------------------------------------------------------
// Handshake.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_violations_are_refused_and_close_the_connection() {
    let server = Server::start(default_limits()).await;
    let alice = SigningKey::from_bytes(&[ALICE; 32]);
    let bob = SigningKey::from_bytes(&[BOB; 32]);
    let alice_id = SenderId::from_identity_key(alice.verifying_key().as_bytes());
    let ping = frame_for(&alice, RoomId::default(), 0, 1, &Ping { nonce: 1 }, false).to_bytes();

    // A frame before Hello.
    let mut raw = Raw::connect(&server).await;
    raw.send(&ping).await;
    raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "Ping before Hello").await;

    let mut raw = Raw::connect(&server).await;
    let response = AuthResponse { signature: sign_auth_challenge(&alice, &[0; 32]) };
    raw.send(&frame_for(&alice, RoomId::default(), 0, 0, &response, false).to_bytes()).await;
    raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "AuthResponse before Hello").await;

    // A frame between the challenge and the response.
    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![1])).await;
    raw.challenge().await;
    raw.send(&ping).await;
    raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "Ping instead of AuthResponse").await;

    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![1])).await;
    raw.challenge().await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![1])).await;
    raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "a second Hello").await;

    // No common version.
    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![2, 3, 200])).await;
    raw.expect_refused_and_closed(ErrorCode::UnsupportedVersion, "Hello offering versions 2, 3, 200").await;

    // No version at all breaks the payload's limits.
    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![])).await;
    raw.expect_refused_and_closed(ErrorCode::MalformedPayload, "Hello offering no version").await;

    // The challenge signed by another key.
    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![1])).await;
    let challenge = raw.challenge().await;
    let response = AuthResponse { signature: sign_auth_challenge(&bob, &challenge.nonce) };
    raw.send(&frame_for(&alice, RoomId::default(), 0, 0, &response, false).to_bytes()).await;
    raw.expect_refused_and_closed(ErrorCode::AuthenticationFailed, "challenge signed by another key").await;

    // Weak (small-order) identity keys: the identity point and a point of order 4.
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    for (weak, what) in [(identity_point, "identity point"), ([0u8; 32], "order-4 point")] {
        let mut raw = Raw::connect(&server).await;
        raw.send(&hello(weak, vec![1])).await;
        raw.expect_refused_and_closed(ErrorCode::AuthenticationFailed, what).await;
    }

    // An invalid header before authentication.
    let mut raw = Raw::connect(&server).await;
    let mut bad = hello(alice.verifying_key().to_bytes(), vec![1]).to_vec();
    bad[..4].copy_from_slice(b"XXXX");
    raw.send(&bad).await;
    raw.expect_refused_and_closed(ErrorCode::MalformedHeader, "bad magic in Hello").await;

    // Before authentication nothing larger than a control frame is buffered:
    // a header announcing a sequenced frame's size is refused at once.
    let mut raw = Raw::connect(&server).await;
    raw.send(&hello(alice.verifying_key().to_bytes(), vec![1])).await;
    raw.challenge().await;
    let payload = bytes::Bytes::from(vec![0; kalandra_proto::limits::CONTROL_PAYLOAD_BYTES_MAX as usize + 1]);
    let big = Frame::new(FrameHeaderBuf::new(Opcode::Commit), payload).unwrap().to_bytes();
    raw.send(&big[..kalandra_proto::limits::HEADER_BYTES]).await;
    raw.expect_refused_and_closed(ErrorCode::PayloadTooLarge, "a large frame before authentication").await;

    // None of this stops a correct handshake.
    let mut conn = server.connect(&alice).await.expect("a correct handshake succeeds");
    assert_eq!(conn.sender_id(), alice_id);
    assert_open(&mut conn).await;

    server.assert_rejections(&[
        (ErrorCode::NotAuthenticated, 4),
        (ErrorCode::UnsupportedVersion, 1),
        (ErrorCode::MalformedPayload, 1),
        (ErrorCode::AuthenticationFailed, 3),
        (ErrorCode::MalformedHeader, 1),
        (ErrorCode::PayloadTooLarge, 1),
    ]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_not_finished_in_time_is_refused() {
    const HANDSHAKE_MS: u64 = 300;
    let mut limits = default_limits();
    limits.handshake_timeout_ms = HANDSHAKE_MS;
    let server = Server::start(limits).await;
    let key = SigningKey::from_bytes(&[ALICE; 32]);

    // Hello answered, then silence.
    let after_hello = async {
        let mut raw = Raw::connect(&server).await;
        let started = Instant::now();
        raw.send(&hello(key.verifying_key().to_bytes(), vec![1])).await;
        raw.challenge().await;
        raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "no AuthResponse").await;
        started.elapsed()
    };
    // Half a header, then silence.
    let partial_header = async {
        let mut raw = Raw::connect(&server).await;
        let started = Instant::now();
        raw.send(&hello(key.verifying_key().to_bytes(), vec![1])[..10]).await;
        raw.expect_refused_and_closed(ErrorCode::NotAuthenticated, "10 bytes of a header").await;
        started.elapsed()
    };
    // A connection that never sends a byte is closed too.
    let silent = async {
        let raw = Raw::connect(&server).await;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(3), raw.connection.closed())
            .await
            .expect("the server closes a connection that never authenticates");
        started.elapsed()
    };
    // An authenticated connection is not subject to the deadline.
    let authenticated = async {
        let mut conn = server.connect(&key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2 * HANDSHAKE_MS)).await;
        assert_open(&mut conn).await;
    };
    let (after_hello, partial_header, silent, ()) =
        tokio::join!(after_hello, partial_header, silent, authenticated);
    for (elapsed, what) in
        [(after_hello, "no AuthResponse"), (partial_header, "partial header"), (silent, "silent")]
    {
        assert!(
            elapsed >= Duration::from_millis(HANDSHAKE_MS * 2 / 3) && elapsed < Duration::from_secs(3),
            "{what}: closed after {elapsed:?} with a {HANDSHAKE_MS} ms handshake timeout"
        );
    }
    server.stop().await;
}

/// An `Error` frame is a rejection whatever the cause: the two handshakes
/// that time out are counted like any other `NotAuthenticated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeouts_are_counted_as_rejections() {
    let mut limits = default_limits();
    limits.handshake_timeout_ms = 200;
    let server = Server::start(limits).await;
    let key = SigningKey::from_bytes(&[ALICE; 32]);
    let mut after_hello = Raw::connect(&server).await;
    after_hello.send(&hello(key.verifying_key().to_bytes(), vec![1])).await;
    after_hello.challenge().await;
    let mut partial = Raw::connect(&server).await;
    partial.send(&hello(key.verifying_key().to_bytes(), vec![1])[..10]).await;
    after_hello.expect_refused_and_closed(ErrorCode::NotAuthenticated, "no AuthResponse").await;
    partial.expect_refused_and_closed(ErrorCode::NotAuthenticated, "10 bytes of a header").await;
    server.assert_rejections(&[(ErrorCode::NotAuthenticated, 2)]);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Framing and per-frame checks after authentication.

struct Violation {
    what: &'static str,
    bytes: Vec<u8>,
    code: ErrorCode,
    /// The request id the `Error` carries: the frame's own, or 0 when its magic or version is wrong.
    request_id: u32,
}

/// Sends a valid Application and then `violation` in one write on a fresh
/// connection; expects the `Error` and the close. Returns the text of the
/// Application, which must have been sequenced.
async fn violate(server: &Server, alice: &mut TestClient, violation: &Violation) -> Vec<u8> {
    server.reconnect(alice).await;
    let body = format!("sent just before: {}", violation.what);
    let valid = alice.frame(&text(&body));
    let mut bytes = valid.to_bytes().to_vec();
    bytes.extend_from_slice(&violation.bytes);
    alice.conn().send_bytes(&bytes).await.unwrap();
    let frame = next_error(alice.conn(), violation.request_id, violation.what).await;
    assert_code(&frame, violation.code, violation.what);
    assert_eq!(
        frame.header().request_id(),
        violation.request_id,
        "{}: request id of the Error",
        violation.what
    );
    assert_closed(alice.conn(), violation.what).await;
    body.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_close_the_connection_and_keep_what_was_accepted() {
    const ENDPOINT_PAYLOAD_MAX: u32 = 65_536;
    let mut limits = default_limits();
    limits.payload_bytes_max = ENDPOINT_PAYLOAD_MAX;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let key = alice.key.clone();
    let me = alice.sender();
    let stranger = SenderId(me.0 ^ 1);

    let ping =
        Frame::with_payload(header(Opcode::Ping, RoomId::default(), me, 0, 11), &Ping { nonce: 5 }).unwrap();
    let patched = |at: usize, bytes: &[u8]| {
        let mut out = ping.to_bytes().to_vec();
        out[at..at + bytes.len()].copy_from_slice(bytes);
        out
    };
    // Only the 128 header bytes: the server must answer without waiting for the payload.
    let header_only = |opcode: Opcode, payload_len: u32| {
        let mut out = header(opcode, ROOM, me, 0, 12).as_bytes().to_vec();
        out[8..12].copy_from_slice(&payload_len.to_be_bytes());
        out
    };
    let raw_payload = |opcode: Opcode, payload: &[u8], request_id: u32| {
        Frame::new(header(opcode, ROOM, me, 0, request_id), Bytes::copy_from_slice(payload))
            .unwrap()
            .to_bytes()
            .to_vec()
    };
    let mut trailing = Ping { nonce: 5 }.encode().to_vec();
    trailing.push(0);
    // {"generation": 0, "ciphertext": [1, 2]}: an array of integers where a byte string belongs.
    let mut integer_array = vec![0xa2, 0x6a];
    integer_array.extend_from_slice(b"generation");
    integer_array.extend_from_slice(&[0x00, 0x6a]);
    integer_array.extend_from_slice(b"ciphertext");
    integer_array.extend_from_slice(&[0x82, 0x01, 0x02]);
    let mut other_sender_app =
        Frame::with_payload(header(Opcode::Application, ROOM, stranger, 0, 28), &text("x")).unwrap();
    other_sender_app.sign(&key);
    let other_sender_ping =
        Frame::with_payload(header(Opcode::Ping, RoomId::default(), stranger, 0, 27), &Ping { nonce: 1 })
            .unwrap();
    let hello_again = Hello {
        versions: vec![1],
        identity_key: key.verifying_key().to_bytes(),
        client_name: "again".into(),
    };
    let ack = Ack { log_index: 0, epoch: 0, server_time_ms: 0, log_head: None, signed_head: None };
    let group_info = GroupInfo { epoch: 0, group_info: vec![1], ratchet_tree: vec![1] };
    let kick = Kick { target: stranger.0, reason: "unsigned".into() };

    let violations = [
        Violation {
            what: "bad magic",
            bytes: patched(0, b"XXXX"),
            code: ErrorCode::MalformedHeader,
            request_id: 0,
        },
        Violation {
            what: "reserved flag bit",
            bytes: patched(5, &[0x80]),
            code: ErrorCode::MalformedHeader,
            request_id: 11,
        },
        Violation {
            what: "ephemeral flag on Ping",
            bytes: patched(5, &[0x04]),
            code: ErrorCode::MalformedHeader,
            request_id: 11,
        },
        Violation {
            what: "header version 2",
            bytes: patched(4, &[2]),
            code: ErrorCode::UnsupportedVersion,
            request_id: 0,
        },
        Violation {
            what: "undefined opcode 0x0999",
            bytes: patched(6, &[0x09, 0x99]),
            code: ErrorCode::UnknownOpcode,
            request_id: 11,
        },
        Violation {
            what: "federation opcode 0x1000",
            bytes: patched(6, &[0x10, 0x00]),
            code: ErrorCode::UnknownOpcode,
            request_id: 11,
        },
        Violation {
            what: "authority-handover opcode 0x2fff",
            bytes: patched(6, &[0x2f, 0xff]),
            code: ErrorCode::UnknownOpcode,
            request_id: 11,
        },
        Violation {
            what: "Ping header announcing 16 KiB + 1 (header only)",
            bytes: header_only(Opcode::Ping, 16_385),
            code: ErrorCode::PayloadTooLarge,
            request_id: 12,
        },
        Violation {
            what: "Application header announcing 256 KiB + 1 (header only)",
            bytes: header_only(Opcode::Application, 262_145),
            code: ErrorCode::PayloadTooLarge,
            request_id: 12,
        },
        Violation {
            what: "Commit header above the endpoint's limit (header only)",
            bytes: header_only(Opcode::Commit, ENDPOINT_PAYLOAD_MAX + 1),
            code: ErrorCode::PayloadTooLarge,
            request_id: 12,
        },
        Violation {
            what: "payload that is not CBOR",
            bytes: raw_payload(Opcode::Ping, &[0xff, 0xff, 0xff], 21),
            code: ErrorCode::MalformedPayload,
            request_id: 21,
        },
        Violation {
            what: "array of integers for a byte string",
            bytes: raw_payload(Opcode::Application, &integer_array, 22),
            code: ErrorCode::MalformedPayload,
            request_id: 22,
        },
        Violation {
            what: "bytes after the CBOR item",
            bytes: raw_payload(Opcode::Ping, &trailing, 23),
            code: ErrorCode::MalformedPayload,
            request_id: 23,
        },
        Violation {
            what: "Sync with count_max 0",
            bytes: frame_for(&key, ROOM, 0, 24, &Sync { from_log_index: 0, count_max: 0 }, false)
                .to_bytes()
                .to_vec(),
            code: ErrorCode::MalformedPayload,
            request_id: 24,
        },
        Violation {
            what: "unsigned Application",
            bytes: frame_for(&key, ROOM, 0, 25, &text("unsigned"), false).to_bytes().to_vec(),
            code: ErrorCode::BadSignature,
            request_id: 25,
        },
        Violation {
            what: "unsigned Kick",
            bytes: frame_for(&key, ROOM, 0, 26, &kick, false).to_bytes().to_vec(),
            code: ErrorCode::BadSignature,
            request_id: 26,
        },
        Violation {
            what: "Ping with another sender id",
            bytes: other_sender_ping.to_bytes().to_vec(),
            code: ErrorCode::SenderMismatch,
            request_id: 27,
        },
        Violation {
            what: "signed Application with another sender id",
            bytes: other_sender_app.to_bytes().to_vec(),
            code: ErrorCode::SenderMismatch,
            request_id: 28,
        },
        Violation {
            what: "Ack from a client",
            bytes: frame_for(&key, ROOM, 0, 29, &ack, false).to_bytes().to_vec(),
            code: ErrorCode::UnexpectedFrame,
            request_id: 29,
        },
        Violation {
            what: "GroupInfo from a client",
            bytes: frame_for(&key, ROOM, 0, 30, &group_info, false).to_bytes().to_vec(),
            code: ErrorCode::UnexpectedFrame,
            request_id: 30,
        },
        Violation {
            what: "Hello after authentication",
            bytes: frame_for(&key, RoomId::default(), 0, 31, &hello_again, false).to_bytes().to_vec(),
            code: ErrorCode::UnexpectedFrame,
            request_id: 31,
        },
    ];

    let mut accepted = Vec::new();
    for violation in &violations {
        accepted.push(violate(&server, &mut alice, violation).await);
    }

    // Every Application sent before a violation was sequenced, in order,
    // densely; the next one follows. (Its acknowledgement also means that
    // everything before it is durable, so the read below sees all of it.)
    server.reconnect(&mut alice).await;
    let ack: Ack = decode_ok(&alice.send_text("after every violation").await);
    assert_eq!(ack.log_index, u64::try_from(violations.len()).unwrap() + 1);
    accepted.push(b"after every violation".to_vec());
    let log = room_log(&server, &key, ROOM).await;
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    assert_eq!(log[1..].iter().map(ciphertext).collect::<Vec<_>>(), accepted);

    let counts: Vec<(ErrorCode, u32)> = violations.iter().map(|v| (v.code, 1)).collect();
    server.assert_rejections(&counts);
    server.stop().await;
}

/// Code 1000 covers a truncated frame: a stream that ends inside a frame is
/// answered with `MalformedHeader` before the server closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_cut_short_by_the_end_of_the_stream_is_malformed() {
    let server = Server::start(default_limits()).await;
    let key = SigningKey::from_bytes(&[ALICE; 32]);
    let ping = frame_for(&key, RoomId::default(), 0, 5, &Ping { nonce: 1 }, false).to_bytes();
    for (cut, what) in
        [(100, "the stream ends inside a header"), (ping.len() - 1, "the stream ends inside a payload")]
    {
        let mut raw = Raw::connect(&server).await;
        raw.authenticate(&key).await;
        raw.send(&ping[..cut]).await;
        raw.send.finish().unwrap();
        raw.expect_refused_and_closed(ErrorCode::MalformedHeader, what).await;
    }
    server.assert_rejections(&[(ErrorCode::MalformedHeader, 2)]);
    server.stop().await;
}

/// §4 and code 1005 ("signature missing or invalid"): a frame whose SIGNED
/// flag is set but whose signature does not verify against the sender's
/// identity key is refused like an unsigned one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_frames_with_an_invalid_signature_are_refused() {
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let key = alice.key.clone();
    let bob = SigningKey::from_bytes(&[BOB; 32]);

    // The server verifies the frame signature of every signed frame except
    // Application ones, which the members verify (docs/wire-protocol.md §4);
    // a garbage proposal would be refused by MLS next, so the code tells
    // which check refused it.
    let proposal = |body: &str| kalandra_proto::payload::Proposal { proposal: body.as_bytes().to_vec() };
    let mut zero_signature = frame_for(&key, ROOM, 0, 41, &proposal("zero signature"), true);
    zero_signature.header_mut().set_signature(&[0; 64]);
    let mut foreign = frame_for(&key, ROOM, 0, 42, &proposal("signed by bob"), false);
    foreign.sign(&bob);
    // Signed, then the payload swapped (same length).
    let original = frame_for(&key, ROOM, 0, 43, &proposal("original"), true);
    let swapped = Frame::new(original.header().to_buf(), proposal("swapped!").encode()).unwrap();
    assert_eq!(swapped.header().signature(), original.header().signature());

    let violations = [
        Violation {
            what: "SIGNED flag with an all-zero signature",
            bytes: zero_signature.to_bytes().to_vec(),
            code: ErrorCode::BadSignature,
            request_id: 41,
        },
        Violation {
            what: "signature by another key",
            bytes: foreign.to_bytes().to_vec(),
            code: ErrorCode::BadSignature,
            request_id: 42,
        },
        Violation {
            what: "payload swapped after signing",
            bytes: swapped.to_bytes().to_vec(),
            code: ErrorCode::BadSignature,
            request_id: 43,
        },
    ];
    let mut accepted = Vec::new();
    for violation in &violations {
        accepted.push(violate(&server, &mut alice, violation).await);
    }
    server.reconnect(&mut alice).await;
    decode_ok::<Ack>(&alice.send_text("afterwards").await);
    accepted.push(b"afterwards".to_vec());
    let log = room_log(&server, &key, ROOM).await;
    assert_eq!(
        log[1..].iter().map(ciphertext).collect::<Vec<_>>(),
        accepted,
        "only the valid frames are in the log, none of the badly signed proposals"
    );
    server.assert_rejections(&[(ErrorCode::BadSignature, 3)]);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_rooms_non_members_and_unknown_log_indices_are_refused() {
    let server = Server::start(default_limits()).await;
    let (mut alice, _bob) = two_member_room(&server).await;
    let before = room_log(&server, &alice.key, ROOM).await;
    let mut carol = server.client("carol", CAROL).await;

    let unknown_room = [
        signed(&mut carol, NO_ROOM, 0, &text("hello?")),
        signed(&mut carol, NO_ROOM, 0, &Subscribe { from_log_index: 0 }),
        signed(&mut carol, NO_ROOM, 0, &Sync { from_log_index: 0, count_max: 10 }),
        signed(&mut carol, NO_ROOM, 0, &GroupInfoRequest {}),
        signed(&mut carol, NO_ROOM, 0, &Typing { active: true }),
        signed(&mut carol, NO_ROOM, 0, &garbage_commit()),
    ];
    for frame in &unknown_room {
        refused(&mut carol, frame, ErrorCode::UnknownRoom).await;
    }

    // Carol is not in the room: she may neither post nor read.
    let not_member = [
        signed(&mut carol, ROOM, 1, &text("let me in")),
        signed(&mut carol, ROOM, 1, &Subscribe { from_log_index: 0 }),
        signed(&mut carol, ROOM, 1, &Sync { from_log_index: 0, count_max: 10 }),
        signed(&mut carol, ROOM, 1, &Typing { active: true }),
        signed(&mut carol, ROOM, 1, &garbage_commit()),
        signed(&mut carol, ROOM, 1, &Proposal { proposal: b"not an MLS message".to_vec() }),
    ];
    for frame in &not_member {
        let reply = carol.conn().request(frame).await.unwrap();
        assert_code(&reply, ErrorCode::NotMember, &format!("Carol sends {:?}", frame.opcode()));
        assert_eq!(reply.header().room_id(), ROOM, "the Error names the room");
        assert_open(carol.conn()).await;
    }

    // The head is 2: reading from 3 on is refused, from 2 is fine.
    refused_own(&mut alice, &Subscribe { from_log_index: 3 }, ErrorCode::UnknownLogIndex).await;
    refused_own(&mut alice, &Sync { from_log_index: 7, count_max: 1 }, ErrorCode::UnknownLogIndex).await;
    let sync = signed_request(&mut alice, &Sync { from_log_index: 2, count_max: 1 });
    let done: SyncDone = decode_ok(&alice.conn().request(&sync).await.unwrap());
    assert_eq!((done.next_log_index, done.live), (2, false));
    alice.subscribe(2).await;
    let done: SyncDone = decode_ok(&alice.next_of(Opcode::SyncDone).await);
    assert_eq!((done.next_log_index, done.live), (2, true));

    assert_eq!(encoded(&room_log(&server, &alice.key, ROOM).await), encoded(&before), "the log is unchanged");
    let ack: Ack = decode_ok(&alice.send_text("still here").await);
    assert_eq!(ack.log_index, 2);
    server.assert_rejections(&[
        (ErrorCode::UnknownRoom, 6),
        (ErrorCode::NotMember, 6),
        (ErrorCode::UnknownLogIndex, 2),
    ]);
    server.stop().await;
}

/// A signed frame for the client's own room and epoch.
fn signed_request<P: Payload>(client: &mut TestClient, payload: &P) -> Frame {
    let (room, epoch) = (client.room, client.epoch());
    signed(client, room, epoch, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_for_another_epoch_report_where_the_room_is() {
    let server = Server::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    assert_eq!(decode_ok::<Ack>(&alice.send_text("at epoch 1").await).log_index, 2);
    let before = room_log(&server, &alice.key, ROOM).await;

    for epoch in [0, 2, u64::MAX] {
        let frame = signed(&mut bob, ROOM, epoch, &text("wrong epoch"));
        let error = refused(&mut bob, &frame, ErrorCode::WrongEpoch).await;
        assert_eq!((error.current_epoch, error.log_index), (Some(1), Some(1)), "epoch {epoch}");
    }
    let stale_commit = signed(&mut bob, ROOM, 0, &garbage_commit());
    let error = refused(&mut bob, &stale_commit, ErrorCode::WrongEpoch).await;
    assert_eq!((error.current_epoch, error.log_index), (Some(1), Some(1)));
    assert_eq!(encoded(&room_log(&server, &alice.key, ROOM).await), encoded(&before), "the log is unchanged");

    // Alice moves the room to epoch 2 at index 3; Bob, still at 1, is told so.
    let ack: Ack = decode_ok(&alice.self_update().await);
    assert_eq!((ack.log_index, ack.epoch), (3, 2));
    let error = refused_own(&mut bob, &text("late"), ErrorCode::WrongEpoch).await;
    assert_eq!((error.current_epoch, error.log_index), (Some(2), Some(3)));

    // Bob catches up from where the error pointed, and is accepted at the next index.
    let log = room_log(&server, &bob.key, ROOM).await;
    bob.apply(&log[3]);
    assert_eq!(bob.epoch(), 2);
    assert_eq!(decode_ok::<Ack>(&bob.send_text("caught up").await).log_index, 4);
    server.assert_rejections(&[(ErrorCode::WrongEpoch, 5)]);
    server.stop().await;
}

/// A commit whose header names the current epoch but whose MLS content is
/// for an older one is `WrongEpoch` too, and (§7) must say where the room is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_mls_commit_reports_where_the_room_is() {
    let server = Server::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    let stale = bob.group.as_mut().unwrap().self_update(&bob.provider, &bob.identity).unwrap();
    let ack: Ack = decode_ok(&alice.self_update().await);
    assert_eq!((ack.log_index, ack.epoch), (2, 2));
    let commit = Commit {
        commit: stale.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(stale.group_info),
    };
    let frame = signed(&mut bob, ROOM, 2, &commit);
    let error = refused(&mut bob, &frame, ErrorCode::WrongEpoch).await;
    bob.group.as_mut().unwrap().discard_pending_commit(&bob.provider).unwrap();
    assert_eq!(
        (error.current_epoch, error.log_index),
        (Some(2), Some(2)),
        "WrongEpoch must carry current_epoch and log_index ({})",
        error.message
    );
    server.assert_rejections(&[(ErrorCode::WrongEpoch, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commits_and_proposals_are_refused_without_effect() {
    let server = Server::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    let before = room_log(&server, &alice.key, ROOM).await;

    refused_own(&mut alice, &garbage_commit(), ErrorCode::InvalidCommit).await;
    let proposal = Proposal { proposal: b"not an MLS message".to_vec() };
    refused_own(&mut alice, &proposal, ErrorCode::InvalidProposal).await;

    // Alice's commit, re-signed and submitted by Bob as his own: the MLS
    // committer is not the connection's identity.
    let output = alice.group.as_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
    let commit = Commit {
        commit: output.commit.clone(),
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(output.group_info.clone()),
    };
    let relabelled = signed(&mut bob, ROOM, 1, &commit);
    refused(&mut bob, &relabelled, ErrorCode::InvalidCommit).await;

    // A garbage external join from an outsider: the room is invite-only,
    // so it is refused before its commit is even read.
    let mut carol = server.client("carol", CAROL).await;
    let join = ExternalJoin { commit: b"not an MLS message".to_vec(), group_info: None };
    refused_with(&mut carol, ROOM, 1, &join, ErrorCode::Forbidden).await;

    // Alice's own frame (her header, her signature) forwarded over Bob's
    // connection: a sender mismatch, which closes Bob's connection.
    let forwarded = alice.frame(&commit);
    bob.conn().send(&forwarded).await.unwrap();
    let error = next_error(bob.conn(), forwarded.header().request_id(), "forwarded commit").await;
    assert_code(&error, ErrorCode::SenderMismatch, "Alice's commit over Bob's connection");
    assert_closed(bob.conn(), "forwarded commit").await;

    assert_eq!(encoded(&room_log(&server, &alice.key, ROOM).await), encoded(&before), "the log is unchanged");

    // Alice's commit itself is still good and is the next entry.
    let own = alice.frame(&commit);
    let reply = alice.conn().request(&own).await.unwrap();
    alice.settle_commit(&reply);
    let ack: Ack = decode_ok(&reply);
    assert_eq!((ack.log_index, ack.epoch), (2, 2));
    server.assert_rejections(&[
        (ErrorCode::InvalidCommit, 2),
        (ErrorCode::InvalidProposal, 1),
        (ErrorCode::SenderMismatch, 1),
        (ErrorCode::Forbidden, 1),
    ]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rooms_foreign_groups_and_missing_group_info_are_refused() {
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let mut carol = server.client("carol", CAROL).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let before = room_log(&server, &alice.key, ROOM).await;

    // The id is taken, whoever asks and whatever group they bring.
    let bobs = create_payload(BOB, ROOM, &server.server_key);
    refused_with(&mut bob, ROOM, 0, &bobs, ErrorCode::RoomExists).await;
    let again = create_payload(ALICE, ROOM, &server.server_key);
    refused_with(&mut alice, ROOM, 0, &again, ErrorCode::RoomExists).await;
    let log = room_log(&server, &alice.key, ROOM).await;
    assert_eq!(encoded(&log), encoded(&before), "the log is unchanged");
    assert_eq!(log[0].header().sender_id(), alice.sender(), "the room is still Alice's");

    // A group in which the creator is not a member.
    let foreign = create_payload(BOB, OTHER_ROOM, &server.server_key);
    refused_with(&mut alice, OTHER_ROOM, 0, &foreign, ErrorCode::NotMember).await;

    // A commit must publish the GroupInfo of the epoch it creates: a member
    // that cannot process the commit rejoins from it (docs/RECOVERY.md).
    let output = alice.group.as_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
    let bare = Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
    let reply = alice.request(&bare).await;
    alice.settle_commit(&reply);
    let error = assert_code(&reply, ErrorCode::InvalidGroupInfo, "a commit without its GroupInfo");
    assert!(error.message.contains("must publish the GroupInfo"), "{}", error.message);
    // A stranger gets nothing of an invite-only room.
    let request = signed(&mut carol, ROOM, 0, &GroupInfoRequest {});
    refused(&mut carol, &request, ErrorCode::Forbidden).await;

    // A commit that publishes one is accepted, and its GroupInfo served (to members).
    let ack: Ack = decode_ok(&alice.self_update().await);
    assert_eq!((ack.log_index, ack.epoch), (1, 1));
    let request = signed(&mut alice, ROOM, 0, &GroupInfoRequest {});
    let info: GroupInfo = decode_ok(&alice.conn().request(&request).await.unwrap());
    assert_eq!(info.epoch, 1);
    assert!(!info.group_info.is_empty() && !info.ratchet_tree.is_empty());

    server.assert_rejections(&[
        (ErrorCode::RoomExists, 2),
        (ErrorCode::NotMember, 1),
        (ErrorCode::InvalidGroupInfo, 1),
        (ErrorCode::Forbidden, 1),
    ]);
    server.stop().await;
}

/// Code 2006 is "GroupInfo or ratchet tree invalid": a `CreateRoom` whose
/// GroupInfo or ratchet tree does not parse is refused with it, creates no
/// room, and does not count towards the creator's rooms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_with_an_invalid_group_info_or_tree_is_invalid_group_info() {
    let mut limits = default_limits();
    limits.rooms_per_user_max = 1;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    let valid = create_payload(ALICE, ROOM, &server.server_key);

    let bad_group_info = CreateRoom {
        group_info: b"not a GroupInfo".to_vec(),
        ratchet_tree: valid.ratchet_tree.clone(),
        join_rule: None,
    };
    refused_with(&mut alice, ROOM, 0, &bad_group_info, ErrorCode::InvalidGroupInfo).await;
    let bad_tree = CreateRoom {
        group_info: valid.group_info.clone(),
        ratchet_tree: b"not a tree".to_vec(),
        join_rule: None,
    };
    refused_with(&mut alice, ROOM, 0, &bad_tree, ErrorCode::InvalidGroupInfo).await;

    let sync = signed(&mut alice, ROOM, 0, &Sync { from_log_index: 0, count_max: 1 });
    refused(&mut alice, &sync, ErrorCode::UnknownRoom).await;
    assert_eq!(
        alice.create_room(ROOM).await.log_index,
        0,
        "the refused attempts left the id and the quota free"
    );
    server.assert_rejections(&[(ErrorCode::InvalidGroupInfo, 2), (ErrorCode::UnknownRoom, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_is_forbidden_without_roles() {
    let server = Server::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    let before = room_log(&server, &alice.key, ROOM).await;
    // Bob holds no role; Alice, the creator, is the room's admin.
    let target = alice.sender().0;

    let kick = Kick { target, reason: "testing".into() };
    refused_own(&mut bob, &kick, ErrorCode::Forbidden).await;
    let ban = Ban { target, reason: "testing".into(), duration_ms: Some(60_000) };
    refused_own(&mut bob, &ban, ErrorCode::Forbidden).await;
    // Handshake frames (the commit at 1, the CreateRoom at 0) are never
    // erased, whatever the role.
    let redact = Redact { log_index: 1, reason: "testing".into() };
    refused_own(&mut alice, &redact, ErrorCode::Forbidden).await;
    refused_own(&mut bob, &Redact { log_index: 0, reason: String::new() }, ErrorCode::Forbidden).await;

    assert_eq!(encoded(&room_log(&server, &alice.key, ROOM).await), encoded(&before), "nothing was redacted");
    let ack: Ack = decode_ok(&bob.send_text("still a member").await);
    assert_eq!(ack.log_index, 2);
    server.assert_rejections(&[(ErrorCode::Forbidden, 4)]);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Key packages.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_key_package_uploads_are_refused_and_store_nothing() {
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let now = now_ms() / 1000;
    let bobs: Vec<Vec<u8>> = generate_key_packages(&bob.provider, &bob.identity, 2, now)
        .unwrap()
        .into_iter()
        .map(|p| p.message)
        .collect();
    let bob_last = generate_last_resort_key_package(&bob.provider, &bob.identity, now).unwrap().message;
    let alices = generate_key_packages(&alice.provider, &alice.identity, 1, now).unwrap().remove(0).message;
    let alice_last = generate_last_resort_key_package(&alice.provider, &alice.identity, now).unwrap().message;
    let garbage: &[u8] = b"not a key package";

    let cases: [UploadCase; 7] = [
        ("garbage", vec![garbage], None),
        ("a valid package, then garbage", vec![&bobs[0], garbage], None),
        ("another identity's package", vec![&alices], None),
        ("another identity's last-resort package", vec![], Some(&alice_last)),
        ("an ordinary package in the last-resort slot", vec![], Some(&bobs[0])),
        ("a last-resort package in an ordinary slot", vec![&bob_last], None),
        ("valid packages with a garbage last resort", vec![&bobs[0], &bobs[1]], Some(garbage)),
    ];
    for (what, ordinary, last_resort) in &cases {
        let reply = upload(&mut bob, ordinary, *last_resort).await;
        assert_code(&reply, ErrorCode::InvalidKeyPackage, what);
        assert_open(bob.conn()).await;
    }
    assert_eq!(
        claim(&mut alice, &[bob.sender()]).await,
        vec![None],
        "nothing of the refused uploads was stored"
    );

    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &[&bobs[0], &bobs[1]], Some(&bob_last)).await);
    assert_eq!((status.available, status.last_resort), (2, true));
    server.assert_rejections(&[(ErrorCode::InvalidKeyPackage, 7)]);
    server.stop().await;
}

/// The same package twice in one upload is an invalid upload (2012), not a
/// quota matter (3004 is "too many stored items for the user").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_package_repeated_within_one_upload_is_invalid() {
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let package =
        generate_key_packages(&bob.provider, &bob.identity, 1, now_ms() / 1000).unwrap().remove(0).message;
    let reply = upload(&mut bob, &[&package, &package], None).await;
    assert_open(bob.conn()).await;
    assert_eq!(claim(&mut alice, &[bob.sender()]).await, vec![None], "nothing was stored");
    assert_code(&reply, ErrorCode::InvalidKeyPackage, "one package twice in an upload");
    server.assert_rejections(&[(ErrorCode::InvalidKeyPackage, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_beyond_the_per_user_maximum_exceed_the_quota() {
    const PER_USER_MAX: usize = kalandra_server::store::limits::KEY_PACKAGES_PER_USER_MAX;
    const PER_UPLOAD_MAX: usize = kalandra_proto::limits::KEY_PACKAGES_PER_UPLOAD_MAX;
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let now = now_ms() / 1000;
    let packages: Vec<Vec<u8>> = generate_key_packages(&bob.provider, &bob.identity, PER_USER_MAX + 1, now)
        .unwrap()
        .into_iter()
        .map(|p| p.message)
        .collect();
    let last = generate_last_resort_key_package(&bob.provider, &bob.identity, now).unwrap().message;
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let full = u32::try_from(PER_USER_MAX).unwrap();

    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &refs[..PER_USER_MAX], Some(&last)).await);
    assert_eq!((status.available, status.last_resort), (full, true));
    let reply = upload(&mut bob, &refs[PER_USER_MAX..], None).await;
    assert_code(&reply, ErrorCode::QuotaExceeded, "one package beyond the maximum");
    assert_open(bob.conn()).await;
    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &[], Some(&last)).await);
    assert_eq!(status.available, full, "the refused upload stored nothing");

    // Once one is claimed there is room for one more.
    let claimed = claim(&mut alice, &[bob.sender()]).await.remove(0).expect("a package");
    assert!(refs[..PER_USER_MAX].contains(&claimed.as_slice()));
    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &refs[PER_USER_MAX..], None).await);
    assert_eq!(status.available, full);

    // More than one upload may carry breaks the payload's limits: a protocol violation.
    const { assert!(PER_USER_MAX + 1 > PER_UPLOAD_MAX) };
    let frame = bob.frame(&KeyPackageUpload {
        key_packages: packages.iter().map(|p| ByteString(p.clone())).collect(),
        last_resort: None,
    });
    bob.conn().send(&frame).await.unwrap();
    let error = next_error(bob.conn(), frame.header().request_id(), "oversized upload").await;
    assert_code(&error, ErrorCode::MalformedPayload, "257 packages in one upload");
    assert_closed(bob.conn(), "oversized upload").await;
    server.assert_rejections(&[(ErrorCode::QuotaExceeded, 1), (ErrorCode::MalformedPayload, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ordinary_key_package_is_handed_out_once() {
    const UPLOADED: usize = 4;
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let mut carol = server.client("carol", CAROL).await;
    let now = now_ms() / 1000;
    let packages: Vec<Vec<u8>> = generate_key_packages(&bob.provider, &bob.identity, UPLOADED, now)
        .unwrap()
        .into_iter()
        .map(|p| p.message)
        .collect();
    let last = generate_last_resort_key_package(&bob.provider, &bob.identity, now).unwrap().message;
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &refs, Some(&last)).await);
    assert_eq!(status.available, 4);

    // N claims: N distinct ordinary packages; then the last-resort one, repeatedly.
    let uploaded: HashSet<Vec<u8>> = packages.iter().cloned().collect();
    let mut handed_out = HashSet::new();
    for _ in 0..UPLOADED {
        let package = claim(&mut alice, &[bob.sender()]).await.remove(0).expect("an ordinary package");
        assert!(uploaded.contains(&package), "an ordinary package Bob uploaded");
        assert!(handed_out.insert(package), "an ordinary package handed out twice");
    }
    assert_eq!(handed_out, uploaded);
    for _ in 0..3 {
        assert_eq!(
            claim(&mut alice, &[bob.sender()]).await,
            vec![Some(last.clone())],
            "the last-resort package"
        );
    }
    assert_eq!(
        claim(&mut carol, &[bob.sender(), bob.sender()]).await,
        vec![Some(last.clone()), Some(last.clone())]
    );
    assert_eq!(claim(&mut carol, &[SenderId(42)]).await, vec![None], "an identity without packages");
    let status: KeyPackageStatus = decode_ok(&upload(&mut bob, &[], Some(&last)).await);
    assert_eq!((status.available, status.last_resort), (0, true));

    // Two claimers at once still never get the same ordinary package.
    let more: Vec<Vec<u8>> = generate_key_packages(&bob.provider, &bob.identity, 20, now)
        .unwrap()
        .into_iter()
        .map(|p| p.message)
        .collect();
    let refs: Vec<&[u8]> = more.iter().map(Vec::as_slice).collect();
    assert_eq!(decode_ok::<KeyPackageStatus>(&upload(&mut bob, &refs, None).await).available, 20);
    let twelve = vec![bob.sender(); 12];
    let (first, second) = tokio::join!(claim(&mut alice, &twelve), claim(&mut carol, &twelve));
    let all: Vec<Vec<u8>> = first.into_iter().chain(second).map(|p| p.expect("a package")).collect();
    let ordinary: Vec<&Vec<u8>> = all.iter().filter(|p| **p != last).collect();
    assert_eq!(ordinary.len(), 20, "every ordinary package is handed out before the last-resort one");
    assert_eq!(ordinary.iter().map(|p| (*p).clone()).collect::<HashSet<_>>(), more.into_iter().collect());
    server.assert_rejections(&[]);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_rate_is_refused_with_retry_after() {
    const RATE: u32 = 5;
    let mut limits = default_limits();
    limits.frames_per_second_per_connection = RATE;
    limits.frames_burst_per_connection = 3;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);

    // A fresh connection has a full bucket of 3; four requests in one write.
    server.reconnect(&mut alice).await;
    let frames: Vec<Frame> = (0..4).map(|i| alice.frame(&text(&format!("burst {i}")))).collect();
    let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes().to_vec()).collect();
    alice.conn().send_bytes(&bytes).await.unwrap();
    let mut replies = Vec::new();
    for frame in &frames {
        replies.push(alice.conn().wait_reply(frame.header().request_id()).await.unwrap());
    }
    for (index, reply) in replies[..3].iter().enumerate() {
        assert_eq!(decode_ok::<Ack>(reply).log_index, u64::try_from(index).unwrap() + 1);
    }
    let error = assert_code(&replies[3], ErrorCode::RateLimited, "the fourth request");
    let retry_after_ms = error.retry_after_ms.expect("RateLimited carries retry_after_ms");
    assert!((1..=1000 / u64::from(RATE)).contains(&retry_after_ms), "retry after {retry_after_ms} ms");

    // Every frame counts against the rate, pings too; after waiting the
    // connection is still open and accepts frames again.
    tokio::time::sleep(Duration::from_millis(retry_after_ms + 30)).await;
    assert_eq!(decode_ok::<Ack>(&alice.send_text("after waiting").await).log_index, 4);
    let log = room_log(&server, &alice.key, ROOM).await;
    let texts: Vec<Vec<u8>> = log[1..].iter().map(ciphertext).collect();
    assert_eq!(texts, [&b"burst 0"[..], b"burst 1", b"burst 2", b"after waiting"]);
    server.assert_rejections(&[(ErrorCode::RateLimited, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_rate_is_refused_on_every_connection() {
    let mut limits = default_limits();
    limits.frames_per_second_per_user = 1;
    limits.frames_burst_per_user = 3;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut second = server.client("alice's second device", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    let nobody = KeyPackageClaim { sender_ids: vec![42], domain: None };

    async fn pipelined(client: &mut TestClient, payload: &KeyPackageClaim, count: usize) -> Vec<Frame> {
        let frames: Vec<Frame> = (0..count).map(|_| client.frame(payload)).collect();
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes().to_vec()).collect();
        client.conn().send_bytes(&bytes).await.unwrap();
        let mut replies = Vec::new();
        for frame in &frames {
            replies.push(client.conn().wait_reply(frame.header().request_id()).await.unwrap());
        }
        replies
    }
    for reply in pipelined(&mut alice, &nobody, 2).await {
        decode_ok::<KeyPackageClaimed>(&reply);
    }
    let replies = pipelined(&mut second, &nobody, 2).await;
    decode_ok::<KeyPackageClaimed>(&replies[0]);
    let error = assert_code(&replies[1], ErrorCode::RateLimited, "the user's fourth request");
    let retry_after_ms =
        error.retry_after_ms.filter(|ms| *ms > 0).expect("RateLimited carries retry_after_ms");
    // Another user is not affected.
    decode_ok::<KeyPackageClaimed>(&bob.request(&nobody).await);
    // After waiting, the connection is open and the user may send again.
    tokio::time::sleep(Duration::from_millis(retry_after_ms + 30)).await;
    assert_open(second.conn()).await;
    server.assert_rejections(&[(ErrorCode::RateLimited, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_in_too_many_rooms_cannot_create_or_join_another() {
    let mut limits = default_limits();
    limits.rooms_per_user_max = 1;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    let mut bob = server.client("bob", BOB).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);

    let second = create_payload(ALICE, OTHER_ROOM, &server.server_key);
    refused_with(&mut alice, OTHER_ROOM, 0, &second, ErrorCode::TooManyRooms).await;
    // The id was not taken: Bob can create it; Alice cannot join it either.
    assert_eq!(bob.create_room(OTHER_ROOM).await.log_index, 0);
    let join = ExternalJoin { commit: b"not even looked at".to_vec(), group_info: None };
    refused_with(&mut alice, OTHER_ROOM, 0, &join, ErrorCode::TooManyRooms).await;

    assert_eq!(room_log(&server, &bob.key, OTHER_ROOM).await.len(), 1);
    assert_eq!(decode_ok::<Ack>(&alice.send_text("my one room").await).log_index, 1);
    server.assert_rejections(&[(ErrorCode::TooManyRooms, 2)]);
    server.stop().await;
}

/// The room limit holds when the creates arrive together, not only one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_limit_holds_for_pipelined_creates() {
    let mut limits = default_limits();
    limits.rooms_per_user_max = 1;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    let first = signed(&mut alice, ROOM, 0, &create_payload(ALICE, ROOM, &server.server_key));
    let second = signed(&mut alice, OTHER_ROOM, 0, &create_payload(ALICE, OTHER_ROOM, &server.server_key));
    let mut bytes = first.to_bytes().to_vec();
    bytes.extend_from_slice(&second.to_bytes());
    alice.conn().send_bytes(&bytes).await.unwrap();
    let replies = [
        alice.conn().wait_reply(first.header().request_id()).await.unwrap(),
        alice.conn().wait_reply(second.header().request_id()).await.unwrap(),
    ];
    let opcodes: Vec<Opcode> = replies.iter().map(Frame::opcode).collect();
    assert_eq!(
        opcodes.iter().filter(|o| **o == Opcode::Ack).count(),
        1,
        "rooms_per_user_max is 1 but the replies to two pipelined CreateRooms were {opcodes:?}"
    );
    let refusal = replies.iter().find(|r| r.opcode() == Opcode::Error).expect("one refusal");
    assert_code(refusal, ErrorCode::TooManyRooms, "the second create");
    server.assert_rejections(&[(ErrorCode::TooManyRooms, 1)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_limit_are_refused() {
    let mut limits = default_limits();
    limits.connections_per_address_max = 1;
    let server = Server::start(limits).await;
    let mut alice = server.client("alice", ALICE).await;
    let bob = SigningKey::from_bytes(&[BOB; 32]);

    match server.connect(&bob).await {
        Err(ConnectionError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::TooManyConnections.to_u16(), "{message}");
        }
        Err(other) => panic!("expected an Error frame with TooManyConnections, got {other}"),
        Ok(_) => panic!("a second connection from the address was admitted"),
    }
    assert_open(alice.conn()).await;

    // Once the first connection is gone, the address may connect again.
    alice.disconnect().await;
    let mut refusals = 1;
    let mut conn = loop {
        match server.connect(&bob).await {
            Ok(conn) => break conn,
            Err(ConnectionError::Refused { code, .. }) if code == ErrorCode::TooManyConnections.to_u16() => {
                refusals += 1;
                assert!(refusals < 100, "the closed connection's slot was never released");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("reconnecting: {other}"),
        }
    };
    assert_open(&mut conn).await;
    server.assert_rejections(&[(ErrorCode::TooManyConnections, refusals)]);
    server.stop().await;
}

/// §7 code 5002: a draining server tells its connected clients before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_says_it_is_shutting_down() {
    let server = Server::start(default_limits()).await;
    let mut alice = server.client("alice", ALICE).await;
    assert_open(alice.conn()).await;
    let ((), received) = tokio::join!(server.stop(), alice.conn().recv());
    let frame = received.expect("an Error frame before the connection closes");
    assert_code(&frame, ErrorCode::ShuttingDown, "server stop");
    assert_closed(alice.conn(), "server stop").await;
}
