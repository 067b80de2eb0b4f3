//! Tests of [`SledStorage`]: the contract of raft-rs's `MemStorage` tests, written for this
//! API, and what only a disk-backed store must do (survive a reopen, refuse bad bytes).

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{Error as RaftError, GetEntriesContext, Storage, StorageError};
use tempfile::TempDir;

use super::*;
use crate::codec::FORMAT_V1;

fn new_entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..Default::default()
    }
}

fn new_snapshot(index: u64, term: u64, ids: &[u64], data: &[u8]) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().set_conf_state(voters(ids));
    s.data = data.to_vec().into();
    s
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn store_err(e: StorageError) -> RaftError {
    RaftError::Store(e)
}

fn fresh() -> (TempDir, SledStorage) {
    let dir = tempfile::tempdir().unwrap();
    let storage = SledStorage::open(dir.path(), 1).unwrap();
    (dir, storage)
}

/// A log holding entries (3, 3), (4, 4), (5, 5) after a snapshot at (2, 2): the shape
/// `MemStorage`'s tests build by setting its entries directly.
fn log_3_to_5() -> (TempDir, SledStorage) {
    let (dir, s) = fresh();
    s.apply_snapshot(new_snapshot(2, 2, &[1, 2, 3], b"at-2"))
        .unwrap();
    s.append(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)])
        .unwrap();
    (dir, s)
}

fn all_entries(s: &SledStorage) -> Vec<Entry> {
    let first = s.first_index().unwrap();
    let last = s.last_index().unwrap();
    s.entries(first, last + 1, None, ctx()).unwrap()
}

fn size_of(e: &Entry) -> u64 {
    u64::from(e.compute_size())
}

#[test]
fn is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<SledStorage>();
}

#[test]
fn fresh_storage_is_empty() {
    let (_dir, s) = fresh();
    let rs = s.initial_state().unwrap();
    assert!(!rs.initialized());
    assert_eq!(rs.hard_state, HardState::default());
    assert_eq!(s.first_index(), Ok(1));
    assert_eq!(s.last_index(), Ok(0));
    assert_eq!(s.term(0), Ok(0));
    assert_eq!(s.entries(1, 1, None, ctx()), Ok(vec![]));
    // No snapshot yet: an empty one for the application at start, "not yet" for Raft
    // asking for a given index.
    assert_eq!(s.snapshot(0, 2), Ok(Snapshot::default()));
    assert_eq!(
        s.snapshot(1, 2),
        Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
    );
    s.initialize_with_conf_state(voters(&[1, 2, 3])).unwrap();
    assert!(s.initial_state().unwrap().initialized());
    assert!(matches!(
        s.initialize_with_conf_state(voters(&[1])),
        Err(ClusterError::Invalid(_))
    ));
}

#[test]
fn test_storage_term() {
    let (_dir, s) = log_3_to_5();
    let cases = [
        (1, Err(store_err(StorageError::Compacted))),
        // The entry just before the first one keeps its term.
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, Err(store_err(StorageError::Unavailable))),
    ];
    for (idx, want) in cases {
        assert_eq!(s.term(idx), want, "term({idx})");
    }
}

#[test]
fn test_storage_entries() {
    let (_dir, s) = log_3_to_5();
    s.append(&[new_entry(6, 6)]).unwrap();
    let ents = [
        new_entry(3, 3),
        new_entry(4, 4),
        new_entry(5, 5),
        new_entry(6, 6),
    ];
    let max = u64::MAX;
    type Case = (u64, u64, Option<u64>, raft::Result<Vec<Entry>>);
    let cases: Vec<Case> = vec![
        (2, 6, Some(max), Err(store_err(StorageError::Compacted))),
        (3, 4, Some(max), Ok(vec![new_entry(3, 3)])),
        (4, 5, Some(max), Ok(vec![new_entry(4, 4)])),
        (4, 6, Some(max), Ok(ents[1..3].to_vec())),
        (4, 7, Some(max), Ok(ents[1..4].to_vec())),
        (4, 7, None, Ok(ents[1..4].to_vec())),
        (4, 4, None, Ok(vec![])),
        // Even with a limit of zero, the first entry is returned.
        (4, 7, Some(0), Ok(vec![new_entry(4, 4)])),
        // Limits that fit two entries.
        (
            4,
            7,
            Some(size_of(&ents[1]) + size_of(&ents[2])),
            Ok(ents[1..3].to_vec()),
        ),
        (
            4,
            7,
            Some(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) / 2),
            Ok(ents[1..3].to_vec()),
        ),
        (
            4,
            7,
            Some(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) - 1),
            Ok(ents[1..3].to_vec()),
        ),
        // A limit that fits all three.
        (
            4,
            7,
            Some(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3])),
            Ok(ents[1..4].to_vec()),
        ),
        // Past the last index: MemStorage panics, this store answers an error.
        (4, 8, None, Err(store_err(StorageError::Unavailable))),
    ];
    for (i, (lo, hi, max_size, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            s.entries(lo, hi, max_size, ctx()),
            want,
            "#{i}: entries({lo}, {hi}, {max_size:?})"
        );
    }
    // An asynchronous-capable context changes nothing: entries are read at once.
    assert_eq!(
        s.entries(3, 4, None, GetEntriesContext::empty(true)),
        Ok(vec![new_entry(3, 3)])
    );
}

#[test]
fn test_storage_last_index() {
    let (_dir, s) = log_3_to_5();
    assert_eq!(s.last_index(), Ok(5));
    s.append(&[new_entry(6, 5)]).unwrap();
    assert_eq!(s.last_index(), Ok(6));
}

#[test]
fn test_storage_first_index() {
    let (_dir, s) = log_3_to_5();
    assert_eq!(s.first_index(), Ok(3));
    s.create_snapshot(5, voters(&[1, 2, 3]), b"at-5".to_vec())
        .unwrap();
    s.compact(4).unwrap();
    assert_eq!(s.first_index(), Ok(4));
}

#[test]
fn test_storage_compact() {
    // (compact to, first index after, term of the first entry, entries left)
    let cases = [(2, 3, 3, 3), (3, 3, 3, 3), (4, 4, 4, 2), (5, 5, 5, 1)];
    for (idx, want_first, want_term, want_len) in cases {
        let (_dir, s) = log_3_to_5();
        s.create_snapshot(5, voters(&[1, 2, 3]), b"at-5".to_vec())
            .unwrap();
        s.compact(idx).unwrap();
        let first = s.first_index().unwrap();
        assert_eq!(first, want_first, "compact({idx})");
        let head = s.entries(first, first + 1, Some(1), ctx()).unwrap();
        assert_eq!(head[0].term, want_term, "compact({idx})");
        let last = s.last_index().unwrap();
        assert_eq!(
            s.entries(first, last + 1, Some(100), ctx()).unwrap().len(),
            want_len,
            "compact({idx})"
        );
        // The compacted index's term stays answerable; the one before it does not.
        assert_eq!(s.term(first - 1), Ok(want_first - 1));
        if first > 3 {
            assert_eq!(s.term(first - 2), Err(store_err(StorageError::Compacted)));
            assert_eq!(
                s.entries(first - 1, first, None, ctx()),
                Err(store_err(StorageError::Compacted))
            );
        }
    }

    // Compacting past the last index, or past what the snapshot covers, is refused.
    let (_dir, s) = log_3_to_5();
    assert!(matches!(s.compact(7), Err(ClusterError::Invalid(_))));
    assert!(matches!(s.compact(4), Err(ClusterError::Invalid(_))));
    assert_eq!(s.first_index(), Ok(3));
    s.create_snapshot(4, voters(&[1, 2, 3]), b"at-4".to_vec())
        .unwrap();
    assert!(matches!(s.compact(6), Err(ClusterError::Invalid(_))));
    s.compact(5).unwrap();
    assert_eq!(all_entries(&s), vec![new_entry(5, 5)]);
}

#[test]
fn test_storage_create_snapshot() {
    let cs = voters(&[1, 2, 3]);

    // (snapshot index, requested index, expected answer)
    let cases = [
        (4, 0, Ok(new_snapshot(4, 4, &[1, 2, 3], b"state"))),
        (5, 5, Ok(new_snapshot(5, 5, &[1, 2, 3], b"state"))),
        // MemStorage pretends a snapshot at 5 is at 6; data cannot be faked, so this
        // store asks Raft to retry later.
        (
            5,
            6,
            Err(store_err(StorageError::SnapshotTemporarilyUnavailable)),
        ),
    ];
    for (idx, request, want) in cases {
        let (_dir, s) = log_3_to_5();
        let mut hs = s.hard_state();
        hs.commit = idx;
        hs.term = idx;
        s.set_hardstate(hs).unwrap();
        let created = s
            .create_snapshot(idx, cs.clone(), b"state".to_vec())
            .unwrap();
        assert_eq!(created, new_snapshot(idx, idx, &[1, 2, 3], b"state"));
        assert_eq!(
            s.snapshot(request, 2),
            want,
            "snapshot at {idx}, asked {request}"
        );
        assert_eq!(s.snapshot_metadata().index, idx);
    }

    let (_dir, s) = log_3_to_5();
    // Past the last index.
    assert!(matches!(
        s.create_snapshot(6, cs.clone(), vec![]),
        Err(ClusterError::Invalid(_))
    ));
    s.create_snapshot(4, cs.clone(), b"a".to_vec()).unwrap();
    // Older than the stored one.
    assert!(matches!(
        s.create_snapshot(3, cs.clone(), vec![]),
        Err(ClusterError::Raft(RaftError::Store(
            StorageError::SnapshotOutOfDate
        )))
    ));
    // The same index again replaces the data.
    s.create_snapshot(4, cs, b"b".to_vec()).unwrap();
    assert_eq!(&s.snapshot(0, 2).unwrap().data[..], b"b");
    // Creating a snapshot does not compact.
    assert_eq!(s.first_index(), Ok(3));
}

#[test]
fn test_storage_append() {
    let cases: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (
            vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
            Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
        ),
        (
            vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ]),
        ),
        // Overwriting compacted entries is refused.
        (
            vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)],
            None,
        ),
        // The conflicting suffix is truncated.
        (
            vec![new_entry(4, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 5)]),
        ),
        // Direct append.
        (
            vec![new_entry(6, 6)],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 6),
            ]),
        ),
        // A gap after the last index is refused.
        (vec![new_entry(7, 6)], None),
        // Entries that are not consecutive are refused.
        (vec![new_entry(5, 5), new_entry(7, 5)], None),
        // Nothing to append.
        (
            vec![],
            Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]),
        ),
    ];
    for (i, (ents, want)) in cases.into_iter().enumerate() {
        let (_dir, s) = log_3_to_5();
        let res = s.append(&ents);
        match want {
            Some(want) => {
                res.unwrap();
                assert_eq!(all_entries(&s), want, "#{i}");
                assert_eq!(s.last_index(), Ok(want.last().unwrap().index), "#{i}");
            }
            None => {
                assert!(
                    matches!(res, Err(ClusterError::Invalid(_))),
                    "#{i}: {res:?}"
                );
                // A refused append changes nothing.
                assert_eq!(
                    all_entries(&s),
                    vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)],
                    "#{i}"
                );
            }
        }
    }
}

#[test]
fn test_storage_apply_snapshot() {
    let (_dir, s) = fresh();
    let hs = HardState {
        term: 1,
        vote: 3,
        ..Default::default()
    };
    s.set_hardstate(hs).unwrap();

    s.apply_snapshot(new_snapshot(4, 4, &[1, 2, 3], b"four"))
        .unwrap();
    assert_eq!(s.first_index(), Ok(5));
    assert_eq!(s.last_index(), Ok(4));
    assert_eq!(s.term(4), Ok(4));
    let rs = s.initial_state().unwrap();
    assert_eq!(rs.hard_state.commit, 4);
    assert_eq!(rs.hard_state.term, 4);
    assert_eq!(rs.hard_state.vote, 3);
    assert_eq!(rs.conf_state, voters(&[1, 2, 3]));
    assert_eq!(
        s.snapshot(0, 2),
        Ok(new_snapshot(4, 4, &[1, 2, 3], b"four"))
    );

    // An older snapshot is refused.
    assert_eq!(
        s.apply_snapshot(new_snapshot(3, 3, &[1, 2, 3], b"three"))
            .map_err(raft::Error::from),
        Err(store_err(StorageError::SnapshotOutOfDate))
    );

    // A newer one replaces the log, whatever it held.
    s.append(&[new_entry(5, 4), new_entry(6, 4), new_entry(7, 5)])
        .unwrap();
    s.apply_snapshot(new_snapshot(6, 5, &[1, 2], b"six"))
        .unwrap();
    assert_eq!(s.first_index(), Ok(7));
    assert_eq!(s.last_index(), Ok(6));
    assert_eq!(s.entries(7, 7, None, ctx()), Ok(vec![]));
    assert_eq!(s.term(6), Ok(5));
    assert_eq!(s.conf_state(), voters(&[1, 2]));
    s.append(&[new_entry(7, 5)]).unwrap();
    assert_eq!(all_entries(&s), vec![new_entry(7, 5)]);
}

/// Every answer the storage gives, to compare before and after a reopen.
type Answers = (
    HardState,
    ConfState,
    u64,
    u64,
    Vec<raft::Result<u64>>,
    Vec<Entry>,
    Snapshot,
);

fn answers(s: &SledStorage) -> Answers {
    let first = s.first_index().unwrap();
    let last = s.last_index().unwrap();
    let terms = (0..=last + 1).map(|i| s.term(i)).collect();
    let rs = s.initial_state().unwrap();
    (
        rs.hard_state,
        rs.conf_state,
        first,
        last,
        terms,
        all_entries(s),
        s.snapshot(0, 2).unwrap(),
    )
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStorage::open(dir.path(), 7).unwrap();
        s.initialize_with_conf_state(voters(&[7, 8, 9])).unwrap();
        let ents: Vec<Entry> = (1..=10)
            .map(|i| {
                let mut e = new_entry(i, 1 + i / 4);
                e.data = format!("cmd-{i}").into_bytes().into();
                e
            })
            .collect();
        s.append(&ents).unwrap();
        let hs = HardState {
            term: 3,
            vote: 8,
            commit: 8,
            ..Default::default()
        };
        s.set_hardstate(hs).unwrap();
        s.set_conf_state(voters(&[7, 8, 9, 10])).unwrap();
        s.create_snapshot(6, voters(&[7, 8, 9]), b"state at 6".to_vec())
            .unwrap();
        s.compact(5).unwrap();
        // A conflicting suffix from a new leader.
        let mut e = new_entry(9, 3);
        e.data = b"new-9".to_vec().into();
        s.append(&[e]).unwrap();
        let before = answers(&s);
        assert_eq!(before.2, 5);
        assert_eq!(before.3, 9);
        before
    };

    let s = SledStorage::open(dir.path(), 7).unwrap();
    let after = answers(&s);
    assert_eq!(after, before);
    assert_eq!(s.term(4), Ok(2));
    assert_eq!(s.term(3), Err(store_err(StorageError::Compacted)));
    assert_eq!(&after.5.last().unwrap().data[..], b"new-9");
    assert_eq!(&after.6.data[..], b"state at 6");
    drop(s);

    // The directory belongs to node 7.
    assert!(matches!(
        SledStorage::open(dir.path(), 8),
        Err(ClusterError::NodeMismatch {
            stored: 7,
            requested: 8
        })
    ));
}

#[test]
fn applied_snapshot_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStorage::open(dir.path(), 2).unwrap();
        s.append(&[new_entry(1, 1), new_entry(2, 1)]).unwrap();
        s.apply_snapshot(new_snapshot(10, 3, &[1, 2, 3], b"ten"))
            .unwrap();
    }
    let s = SledStorage::open(dir.path(), 2).unwrap();
    assert_eq!(s.first_index(), Ok(11));
    assert_eq!(s.last_index(), Ok(10));
    assert_eq!(s.term(10), Ok(3));
    assert_eq!(s.hard_state().commit, 10);
    assert_eq!(
        s.snapshot(0, 1),
        Ok(new_snapshot(10, 3, &[1, 2, 3], b"ten"))
    );
}

#[test]
fn clones_share_one_store() {
    let (_dir, s) = log_3_to_5();
    let other = s.clone();
    other.append(&[new_entry(6, 5)]).unwrap();
    assert_eq!(s.last_index(), Ok(6));

    // A reader on another thread sees whole appends only.
    let writer = s.clone();
    let handle = std::thread::spawn(move || {
        for i in 7..=60 {
            writer.append(&[new_entry(i, 5)]).unwrap();
        }
    });
    loop {
        let ents = all_entries(&other);
        let first = other.first_index().unwrap();
        for (k, e) in ents.iter().enumerate() {
            assert_eq!(e.index, first + k as u64);
        }
        if ents.last().map(|e| e.index) == Some(60) {
            break;
        }
    }
    handle.join().unwrap();
}

/// Writes raw bytes into a tree of a closed storage.
fn poke(dir: &std::path::Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = sled::open(dir).unwrap();
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

#[test]
fn bad_bytes_on_disk_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStorage::open(dir.path(), 1).unwrap();
        s.append(&[new_entry(1, 1), new_entry(2, 1)]).unwrap();
    }
    // A corrupt entry: reading it fails, nothing panics.
    poke(dir.path(), TREE_ENTRIES, &key(2), &[FORMAT_V1, 0xff, 0xff]);
    {
        let s = SledStorage::open(dir.path(), 1).unwrap();
        assert_eq!(s.term(1), Ok(1));
        assert!(matches!(
            s.term(2),
            Err(RaftError::Store(StorageError::Other(_)))
        ));
        assert!(s.entries(1, 3, None, ctx()).is_err());
    }
    // An entry written by a newer release: reading it names the version.
    poke(dir.path(), TREE_ENTRIES, &key(2), &[9, 1, 2]);
    {
        let s = SledStorage::open(dir.path(), 1).unwrap();
        let err = s.term_of(&s.read(), 2).unwrap_err();
        assert!(
            matches!(err, ClusterError::UnsupportedFormat { found: 9, .. }),
            "{err:?}"
        );
    }
    // A hard state from a newer release: opening fails with a typed error.
    poke(dir.path(), TREE_STATE, KEY_HARD_STATE, &[2, 0]);
    assert!(matches!(
        SledStorage::open(dir.path(), 1),
        Err(ClusterError::UnsupportedFormat { found: 2, .. })
    ));
}

#[test]
fn a_hole_at_the_start_of_the_log_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStorage::open(dir.path(), 1).unwrap();
        s.append(&[new_entry(1, 1), new_entry(2, 1)]).unwrap();
    }
    {
        let db = raw_open(dir.path());
        db.open_tree(TREE_ENTRIES).unwrap().remove(key(1)).unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        SledStorage::open(dir.path(), 1),
        Err(ClusterError::Corrupt(_))
    ));
}

/// Opens the store's sled files directly, waiting briefly for the lock the storage just
/// dropped (sled releases it asynchronously).
fn raw_open(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open {}: {e}", path.display()),
        }
    }
}
