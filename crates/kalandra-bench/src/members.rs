//! Simulated members: identities, MLS groups, authenticated connections,
//! rooms built through the server, and sealed application frames.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use client_core::connection::{client_config_pinned, Connection, ConnectionError};
use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use client_core::sender_keys::SenderKeyState;
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{
    Ack, Application, Commit, CreateRoom, Error as ErrorPayload, Subscribe, Welcome,
};
use kalandra_proto::{Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use sha2::{Digest, Sha256};

use crate::limits::{
    CLIENT_ENDPOINTS_MAX, CLIENT_UDP_BUFFER_BYTES, CONNECT_CONCURRENCY_MAX, REQUEST_TIMEOUT_MS,
};
use crate::server::ServerTarget;
use crate::BenchError;

/// Seconds since the Unix epoch (key-package lifetimes).
pub fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A value unique to this run, mixed into every seed and room id so that a
/// run against a long-lived server never collides with an earlier one.
pub fn run_nonce() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(0) ^ u64::from(std::process::id())
}

/// A seed for member `member` of room `room` in `scenario` of run `nonce`.
pub fn member_seed(nonce: u64, scenario: &str, room: u64, member: u64) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"kalandra-bench member")
        .chain_update(nonce.to_be_bytes())
        .chain_update(scenario.as_bytes())
        .chain_update(room.to_be_bytes())
        .chain_update(member.to_be_bytes())
        .finalize()
        .into()
}

/// The id of room `room` in `scenario` of run `nonce`.
pub fn room_id(nonce: u64, scenario: &str, room: u64) -> RoomId {
    let digest: [u8; 32] = Sha256::new()
        .chain_update(b"kalandra-bench room")
        .chain_update(nonce.to_be_bytes())
        .chain_update(scenario.as_bytes())
        .chain_update(room.to_be_bytes())
        .finalize()
        .into();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    RoomId(id)
}

/// Client endpoints (UDP sockets) that connections are spread over, and
/// how to reach and trust the server.
pub struct Clients {
    endpoints: Vec<quinn::Endpoint>,
    next: AtomicUsize,
    config: quinn::ClientConfig,
    /// The server.
    pub target: ServerTarget,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl Clients {
    /// `endpoints` client sockets (at most [`CLIENT_ENDPOINTS_MAX`]) for `target`.
    pub fn new(
        target: ServerTarget,
        endpoints: usize,
        connect_timeout: Duration,
    ) -> Result<Clients, BenchError> {
        let config = client_config_pinned(target.fingerprint).map_err(|e| BenchError::client("TLS", e))?;
        let bind: SocketAddr = if target.address.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let endpoints = (0..endpoints.clamp(1, CLIENT_ENDPOINTS_MAX))
            .map(|_| client_endpoint(bind))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BenchError::Io { what: "binding a client UDP socket", detail: e.to_string() })?;
        Ok(Clients { endpoints, next: AtomicUsize::new(0), config, target, connect_timeout })
    }

    /// Connects and authenticates as `key`.
    pub async fn connect(&self, key: &SigningKey) -> Result<Connection, BenchError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let endpoint = self.endpoints[index].clone();
        Connection::connect_on(
            endpoint,
            self.target.address,
            "localhost",
            self.config.clone(),
            key,
            self.connect_timeout,
        )
        .await
        .map_err(|error| match error {
            ConnectionError::Unreachable(detail) => {
                BenchError::Unreachable { address: self.target.address, detail }
            }
            ConnectionError::TimedOut => BenchError::Unreachable {
                address: self.target.address,
                detail: format!("no answer within {} ms", self.connect_timeout.as_millis()),
            },
            ConnectionError::Refused { code, message } => {
                BenchError::Refused { request: "authentication", code, message }
            }
            other => BenchError::Connection { during: "connecting", detail: other.to_string() },
        })
    }

    /// Client UDP sockets in use.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Closes every endpoint at once (connections are dropped, not closed one by one).
    pub fn close(&self) {
        for endpoint in &self.endpoints {
            endpoint.close(quinn::VarInt::from_u32(0), b"benchmark done");
        }
    }
}

/// One simulated member: identity, MLS state, and sender keys once joined.
pub struct Member {
    /// The member's MLS identity.
    pub identity: Identity,
    /// The same key as the identity, for frame signatures and authentication.
    pub key: SigningKey,
    /// Sender id bound to `key`.
    pub sender: SenderId,
    /// Seeded OpenMLS provider holding the member's key material.
    pub provider: MlsProvider,
    /// The room's group, once created or joined.
    pub group: Option<RoomGroup>,
}

impl Member {
    /// A member whose keys come from `seed`.
    pub fn new(seed: [u8; 32]) -> Result<Member, BenchError> {
        let provider = MlsProvider::from_seed(seed);
        let identity = Identity::generate(&provider).map_err(|e| BenchError::client("identity", e))?;
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        let sender = SenderId::from_identity_key(key.verifying_key().as_bytes());
        Ok(Member { identity, key, sender, provider, group: None })
    }

    /// One key package of this member, as an `MLSMessage`.
    pub fn key_package(&self) -> Result<Vec<u8>, BenchError> {
        let mut packages = generate_key_packages(&self.provider, &self.identity, 1, now_unix_secs())
            .map_err(|e| BenchError::client("key package", e))?;
        Ok(packages.pop().expect("one key package was asked for").message)
    }

    /// The sender keys of the member's current epoch.
    pub fn sender_keys(&self) -> Result<SenderKeyState, BenchError> {
        let group =
            self.group.as_ref().ok_or_else(|| BenchError::client("sender keys", "not a member yet"))?;
        SenderKeyState::from_group(&self.provider, group).map_err(|e| BenchError::client("sender keys", e))
    }

    /// The member's current epoch (0 before it has a group).
    pub fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, RoomGroup::epoch)
    }

    /// A signed frame of this member carrying `payload`.
    pub fn frame<P: Payload>(&self, room: RoomId, request_id: u32, payload: &P) -> Result<Frame, BenchError> {
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header
            .set_room_id(room)
            .set_sender_id(self.sender)
            .set_epoch(self.epoch())
            .set_request_id(request_id);
        let mut frame = Frame::with_payload(header, payload).map_err(|e| BenchError::client("frame", e))?;
        frame.sign(&self.key);
        Ok(frame)
    }
}

/// Sends `frame` on `connection` and waits for its reply; an `Error` reply is [`BenchError::Refused`].
pub async fn request(
    connection: &mut Connection,
    frame: &Frame,
    what: &'static str,
) -> Result<Frame, BenchError> {
    let reply = connection
        .request(frame)
        .await
        .map_err(|e| BenchError::Connection { during: what, detail: e.to_string() })?;
    if reply.opcode() == Opcode::Error {
        return Err(refusal(&reply, what));
    }
    Ok(reply)
}

/// The `Error` frame as [`BenchError::Refused`].
pub fn refusal(frame: &Frame, what: &'static str) -> BenchError {
    match frame.decode_payload::<ErrorPayload>() {
        Ok(error) => BenchError::Refused { request: what, code: error.code, message: error.message },
        Err(e) => BenchError::Unexpected { request: what, detail: e.to_string() },
    }
}

/// How a room is built.
#[derive(Debug, Clone)]
pub struct RoomPlan {
    /// The room.
    pub room_id: RoomId,
    /// Members including the creator.
    pub members: usize,
    /// Members after the creator that join the MLS group from the Welcome
    /// (they send, or verify what they receive). The others are members of
    /// the server's view of the room and receive frames, but never process
    /// the Welcome, which saves the generator seconds per thousand members.
    pub joiners: usize,
    /// Whether the add commit carries a Welcome (stored by the server once
    /// per recipient; leave it out for rooms of thousands).
    pub welcome: bool,
    /// Whether every member connects and subscribes (otherwise only the creator is connected).
    pub connect_members: bool,
    /// Seeds: run nonce, scenario, room number.
    pub seed: (u64, &'static str, u64),
}

/// A built room: members (the creator first), their connections, and where its log is.
pub struct BuiltRoom {
    /// The room.
    pub room_id: RoomId,
    /// The members, the creator first.
    pub members: Vec<Member>,
    /// Their connections, in the same order (`None` if not connected).
    pub connections: Vec<Option<Connection>>,
    /// The next log index after setup.
    pub next_log_index: u64,
    /// Submit → acknowledged time of the commit that added everyone.
    pub add_commit_ack: Duration,
    /// Bytes of that commit frame.
    pub add_commit_bytes: usize,
}

/// The request timeout during setup.
pub fn setup_timeout() -> Duration {
    Duration::from_millis(REQUEST_TIMEOUT_MS)
}

/// Creates the room through the server, adds every member in one commit,
/// and (per the plan) connects them, subscribes them and joins the joiners.
pub async fn build_room(clients: &Arc<Clients>, plan: &RoomPlan) -> Result<BuiltRoom, BenchError> {
    let (nonce, scenario, room_number) = plan.seed;
    let mut creator = Member::new(member_seed(nonce, scenario, room_number, 0))?;
    let mut connection = clients.connect(&creator.key).await?;
    let server_key = connection.server_key();
    let (group, created) =
        RoomGroup::create(&creator.provider, &creator.identity, plan.room_id.0, &server_key, now_unix_secs())
            .map_err(|e| BenchError::client("create room", e))?;
    creator.group = Some(group);
    let request_id = connection.next_request_id();
    let frame = creator.frame(
        plan.room_id,
        request_id,
        &CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None },
    )?;
    request(&mut connection, &frame, "create room").await?;

    // The other members and their key packages, made on blocking threads.
    let others = plan.members.saturating_sub(1);
    let made = make_members(nonce, scenario, room_number, others).await?;
    let (members, key_packages): (Vec<Member>, Vec<Vec<u8>>) = made.into_iter().unzip();
    // Members connect before they are added, so that their Welcome reaches
    // them live (as for a member who is online when invited).
    let mut members: Vec<(Member, Option<Connection>)> = if plan.connect_members {
        connect_all(clients, members).await?.into_iter().map(|(m, c)| (m, Some(c))).collect()
    } else {
        members.into_iter().map(|m| (m, None)).collect()
    };

    let mut add_commit_ack = Duration::ZERO;
    let mut add_commit_bytes = 0;
    let mut next_log_index = 1;
    if !members.is_empty() {
        let recipients: Vec<u64> = members.iter().map(|(m, _)| m.sender.0).collect();
        let (creator_back, output) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
            let group = creator.group.as_mut().expect("the creator has the group");
            let output = group.add_members(&creator.provider, &creator.identity, &refs);
            (creator, output)
        })
        .await
        .map_err(|e| BenchError::client("add members", e))?;
        creator = creator_back;
        let output = output.map_err(|e| BenchError::client("add members", e))?;
        let welcome = if plan.welcome { output.welcome.clone() } else { None };
        let commit = Commit {
            welcome_recipients: if welcome.is_some() { recipients } else { Vec::new() },
            welcome,
            commit: output.commit,
            group_info: Some(output.group_info),
        };
        let request_id = connection.next_request_id();
        let frame = creator.frame(plan.room_id, request_id, &commit)?;
        add_commit_bytes = frame.encoded_len();
        let started = Instant::now();
        let reply = request(&mut connection, &frame, "add-members commit").await?;
        add_commit_ack = started.elapsed();
        let ack: Ack = reply
            .decode_payload()
            .map_err(|e| BenchError::Unexpected { request: "add", detail: e.to_string() })?;
        next_log_index = ack.log_index + 1;
        let group = creator.group.as_mut().expect("the creator has the group");
        group
            .confirm_pending_commit(&creator.provider)
            .map_err(|e| BenchError::client("confirm commit", e))?;
    }

    if plan.connect_members {
        subscribe(&mut connection, plan.room_id, next_log_index, &creator, false).await?;
        members = subscribe_all(plan.room_id, next_log_index, members, plan.joiners).await?;
    }
    let (mut members, mut connections): (Vec<Member>, Vec<Option<Connection>>) = members.into_iter().unzip();
    connections.insert(0, Some(connection));
    members.insert(0, creator);
    Ok(BuiltRoom {
        room_id: plan.room_id,
        members,
        connections,
        next_log_index,
        add_commit_ack,
        add_commit_bytes,
    })
}

/// `count` members of a room (seeds 1..=count) with one key package each.
async fn make_members(
    nonce: u64,
    scenario: &'static str,
    room: u64,
    count: usize,
) -> Result<Vec<(Member, Vec<u8>)>, BenchError> {
    let workers = std::thread::available_parallelism().map_or(1, usize::from).max(1);
    let chunk = count.div_ceil(workers).max(1);
    let mut tasks = Vec::new();
    for start in (0..count).step_by(chunk) {
        let end = (start + chunk).min(count);
        tasks.push(tokio::task::spawn_blocking(move || {
            (start..end)
                .map(|index| {
                    let member = Member::new(member_seed(nonce, scenario, room, index as u64 + 1))?;
                    let key_package = member.key_package()?;
                    Ok((member, key_package))
                })
                .collect::<Result<Vec<_>, BenchError>>()
        }));
    }
    let mut made = Vec::with_capacity(count);
    for task in tasks {
        made.extend(task.await.map_err(|e| BenchError::client("members", e))??);
    }
    Ok(made)
}

/// Subscribes from `from_log_index` and waits for the end of history; a
/// member that `joins` also waits for its Welcome and joins the group.
pub async fn subscribe(
    connection: &mut Connection,
    room_id: RoomId,
    from_log_index: u64,
    member: &Member,
    joins: bool,
) -> Result<Option<RoomGroup>, BenchError> {
    let request_id = connection.next_request_id();
    let frame = member.frame(room_id, request_id, &Subscribe { from_log_index })?;
    connection
        .send(&frame)
        .await
        .map_err(|e| BenchError::Connection { during: "subscribe", detail: e.to_string() })?;
    let (mut synced, mut group) = (false, None);
    // Bounded: history is empty at setup, so a handful of frames come back.
    for _ in 0..1_000 {
        if synced && (group.is_some() || !joins) {
            return Ok(group);
        }
        let frame = connection
            .recv()
            .await
            .map_err(|e| BenchError::Connection { during: "subscribe", detail: e.to_string() })?;
        match frame.opcode() {
            Opcode::SyncDone => synced = true,
            Opcode::Error => return Err(refusal(&frame, "subscribe")),
            Opcode::Welcome if joins && group.is_none() => {
                let welcome: Welcome = frame
                    .decode_payload()
                    .map_err(|e| BenchError::Unexpected { request: "welcome", detail: e.to_string() })?;
                let joined = RoomGroup::join_from_welcome(
                    &member.provider,
                    &welcome.welcome,
                    welcome.ratchet_tree.as_deref(),
                )
                .map_err(|e| BenchError::client("join from welcome", e))?;
                group = Some(joined);
            }
            _ => {}
        }
    }
    Err(BenchError::Unexpected { request: "subscribe", detail: "no SyncDone in 1,000 frames".into() })
}

/// Connects every member (at most [`CONNECT_CONCURRENCY_MAX`] at once). Keeps the order.
pub async fn connect_all(
    clients: &Arc<Clients>,
    members: Vec<Member>,
) -> Result<Vec<(Member, Connection)>, BenchError> {
    let keys: Vec<SigningKey> = members.iter().map(|m| m.key.clone()).collect();
    let connections = connect_keys(clients, keys).await?;
    Ok(members.into_iter().zip(connections).collect())
}

/// Subscribes every connected member (at most [`CONNECT_CONCURRENCY_MAX`]
/// at once) and joins the first `joiners` to the group. Keeps the order.
async fn subscribe_all(
    room_id: RoomId,
    from_log_index: u64,
    members: Vec<(Member, Option<Connection>)>,
    joiners: usize,
) -> Result<Vec<(Member, Option<Connection>)>, BenchError> {
    let total = members.len();
    let mut results: Vec<Option<(Member, Option<Connection>)>> = (0..total).map(|_| None).collect();
    let mut pending = members.into_iter().enumerate();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < CONNECT_CONCURRENCY_MAX {
            let Some((index, (mut member, connection))) = pending.next() else { break };
            tasks.spawn(async move {
                let mut connection = connection.expect("subscribing members are connected");
                let group =
                    subscribe(&mut connection, room_id, from_log_index, &member, index < joiners).await?;
                if group.is_some() {
                    member.group = group;
                }
                Ok::<_, BenchError>((index, member, connection))
            });
        }
        let Some(done) = tasks.join_next().await else { break };
        let (index, member, connection) = done.map_err(|e| BenchError::client("subscribe task", e))??;
        results[index] = Some((member, Some(connection)));
    }
    Ok(results.into_iter().map(|r| r.expect("every member was subscribed")).collect())
}

/// Connections for members without MLS state (idle-connection runs).
pub async fn connect_keys(
    clients: &Arc<Clients>,
    keys: Vec<SigningKey>,
) -> Result<Vec<Connection>, BenchError> {
    let total = keys.len();
    let mut results: Vec<Option<Connection>> = (0..total).map(|_| None).collect();
    let mut pending = keys.into_iter().enumerate();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < CONNECT_CONCURRENCY_MAX {
            let Some((index, key)) = pending.next() else { break };
            let clients = Arc::clone(clients);
            tasks.spawn(async move { clients.connect(&key).await.map(|c| (index, c)) });
        }
        let Some(done) = tasks.join_next().await else { break };
        let (index, connection) = done.map_err(|e| BenchError::client("connect task", e))??;
        results[index] = Some(connection);
    }
    Ok(results.into_iter().map(|r| r.expect("every key was connected")).collect())
}

/// The plaintext of message `generation`: its number, then filler, `bytes` long.
pub fn plaintext(generation: u32, bytes: usize) -> Vec<u8> {
    let mut text = vec![0x5a; bytes.max(4)];
    text[..4].copy_from_slice(&generation.to_be_bytes());
    text
}

/// Seals `count` application frames of `member` (sender-key encryption
/// and an Ed25519 signature each), request ids from `first_request_id`.
pub fn seal_frames(
    member: &Member,
    room_id: RoomId,
    keys: &mut SenderKeyState,
    count: usize,
    message_bytes: usize,
    first_request_id: u32,
) -> Result<Vec<Bytes>, BenchError> {
    let mut frames = Vec::with_capacity(count);
    for offset in 0..count {
        let generation =
            keys.next_send_generation().ok_or_else(|| BenchError::client("seal", "chain exhausted"))?;
        let sealed = keys
            .encrypt(member.sender, &plaintext(generation, message_bytes))
            .map_err(|e| BenchError::client("seal", e))?;
        let request_id = first_request_id.wrapping_add(u32::try_from(offset).unwrap_or(u32::MAX));
        let mut header = FrameHeaderBuf::new(Opcode::Application);
        header
            .set_room_id(room_id)
            .set_sender_id(member.sender)
            .set_epoch(keys.epoch())
            .set_request_id(request_id);
        let payload = Application {
            generation: sealed.generation,
            ciphertext: Bytes::from(sealed.ciphertext),
            push: None,
            epoch_tag: None,
        };
        let mut frame = Frame::with_payload(header, &payload).map_err(|e| BenchError::client("seal", e))?;
        frame.sign(&member.key);
        frames.push(frame.to_bytes());
    }
    Ok(frames)
}

/// One sender's sealed frames, filled in by whichever worker sealed them.
type SealSlot = std::sync::Mutex<Option<Result<Vec<Bytes>, BenchError>>>;

/// Seals frames for many senders on every core: `jobs[i]` is (member,
/// room, count); returns the frames per job and the seconds it took.
pub fn seal_all(
    jobs: &[(&Member, RoomId, usize)],
    message_bytes: usize,
) -> Result<(Vec<Vec<Bytes>>, f64), BenchError> {
    let started = Instant::now();
    let workers = std::thread::available_parallelism().map_or(1, usize::from).max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<SealSlot> = jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let job = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(member, room_id, count)) = jobs.get(job) else { break };
                let result = member.sender_keys().and_then(|mut keys| {
                    seal_frames(
                        member,
                        room_id,
                        &mut keys,
                        count,
                        message_bytes,
                        crate::limits::LOAD_REQUEST_ID_FIRST,
                    )
                });
                *results[job].lock().expect("result lock") = Some(result);
            });
        }
    });
    let frames = results
        .into_iter()
        .map(|slot| slot.into_inner().expect("result lock").expect("every job ran"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((frames, started.elapsed().as_secs_f64()))
}

/// A client endpoint on `bind` whose UDP socket asks for
/// [`CLIENT_UDP_BUFFER_BYTES`] of kernel buffers: thousands of connections
/// share each socket, and the kernel's default receive buffer (about
/// 200 KB) overflowed under fan-out, so the run measured loss recovery.
fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // The kernel caps the sizes at net.core.rmem_max / wmem_max; less is fine.
    let _ = state.set_recv_buffer_size((&socket).into(), CLIENT_UDP_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), CLIENT_UDP_BUFFER_BYTES);
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
}
