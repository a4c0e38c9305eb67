//! A hostile client's acts. Each sends one frame through the simulated
//! network to the real server core, built from real client-core and
//! OpenMLS output and then damaged (deterministically, from the client's
//! seeded randomness), and knows which outcomes the server may give it:
//!
//! - refused with a typed error (checked on the answer, and by the
//!   checker that nothing refused holds a log index): a commit signed by
//!   another key, an application frame without a signature, a frame for a
//!   room we are not in, a frame of an epoch the room has left, a replay
//!   of our own earlier commit, another member's frame sent as ours, a
//!   commit whose Welcome names recipients it does not add;
//! - sequenced, because the server cannot tell: an application frame
//!   signed by another key (members refuse to open it), a commit with a
//!   damaged confirmation tag (and a GroupInfo signed to match) or a
//!   damaged membership tag (members cannot process it, report it, and
//!   the server voids it: `docs/RECOVERY.md`);
//! - counted but without effect: a report of a commit we processed.

use client_core::mls::CommitOutput;
use client_core::room_log::{test_support, Intent};
use client_core::state::ClientState;
use kalandra_proto::payload::{self, CommitReportReason};
use kalandra_proto::{ErrorCode, Opcode};
use rand::seq::SliceRandom;

use super::*;

/// Frames of the rooms' logs a hostile client keeps to replay, at most.
pub const REPLAY_CANDIDATES_MAX: usize = 16;
/// Share of a hostile client's new work that is a hostile act.
pub const HOSTILE_ACT_SHARE: f64 = 0.5;
/// Bytes of a ciphertext or Welcome made up for a frame the server refuses.
const MADE_UP_BYTES: usize = 64;

/// What a hostile client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileAct {
    /// A valid commit, signed by a key that is not the sender's.
    ForgedSignature,
    /// A sequenced frame without a signature.
    MissingSignature,
    /// A sealed message signed by a key that is not the sender's (the
    /// server does not verify application frames; members do).
    ForgedApplication,
    /// A message to a room we are not a member of.
    NotMember,
    /// A message of an epoch the room has left.
    StaleEpoch,
    /// One of our own sequenced commits, sent again.
    ReplayOwn,
    /// Another member's sequenced frame, sent as it is.
    ReplayOther,
    /// A commit with a damaged confirmation tag and a GroupInfo signed to match.
    BadConfirmationTag,
    /// A commit with a damaged membership tag.
    BadMembershipTag,
    /// A valid commit whose Welcome names recipients it does not add.
    WrongWelcomeRecipients,
    /// A report of a commit we processed.
    FalseReport,
}

impl HostileAct {
    /// Every act, drawn from uniformly.
    pub const ALL: [HostileAct; 11] = [
        HostileAct::ForgedSignature,
        HostileAct::MissingSignature,
        HostileAct::ForgedApplication,
        HostileAct::NotMember,
        HostileAct::StaleEpoch,
        HostileAct::ReplayOwn,
        HostileAct::ReplayOther,
        HostileAct::BadConfirmationTag,
        HostileAct::BadMembershipTag,
        HostileAct::WrongWelcomeRecipients,
        HostileAct::FalseReport,
    ];

    /// Its name in counts and reports.
    pub fn name(self) -> &'static str {
        match self {
            HostileAct::ForgedSignature => "forged signature",
            HostileAct::MissingSignature => "missing signature",
            HostileAct::ForgedApplication => "forged application",
            HostileAct::NotMember => "not a member",
            HostileAct::StaleEpoch => "stale epoch",
            HostileAct::ReplayOwn => "replay of our commit",
            HostileAct::ReplayOther => "replay of another's frame",
            HostileAct::BadConfirmationTag => "bad confirmation tag",
            HostileAct::BadMembershipTag => "bad membership tag",
            HostileAct::WrongWelcomeRecipients => "wrong Welcome recipients",
            HostileAct::FalseReport => "false report",
        }
    }

    /// The refusals this act may get (besides "not now" ones): the server
    /// refuses what it can detect with these and nothing else.
    pub fn expected_refusals(self) -> &'static [ErrorCode] {
        // The room moved on, or we were removed, before the frame arrived.
        const RACED: &[ErrorCode] =
            &[ErrorCode::WrongEpoch, ErrorCode::PendingProposals, ErrorCode::NotMember, ErrorCode::Banned];
        match self {
            HostileAct::ForgedSignature | HostileAct::MissingSignature => &[ErrorCode::BadSignature],
            HostileAct::ReplayOther => &[ErrorCode::SenderMismatch],
            // Or we were added and our Welcome has not arrived yet: the
            // server counts us a member, and the frame's epoch 0 is stale.
            HostileAct::NotMember => {
                &[ErrorCode::NotMember, ErrorCode::Banned, ErrorCode::UnknownRoom, ErrorCode::WrongEpoch]
            }
            HostileAct::StaleEpoch | HostileAct::ReplayOwn => {
                &[ErrorCode::WrongEpoch, ErrorCode::NotMember, ErrorCode::Banned]
            }
            HostileAct::WrongWelcomeRecipients => &[
                ErrorCode::InvalidCommit,
                ErrorCode::WrongEpoch,
                ErrorCode::PendingProposals,
                ErrorCode::NotMember,
                ErrorCode::Banned,
            ],
            HostileAct::ForgedApplication | HostileAct::BadConfirmationTag | HostileAct::BadMembershipTag => {
                RACED
            }
            HostileAct::FalseReport => &[
                ErrorCode::CommitSettled,
                ErrorCode::NoSuchCommit,
                ErrorCode::Forbidden,
                ErrorCode::NotMember,
                ErrorCode::Banned,
            ],
        }
    }
}

impl Client {
    /// One hostile act in a room drawn at random (nothing when the room is
    /// not in a state the act needs).
    pub(super) fn hostile_act(&mut self) {
        let Some(&act) = HostileAct::ALL.choose(&mut self.rng) else { return };
        let rooms: Vec<RoomId> = self.rooms.keys().copied().collect();
        let Some(&room_id) = rooms.choose(&mut self.rng) else { return };
        let sent = match act {
            HostileAct::ForgedSignature => self.forged_signature(room_id),
            HostileAct::MissingSignature => self.missing_signature(room_id),
            HostileAct::ForgedApplication => self.forged_application(room_id),
            HostileAct::NotMember => self.not_member(),
            HostileAct::StaleEpoch => self.stale_epoch(room_id),
            HostileAct::ReplayOwn => self.replay(room_id, true),
            HostileAct::ReplayOther => self.replay(room_id, false),
            HostileAct::BadConfirmationTag | HostileAct::BadMembershipTag => self.bad_commit(room_id, act),
            HostileAct::WrongWelcomeRecipients => self.wrong_recipients(room_id),
            HostileAct::FalseReport => self.false_report(room_id),
        };
        if sent {
            self.shared.cast.ledger.borrow_mut().hostile_outcome(act.name(), "sent");
        }
    }

    /// The epoch of a room we read live and are synchronized in.
    fn synchronized_epoch(&self, room_id: RoomId) -> Option<u64> {
        let room = self.room(room_id).filter(|room| room.live)?;
        match room.log.as_ref()?.state() {
            ClientState::Synchronized { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// [`Client::synchronized_epoch`], once the latest commit we applied
    /// has settled: a void can no longer take the room below it (so what
    /// is stale for us is stale for the server).
    fn settled_epoch(&self, room_id: RoomId) -> Option<u64> {
        let log = self.room(room_id)?.log.as_ref()?;
        log.unsettled_commit().is_none().then(|| self.synchronized_epoch(room_id)).flatten()
    }

    /// A valid self-update commit of the room, its pending state discarded
    /// at once (it is only ever sent damaged or refused).
    fn throwaway_commit(&mut self, room_id: RoomId) -> Option<(u64, CommitOutput)> {
        let epoch = self.synchronized_epoch(room_id)?;
        let group = self.rooms.get_mut(&room_id)?.log.as_mut()?.group_mut()?;
        if group.has_pending_commit() || group.pending_proposal_count() > 0 {
            return None;
        }
        let output = group.self_update(&self.provider, &self.identity).ok()?;
        if let Err(error) = group.discard_pending_commit(&self.provider) {
            self.violation(format!("room {room_id}: discarding a throwaway commit: {error}"));
            return None;
        }
        Some((epoch, output))
    }

    /// A frame of ours, not signed.
    fn unsigned_frame<P: Payload>(&mut self, room: RoomId, payload: &P, epoch: u64) -> Option<(u32, Frame)> {
        let request_id = self.next_request();
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_room_id(room).set_sender_id(self.sender).set_epoch(epoch).set_request_id(request_id);
        Frame::with_payload(header, payload).ok().map(|frame| (request_id, frame))
    }

    /// A key that is not ours.
    fn forger_key(&mut self) -> SigningKey {
        SigningKey::from_bytes(&self.rng.gen())
    }

    fn made_up_application(&mut self) -> payload::Application {
        let mut ciphertext = vec![0u8; MADE_UP_BYTES];
        self.rng.fill(&mut ciphertext[..]);
        payload::Application {
            generation: self.rng.gen_range(0..8),
            ciphertext: ciphertext.into(),
            push: None,
            epoch_tag: None,
        }
    }

    /// Sends a hostile frame; `copies_allowed` is how many times its
    /// payload may be in the log when it is refused (a replay's original).
    fn send_hostile(&mut self, room: RoomId, act: HostileAct, id: u32, frame: Frame, copies_allowed: usize) {
        // What the server must refuse: the checker sees that its payload
        // was never sequenced (beyond a replay's original).
        if !matches!(act, HostileAct::ForgedApplication | HostileAct::FalseReport) {
            let key = digest(frame.payload());
            self.shared.cast.ledger.borrow_mut().refused_payloads.insert(key, copies_allowed);
        }
        self.debug(|| format!("-> {id} hostile {}", act.name()));
        self.in_flight.insert(id, Request::Hostile { room, act, frame: frame.clone() });
        self.send_frame(&frame);
    }

    fn forged_signature(&mut self, room_id: RoomId) -> bool {
        let Some((epoch, output)) = self.throwaway_commit(room_id) else { return false };
        let commit = payload::Commit {
            commit: output.commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        let Some((id, mut frame)) = self.unsigned_frame(room_id, &commit, epoch) else { return false };
        let forger = self.forger_key();
        frame.sign(&forger);
        self.send_hostile(room_id, HostileAct::ForgedSignature, id, frame, 0);
        true
    }

    fn missing_signature(&mut self, room_id: RoomId) -> bool {
        let Some(epoch) = self.synchronized_epoch(room_id) else { return false };
        let application = self.made_up_application();
        let Some((id, frame)) = self.unsigned_frame(room_id, &application, epoch) else { return false };
        self.send_hostile(room_id, HostileAct::MissingSignature, id, frame, 0);
        true
    }

    fn forged_application(&mut self, room_id: RoomId) -> bool {
        if self.synchronized_epoch(room_id).is_none() {
            return false;
        }
        let Some(log) = self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()) else { return false };
        let Ok(sealed) = log.seal(b"forged", &self.key) else { return false };
        let mut frame = sealed.frame;
        let id = self.next_request();
        frame.header_mut().set_request_id(id);
        let forger = self.forger_key();
        frame.sign(&forger);
        self.shared.cast.ledger.borrow_mut().forged_payloads.insert(digest(frame.payload()));
        // Sealing moved our chain on: it is checkpointed before the frame leaves.
        self.persist();
        self.send_hostile(room_id, HostileAct::ForgedApplication, id, frame, 0);
        true
    }

    /// A message to a room we are not in (a made-up room when we are in all).
    fn not_member(&mut self) -> bool {
        let outside: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, room)| !room.member() && room.joining.is_none())
            .map(|(id, _)| *id)
            .collect();
        let room_id = match outside.choose(&mut self.rng) {
            Some(room_id) => *room_id,
            None => RoomId(self.rng.gen()),
        };
        let application = self.made_up_application();
        let Some((id, mut frame)) = self.unsigned_frame(room_id, &application, 0) else { return false };
        frame.sign(&self.key);
        self.send_hostile(room_id, HostileAct::NotMember, id, frame, 0);
        true
    }

    fn stale_epoch(&mut self, room_id: RoomId) -> bool {
        let Some(epoch) = self.settled_epoch(room_id).filter(|epoch| *epoch > 0) else { return false };
        let application = self.made_up_application();
        let Some((id, mut frame)) = self.unsigned_frame(room_id, &application, epoch - 1) else {
            return false;
        };
        frame.sign(&self.key);
        self.send_hostile(room_id, HostileAct::StaleEpoch, id, frame, 0);
        true
    }

    /// Sends again one of our sequenced commits the room has moved past
    /// (`own`), or another member's sequenced frame as it is.
    fn replay(&mut self, room_id: RoomId, own: bool) -> bool {
        // Another's frame is refused whatever the epoch; our own commit is
        // stale for the server only once a void can no longer undo ours.
        let epoch = match own {
            true => self.settled_epoch(room_id),
            false => self.synchronized_epoch(room_id),
        };
        let Some(epoch) = epoch else { return false };
        let sender = self.sender;
        let ledger = Rc::clone(&self.shared.cast);
        let damaged = |frame: &Frame| {
            let commit = frame.decode_payload::<payload::Commit>().map(|commit| digest(&commit.commit));
            commit.is_ok_and(|commit| ledger.ledger.borrow().bad_commits.contains(&commit))
        };
        let candidates: Vec<Frame> = self
            .replayable
            .iter()
            .filter(|(room, frame)| {
                let header = frame.header();
                *room == room_id
                    && match own {
                        // Not a damaged commit of ours: voided, it would be valid again.
                        true => header.sender_id() == sender && header.epoch() < epoch && !damaged(frame),
                        false => header.sender_id() != sender && header.sender_id() != SenderId(0),
                    }
            })
            .map(|(_, frame)| frame.clone())
            .collect();
        let Some(original) = candidates.choose(&mut self.rng) else { return false };
        let (act, (id, frame)) = match own {
            true => {
                let Some(resigned) = self.fresh_request(&original.to_bytes()) else { return false };
                (HostileAct::ReplayOwn, resigned)
            }
            false => {
                let id = self.next_request();
                let mut frame = original.clone();
                frame.header_mut().set_request_id(id);
                (HostileAct::ReplayOther, (id, frame))
            }
        };
        self.send_hostile(room_id, act, id, frame, 1);
        true
    }

    /// A self-update whose confirmation tag (with a GroupInfo signed to
    /// match) or membership tag is damaged, sent as our commit: the server
    /// sequences it, members cannot process it.
    fn bad_commit(&mut self, room_id: RoomId, act: HostileAct) -> bool {
        let Some(epoch) = self.synchronized_epoch(room_id) else { return false };
        let busy = self.asking(room_id, |r| matches!(r, Request::Commit { .. }));
        let Some(room) = self.rooms.get_mut(&room_id) else { return false };
        let Some(log) = room.log.as_mut().filter(|log| !log.proposals_to_cover() && log.redo().is_none())
        else {
            return false;
        };
        let idle = log.group().is_some_and(|g| !g.has_pending_commit() && g.pending_proposal_count() == 0);
        if busy || room.leave.is_some() || !idle {
            return false;
        }
        let Some(group) = log.group_mut() else { return false };
        let Ok(output) = group.self_update(&self.provider, &self.identity) else { return false };
        let damaged = match act {
            HostileAct::BadConfirmationTag => test_support::corrupt_confirmation_tag_and_group_info(
                &output.commit,
                &output.group_info,
                &self.key,
            ),
            _ => damage_membership_tag(&output.commit).map(|commit| (commit, output.group_info.clone())),
        };
        let Some((commit, group_info)) = damaged else {
            self.violation(format!("room {room_id}: a commit whose tags could not be damaged"));
            return false;
        };
        self.shared.cast.ledger.borrow_mut().bad_commits.insert(digest(&commit));
        let commit = payload::Commit {
            commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(group_info),
        };
        let label = self.label("bad");
        self.send_commit(room_id, &commit, epoch, Intent::Update, label);
        true
    }

    /// A valid self-update carrying a Welcome for a member it does not add.
    fn wrong_recipients(&mut self, room_id: RoomId) -> bool {
        let others: Vec<u64> = self.members(room_id).into_iter().filter(|m| *m != self.sender.0).collect();
        let Some(&recipient) = others.choose(&mut self.rng) else { return false };
        let Some((epoch, output)) = self.throwaway_commit(room_id) else { return false };
        let mut welcome = vec![0u8; MADE_UP_BYTES];
        self.rng.fill(&mut welcome[..]);
        let commit = payload::Commit {
            commit: output.commit,
            welcome: Some(welcome),
            welcome_recipients: vec![recipient],
            group_info: Some(output.group_info),
        };
        let Some((id, mut frame)) = self.unsigned_frame(room_id, &commit, epoch) else { return false };
        frame.sign(&self.key);
        self.send_hostile(room_id, HostileAct::WrongWelcomeRecipients, id, frame, 0);
        true
    }

    /// Reports the latest commit we processed as one we cannot.
    fn false_report(&mut self, room_id: RoomId) -> bool {
        if self.synchronized_epoch(room_id).is_none() {
            return false;
        }
        let Some(&(log_index, epoch)) = self.last_commit.get(&room_id) else { return false };
        let reason = CommitReportReason::ConfirmationTag.to_u8();
        let report = payload::CommitReport { log_index, epoch, reason };
        let Some((id, mut frame)) = self.unsigned_frame(room_id, &report, epoch) else { return false };
        frame.sign(&self.key);
        self.send_hostile(room_id, HostileAct::FalseReport, id, frame, 0);
        true
    }

    /// Whether our refused commit was a damaged one (counted as the
    /// server's answer to it).
    pub(super) fn damaged_commit_refused(&mut self, frame: &Frame, code: Option<ErrorCode>) -> bool {
        let commit = frame.decode_payload::<payload::Commit>().map(|commit| digest(&commit.commit));
        let damaged =
            commit.is_ok_and(|commit| self.shared.cast.ledger.borrow().bad_commits.contains(&commit));
        // After our commit with a damaged confirmation tag the server's
        // transcript hash is not ours: it refuses our next commit's GroupInfo.
        let poisoned =
            self.shared.behaviour == Behaviour::Hostile && code == Some(ErrorCode::InvalidGroupInfo);
        let outcome = code.map_or("unknown refusal", ErrorCode::name);
        let what = match (damaged, poisoned) {
            (true, _) => "damaged commit refused",
            (false, true) => "commit after a damaged one refused",
            (false, false) => return false,
        };
        self.shared.cast.ledger.borrow_mut().hostile_outcome(what, outcome);
        true
    }

    /// Keeps a sequenced frame to replay later (hostile clients only).
    pub(super) fn keep_for_replay(&mut self, room_id: RoomId, frame: &Frame) {
        if self.shared.behaviour != Behaviour::Hostile {
            return;
        }
        // Commits and proposals only: messages are many and would push our
        // own commits out before the room moved past them.
        let worth = matches!(frame.opcode(), Opcode::Commit | Opcode::Proposal);
        if worth {
            if self.replayable.len() >= REPLAY_CANDIDATES_MAX {
                self.replayable.pop_front();
            }
            self.replayable.push_back((room_id, frame.clone()));
        }
    }

    /// The answer to a hostile frame: counted, and a broken rule if the
    /// server accepted what it must refuse or refused it otherwise.
    pub(super) fn hostile_answered(&mut self, act: HostileAct, code: Option<ErrorCode>) {
        let outcome = match code {
            Some(code) => code.name(),
            None => "acknowledged",
        };
        self.shared.cast.ledger.borrow_mut().hostile_outcome(act.name(), outcome);
        let expected = match code {
            None => matches!(act, HostileAct::ForgedApplication | HostileAct::FalseReport),
            Some(code) => act.expected_refusals().contains(&code) || super::answers::transient(Some(code)),
        };
        if !expected {
            self.violation(format!("hostile {}: answered {outcome}", act.name()));
        }
    }
}

/// `commit` (a member's `PublicMessage` commit in an `MLSMessage`, ending
/// with its membership tag: a one-byte length and 32 bytes) with the last
/// byte of its membership tag flipped.
fn damage_membership_tag(commit: &[u8]) -> Option<Vec<u8>> {
    const MAC_BYTES: usize = 32;
    let tag_head = commit.len().checked_sub(1 + MAC_BYTES)?;
    if usize::from(commit[tag_head]) != MAC_BYTES {
        return None;
    }
    let mut damaged = commit.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x01;
    Some(damaged)
}
