//! Invariant checks for the `kalandra-proto` fuzz targets.
//!
//! The same functions run in three places:
//! - the libFuzzer targets in `fuzz_targets/` (one call per input),
//! - `examples/gen_seeds.rs`, which writes the seed corpora from [`seeds`],
//! - `crates/kalandra-proto/tests/fuzz_regressions.rs`, which includes this
//!   file as a module so the checks also run in the ordinary test suite.
//!
//! Every check panics (with the offending bytes in hex) when an invariant is
//! broken; a panic is what libFuzzer reports as a crash.

use bytes::Bytes;
use kalandra_proto::header::offset;
use kalandra_proto::limits::{HEADER_BYTES, PAYLOAD_BYTES_MAX, SIGNATURE_BYTES};
use kalandra_proto::opcode::{is_reserved_opcode, OpcodeClass};
use kalandra_proto::{
    AnyPayload, DecodeError, Flags, Frame, FrameDecoder, FrameHeader, HeaderError, Opcode, MAGIC,
    PROTOCOL_VERSION,
};

/// Lower-case hex of `bytes`, for panic messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

// ---------------------------------------------------------------------------
// frame_decoder
// ---------------------------------------------------------------------------

/// How a `frame_decoder` input is fed to the decoder.
///
/// Layout of an input: `control`, then `limit` if `control & 0x08`, then
/// `control & 0x07` chunk-size bytes, then the byte stream itself.
/// - `limit`: the decoder is built with
///   `FrameDecoder::with_payload_bytes_max(limit * 64)` instead of `new()`.
/// - chunk sizes are used cyclically; a size byte of 0 makes one call with an
///   empty slice and consumes nothing. With no non-zero size the stream is
///   fed in one slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan<'a> {
    /// The decoder's configured payload limit, if not the default.
    pub payload_bytes_max: Option<u32>,
    /// Chunk sizes, used cyclically.
    pub chunk_sizes: Vec<usize>,
    /// The bytes fed to the decoder.
    pub stream: &'a [u8],
}

impl<'a> StreamPlan<'a> {
    /// Splits a fuzz input into a plan; `None` if it is too short to hold one.
    pub fn parse(data: &'a [u8]) -> Option<StreamPlan<'a>> {
        let (&control, mut rest) = data.split_first()?;
        let mut payload_bytes_max = None;
        if control & 0x08 != 0 {
            let (&limit, tail) = rest.split_first()?;
            payload_bytes_max = Some(u32::from(limit) * 64);
            rest = tail;
        }
        let size_count = usize::from(control & 0x07);
        if rest.len() < size_count {
            return None;
        }
        let (sizes, stream) = rest.split_at(size_count);
        Some(StreamPlan {
            payload_bytes_max,
            chunk_sizes: sizes.iter().map(|&size| usize::from(size)).collect(),
            stream,
        })
    }

    /// Encodes a plan back into a fuzz input (used to write seeds).
    pub fn to_input(payload_bytes_max: Option<u8>, chunk_sizes: &[u8], stream: &[u8]) -> Vec<u8> {
        assert!(chunk_sizes.len() <= 7, "at most 7 chunk sizes");
        let size_count = u8::try_from(chunk_sizes.len()).expect("at most 7");
        let mut input = vec![size_count | if payload_bytes_max.is_some() { 0x08 } else { 0 }];
        input.extend(payload_bytes_max);
        input.extend_from_slice(chunk_sizes);
        input.extend_from_slice(stream);
        input
    }

    /// The limit the decoder actually applies (it caps at the protocol's).
    pub fn effective_payload_bytes_max(&self) -> u32 {
        self.payload_bytes_max.unwrap_or(PAYLOAD_BYTES_MAX).min(PAYLOAD_BYTES_MAX)
    }

    fn decoder(&self) -> FrameDecoder {
        match self.payload_bytes_max {
            Some(limit) => FrameDecoder::with_payload_bytes_max(limit),
            None => FrameDecoder::new(),
        }
    }
}

/// What a whole stream should decode to, worked out from `FrameHeader::parse`
/// and `Frame::decode` on whole buffers, independently of `FrameDecoder`.
#[derive(Debug)]
pub struct Expected {
    /// Every complete frame, in order, with its byte range in the stream.
    pub frames: Vec<(Frame, std::ops::Range<usize>)>,
    /// The error the stream must end in, with the offset of the failing frame.
    pub error: Option<(DecodeError, usize)>,
}

/// The reference decoding of `stream` under `payload_bytes_max`.
pub fn expected_decoding(stream: &[u8], payload_bytes_max: u32) -> Expected {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.len() < HEADER_BYTES {
            return Expected { frames, error: None };
        }
        let header = match FrameHeader::parse(rest) {
            Ok(header) => header,
            Err(error) => return Expected { frames, error: Some((DecodeError::Header(error), at)) },
        };
        let len_bytes = header.payload_len();
        if len_bytes > payload_bytes_max {
            let error = DecodeError::PayloadTooLarge { len_bytes, max_bytes: payload_bytes_max };
            return Expected { frames, error: Some((error, at)) };
        }
        let frame_len = HEADER_BYTES + len_bytes as usize;
        if rest.len() < frame_len {
            return Expected { frames, error: None };
        }
        let bytes = Bytes::copy_from_slice(&rest[..frame_len]);
        let frame = Frame::decode(&bytes)
            .unwrap_or_else(|error| panic!("Frame::decode refused a whole frame ({error}): {}", hex(&bytes)));
        frames.push((frame, at..at + frame_len));
        at += frame_len;
    }
}

/// Runs one `frame_decoder` fuzz input.
pub fn check_frame_decoder_input(data: &[u8]) {
    let Some(plan) = StreamPlan::parse(data) else { return };
    check_header_prefix(plan.stream);
    check_stream(&plan);
}

/// Feeds `plan.stream` to a [`FrameDecoder`] in `plan.chunk_sizes` chunks and
/// checks it against [`expected_decoding`]:
/// - it never panics, and returns `Ok(None)` only once its input is used up;
/// - each frame re-encodes to exactly the bytes consumed for it, and
///   `Frame::decode` of those bytes gives an equal frame;
/// - the first error comes exactly when the failing header's 128 bytes are
///   in, equals the reference error, and every later call is `Poisoned`;
/// - `is_idle` is true exactly between frames.
pub fn check_stream(plan: &StreamPlan<'_>) {
    let stream = plan.stream;
    let max = plan.effective_payload_bytes_max();
    let expected = expected_decoding(stream, max);
    let mut decoder = plan.decoder();
    assert!(decoder.is_idle(), "a new decoder is idle");

    let mut got_frames: Vec<Frame> = Vec::new();
    let mut got_error: Option<DecodeError> = None;
    let mut frame_start = 0usize; // stream offset where the current frame began
    let mut cursor = 0usize; // stream bytes handed over and consumed so far
    let one_slice = plan.chunk_sizes.iter().all(|&size| size == 0);
    let mut sizes = plan.chunk_sizes.iter().cycle();

    while cursor < stream.len() {
        let size = if one_slice { stream.len() } else { *sizes.next().expect("cycle of a non-empty list") };
        let end = (cursor + size).min(stream.len());
        let mut input = &stream[cursor..end];
        loop {
            let before = input.len();
            let result = decoder.decode(&mut input);
            let consumed = before - input.len();
            cursor += consumed;
            match result {
                Ok(Some(frame)) => {
                    assert!(got_error.is_none(), "frame after an error: {}", hex(stream));
                    check_returned_frame(&frame, &stream[frame_start..cursor]);
                    assert!(decoder.is_idle(), "decoder not idle right after a frame: {}", hex(stream));
                    got_frames.push(frame);
                    frame_start = cursor;
                }
                Ok(None) => {
                    assert!(got_error.is_none(), "Ok after an error: {}", hex(stream));
                    assert!(
                        input.is_empty(),
                        "Ok(None) with {} bytes left unconsumed: {}",
                        input.len(),
                        hex(stream)
                    );
                    assert_eq!(
                        decoder.is_idle(),
                        cursor == frame_start,
                        "is_idle wrong with {} bytes of a partial frame: {}",
                        cursor - frame_start,
                        hex(stream)
                    );
                }
                Err(error) => {
                    if got_error.is_some() {
                        assert_eq!(
                            error,
                            DecodeError::Poisoned,
                            "second error not Poisoned: {}",
                            hex(stream)
                        );
                        assert_eq!(consumed, 0, "a poisoned decoder consumed input: {}", hex(stream));
                    } else {
                        assert_ne!(
                            error,
                            DecodeError::Poisoned,
                            "Poisoned before any error: {}",
                            hex(stream)
                        );
                        assert_eq!(
                            cursor - frame_start,
                            HEADER_BYTES,
                            "error {error:?} after consuming {} bytes of a frame: {}",
                            cursor - frame_start,
                            hex(stream)
                        );
                        let _ = error.error_code();
                        let _ = error.to_string();
                        got_error = Some(error);
                    }
                    assert!(!decoder.is_idle(), "a failed decoder claims to be idle: {}", hex(stream));
                    // Once failed, stop feeding this chunk (nothing more is consumed);
                    // the following chunks are still offered and must be refused.
                    cursor = end;
                }
            }
            if input.is_empty() || got_error.is_some() {
                break;
            }
        }
        if size == 0 {
            // An empty chunk: one call with an empty slice.
            let result = decoder.decode(&mut &[][..]);
            match (&got_error, result) {
                (Some(_), Err(DecodeError::Poisoned)) | (None, Ok(None)) => {}
                (state, other) => panic!("empty input gave {other:?} (failed: {state:?}): {}", hex(stream)),
            }
        }
    }

    // A final call with no input changes nothing.
    let result = decoder.decode(&mut &[][..]);
    match (&got_error, result) {
        (Some(_), Err(DecodeError::Poisoned)) | (None, Ok(None)) => {}
        (state, other) => panic!("final empty call gave {other:?} (failed: {state:?}): {}", hex(stream)),
    }
    if got_error.is_some() {
        let mut more: &[u8] = &[0u8; HEADER_BYTES];
        assert_eq!(decoder.decode(&mut more), Err(DecodeError::Poisoned), "poisoned decoder accepted bytes");
        assert_eq!(more.len(), HEADER_BYTES, "poisoned decoder consumed bytes");
    } else {
        assert_eq!(
            decoder.is_idle(),
            frame_start == stream.len(),
            "is_idle at end of stream: {}",
            hex(stream)
        );
    }

    // The decoder agrees with the whole-buffer reference.
    let expected_frames: Vec<&Frame> = expected.frames.iter().map(|(frame, _)| frame).collect();
    let got: Vec<&Frame> = got_frames.iter().collect();
    assert_eq!(got, expected_frames, "decoder frames differ from Frame::decode: {}", hex(stream));
    match (&expected.error, &got_error) {
        (None, None) => {}
        (Some((want, at)), Some(got)) => {
            assert_eq!(got, want, "decoder error differs from reference: {}", hex(stream));
            assert_eq!(*at, frame_start, "error at another frame than the reference: {}", hex(stream));
        }
        (want, got) => panic!("decoder error {got:?}, reference {want:?}: {}", hex(stream)),
    }
}

/// Checks a frame the decoder returned against the bytes it consumed for it.
fn check_returned_frame(frame: &Frame, consumed: &[u8]) {
    let encoded = frame.to_bytes();
    assert_eq!(&encoded[..], consumed, "frame re-encodes to other bytes than were consumed for it");
    assert_eq!(frame.encoded_len(), consumed.len(), "encoded_len differs from the bytes consumed");
    let mut into = Vec::new();
    frame.encode_into(&mut into);
    assert_eq!(into, consumed, "encode_into differs from to_bytes");
    assert_eq!(&frame.header().as_bytes()[..], &consumed[..HEADER_BYTES], "header bytes differ");
    assert_eq!(&frame.payload()[..], &consumed[HEADER_BYTES..], "payload bytes differ");
    assert_eq!(
        frame.header().payload_len() as usize,
        frame.payload().len(),
        "payload_len field differs from payload"
    );
    assert_eq!(frame.opcode(), frame.header().opcode(), "opcode accessors differ");
    check_valid_header(&consumed[..HEADER_BYTES]);

    let decoded = Frame::decode(&encoded)
        .unwrap_or_else(|error| panic!("Frame::decode failed ({error}): {}", hex(consumed)));
    assert_eq!(&decoded, frame, "Frame::decode gives another frame: {}", hex(consumed));
    let rebuilt = Frame::new(frame.header().to_buf(), frame.payload().clone())
        .unwrap_or_else(|error| panic!("Frame::new refused a decoded frame ({error}): {}", hex(consumed)));
    assert_eq!(&rebuilt, frame, "Frame::new gives another frame: {}", hex(consumed));

    // Whole-buffer decoding refuses one byte too few or too many.
    if !frame.payload().is_empty() {
        let short = encoded.slice(..encoded.len() - 1);
        assert_eq!(
            Frame::decode(&short),
            Err(DecodeError::Truncated { missing_bytes: 1 }),
            "{}",
            hex(consumed)
        );
    }
    let mut long = consumed.to_vec();
    long.push(0);
    assert_eq!(
        Frame::decode(&Bytes::from(long)),
        Err(DecodeError::TrailingBytes { trailing_bytes: 1 }),
        "{}",
        hex(consumed)
    );

    // The payload decoder must not panic on whatever the frame carries.
    check_payload(frame.opcode(), frame.payload());
}

/// What `FrameHeader::parse` must answer for `bytes`, from the documented
/// checks in their documented order: length, magic, version, reserved flag
/// bits, opcode (reserved ranges told apart), ephemeral flag, payload length.
pub fn expected_header_check(bytes: &[u8]) -> Result<Opcode, HeaderError> {
    if bytes.len() < HEADER_BYTES {
        return Err(HeaderError::TooShort { len_bytes: bytes.len() });
    }
    let u32_at = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let magic = u32_at(offset::MAGIC);
    if magic != MAGIC {
        return Err(HeaderError::BadMagic { found: magic });
    }
    let version = bytes[offset::VERSION];
    if version != PROTOCOL_VERSION {
        return Err(HeaderError::UnsupportedVersion { found: version });
    }
    let flags = bytes[offset::FLAGS];
    if Flags::from_bits(flags).is_none() {
        return Err(HeaderError::ReservedFlags { flags });
    }
    let value = u16::from_be_bytes([bytes[offset::OPCODE], bytes[offset::OPCODE + 1]]);
    let Some(opcode) = Opcode::ALL.iter().copied().find(|opcode| opcode.to_u16() == value) else {
        if is_reserved_opcode(value) {
            return Err(HeaderError::ReservedOpcode { found: value });
        }
        return Err(HeaderError::UnknownOpcode { found: value });
    };
    let ephemeral = flags & Flags::EPHEMERAL.bits() != 0;
    if ephemeral != (opcode.class() == OpcodeClass::Ephemeral) {
        return Err(HeaderError::EphemeralFlagMismatch { opcode: value });
    }
    let len_bytes = u32_at(offset::PAYLOAD_LEN);
    let max_bytes = opcode.payload_bytes_max();
    if len_bytes > max_bytes {
        return Err(HeaderError::PayloadTooLarge { opcode: value, len_bytes, max_bytes });
    }
    Ok(opcode)
}

/// Cross-checks `FrameHeader::parse` on the first 128 bytes of `data` (and on
/// `data` itself, whose tail it must ignore) against [`expected_header_check`].
pub fn check_header_prefix(data: &[u8]) {
    let prefix = &data[..data.len().min(HEADER_BYTES)];
    let want = expected_header_check(prefix);
    let got = FrameHeader::parse(prefix).map(|header| header.opcode());
    assert_eq!(got, want, "FrameHeader::parse disagrees with the documented checks: {}", hex(prefix));
    let got_whole = FrameHeader::parse(data).map(|header| header.opcode());
    assert_eq!(got_whole, want, "FrameHeader::parse depends on bytes after the header: {}", hex(data));
    if let Err(error) = &want {
        let _ = error.error_code();
        let _ = error.to_string();
    }
    if want.is_ok() {
        check_valid_header(prefix);
    }
    if prefix.len() == HEADER_BYTES {
        let short = &prefix[..HEADER_BYTES - 1];
        assert_eq!(
            FrameHeader::parse(short).map(|header| header.opcode()),
            Err(HeaderError::TooShort { len_bytes: HEADER_BYTES - 1 }),
            "a 127-byte header parsed"
        );
    }
}

/// Checks every accessor of a header that parses against its raw bytes.
fn check_valid_header(bytes: &[u8]) {
    let header = FrameHeader::parse(bytes)
        .unwrap_or_else(|error| panic!("header should parse ({error}): {}", hex(bytes)));
    let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let context = hex(bytes);
    assert_eq!(&header.as_bytes()[..], &bytes[..HEADER_BYTES], "as_bytes: {context}");
    assert_eq!(header.version(), PROTOCOL_VERSION, "version: {context}");
    assert_eq!(header.flags().bits(), bytes[offset::FLAGS], "flags: {context}");
    assert_eq!(header.flags().bits() & Flags::RESERVED_MASK, 0, "reserved flags accepted: {context}");
    assert_eq!(
        header.flags().contains(Flags::EPHEMERAL),
        header.opcode().class() == OpcodeClass::Ephemeral,
        "ephemeral flag: {context}"
    );
    assert_eq!(
        header.opcode().to_u16(),
        u16::from_be_bytes([bytes[offset::OPCODE], bytes[offset::OPCODE + 1]]),
        "opcode: {context}"
    );
    assert_eq!(
        Opcode::from_u16(header.opcode().to_u16()),
        Some(header.opcode()),
        "opcode round trip: {context}"
    );
    assert_eq!(header.payload_len(), u32_at(offset::PAYLOAD_LEN), "payload_len: {context}");
    assert!(
        header.payload_len() <= header.opcode().payload_bytes_max(),
        "payload over the opcode's limit: {context}"
    );
    assert_eq!(header.request_id(), u32_at(offset::REQUEST_ID), "request_id: {context}");
    assert_eq!(&header.room_id().0[..], &bytes[offset::ROOM_ID..offset::ROOM_ID + 16], "room_id: {context}");
    assert_eq!(header.sender_id().0, u64_at(offset::SENDER_ID), "sender_id: {context}");
    assert_eq!(header.log_index(), u64_at(offset::LOG_INDEX), "log_index: {context}");
    assert_eq!(header.epoch(), u64_at(offset::EPOCH), "epoch: {context}");
    assert_eq!(
        header.server_timestamp_ms(),
        u64_at(offset::SERVER_TIMESTAMP),
        "server_timestamp_ms: {context}"
    );
    assert_eq!(
        &header.signature()[..],
        &bytes[offset::SIGNATURE..offset::SIGNATURE + SIGNATURE_BYTES],
        "signature: {context}"
    );
    let owned = header.to_buf();
    assert_eq!(&owned.as_bytes()[..], &bytes[..HEADER_BYTES], "to_buf bytes: {context}");
    assert_eq!(owned.opcode(), header.opcode(), "to_buf opcode: {context}");
    assert_eq!(&owned.view().as_bytes()[..], &bytes[..HEADER_BYTES], "view bytes: {context}");
    let _ = format!("{header:?}");
}

// ---------------------------------------------------------------------------
// payload_decode
// ---------------------------------------------------------------------------

/// The opcode a `payload_decode` input selects with its first two bytes
/// (big-endian, modulo the number of opcodes), and the payload bytes after them.
pub fn split_payload_input(data: &[u8]) -> Option<(Opcode, &[u8])> {
    let (selector, payload) = data.split_first_chunk::<2>()?;
    let index = usize::from(u16::from_be_bytes(*selector)) % Opcode::ALL.len();
    Some((Opcode::ALL[index], payload))
}

/// The two selector bytes that choose `opcode` (used to write seeds).
pub fn payload_selector(opcode: Opcode) -> [u8; 2] {
    let index = Opcode::ALL.iter().position(|&candidate| candidate == opcode).expect("opcode is listed");
    u16::try_from(index).expect("fewer than 65536 opcodes").to_be_bytes()
}

/// Runs one `payload_decode` fuzz input.
pub fn check_payload_input(data: &[u8]) {
    if let Some((opcode, payload)) = split_payload_input(data) {
        check_payload(opcode, payload);
    }
}

/// `AnyPayload::decode` never panics; what it accepts has the right opcode,
/// re-encodes to bytes that decode to an equal value, and that re-encoding is
/// stable: `encode(decode(encode(x))) == encode(x)`.
pub fn check_payload(opcode: Opcode, bytes: &[u8]) {
    let value = match AnyPayload::decode(opcode, bytes) {
        Ok(value) => value,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    assert_eq!(value.opcode(), opcode, "decoded payload has another opcode: {opcode:?} {}", hex(bytes));
    let encoded = value.encode();
    let again = AnyPayload::decode(opcode, &encoded).unwrap_or_else(|error| {
        panic!(
            "re-encoded {opcode:?} payload does not decode ({error}); input {}, re-encoded {}",
            hex(bytes),
            hex(&encoded)
        )
    });
    assert_eq!(
        again,
        value,
        "{opcode:?} round trip changed the value; input {}, re-encoded {}",
        hex(bytes),
        hex(&encoded)
    );
    let encoded_again = again.encode();
    assert_eq!(
        encoded_again,
        encoded,
        "{opcode:?} re-encoding is not stable; input {}, first {}, second {}",
        hex(bytes),
        hex(&encoded),
        hex(&encoded_again)
    );
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// Seed inputs: a valid payload of every opcode, frames built from them, and
/// a few malformed streams. Each entry is (file name, input bytes).
pub mod seeds {
    use super::{payload_selector, StreamPlan};
    use bytes::Bytes;
    use kalandra_proto::payload::*;
    use kalandra_proto::{AnyPayload, Frame, FrameHeaderBuf, Opcode, RoomId, SenderId};

    /// One plausible, valid payload per opcode, in `Opcode::ALL` order.
    pub fn payloads() -> Vec<AnyPayload> {
        let bytes =
            |len: usize, fill: u8| -> Vec<u8> { (0u8..).take(len).map(|i| fill.wrapping_add(i)).collect() };
        let payloads = vec![
            AnyPayload::Hello(Hello {
                versions: vec![1],
                identity_key: [7; 32],
                client_name: "seed-client/0.1".into(),
            }),
            AnyPayload::AuthChallenge(AuthChallenge {
                nonce: [9; 32],
                version: 1,
                server_time_ms: 1_700_000_000_000,
            }),
            AnyPayload::AuthResponse(AuthResponse { signature: [3; 64] }),
            AnyPayload::AuthOk(AuthOk {
                sender_id: 0x0102_0304_0506_0708,
                server_time_ms: 1_700_000_000_123,
                server_key: [4; 32],
                home_certificate: None,
            }),
            AnyPayload::Error(Error {
                code: 3,
                message: "wrong epoch".into(),
                current_epoch: Some(5),
                log_index: Some(42),
                retry_after_ms: None,
                frame_digest: None,
            }),
            AnyPayload::Ping(Ping { nonce: 11 }),
            AnyPayload::Pong(Pong { nonce: 11 }),
            AnyPayload::Goodbye(Goodbye { code: 0, reason: "bye".into() }),
            AnyPayload::Subscribe(Subscribe { from_log_index: 0 }),
            AnyPayload::Unsubscribe(Unsubscribe {}),
            AnyPayload::Sync(Sync { from_log_index: 10, count_max: 100 }),
            AnyPayload::SyncDone(SyncDone { next_log_index: 110, live: true, log_head: None }),
            AnyPayload::CreateRoom(CreateRoom {
                group_info: bytes(24, 0x10),
                ratchet_tree: bytes(16, 0x40),
                join_rule: None,
            }),
            AnyPayload::CommitReport(CommitReport { log_index: 41, epoch: 3, reason: 2 }),
            AnyPayload::Commit(Commit {
                commit: bytes(20, 0x01),
                welcome: Some(bytes(12, 0x80)),
                welcome_recipients: vec![5, 6],
                group_info: Some(bytes(8, 0x20)),
            }),
            AnyPayload::Proposal(Proposal { proposal: bytes(10, 0x33) }),
            AnyPayload::Application(Application {
                generation: 7,
                ciphertext: Bytes::from(bytes(40, 0xa0)),
                push: None,
                epoch_tag: Some([0xe7; 8]),
            }),
            AnyPayload::ExternalJoin(ExternalJoin { commit: bytes(20, 0x05), group_info: None }),
            AnyPayload::Welcome(Welcome {
                welcome: bytes(16, 0x60),
                ratchet_tree: Some(bytes(8, 0x70)),
                log_head: None,
            }),
            AnyPayload::CommitVoided(CommitVoided { log_index: 41, epoch: 3, reporters: vec![5, 6] }),
            AnyPayload::Ack(Ack {
                log_index: 12,
                epoch: 3,
                server_time_ms: 1_700_000_000_456,
                log_head: None,
                signed_head: None,
            }),
            AnyPayload::KeyPackageUpload(KeyPackageUpload {
                key_packages: vec![bytes(8, 0x11).into(), bytes(8, 0x22).into()],
                last_resort: Some(bytes(8, 0x99)),
            }),
            AnyPayload::KeyPackageStatus(KeyPackageStatus { available: 17, last_resort: true }),
            AnyPayload::KeyPackageClaim(KeyPackageClaim { sender_ids: vec![1, 2, 3], domain: None }),
            AnyPayload::KeyPackageClaimed(KeyPackageClaimed {
                key_packages: vec![
                    ClaimedKeyPackage { sender_id: 1, key_package: Some(bytes(8, 0x44)) },
                    ClaimedKeyPackage { sender_id: 2, key_package: None },
                ],
            }),
            AnyPayload::GroupInfoRequest(GroupInfoRequest {}),
            AnyPayload::GroupInfo(GroupInfo {
                epoch: 4,
                group_info: bytes(24, 0x50),
                ratchet_tree: bytes(16, 0x58),
            }),
            AnyPayload::DomainKeysRequest(DomainKeysRequest {
                domains: vec![
                    kalandra_proto::federation::DomainName::parse("b.example.org").expect("a domain")
                ],
            }),
            AnyPayload::DomainKeys(DomainKeys {
                domains: vec![DomainKeysOf {
                    domain: kalandra_proto::federation::DomainName::parse("b.example.org").expect("a domain"),
                    keys: vec![DomainKey { key: [5; 32], valid_until_ms: Some(1_800_000_000_000) }],
                }],
            }),
            AnyPayload::Kick(Kick { target: 9, reason: "spam".into() }),
            AnyPayload::Ban(Ban { target: 9, reason: "spam".into(), duration_ms: Some(60_000) }),
            AnyPayload::Redact(Redact { log_index: 77, reason: "oops".into() }),
            AnyPayload::Unban(Unban { target: 9, reason: "appeal".into() }),
            AnyPayload::SetRole(SetRole { target: 9, role: "moderator".into(), granted: true }),
            AnyPayload::Typing(Typing { active: true }),
            AnyPayload::Presence(Presence { status: 2 }),
        ];
        debug_assert!(payloads.iter().map(AnyPayload::opcode).eq(Opcode::ALL.iter().copied()));
        payloads
    }

    /// A frame carrying `payload`, with every header field set.
    pub fn frame(payload: &AnyPayload, sequence: u64) -> Frame {
        let mut header = FrameHeaderBuf::new(payload.opcode());
        header
            .set_request_id(u32::try_from(sequence % 1000).expect("small") + 1)
            .set_room_id(RoomId([0xab; 16]))
            .set_sender_id(SenderId(0x1122_3344_5566_7788))
            .set_log_index(sequence)
            .set_epoch(3)
            .set_server_timestamp_ms(1_700_000_000_000 + sequence)
            .set_signature_flags(sequence % 2 == 0, false)
            .set_signature(&[0x5a; 64]);
        Frame::new(header, payload.encode()).expect("seed payloads are within limits")
    }

    /// Seeds for `payload_decode`: selector bytes plus an encoded payload.
    pub fn payload_decode() -> Vec<(String, Vec<u8>)> {
        payloads()
            .iter()
            .map(|payload| {
                let mut input = payload_selector(payload.opcode()).to_vec();
                input.extend_from_slice(&payload.encode());
                (format!("valid-{}", payload.opcode().name()), input)
            })
            .collect()
    }

    /// Seeds for `frame_decoder`: single frames, a multi-frame stream fed in
    /// odd chunks, a low-limit decoder, and streams that fail.
    pub fn frame_decoder() -> Vec<(String, Vec<u8>)> {
        let payloads = payloads();
        let frames: Vec<Vec<u8>> =
            payloads.iter().zip(0u64..).map(|(payload, i)| frame(payload, i).to_bytes().to_vec()).collect();
        let mut seeds = Vec::new();
        for (payload, bytes) in payloads.iter().zip(&frames) {
            seeds
                .push((format!("frame-{}", payload.opcode().name()), StreamPlan::to_input(None, &[], bytes)));
        }
        let stream: Vec<u8> = frames.iter().take(6).flatten().copied().collect();
        seeds.push((
            "stream-6-frames-chunked".into(),
            StreamPlan::to_input(None, &[1, 7, 0, 128, 200, 3], &stream),
        ));
        seeds.push(("stream-6-frames-whole".into(), StreamPlan::to_input(None, &[], &stream)));
        let empty_payload =
            Frame::new(FrameHeaderBuf::new(Opcode::Unsubscribe), Bytes::new()).expect("empty");
        let mut two_empty = empty_payload.to_bytes().to_vec();
        two_empty.extend_from_slice(&empty_payload.to_bytes());
        seeds.push(("two-empty-payload-frames".into(), StreamPlan::to_input(None, &[128], &two_empty)));
        // A 64-byte decoder limit refuses the Commit frame after accepting a Ping.
        let commit_index = Opcode::ALL.iter().position(|&opcode| opcode == Opcode::Commit).expect("listed");
        let ping_index = Opcode::ALL.iter().position(|&opcode| opcode == Opcode::Ping).expect("listed");
        let mut limited = frames[ping_index].clone();
        limited.extend_from_slice(&frames[commit_index]);
        seeds.push(("decoder-limit-64".into(), StreamPlan::to_input(Some(1), &[64], &limited)));
        // A valid frame followed by a header with a bad magic, then more bytes.
        let mut bad = frames[ping_index].clone();
        let mut broken = frames[ping_index].clone();
        broken[0] ^= 0xff;
        bad.extend_from_slice(&broken);
        seeds.push(("bad-magic-after-frame".into(), StreamPlan::to_input(None, &[100], &bad)));
        // A partial frame at the end of the stream.
        let mut partial = frames[commit_index].clone();
        partial.extend_from_slice(&frames[commit_index][..150]);
        seeds.push(("partial-trailing-frame".into(), StreamPlan::to_input(None, &[], &partial)));
        seeds
    }
}
