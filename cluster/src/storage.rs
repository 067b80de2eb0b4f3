//! [`SledStorage`]: Raft's log, hard state, conf state and snapshot in a sled database.
//!
//! Layout (one sled database per node, in its `raft/` directory):
//!
//! | tree       | key                     | value                                          |
//! | ---------- | ----------------------- | ---------------------------------------------- |
//! | `entries`  | index as big-endian u64 | `FORMAT_V1` + protobuf `Entry`                  |
//! | `state`    | `hard_state`            | `FORMAT_V1` + protobuf `HardState`              |
//! | `state`    | `conf_state`            | `FORMAT_V1` + protobuf `ConfState`              |
//! | `state`    | `truncated`             | `FORMAT_V1` + bincode [`LogMark`] of the entry before the first one |
//! | `state`    | `node_id`               | `FORMAT_V1` + bincode `u64`                     |
//! | `snapshot` | `metadata`, `data`      | `FORMAT_V1` + protobuf `SnapshotMetadata`; `FORMAT_V1` + the state machine's bytes |
//!
//! Every write runs in one sled transaction over the trees it touches and is flushed
//! (`fsync`) before the method returns, so that what Raft asked to persist is durable
//! before the messages that depend on it are sent or anything is acknowledged. The first
//! and last index, the hard state, the conf state and the snapshot metadata are cached in
//! memory (recomputed from disk on open); a lock serialises writers, and readers see either
//! the state before a write or the state after it.
//!
//! The contract is raft-rs's `Storage` (see `MemStorage`), with two differences: methods
//! return errors where `MemStorage` panics (an append that overwrites compacted entries or
//! leaves a gap, an `entries` call past the last index, a compaction past the snapshot),
//! and [`Storage::snapshot`] returns the snapshot the application stored with
//! [`SledStorage::create_snapshot`] (or received with [`SledStorage::apply_snapshot`]),
//! data included: an empty snapshot (index 0) while none is stored, and
//! `SnapshotTemporarilyUnavailable` when Raft asks for one more recent than the stored one.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::codec::{decode, decode_bytes, decode_pb, encode_bytes, encode_pb, try_encode};
use crate::error::ClusterError;

const TREE_ENTRIES: &str = "entries";
const TREE_STATE: &str = "state";
const TREE_SNAPSHOT: &str = "snapshot";

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_SNAP_META: &[u8] = b"metadata";
const KEY_SNAP_DATA: &[u8] = b"data";

/// A log position: the index and term of one entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// The entry's index.
    pub index: u64,
    /// The entry's term.
    pub term: u64,
}

/// What is kept in memory; always equal to what is on disk once a write returns.
#[derive(Debug, Clone, Default)]
struct Cache {
    /// The entry just before the first one kept (index 0, term 0 for a fresh log). Its
    /// term stays answerable after compaction, as Raft needs it to match logs.
    truncated: LogMark,
    /// The last index in the log (`truncated.index` when the log holds no entry).
    last_index: u64,
    hard_state: HardState,
    conf_state: ConfState,
    /// The metadata of the stored snapshot (index 0 when there is none).
    snapshot: SnapshotMetadata,
}

impl Cache {
    fn first_index(&self) -> u64 {
        self.truncated.index + 1
    }
}

struct Inner {
    node_id: u64,
    db: sled::Db,
    entries: sled::Tree,
    state: sled::Tree,
    snapshot: sled::Tree,
    cache: RwLock<Cache>,
}

/// Raft's [`Storage`] backed by sled. Cheap to clone; clones share one database and cache.
#[derive(Clone)]
pub struct SledStorage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.read();
        f.debug_struct("SledStorage")
            .field("node_id", &self.inner.node_id)
            .field("first_index", &c.first_index())
            .field("last_index", &c.last_index)
            .field("commit", &c.hard_state.commit)
            .field("snapshot_index", &c.snapshot.index)
            .finish()
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> Result<u64, ClusterError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| ClusterError::Corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

fn tx_result<T>(r: Result<T, TransactionError<ClusterError>>) -> Result<T, ClusterError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => ClusterError::Sled(e),
    })
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, ClusterError> {
    let index = index_of(key)?;
    let entry: Entry = decode_pb(value)?;
    if entry.index != index {
        return Err(ClusterError::Corrupt(format!(
            "entry stored under index {index} says index {}",
            entry.index
        )));
    }
    Ok(entry)
}

impl SledStorage {
    /// Opens (or creates) the storage of node `node_id` in `dir`.
    ///
    /// The first open records `node_id`; opening the directory later as another node fails
    /// with [`ClusterError::NodeMismatch`]. The cached indexes are recomputed from disk.
    pub fn open(dir: impl AsRef<Path>, node_id: u64) -> Result<SledStorage, ClusterError> {
        // Every write is flushed explicitly, so sled's background flusher is off; that also
        // means no background thread keeps the directory locked after a drop. A lock still
        // held for a moment by the previous owner is waited for, briefly.
        let config = sled::Config::new().path(dir.as_ref()).flush_every_ms(None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::Other
                        && e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let entries = db.open_tree(TREE_ENTRIES)?;
        let state = db.open_tree(TREE_STATE)?;
        let snapshot = db.open_tree(TREE_SNAPSHOT)?;

        match state.get(KEY_NODE_ID)? {
            Some(v) => {
                let stored: u64 = decode(&v)?;
                if stored != node_id {
                    return Err(ClusterError::NodeMismatch {
                        stored,
                        requested: node_id,
                    });
                }
            }
            None => {
                state.insert(KEY_NODE_ID, try_encode(&node_id)?)?;
                db.flush()?;
            }
        }

        let cache = Self::load(&entries, &state, &snapshot)?;
        Ok(SledStorage {
            inner: Arc::new(Inner {
                node_id,
                db,
                entries,
                state,
                snapshot,
                cache: RwLock::new(cache),
            }),
        })
    }

    /// Reads what the cache holds from disk and checks that the log has no hole at either
    /// end.
    fn load(
        entries: &sled::Tree,
        state: &sled::Tree,
        snapshot: &sled::Tree,
    ) -> Result<Cache, ClusterError> {
        let hard_state = match state.get(KEY_HARD_STATE)? {
            Some(v) => decode_pb(&v)?,
            None => HardState::default(),
        };
        let conf_state = match state.get(KEY_CONF_STATE)? {
            Some(v) => decode_pb(&v)?,
            None => ConfState::default(),
        };
        let truncated: LogMark = match state.get(KEY_TRUNCATED)? {
            Some(v) => decode(&v)?,
            None => LogMark::default(),
        };
        let snap_meta = match snapshot.get(KEY_SNAP_META)? {
            Some(v) => decode_pb(&v)?,
            None => SnapshotMetadata::default(),
        };

        let first_index = truncated.index + 1;
        let last_index = match (entries.first()?, entries.last()?) {
            (Some((first, _)), Some((last, _))) => {
                let (first, last) = (index_of(&first)?, index_of(&last)?);
                if first != first_index {
                    return Err(ClusterError::Corrupt(format!(
                        "the log starts at index {first}, expected {first_index}"
                    )));
                }
                last
            }
            _ => truncated.index,
        };
        Ok(Cache {
            truncated,
            last_index,
            hard_state,
            conf_state,
            snapshot: snap_meta,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Cache> {
        self.inner
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Cache> {
        self.inner
            .cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) -> Result<(), ClusterError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// The node this storage belongs to.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    /// The persisted conf state.
    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// The metadata of the stored snapshot (index 0 when there is none).
    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.read().snapshot.clone()
    }

    /// Gives a fresh storage its first configuration, as every founding member of a
    /// cluster must, identically. Fails if the storage already holds a configuration or
    /// entries.
    pub fn initialize_with_conf_state(&self, cs: ConfState) -> Result<(), ClusterError> {
        let mut c = self.write();
        if c.conf_state != ConfState::default() || c.last_index != 0 {
            return Err(ClusterError::Invalid(
                "storage is already initialized".to_string(),
            ));
        }
        self.inner.state.insert(KEY_CONF_STATE, encode_pb(&cs)?)?;
        self.flush()?;
        c.conf_state = cs;
        Ok(())
    }

    /// Saves the hard state (term, vote, commit).
    pub fn set_hardstate(&self, hs: HardState) -> Result<(), ClusterError> {
        let mut c = self.write();
        self.inner.state.insert(KEY_HARD_STATE, encode_pb(&hs)?)?;
        self.flush()?;
        c.hard_state = hs;
        Ok(())
    }

    /// Saves a new commit index in the hard state (from `LightReady::commit_index`).
    pub fn set_commit(&self, commit: u64) -> Result<(), ClusterError> {
        let mut c = self.write();
        let mut hs = c.hard_state.clone();
        hs.commit = commit;
        self.inner.state.insert(KEY_HARD_STATE, encode_pb(&hs)?)?;
        self.flush()?;
        c.hard_state = hs;
        Ok(())
    }

    /// Saves the conf state.
    pub fn set_conf_state(&self, cs: ConfState) -> Result<(), ClusterError> {
        let mut c = self.write();
        self.inner.state.insert(KEY_CONF_STATE, encode_pb(&cs)?)?;
        self.flush()?;
        c.conf_state = cs;
        Ok(())
    }

    /// Appends `ents` to the log, first removing every entry at or after `ents[0].index`
    /// (the suffix that conflicts with the new entries).
    ///
    /// Fails, changing nothing, if `ents` are not consecutive, start before the first
    /// index (those are compacted) or leave a gap after the last index.
    pub fn append(&self, ents: &[Entry]) -> Result<(), ClusterError> {
        let Some(head) = ents.first() else {
            return Ok(());
        };
        let mut c = self.write();
        let first = head.index;
        if first < c.first_index() {
            return Err(ClusterError::Invalid(format!(
                "append at index {first} would overwrite compacted entries (first index {})",
                c.first_index()
            )));
        }
        if first > c.last_index + 1 {
            return Err(ClusterError::Invalid(format!(
                "append at index {first} leaves a gap after the last index {}",
                c.last_index
            )));
        }
        let mut batch = sled::Batch::default();
        let mut expected = first;
        for e in ents {
            if e.index != expected {
                return Err(ClusterError::Invalid(format!(
                    "appended entries are not consecutive: {} follows {}",
                    e.index,
                    expected - 1
                )));
            }
            batch.insert(&key(e.index), encode_pb(e)?);
            expected += 1;
        }
        let new_last = expected - 1;
        for index in expected..=c.last_index {
            batch.remove(&key(index));
        }
        self.inner.entries.apply_batch(batch)?;
        self.flush()?;
        c.last_index = new_last;
        Ok(())
    }

    /// Discards the entries before `compact_index`; the term of entry `compact_index - 1`
    /// stays answerable through [`Storage::term`].
    ///
    /// Does nothing when `compact_index` is at or before the first index. Fails when it is
    /// past `last_index + 1`, or when it would discard entries that the stored snapshot does
    /// not cover (`compact_index - 1 > snapshot index`): a follower that needs them could
    /// then never catch up. Call [`SledStorage::create_snapshot`] first.
    pub fn compact(&self, compact_index: u64) -> Result<(), ClusterError> {
        let mut c = self.write();
        if compact_index <= c.first_index() {
            return Ok(());
        }
        if compact_index > c.last_index + 1 {
            return Err(ClusterError::Invalid(format!(
                "compact to {compact_index} past the last index {}",
                c.last_index
            )));
        }
        if compact_index - 1 > c.snapshot.index {
            return Err(ClusterError::Invalid(format!(
                "compact to {compact_index} would discard entries after the snapshot at {}",
                c.snapshot.index
            )));
        }
        let mark_index = compact_index - 1;
        let term = self.term_of(&c, mark_index)?;
        let mark = LogMark {
            index: mark_index,
            term,
        };
        let mark_bytes = try_encode(&mark)?;
        let mut batch = sled::Batch::default();
        for index in c.first_index()..compact_index {
            batch.remove(&key(index));
        }
        tx_result(
            (&self.inner.entries, &self.inner.state).transaction(|(entries, state)| {
                entries.apply_batch(&batch)?;
                state.insert(KEY_TRUNCATED, mark_bytes.clone())?;
                Ok(())
            }),
        )?;
        self.flush()?;
        c.truncated = mark;
        Ok(())
    }

    /// Replaces the log with a snapshot received from the leader: stores it (data
    /// included), drops every entry, and moves the hard state's commit (and term, if
    /// older) to the snapshot's. Fails with `SnapshotOutOfDate` when the snapshot is older
    /// than the first index.
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), ClusterError> {
        let mut c = self.write();
        let meta = snapshot.get_metadata().clone();
        if c.first_index() > meta.index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate).into());
        }
        let mut hs = c.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let cs = meta.get_conf_state().clone();
        let mark = LogMark {
            index: meta.index,
            term: meta.term,
        };

        let mut batch = sled::Batch::default();
        for index in c.first_index()..=c.last_index {
            batch.remove(&key(index));
        }
        let meta_bytes = encode_pb(&meta)?;
        let data_bytes = encode_bytes(snapshot.get_data());
        let hs_bytes = encode_pb(&hs)?;
        let cs_bytes = encode_pb(&cs)?;
        let mark_bytes = try_encode(&mark)?;
        tx_result(
            (&self.inner.entries, &self.inner.state, &self.inner.snapshot).transaction(
                |(entries, state, snap)| {
                    entries.apply_batch(&batch)?;
                    state.insert(KEY_HARD_STATE, hs_bytes.clone())?;
                    state.insert(KEY_CONF_STATE, cs_bytes.clone())?;
                    state.insert(KEY_TRUNCATED, mark_bytes.clone())?;
                    snap.insert(KEY_SNAP_META, meta_bytes.clone())?;
                    snap.insert(KEY_SNAP_DATA, data_bytes.clone())?;
                    Ok::<(), ConflictableTransactionError<ClusterError>>(())
                },
            ),
        )?;
        self.flush()?;
        c.truncated = mark;
        c.last_index = meta.index;
        c.hard_state = hs;
        c.conf_state = cs;
        c.snapshot = meta;
        Ok(())
    }

    /// Stores the application's state-machine snapshot `data`, taken after applying entry
    /// `index`, with the configuration `cs` in force at that index; it is what
    /// [`Storage::snapshot`] sends to followers from now on. The log is not compacted; call
    /// [`SledStorage::compact`] for that.
    ///
    /// `index` must be an applied (hence committed) entry still in the log (or the entry
    /// just before it), and not older than the stored snapshot (`SnapshotOutOfDate`).
    pub fn create_snapshot(
        &self,
        index: u64,
        cs: ConfState,
        data: Vec<u8>,
    ) -> Result<Snapshot, ClusterError> {
        let mut c = self.write();
        if index < c.snapshot.index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate).into());
        }
        if index > c.last_index {
            return Err(ClusterError::Invalid(format!(
                "snapshot at {index} past the last index {}",
                c.last_index
            )));
        }
        let term = self.term_of(&c, index)?;
        let mut snapshot = Snapshot::default();
        {
            let meta = snapshot.mut_metadata();
            meta.index = index;
            meta.term = term;
            meta.set_conf_state(cs);
        }
        let meta_bytes = encode_pb(snapshot.get_metadata())?;
        let data_bytes = encode_bytes(&data);
        tx_result(self.inner.snapshot.transaction(|snap| {
            snap.insert(KEY_SNAP_META, meta_bytes.clone())?;
            snap.insert(KEY_SNAP_DATA, data_bytes.clone())?;
            Ok::<(), ConflictableTransactionError<ClusterError>>(())
        }))?;
        self.flush()?;
        c.snapshot = snapshot.get_metadata().clone();
        snapshot.data = data.into();
        Ok(snapshot)
    }

    /// The term of entry `idx`, answered under the caller's lock.
    fn term_of(&self, c: &Cache, idx: u64) -> Result<u64, ClusterError> {
        if idx == c.truncated.index {
            return Ok(c.truncated.term);
        }
        if idx < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted).into());
        }
        if idx > c.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable).into());
        }
        match self.inner.entries.get(key(idx))? {
            Some(v) => Ok(decode_entry(&key(idx), &v)?.term),
            None => Err(ClusterError::Corrupt(format!("entry {idx} is missing"))),
        }
    }

    fn entries_locked(
        &self,
        c: &Cache,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, ClusterError> {
        if low < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted).into());
        }
        if high > c.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable).into());
        }
        if low > high {
            return Err(ClusterError::Invalid(format!(
                "entries [{low}, {high}): low is after high"
            )));
        }
        let limit = match max_size {
            None | Some(raft::NO_LIMIT) => None,
            Some(limit) => Some(limit),
        };
        let mut out = Vec::new();
        let mut size = 0u64;
        let mut expected = low;
        for item in self.inner.entries.range(key(low)..key(high)) {
            let (k, v) = item?;
            let entry = decode_entry(&k, &v)?;
            if entry.index != expected {
                return Err(ClusterError::Corrupt(format!(
                    "entry {expected} is missing"
                )));
            }
            size += u64::from(entry.compute_size());
            // The first entry is always returned, whatever its size.
            if limit.is_some_and(|limit| size > limit) && !out.is_empty() {
                return Ok(out);
            }
            out.push(entry);
            expected += 1;
        }
        if expected != high {
            return Err(ClusterError::Corrupt(format!(
                "entry {expected} is missing"
            )));
        }
        Ok(out)
    }

    fn snapshot_locked(&self, c: &Cache, request_index: u64) -> Result<Snapshot, ClusterError> {
        if c.snapshot.index == 0 && request_index == 0 {
            // Nothing stored yet. Raft never asks then (nothing is compacted before a
            // snapshot is stored); the application, at start, learns there is none.
            return Ok(Snapshot::default());
        }
        if c.snapshot.index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable).into());
        }
        let data = match self.inner.snapshot.get(KEY_SNAP_DATA)? {
            Some(v) => decode_bytes(&v)?.to_vec(),
            None => return Err(ClusterError::Corrupt("snapshot data is missing".into())),
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(c.snapshot.clone());
        snapshot.data = data.into();
        Ok(snapshot)
    }
}

impl Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.read();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    /// Entries in `[low, high)`, at least one if any, then as many as fit in `max_size`
    /// bytes. Never fetches asynchronously, so the context is not used.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.read();
        Ok(self.entries_locked(&c, low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.read();
        Ok(self.term_of(&c, idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let c = self.read();
        Ok(self.snapshot_locked(&c, request_index)?)
    }
}

#[cfg(test)]
mod tests;
