//! Known bugs planted at seams of the room log and the MLS group, compiled only with the
//! `injected-bugs` feature, so that the simulation can show that its
//! end-to-end checker catches a bug of its kind in the code devices run.
//!
//! The switch is per thread (the simulation runs one world per thread) and
//! off unless a test turns it on.

use std::cell::Cell;

/// Which bugs are planted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// [`crate::room_log::RoomLog::apply`] does not recognise our own
    /// message in the log (read back after its acknowledgement was lost),
    /// so its outbox entry is not settled and the message is sent again.
    pub own_message_unsettled_by_log: bool,
    /// [`crate::mls::RoomGroup::self_update`] makes the fresh leaf without
    /// the device's home certificate.
    pub self_update_drops_home_certificate: bool,
}

thread_local! {
    static BUGS: Cell<InjectedBugs> = const { Cell::new(InjectedBugs {
        own_message_unsettled_by_log: false,
        self_update_drops_home_certificate: false,
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
