//! An in-process server on loopback and MLS-speaking test clients.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use client_core::connection::{client_config_pinned, parse_fingerprint, Connection, ConnectionError};
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, Identity, MlsProvider, RoomGroup,
};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{
    Ack, Application, Commit, CreateRoom, Error, JoinRule, KeyPackageClaim, KeyPackageClaimed,
    KeyPackageStatus, KeyPackageUpload, Subscribe, SyncDone, Welcome,
};
use kalandra_proto::{Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use kalandra_server::store::Store;
use kalandra_server::ConnectionLimits;
use kalandra_server::MemoryPushSink;
use kalandra_server::Metrics;
use kalandra_server::{Clock, Node};
use kalandra_server::{RunningServer, Server, StartOptions};
use kalandra_server::{Secret, ServerConfig};

pub mod federation;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

pub fn default_limits() -> ConnectionLimits {
    ConnectionLimits {
        frames_per_second_per_connection: 10_000,
        frames_burst_per_connection: 10_000,
        frames_per_second_per_user: 10_000,
        frames_burst_per_user: 10_000,
        rooms_per_user_max: 100,
        handshake_timeout_ms: 5_000,
        drain_timeout_ms: 5_000,
        ..ConnectionLimits::default()
    }
}

/// The admin API's operator token of every test server.
pub const ADMIN_TOKEN: &str = "operator-token-for-tests-0001";
/// The admin API's read-only token of every test server.
pub const ADMIN_READ_TOKEN: &str = "read-only-token-for-tests-0001";

pub struct TestServer {
    pub address: SocketAddr,
    pub fingerprint: [u8; 32],
    /// The server's Ed25519 signing key (rooms list it as external sender).
    pub server_key: [u8; 32],
    pub node: Node,
    pub metrics: Metrics,
    /// Push notifications the server forwarded.
    pub push_sink: Arc<MemoryPushSink>,
    pub data_dir: Option<tempfile::TempDir>,
    /// Added to the wall clock the server reads: tests move server time forward.
    pub clock_offset_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The server's store (for checks the protocol cannot make).
    pub store: Arc<dyn Store>,
    running: RunningServer,
}

impl TestServer {
    pub async fn start(limits: ConnectionLimits) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = TestServer::start_in(dir.path(), limits).await;
        server.data_dir = Some(dir);
        server
    }

    /// The server the binary runs (`Server::start`), on loopback ports,
    /// with two shards, a clock tests move and an in-memory push sink.
    pub async fn start_in(path: &std::path::Path, limits: ConnectionLimits) -> TestServer {
        TestServer::start_configured(path, limits, |_| {}).await
    }

    /// As [`TestServer::start_in`], the configuration changed by `adjust`
    /// first (a domain, federation peers).
    pub async fn start_configured(
        path: &std::path::Path,
        limits: ConnectionLimits,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let clock_offset_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let offset = Arc::clone(&clock_offset_ms);
        let clock: Clock = Arc::new(move || now_ms() + offset.load(std::sync::atomic::Ordering::Relaxed));
        let push_sink = Arc::new(MemoryPushSink::default());
        let config = ServerConfig {
            data_dir: path.to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: Some(Secret(ADMIN_TOKEN.to_owned())),
            admin_read_token: Some(Secret(ADMIN_READ_TOKEN.to_owned())),
            limits,
            ..ServerConfig::default()
        };
        let mut config = config;
        adjust(&mut config);
        let options = StartOptions {
            shard_count: Some(2),
            clock: Some(clock),
            push_sink: Some(Arc::clone(&push_sink) as Arc<dyn kalandra_server::PushSink>),
        };
        let running = Server::start_with(config, options).await.unwrap();
        TestServer {
            address: running.quic_address(),
            fingerprint: parse_fingerprint(running.fingerprint_hex()).unwrap(),
            server_key: running.server_public_key(),
            node: running.node().clone(),
            metrics: running.metrics().clone(),
            push_sink,
            data_dir: None,
            clock_offset_ms,
            store: Arc::clone(running.store()),
            running,
        }
    }

    pub async fn connect(&self, key: &SigningKey) -> Result<Connection, ConnectionError> {
        Connection::connect(
            self.address,
            "localhost",
            client_config_pinned(self.fingerprint).unwrap(),
            key,
            TIMEOUT,
        )
        .await
    }

    /// The admin listener (its API takes [`ADMIN_TOKEN`] and [`ADMIN_READ_TOKEN`]).
    pub fn admin_address(&self) -> SocketAddr {
        self.running.admin_address()
    }

    /// Moves the server's clock forward.
    pub fn advance_clock(&self, by_ms: u64) {
        self.clock_offset_ms.fetch_add(by_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The running server (federation state, metrics).
    pub fn running(&self) -> &RunningServer {
        &self.running
    }

    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.running.shutdown().await.unwrap();
        self.data_dir
    }
}

pub fn header(opcode: Opcode, room: RoomId, sender: SenderId, epoch: u64, request_id: u32) -> FrameHeaderBuf {
    let mut header = FrameHeaderBuf::new(opcode);
    header.set_room_id(room).set_sender_id(sender).set_epoch(epoch).set_request_id(request_id);
    header
}

/// A device: identity, MLS state, connection.
pub struct TestClient {
    pub name: &'static str,
    pub identity: Identity,
    pub key: SigningKey,
    pub provider: MlsProvider,
    pub connection: Option<Connection>,
    pub group: Option<RoomGroup>,
    pub room: RoomId,
}

impl TestClient {
    pub async fn connect(server: &TestServer, name: &'static str, seed: u8) -> TestClient {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        let connection = server.connect(&key).await.unwrap();
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

    pub async fn reconnect(&mut self, server: &TestServer) {
        self.connection = Some(server.connect(&self.key).await.unwrap());
    }

    pub async fn disconnect(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.close().await;
        }
    }

    pub fn conn(&mut self) -> &mut Connection {
        self.connection.as_mut().expect("connected")
    }

    /// Sends a frame and waits for its reply.
    pub async fn send_and_wait(&mut self, frame: &Frame) -> Frame {
        self.conn().request(frame).await.unwrap()
    }

    pub fn sender(&self) -> SenderId {
        SenderId::from_identity_key(self.key.verifying_key().as_bytes())
    }

    pub fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, RoomGroup::epoch)
    }

    pub fn frame<P: Payload>(&mut self, payload: &P) -> Frame {
        let request_id = self.conn().next_request_id();
        let mut frame = Frame::with_payload(
            header(P::OPCODE, self.room, self.sender(), self.epoch(), request_id),
            payload,
        )
        .unwrap();
        frame.sign(&self.key);
        frame
    }

    pub async fn request<P: Payload>(&mut self, payload: &P) -> Frame {
        let frame = self.frame(payload);
        self.conn().request(&frame).await.unwrap()
    }

    pub async fn upload_key_packages(&mut self, count: usize) -> KeyPackageStatus {
        let packages = generate_key_packages(&self.provider, &self.identity, count, now_ms() / 1000).unwrap();
        let last_resort =
            generate_last_resort_key_package(&self.provider, &self.identity, now_ms() / 1000).unwrap();
        let upload = KeyPackageUpload {
            key_packages: packages.into_iter().map(|p| p.message.into()).collect(),
            last_resort: Some(last_resort.message),
        };
        let reply = self.request(&upload).await;
        decode_ok(&reply)
    }

    pub async fn create_room(&mut self, room: RoomId) -> Ack {
        self.create_room_with(room, None).await
    }

    /// Creates `room` with the join rule `join_rule` (absent: invite-only).
    pub async fn create_room_with(&mut self, room: RoomId, join_rule: Option<JoinRule>) -> Ack {
        self.room = room;
        let server_key = self.conn().server_key();
        let (group, created) =
            RoomGroup::create(&self.provider, &self.identity, room.0, &server_key, now_ms() / 1000).unwrap();
        self.group = Some(group);
        let reply = self
            .request(&CreateRoom {
                group_info: created.group_info,
                ratchet_tree: created.ratchet_tree,
                join_rule,
            })
            .await;
        decode_ok(&reply)
    }

    pub async fn claim(&mut self, members: &[SenderId]) -> Vec<Vec<u8>> {
        let reply = self
            .request(&KeyPackageClaim { sender_ids: members.iter().map(|s| s.0).collect(), domain: None })
            .await;
        let claimed: KeyPackageClaimed = decode_ok(&reply);
        claimed.key_packages.into_iter().map(|entry| entry.key_package.expect("a key package")).collect()
    }

    /// Adds members by claiming their key packages; returns the server's answer.
    pub async fn add(&mut self, members: &[SenderId]) -> Frame {
        let key_packages = self.claim(members).await;
        let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
        let output = self.group.as_mut().unwrap().add_members(&self.provider, &self.identity, &refs).unwrap();
        let commit = Commit {
            commit: output.commit,
            welcome: output.welcome,
            welcome_recipients: members.iter().map(|s| s.0).collect(),
            group_info: Some(output.group_info),
        };
        let reply = self.request(&commit).await;
        self.settle_commit(&reply);
        reply
    }

    /// Confirms or discards our pending commit according to the server's answer.
    pub fn settle_commit(&mut self, reply: &Frame) {
        let group = self.group.as_mut().unwrap();
        if reply.opcode() == Opcode::Ack {
            group.confirm_pending_commit(&self.provider).unwrap();
        } else {
            group.discard_pending_commit(&self.provider).unwrap();
        }
    }

    pub async fn self_update(&mut self) -> Frame {
        let output = self.group.as_mut().unwrap().self_update(&self.provider, &self.identity).unwrap();
        let commit = Commit {
            commit: output.commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        let reply = self.request(&commit).await;
        self.settle_commit(&reply);
        reply
    }

    /// Waits for a Welcome and joins; returns the log index the Welcome's
    /// header carries (that of the commit that made it).
    pub async fn join_from_welcome(&mut self, room: RoomId) -> u64 {
        let frame = self.next_of(Opcode::Welcome).await;
        let welcome: Welcome = frame.decode_payload().unwrap();
        let group =
            RoomGroup::join_from_welcome(&self.provider, &welcome.welcome, welcome.ratchet_tree.as_deref())
                .unwrap();
        assert_eq!(group.room_id(), room.0);
        self.group = Some(group);
        self.room = room;
        frame.header().log_index()
    }

    pub async fn subscribe(&mut self, from_log_index: u64) -> Frame {
        let frame = self.frame(&Subscribe { from_log_index });
        self.conn().send(&frame).await.unwrap();
        frame
    }

    pub async fn send_text(&mut self, text: &str) -> Frame {
        // Application content is opaque to the server; these tests do not need
        // sender-key encryption, only its framing.
        let payload = Application {
            generation: 0,
            ciphertext: Bytes::copy_from_slice(text.as_bytes()),
            push: None,
            epoch_tag: None,
        };
        self.request(&payload).await
    }

    /// The next frame with `opcode`, skipping others.
    pub async fn next_of(&mut self, opcode: Opcode) -> Frame {
        for _ in 0..10_000 {
            let name = self.name;
            let frame =
                self.conn().recv().await.unwrap_or_else(|e| panic!("{name}: waiting for {opcode:?}: {e}"));
            if frame.opcode() == opcode {
                return frame;
            }
        }
        panic!("{}: no {opcode:?} in 10,000 frames", self.name);
    }

    /// Applies a sequenced handshake frame from the room's log to our MLS state.
    pub fn apply(&mut self, frame: &Frame) {
        if frame.opcode() == Opcode::Commit {
            let commit: Commit = frame.decode_payload().unwrap();
            self.group.as_mut().unwrap().process_handshake(&self.provider, &commit.commit).unwrap();
        }
    }
}

pub fn decode_ok<P: Payload>(frame: &Frame) -> P {
    if frame.opcode() == Opcode::Error {
        let error: Error = frame.decode_payload().unwrap();
        panic!("server refused: {} {}", error.code, error.message);
    }
    frame.decode_payload().unwrap_or_else(|e| panic!("{:?}: {e}", frame.opcode()))
}

pub fn error_code(frame: &Frame) -> u16 {
    assert_eq!(frame.opcode(), Opcode::Error, "expected an Error frame, got {:?}", frame.opcode());
    frame.decode_payload::<Error>().unwrap().code
}

pub fn sync_done(frame: &Frame) -> SyncDone {
    decode_ok(frame)
}

/// An HTTP answer: status and body.
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// The error code of a JSON error answer.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_else(|| panic!("no code in {}", self.body)).to_owned()
    }
}

/// One HTTP/1.1 request on loopback with `Connection: close`.
pub async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> HttpAnswer {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let (content_type, content) = body.unwrap_or(("", ""));
        if body.is_some() {
            request.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{content}", content.len()));
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.take(16 * 1024 * 1024).read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange).await.expect("answer in time");
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpAnswer { status, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}
