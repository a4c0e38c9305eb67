//! One test suite for every [`Store`] implementation: each function takes a
//! fresh store and is run for [`MemoryStore`] and [`RedbStore`] by the
//! `store_suite!` macro below.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kalandra_proto::federation::DomainName;

use super::limits::*;
use super::*;

pub(crate) fn room(n: u8) -> RoomId {
    let mut id = [0u8; 16];
    id[0] = n;
    id[15] = n.wrapping_mul(7);
    RoomId(id)
}

pub(crate) fn frame(room_id: RoomId, log_index: LogIndex, bytes: usize) -> Bytes {
    let mut out = Vec::with_capacity(bytes);
    let seed = u64::from(room_id.0[0]) * 31 + log_index;
    out.extend((0..bytes as u64).map(|i| ((seed + i) % 251).to_le_bytes()[0]));
    Bytes::from(out)
}

pub(crate) fn entry(room_id: RoomId, log_index: LogIndex) -> LogEntry {
    LogEntry { room_id, log_index, frame: frame(room_id, log_index, 40) }
}

/// An entry longer than the clear routing prefix, so that most of it is
/// sealed.
pub(crate) fn long_entry(room_id: RoomId, log_index: LogIndex) -> LogEntry {
    LogEntry { room_id, log_index, frame: frame(room_id, log_index, 200) }
}

fn long_entries(room_id: RoomId, indices: std::ops::Range<LogIndex>) -> Vec<LogEntry> {
    indices.map(|i| long_entry(room_id, i)).collect()
}

fn entries(room_id: RoomId, indices: std::ops::Range<LogIndex>) -> Vec<LogEntry> {
    indices.map(|i| entry(room_id, i)).collect()
}

fn kp(reference: &[u8], body: &str) -> KeyPackageUpload {
    KeyPackageUpload { key_package_ref: reference.to_vec(), key_package: Bytes::from(body.to_owned()) }
}

fn snapshot(log_index: LogIndex) -> RoomMetadata {
    RoomMetadata {
        creator_user_id: 42,
        created_at_ms: 1_700_000_000_000,
        mls_snapshot: Bytes::from_static(b"public group state"),
        mls_snapshot_log_index: log_index,
    }
}

pub(crate) fn empty_store<S: Store>(store: &S) {
    assert_eq!(store.next_log_index(room(1)).unwrap(), 0);
    assert!(store.read_range(room(1), 0, 10).unwrap().is_empty());
    assert!(store.room_heads(None, 10).unwrap().is_empty());
    assert_eq!(store.count_key_packages(1).unwrap(), KeyPackageCount::default());
    assert!(store.claim_key_package(1).unwrap().is_none());
    assert!(store.group_info(room(1)).unwrap().is_none());
    assert!(store.pending_welcomes(1, None).unwrap().is_empty());
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts::default());
    assert!(store.room_metadata(room(1)).unwrap().is_none());
    store.append_batch(&[]).unwrap();
    assert!(store.room_heads(None, 10).unwrap().is_empty());
}

pub(crate) fn append_and_read<S: Store>(store: &S) {
    let a = room(1);
    store.append_batch(&entries(a, 0..5)).unwrap();
    store.append_batch(&entries(a, 5..8)).unwrap();
    assert_eq!(store.next_log_index(a).unwrap(), 8);
    assert_eq!(store.read_range(a, 0, 100).unwrap(), entries(a, 0..8));
    assert_eq!(store.read_range(a, 3, 2).unwrap(), entries(a, 3..5));
    assert_eq!(store.read_range(a, 7, 10).unwrap(), entries(a, 7..8));
    assert!(store.read_range(a, 8, 10).unwrap().is_empty());
    assert!(store.read_range(a, u64::MAX, 10).unwrap().is_empty());
    assert!(store.read_range(a, 0, 0).unwrap().is_empty());
    // A room with a prefix-sharing id is not mixed in.
    let mut near = a;
    near.0[15] ^= 1;
    assert!(store.read_range(near, 0, 10).unwrap().is_empty());
    assert_eq!(store.next_log_index(near).unwrap(), 0);
}

pub(crate) fn append_many_rooms_in_one_batch<S: Store>(store: &S) {
    let (a, b, c) = (room(1), room(2), room(3));
    store.append_batch(&entries(b, 0..2)).unwrap();
    let batch = vec![entry(a, 0), entry(b, 2), entry(a, 1), entry(c, 0), entry(b, 3), entry(a, 2)];
    store.append_batch(&batch).unwrap();
    assert_eq!(store.read_range(a, 0, 10).unwrap(), entries(a, 0..3));
    assert_eq!(store.read_range(b, 0, 10).unwrap(), entries(b, 0..4));
    assert_eq!(store.read_range(c, 0, 10).unwrap(), entries(c, 0..1));
    let heads = store.room_heads(None, 10).unwrap();
    assert_eq!(
        heads,
        vec![
            RoomHead { room_id: a, next_log_index: 3 },
            RoomHead { room_id: b, next_log_index: 4 },
            RoomHead { room_id: c, next_log_index: 1 },
        ]
    );
}

/// Every refused batch leaves every room (also the valid ones in it) as it
/// was.
pub(crate) fn append_refuses_non_dense<S: Store>(store: &S) {
    let (a, b) = (room(1), room(2));
    store.append_batch(&entries(a, 0..3)).unwrap();
    let check_unchanged = |store: &S| {
        assert_eq!(store.read_range(a, 0, 10).unwrap(), entries(a, 0..3));
        assert_eq!(store.next_log_index(a).unwrap(), 3);
        assert_eq!(store.next_log_index(b).unwrap(), 0);
        assert!(store.read_range(b, 0, 10).unwrap().is_empty());
    };
    let cases: Vec<(Vec<LogEntry>, RoomId, LogIndex, LogIndex)> = vec![
        // Gap at the start.
        (vec![entry(b, 0), entry(a, 4)], a, 3, 4),
        // Rewrite of a stored index.
        (vec![entry(b, 0), entry(a, 2)], a, 3, 2),
        // Repeated index.
        (vec![entry(a, 3), entry(a, 3)], a, 4, 3),
        // Gap in the middle.
        (vec![entry(a, 3), entry(a, 4), entry(a, 6)], a, 5, 6),
        // Decreasing.
        (vec![entry(a, 3), entry(a, 4), entry(b, 0), entry(a, 3)], a, 5, 3),
        // New room not starting at 0, after a valid room.
        (vec![entry(a, 3), entry(b, 1)], b, 0, 1),
    ];
    for (batch, bad_room, expected, found) in cases {
        let error = store.append_batch(&batch).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::CallerMisuse);
        assert_eq!(error.offending_room(), Some(bad_room));
        match error {
            AppendError::IndexNotDense { room_id, expected_log_index, found_log_index } => {
                assert_eq!((room_id, expected_log_index, found_log_index), (bad_room, expected, found));
            }
            other => panic!("unexpected error {other:?}"),
        }
        check_unchanged(store);
    }
    // The store is still usable afterwards.
    store.append_batch(&[entry(b, 0), entry(a, 3)]).unwrap();
    assert_eq!(store.next_log_index(a).unwrap(), 4);
}

pub(crate) fn append_refuses_oversized_entry<S: Store>(store: &S) {
    let a = room(1);
    let b = room(2);
    let big = LogEntry { room_id: a, log_index: 0, frame: frame(a, 0, LOG_ENTRY_BYTES_MAX + 1) };
    let error = store.append_batch(&[entry(b, 0), big]).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(matches!(
        error,
        AppendError::EntryTooLarge { room_id, log_index: 0, frame_bytes, frame_bytes_max }
            if room_id == a && frame_bytes == LOG_ENTRY_BYTES_MAX + 1 && frame_bytes_max == LOG_ENTRY_BYTES_MAX
    ));
    assert_eq!(store.next_log_index(b).unwrap(), 0);
    // Exactly the limit is accepted and read back whole.
    let max = LogEntry { room_id: a, log_index: 0, frame: frame(a, 0, LOG_ENTRY_BYTES_MAX) };
    store.append_batch(std::slice::from_ref(&max)).unwrap();
    assert_eq!(store.read_range(a, 0, 1).unwrap(), vec![max]);
}

pub(crate) fn read_range_caps<S: Store>(store: &S) {
    let a = room(1);
    let total = READ_RANGE_ENTRIES_MAX as u64 + 10;
    store.append_batch(&entries(a, 0..total)).unwrap();
    let read = store.read_range(a, 0, usize::MAX).unwrap();
    assert_eq!(read.len(), READ_RANGE_ENTRIES_MAX);
    assert_eq!(read, entries(a, 0..READ_RANGE_ENTRIES_MAX as u64));
    let rest = store.read_range(a, READ_RANGE_ENTRIES_MAX as u64, usize::MAX).unwrap();
    assert_eq!(rest, entries(a, READ_RANGE_ENTRIES_MAX as u64..total));

    // Byte cap: entries of a quarter of the byte budget, five stored.
    let b = room(2);
    let quarter = READ_RANGE_BYTES_MAX / 4;
    let big: Vec<LogEntry> =
        (0..5).map(|i| LogEntry { room_id: b, log_index: i, frame: frame(b, i, quarter) }).collect();
    store.append_batch(&big).unwrap();
    let read = store.read_range(b, 0, 100).unwrap();
    assert_eq!(read, big[..4].to_vec());
    // A single entry larger than what is left of the budget still comes back.
    let c = room(3);
    let huge: Vec<LogEntry> = (0..3)
        .map(|i| LogEntry { room_id: c, log_index: i, frame: frame(c, i, LOG_ENTRY_BYTES_MAX) })
        .collect();
    store.append_batch(&huge).unwrap();
    assert_eq!(READ_RANGE_BYTES_MAX / LOG_ENTRY_BYTES_MAX, 2, "the test assumes two maximal entries fit");
    assert_eq!(store.read_range(c, 0, 100).unwrap(), huge[..2].to_vec());
    assert_eq!(store.read_range(c, 2, 100).unwrap(), huge[2..].to_vec());
}

pub(crate) fn room_heads_paging<S: Store>(store: &S) {
    for n in [5u8, 1, 4, 2, 3] {
        store.append_batch(&entries(room(n), 0..u64::from(n))).unwrap();
    }
    let all = store.room_heads(None, usize::MAX).unwrap();
    let expected: Vec<RoomHead> =
        (1..=5u8).map(|n| RoomHead { room_id: room(n), next_log_index: u64::from(n) }).collect();
    assert_eq!(all, expected);
    assert!(store.room_heads(None, 0).unwrap().is_empty());
    let mut paged = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = store.room_heads(after, 2).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|head| head.room_id);
        paged.extend(page);
    }
    assert_eq!(paged, expected);
    assert!(store.room_heads(Some(room(5)), 10).unwrap().is_empty());
}

pub(crate) fn key_packages_claimed_once<S: Store>(store: &S) {
    let user = 7u64;
    let uploads = vec![kp(b"ref-a", "A"), kp(b"ref-bb", "B"), kp(&[0xff; 64], "C")];
    store.put_key_packages(user, &uploads, Some(Bytes::from_static(b"LR"))).unwrap();
    assert_eq!(
        store.count_key_packages(user).unwrap(),
        KeyPackageCount { ordinary: 3, has_last_resort: true }
    );
    // Neighbouring users (including the extreme ids) are separate.
    store.put_key_packages(user + 1, &[kp(b"ref-a", "other")], None).unwrap();
    store.put_key_packages(u64::MAX, &[kp(b"x", "max")], None).unwrap();
    store.put_key_packages(0, &[kp(b"x", "zero")], None).unwrap();

    let mut claimed = BTreeSet::new();
    for _ in 0..3 {
        let got = store.claim_key_package(user).unwrap().expect("an ordinary package is left");
        assert!(!got.is_last_resort);
        assert!(claimed.insert(got.key_package), "a package was handed out twice");
    }
    let expected: BTreeSet<Bytes> = uploads.iter().map(|u| u.key_package.clone()).collect();
    assert_eq!(claimed, expected);
    assert_eq!(
        store.count_key_packages(user).unwrap(),
        KeyPackageCount { ordinary: 0, has_last_resort: true }
    );
    // The last resort is reusable.
    for _ in 0..2 {
        let got = store.claim_key_package(user).unwrap().unwrap();
        assert_eq!(got, ClaimedKeyPackage { key_package: Bytes::from_static(b"LR"), is_last_resort: true });
    }
    assert_eq!(
        store.count_key_packages(user).unwrap(),
        KeyPackageCount { ordinary: 0, has_last_resort: true }
    );
    // Others untouched.
    assert_eq!(store.count_key_packages(user + 1).unwrap().ordinary, 1);
    assert_eq!(store.claim_key_package(u64::MAX).unwrap().unwrap().key_package, Bytes::from_static(b"max"));
    assert_eq!(store.claim_key_package(0).unwrap().unwrap().key_package, Bytes::from_static(b"zero"));
    assert!(store.claim_key_package(u64::MAX).unwrap().is_none());
    // A user without a last resort runs dry.
    assert_eq!(store.claim_key_package(user + 1).unwrap().unwrap().key_package, Bytes::from_static(b"other"));
    assert!(store.claim_key_package(user + 1).unwrap().is_none());
}

pub(crate) fn key_packages_replace_and_last_resort<S: Store>(store: &S) {
    let user = 3u64;
    store.put_key_packages(user, &[kp(b"r1", "old"), kp(b"r2", "two")], None).unwrap();
    // Same reference replaces the package, does not add one.
    store.put_key_packages(user, &[kp(b"r1", "new")], None).unwrap();
    assert_eq!(
        store.count_key_packages(user).unwrap(),
        KeyPackageCount { ordinary: 2, has_last_resort: false }
    );
    // Nothing to do.
    store.put_key_packages(user, &[], None).unwrap();
    // Last resort alone, then replaced.
    store.put_key_packages(user, &[], Some(Bytes::from_static(b"lr1"))).unwrap();
    store.put_key_packages(user, &[], Some(Bytes::from_static(b"lr2"))).unwrap();
    let mut got = BTreeSet::new();
    got.insert(store.claim_key_package(user).unwrap().unwrap().key_package);
    got.insert(store.claim_key_package(user).unwrap().unwrap().key_package);
    assert_eq!(got, [Bytes::from_static(b"new"), Bytes::from_static(b"two")].into_iter().collect());
    let last = store.claim_key_package(user).unwrap().unwrap();
    assert_eq!(last, ClaimedKeyPackage { key_package: Bytes::from_static(b"lr2"), is_last_resort: true });
}

pub(crate) fn key_packages_refused<S: Store>(store: &S) {
    let user = 9u64;
    let fill: Vec<KeyPackageUpload> =
        (0..KEY_PACKAGES_PER_USER_MAX).map(|i| kp(&(i as u64).to_be_bytes(), "p")).collect();
    store.put_key_packages(user, &fill[..KEY_PACKAGES_PER_USER_MAX - 1], None).unwrap();
    // One over the limit: refused whole, the last resort in it included.
    let error = store
        .put_key_packages(user, &[kp(b"new-1", "x"), kp(b"new-2", "y")], Some(Bytes::from_static(b"lr")))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(matches!(
        error,
        KeyPackageError::TooMany { user_id: 9, stored, added: 2, max }
            if stored == KEY_PACKAGES_PER_USER_MAX - 1 && max == KEY_PACKAGES_PER_USER_MAX
    ));
    let count = store.count_key_packages(user).unwrap();
    assert_eq!(
        count,
        KeyPackageCount { ordinary: KEY_PACKAGES_PER_USER_MAX as u64 - 1, has_last_resort: false }
    );
    // Replacing stored ones plus one new fits exactly.
    store.put_key_packages(user, &fill, None).unwrap();
    assert_eq!(store.count_key_packages(user).unwrap().ordinary, KEY_PACKAGES_PER_USER_MAX as u64);
    // An upload that alone exceeds the limit.
    let mut over = fill.clone();
    over.push(kp(b"one-more", "z"));
    let error = store.put_key_packages(user + 1, &over, None).unwrap_err();
    assert!(matches!(error, KeyPackageError::TooMany { user_id: 10, .. }));
    assert_eq!(store.count_key_packages(user + 1).unwrap(), KeyPackageCount::default());

    let other = 20u64;
    let too_big = Bytes::from(vec![0u8; KEY_PACKAGE_BYTES_MAX + 1]);
    let error = store
        .put_key_packages(
            other,
            &[
                kp(b"ok", "fine"),
                KeyPackageUpload { key_package_ref: b"big".to_vec(), key_package: too_big.clone() },
            ],
            None,
        )
        .unwrap_err();
    assert!(matches!(error, KeyPackageError::PackageTooLarge { bytes, bytes_max }
        if bytes == KEY_PACKAGE_BYTES_MAX + 1 && bytes_max == KEY_PACKAGE_BYTES_MAX));
    let error = store.put_key_packages(other, &[kp(b"ok", "fine")], Some(too_big)).unwrap_err();
    assert!(matches!(error, KeyPackageError::PackageTooLarge { .. }));
    let error = store.put_key_packages(other, &[kp(b"", "empty ref")], None).unwrap_err();
    assert!(matches!(error, KeyPackageError::RefLength { bytes: 0, .. }));
    let error =
        store.put_key_packages(other, &[kp(&[1; KEY_PACKAGE_REF_BYTES_MAX + 1], "long")], None).unwrap_err();
    assert!(matches!(error, KeyPackageError::RefLength { bytes, bytes_max }
        if bytes == KEY_PACKAGE_REF_BYTES_MAX + 1 && bytes_max == KEY_PACKAGE_REF_BYTES_MAX));
    let error = store.put_key_packages(other, &[kp(b"same", "1"), kp(b"same", "2")], None).unwrap_err();
    assert!(matches!(error, KeyPackageError::DuplicateRef));
    for error in [
        KeyPackageError::DuplicateRef,
        KeyPackageError::RefLength { bytes: 0, bytes_max: 1 },
        KeyPackageError::PackageTooLarge { bytes: 2, bytes_max: 1 },
    ] {
        assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    }
    assert_eq!(store.count_key_packages(other).unwrap(), KeyPackageCount::default());
    assert!(store.claim_key_package(other).unwrap().is_none());
}

pub(crate) fn group_info_put_get<S: Store>(store: &S) {
    let a = room(1);
    let v5 = GroupInfoRecord { epoch: 5, group_info: Bytes::from_static(b"gi-5") };
    store.put_group_info(a, &v5).unwrap();
    assert_eq!(store.group_info(a).unwrap(), Some(v5));
    assert!(store.group_info(room(2)).unwrap().is_none());
    // Replacement, also to an earlier epoch (rollback of a voided commit).
    let v4 = GroupInfoRecord { epoch: 4, group_info: Bytes::from_static(b"gi-4") };
    store.put_group_info(a, &v4).unwrap();
    assert_eq!(store.group_info(a).unwrap(), Some(v4.clone()));
    let big = GroupInfoRecord { epoch: 6, group_info: Bytes::from(vec![0u8; GROUP_INFO_BYTES_MAX + 1]) };
    let error = store.put_group_info(a, &big).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(matches!(error, GroupInfoError::TooLarge { bytes, bytes_max }
        if bytes == GROUP_INFO_BYTES_MAX + 1 && bytes_max == GROUP_INFO_BYTES_MAX));
    assert_eq!(store.group_info(a).unwrap(), Some(v4));
}

pub(crate) fn welcomes_two_step<S: Store>(store: &S) {
    let (alice, bob) = (5u64, 6u64);
    let (r1, r2) = (room(1), room(2));
    let pending = |welcome_id, room_id, bytes: &'static [u8]| PendingWelcome {
        welcome_id,
        room_id,
        welcome: Bytes::from_static(bytes),
    };
    let w1 = store.put_welcome(alice, r1, Bytes::from_static(b"w1")).unwrap();
    let wb = store.put_welcome(bob, r1, Bytes::from_static(b"wb")).unwrap();
    let w2 = store.put_welcome(alice, r2, Bytes::from_static(b"w2")).unwrap();
    assert!(w1 < wb && wb < w2, "ids increase in storing order");
    let listed = store.pending_welcomes(alice, None).unwrap();
    assert_eq!(listed, vec![pending(w1, r1, b"w1"), pending(w2, r2, b"w2")]);
    // Listing does not remove; a page starts after the id given.
    assert_eq!(store.pending_welcomes(alice, None).unwrap().len(), 2);
    assert_eq!(store.pending_welcomes(alice, Some(w1)).unwrap(), vec![pending(w2, r2, b"w2")]);
    assert!(store.pending_welcomes(alice, Some(WelcomeId::MAX)).unwrap().is_empty());
    // A Welcome stored after the listing survives the acknowledgement.
    let w3 = store.put_welcome(alice, r1, Bytes::from_static(b"w3")).unwrap();
    assert_eq!(store.delete_welcomes_through(alice, listed[1].welcome_id).unwrap(), 2);
    assert_eq!(store.pending_welcomes(alice, None).unwrap(), vec![pending(w3, r1, b"w3")]);
    assert_eq!(store.delete_welcomes_through(alice, w2).unwrap(), 0);
    assert_eq!(store.delete_welcomes_through(alice, w3).unwrap(), 1);
    assert!(store.pending_welcomes(alice, None).unwrap().is_empty());
    // Ids are never reused, even once a recipient's queue is empty.
    let w4 = store.put_welcome(alice, r1, Bytes::from_static(b"w4")).unwrap();
    assert!(w4 > w3);
    assert_eq!(
        store.delete_welcomes_through(alice, w3).unwrap(),
        0,
        "an old acknowledgement removes nothing new"
    );
    // Deleting by id removes exactly the listed pending ones.
    let w5 = store.put_welcome(alice, r1, Bytes::from_static(b"w5")).unwrap();
    assert_eq!(store.delete_welcomes(alice, &[w4, w3, w4 + 1_000]).unwrap(), 1);
    assert_eq!(store.pending_welcomes(alice, None).unwrap(), vec![pending(w5, r1, b"w5")]);
    assert_eq!(store.delete_welcomes(alice, &[w5]).unwrap(), 1);
    assert_eq!(store.delete_welcomes(alice, &[]).unwrap(), 0);
    // Bob untouched throughout.
    assert_eq!(store.pending_welcomes(bob, None).unwrap(), vec![pending(wb, r1, b"wb")]);
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts { welcomes: 1, pending: 1 });
}

pub(crate) fn welcomes_are_stored_once_for_all_recipients<S: Store>(store: &S) {
    let (alice, bob, carol) = (11, 12, 13);
    let (r1, r2) = (room(1), room(2));
    let welcome = Bytes::from(vec![0x77; 4096]);
    // A repeated recipient counts once.
    let stored = store.put_welcomes(r1, &[alice, bob, carol, alice], welcome.clone()).unwrap();
    let id = stored.welcome_id.expect("stored");
    assert!(stored.full.is_empty());
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts { welcomes: 1, pending: 3 }, "one copy");
    for recipient in [alice, bob, carol] {
        let pending = store.pending_welcomes(recipient, None).unwrap();
        assert_eq!(pending, vec![PendingWelcome { welcome_id: id, room_id: r1, welcome: welcome.clone() }]);
    }
    let other = store.put_welcome(alice, r2, Bytes::from_static(b"other room")).unwrap();
    // The bytes stay while any recipient has them pending.
    assert_eq!(store.delete_welcomes_for_room(alice, r1).unwrap(), 1);
    assert_eq!(store.delete_welcomes_for_room(alice, r1).unwrap(), 0);
    assert_eq!(store.pending_welcomes(alice, None).unwrap()[0].welcome_id, other, "the other room's stays");
    assert_eq!(store.delete_welcomes(bob, &[id]).unwrap(), 1);
    assert_eq!(store.pending_welcomes(carol, None).unwrap()[0].welcome, welcome);
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts { welcomes: 2, pending: 2 });
    // And go with the last.
    assert_eq!(store.delete_welcomes_through(carol, id).unwrap(), 1);
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts { welcomes: 1, pending: 1 });
    assert_eq!(store.delete_welcomes(alice, &[other]).unwrap(), 1);
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts::default());
    // Nobody to store it for: nothing stored.
    assert_eq!(
        store.put_welcomes(r1, &[], welcome).unwrap(),
        StoredWelcome { welcome_id: None, full: vec![] }
    );
    assert_eq!(store.welcome_counts().unwrap(), WelcomeCounts::default());
}

pub(crate) fn welcomes_skip_recipients_whose_queue_is_full<S: Store>(store: &S) {
    let (alice, bob, carol) = (21, 22, 23);
    for _ in 0..WELCOMES_PER_RECIPIENT_MAX {
        store.put_welcome(carol, room(1), Bytes::from_static(b"c")).unwrap();
    }
    let before = store.welcome_counts().unwrap();
    let stored = store.put_welcomes(room(2), &[alice, carol, bob], Bytes::from_static(b"x")).unwrap();
    assert_eq!(stored.full, vec![carol]);
    let id = stored.welcome_id.expect("stored for the others");
    assert_eq!(store.pending_welcomes(alice, None).unwrap()[0].welcome_id, id);
    assert_eq!(store.pending_welcomes(bob, None).unwrap()[0].welcome_id, id);
    let carol_pending = store.pending_welcome_count(carol);
    assert_eq!(carol_pending, WELCOMES_PER_RECIPIENT_MAX, "nothing more for carol");
    assert_eq!(
        store.welcome_counts().unwrap(),
        WelcomeCounts { welcomes: before.welcomes + 1, pending: before.pending + 2 }
    );
    // Only full recipients: nothing stored, and the id is not used up.
    let stored = store.put_welcomes(room(2), &[carol], Bytes::from_static(b"y")).unwrap();
    assert_eq!(stored, StoredWelcome { welcome_id: None, full: vec![carol] });
    assert!(store.put_welcome(alice, room(3), Bytes::from_static(b"z")).unwrap() > id);
}

pub(crate) fn welcomes_are_read_a_page_at_a_time<S: Store>(store: &S) {
    let alice = 31;
    let count = 2 * WELCOMES_PAGE_ENTRIES_MAX + 3;
    let ids: Vec<WelcomeId> = (0..count)
        .map(|i| store.put_welcome(alice, room(1), Bytes::from(format!("w{i}"))).unwrap())
        .collect();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.pending_welcomes(alice, after).unwrap();
        assert!(page.len() <= WELCOMES_PAGE_ENTRIES_MAX);
        let Some(last) = page.last() else { break };
        after = Some(last.welcome_id);
        seen.extend(page.iter().map(|welcome| welcome.welcome_id));
    }
    assert_eq!(seen, ids, "every Welcome once, in order");
    // The byte budget: the largest Welcome frame is stored, and a page holds
    // at least one Welcome and never more than its budget after the first.
    let bob = 32;
    let largest = Bytes::from(vec![5u8; WELCOME_BYTES_MAX]);
    let first = store.put_welcome(bob, room(1), largest.clone()).unwrap();
    store.put_welcome(bob, room(1), Bytes::from(vec![6u8; WELCOMES_PAGE_BYTES_MAX / 2])).unwrap();
    let page = store.pending_welcomes(bob, None).unwrap();
    assert_eq!(page.len(), 1, "the budget ends the page");
    assert_eq!((page[0].welcome_id, page[0].welcome.len()), (first, WELCOME_BYTES_MAX));
    assert_eq!(store.pending_welcomes(bob, Some(first)).unwrap().len(), 1);
}

pub(crate) fn welcomes_refused<S: Store>(store: &S) {
    let carol = 11u64;
    for i in 0..WELCOMES_PER_RECIPIENT_MAX {
        store.put_welcome(carol, room(1), Bytes::from(format!("w{i}"))).unwrap();
    }
    let error = store.put_welcome(carol, room(1), Bytes::from_static(b"one too many")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(
        matches!(error, WelcomeError::TooMany { recipient_user_id: 11, max } if max == WELCOMES_PER_RECIPIENT_MAX)
    );
    assert_eq!(store.pending_welcome_count(carol), WELCOMES_PER_RECIPIENT_MAX);
    // Others are not affected by carol's full queue.
    store.put_welcome(carol + 1, room(1), Bytes::from_static(b"ok")).unwrap();
    let error =
        store.put_welcome(carol + 1, room(1), Bytes::from(vec![0u8; WELCOME_BYTES_MAX + 1])).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(matches!(error, WelcomeError::TooLarge { bytes, bytes_max }
        if bytes == WELCOME_BYTES_MAX + 1 && bytes_max == WELCOME_BYTES_MAX));
    assert_eq!(store.pending_welcomes(carol + 1, None).unwrap().len(), 1);
    // After delivery, there is room again.
    assert_eq!(store.delete_welcomes_through(carol, WelcomeId::MAX).unwrap(), WELCOMES_PER_RECIPIENT_MAX);
    store.put_welcome(carol, room(1), Bytes::from_static(b"again")).unwrap();
}

/// Helper for the suite: how many Welcomes `recipient` has pending (all pages).
trait PendingWelcomeCount {
    fn pending_welcome_count(&self, recipient: UserId) -> usize;
}

impl<S: Store> PendingWelcomeCount for S {
    fn pending_welcome_count(&self, recipient: UserId) -> usize {
        let (mut count, mut after) = (0, None);
        loop {
            let page = self.pending_welcomes(recipient, after).unwrap();
            let Some(last) = page.last() else { return count };
            after = Some(last.welcome_id);
            count += page.len();
        }
    }
}

pub(crate) fn room_metadata_put_get<S: Store>(store: &S) {
    let a = room(1);
    // A new room: snapshot at index 0.
    store.put_room_metadata(a, &snapshot(0)).unwrap();
    assert_eq!(store.room_metadata(a).unwrap(), Some(snapshot(0)));
    let error = store.put_room_metadata(a, &snapshot(1)).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(
        matches!(error, RoomMetadataError::SnapshotAheadOfLog { room_id, snapshot_log_index: 1, next_log_index: 0 }
        if room_id == a)
    );
    store.append_batch(&entries(a, 0..3)).unwrap();
    store.put_room_metadata(a, &snapshot(3)).unwrap();
    assert_eq!(store.room_metadata(a).unwrap(), Some(snapshot(3)));
    assert!(matches!(
        store.put_room_metadata(a, &snapshot(4)).unwrap_err(),
        RoomMetadataError::SnapshotAheadOfLog { snapshot_log_index: 4, next_log_index: 3, .. }
    ));
    let mut big = snapshot(2);
    big.mls_snapshot = Bytes::from(vec![0u8; MLS_SNAPSHOT_BYTES_MAX + 1]);
    let error = store.put_room_metadata(a, &big).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert!(matches!(error, RoomMetadataError::SnapshotTooLarge { bytes, bytes_max }
        if bytes == MLS_SNAPSHOT_BYTES_MAX + 1 && bytes_max == MLS_SNAPSHOT_BYTES_MAX));
    assert_eq!(store.room_metadata(a).unwrap(), Some(snapshot(3)));
    assert!(store.room_metadata(room(2)).unwrap().is_none());
}

/// Random interleaving of valid and invalid batches over several rooms,
/// checked against a model after every step. The seed is fixed.
pub(crate) fn randomized_interleaving<S: Store>(store: &S) {
    const ROOMS: u8 = 6;
    const STEPS: usize = 300;
    let mut rng = StdRng::seed_from_u64(0x6b61_6c61_6e64_7261);
    let mut model: HashMap<RoomId, Vec<Bytes>> = HashMap::new();
    let mut refused = 0usize;
    for step in 0..STEPS {
        let mut batch = Vec::new();
        let mut next: HashMap<RoomId, u64> = HashMap::new();
        for _ in 0..rng.gen_range(1..12) {
            let room_id = room(rng.gen_range(1..=ROOMS));
            let index =
                next.entry(room_id).or_insert_with(|| model.get(&room_id).map_or(0, |log| log.len() as u64));
            let bytes = rng.gen_range(0..300);
            batch.push(LogEntry { room_id, log_index: *index, frame: frame(room_id, *index, bytes) });
            *index += 1;
        }
        // One batch in five gets one index corrupted.
        let corrupt = rng.gen_bool(0.2);
        if corrupt {
            let victim = rng.gen_range(0..batch.len());
            let delta = rng.gen_range(1..3u64);
            let entry = &mut batch[victim];
            entry.log_index = if entry.log_index >= delta && rng.gen_bool(0.5) {
                entry.log_index - delta
            } else {
                entry.log_index + delta
            };
        }
        match store.append_batch(&batch) {
            Ok(()) => {
                assert!(!corrupt, "step {step}: corrupted batch accepted");
                for entry in &batch {
                    model.entry(entry.room_id).or_default().push(entry.frame.clone());
                }
            }
            Err(error) => {
                assert!(corrupt, "step {step}: valid batch refused: {error}");
                assert_eq!(error.kind(), ErrorKind::CallerMisuse);
                refused += 1;
            }
        }
        // Check a random read of a random room, and every head.
        let room_id = room(rng.gen_range(1..=ROOMS));
        let log = model.get(&room_id).cloned().unwrap_or_default();
        let from = rng.gen_range(0..=log.len());
        let count = rng.gen_range(0..20);
        let read = store.read_range(room_id, from as u64, count).unwrap();
        let expected: Vec<LogEntry> = log[from..]
            .iter()
            .take(count)
            .enumerate()
            .map(|(i, frame)| LogEntry { room_id, log_index: (from + i) as u64, frame: frame.clone() })
            .collect();
        assert_eq!(read, expected, "step {step}");
        for n in 1..=ROOMS {
            let len = model.get(&room(n)).map_or(0, Vec::len) as u64;
            assert_eq!(store.next_log_index(room(n)).unwrap(), len, "step {step}");
        }
    }
    assert!(refused > 20, "the corruption branch ran ({refused} refused)");
    for (room_id, log) in &model {
        let read = store.read_range(*room_id, 0, usize::MAX).unwrap();
        assert_eq!(read.len(), log.len());
        assert!(read.iter().zip(log).all(|(entry, frame)| entry.frame() == Some(frame)));
    }
    let heads = store.room_heads(None, usize::MAX).unwrap();
    assert_eq!(heads.len(), model.values().filter(|log| !log.is_empty()).count());
}

fn redaction(erased_at_ms: u64) -> Redaction {
    Redaction { erased_at_ms, cause: ErasureCause::Sender { actor: 42 } }
}

pub(crate) fn redact_erases_content_and_keeps_the_index<S: Store>(store: &S) {
    let (a, b) = (room(1), room(2));
    store.append_batch(&long_entries(a, 0..5)).unwrap();
    store.append_batch(&long_entries(b, 0..2)).unwrap();
    let keys_before: Vec<_> = (0..5).map(|i| store.data_key(a, i).unwrap().expect("a live key")).collect();
    assert_eq!(store.redact(a, &[2], &redaction(7)).unwrap(), vec![RedactOutcome::Erased]);
    let read = store.read_range(a, 0, 10).unwrap();
    assert_eq!(read.len(), 5, "the index stays");
    for (i, stored) in read.iter().enumerate() {
        assert_eq!(stored.log_index, i as u64);
        if i == 2 {
            let EntryContent::Erased(erasure) = &stored.content else { panic!("index 2 not erased") };
            let original = long_entry(a, 2).frame;
            assert_eq!(erasure.routing.as_ref(), &original[..sealing::ROUTING_PREFIX_BYTES]);
            assert_eq!(erasure.redaction, redaction(7));
            // The digest of the erased frame stays: the log's hash chain runs through it.
            assert_eq!(erasure.frame_digest, Some(kalandra_proto::chain::frame_digest(&original)));
            assert_eq!(stored.frame(), None);
        } else {
            assert_eq!(*stored, long_entry(a, i as u64));
        }
    }
    assert_eq!(store.data_key(a, 2).unwrap(), None, "the key is destroyed");
    for i in [0, 1, 3, 4] {
        assert_eq!(store.data_key(a, i).unwrap().as_ref(), Some(&keys_before[usize::try_from(i).unwrap()]));
    }
    // Idempotent: a second erasure changes nothing, also not the record.
    assert_eq!(store.redact(a, &[2], &redaction(8)).unwrap(), vec![RedactOutcome::AlreadyErased]);
    assert_eq!(store.read_range(a, 2, 1).unwrap(), read[2..3].to_vec());
    // One index twice in one call: erased once.
    assert_eq!(
        store.redact(a, &[3, 3], &redaction(9)).unwrap(),
        vec![RedactOutcome::Erased, RedactOutcome::AlreadyErased]
    );
    // The log goes on densely; the other room is untouched.
    assert_eq!(store.next_log_index(a).unwrap(), 5);
    store.append_batch(&long_entries(a, 5..6)).unwrap();
    assert_eq!(store.read_range(a, 4, 10).unwrap(), long_entries(a, 4..6));
    assert_eq!(store.read_range(b, 0, 10).unwrap(), long_entries(b, 0..2));
    // Keys are distinct per entry.
    let mut distinct = keys_before.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 5);
}

pub(crate) fn erasures_are_journaled_per_room_and_a_replica_keeps_its_cursor<S: Store>(store: &S) {
    let (a, b) = (room(1), room(2));
    store.append_batch(&long_entries(a, 0..6)).unwrap();
    store.append_batch(&long_entries(b, 0..3)).unwrap();
    assert_eq!(store.erasures_after(a, 0, 10).unwrap(), vec![]);
    store.redact(a, &[1, 1, 4], &redaction(1)).unwrap();
    // Erasing nothing new journals nothing.
    store.redact(a, &[4], &redaction(2)).unwrap();
    store.redact(b, &[2], &redaction(3)).unwrap();
    store.redact(a, &[0], &redaction(4)).unwrap();
    let journal = |room_id, after| store.erasures_after(room_id, after, 10).unwrap();
    assert_eq!(
        journal(a, 0),
        vec![
            JournaledErasure { seq: 1, log_indices: vec![1, 4] },
            JournaledErasure { seq: 2, log_indices: vec![0] },
        ]
    );
    assert_eq!(journal(a, 1), vec![JournaledErasure { seq: 2, log_indices: vec![0] }]);
    assert_eq!(journal(a, 2), vec![]);
    assert_eq!(journal(b, 0), vec![JournaledErasure { seq: 1, log_indices: vec![2] }]);
    assert_eq!(store.erasures_after(a, 0, 1).unwrap().len(), 1, "the page is capped");

    // A replica's cursor moves record by record with its erasures, also
    // when there is nothing left to erase; never past a record not applied.
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 0);
    let authority = Redaction { erased_at_ms: 9, cause: ErasureCause::Authority };
    assert_eq!(store.redact_replicated(b, &[1], &authority, 2).unwrap(), vec![RedactOutcome::Erased]);
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 0, "record 1 is not applied yet");
    assert_eq!(store.redact_replicated(b, &[0], &authority, 1).unwrap(), vec![RedactOutcome::Erased]);
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 1);
    assert_eq!(store.redact_replicated(b, &[1], &authority, 2).unwrap(), vec![RedactOutcome::AlreadyErased]);
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 2);
    store.redact_replicated(b, &[], &authority, 3).unwrap();
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 3);
    store.redact_replicated(b, &[], &authority, 3).unwrap();
    store.redact_replicated(b, &[], &authority, 1).unwrap();
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 3, "never backwards");
    let EntryContent::Erased(erasure) = &store.read_range(b, 0, 1).unwrap()[0].content else {
        panic!("not erased")
    };
    assert_eq!(erasure.redaction, authority);
    // A refused redaction moves nothing.
    assert!(store.redact_replicated(b, &[3], &authority, 4).is_err());
    assert_eq!(store.replica_erasure_cursor(b).unwrap(), 3);
    assert_eq!(store.replica_erasure_cursor(a).unwrap(), 0);
}

pub(crate) fn redact_refuses_without_erasing_anything<S: Store>(store: &S) {
    let a = room(1);
    let missing = store.redact(a, &[0], &redaction(1)).unwrap_err();
    assert!(matches!(missing, RedactError::UnknownRoom { room_id } if room_id == a), "{missing}");
    assert_eq!(missing.kind(), ErrorKind::CallerMisuse);
    store.append_batch(&long_entries(a, 0..3)).unwrap();
    let beyond = store.redact(a, &[1, 3], &redaction(1)).unwrap_err();
    assert!(
        matches!(beyond, RedactError::IndexOutOfRange { log_index: 3, next_log_index: 3, .. }),
        "{beyond}"
    );
    let too_many = vec![0; REDACT_ENTRIES_PER_CALL_MAX + 1];
    assert!(matches!(store.redact(a, &too_many, &redaction(1)), Err(RedactError::TooMany { .. })));
    // Index 1 of the refused call is intact.
    assert_eq!(store.read_range(a, 0, 10).unwrap(), long_entries(a, 0..3));
    assert!(store.data_key(a, 1).unwrap().is_some());
    assert_eq!(store.redact(a, &[], &redaction(1)).unwrap(), vec![]);
}

pub(crate) fn retention_settings<S: Store>(store: &S) {
    let (a, b) = (room(1), room(2));
    assert!(matches!(store.set_retention(a, Some(60_000)), Err(RetentionError::UnknownRoom { .. })));
    store.append_batch(&long_entries(a, 0..4)).unwrap();
    store.append_batch(&long_entries(b, 0..1)).unwrap();
    let short = store.set_retention(a, Some(RETENTION_MS_MIN - 1)).unwrap_err();
    assert!(matches!(short, RetentionError::PeriodTooShort { .. }));
    assert_eq!(short.kind(), ErrorKind::CallerMisuse);
    assert_eq!(store.retention(a).unwrap(), None);
    store.set_retention(a, Some(60_000)).unwrap();
    store.set_retention(b, Some(RETENTION_MS_MIN)).unwrap();
    let expected_a = RoomRetention { room_id: a, retention_ms: 60_000, swept_next_log_index: 0 };
    assert_eq!(store.retention(a).unwrap(), Some(expected_a));
    store.advance_retention(a, 3).unwrap();
    // Replacing the period keeps the sweep position.
    store.set_retention(a, Some(90_000)).unwrap();
    let expected_a = RoomRetention { room_id: a, retention_ms: 90_000, swept_next_log_index: 3 };
    assert_eq!(store.retention(a).unwrap(), Some(expected_a));
    for bad in [2, 5] {
        let error = store.advance_retention(a, bad).unwrap_err();
        assert!(matches!(error, RetentionError::SweepPosition { .. }), "{error}");
    }
    store.advance_retention(a, 4).unwrap();
    let all = store.retention_rooms(None, 10).unwrap();
    assert_eq!(all.iter().map(|r| r.room_id).collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(store.retention_rooms(Some(a), 10).unwrap().len(), 1);
    assert_eq!(store.retention_rooms(None, 1).unwrap().len(), 1);
    assert!(store.retention_rooms(None, 0).unwrap().is_empty());
    store.set_retention(a, None).unwrap();
    assert_eq!(store.retention(a).unwrap(), None);
    // Advancing a room without retention is a no-op, not an error.
    store.advance_retention(a, 4).unwrap();
    assert_eq!(store.retention_rooms(None, 10).unwrap().len(), 1);
}

macro_rules! store_suite {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[test]
                    fn $name() {
                        let (store, _guard) = $make;
                        super::$name(&store);
                    }
                };
            }

            case!(empty_store);
            case!(append_and_read);
            case!(append_many_rooms_in_one_batch);
            case!(append_refuses_non_dense);
            case!(append_refuses_oversized_entry);
            case!(read_range_caps);
            case!(room_heads_paging);
            case!(key_packages_claimed_once);
            case!(key_packages_replace_and_last_resort);
            case!(key_packages_refused);
            case!(group_info_put_get);
            case!(welcomes_two_step);
            case!(welcomes_refused);
            case!(welcomes_are_stored_once_for_all_recipients);
            case!(welcomes_skip_recipients_whose_queue_is_full);
            case!(welcomes_are_read_a_page_at_a_time);
            case!(room_metadata_put_get);
            case!(randomized_interleaving);
            case!(moderation_state_and_audit_chain);
            case!(redact_erases_content_and_keeps_the_index);
            case!(redact_refuses_without_erasing_anything);
            case!(erasures_are_journaled_per_room_and_a_replica_keeps_its_cursor);
            case!(retention_settings);
            case!(audited_redaction_and_retention_extend_the_chain);
            case!(remote_users_and_rooms_are_recorded_and_paged);
            case!(handed_out_packages_are_recorded_bounded_and_expire);
        }
    };
}

pub(crate) fn moderation_state_and_audit_chain<S: Store>(store: &S) {
    use crate::room::audit::{self, ActorKind, AuditAction, AuditEvent, AuditRecord};
    use crate::room::roles::Role;
    let event = |action, target| AuditEvent {
        time_ms: 5,
        actor_kind: ActorKind::Operator,
        actor_id: None,
        action,
        room: Some(room(1).to_string()),
        target: Some(target),
        role: None,
        reason: None,
        until_ms: None,
        log_index: None,
        retention_ms: None,
    };
    assert_eq!(store.audit_head().unwrap(), None);
    assert_eq!(store.room_moderation(room(1)).unwrap(), RoomModeration::default());
    let grant = ModerationChange::SetRole { room_id: room(1), user_id: 7, role: Some(Role::Moderator) };
    let first = store.record_moderation(&grant, &event(AuditAction::GrantRole, 7)).unwrap();
    assert_eq!(first.seq, 0);
    let ban = ModerationChange::SetBan {
        room_id: room(1),
        user_id: 9,
        ban: Some(StoredBan { until_ms: Some(99) }),
    };
    store.record_moderation(&ban, &event(AuditAction::Ban, 9)).unwrap();
    let forever =
        ModerationChange::SetBan { room_id: room(1), user_id: 8, ban: Some(StoredBan { until_ms: None }) };
    store.record_moderation(&forever, &event(AuditAction::Ban, 8)).unwrap();
    let other_room = ModerationChange::SetRole { room_id: room(2), user_id: 7, role: Some(Role::Moderator) };
    store.record_moderation(&other_room, &event(AuditAction::GrantRole, 7)).unwrap();
    let kick = store.record_moderation(&ModerationChange::None, &event(AuditAction::Kick, 9)).unwrap();
    assert_eq!(kick.seq, 4);

    let state = store.room_moderation(room(1)).unwrap();
    assert_eq!(state.roles, vec![(7, Role::Moderator)]);
    assert_eq!(state.bans, vec![(8, StoredBan { until_ms: None }), (9, StoredBan { until_ms: Some(99) })]);
    let lift = ModerationChange::SetBan { room_id: room(1), user_id: 9, ban: None };
    store.record_moderation(&lift, &event(AuditAction::Unban, 9)).unwrap();
    let revoke = ModerationChange::SetRole { room_id: room(1), user_id: 7, role: None };
    store.record_moderation(&revoke, &event(AuditAction::RevokeRole, 7)).unwrap();
    let state = store.room_moderation(room(1)).unwrap();
    assert!(state.roles.is_empty());
    assert_eq!(state.bans, vec![(8, StoredBan { until_ms: None })]);
    assert_eq!(store.room_moderation(room(2)).unwrap().roles, vec![(7, Role::Moderator)]);

    // The stored records form a chain that ends at the head.
    let records = store.audit_records(0, 100).unwrap();
    assert_eq!(records.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (0..7).collect::<Vec<_>>());
    let decoded: Vec<AuditRecord> =
        records.iter().map(|(_, bytes)| AuditRecord::decode(bytes).unwrap()).collect();
    assert_eq!(decoded[0], first);
    let head = store.audit_head().unwrap();
    assert_eq!(head.map(|h| h.seq), Some(6));
    assert_eq!(audit::verify(&decoded, head).unwrap().records, 7);
    assert_eq!(store.audit_records(5, 1).unwrap().len(), 1);
    assert!(store.audit_records(7, 10).unwrap().is_empty());
}

pub(crate) fn audited_redaction_and_retention_extend_the_chain<S: Store>(store: &S) {
    use crate::room::audit::{self, ActorKind, AuditAction, AuditEvent, AuditRecord};
    let event = |action, log_index, retention_ms| AuditEvent {
        time_ms: 9,
        actor_kind: ActorKind::Operator,
        actor_id: None,
        action,
        room: Some(room(1).to_string()),
        target: None,
        role: None,
        reason: None,
        until_ms: None,
        log_index,
        retention_ms,
    };
    let (a, b) = (room(1), room(2));
    let redact = event(AuditAction::Redact, Some(1), None);
    // Refused calls append nothing.
    assert!(matches!(
        store.redact_audited(a, &[1], &redaction(3), &redact),
        Err(RedactError::UnknownRoom { .. })
    ));
    let set = event(AuditAction::SetRetention, None, Some(60_000));
    assert!(matches!(
        store.set_retention_audited(a, Some(60_000), &set),
        Err(RetentionError::UnknownRoom { .. })
    ));
    store.append_batch(&long_entries(a, 0..3)).unwrap();
    store.append_batch(&long_entries(b, 0..1)).unwrap();
    assert!(matches!(
        store.redact_audited(a, &[3], &redaction(3), &redact),
        Err(RedactError::IndexOutOfRange { .. })
    ));
    let short = event(AuditAction::SetRetention, None, Some(RETENTION_MS_MIN - 1));
    assert!(store.set_retention_audited(a, Some(RETENTION_MS_MIN - 1), &short).is_err());
    assert_eq!(store.audit_head().unwrap(), None, "nothing was audited");

    let (outcomes, first) = store.redact_audited(a, &[1], &redaction(3), &redact).unwrap();
    assert_eq!(outcomes, vec![RedactOutcome::Erased]);
    let first = first.expect("an erasure is audited");
    assert_eq!((first.seq, first.action, first.log_index), (0, AuditAction::Redact, Some(1)));
    assert!(store.data_key(a, 1).unwrap().is_none());
    // Erasing it again erases nothing and audits nothing.
    let (outcomes, again) = store.redact_audited(a, &[1], &redaction(4), &redact).unwrap();
    assert_eq!((outcomes, again), (vec![RedactOutcome::AlreadyErased], None));
    let record = store.set_retention_audited(a, Some(60_000), &set).unwrap();
    assert_eq!((record.seq, record.retention_ms), (1, Some(60_000)));
    assert_eq!(store.retention(a).unwrap().map(|r| r.retention_ms), Some(60_000));
    let clear = event(AuditAction::ClearRetention, None, None);
    assert_eq!(store.set_retention_audited(a, None, &clear).unwrap().seq, 2);
    assert_eq!(store.retention(a).unwrap(), None);
    // A moderation act continues the same chain.
    let kick = event(AuditAction::Kick, None, None);
    assert_eq!(store.record_moderation(&ModerationChange::None, &kick).unwrap().seq, 3);

    let records: Vec<AuditRecord> = store
        .audit_records(0, 10)
        .unwrap()
        .iter()
        .map(|(_, bytes)| AuditRecord::decode(bytes).unwrap())
        .collect();
    assert_eq!(records[0], first);
    assert_eq!(audit::verify(&records, store.audit_head().unwrap()).unwrap().records, 4);
}

fn remote_users_and_rooms_are_recorded_and_paged<S: Store>(store: &S) {
    let (b, c) = (DomainName::parse("b.test").unwrap(), DomainName::parse("c.test").unwrap());
    assert_eq!(store.remote_user_home(7).unwrap(), None);
    store.record_remote_user(7, &b).unwrap();
    store.record_remote_user(3, &b).unwrap();
    store.record_remote_user(9, &c).unwrap();
    store.record_remote_user(9, &b).unwrap();
    assert_eq!(store.remote_user_home(7).unwrap(), Some(b.clone()));
    assert_eq!(store.remote_user_home(9).unwrap(), Some(b.clone()), "a later record replaces");
    let users: Vec<UserId> = store.remote_users(None, 10).unwrap().into_iter().map(|(u, _)| u).collect();
    assert_eq!(users, vec![3, 7, 9], "in id order");
    let page = store.remote_users(Some(3), 1).unwrap();
    assert_eq!(page, vec![(7, b.clone())], "after 3, at most one");
    assert!(store.remote_users(Some(9), 10).unwrap().is_empty());

    assert!(store.remote_rooms().unwrap().is_empty());
    store.record_remote_room(room(2), &b).unwrap();
    store.record_remote_room(room(2), &b).unwrap();
    store.record_remote_room(room(1), &c).unwrap();
    let error = store.record_remote_room(room(2), &c).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Internal, "a room keeps its authority");
    assert_eq!(store.remote_rooms().unwrap(), vec![(room(1), c), (room(2), b)]);
}

/// When `user_id`'s package `key_package_ref` was recorded as handed out.
fn handed_out_claim<S: Store>(store: &S, user_id: UserId, key_package_ref: &[u8]) -> Option<u64> {
    let claims = store.handed_out_claims(user_id).unwrap();
    assert!(claims.len() <= HANDED_OUT_CLAIMS_PER_USER_MAX);
    claims.into_iter().find(|claim| claim.key_package_ref == key_package_ref).map(|claim| claim.claimed_at_ms)
}

fn handed_out_packages_are_recorded_bounded_and_expire<S: Store>(store: &S) {
    let start_ms = 1_000_000;
    assert!(store.handed_out_claims(7).unwrap().is_empty());
    store.record_handed_out_claims(&[(7, b"ref-a".to_vec())], start_ms).unwrap();
    store.record_handed_out_claims(&[(8, b"ref-a".to_vec())], start_ms + 1).unwrap();
    assert_eq!(
        store.handed_out_claims(7).unwrap(),
        vec![HandedOutClaim { key_package_ref: b"ref-a".to_vec(), claimed_at_ms: start_ms }]
    );
    assert_eq!(handed_out_claim(store, 8, b"ref-a"), Some(start_ms + 1), "by user and reference");
    assert_eq!(handed_out_claim(store, 7, b"ref-b"), None);
    store.record_handed_out_claims(&[(7, b"ref-a".to_vec())], start_ms + 5).unwrap();
    assert_eq!(handed_out_claim(store, 7, b"ref-a"), Some(start_ms + 5), "a claim again renews");
    assert_eq!(store.handed_out_claims(7).unwrap().len(), 1);
    assert!(matches!(
        store.record_handed_out_claims(&[(7, b"".to_vec())], start_ms),
        Err(KeyPackageError::RefLength { .. })
    ));
    assert!(matches!(
        store.record_handed_out_claims(&[(7, [1; 65].to_vec())], start_ms),
        Err(KeyPackageError::RefLength { .. })
    ));

    // Several in one call; a bad reference among them writes nothing.
    let bad = store.record_handed_out_claims(&[(9, b"ref-c".to_vec()), (9, Vec::new())], start_ms);
    assert!(matches!(bad, Err(KeyPackageError::RefLength { .. })));
    assert!(store.handed_out_claims(9).unwrap().is_empty(), "nothing written");
    store.record_handed_out_claims(&[(9, b"ref-c".to_vec()), (10, b"ref-d".to_vec())], start_ms).unwrap();
    assert_eq!(
        (handed_out_claim(store, 9, b"ref-c"), handed_out_claim(store, 10, b"ref-d")),
        (Some(start_ms), Some(start_ms))
    );

    // Full: the oldest record of the user goes, other users' stay.
    for n in 0..HANDED_OUT_CLAIMS_PER_USER_MAX as u64 {
        store.record_handed_out_claims(&[(7, n.to_be_bytes().to_vec())], start_ms + 10 + n).unwrap();
    }
    assert_eq!(handed_out_claim(store, 7, b"ref-a"), None, "the oldest dropped");
    assert_eq!(handed_out_claim(store, 7, &0u64.to_be_bytes()), Some(start_ms + 10));
    store.record_handed_out_claims(&[(7, b"one-more".to_vec())], start_ms + 10_000).unwrap();
    assert_eq!(handed_out_claim(store, 7, &0u64.to_be_bytes()), None);
    assert_eq!(handed_out_claim(store, 7, &1u64.to_be_bytes()), Some(start_ms + 11));
    assert_eq!(store.handed_out_claims(7).unwrap().len(), HANDED_OUT_CLAIMS_PER_USER_MAX);
    assert_eq!(handed_out_claim(store, 8, b"ref-a"), Some(start_ms + 1));

    // Expired records go at the user's next claim.
    let later_ms = start_ms + 5_000 + HANDED_OUT_CLAIM_RECORD_MS;
    store.record_handed_out_claims(&[(7, b"late".to_vec())], later_ms).unwrap();
    assert_eq!(store.handed_out_claims(7).unwrap().len(), 2, "only those within the record time stay");
    assert_eq!(handed_out_claim(store, 7, b"one-more"), Some(start_ms + 10_000));
    assert_eq!(handed_out_claim(store, 7, b"late"), Some(later_ms));
    assert_eq!(
        handed_out_claim(store, 8, b"ref-a"),
        Some(start_ms + 1),
        "another user's stays until its claim"
    );
}

store_suite!(memory_store, (MemoryStore::new(), ()));
store_suite!(redb_store, {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path().join("store.redb")).expect("open redb");
    (store, dir)
});

#[test]
fn validate_batch_reports_index_overflow() {
    let a = room(1);
    let batch = [LogEntry { room_id: a, log_index: u64::MAX, frame: Bytes::new() }];
    let error = validate_batch(&batch, |_| Ok::<_, AppendError>(u64::MAX)).unwrap_err();
    assert!(matches!(error, AppendError::IndexOverflow { room_id } if room_id == a));
    assert_eq!(error.kind(), ErrorKind::CallerMisuse);
    assert_eq!(error.offending_room(), Some(a));
    // The one before the last index is fine.
    let batch = [LogEntry { room_id: a, log_index: u64::MAX - 1, frame: Bytes::new() }];
    let next = validate_batch(&batch, |_| Ok::<_, AppendError>(u64::MAX - 1)).unwrap();
    assert_eq!(next.get(&a), Some(&u64::MAX));
}

fn stored(entry: LogEntry) -> StoredEntry {
    StoredEntry {
        room_id: entry.room_id,
        log_index: entry.log_index,
        content: EntryContent::Frame(entry.frame),
    }
}

#[test]
fn check_read_dense_reports_gaps_and_strangers() {
    let a = room(1);
    let entry = |room_id, log_index| stored(entry(room_id, log_index));
    assert!(check_read_dense(a, 3, &[entry(a, 3), entry(a, 4)]).is_ok());
    assert!(check_read_dense(a, 3, &[]).is_ok());
    assert!(check_read_dense(a, 3, &[entry(a, 4)]).is_err());
    assert!(check_read_dense(a, 3, &[entry(a, 3), entry(a, 5)]).is_err());
    assert!(check_read_dense(a, 0, &[entry(room(2), 0)]).is_err());
    let error: ReadError = check_read_dense(a, 0, &[entry(a, 1)]).unwrap_err().into();
    assert_eq!(error.kind(), ErrorKind::Internal);
}

#[test]
fn error_kinds_of_storage_and_internal_failures() {
    let storage = StorageFailure::new("test", std::io::Error::other("disk on fire"));
    assert!(storage.to_string().contains("disk on fire"));
    let internal = InvariantViolation("broken".to_owned());
    assert_eq!(AppendError::from(storage.clone()).kind(), ErrorKind::Storage);
    assert_eq!(AppendError::from(storage.clone()).offending_room(), None);
    assert_eq!(AppendError::from(internal.clone()).kind(), ErrorKind::Internal);
    assert_eq!(ReadError::from(storage.clone()).kind(), ErrorKind::Storage);
    assert_eq!(KeyPackageError::from(storage.clone()).kind(), ErrorKind::Storage);
    assert_eq!(KeyPackageError::from(internal.clone()).kind(), ErrorKind::Internal);
    assert_eq!(GroupInfoError::from(storage.clone()).kind(), ErrorKind::Storage);
    assert_eq!(GroupInfoError::from(internal.clone()).kind(), ErrorKind::Internal);
    assert_eq!(WelcomeError::from(storage.clone()).kind(), ErrorKind::Storage);
    assert_eq!(WelcomeError::from(internal.clone()).kind(), ErrorKind::Internal);
    assert_eq!(RoomMetadataError::from(storage).kind(), ErrorKind::Storage);
    assert_eq!(RoomMetadataError::from(internal).kind(), ErrorKind::Internal);
}
