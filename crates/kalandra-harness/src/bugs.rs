//! Known bugs the harness can inject, to show that its checkers catch them.
//! Eight are planted in the server's production room core (its
//! `injected-bugs` switches, [`kalandra_server::bugs`]), two in
//! client-core (its room log and its MLS group; its `injected-bugs`
//! switches, [`client_core::bugs`]), and one in the simulated disk (a store that
//! loses durable data is a property of the medium: see
//! [`crate::disk::SimDisk::drop_last_entries`] and `docs/TESTING.md`).

/// Which bugs to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// In the shard: a batch is acknowledged and fanned out when it is
    /// handed to storage, before it is written.
    pub ack_before_durable: bool,
    /// In the sequencer: a commit made for the epoch before the current one
    /// is sequenced without being applied (two commits for one epoch).
    pub double_commit: bool,
    /// In the disk: each room's last entry is lost when the server restarts.
    pub drop_frame_on_restart: bool,
    /// In the shard: one entry past each durable batch is released too.
    pub release_one_past_durable: bool,
    /// In the sequencer: timestamps follow the clock back after a restart.
    pub stamp_without_clock_floor: bool,
    /// In the shard: a resubscription panics the task that handles it.
    pub panic_on_resubscribe: bool,
    /// In client-core's room log: our own message read back from the log
    /// (its acknowledgement lost) does not settle its outbox entry, so it is
    /// sent again.
    pub resend_sequenced_message: bool,
    /// In the shard: a commit members reported is never voided (the rule
    /// is met, the report acknowledged, no `CommitVoided` sequenced).
    pub never_void: bool,
    /// In the shard: the head signed for odd log indices is not the log's.
    pub wrong_signed_head: bool,
    /// In the sequencer: the hash chain takes frames as submitted, not as
    /// sequenced (log index and timestamp zero).
    pub chain_unstamped_frames: bool,
    /// In the second domain's disk: each replica's last entry is lost when
    /// its server restarts.
    pub replica_drops_frame_on_restart: bool,
    /// On the authority's replica feed: some application frames reach the
    /// other domain altered (an authority that shows two domains two logs).
    pub equivocating_authority: bool,
    /// In the second domain: the replica ignores its authority's erasures
    /// (notices and journal).
    pub replica_ignores_erasures: bool,
    /// In client-core's MLS group: a self-update's fresh leaf goes without
    /// the device's home certificate.
    pub self_update_drops_home_certificate: bool,
}

impl Bugs {
    /// Whether any bug is injected.
    pub fn any(&self) -> bool {
        *self != Bugs::default()
    }
}

/// The switches to plant in the server's room core for `bugs`.
pub fn planted(bugs: &Bugs) -> kalandra_server::bugs::InjectedBugs {
    kalandra_server::bugs::InjectedBugs {
        release_one_past_durable: bugs.release_one_past_durable,
        stamp_without_clock_floor: bugs.stamp_without_clock_floor,
        panic_on_resubscribe: bugs.panic_on_resubscribe,
        release_batch_when_taken: bugs.ack_before_durable,
        sequence_stale_commit: bugs.double_commit,
        never_void_commit: bugs.never_void,
        chain_before_stamping: bugs.chain_unstamped_frames,
        sign_wrong_head_for_odd_indices: bugs.wrong_signed_head,
    }
}

/// The switches to plant in client-core for `bugs`.
pub fn planted_in_client(bugs: &Bugs) -> client_core::bugs::InjectedBugs {
    client_core::bugs::InjectedBugs {
        own_message_unsettled_by_log: bugs.resend_sequenced_message,
        self_update_drops_home_certificate: bugs.self_update_drops_home_certificate,
    }
}
