//! Every bound of the handover core, named, with the relations between them
//! checked at compile time.

/// Authority records a room may accumulate (its creation plus one per
/// handover or resumed handover). A domain keeps them all, to check which
/// generation sequenced an index; beyond this the room can no longer move.
pub const AUTHORITY_RECORDS_MAX: usize = 256;

/// Records sent in one `Records` message; a domain further behind asks again.
pub const RECORDS_PAGE_MAX: usize = 16;

/// Log entries sent in answer to one `FetchLog`.
pub const LOG_PAGE_ENTRIES_MAX: u64 = 256;

/// The first wait of a client before it resends a frame refused because its
/// room is moving (or its route was stale).
pub const CLIENT_RETRY_DELAY_INITIAL_MS: u64 = 25;

/// The longest wait between two resends of a refused frame.
pub const CLIENT_RETRY_DELAY_MAX_MS: u64 = 2_000;

/// Resends of one frame after which the client gives up and reports the
/// refusal to the application (about 40 s at the longest delay).
pub const CLIENT_ATTEMPTS_MAX: u32 = 24;

const _: () = assert!(RECORDS_PAGE_MAX >= 2, "a page must hold a record and its successor");
const _: () = assert!(RECORDS_PAGE_MAX <= AUTHORITY_RECORDS_MAX);
const _: () = assert!(LOG_PAGE_ENTRIES_MAX >= 1);
const _: () = assert!(CLIENT_RETRY_DELAY_INITIAL_MS > 0);
const _: () = assert!(CLIENT_RETRY_DELAY_INITIAL_MS <= CLIENT_RETRY_DELAY_MAX_MS);
const _: () = assert!(CLIENT_ATTEMPTS_MAX >= 8, "a handover's pause must fit in the attempts");
