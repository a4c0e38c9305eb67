//! Delivery of stored Welcomes, shared by the tokio node and the
//! simulation.
//!
//! A batch's Welcomes are stored before the batch is handed to group commit
//! (never after it: a write that fails with an unknown outcome may still
//! have made the batch durable, and the commit would then add members whose
//! Welcome is gone). So a stored Welcome can name a commit that is not
//! durable yet, or, after a failed batch and a restart, an index that now
//! holds another frame. Before a Welcome is handed over, the log is read
//! at the index its header names: the commit there must carry this very
//! Welcome.

use std::future::Future;

use bytes::Bytes;
use kalandra_proto::payload::{Commit, Welcome};
use kalandra_proto::{Frame, Opcode, RoomId};

use crate::store::{EntryContent, PendingWelcome, StoredEntry};
use crate::transport::outbox::Outbox;

/// Where a stored Welcome stands against the room's durable log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WelcomeStanding {
    /// The commit at its index is durable and carries it: deliver.
    Deliver,
    /// Nothing is durable at its index yet: keep it, deliver later.
    NotYetDurable,
    /// Its index holds another frame (its batch was never written): it can
    /// never be used; forget it.
    Orphaned,
}

/// Where `welcome` (an encoded `Welcome` frame) stands, given the log
/// entry at the index its header names (`None`: nothing durable there).
pub fn welcome_standing(welcome: &Bytes, entry: Option<&StoredEntry>) -> WelcomeStanding {
    let Ok(frame) = Frame::decode(welcome) else { return WelcomeStanding::Orphaned };
    let Ok(payload) = frame.decode_payload::<Welcome>() else { return WelcomeStanding::Orphaned };
    let log_index = frame.header().log_index();
    let Some(entry) = entry.filter(|entry| entry.log_index == log_index) else {
        return WelcomeStanding::NotYetDurable;
    };
    // Commits are never erased; anything else at the index is not ours.
    let EntryContent::Frame(bytes) = &entry.content else { return WelcomeStanding::Orphaned };
    let Some(commit) = Frame::decode(bytes).ok().filter(|commit| commit.opcode() == Opcode::Commit) else {
        return WelcomeStanding::Orphaned;
    };
    // The same commit sequenced again at the same index after a failed
    // batch has another timestamp: the Welcome made for the first attempt
    // states that attempt's log head, so it is not this commit's.
    let stamped_ms = frame.header().server_timestamp_ms();
    if stamped_ms != 0 && stamped_ms != commit.header().server_timestamp_ms() {
        return WelcomeStanding::Orphaned;
    }
    let carried = commit.decode_payload::<Commit>().ok().and_then(|commit| commit.welcome);
    if carried.as_deref() == Some(payload.welcome.as_slice()) {
        WelcomeStanding::Deliver
    } else {
        WelcomeStanding::Orphaned
    }
}

/// How a driver reads and forgets stored Welcomes (on blocking threads in
/// the node, directly in the simulation).
pub trait WelcomeSource {
    /// A page of `recipient`'s pending Welcomes after `after`.
    fn page(
        &mut self,
        recipient: u64,
        after: Option<u64>,
    ) -> impl Future<Output = Result<Vec<PendingWelcome>, String>>;
    /// The durable log entry at `log_index` of `room_id`, if any.
    fn entry(
        &mut self,
        room_id: RoomId,
        log_index: u64,
    ) -> impl Future<Output = Result<Option<StoredEntry>, String>>;
    /// Whether `room_id` is ordered by another domain: its commits are in
    /// the authority's log, which forwarded the Welcome only once its commit
    /// was durable, so its Welcomes are delivered at once (and never
    /// forgotten as orphaned).
    fn remote_room(&self, _room_id: RoomId) -> bool {
        false
    }
    /// Forgets one of `recipient`'s Welcomes that can never be used.
    fn forget(&mut self, recipient: u64, welcome_id: u64) -> impl Future<Output = ()>;
    /// Called with each Welcome just before it is handed over.
    fn delivering(&mut self, _welcome: &Bytes) {}
}

/// Hands the recipient's pending Welcomes to its connection, a page at a
/// time (each read once its predecessor is queued, so a login holds at
/// most one page,
/// [`WELCOMES_PAGE_BYTES_MAX`](crate::store::limits::WELCOMES_PAGE_BYTES_MAX),
/// in memory), each only once its commit is durable (see
/// [`welcome_standing`]). They stay stored: a connection can die before
/// the client keeps them (it looks alive to the server until its idle
/// timeout), so a Welcome is deleted only once its recipient reads the room
/// it joins (see [`super::welcomes_used_by`]) and is delivered again on
/// every authentication until then. Clients ignore a Welcome for a room
/// they are in.
pub async fn deliver_pending_welcomes_with(outbox: &Outbox, source: &mut impl WelcomeSource) {
    let recipient = outbox.sender().0;
    let mut after = None;
    // At most WELCOMES_PER_RECIPIENT_MAX are pending: the pages end.
    loop {
        let page = match source.page(recipient, after).await {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(recipient, %error, "could not read pending welcomes");
                return;
            }
        };
        if page.is_empty() {
            return;
        }
        for welcome in page {
            after = Some(welcome.welcome_id);
            if !deliver_one(outbox, source, recipient, welcome).await {
                return;
            }
        }
    }
}

/// Delivers one Welcome if its commit is durable; false when the
/// connection is gone or the log cannot be read.
async fn deliver_one(
    outbox: &Outbox,
    source: &mut impl WelcomeSource,
    recipient: u64,
    welcome: PendingWelcome,
) -> bool {
    if source.remote_room(welcome.room_id) {
        return hand_over(outbox, source, welcome.welcome).await;
    }
    let log_index = match Frame::decode(&welcome.welcome) {
        Ok(frame) => frame.header().log_index(),
        Err(_) => u64::MAX,
    };
    let entry = match source.entry(welcome.room_id, log_index).await {
        Ok(entry) => entry,
        Err(error) => {
            tracing::warn!(recipient, %error, "could not read the commit of a pending welcome");
            return false;
        }
    };
    match welcome_standing(&welcome.welcome, entry.as_ref()) {
        WelcomeStanding::Deliver => hand_over(outbox, source, welcome.welcome).await,
        WelcomeStanding::NotYetDurable => true,
        WelcomeStanding::Orphaned => {
            tracing::warn!(recipient, room_id = %welcome.room_id, log_index, "forgetting a Welcome whose commit is not in the log");
            source.forget(recipient, welcome.welcome_id).await;
            true
        }
    }
}

/// Hands one Welcome to the connection; false when it is gone.
async fn hand_over(outbox: &Outbox, source: &mut impl WelcomeSource, welcome: Bytes) -> bool {
    outbox.mark_welcomes_delivered();
    source.delivering(&welcome);
    outbox.send(welcome).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::frames::welcome_frame;
    use kalandra_proto::{FrameHeaderBuf, Payload};

    fn commit_entry(log_index: u64, welcome: Option<&[u8]>) -> StoredEntry {
        commit_entry_at(log_index, welcome, 1_000)
    }

    fn commit_entry_at(log_index: u64, welcome: Option<&[u8]>, stamped_ms: u64) -> StoredEntry {
        let payload = Commit {
            commit: vec![1, 2, 3],
            welcome: welcome.map(<[u8]>::to_vec),
            welcome_recipients: if welcome.is_some() { vec![2] } else { vec![] },
            group_info: None,
        };
        let mut header = FrameHeaderBuf::new(Commit::OPCODE);
        header.set_log_index(log_index).set_server_timestamp_ms(stamped_ms);
        let frame = Frame::with_payload(header, &payload).unwrap();
        StoredEntry { room_id: RoomId::default(), log_index, content: EntryContent::Frame(frame.to_bytes()) }
    }

    #[test]
    fn a_welcome_is_delivered_only_when_its_own_commit_is_durable_at_its_index() {
        let welcome = welcome_frame(
            RoomId::default(),
            &Bytes::from_static(b"mls welcome"),
            &Bytes::new(),
            (7, 1_000),
            &[0; 32],
        )
        .unwrap();
        assert_eq!(welcome_standing(&welcome, None), WelcomeStanding::NotYetDurable);
        let ours = commit_entry(7, Some(b"mls welcome"));
        assert_eq!(welcome_standing(&welcome, Some(&ours)), WelcomeStanding::Deliver);
        // After a failed batch, index 7 went to another commit.
        let other = commit_entry(7, Some(b"another welcome"));
        assert_eq!(welcome_standing(&welcome, Some(&other)), WelcomeStanding::Orphaned);
        assert_eq!(welcome_standing(&welcome, Some(&commit_entry(7, None))), WelcomeStanding::Orphaned);
        // An entry of another index is not an answer.
        assert_eq!(
            welcome_standing(&welcome, Some(&commit_entry(6, Some(b"mls welcome")))),
            WelcomeStanding::NotYetDurable
        );
        // The same commit sequenced again at 7 after a failed batch: the
        // Welcome of the first attempt (its head) is not this one's.
        let again = commit_entry_at(7, Some(b"mls welcome"), 2_000);
        assert_eq!(welcome_standing(&welcome, Some(&again)), WelcomeStanding::Orphaned);
    }
}
