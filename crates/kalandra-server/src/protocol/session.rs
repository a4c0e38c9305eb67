//! One connection's protocol state, pure: authentication, sender binding,
//! payload validation, and routing of each frame to what handles it.
//!
//! The driver feeds every decoded frame to [`Session::on_frame`] with `now`
//! and gets back one [`Step`]. The nonce for the challenge comes from the
//! driver's random source, so the session itself is deterministic.

use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use kalandra_proto::federation::{DomainName, HomeCertificate};
use kalandra_proto::home::MEMBER_HOME_CERTIFICATE_VALIDITY_MS;
use kalandra_proto::limits::{AUTH_NONCE_BYTES, PUBLIC_KEY_BYTES};
use kalandra_proto::payload::{self, AnyPayload};
use kalandra_proto::sign::{parse_identity_key, verify_auth_response};
use kalandra_proto::{ErrorCode, Flags, Frame, Opcode, OpcodeClass, RoomId, SenderId, PROTOCOL_VERSION};

use crate::room::{error_frame, reply_frame};

/// Where an authenticated connection is.
#[derive(Debug, Clone)]
enum State {
    AwaitHello,
    AwaitResponse { identity: VerifyingKey },
    Authenticated { sender: SenderId, identity: VerifyingKey },
    Closed,
}

/// What an authenticated request asks for.
#[derive(Debug)]
pub enum Route {
    /// A frame for a room's sequencer (create, commit, proposal, application, external join).
    Sequence(Frame),
    /// An ephemeral frame to fan out.
    Ephemeral(Frame),
    /// Subscribe to a room from an index.
    Subscribe {
        /// The room.
        room_id: RoomId,
        /// First index wanted.
        from_log_index: u64,
        /// Request id.
        request_id: u32,
    },
    /// A bounded range of a room's log, once.
    Sync {
        /// The room.
        room_id: RoomId,
        /// First index wanted.
        from_log_index: u64,
        /// Most frames.
        count_max: u32,
        /// Request id.
        request_id: u32,
    },
    /// Stop streaming a room.
    Unsubscribe {
        /// The room.
        room_id: RoomId,
    },
    /// A member cannot process a sequenced commit of a room (`docs/RECOVERY.md`).
    CommitReport {
        /// The room.
        room_id: RoomId,
        /// Request id.
        request_id: u32,
        /// The report.
        report: payload::CommitReport,
    },
    /// A room's GroupInfo for an external join.
    GroupInfo {
        /// The room.
        room_id: RoomId,
        /// Request id.
        request_id: u32,
    },
    /// Store key packages for the sender.
    KeyPackageUpload {
        /// Request id.
        request_id: u32,
        /// The upload.
        upload: payload::KeyPackageUpload,
    },
    /// Claim key packages of other identities.
    KeyPackageClaim {
        /// Request id.
        request_id: u32,
        /// The claim.
        claim: payload::KeyPackageClaim,
    },
    /// The federation keys this server accepts for some domains.
    DomainKeys {
        /// Request id.
        request_id: u32,
        /// The domains.
        request: payload::DomainKeysRequest,
    },
    /// A moderation request.
    Moderation(Frame),
}

/// What the driver does after a frame.
#[derive(Debug)]
pub enum Step {
    /// Send this frame to the peer.
    Reply(Bytes),
    /// Authentication succeeded: bind the connection to `sender` and send `reply`.
    Authenticated {
        /// The identity's sender id.
        sender: SenderId,
        /// The `AuthOk` frame.
        reply: Bytes,
    },
    /// Hand an authenticated request on.
    Route(SenderId, Route),
    /// Send this `Error` frame, then close the connection.
    Close(Bytes),
    /// The peer said goodbye: close without an error.
    Goodbye,
    /// Nothing to do.
    Ignore,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    nonce: [u8; AUTH_NONCE_BYTES],
    server_key: [u8; PUBLIC_KEY_BYTES],
    home: Option<HomeIssuer>,
}

/// What certifies an authenticated client's identity key as a user of
/// this server's domain, for the client's MLS leaves (`AuthOk`).
#[derive(Clone)]
pub struct HomeIssuer {
    /// This server's domain.
    pub domain: DomainName,
    /// Its federation key.
    pub key: Arc<SigningKey>,
}

impl std::fmt::Debug for HomeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeIssuer").field("domain", &self.domain).finish_non_exhaustive()
    }
}

impl HomeIssuer {
    /// The certificate of `identity_key`, valid
    /// [`MEMBER_HOME_CERTIFICATE_VALIDITY_MS`] from `now_ms`.
    pub fn issue(&self, identity_key: [u8; PUBLIC_KEY_BYTES], now_ms: u64) -> HomeCertificate {
        let not_after_ms = now_ms.saturating_add(MEMBER_HOME_CERTIFICATE_VALIDITY_MS);
        HomeCertificate::issue(&self.key, self.domain.clone(), identity_key, not_after_ms)
    }
}

fn close(room_id: RoomId, request_id: u32, code: ErrorCode, message: &str) -> Step {
    Step::Close(error_frame(room_id, request_id, code, message))
}

impl Session {
    /// A session that will challenge the client with `nonce` (fresh random
    /// bytes per connection) and announce the server's signing key `server_key`.
    pub fn new(nonce: [u8; AUTH_NONCE_BYTES], server_key: [u8; PUBLIC_KEY_BYTES]) -> Session {
        Session { state: State::AwaitHello, nonce, server_key, home: None }
    }

    /// The same session, certifying its client as a user of `home`'s domain
    /// in `AuthOk`.
    pub fn with_home(self, home: HomeIssuer) -> Session {
        Session { home: Some(home), ..self }
    }

    /// A session of a client of another domain, authenticated by its home
    /// domain (its home certificate, checked with the relay's
    /// countersignature) rather than by a challenge here.
    pub fn relayed(identity: VerifyingKey, server_key: [u8; PUBLIC_KEY_BYTES]) -> Session {
        let sender = SenderId::from_identity_key(identity.as_bytes());
        let state = State::Authenticated { sender, identity };
        Session { state, nonce: [0; AUTH_NONCE_BYTES], server_key, home: None }
    }

    /// The authenticated identity key, once there is one.
    pub fn identity_key(&self) -> Option<[u8; PUBLIC_KEY_BYTES]> {
        match &self.state {
            State::Authenticated { identity, .. } => Some(identity.to_bytes()),
            _ => None,
        }
    }

    /// The authenticated identity, once there is one.
    pub fn sender(&self) -> Option<SenderId> {
        match self.state {
            State::Authenticated { sender, .. } => Some(sender),
            _ => None,
        }
    }

    /// Takes one decoded frame.
    pub fn on_frame(&mut self, frame: Frame, now_ms: u64) -> Step {
        let header = frame.header();
        let (room_id, request_id) = (header.room_id(), header.request_id());
        let payload = match AnyPayload::decode(frame.opcode(), frame.payload()) {
            Ok(payload) => payload,
            Err(error) => {
                self.state = State::Closed;
                return close(room_id, request_id, ErrorCode::MalformedPayload, &error.to_string());
            }
        };
        let step = match (&self.state, payload) {
            (State::Closed, _) => Step::Ignore,
            (State::AwaitHello, AnyPayload::Hello(hello)) => self.hello(&hello, now_ms),
            (State::AwaitResponse { identity }, AnyPayload::AuthResponse(response)) => {
                let identity = *identity;
                match verify_auth_response(&identity, &self.nonce, &response.signature) {
                    Ok(()) => {
                        let sender = SenderId::from_identity_key(identity.as_bytes());
                        self.state = State::Authenticated { sender, identity };
                        let reply = reply_frame(
                            RoomId::default(),
                            request_id,
                            &payload::AuthOk {
                                sender_id: sender.0,
                                server_time_ms: now_ms,
                                server_key: self.server_key,
                                home_certificate: self
                                    .home
                                    .as_ref()
                                    .map(|home| home.issue(identity.to_bytes(), now_ms)),
                            },
                        );
                        return Step::Authenticated { sender, reply };
                    }
                    Err(_) => close(
                        room_id,
                        request_id,
                        ErrorCode::AuthenticationFailed,
                        "challenge signature does not verify",
                    ),
                }
            }
            (State::AwaitHello | State::AwaitResponse { .. }, _) => {
                close(room_id, request_id, ErrorCode::NotAuthenticated, "authenticate first")
            }
            (State::Authenticated { sender, identity }, payload) => {
                let (sender, identity) = (*sender, *identity);
                self.authenticated(sender, &identity, frame, payload)
            }
        };
        if matches!(step, Step::Close(_) | Step::Goodbye) {
            self.state = State::Closed;
        }
        step
    }

    fn hello(&mut self, hello: &payload::Hello, now_ms: u64) -> Step {
        if !hello.versions.contains(&PROTOCOL_VERSION) {
            return close(
                RoomId::default(),
                0,
                ErrorCode::UnsupportedVersion,
                "this server speaks version 1",
            );
        }
        let Ok(identity) = parse_identity_key(&hello.identity_key) else {
            return close(
                RoomId::default(),
                0,
                ErrorCode::AuthenticationFailed,
                "identity key is not a valid Ed25519 key",
            );
        };
        self.state = State::AwaitResponse { identity };
        Step::Reply(reply_frame(
            RoomId::default(),
            0,
            &payload::AuthChallenge { nonce: self.nonce, version: PROTOCOL_VERSION, server_time_ms: now_ms },
        ))
    }

    fn authenticated(
        &mut self,
        sender: SenderId,
        identity: &VerifyingKey,
        frame: Frame,
        payload: AnyPayload,
    ) -> Step {
        if let Some(refusal) = refusal_of(sender, identity, &frame) {
            return refusal;
        }
        route_of(sender, frame, payload)
    }
}

/// Where an authenticated, checked frame of `sender` goes, or the answer
/// given at once (a pong, a close, nothing).
fn route_of(sender: SenderId, frame: Frame, payload: AnyPayload) -> Step {
    let header = frame.header();
    let (room_id, request_id) = (header.room_id(), header.request_id());
    let route = match payload {
        AnyPayload::Ping(ping) => {
            return Step::Reply(reply_frame(room_id, request_id, &payload::Pong { nonce: ping.nonce }));
        }
        AnyPayload::Pong(_) | AnyPayload::Error(_) => return Step::Ignore,
        AnyPayload::Goodbye(_) => return Step::Goodbye,
        AnyPayload::Subscribe(subscribe) => {
            Route::Subscribe { room_id, from_log_index: subscribe.from_log_index, request_id }
        }
        AnyPayload::Sync(sync) => Route::Sync {
            room_id,
            from_log_index: sync.from_log_index,
            count_max: sync.count_max,
            request_id,
        },
        AnyPayload::Unsubscribe(_) => Route::Unsubscribe { room_id },
        AnyPayload::GroupInfoRequest(_) => Route::GroupInfo { room_id, request_id },
        AnyPayload::CommitReport(report) => Route::CommitReport { room_id, request_id, report },
        AnyPayload::KeyPackageUpload(upload) => Route::KeyPackageUpload { request_id, upload },
        AnyPayload::KeyPackageClaim(claim) => Route::KeyPackageClaim { request_id, claim },
        AnyPayload::DomainKeysRequest(request) => Route::DomainKeys { request_id, request },
        AnyPayload::CreateRoom(_)
        | AnyPayload::Commit(_)
        | AnyPayload::Proposal(_)
        | AnyPayload::Application(_)
        | AnyPayload::ExternalJoin(_) => Route::Sequence(frame),
        AnyPayload::Typing(_) | AnyPayload::Presence(_) => Route::Ephemeral(frame),
        AnyPayload::Kick(_)
        | AnyPayload::Ban(_)
        | AnyPayload::Redact(_)
        | AnyPayload::Unban(_)
        | AnyPayload::SetRole(_) => Route::Moderation(frame),
        AnyPayload::Hello(_) | AnyPayload::AuthResponse(_) => {
            return close(room_id, request_id, ErrorCode::UnexpectedFrame, "already authenticated");
        }
        AnyPayload::AuthChallenge(_)
        | AnyPayload::AuthOk(_)
        | AnyPayload::SyncDone(_)
        | AnyPayload::Welcome(_)
        | AnyPayload::CommitVoided(_)
        | AnyPayload::Ack(_)
        | AnyPayload::KeyPackageStatus(_)
        | AnyPayload::KeyPackageClaimed(_)
        | AnyPayload::GroupInfo(_)
        | AnyPayload::DomainKeys(_) => {
            let message = format!("{} is sent by servers only", frame.opcode().name());
            return close(room_id, request_id, ErrorCode::UnexpectedFrame, &message);
        }
    };
    Step::Route(sender, route)
}

/// Checks that an authenticated connection's frame names its sender and,
/// where it must be, is signed by it; `Some` closes the connection.
fn refusal_of(sender: SenderId, identity: &VerifyingKey, frame: &Frame) -> Option<Step> {
    let header = frame.header();
    let (room_id, request_id) = (header.room_id(), header.request_id());
    if header.sender_id() != sender {
        return Some(close(
            room_id,
            request_id,
            ErrorCode::SenderMismatch,
            "sender id is not the authenticated identity's",
        ));
    }
    let class = frame.opcode().class();
    if matches!(class, OpcodeClass::Sequenced | OpcodeClass::Moderation) {
        if !header.flags().contains(Flags::SIGNED) {
            return Some(close(
                room_id,
                request_id,
                ErrorCode::BadSignature,
                "sequenced and moderation frames must be signed",
            ));
        }
        // Application frames are verified by the members who decrypt them
        // (see docs/wire-protocol.md §4); every other signed frame here.
        if frame.opcode() != Opcode::Application && frame.verify(identity).is_err() {
            return Some(close(room_id, request_id, ErrorCode::BadSignature, "signature does not verify"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use kalandra_proto::payload::{Application, AuthResponse, Hello, Ping};
    use kalandra_proto::sign::sign_auth_challenge;
    use kalandra_proto::{FrameHeaderBuf, Payload};

    use super::*;

    const NONCE: [u8; 32] = [5; 32];

    fn frame<P: Payload>(sender: SenderId, payload: &P) -> Frame {
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_sender_id(sender).set_request_id(9);
        Frame::with_payload(header, payload).unwrap()
    }

    fn error_code(bytes: &Bytes) -> ErrorCode {
        let frame = Frame::decode(bytes).unwrap();
        let error: payload::Error = frame.decode_payload().unwrap();
        ErrorCode::from_u16(error.code).unwrap()
    }

    fn authenticated(key: &SigningKey) -> (Session, SenderId) {
        let mut session = Session::new(NONCE, [8; 32]);
        let hello = Hello {
            versions: vec![1],
            identity_key: key.verifying_key().to_bytes(),
            client_name: "t".into(),
        };
        assert!(matches!(session.on_frame(frame(SenderId(0), &hello), 1), Step::Reply(_)));
        let response = AuthResponse { signature: sign_auth_challenge(key, &NONCE) };
        match session.on_frame(frame(SenderId(0), &response), 2) {
            Step::Authenticated { sender, .. } => (session, sender),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn auth_ok_carries_the_home_domains_certificate_of_the_clients_key() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let federation_key = SigningKey::from_bytes(&[3; 32]);
        let domain = DomainName::parse("a.test").unwrap();
        let home = HomeIssuer { domain: domain.clone(), key: Arc::new(federation_key.clone()) };
        let mut session = Session::new(NONCE, [8; 32]).with_home(home);
        let hello = Hello {
            versions: vec![1],
            identity_key: key.verifying_key().to_bytes(),
            client_name: "t".into(),
        };
        session.on_frame(frame(SenderId(0), &hello), 1);
        let response = AuthResponse { signature: sign_auth_challenge(&key, &NONCE) };
        let Step::Authenticated { reply, .. } = session.on_frame(frame(SenderId(0), &response), 1_000) else {
            panic!("not authenticated")
        };
        let ok: payload::AuthOk = Frame::decode(&reply).unwrap().decode_payload().unwrap();
        let certificate = ok.home_certificate.expect("a home certificate");
        assert_eq!(certificate.identity_key, key.verifying_key().to_bytes());
        assert_eq!(certificate.not_after_ms, 1_000 + MEMBER_HOME_CERTIFICATE_VALIDITY_MS);
        let keys = kalandra_proto::federation::PeerKeys::new(
            domain,
            vec![kalandra_proto::federation::PeerKey {
                key: federation_key.verifying_key(),
                valid_until_ms: None,
            }],
        )
        .unwrap();
        assert_eq!(
            certificate.verify(&keys, 1_000),
            Ok(SenderId::from_identity_key(&key.verifying_key().to_bytes()))
        );
        // Without an issuer, none.
        let (mut plain, _) = (Session::new(NONCE, [8; 32]), ());
        plain.on_frame(frame(SenderId(0), &hello), 1);
        let Step::Authenticated { reply, .. } = plain.on_frame(frame(SenderId(0), &response), 1) else {
            panic!()
        };
        let ok: payload::AuthOk = Frame::decode(&reply).unwrap().decode_payload().unwrap();
        assert_eq!(ok.home_certificate, None);
    }

    #[test]
    fn challenge_response_binds_the_identity() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let (session, sender) = authenticated(&key);
        assert_eq!(sender, SenderId::from_identity_key(key.verifying_key().as_bytes()));
        assert_eq!(session.sender(), Some(sender));
    }

    #[test]
    fn a_wrong_signature_closes_with_authentication_failed() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let mut session = Session::new(NONCE, [8; 32]);
        let hello = Hello {
            versions: vec![1],
            identity_key: key.verifying_key().to_bytes(),
            client_name: "t".into(),
        };
        session.on_frame(frame(SenderId(0), &hello), 1);
        let response = AuthResponse { signature: sign_auth_challenge(&other, &NONCE) };
        match session.on_frame(frame(SenderId(0), &response), 2) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::AuthenticationFailed),
            other => panic!("{other:?}"),
        }
        assert!(matches!(session.on_frame(frame(SenderId(0), &Ping { nonce: 1 }), 3), Step::Ignore));
    }

    #[test]
    fn unsupported_versions_and_frames_before_auth_close() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut session = Session::new(NONCE, [8; 32]);
        let hello = Hello {
            versions: vec![2, 3],
            identity_key: key.verifying_key().to_bytes(),
            client_name: "t".into(),
        };
        match session.on_frame(frame(SenderId(0), &hello), 1) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::UnsupportedVersion),
            other => panic!("{other:?}"),
        }
        let mut session = Session::new(NONCE, [8; 32]);
        match session.on_frame(frame(SenderId(0), &Ping { nonce: 1 }), 1) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::NotAuthenticated),
            other => panic!("{other:?}"),
        }
        let mut identity = [0u8; 32];
        identity[0] = 1; // the identity point: a weak key
        let mut session = Session::new(NONCE, [8; 32]);
        let hello = Hello { versions: vec![1], identity_key: identity, client_name: "t".into() };
        match session.on_frame(frame(SenderId(0), &hello), 1) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::AuthenticationFailed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn after_auth_sender_mismatch_unsigned_and_server_only_frames_close() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let (mut session, sender) = authenticated(&key);
        match session.on_frame(frame(SenderId(sender.0 ^ 1), &Ping { nonce: 1 }), 3) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::SenderMismatch),
            other => panic!("{other:?}"),
        }
        let (mut session, sender) = authenticated(&key);
        let unsigned = frame(
            sender,
            &Application { generation: 0, ciphertext: Bytes::from_static(b"x"), push: None, epoch_tag: None },
        );
        match session.on_frame(unsigned, 3) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::BadSignature),
            other => panic!("{other:?}"),
        }
        let (mut session, sender) = authenticated(&key);
        let ack = frame(
            sender,
            &payload::Ack { log_index: 0, epoch: 0, server_time_ms: 0, log_head: None, signed_head: None },
        );
        match session.on_frame(ack, 3) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::UnexpectedFrame),
            other => panic!("{other:?}"),
        }
        let (mut session, sender) = authenticated(&key);
        let garbage = Frame::new(
            {
                let mut header = FrameHeaderBuf::new(Opcode::Ping);
                header.set_sender_id(sender);
                header
            },
            Bytes::from_static(&[0xFF]),
        )
        .unwrap();
        match session.on_frame(garbage, 3) {
            Step::Close(error) => assert_eq!(error_code(&error), ErrorCode::MalformedPayload),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn authenticated_frames_are_routed() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let (mut session, sender) = authenticated(&key);
        assert!(matches!(session.on_frame(frame(sender, &Ping { nonce: 4 }), 3), Step::Reply(_)));
        let mut signed = frame(
            sender,
            &Application { generation: 0, ciphertext: Bytes::from_static(b"x"), push: None, epoch_tag: None },
        );
        signed.sign(&key);
        assert!(matches!(session.on_frame(signed, 3), Step::Route(s, Route::Sequence(_)) if s == sender));
        let subscribe = frame(sender, &payload::Subscribe { from_log_index: 4 });
        assert!(matches!(
            session.on_frame(subscribe, 3),
            Step::Route(_, Route::Subscribe { from_log_index: 4, request_id: 9, .. })
        ));
        assert!(matches!(
            session.on_frame(frame(sender, &payload::Goodbye { code: 0, reason: String::new() }), 3),
            Step::Goodbye
        ));
    }
}
