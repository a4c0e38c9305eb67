//! Known bugs planted at seams of the room core, compiled only with the
//! `injected-bugs` feature, so that the simulation can show each of its
//! checkers catching a bug of its kind in the code production runs.
//!
//! The switches are per thread (the simulation runs one world per thread)
//! and all off unless a test turns them on.

use std::cell::Cell;

/// Which bugs are planted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// The shard treats one entry past each durable batch as durable too:
    /// an acknowledgement or fan-out released one index early.
    pub release_one_past_durable: bool,
    /// The sequencer stamps the clock's time without keeping it at or
    /// after the last time it stamped.
    pub stamp_without_clock_floor: bool,
    /// The shard panics when a connection subscribes from past the start
    /// of a room's log (a joiner and every reconnection do).
    pub panic_on_resubscribe: bool,
    /// The shard releases a batch (acknowledgements, fan-out) when the
    /// driver takes it for storage, before it is written.
    pub release_batch_when_taken: bool,
    /// The sequencer sequences a commit made for the epoch before the
    /// current one without applying it: two commits for one epoch.
    pub sequence_stale_commit: bool,
    /// The shard never voids a commit members reported: the rule is met,
    /// the report is acknowledged, and no `CommitVoided` is sequenced.
    pub never_void_commit: bool,
    /// The sequencer extends the log's hash chain with the frame as
    /// submitted (log index and server timestamp zero) instead of as
    /// sequenced: every head it states differs from the one members compute.
    pub chain_before_stamping: bool,
    /// The shard signs a wrong head for odd log indices (in
    /// acknowledgements and `SyncDone`s).
    pub sign_wrong_head_for_odd_indices: bool,
}

thread_local! {
    static BUGS: Cell<InjectedBugs> = const { Cell::new(InjectedBugs {
        release_one_past_durable: false,
        stamp_without_clock_floor: false,
        panic_on_resubscribe: false,
        release_batch_when_taken: false,
        sequence_stale_commit: false,
        never_void_commit: false,
        chain_before_stamping: false,
        sign_wrong_head_for_odd_indices: false,
    }) };
}

/// Plants `bugs` for this thread.
pub fn plant(bugs: InjectedBugs) {
    BUGS.with(|cell| cell.set(bugs));
}

/// The bugs planted for this thread.
pub fn planted() -> InjectedBugs {
    BUGS.with(Cell::get)
}
