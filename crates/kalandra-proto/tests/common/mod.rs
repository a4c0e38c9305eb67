//! Proptest strategies shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use kalandra_proto::limits::TEXT_BYTES_MAX;
use kalandra_proto::payload::*;
use kalandra_proto::{AnyPayload, FrameHeaderBuf, Opcode, RoomId, SenderId};
use proptest::collection::vec;
use proptest::prelude::*;

pub fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,40}").unwrap().prop_filter("fits", |t| t.len() <= TEXT_BYTES_MAX)
}

/// Byte strings of any size class: short ones, and some longer than
/// ciborium's 4 KiB scratch buffer.
pub fn blob() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => vec(any::<u8>(), 1..300),
        1 => (4000usize..9000).prop_map(|len| vec![0xA7; len]),
    ]
}

pub fn arb_payload() -> impl Strategy<Value = AnyPayload> {
    let session =
        prop_oneof![
            (vec(any::<u8>(), 1..16), any::<[u8; 32]>(), text()).prop_map(
                |(versions, identity_key, client_name)| {
                    AnyPayload::Hello(Hello { versions, identity_key, client_name })
                }
            ),
            (any::<[u8; 32]>(), any::<u8>(), any::<u64>()).prop_map(|(nonce, version, server_time_ms)| {
                AnyPayload::AuthChallenge(AuthChallenge { nonce, version, server_time_ms })
            }),
            proptest::array::uniform::<_, 64>(any::<u8>())
                .prop_map(|signature| AnyPayload::AuthResponse(AuthResponse { signature })),
            (any::<u64>(), any::<u64>(), any::<[u8; 32]>(), proptest::option::of(home_certificate()))
                .prop_map(|(sender_id, server_time_ms, server_key, home_certificate)| {
                    AnyPayload::AuthOk(AuthOk { sender_id, server_time_ms, server_key, home_certificate })
                }),
            (any::<u16>(), text(), any::<Option<u64>>(), any::<Option<u64>>(), any::<Option<u64>>())
                .prop_map(|(code, message, current_epoch, log_index, retry_after_ms)| {
                    AnyPayload::Error(Error {
                        code,
                        message,
                        current_epoch,
                        log_index,
                        retry_after_ms,
                        frame_digest: None,
                    })
                }),
            any::<u64>().prop_map(|nonce| AnyPayload::Ping(Ping { nonce })),
            any::<u64>().prop_map(|nonce| AnyPayload::Pong(Pong { nonce })),
            (any::<u16>(), text()).prop_map(|(code, reason)| AnyPayload::Goodbye(Goodbye { code, reason })),
        ];
    let rooms = prop_oneof![
        any::<u64>().prop_map(|from_log_index| AnyPayload::Subscribe(Subscribe { from_log_index })),
        Just(AnyPayload::Unsubscribe(Unsubscribe {})),
        (any::<u64>(), 1u32..=4096)
            .prop_map(|(from_log_index, count_max)| AnyPayload::Sync(Sync { from_log_index, count_max })),
        (any::<u64>(), any::<bool>()).prop_map(|(next_log_index, live)| AnyPayload::SyncDone(SyncDone {
            next_log_index,
            live,
            log_head: None
        })),
        (blob(), blob(), proptest::option::of(prop_oneof![Just(JoinRule::InviteOnly), Just(JoinRule::Open)]))
            .prop_map(|(group_info, ratchet_tree, join_rule)| AnyPayload::CreateRoom(CreateRoom {
                group_info,
                ratchet_tree,
                join_rule
            })),
        (blob(), proptest::option::of((blob(), vec(any::<u64>(), 1..8))), proptest::option::of(blob()))
            .prop_map(|(commit, welcome, group_info)| {
                let (welcome, welcome_recipients) = match welcome {
                    Some((welcome, recipients)) => (Some(welcome), recipients),
                    None => (None, Vec::new()),
                };
                AnyPayload::Commit(Commit { commit, welcome, welcome_recipients, group_info })
            }),
        blob().prop_map(|proposal| AnyPayload::Proposal(Proposal { proposal })),
        (
            any::<u32>(),
            blob(),
            proptest::option::of(vec(any::<u8>(), 1..2113)),
            proptest::option::of(any::<[u8; 8]>())
        )
            .prop_map(|(generation, ciphertext, push, epoch_tag)| {
                AnyPayload::Application(Application {
                    generation,
                    ciphertext: Bytes::from(ciphertext),
                    push: push.map(Bytes::from),
                    epoch_tag,
                })
            }),
        (blob(), proptest::option::of(blob()))
            .prop_map(|(commit, group_info)| AnyPayload::ExternalJoin(ExternalJoin { commit, group_info })),
        (blob(), proptest::option::of(blob())).prop_map(|(welcome, ratchet_tree)| AnyPayload::Welcome(
            Welcome { welcome, ratchet_tree, log_head: None }
        )),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(log_index, epoch, server_time_ms)| {
            AnyPayload::Ack(Ack { log_index, epoch, server_time_ms, log_head: None, signed_head: None })
        }),
        (any::<u64>(), any::<u64>(), any::<u8>()).prop_map(|(log_index, epoch, reason)| {
            AnyPayload::CommitReport(CommitReport { log_index, epoch, reason })
        }),
        (any::<u64>(), any::<u64>(), vec(any::<u64>(), 1..32)).prop_map(|(log_index, epoch, reporters)| {
            AnyPayload::CommitVoided(CommitVoided { log_index, epoch, reporters })
        }),
    ];
    let directory = prop_oneof![
        (vec(blob(), 1..5), proptest::option::of(blob())).prop_map(|(packages, last_resort)| {
            AnyPayload::KeyPackageUpload(KeyPackageUpload {
                key_packages: packages.into_iter().map(ByteString::from).collect(),
                last_resort,
            })
        }),
        (any::<u32>(), any::<bool>()).prop_map(|(available, last_resort)| AnyPayload::KeyPackageStatus(
            KeyPackageStatus { available, last_resort }
        )),
        vec(any::<u64>(), 1..64)
            .prop_map(|sender_ids| AnyPayload::KeyPackageClaim(KeyPackageClaim { sender_ids, domain: None })),
        vec((any::<u64>(), proptest::option::of(blob())), 0..8).prop_map(|entries| {
            AnyPayload::KeyPackageClaimed(KeyPackageClaimed {
                key_packages: entries
                    .into_iter()
                    .map(|(sender_id, key_package)| ClaimedKeyPackage { sender_id, key_package })
                    .collect(),
            })
        }),
        Just(AnyPayload::GroupInfoRequest(GroupInfoRequest {})),
        vec(domain(), 1..=DOMAINS_PER_KEYS_REQUEST_MAX)
            .prop_map(|domains| AnyPayload::DomainKeysRequest(DomainKeysRequest { domains })),
        vec(
            (domain(), vec((any::<[u8; 32]>(), any::<Option<u64>>()), 0..=4)).prop_map(|(domain, keys)| {
                let keys =
                    keys.into_iter().map(|(key, valid_until_ms)| DomainKey { key, valid_until_ms }).collect();
                DomainKeysOf { domain, keys }
            }),
            0..=DOMAINS_PER_KEYS_REQUEST_MAX
        )
        .prop_map(|domains| AnyPayload::DomainKeys(DomainKeys { domains })),
        (any::<u64>(), blob(), blob()).prop_map(|(epoch, group_info, ratchet_tree)| {
            AnyPayload::GroupInfo(GroupInfo { epoch, group_info, ratchet_tree })
        }),
    ];
    let moderation = prop_oneof![
        (any::<u64>(), text()).prop_map(|(target, reason)| AnyPayload::Kick(Kick { target, reason })),
        (any::<u64>(), text(), any::<Option<u64>>())
            .prop_map(|(target, reason, duration_ms)| AnyPayload::Ban(Ban { target, reason, duration_ms })),
        (any::<u64>(), text())
            .prop_map(|(log_index, reason)| AnyPayload::Redact(Redact { log_index, reason })),
        (any::<u64>(), text()).prop_map(|(target, reason)| AnyPayload::Unban(Unban { target, reason })),
        (any::<u64>(), text(), any::<bool>())
            .prop_map(|(target, role, granted)| AnyPayload::SetRole(SetRole { target, role, granted })),
        any::<bool>().prop_map(|active| AnyPayload::Typing(Typing { active })),
        (0u8..=PRESENCE_STATUS_MAX).prop_map(|status| AnyPayload::Presence(Presence { status })),
    ];
    prop_oneof![session, rooms, directory, moderation]
}

pub fn arb_header(opcode: Opcode) -> impl Strategy<Value = FrameHeaderBuf> {
    (any::<u32>(), any::<[u8; 16]>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())
        .prop_map(move |(request_id, room, sender, log_index, epoch, timestamp, countersigned)| {
            let mut header = FrameHeaderBuf::new(opcode);
            header
                .set_request_id(request_id)
                .set_room_id(RoomId(room))
                .set_sender_id(SenderId(sender))
                .set_log_index(log_index)
                .set_epoch(epoch)
                .set_server_timestamp_ms(timestamp)
                .set_signature_flags(false, countersigned);
            header
        })
}

/// A valid domain name of one to four labels.
pub fn domain() -> impl Strategy<Value = kalandra_proto::federation::DomainName> {
    vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 1..4).prop_map(|labels| {
        kalandra_proto::federation::DomainName::parse(&labels.join(".")).expect("a valid domain name")
    })
}

/// A home certificate with arbitrary fields (its signature need not verify).
pub fn home_certificate() -> impl Strategy<Value = kalandra_proto::federation::HomeCertificate> {
    (domain(), any::<[u8; 32]>(), any::<u64>(), proptest::array::uniform::<_, 64>(any::<u8>())).prop_map(
        |(domain, identity_key, not_after_ms, signature)| kalandra_proto::federation::HomeCertificate {
            domain,
            identity_key,
            not_after_ms,
            signature,
        },
    )
}
