//! Frames the server builds itself: replies, errors, Welcomes, and the
//! placeholders of erased entries.

use bytes::Bytes;
use kalandra_proto::chain::{frame_digest, FrameDigest, LogHead};
use kalandra_proto::header::offset;
use kalandra_proto::payload;
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};

use crate::room::sequencer::SubmitError;
use crate::store::sealing::{routing_u64, ROUTING_PREFIX_BYTES};
use crate::store::Erasure;

/// A frame the server built does not fit its opcode's payload limit: the
/// request that asked for it gets a typed error instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server's {opcode:?} payload would be {len_bytes} bytes, the limit is {max_bytes}")]
pub struct ReplyTooLarge {
    /// The reply's opcode.
    pub opcode: Opcode,
    /// Its encoded payload size.
    pub len_bytes: usize,
    /// The opcode's payload limit.
    pub max_bytes: u32,
}

/// Builds an unsigned server frame carrying `payload`; an error when the
/// payload does not fit its opcode (payloads that carry what peers sent,
/// such as a GroupInfo and the ratchet tree, can be that large).
pub fn server_frame<P: Payload>(
    room_id: RoomId,
    request_id: u32,
    payload: &P,
) -> Result<Bytes, ReplyTooLarge> {
    let mut header = FrameHeaderBuf::new(P::OPCODE);
    header.set_room_id(room_id).set_request_id(request_id);
    let encoded = payload.encode();
    let len_bytes = encoded.len();
    Frame::new(header, encoded).map(|frame| frame.to_bytes()).map_err(|_| ReplyTooLarge {
        opcode: P::OPCODE,
        len_bytes,
        max_bytes: P::OPCODE.payload_bytes_max(),
    })
}

/// [`server_frame`] for a reply of a size the server bounds (an
/// acknowledgement, a sync marker, a pong); should it not fit all the same,
/// the request is answered with an `Internal` error and the bug logged,
/// never a panic.
pub fn reply_frame<P: Payload>(room_id: RoomId, request_id: u32, payload: &P) -> Bytes {
    server_frame(room_id, request_id, payload).unwrap_or_else(|error| {
        tracing::error!(%room_id, request_id, %error, "a server reply did not fit its frame");
        error_frame(room_id, request_id, ErrorCode::Internal, "the reply did not fit its frame")
    })
}

/// Builds an `Error` frame.
pub fn error_frame(room_id: RoomId, request_id: u32, code: ErrorCode, message: &str) -> Bytes {
    error_frame_with(room_id, request_id, code, message, None, None, None)
}

/// Builds an `Error` frame with the optional fields set.
pub(crate) fn error_frame_with(
    room_id: RoomId,
    request_id: u32,
    code: ErrorCode,
    message: &str,
    current_epoch: Option<u64>,
    log_index: Option<u64>,
    retry_after_ms: Option<u64>,
) -> Bytes {
    let message: String = message.chars().take(kalandra_proto::limits::TEXT_BYTES_MAX / 4).collect();
    let mut header = FrameHeaderBuf::new(Opcode::Error);
    header.set_room_id(room_id).set_request_id(request_id);
    let error = payload::Error {
        code: code.to_u16(),
        message,
        current_epoch,
        log_index,
        retry_after_ms,
        frame_digest: None,
    };
    // The message is cut to TEXT_BYTES_MAX bytes (at most 4 per char) and the
    // rest is fixed-size: it fits (asserted below), whatever a peer sent.
    Frame::with_payload(header, &error).expect("an Error payload fits its opcode").to_bytes()
}

// An `Error` payload with a message of `TEXT_BYTES_MAX` bytes and every
// optional field set stays below the `Error` opcode's limit.
const _: () =
    assert!(kalandra_proto::limits::TEXT_BYTES_MAX + 128 <= Opcode::Error.payload_bytes_max() as usize);

/// Builds the `Error` frame that refuses a submission (with the room's
/// epoch and index for `WrongEpoch`, a retry delay for overload).
pub fn rejection_frame(room_id: RoomId, request_id: u32, error: &SubmitError) -> Bytes {
    let (current_epoch, log_index) = match error {
        SubmitError::WrongEpoch { current_epoch, log_index, .. }
        | SubmitError::UndoneEpoch { epoch: current_epoch, log_index } => {
            (Some(*current_epoch), Some(*log_index))
        }
        _ => (None, None),
    };
    let retry_after_ms = match error {
        SubmitError::Overloaded { .. } | SubmitError::TooManyServerProposals => {
            Some(crate::room::sequencer::IN_FLIGHT_RETRY_AFTER_MS)
        }
        _ => None,
    };
    error_frame_with(
        room_id,
        request_id,
        error.error_code(),
        &error.to_string(),
        current_epoch,
        log_index,
        retry_after_ms,
    )
}

/// A Welcome and the tree it needs do not fit one `Welcome` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Welcome does not fit a Welcome frame: {0}")]
pub struct WelcomeTooLarge(pub String);

/// Builds the `Welcome` frame stored for, and sent to, a commit's
/// recipients. Its header carries the log index of the commit that made
/// it, so that the joiner subscribes from the next index: nothing before
/// it belongs to the epoch it joins, and nothing after it is skipped; and
/// the commit's server timestamp, which tells the Welcome of this commit
/// from one made for an earlier attempt at the same index (a failed
/// batch), whose `log_head` would be that attempt's.
pub fn welcome_frame(
    room_id: RoomId,
    welcome: &Bytes,
    ratchet_tree: &Bytes,
    (log_index, commit_timestamp_ms): (u64, u64),
    log_head: &LogHead,
) -> Result<Bytes, WelcomeTooLarge> {
    let payload = payload::Welcome {
        welcome: welcome.to_vec(),
        ratchet_tree: (!ratchet_tree.is_empty()).then(|| ratchet_tree.to_vec()),
        log_head: Some(*log_head),
    };
    let mut header = FrameHeaderBuf::new(payload::Welcome::OPCODE);
    header.set_room_id(room_id).set_log_index(log_index).set_server_timestamp_ms(commit_timestamp_ms);
    Frame::with_payload(header, &payload)
        .map(|frame| frame.to_bytes())
        .map_err(|error| WelcomeTooLarge(error.to_string()))
}

/// The placeholder history carries at an erased index: an unsigned `Error`
/// frame with code `Redacted` whose header keeps the erased frame's room,
/// sender, log index, epoch and server timestamp, and whose payload names
/// the index.
pub fn erased_placeholder(room_id: RoomId, log_index: u64, erasure: &Erasure) -> Bytes {
    placeholder(room_id, log_index, &erasure.routing, erasure.frame_digest)
}

/// The placeholder for a frame about to be erased (see
/// [`erased_placeholder`]).
pub(crate) fn placeholder_for_frame(room_id: RoomId, log_index: u64, frame: &Bytes) -> Bytes {
    placeholder(
        room_id,
        log_index,
        &frame[..frame.len().min(ROUTING_PREFIX_BYTES)],
        Some(frame_digest(frame)),
    )
}

/// The notice a replica feed gets when an entry it was sent is erased: an
/// `Error` frame with code `Redacted` whose payload names the erased index
/// and whose header names only the room (its `log_index` is 0, never an
/// erasable entry's, so the notice cannot be taken for the entry's
/// placeholder).
pub fn erasure_notice(room_id: RoomId, log_index: u64) -> Bytes {
    let message = "erased at the room's authority";
    error_frame_with(room_id, 0, ErrorCode::Redacted, message, None, Some(log_index), None)
}

/// A placeholder carries the erased frame's digest (when the tombstone
/// kept it), so that readers extend the log's hash chain over it.
fn placeholder(room_id: RoomId, log_index: u64, routing: &[u8], digest: Option<FrameDigest>) -> Bytes {
    let mut header = FrameHeaderBuf::new(Opcode::Error);
    header
        .set_room_id(room_id)
        .set_log_index(log_index)
        .set_sender_id(SenderId(routing_u64(routing, offset::SENDER_ID).unwrap_or(0)))
        .set_epoch(routing_u64(routing, offset::EPOCH).unwrap_or(0))
        .set_server_timestamp_ms(routing_u64(routing, offset::SERVER_TIMESTAMP).unwrap_or(0));
    let error = payload::Error {
        code: ErrorCode::Redacted.to_u16(),
        message: "content erased".to_owned(),
        current_epoch: None,
        log_index: Some(log_index),
        retry_after_ms: None,
        frame_digest: digest,
    };
    Frame::with_payload(header, &error).expect("an Error payload fits its opcode").to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A joiner learns from the Welcome's header where the epoch it joins
    /// begins; without it, it cannot know which index to subscribe from.
    #[test]
    fn welcome_frames_carry_the_log_index_of_their_commit() {
        let room_id = RoomId([3; 16]);
        let bytes = welcome_frame(
            room_id,
            &Bytes::from_static(b"welcome"),
            &Bytes::from_static(b"tree"),
            (7, 1_234),
            &[4; 32],
        )
        .unwrap();
        let frame = Frame::decode(&bytes).unwrap();
        assert_eq!(frame.opcode(), Opcode::Welcome);
        assert_eq!(frame.header().room_id(), room_id);
        assert_eq!(frame.header().log_index(), 7);
        assert_eq!(frame.header().server_timestamp_ms(), 1_234);
        let payload: payload::Welcome = frame.decode_payload().unwrap();
        assert_eq!(payload.welcome, b"welcome");
        assert_eq!(payload.ratchet_tree.as_deref(), Some(&b"tree"[..]));
        assert_eq!(payload.log_head, Some([4; 32]));
    }

    /// A Welcome too large for its frame is an error, not a panic.
    #[test]
    fn an_oversized_welcome_is_an_error() {
        let room_id = RoomId([3; 16]);
        let huge = Bytes::from(vec![0u8; Opcode::Welcome.payload_bytes_max() as usize]);
        assert!(welcome_frame(room_id, &huge, &huge, (1, 1), &[0; 32]).is_err());
    }
}
