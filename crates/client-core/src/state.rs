//! The client's state machine for one room, without I/O.
//!
//! [`ClientState::apply`] takes an [`Event`] (something the connection, the
//! server or MLS processing reported) and returns the next state and the
//! [`Action`]s the driver must perform, or an [`IllegalTransition`] naming the
//! state, the event and the rule broken. It never performs I/O and never
//! panics; an illegal event leaves the state as it was (the caller keeps it).
//!
//! # States
//!
//! - [`ClientState::Disconnected`]: no connection. `resume` remembers where
//!   to continue once connected.
//! - [`ClientState::PendingWelcome`]: connected, not a member: waiting for a
//!   Welcome, or about to join by external commit.
//! - [`ClientState::Synchronized`]: a member at `epoch`, following the log.
//! - [`ClientState::PendingCommit`]: a commit of ours (or our external join)
//!   that moves the room to `target_epoch` awaits the server's answer. For a
//!   member's commit the confirmed epoch is still `target_epoch - 1`.
//! - [`ClientState::Stuck`]: a member at `epoch` that cannot process the
//!   sequenced commit at `log_index`: it reports it and waits for the server
//!   to void it (`CommitVoided`) or for it to settle (then it rejoins). See
//!   `docs/RECOVERY.md`.
//!
//! # Transitions
//!
//! | state | event | next state | actions |
//! |---|---|---|---|
//! | Disconnected(Join) | Connected | PendingWelcome | — |
//! | Disconnected(Synchronized e) | Connected | Synchronized e | Subscribe |
//! | Disconnected(PendingCommit t) | Connected | PendingCommit t (member) | Subscribe |
//! | Disconnected(Stuck e L p) | Connected | Stuck e L p | Subscribe, ReportCommit L |
//! | PendingWelcome | WelcomeReceived e (e ≥ 1) | Synchronized e | EnterEpoch e, Subscribe |
//! | PendingWelcome | JoinedByExternalCommit e (e ≥ 1) | PendingCommit e (join) | — |
//! | PendingWelcome | ConnectionLost | Disconnected(Join) | — |
//! | Synchronized e | CommitSent e+1 | PendingCommit e+1 (member) | — |
//! | Synchronized e | CommitFromOthers e+1 | Synchronized e+1 | EnterEpoch e+1 |
//! | Synchronized e | Removed | PendingWelcome | DeleteGroup |
//! | Synchronized e | ConnectionLost | Disconnected(Synchronized e) | — |
//! | Synchronized e | CommitUnprocessable e+1 at L | Stuck e L | ReportCommit L |
//! | Synchronized e | CommitVoided e-1 | Synchronized e-1 | RollBack, EnterEpoch e-1 |
//! | PendingCommit t (member) | CommitAcked t | Synchronized t | MergePendingCommit, EnterEpoch t |
//! | PendingCommit t (member) | WrongEpoch c > t-1 | Synchronized t-1 | DiscardPendingCommit, SyncFrom, ReapplyIntent |
//! | PendingCommit t (member) | CommitFromOthers t | Synchronized t | EnterEpoch t, ReapplyIntent |
//! | PendingCommit t (member) | CommitRefused | Synchronized t-1 | DiscardPendingCommit |
//! | PendingCommit t (member) | Removed | PendingWelcome | DeleteGroup |
//! | PendingCommit t (member) | ConnectionLost | Disconnected(PendingCommit t) | — |
//! | PendingCommit t (member) | CommitUnprocessable t at L | Stuck t-1 L (pending) | ReportCommit L |
//! | PendingCommit t (member) | CommitVoided t-2 | Synchronized t-2 | DiscardPendingCommit, RollBack, EnterEpoch t-2, ReapplyIntent |
//! | PendingCommit t (join) | CommitAcked t | Synchronized t | EnterEpoch t, Subscribe |
//! | PendingCommit t (join) | WrongEpoch c > t-1 | PendingWelcome | DeleteGroup, ReapplyIntent |
//! | PendingCommit t (join) | CommitRefused | PendingWelcome | DeleteGroup |
//! | PendingCommit t (join) | ConnectionLost | Disconnected(Join) | DeleteGroup, ReapplyIntent |
//! | Stuck e L | CommitVoided e | Synchronized e | — |
//! | Stuck e L | StuckCommitSettled | PendingWelcome | DeleteGroup, Rejoin |
//! | Stuck e L (pending) | CommitVoided e | PendingCommit e+1 (member) | — |
//! | Stuck e L (pending) | WrongEpoch c > e | Stuck e L | DiscardPendingCommit, ReapplyIntent |
//! | Stuck e L (pending) | CommitRefused | Stuck e L | DiscardPendingCommit |
//! | Stuck e L (pending) | StuckCommitSettled | PendingWelcome | DeleteGroup, Rejoin, ReapplyIntent |
//! | Stuck e L p | Removed | PendingWelcome | DeleteGroup |
//! | Stuck e L p | ConnectionLost | Disconnected(Stuck e L p) | — |
//!
//! Every other pair is illegal. "(pending)" is a stuck member whose own
//! commit for the epoch the stuck commit took was still unanswered: it
//! keeps that commit until the stuck commit is voided or settles, because
//! after a void the server may still sequence it (it is valid in the epoch
//! the room returns to), and only its author can merge it. A member's pending commit survives a lost
//! connection: after reconnecting, the log replay settles it (our commit in
//! the log is reported as `CommitAcked`, another member's commit for the
//! epoch as `CommitFromOthers`; if neither appears the driver sends it
//! again). An external join does not: its fate is unknown, so the joiner
//! drops the group and joins again.
//!
//! A member's epoch never goes backwards except by `CommitVoided`, which
//! takes a member that had entered the voided commit's epoch back by
//! exactly one (and a stuck member nowhere: it never left).

/// What a pending commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommitKind {
    /// A member's commit (add, remove, update, covering proposals).
    Member,
    /// Our external commit joining the room: not a member until acknowledged.
    ExternalJoin,
}

/// Where a disconnected client continues once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resume {
    /// Not a member: wait for a Welcome or join.
    Join,
    /// A member at `epoch`.
    Synchronized {
        /// The confirmed epoch.
        epoch: u64,
    },
    /// A member whose commit to `target_epoch` was sent but not answered.
    PendingCommit {
        /// The epoch the commit moves the room to.
        target_epoch: u64,
    },
    /// A member at `epoch` stuck on the commit at `log_index`.
    Stuck {
        /// The confirmed epoch.
        epoch: u64,
        /// The commit it cannot process.
        log_index: u64,
        /// Our own commit to `epoch + 1` is kept, unanswered.
        pending_commit: bool,
    },
}

/// The client's state for one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientState {
    /// No connection.
    Disconnected {
        /// What to continue with once connected.
        resume: Resume,
    },
    /// Connected, not a member.
    PendingWelcome,
    /// A member at `epoch`, following the room's log.
    Synchronized {
        /// The confirmed epoch.
        epoch: u64,
    },
    /// A commit of ours to `target_epoch` awaits the server's answer.
    PendingCommit {
        /// The epoch the commit moves the room to (at least 1).
        target_epoch: u64,
        /// A member's commit or our external join.
        kind: CommitKind,
    },
    /// A member at `epoch` that cannot process the sequenced commit at
    /// `log_index`: it reported it and reads on until the commit is voided
    /// or settles.
    Stuck {
        /// The confirmed epoch (the one the commit left).
        epoch: u64,
        /// The commit it cannot process.
        log_index: u64,
        /// Our own commit to `epoch + 1`, sent before the commit at
        /// `log_index` was sequenced, is kept unanswered: a void of that
        /// commit may still let the server sequence ours.
        pending_commit: bool,
    },
}

/// Something that happened to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The connection is up and authenticated.
    Connected,
    /// The connection is gone.
    ConnectionLost,
    /// A Welcome was processed: we are a member at `epoch`.
    WelcomeReceived {
        /// The epoch the Welcome joins.
        epoch: u64,
    },
    /// We sent an external commit that makes us a member at `epoch` once
    /// the server sequences it.
    JoinedByExternalCommit {
        /// The epoch the external commit creates.
        epoch: u64,
    },
    /// We sent a commit moving the room to `target_epoch`.
    CommitSent {
        /// The epoch the commit creates.
        target_epoch: u64,
    },
    /// The server sequenced our pending commit (or external join); the room
    /// is now at `epoch`.
    CommitAcked {
        /// The room's epoch after our commit.
        epoch: u64,
    },
    /// The server refused our pending commit (or external join): the room is
    /// at `current_epoch` since `log_index`. Refusals of other frames are the
    /// outbox's business, not this machine's.
    WrongEpoch {
        /// The room's epoch.
        current_epoch: u64,
        /// Log index of the frame that started `current_epoch`.
        log_index: u64,
    },
    /// The server refused our pending commit (or external join) for good,
    /// for another reason than the epoch (invalid, forbidden): it will
    /// never be sequenced.
    CommitRefused,
    /// Another member's commit from the log was applied: the room is at `epoch`.
    CommitFromOthers {
        /// The epoch after the commit.
        epoch: u64,
    },
    /// A commit (or moderation) removed us from the room.
    Removed,
    /// A sequenced commit that would move the room to `epoch` cannot be
    /// processed (its tags or its path do not check out for us).
    CommitUnprocessable {
        /// The epoch the commit creates.
        epoch: u64,
        /// Its log index.
        log_index: u64,
    },
    /// The server voided a commit: the room is back at `epoch`.
    CommitVoided {
        /// The epoch the room returns to.
        epoch: u64,
    },
    /// The commit we are stuck on settled without a void (its window ended,
    /// or a later commit was sequenced).
    StuckCommitSettled,
}

/// What the driver must do after a transition, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Subscribe to the room's log from the first entry not yet applied.
    Subscribe,
    /// Fetch and apply the log from `log_index`.
    SyncFrom {
        /// First log index to apply.
        log_index: u64,
    },
    /// Derive the keys of `epoch` (sender keys, notification key).
    EnterEpoch {
        /// The new epoch.
        epoch: u64,
    },
    /// Merge our pending commit into the MLS group.
    MergePendingCommit,
    /// Discard our pending commit from the MLS group.
    DiscardPendingCommit,
    /// Delete the room's MLS group and keys.
    DeleteGroup,
    /// Put the intent of the refused or lost commit (or join) back in the
    /// outbox, to be redone in the current epoch.
    ReapplyIntent,
    /// Report the commit at `log_index` to the server (`CommitReport`).
    ReportCommit {
        /// The commit's log index.
        log_index: u64,
    },
    /// Return the MLS group and the sender keys to the epoch before the voided commit.
    RollBack,
    /// Join the room again by external commit (we are still a member on
    /// the server, with a leaf we cannot use).
    Rejoin,
}

/// The rule an illegal event breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Violation {
    /// Only `Connected` can happen while disconnected.
    #[error("not connected")]
    NotConnected,
    /// `Connected` while connected.
    #[error("already connected")]
    AlreadyConnected,
    /// The event needs membership.
    #[error("not a member")]
    NotMember,
    /// A join while already a member.
    #[error("already a member")]
    AlreadyMember,
    /// An answer to a commit while none is pending.
    #[error("no commit is pending")]
    NoCommitPending,
    /// A second commit (or a join) while one is pending.
    #[error("a commit is already pending")]
    CommitPending,
    /// The event's epoch is not the one that must come next.
    #[error("expected epoch {expected}, got {found}")]
    UnexpectedEpoch {
        /// The epoch that must come next.
        expected: u64,
        /// The event's epoch.
        found: u64,
    },
    /// A refusal claiming the room is not ahead of our epoch.
    #[error("the room's epoch {current_epoch} is not ahead of ours ({epoch})")]
    EpochNotAhead {
        /// Our confirmed epoch.
        epoch: u64,
        /// The epoch the server reported.
        current_epoch: u64,
    },
    /// Joins (Welcome or external commit) create epochs of at least 1.
    #[error("a join cannot be at epoch 0")]
    JoinAtEpochZero,
    /// The epoch cannot advance past `u64::MAX`.
    #[error("epoch overflow")]
    EpochOverflow,
    /// A void with no epoch before ours to return to.
    #[error("no epoch to return to")]
    NothingToVoid,
    /// A member stuck on a commit neither commits nor applies later commits.
    #[error("stuck on an unprocessable commit")]
    Stuck,
    /// A settlement of a stuck commit while not stuck.
    #[error("not stuck on a commit")]
    NotStuck,
}

/// An event that is not allowed in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("illegal transition: {event:?} in state {state:?}: {violation}")]
pub struct IllegalTransition {
    /// The state.
    pub state: ClientState,
    /// The event.
    pub event: Event,
    /// The rule it breaks.
    pub violation: Violation,
}

impl Default for ClientState {
    fn default() -> Self {
        ClientState::new()
    }
}

impl ClientState {
    /// The initial state: disconnected, not a member.
    pub const fn new() -> Self {
        ClientState::Disconnected { resume: Resume::Join }
    }

    /// Whether there is a connection.
    pub fn is_connected(&self) -> bool {
        !matches!(self, ClientState::Disconnected { .. })
    }

    /// Our confirmed epoch, if we are a member (an external join counts once
    /// acknowledged).
    pub fn member_epoch(&self) -> Option<u64> {
        match *self {
            ClientState::Synchronized { epoch }
            | ClientState::Stuck { epoch, .. }
            | ClientState::Disconnected {
                resume: Resume::Synchronized { epoch } | Resume::Stuck { epoch, .. },
            } => Some(epoch),
            ClientState::PendingCommit { target_epoch, kind: CommitKind::Member }
            | ClientState::Disconnected { resume: Resume::PendingCommit { target_epoch } } => {
                Some(target_epoch.saturating_sub(1))
            }
            ClientState::PendingCommit { kind: CommitKind::ExternalJoin, .. }
            | ClientState::PendingWelcome
            | ClientState::Disconnected { resume: Resume::Join } => None,
        }
    }

    /// The next state and the actions for `event`, or why it is illegal here.
    pub fn apply(&self, event: Event) -> Result<(ClientState, Vec<Action>), IllegalTransition> {
        self.transition(event).map_err(|violation| IllegalTransition { state: *self, event, violation })
    }

    fn transition(&self, event: Event) -> Result<(ClientState, Vec<Action>), Violation> {
        match *self {
            ClientState::Disconnected { resume } => match event {
                Event::Connected => Ok(match resume {
                    Resume::Join => (ClientState::PendingWelcome, vec![]),
                    Resume::Synchronized { epoch } => {
                        (ClientState::Synchronized { epoch }, vec![Action::Subscribe])
                    }
                    Resume::PendingCommit { target_epoch } => (
                        ClientState::PendingCommit { target_epoch, kind: CommitKind::Member },
                        vec![Action::Subscribe],
                    ),
                    Resume::Stuck { epoch, log_index, pending_commit } => (
                        ClientState::Stuck { epoch, log_index, pending_commit },
                        vec![Action::Subscribe, Action::ReportCommit { log_index }],
                    ),
                }),
                _ => Err(Violation::NotConnected),
            },
            ClientState::PendingWelcome => Self::pending_welcome(event),
            ClientState::Synchronized { epoch } => Self::synchronized(epoch, event),
            ClientState::PendingCommit { target_epoch, kind: CommitKind::Member } => {
                Self::pending_member_commit(target_epoch, event)
            }
            ClientState::PendingCommit { target_epoch, kind: CommitKind::ExternalJoin } => {
                Self::pending_external_join(target_epoch, event)
            }
            ClientState::Stuck { epoch, log_index, pending_commit: false } => {
                Self::stuck(epoch, log_index, event)
            }
            ClientState::Stuck { epoch, log_index, pending_commit: true } => {
                Self::stuck_with_pending_commit(epoch, log_index, event)
            }
        }
    }

    fn pending_welcome(event: Event) -> Result<(ClientState, Vec<Action>), Violation> {
        match event {
            Event::Connected => Err(Violation::AlreadyConnected),
            Event::ConnectionLost => Ok((ClientState::Disconnected { resume: Resume::Join }, vec![])),
            Event::WelcomeReceived { epoch: 0 } | Event::JoinedByExternalCommit { epoch: 0 } => {
                Err(Violation::JoinAtEpochZero)
            }
            Event::WelcomeReceived { epoch } => Ok((
                ClientState::Synchronized { epoch },
                vec![Action::EnterEpoch { epoch }, Action::Subscribe],
            )),
            Event::JoinedByExternalCommit { epoch } => Ok((
                ClientState::PendingCommit { target_epoch: epoch, kind: CommitKind::ExternalJoin },
                vec![],
            )),
            Event::CommitAcked { .. } | Event::WrongEpoch { .. } | Event::CommitRefused => {
                Err(Violation::NoCommitPending)
            }
            Event::CommitSent { .. }
            | Event::CommitFromOthers { .. }
            | Event::Removed
            | Event::CommitUnprocessable { .. }
            | Event::CommitVoided { .. } => Err(Violation::NotMember),
            Event::StuckCommitSettled => Err(Violation::NotStuck),
        }
    }

    fn synchronized(epoch: u64, event: Event) -> Result<(ClientState, Vec<Action>), Violation> {
        let next_epoch = || epoch.checked_add(1).ok_or(Violation::EpochOverflow);
        match event {
            Event::Connected => Err(Violation::AlreadyConnected),
            Event::ConnectionLost => {
                Ok((ClientState::Disconnected { resume: Resume::Synchronized { epoch } }, vec![]))
            }
            Event::WelcomeReceived { .. } | Event::JoinedByExternalCommit { .. } => {
                Err(Violation::AlreadyMember)
            }
            Event::CommitSent { target_epoch } => {
                let expected = next_epoch()?;
                if target_epoch != expected {
                    return Err(Violation::UnexpectedEpoch { expected, found: target_epoch });
                }
                Ok((ClientState::PendingCommit { target_epoch, kind: CommitKind::Member }, vec![]))
            }
            Event::CommitAcked { .. } | Event::WrongEpoch { .. } | Event::CommitRefused => {
                Err(Violation::NoCommitPending)
            }
            Event::CommitFromOthers { epoch: found } => {
                let expected = next_epoch()?;
                if found != expected {
                    return Err(Violation::UnexpectedEpoch { expected, found });
                }
                Ok((ClientState::Synchronized { epoch: found }, vec![Action::EnterEpoch { epoch: found }]))
            }
            Event::Removed => Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup])),
            Event::CommitUnprocessable { epoch: found, log_index } => {
                let expected = next_epoch()?;
                if found != expected {
                    return Err(Violation::UnexpectedEpoch { expected, found });
                }
                Ok((
                    ClientState::Stuck { epoch, log_index, pending_commit: false },
                    vec![Action::ReportCommit { log_index }],
                ))
            }
            Event::CommitVoided { epoch: found } => {
                let expected = epoch.checked_sub(1).ok_or(Violation::NothingToVoid)?;
                if found != expected {
                    return Err(Violation::UnexpectedEpoch { expected, found });
                }
                Ok((
                    ClientState::Synchronized { epoch: found },
                    vec![Action::RollBack, Action::EnterEpoch { epoch: found }],
                ))
            }
            Event::StuckCommitSettled => Err(Violation::NotStuck),
        }
    }

    fn pending_member_commit(
        target_epoch: u64,
        event: Event,
    ) -> Result<(ClientState, Vec<Action>), Violation> {
        let epoch = target_epoch.saturating_sub(1);
        match event {
            Event::Connected => Err(Violation::AlreadyConnected),
            Event::ConnectionLost => {
                Ok((ClientState::Disconnected { resume: Resume::PendingCommit { target_epoch } }, vec![]))
            }
            Event::WelcomeReceived { .. } | Event::JoinedByExternalCommit { .. } => {
                Err(Violation::AlreadyMember)
            }
            Event::CommitSent { .. } => Err(Violation::CommitPending),
            Event::CommitAcked { epoch: found } => {
                if found != target_epoch {
                    return Err(Violation::UnexpectedEpoch { expected: target_epoch, found });
                }
                Ok((
                    ClientState::Synchronized { epoch: target_epoch },
                    vec![Action::MergePendingCommit, Action::EnterEpoch { epoch: target_epoch }],
                ))
            }
            Event::WrongEpoch { current_epoch, log_index } => {
                if current_epoch <= epoch {
                    return Err(Violation::EpochNotAhead { epoch, current_epoch });
                }
                Ok((
                    ClientState::Synchronized { epoch },
                    vec![Action::DiscardPendingCommit, Action::SyncFrom { log_index }, Action::ReapplyIntent],
                ))
            }
            Event::CommitRefused => {
                Ok((ClientState::Synchronized { epoch }, vec![Action::DiscardPendingCommit]))
            }
            Event::CommitFromOthers { epoch: found } => {
                if found != target_epoch {
                    return Err(Violation::UnexpectedEpoch { expected: target_epoch, found });
                }
                // Processing the other commit discarded ours (RoomGroup::process_handshake).
                Ok((
                    ClientState::Synchronized { epoch: target_epoch },
                    vec![Action::EnterEpoch { epoch: target_epoch }, Action::ReapplyIntent],
                ))
            }
            Event::Removed => Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup])),
            Event::CommitUnprocessable { epoch: found, log_index } => {
                if found != target_epoch {
                    return Err(Violation::UnexpectedEpoch { expected: target_epoch, found });
                }
                // Another commit took the epoch, and we cannot process it.
                // Ours stays pending: if that commit is voided, the server
                // may still sequence ours.
                Ok((
                    ClientState::Stuck { epoch, log_index, pending_commit: true },
                    vec![Action::ReportCommit { log_index }],
                ))
            }
            Event::CommitVoided { epoch: found } => {
                let expected = epoch.checked_sub(1).ok_or(Violation::NothingToVoid)?;
                if found != expected {
                    return Err(Violation::UnexpectedEpoch { expected, found });
                }
                Ok((
                    ClientState::Synchronized { epoch: found },
                    vec![
                        Action::DiscardPendingCommit,
                        Action::RollBack,
                        Action::EnterEpoch { epoch: found },
                        Action::ReapplyIntent,
                    ],
                ))
            }
            Event::StuckCommitSettled => Err(Violation::NotStuck),
        }
    }

    fn pending_external_join(
        target_epoch: u64,
        event: Event,
    ) -> Result<(ClientState, Vec<Action>), Violation> {
        let epoch = target_epoch.saturating_sub(1);
        match event {
            Event::Connected => Err(Violation::AlreadyConnected),
            Event::ConnectionLost => Ok((
                ClientState::Disconnected { resume: Resume::Join },
                vec![Action::DeleteGroup, Action::ReapplyIntent],
            )),
            Event::WelcomeReceived { .. }
            | Event::JoinedByExternalCommit { .. }
            | Event::CommitSent { .. } => Err(Violation::CommitPending),
            Event::CommitAcked { epoch: found } => {
                if found != target_epoch {
                    return Err(Violation::UnexpectedEpoch { expected: target_epoch, found });
                }
                Ok((
                    ClientState::Synchronized { epoch: target_epoch },
                    vec![Action::EnterEpoch { epoch: target_epoch }, Action::Subscribe],
                ))
            }
            Event::WrongEpoch { current_epoch, .. } => {
                if current_epoch <= epoch {
                    return Err(Violation::EpochNotAhead { epoch, current_epoch });
                }
                Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup, Action::ReapplyIntent]))
            }
            Event::CommitRefused => Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup])),
            Event::CommitFromOthers { .. }
            | Event::Removed
            | Event::CommitUnprocessable { .. }
            | Event::CommitVoided { .. } => Err(Violation::NotMember),
            Event::StuckCommitSettled => Err(Violation::NotStuck),
        }
    }

    fn stuck(epoch: u64, log_index: u64, event: Event) -> Result<(ClientState, Vec<Action>), Violation> {
        match event {
            Event::Connected => Err(Violation::AlreadyConnected),
            Event::ConnectionLost => Ok((
                ClientState::Disconnected {
                    resume: Resume::Stuck { epoch, log_index, pending_commit: false },
                },
                vec![],
            )),
            Event::WelcomeReceived { .. } | Event::JoinedByExternalCommit { .. } => {
                Err(Violation::AlreadyMember)
            }
            Event::CommitAcked { .. } | Event::WrongEpoch { .. } | Event::CommitRefused => {
                Err(Violation::NoCommitPending)
            }
            Event::CommitSent { .. } | Event::CommitFromOthers { .. } | Event::CommitUnprocessable { .. } => {
                Err(Violation::Stuck)
            }
            Event::CommitVoided { epoch: found } => {
                if found != epoch {
                    return Err(Violation::UnexpectedEpoch { expected: epoch, found });
                }
                Ok((ClientState::Synchronized { epoch }, vec![]))
            }
            Event::StuckCommitSettled => {
                Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup, Action::Rejoin]))
            }
            Event::Removed => Ok((ClientState::PendingWelcome, vec![Action::DeleteGroup])),
        }
    }

    /// Stuck, with our own commit for the stuck commit's epoch unanswered.
    fn stuck_with_pending_commit(
        epoch: u64,
        log_index: u64,
        event: Event,
    ) -> Result<(ClientState, Vec<Action>), Violation> {
        let without_commit = ClientState::Stuck { epoch, log_index, pending_commit: false };
        match event {
            Event::ConnectionLost => Ok((
                ClientState::Disconnected {
                    resume: Resume::Stuck { epoch, log_index, pending_commit: true },
                },
                vec![],
            )),
            Event::CommitSent { .. } => Err(Violation::CommitPending),
            // Ours can be sequenced only after the void, which unsticks us first.
            Event::CommitAcked { .. } => Err(Violation::Stuck),
            Event::WrongEpoch { current_epoch, .. } => {
                if current_epoch <= epoch {
                    return Err(Violation::EpochNotAhead { epoch, current_epoch });
                }
                Ok((without_commit, vec![Action::DiscardPendingCommit, Action::ReapplyIntent]))
            }
            Event::CommitRefused => Ok((without_commit, vec![Action::DiscardPendingCommit])),
            Event::CommitVoided { epoch: found } => {
                if found != epoch {
                    return Err(Violation::UnexpectedEpoch { expected: epoch, found });
                }
                let target_epoch = epoch.checked_add(1).ok_or(Violation::EpochOverflow)?;
                Ok((ClientState::PendingCommit { target_epoch, kind: CommitKind::Member }, vec![]))
            }
            Event::StuckCommitSettled => Ok((
                ClientState::PendingWelcome,
                vec![Action::DeleteGroup, Action::Rejoin, Action::ReapplyIntent],
            )),
            _ => Self::stuck(epoch, log_index, event),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const D_JOIN: ClientState = ClientState::Disconnected { resume: Resume::Join };
    const D_SYNC: ClientState = ClientState::Disconnected { resume: Resume::Synchronized { epoch: 5 } };
    const D_COMMIT: ClientState =
        ClientState::Disconnected { resume: Resume::PendingCommit { target_epoch: 6 } };
    const WELCOME: ClientState = ClientState::PendingWelcome;
    const SYNC: ClientState = ClientState::Synchronized { epoch: 5 };
    const COMMIT: ClientState = ClientState::PendingCommit { target_epoch: 6, kind: CommitKind::Member };
    const JOIN: ClientState = ClientState::PendingCommit { target_epoch: 6, kind: CommitKind::ExternalJoin };
    const D_STUCK: ClientState = ClientState::Disconnected {
        resume: Resume::Stuck { epoch: 5, log_index: 40, pending_commit: false },
    };
    const STUCK: ClientState = ClientState::Stuck { epoch: 5, log_index: 40, pending_commit: false };
    const D_STUCK_P: ClientState =
        ClientState::Disconnected { resume: Resume::Stuck { epoch: 5, log_index: 40, pending_commit: true } };
    const STUCK_P: ClientState = ClientState::Stuck { epoch: 5, log_index: 40, pending_commit: true };

    const STATES: [ClientState; 11] =
        [D_JOIN, D_SYNC, D_COMMIT, WELCOME, SYNC, COMMIT, JOIN, D_STUCK, STUCK, D_STUCK_P, STUCK_P];

    const EVENTS: [Event; 23] = [
        Event::Connected,
        Event::ConnectionLost,
        Event::WelcomeReceived { epoch: 6 },
        Event::WelcomeReceived { epoch: 0 },
        Event::JoinedByExternalCommit { epoch: 6 },
        Event::JoinedByExternalCommit { epoch: 0 },
        Event::CommitSent { target_epoch: 6 },
        Event::CommitSent { target_epoch: 7 },
        Event::CommitAcked { epoch: 6 },
        Event::CommitAcked { epoch: 7 },
        Event::WrongEpoch { current_epoch: 7, log_index: 100 },
        Event::WrongEpoch { current_epoch: 5, log_index: 100 },
        Event::WrongEpoch { current_epoch: 4, log_index: 100 },
        Event::CommitFromOthers { epoch: 6 },
        Event::CommitFromOthers { epoch: 7 },
        Event::CommitFromOthers { epoch: 5 },
        Event::Removed,
        Event::CommitRefused,
        Event::CommitUnprocessable { epoch: 6, log_index: 40 },
        Event::CommitUnprocessable { epoch: 7, log_index: 40 },
        Event::CommitVoided { epoch: 5 },
        Event::CommitVoided { epoch: 4 },
        Event::StuckCommitSettled,
    ];

    type Expected = Result<(ClientState, &'static [Action]), Violation>;

    const NC: Expected = Err(Violation::NotConnected);
    const AC: Expected = Err(Violation::AlreadyConnected);
    const NM: Expected = Err(Violation::NotMember);
    const AM: Expected = Err(Violation::AlreadyMember);
    const NP: Expected = Err(Violation::NoCommitPending);
    const CP: Expected = Err(Violation::CommitPending);
    const Z: Expected = Err(Violation::JoinAtEpochZero);
    const ST: Expected = Err(Violation::Stuck);
    const NS: Expected = Err(Violation::NotStuck);
    const fn unexpected(expected: u64, found: u64) -> Expected {
        Err(Violation::UnexpectedEpoch { expected, found })
    }
    const fn not_ahead(epoch: u64, current_epoch: u64) -> Expected {
        Err(Violation::EpochNotAhead { epoch, current_epoch })
    }

    /// The expected outcome of every state (rows, as in `STATES`) and event
    /// (columns, as in `EVENTS`).
    #[rustfmt::skip]
    const TABLE: [[Expected; 23]; 11] = [
        // D_JOIN
        [Ok((WELCOME, &[])), NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC],
        // D_SYNC
        [Ok((SYNC, &[Action::Subscribe])), NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC],
        // D_COMMIT
        [Ok((COMMIT, &[Action::Subscribe])), NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC],
        // WELCOME
        [
            AC,
            Ok((D_JOIN, &[])),
            Ok((ClientState::Synchronized { epoch: 6 }, &[Action::EnterEpoch { epoch: 6 }, Action::Subscribe])),
            Z,
            Ok((JOIN, &[])),
            Z,
            NM, NM,
            NP, NP,
            NP, NP, NP,
            NM, NM, NM,
            NM,
            NP,
            NM, NM, NM, NM, NS,
        ],
        // SYNC (epoch 5)
        [
            AC,
            Ok((D_SYNC, &[])),
            AM, AM, AM, AM,
            Ok((COMMIT, &[])),
            unexpected(6, 7),
            NP, NP,
            NP, NP, NP,
            Ok((ClientState::Synchronized { epoch: 6 }, &[Action::EnterEpoch { epoch: 6 }])),
            unexpected(6, 7),
            unexpected(6, 5),
            Ok((WELCOME, &[Action::DeleteGroup])),
            NP,
            Ok((STUCK, &[Action::ReportCommit { log_index: 40 }])),
            unexpected(6, 7),
            unexpected(4, 5),
            Ok((ClientState::Synchronized { epoch: 4 }, &[Action::RollBack, Action::EnterEpoch { epoch: 4 }])),
            NS,
        ],
        // COMMIT (member, target 6)
        [
            AC,
            Ok((D_COMMIT, &[])),
            AM, AM, AM, AM,
            CP, CP,
            Ok((
                ClientState::Synchronized { epoch: 6 },
                &[Action::MergePendingCommit, Action::EnterEpoch { epoch: 6 }],
            )),
            unexpected(6, 7),
            Ok((
                SYNC,
                &[Action::DiscardPendingCommit, Action::SyncFrom { log_index: 100 }, Action::ReapplyIntent],
            )),
            not_ahead(5, 5),
            not_ahead(5, 4),
            Ok((
                ClientState::Synchronized { epoch: 6 },
                &[Action::EnterEpoch { epoch: 6 }, Action::ReapplyIntent],
            )),
            unexpected(6, 7),
            unexpected(6, 5),
            Ok((WELCOME, &[Action::DeleteGroup])),
            Ok((SYNC, &[Action::DiscardPendingCommit])),
            Ok((STUCK_P, &[Action::ReportCommit { log_index: 40 }])),
            unexpected(6, 7),
            unexpected(4, 5),
            Ok((
                ClientState::Synchronized { epoch: 4 },
                &[
                    Action::DiscardPendingCommit,
                    Action::RollBack,
                    Action::EnterEpoch { epoch: 4 },
                    Action::ReapplyIntent,
                ],
            )),
            NS,
        ],
        // JOIN (external, target 6)
        [
            AC,
            Ok((D_JOIN, &[Action::DeleteGroup, Action::ReapplyIntent])),
            CP, CP, CP, CP,
            CP, CP,
            Ok((ClientState::Synchronized { epoch: 6 }, &[Action::EnterEpoch { epoch: 6 }, Action::Subscribe])),
            unexpected(6, 7),
            Ok((WELCOME, &[Action::DeleteGroup, Action::ReapplyIntent])),
            not_ahead(5, 5),
            not_ahead(5, 4),
            NM, NM, NM,
            NM,
            Ok((WELCOME, &[Action::DeleteGroup])),
            NM, NM, NM, NM, NS,
        ],
        // D_STUCK
        [
            Ok((STUCK, &[Action::Subscribe, Action::ReportCommit { log_index: 40 }])),
            NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC,
        ],
        // STUCK (epoch 5, on log index 40)
        [
            AC,
            Ok((D_STUCK, &[])),
            AM, AM, AM, AM,
            ST, ST,
            NP, NP,
            NP, NP, NP,
            ST, ST, ST,
            Ok((WELCOME, &[Action::DeleteGroup])),
            NP,
            ST, ST,
            Ok((SYNC, &[])),
            unexpected(5, 4),
            Ok((WELCOME, &[Action::DeleteGroup, Action::Rejoin])),
        ],
        // D_STUCK_P
        [
            Ok((STUCK_P, &[Action::Subscribe, Action::ReportCommit { log_index: 40 }])),
            NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC, NC,
        ],
        // STUCK_P (epoch 5, on log index 40, our commit to 6 unanswered)
        [
            AC,
            Ok((D_STUCK_P, &[])),
            AM, AM, AM, AM,
            CP, CP,
            ST, ST,
            Ok((STUCK, &[Action::DiscardPendingCommit, Action::ReapplyIntent])),
            not_ahead(5, 5),
            not_ahead(5, 4),
            ST, ST, ST,
            Ok((WELCOME, &[Action::DeleteGroup])),
            Ok((STUCK, &[Action::DiscardPendingCommit])),
            ST, ST,
            Ok((COMMIT, &[])),
            unexpected(5, 4),
            Ok((WELCOME, &[Action::DeleteGroup, Action::Rejoin, Action::ReapplyIntent])),
        ],
    ];

    #[test]
    fn every_state_and_event_pair_has_exactly_the_expected_outcome() {
        let mut legal = 0;
        for (row, state) in STATES.iter().enumerate() {
            for (column, event) in EVENTS.iter().enumerate() {
                let expected = TABLE[row][column];
                let outcome = state.apply(*event);
                match expected {
                    Ok((next, actions)) => {
                        legal += 1;
                        assert_eq!(outcome, Ok((next, actions.to_vec())), "{state:?} + {event:?}");
                    }
                    Err(violation) => assert_eq!(
                        outcome,
                        Err(IllegalTransition { state: *state, event: *event, violation }),
                        "{state:?} + {event:?}"
                    ),
                }
            }
        }
        // One per row of the transition table in the module documentation,
        // two for a row whose stuck state reads "p" (with or without a
        // pending commit).
        assert_eq!(legal, 36);
    }

    #[test]
    fn the_table_covers_every_state_and_event_variant() {
        // Adding a variant makes these matches fail to compile until the
        // table above gains a row or column for it.
        for state in STATES {
            match state {
                ClientState::Disconnected { resume: Resume::Join | Resume::Synchronized { .. } }
                | ClientState::Disconnected { resume: Resume::PendingCommit { .. } | Resume::Stuck { .. } }
                | ClientState::PendingWelcome
                | ClientState::Synchronized { .. }
                | ClientState::Stuck { .. }
                | ClientState::PendingCommit {
                    kind: CommitKind::Member | CommitKind::ExternalJoin, ..
                } => {}
            }
        }
        for event in EVENTS {
            match event {
                Event::Connected
                | Event::ConnectionLost
                | Event::WelcomeReceived { .. }
                | Event::JoinedByExternalCommit { .. }
                | Event::CommitSent { .. }
                | Event::CommitAcked { .. }
                | Event::WrongEpoch { .. }
                | Event::CommitFromOthers { .. }
                | Event::CommitRefused
                | Event::Removed
                | Event::CommitUnprocessable { .. }
                | Event::CommitVoided { .. }
                | Event::StuckCommitSettled => {}
            }
        }
        let distinct_states: std::collections::HashSet<_> = STATES.iter().collect();
        assert_eq!(distinct_states.len(), STATES.len());
    }

    #[test]
    fn illegal_transitions_name_state_event_and_rule() {
        let error = WELCOME.apply(Event::CommitSent { target_epoch: 1 }).unwrap_err();
        assert_eq!(error.state, WELCOME);
        assert_eq!(error.event, Event::CommitSent { target_epoch: 1 });
        assert_eq!(error.violation, Violation::NotMember);
        let text = error.to_string();
        assert!(
            text.contains("PendingWelcome") && text.contains("CommitSent") && text.contains("not a member")
        );

        let ack_never_sent = SYNC.apply(Event::CommitAcked { epoch: 6 }).unwrap_err();
        assert_eq!(ack_never_sent.violation, Violation::NoCommitPending);

        let backwards = SYNC.apply(Event::CommitFromOthers { epoch: 4 }).unwrap_err();
        assert_eq!(backwards.violation, Violation::UnexpectedEpoch { expected: 6, found: 4 });
    }

    #[test]
    fn epoch_overflow_is_refused() {
        let state = ClientState::Synchronized { epoch: u64::MAX };
        for event in [Event::CommitSent { target_epoch: 0 }, Event::CommitFromOthers { epoch: 0 }] {
            assert_eq!(state.apply(event).unwrap_err().violation, Violation::EpochOverflow);
        }
    }

    #[test]
    fn a_full_life_cycle() {
        let steps = [
            (Event::Connected, ClientState::PendingWelcome),
            (Event::WelcomeReceived { epoch: 1 }, ClientState::Synchronized { epoch: 1 }),
            (Event::CommitFromOthers { epoch: 2 }, ClientState::Synchronized { epoch: 2 }),
            (
                Event::CommitSent { target_epoch: 3 },
                ClientState::PendingCommit { target_epoch: 3, kind: CommitKind::Member },
            ),
            (
                Event::ConnectionLost,
                ClientState::Disconnected { resume: Resume::PendingCommit { target_epoch: 3 } },
            ),
            (Event::Connected, ClientState::PendingCommit { target_epoch: 3, kind: CommitKind::Member }),
            (Event::WrongEpoch { current_epoch: 3, log_index: 40 }, ClientState::Synchronized { epoch: 2 }),
            (Event::CommitFromOthers { epoch: 3 }, ClientState::Synchronized { epoch: 3 }),
            (
                Event::CommitSent { target_epoch: 4 },
                ClientState::PendingCommit { target_epoch: 4, kind: CommitKind::Member },
            ),
            (Event::CommitAcked { epoch: 4 }, ClientState::Synchronized { epoch: 4 }),
            (Event::Removed, ClientState::PendingWelcome),
            (
                Event::JoinedByExternalCommit { epoch: 6 },
                ClientState::PendingCommit { target_epoch: 6, kind: CommitKind::ExternalJoin },
            ),
            (Event::CommitAcked { epoch: 6 }, ClientState::Synchronized { epoch: 6 }),
        ];
        let mut state = ClientState::new();
        assert!(!state.is_connected());
        for (event, expected) in steps {
            state = state.apply(event).expect("legal").0;
            assert_eq!(state, expected, "after {event:?}");
        }
        assert!(state.is_connected());
        assert_eq!(state.member_epoch(), Some(6));
    }

    #[test]
    fn a_stuck_member_resumes_on_a_void_or_rejoins_once_the_commit_settles() {
        let steps = [
            (Event::Connected, ClientState::Synchronized { epoch: 5 }),
            (Event::CommitUnprocessable { epoch: 6, log_index: 40 }, STUCK),
            (Event::ConnectionLost, D_STUCK),
            (Event::Connected, STUCK),
            (Event::CommitVoided { epoch: 5 }, ClientState::Synchronized { epoch: 5 }),
            (Event::CommitFromOthers { epoch: 6 }, ClientState::Synchronized { epoch: 6 }),
            (Event::CommitVoided { epoch: 5 }, ClientState::Synchronized { epoch: 5 }),
            (
                Event::CommitUnprocessable { epoch: 6, log_index: 44 },
                ClientState::Stuck { epoch: 5, log_index: 44, pending_commit: false },
            ),
            (Event::StuckCommitSettled, ClientState::PendingWelcome),
            (
                Event::JoinedByExternalCommit { epoch: 8 },
                ClientState::PendingCommit { target_epoch: 8, kind: CommitKind::ExternalJoin },
            ),
            (Event::CommitAcked { epoch: 8 }, ClientState::Synchronized { epoch: 8 }),
        ];
        let mut state = D_SYNC;
        for (event, expected) in steps {
            state = state.apply(event).expect("legal").0;
            assert_eq!(state, expected, "after {event:?}");
        }
        assert_eq!(STUCK.member_epoch(), Some(5));
        assert_eq!(D_STUCK.member_epoch(), Some(5));
        let nothing_before = ClientState::Synchronized { epoch: 0 }.apply(Event::CommitVoided { epoch: 0 });
        assert_eq!(nothing_before.unwrap_err().violation, Violation::NothingToVoid);
    }

    #[test]
    fn a_commit_pending_when_the_room_got_stuck_is_kept_until_the_stuck_commit_is_voided_or_settles() {
        // Voided: ours may still be sequenced in the epoch the room returns to.
        let voided = [
            (Event::CommitUnprocessable { epoch: 6, log_index: 40 }, STUCK_P),
            (Event::ConnectionLost, D_STUCK_P),
            (Event::Connected, STUCK_P),
            (Event::CommitVoided { epoch: 5 }, COMMIT),
            (Event::CommitAcked { epoch: 6 }, ClientState::Synchronized { epoch: 6 }),
        ];
        let mut state = COMMIT;
        for (event, expected) in voided {
            state = state.apply(event).expect("legal").0;
            assert_eq!(state, expected, "after {event:?}");
        }
        // Refused while stuck: the intent is redone once the room moves on.
        let (state, actions) = STUCK_P.apply(Event::WrongEpoch { current_epoch: 6, log_index: 40 }).unwrap();
        assert_eq!((state, actions), (STUCK, vec![Action::DiscardPendingCommit, Action::ReapplyIntent]));
        // Settled: the group goes, and the intent with the rejoin.
        let (_, actions) = STUCK_P.apply(Event::StuckCommitSettled).unwrap();
        assert!(actions.contains(&Action::Rejoin) && actions.contains(&Action::ReapplyIntent));
        assert_eq!(STUCK_P.member_epoch(), Some(5));
        assert_eq!(D_STUCK_P.member_epoch(), Some(5));
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let epoch = 0u64..8;
        prop_oneof![
            Just(Event::Connected),
            Just(Event::ConnectionLost),
            epoch.clone().prop_map(|epoch| Event::WelcomeReceived { epoch }),
            epoch.clone().prop_map(|epoch| Event::JoinedByExternalCommit { epoch }),
            epoch.clone().prop_map(|target_epoch| Event::CommitSent { target_epoch }),
            epoch.clone().prop_map(|epoch| Event::CommitAcked { epoch }),
            (epoch.clone(), 0u64..1000)
                .prop_map(|(current_epoch, log_index)| Event::WrongEpoch { current_epoch, log_index }),
            epoch.clone().prop_map(|epoch| Event::CommitFromOthers { epoch }),
            Just(Event::Removed),
            Just(Event::CommitRefused),
            (epoch.clone(), 0u64..1000)
                .prop_map(|(epoch, log_index)| Event::CommitUnprocessable { epoch, log_index }),
            epoch.prop_map(|epoch| Event::CommitVoided { epoch }),
            Just(Event::StuckCommitSettled),
        ]
    }

    proptest! {
        #[test]
        fn a_member_epoch_goes_backwards_only_by_a_void_and_by_one(
            events in proptest::collection::vec(any_event(), 0..64)
        ) {
            let mut state = ClientState::new();
            for event in events {
                let Ok((next, actions)) = state.apply(event) else { continue };
                if let (Some(before), Some(after)) = (state.member_epoch(), next.member_epoch()) {
                    match event {
                        Event::CommitVoided { .. } => {
                            prop_assert!(after + 1 >= before, "{state:?} + {event:?} -> {next:?}")
                        }
                        _ => prop_assert!(after >= before, "{state:?} + {event:?} -> {next:?}"),
                    }
                }
                if actions.contains(&Action::RollBack) {
                    let voided = matches!(event, Event::CommitVoided { .. });
                    prop_assert!(voided, "a rollback without a void: {:?}", event);
                }
                for action in &actions {
                    if let Action::EnterEpoch { epoch } = action {
                        prop_assert_eq!(next.member_epoch(), Some(*epoch));
                    }
                }
                if let ClientState::PendingCommit { target_epoch, .. } = next {
                    prop_assert!(target_epoch >= 1);
                }
                prop_assert_eq!(next.is_connected(), event != Event::ConnectionLost);
                state = next;
            }
        }
    }
}
