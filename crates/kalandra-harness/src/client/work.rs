//! What a client does next in each room: join, subscribe, settle its
//! commit, cover proposals, carry out its intents, send its messages; and
//! the workload that gives it new intents and messages.

use bytes::Bytes;
use client_core::mls::{generate_key_packages, generate_last_resort_key_package, RoomGroup};
use client_core::room_log::{Intent, RoomLog};
use client_core::state::{ClientState, CommitKind};
use kalandra_proto::payload;
use kalandra_proto::{Frame, RoomId, SenderId};
use rand::seq::SliceRandom;
use rand::Rng;

use super::*;

/// A subscription that has not gone live and carried no frame for this
/// long is taken as dropped (the server drops the subscription of a member
/// it removes, without a word).
pub const SUBSCRIPTION_STALL_MS: u64 = 2_500;
/// Chance per tick that a client holds its oldest ready message back while
/// sending later ones (members then open them out of order).
pub const HOLD_BACK_SHARE: f64 = 0.25;

const _: () = assert!(SUBSCRIPTION_STALL_MS < SILENCE_TIMEOUT_MS + 1_000);

impl Client {
    /// Starts what is due in every room, and new work.
    pub(super) fn drive(&mut self) {
        let uploaded = self.shared.persisted.borrow().uploaded;
        if !uploaded && !self.in_flight.values().any(|r| matches!(r, Request::Upload)) {
            self.upload_key_packages();
        }
        let rooms: Vec<RoomId> = self.rooms.keys().copied().collect();
        for room in rooms {
            self.drive_room(room);
        }
        if self.shared.probe.take() {
            self.write_probes();
        }
        if self.shared.workload.get() && self.rng.gen_bool(self.shared.work_rate.get()) {
            let hostile = self.shared.behaviour == Behaviour::Hostile;
            if hostile && self.rng.gen_bool(super::hostile::HOSTILE_ACT_SHARE) {
                self.hostile_act();
            } else {
                self.new_work();
            }
        }
    }

    fn drive_room(&mut self, room_id: RoomId) {
        let now = now_ms();
        let Some(room) = self.room(room_id) else { return };
        if !room.member() {
            return self.drive_outside(room_id, now);
        }
        let confirmed = room.log.as_ref().is_some_and(RoomLog::is_confirmed);
        if !confirmed {
            // Created before a crash, its fate unknown: ask again before reading it.
            if !self.asking(room_id, |r| matches!(r, Request::Create { .. })) {
                self.resend_creation(room_id);
            }
            return;
        }
        if !room.subscribed {
            return self.subscribe(room_id);
        }
        if !room.live {
            if now.saturating_sub(room.last_frame_ms) > SUBSCRIPTION_STALL_MS {
                self.reconnect = Some(format!("room {room_id}: subscription stalled"));
            }
            return;
        }
        let Some(log) = room.log.as_ref() else { return };
        match log.state() {
            ClientState::PendingCommit { kind: CommitKind::Member, .. }
                if !self.asking(room_id, |r| matches!(r, Request::Commit { .. })) =>
            {
                self.resend_commit(room_id);
            }
            ClientState::Synchronized { epoch } => {
                self.next_step(room_id, epoch, now);
                self.send_messages(room_id, epoch);
            }
            ClientState::Stuck { .. } => self.drive_stuck(room_id, now),
            _ => {}
        }
    }

    /// A room we are not a member of: settle a pending join, join with a
    /// kept Welcome, create it (its creator), or join it by external commit.
    fn drive_outside(&mut self, room_id: RoomId, now: u64) {
        let Some(room) = self.room(room_id) else { return };
        let pending_join = self.shared.persisted.borrow().joins.contains_key(&room_id);
        if pending_join || room.joining.is_some() {
            let busy = self
                .asking(room_id, |r| matches!(r, Request::JoinSearch { .. } | Request::ExternalJoin { .. }));
            if !busy && now >= room.retry_at_ms {
                self.search_for_join(room_id);
            }
            return;
        }
        if self.shared.persisted.borrow().welcomes.contains_key(&room_id) {
            return self.join_from_welcome(room_id);
        }
        let creator = room.plan.creator == self.shared.index;
        if creator && room.log.is_none() {
            if !self.asking(room_id, |r| matches!(r, Request::Create { .. })) {
                self.create_room(room_id);
            }
            return;
        }
        let asking = self.asking(room_id, |r| matches!(r, Request::GroupInfo { .. }));
        // Stuck on a commit that settled: joined again by external commit,
        // open room or not (the server lets a member replace its own leaf).
        let rejoin = room.log.as_ref().is_some_and(RoomLog::rejoin_needed);
        let label = match rejoin && room.work.is_empty() {
            true => Some(self.label("rejoin")),
            false => None,
        };
        let Some(room) = self.room_mut(room_id) else { return };
        room.work.retain(|work| work.kind == WorkKind::ExternalJoin);
        if let Some(label) = label {
            room.work.push_back(Work { label, kind: WorkKind::ExternalJoin });
        }
        if asking || now < room.retry_at_ms || !(room.plan.open || rejoin) {
            return;
        }
        if let Some(work) = room.work.pop_front() {
            let request = Request::GroupInfo { room: room_id, label: work.label };
            self.request(room_id, &payload::GroupInfoRequest {}, 0, request);
        }
    }

    /// Asks for the room's log, to find out whether our external join
    /// (its answer lost) was sequenced: the server lets only members read it.
    fn search_for_join(&mut self, room_id: RoomId) {
        let Some(room) = self.room_mut(room_id) else { return };
        room.join_found = None;
        let from_log_index = room.join_search_from;
        let sync = payload::Sync { from_log_index, count_max: JOIN_SEARCH_FRAMES_MAX };
        self.request(room_id, &sync, 0, Request::JoinSearch { room: room_id });
    }

    /// The next intent of a synchronized member, one at a time.
    fn next_step(&mut self, room_id: RoomId, epoch: u64, now: u64) {
        let busy = self.asking(room_id, |r| {
            matches!(
                r,
                Request::Commit { .. }
                    | Request::Claim { .. }
                    | Request::Leave { .. }
                    | Request::Moderation { .. }
                    | Request::Redact { .. }
            )
        });
        let index = self.shared.index;
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        if busy || now < room.retry_at_ms {
            return;
        }
        if room.plan.creator == index && self.shared.persisted.borrow_mut().setup_queued.insert(room_id) {
            let members: Vec<u64> =
                room.plan.initial.iter().map(|c| self.shared.cast.senders.borrow()[*c].0).collect();
            if !members.is_empty() {
                let label = format!("c{index}-setup-{room_id}");
                room.work.push_front(Work { label, kind: WorkKind::Invite(members) });
            }
        }
        let Some(log) = room.log.as_mut() else { return };
        if let Some(intent) = log.take_redo() {
            // Another commit won the epoch of ours: redo it in this one.
            let label = self.shared.persisted.borrow().commit_labels.get(&room_id).cloned();
            let label = label.unwrap_or_else(|| self.label("redo"));
            return self.commit_intent(room_id, epoch, intent, label);
        }
        if log.proposals_to_cover() && room.leave.is_none() {
            let label = self.label("cover");
            return self.commit_intent(room_id, epoch, Intent::CoverProposals, label);
        }
        match room.leave {
            Some(Leave::Want) => return self.propose_leave(room_id, epoch),
            Some(_) => return,
            None => {}
        }
        if let Some(work) = room.work.pop_front() {
            self.start_work(room_id, epoch, work);
        }
    }

    fn start_work(&mut self, room_id: RoomId, epoch: u64, work: Work) {
        let members = self.members(room_id);
        match work.kind.clone() {
            WorkKind::Update => self.commit_intent(room_id, epoch, Intent::Update, work.label),
            WorkKind::Invite(_) if self.removal_pending(room_id) => self.later(room_id, work),
            WorkKind::Invite(targets) => {
                let targets: Vec<u64> = targets.into_iter().filter(|t| !members.contains(t)).collect();
                if !targets.is_empty() {
                    let claim = payload::KeyPackageClaim { sender_ids: targets.clone(), domain: None };
                    let work = Work { label: work.label, kind: WorkKind::Invite(targets) };
                    self.request(room_id, &claim, epoch, Request::Claim { room: room_id, work });
                }
            }
            WorkKind::Remove(target) if members.contains(&target) => {
                self.commit_intent(room_id, epoch, Intent::Remove(vec![target]), work.label);
            }
            WorkKind::Kick(target) if members.contains(&target) => {
                let kick = payload::Kick { target, reason: work.label };
                self.request(room_id, &kick, epoch, Request::Moderation { room: room_id });
            }
            WorkKind::Ban { target, duration_ms } => {
                let ban = payload::Ban { target, reason: work.label, duration_ms: Some(duration_ms) };
                self.request(room_id, &ban, epoch, Request::Moderation { room: room_id });
            }
            WorkKind::Redact(log_index) => {
                let redact = payload::Redact { log_index, reason: work.label };
                self.request(room_id, &redact, epoch, Request::Redact { room: room_id, log_index });
            }
            WorkKind::Leave => {
                if let Some(room) = self.room_mut(room_id) {
                    room.leave = Some(Leave::Want);
                }
            }
            WorkKind::Remove(_) | WorkKind::Kick(_) | WorkKind::ExternalJoin => {}
        }
    }

    /// Whether a proposal we cannot commit waits in the room (our own
    /// removal: a kick, a ban, our leave): a member's commit removes us, and
    /// any commit of ours would carry it.
    fn removal_pending(&self, room_id: RoomId) -> bool {
        let Some(log) = self.room(room_id).and_then(|r| r.log.as_ref()) else { return false };
        !log.proposals_to_cover() && log.group().is_some_and(|g| g.pending_proposal_count() > 0)
    }

    fn proposals_pending(&self, room_id: RoomId) -> bool {
        let group = self.room(room_id).and_then(|r| r.log.as_ref()).and_then(RoomLog::group);
        group.is_some_and(|g| g.pending_proposal_count() > 0)
    }

    /// Keeps `work` for later: a proposal we cannot commit is pending.
    fn later(&mut self, room_id: RoomId, work: Work) {
        if let Some(room) = self.room_mut(room_id) {
            room.work.push_front(work);
            room.retry_at_ms = now_ms() + RETRY_PAUSE_MS;
        }
    }

    /// The work an intent is redone as.
    fn work_of(intent: &Intent, label: String) -> Option<Work> {
        let kind = match intent {
            Intent::Update => WorkKind::Update,
            Intent::Invite(members) => WorkKind::Invite(members.clone()),
            Intent::Remove(members) => WorkKind::Remove(*members.first()?),
            // The simulation has one domain: it never invites across domains.
            Intent::InviteAt { .. } | Intent::CoverProposals | Intent::Create => return None,
        };
        Some(Work { label, kind })
    }

    /// Makes the commit for `intent` in `epoch` and sends it.
    fn commit_intent(&mut self, room_id: RoomId, epoch: u64, intent: Intent, label: String) {
        if intent != Intent::CoverProposals && self.removal_pending(room_id) {
            self.debug(|| {
                format!("room {room_id}: {intent:?} waits: a proposal we cannot commit is pending")
            });
            if let Some(work) = Self::work_of(&intent, label) {
                self.later(room_id, work);
            }
            return;
        }
        let leaves: Vec<u32> = match &intent {
            Intent::Remove(targets) => {
                targets.iter().filter_map(|t| self.leaf_of(room_id, SenderId(*t))).collect()
            }
            _ => Vec::new(),
        };
        let Some(group) =
            self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()).and_then(RoomLog::group_mut)
        else {
            return;
        };
        let output = match &intent {
            Intent::Update => group.self_update(&self.provider, &self.identity),
            Intent::CoverProposals => group.commit_pending_proposals(&self.provider, &self.identity),
            Intent::Remove(_) if leaves.is_empty() => return,
            Intent::Remove(_) => group.remove_members(&self.provider, &self.identity, &leaves),
            Intent::Invite(targets) => {
                // Redone after another commit won: claim fresh key packages.
                let work = Work { label, kind: WorkKind::Invite(targets.clone()) };
                if let Some(room) = self.room_mut(room_id) {
                    room.work.push_front(work);
                }
                return;
            }
            Intent::Create => {
                self.violation(format!("room {room_id}: a creation to redo"));
                return;
            }
            Intent::InviteAt { .. } => {
                self.violation(format!("room {room_id}: an invitation of another domain to redo"));
                return;
            }
        };
        match output {
            Ok(output) => {
                let commit = payload::Commit {
                    commit: output.commit,
                    welcome: None,
                    welcome_recipients: vec![],
                    group_info: Some(output.group_info),
                };
                self.send_commit(room_id, &commit, epoch, intent, label);
            }
            Err(_) if self.proposals_pending(room_id) => {
                // Among the proposals every commit carries is our own removal.
                match Self::work_of(&intent, label) {
                    Some(work) => self.later(room_id, work),
                    None => self.pause(room_id),
                }
            }
            Err(error) => self.violation(format!("room {room_id}: commit for {intent:?}: {}", chain(&error))),
        }
    }

    /// Adds `members` with their claimed key packages.
    pub(super) fn invite(
        &mut self,
        room_id: RoomId,
        epoch: u64,
        label: String,
        members: Vec<u64>,
        packages: &[Vec<u8>],
    ) {
        let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
        if self.removal_pending(room_id) {
            return self.later(room_id, Work { label, kind: WorkKind::Invite(members) });
        }
        let Some(group) =
            self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()).and_then(RoomLog::group_mut)
        else {
            return;
        };
        match group.add_members(&self.provider, &self.identity, &refs) {
            Ok(output) => {
                let commit = payload::Commit {
                    commit: output.commit,
                    welcome: output.welcome,
                    welcome_recipients: members.clone(),
                    group_info: Some(output.group_info),
                };
                self.send_commit(room_id, &commit, epoch, Intent::Invite(members), label);
            }
            Err(_) if self.proposals_pending(room_id) => {
                self.later(room_id, Work { label, kind: WorkKind::Invite(members) });
            }
            Err(error) => self.violation(format!("room {room_id}: add members: {}", chain(&error))),
        }
    }

    pub(super) fn send_commit(
        &mut self,
        room_id: RoomId,
        commit: &payload::Commit,
        epoch: u64,
        intent: Intent,
        label: String,
    ) {
        let (id, frame) = self.frame(room_id, commit, epoch);
        let Some(log) = self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()) else { return };
        if let Err(error) = log.commit_sent(frame.to_bytes().to_vec(), epoch, intent.clone()) {
            self.violation(format!("room {room_id}: {error}"));
            return;
        }
        {
            let mut ledger = self.shared.cast.ledger.borrow_mut();
            ledger.intent(&label, self.shared.index, room_id, format!("{intent:?}"));
            ledger.commit_made(&commit.commit, &label);
        }
        self.shared.persisted.borrow_mut().commit_labels.insert(room_id, label);
        self.persist();
        self.debug(|| format!("-> {id} commit {intent:?} in {room_id} epoch {epoch}"));
        self.in_flight.insert(id, Request::Commit { room: room_id, settled: false, frame: frame.clone() });
        self.send_frame(&frame);
    }

    /// Our commit's fate is unknown and the log (read to its head) did not
    /// settle it: send it again.
    fn resend_commit(&mut self, room_id: RoomId) {
        let stored = self.room(room_id).and_then(|r| r.log.as_ref()).and_then(RoomLog::commit_to_resend);
        let Some(stored) = stored.map(<[u8]>::to_vec) else { return };
        if let Some((id, frame)) = self.fresh_request(&stored) {
            self.in_flight
                .insert(id, Request::Commit { room: room_id, settled: false, frame: frame.clone() });
            self.send_frame(&frame);
        }
    }

    fn propose_leave(&mut self, room_id: RoomId, epoch: u64) {
        let Some(group) =
            self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()).and_then(RoomLog::group_mut)
        else {
            return;
        };
        let output = match group.leave(&self.provider, &self.identity) {
            Ok(output) => output,
            Err(error) => {
                self.violation(format!("room {room_id}: leave: {error}"));
                return;
            }
        };
        let mut voids_applied = 0;
        if let Some(room) = self.room_mut(room_id) {
            room.leave = Some(Leave::Sent { epoch });
            voids_applied = room.voids_applied;
        }
        self.persist();
        let proposal = payload::Proposal { proposal: output.proposal };
        let (id, frame) = self.frame(room_id, &proposal, epoch);
        let request = Request::Leave { room: room_id, epoch, frame: frame.clone(), voids_applied };
        self.in_flight.insert(id, request);
        self.send_frame(&frame);
    }

    /// Seals the room's ready messages in outbox order (each chain position
    /// persisted before anything leaves) and sends them in a shuffled
    /// order, sometimes holding the oldest back: several in flight, and
    /// members open them out of order.
    fn send_messages(&mut self, room_id: RoomId, epoch: u64) {
        let in_flight: Vec<u64> = self
            .in_flight
            .values()
            .filter_map(|r| match r {
                Request::Message { room, id, .. } if *room == room_id => Some(*id),
                _ => None,
            })
            .collect();
        let room_for = MESSAGES_IN_FLIGHT_PER_ROOM_MAX.saturating_sub(in_flight.len());
        let ready: Vec<u64> = self
            .shared
            .persisted
            .borrow()
            .outbox
            .iter()
            .filter(|(id, e)| e.room == room_id && e.wait_for_epoch <= epoch && !in_flight.contains(id))
            .map(|(id, _)| *id)
            .take(room_for)
            .collect();
        if ready.is_empty() {
            return;
        }
        for id in &ready {
            self.seal_if_needed(room_id, *id, epoch);
        }
        self.persist();
        let mut order = ready;
        order.shuffle(&mut self.rng);
        if order.len() > 1 && self.rng.gen_bool(HOLD_BACK_SHARE) {
            order.remove(0);
        }
        for id in order {
            let stored = self.shared.persisted.borrow().outbox.get(&id).and_then(|e| e.sealed.clone());
            let Some(sealed) = stored else { continue };
            if let Some((request_id, frame)) = self.fresh_request(&sealed.frame) {
                self.in_flight
                    .insert(request_id, Request::Message { room: room_id, id, frame: frame.clone() });
                self.send_frame(&frame);
            }
        }
    }

    /// Seals outbox entry `id` in `epoch` unless its sealing is of it.
    fn seal_if_needed(&mut self, room_id: RoomId, id: u64, epoch: u64) {
        let text = {
            let persisted = self.shared.persisted.borrow();
            let Some(entry) = persisted.outbox.get(&id) else { return };
            if entry.sealed.as_ref().is_some_and(|s| s.sent.epoch == epoch) {
                return;
            }
            entry.text.clone()
        };
        let Some(log) = self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()) else { return };
        match log.seal(text.as_bytes(), &self.key) {
            Ok(sealed) => {
                self.debug(|| {
                    format!("seal {id} in {room_id} epoch {} gen {}", sealed.epoch, sealed.generation)
                });
                let sent = SentMessage { id, epoch: sealed.epoch, generation: sealed.generation };
                let mut persisted = self.shared.persisted.borrow_mut();
                if let Some(entry) = persisted.outbox.get_mut(&id) {
                    entry.sealed = Some(SealedEntry { frame: sealed.frame.to_bytes().to_vec(), sent });
                }
            }
            Err(error) => self.violation(format!("room {room_id}: seal: {error}")),
        }
    }

    fn create_room(&mut self, room_id: RoomId) {
        let Some(server_key) = self.server_key else { return };
        let open = self.room(room_id).is_some_and(|r| r.plan.open);
        let (group, created) = match RoomGroup::create(
            &self.provider,
            &self.identity,
            room_id.0,
            &server_key,
            now_ms() / 1000,
        ) {
            Ok(created) => created,
            Err(error) => {
                self.violation(format!("create room: {error}"));
                return;
            }
        };
        let join_rule = if open { payload::JoinRule::Open } else { payload::JoinRule::InviteOnly };
        let payload = payload::CreateRoom {
            group_info: created.group_info,
            ratchet_tree: created.ratchet_tree,
            join_rule: Some(join_rule),
        };
        let (id, frame) = self.frame(room_id, &payload, 0);
        match RoomLog::created(&self.provider, group, frame.to_bytes().to_vec()) {
            Ok(log) => {
                if let Some(room) = self.room_mut(room_id) {
                    room.log = Some(log);
                }
                let mut record = self.trace();
                let trace = record.rooms.entry(room_id).or_default();
                let start = trace.delivered.len();
                trace.stints.push(start);
            }
            Err(error) => {
                self.violation(format!("create room: {error}"));
                return;
            }
        }
        self.persist();
        self.in_flight.insert(id, Request::Create { room: room_id, frame: frame.clone() });
        self.send_frame(&frame);
    }

    /// Created before a crash, its fate unknown: ask again.
    fn resend_creation(&mut self, room_id: RoomId) {
        let stored = self.room(room_id).and_then(|r| r.log.as_ref()).and_then(RoomLog::pending_commit);
        let Some(stored) = stored.map(|p| p.frame().to_vec()) else { return };
        match Frame::decode(&Bytes::from(stored)) {
            Ok(frame) => {
                let id = frame.header().request_id();
                self.in_flight.insert(id, Request::Create { room: room_id, frame: frame.clone() });
                self.send_frame(&frame);
            }
            Err(error) => self.violation(format!("stored CreateRoom: {error}")),
        }
    }

    fn upload_key_packages(&mut self) {
        let now = now_ms() / 1000;
        let packages = match generate_key_packages(&self.provider, &self.identity, KEY_PACKAGES_UPLOADED, now)
        {
            Ok(packages) => packages,
            Err(error) => {
                self.violation(format!("key packages: {error}"));
                return;
            }
        };
        let last_resort = match generate_last_resort_key_package(&self.provider, &self.identity, now) {
            Ok(package) => package,
            Err(error) => {
                self.violation(format!("last-resort key package: {error}"));
                return;
            }
        };
        self.persist();
        let upload = payload::KeyPackageUpload {
            key_packages: packages.into_iter().map(|p| p.message.into()).collect(),
            last_resort: Some(last_resort.message),
        };
        self.request(RoomId::default(), &upload, 0, Request::Upload);
    }

    /// New work for a room drawn at random: a message, a self-update, a
    /// change of membership (the admin adds, removes, kicks or bans; a
    /// member leaves or redacts its message; an outsider joins an open room).
    fn new_work(&mut self) {
        let room_ids: Vec<RoomId> = self.rooms.keys().copied().collect();
        let Some(&room_id) = room_ids.choose(&mut self.rng) else { return };
        let member = self.room(room_id).is_some_and(|r| r.member());
        let busy =
            self.room(room_id).is_none_or(|r| !r.work.is_empty() || r.leave.is_some() || r.joining.is_some());
        let roll: f64 = self.rng.gen();
        let membership = self.shared.membership_share.get();
        let update = self.shared.update_share.get();
        if !member {
            if !busy && roll < 4.0 * membership {
                self.new_join(room_id);
            }
            return;
        }
        if roll < membership {
            if !busy {
                self.new_membership_act(room_id);
            }
        } else if roll < membership + update {
            self.new_update(room_id);
        } else {
            self.new_message(room_id);
        }
    }

    fn new_message(&mut self, room_id: RoomId) {
        if self.shared.persisted.borrow().counters.messages >= MESSAGES_PER_CLIENT_MAX {
            return;
        }
        self.write_message(room_id);
    }

    /// Writes one message into the room's outbox; its id.
    fn write_message(&mut self, room_id: RoomId) -> String {
        let index = self.shared.index;
        let number = {
            let mut persisted = self.shared.persisted.borrow_mut();
            persisted.counters.messages += 1;
            persisted.counters.messages
        };
        let text = format!("c{index}-m{number}");
        self.shared.cast.ledger.borrow_mut().wrote(&text, index, room_id);
        let entry = OutboxEntry { room: room_id, text: text.clone(), sealed: None, wait_for_epoch: 0 };
        self.shared.persisted.borrow_mut().outbox.insert(number, entry);
        text
    }

    /// One message in every room we are a member of, beyond the workload's
    /// limit: the checker wants every other honest member to read it.
    fn write_probes(&mut self) {
        let rooms: Vec<RoomId> =
            self.rooms.iter().filter(|(_, room)| room.member()).map(|(room_id, _)| *room_id).collect();
        for room_id in rooms {
            let text = self.write_message(room_id);
            self.shared.cast.ledger.borrow_mut().probes.push((room_id, text));
        }
    }

    fn new_update(&mut self, room_id: RoomId) {
        {
            let mut persisted = self.shared.persisted.borrow_mut();
            if persisted.counters.updates >= UPDATES_PER_CLIENT_MAX {
                return;
            }
            persisted.counters.updates += 1;
        }
        let label = self.label("update");
        if let Some(room) = self.room_mut(room_id) {
            room.work.push_back(Work { label, kind: WorkKind::Update });
        }
    }

    fn take_act(&mut self) -> bool {
        let mut persisted = self.shared.persisted.borrow_mut();
        if persisted.counters.acts >= MEMBERSHIP_ACTS_PER_CLIENT_MAX {
            return false;
        }
        persisted.counters.acts += 1;
        true
    }

    fn new_join(&mut self, room_id: RoomId) {
        if !self.room(room_id).is_some_and(|r| r.plan.open) || !self.take_act() {
            return;
        }
        let label = self.label("join");
        if let Some(room) = self.room_mut(room_id) {
            room.work.push_back(Work { label, kind: WorkKind::ExternalJoin });
        }
    }

    fn new_membership_act(&mut self, room_id: RoomId) {
        let Some(room) = self.room(room_id) else { return };
        let admin = room.plan.creator == self.shared.index;
        let members = self.members(room_id);
        let own = self.sender.0;
        let senders: Vec<u64> = self.shared.cast.senders.borrow().iter().map(|s| s.0).collect();
        let others: Vec<u64> = members.iter().copied().filter(|m| *m != own).collect();
        let outsiders: Vec<u64> = senders.iter().copied().filter(|s| !members.contains(s)).collect();
        let kind = if admin {
            match self.rng.gen_range(0..4) {
                0 => outsiders.choose(&mut self.rng).map(|t| WorkKind::Invite(vec![*t])),
                1 => others.choose(&mut self.rng).map(|t| WorkKind::Remove(*t)),
                2 => others.choose(&mut self.rng).map(|t| WorkKind::Kick(*t)),
                _ => others.choose(&mut self.rng).map(|t| WorkKind::Ban {
                    target: *t,
                    duration_ms: self.rng.gen_range(BAN_MS_MIN..=BAN_MS_MAX),
                }),
            }
        } else if self.rng.gen_bool(0.6) {
            self.own_message_to_redact(room_id).map(WorkKind::Redact)
        } else {
            Some(WorkKind::Leave)
        };
        let Some(kind) = kind else { return };
        let redaction = matches!(kind, WorkKind::Redact(_));
        let allowed = if redaction { self.take_redaction() } else { self.take_act() };
        if !allowed {
            return;
        }
        let label = self.label(if redaction { "redact" } else { "act" });
        if !redaction {
            self.shared.cast.ledger.borrow_mut().intent(
                &label,
                self.shared.index,
                room_id,
                format!("{kind:?}"),
            );
        }
        if let Some(room) = self.room_mut(room_id) {
            room.work.push_back(Work { label, kind });
        }
    }

    fn take_redaction(&mut self) -> bool {
        let mut persisted = self.shared.persisted.borrow_mut();
        if persisted.counters.redactions >= REDACTIONS_PER_CLIENT_MAX {
            return false;
        }
        persisted.counters.redactions += 1;
        true
    }

    /// One of our messages of the room, sequenced and not redacted yet.
    fn own_message_to_redact(&mut self, room_id: RoomId) -> Option<u64> {
        let candidates: Vec<u64> = {
            let record = self.shared.record.borrow();
            let redacted = &self.shared.cast.ledger.borrow().redactions;
            record
                .rooms
                .get(&room_id)?
                .entries
                .iter()
                .filter(|(index, _, seen)| {
                    matches!(seen, Seen::Own(_)) && !redacted.contains(&(room_id, *index))
                })
                .map(|(index, _, _)| *index)
                .collect()
        };
        candidates.choose(&mut self.rng).copied()
    }
}

/// An error with its sources.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
