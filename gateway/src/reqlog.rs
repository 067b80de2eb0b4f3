//! The request log: sampled per-request records kept in sled, with bounded retention, and
//! `GET /api/v1/requests` to read them.
//!
//! - What is kept: one [`RequestRecord`] per answered request (time, id, method, path,
//!   model, dialect, status, latency, client address, caller's token id). Every error
//!   (status >= 400) of a routed request is kept, except 401 and 405; successes, 401s,
//!   405s and requests that matched no route (which anyone can send, token or not, as
//!   fast as they like) are kept with the probability `request_log.sample_rate`, so that
//!   they cannot push every other record out. Probes and scrapes (`/healthz`, `/readyz`,
//!   `/metrics`, `/v2/health/*`) are not recorded (they are counted in the metrics).
//! - The hot path never waits for the disk: the middleware ([`observe`]) hands the record
//!   to a bounded queue with `try_send`; when the queue is full the record is dropped and
//!   counted in `cohort_request_log_dropped_total`. A dedicated OS thread (sled is
//!   blocking) writes the queue in batches and enforces retention: beyond
//!   `request_log.max_records` the oldest go, after every batch; records older than
//!   `request_log.max_age_s` go, once a second.
//! - Storage: its own sled database at `<data_dir>/requests` (the Raft log is in
//!   `<data_dir>/raft`). Keys are the big-endian time in ms then a big-endian sequence
//!   number, so iteration is in time order; values are a format byte then the bincode of
//!   the record. The sequence number is unique across reopens, whatever the times: the
//!   next one is kept in the tree `meta` (written before the records that use it), so a
//!   record that arrives after newer ones, or a clock stepped back, never reuses a key;
//!   and the writer never replaces a stored record.
//! - Lifetime: sled locks its directory, once per process. The log belongs to the node,
//!   not to one incarnation of the GatewayActor: [`for_node`] opens it on the gateway's
//!   first start and keeps it in a process-wide map keyed by the directory, with the
//!   node ([`NodeContext`]) that owns it; a restarted gateway of the same node gets the
//!   same log back. When the node shuts down, the stopping gateway flushes the log and
//!   closes it ([`after_server_stopped`]: off the async workers, it waits for the writer
//!   to end); a later node on the same directory (a restart in the same process) opens
//!   it again. Should a node end without a clean shutdown, the next node on that
//!   directory finds the owner gone and replaces the entry. Dropping the last handle
//!   never blocks a runtime's thread: there the writer is told to stop (its queue is
//!   disconnected) and left to write what is queued, flush and end on its own; only on
//!   a thread outside any tokio runtime does the drop wait for it.
//! - Latency is measured from the router's view: routing to response headers (for a
//!   stream, the time to its first byte).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use cohort_actors::NodeContext;
use cohort_config::RequestLogSection;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;

use crate::dialect::is_probe;
pub use crate::dialect::Dialect;
use crate::error::ApiError;
use crate::{json_response, AppState, RequestId};
pub use cohort_cluster::raft_actor::now_ms;

/// The caller's token id, put in the RESPONSE extensions by the auth layer; the request
/// log records it.
#[derive(Clone, Debug)]
pub struct CallerTag(pub Arc<str>);

/// The model a request was for, put in the RESPONSE extensions by handlers whose model
/// is not in the path (the OpenAI endpoints name it in the body).
#[derive(Clone, Debug)]
pub struct ModelTag(pub Arc<str>);

/// The directory under the data dir.
pub const DIR: &str = "requests";

/// The format byte in front of every stored record.
const FORMAT_V1: u8 = 1;
/// The tree of the log's own metadata (records are in the default tree).
const META_TREE: &[u8] = b"meta";
/// In [`META_TREE`]: the next sequence number, big-endian; never less than one plus the
/// highest sequence number of any stored record.
const NEXT_SEQ_KEY: &[u8] = b"next_seq";
/// Records waiting for the writer; beyond this they are dropped (and counted).
const QUEUE_CAPACITY: usize = 8192;
/// Most records written in one sled batch.
const MAX_BATCH: usize = 512;
/// How often records are checked for age (and the writer wakes when idle).
const AGE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest path kept in a record (the rest is cut).
const MAX_PATH_CHARS: usize = 256;
/// How long opening waits for a previous holder of the directory to let go.
const OPEN_LOCK_WAIT: Duration = Duration::from_secs(3);
/// How long a stopping gateway waits for the queue to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Records per page: the default and the most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// One answered request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When it arrived, ms since the Unix epoch.
    pub ts_ms: u64,
    pub request_id: String,
    pub method: String,
    /// The URI's path (no query), at most 256 characters.
    pub path: String,
    pub model: Option<String>,
    pub dialect: Dialect,
    pub status: u16,
    /// From routing to the response's headers.
    pub latency_us: u64,
    /// The peer's address (no proxy headers are trusted).
    pub client_ip: Option<String>,
    /// The id of the caller's token, when the request carried one.
    pub token: Option<String>,
}

/// What went wrong with the request log.
#[derive(Debug, thiserror::Error)]
pub enum RequestLogError {
    #[error("cannot open the request log at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("request log storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("cannot start the request log writer: {0}")]
    Thread(std::io::Error),
    #[error("the request log writer has stopped")]
    Closed,
    #[error("the request log writer did not answer in time")]
    FlushTimeout,
    #[error("a background task failed: {0}")]
    Join(String),
}

/// The counters the log updates (the node's metrics).
#[derive(Clone)]
pub struct LogCounters {
    pub dropped: prometheus::IntCounter,
    pub written: prometheus::IntCounter,
}

impl LogCounters {
    /// Counters registered nowhere (tests).
    pub fn detached() -> LogCounters {
        let c = |name: &str| prometheus::IntCounter::new(name, name).expect("valid counter");
        LogCounters {
            dropped: c("dropped"),
            written: c("written"),
        }
    }
}

/// Which statuses a query wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Exactly this code.
    Code(u16),
    /// `4xx`: codes from 400 to 499 (the digit is the class).
    Class(u16),
    /// `error`: every code from 400 up.
    Error,
}

impl StatusFilter {
    /// `404`, `4xx`, `5XX` or `error`.
    pub fn parse(s: &str) -> Option<StatusFilter> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("error") {
            return Some(StatusFilter::Error);
        }
        let b = s.as_bytes();
        if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
            return Some(StatusFilter::Class(u16::from(b[0] - b'0')));
        }
        match s.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Some(StatusFilter::Code(code)),
            _ => None,
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Code(c) => status == c,
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Error => status >= 400,
        }
    }
}

/// A query over the log, newest first.
#[derive(Debug, Clone)]
pub struct RecordFilter {
    pub model: Option<String>,
    pub status: Option<StatusFilter>,
    /// Only records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only records strictly older than this position (from a previous page).
    pub before: Option<Cursor>,
    pub limit: usize,
}

impl Default for RecordFilter {
    fn default() -> Self {
        RecordFilter {
            model: None,
            status: None,
            since_ms: None,
            before: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// A position in the log: a record's key, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor([u8; 16]);

impl Cursor {
    pub fn parse(s: &str) -> Option<Cursor> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut key = [0u8; 16];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Cursor(key))
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One page of records.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub records: Vec<RequestRecord>,
    /// Pass as `before` for the next (older) page; `None` when there is none.
    pub next_before: Option<String>,
}

fn key(ts_ms: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ts_ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(8..16)?.try_into().ok()?))
}

fn encode(r: &RequestRecord) -> Option<Vec<u8>> {
    let mut out = vec![FORMAT_V1];
    let body = bincode::serde::encode_to_vec(r, bincode::config::standard()).ok()?;
    out.extend_from_slice(&body);
    Some(out)
}

fn decode(v: &[u8]) -> Option<RequestRecord> {
    match v.split_first() {
        Some((&FORMAT_V1, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .ok()
                .map(|(r, _)| r)
        }
        _ => None,
    }
}

enum Msg {
    Record(Box<RequestRecord>),
    /// Write everything queued before, enforce retention, flush to disk, then answer.
    Flush(oneshot::Sender<()>),
    Close,
    /// Tests: the writer waits until the sender of this is used or dropped.
    #[cfg(test)]
    Hold(Receiver<()>),
}

/// A node's request log. See the module's documentation.
pub struct RequestLog {
    path: PathBuf,
    settings: RequestLogSection,
    tree: sled::Db,
    tx: SyncSender<Msg>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: LogCounters,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RequestLog {
    /// Opens (or creates) the log in `path` and starts its writer thread. Blocking.
    /// Waits a little for a previous holder of the directory in this process to close it.
    pub fn open(
        path: &Path,
        settings: RequestLogSection,
        counters: LogCounters,
    ) -> Result<RequestLog, RequestLogError> {
        let deadline = Instant::now() + OPEN_LOCK_WAIT;
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(RequestLogError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let meta = db.open_tree(META_TREE)?;
        let next_seq = next_seq(&db, &meta)?;
        let count = db.len() as u64;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let writer = Writer {
            tree: db.clone(),
            meta,
            settings: settings.clone(),
            counters: counters.clone(),
            next_seq,
            count,
        };
        let handle = std::thread::Builder::new()
            .name("cohort-reqlog".into())
            .spawn(move || writer.run(rx))
            .map_err(RequestLogError::Thread)?;
        Ok(RequestLog {
            path: path.to_path_buf(),
            settings,
            tree: db,
            tx,
            writer: Mutex::new(Some(handle)),
            counters,
        })
    }

    /// Whether a request answered with `status` is to be kept; `routed`: it matched a
    /// route. See [`should_record`].
    pub fn should_record(&self, status: u16, routed: bool) -> bool {
        should_record(self.settings.sample_rate, status, routed)
    }

    /// Queues a record without waiting; a full queue drops it (and counts the drop).
    pub fn submit(&self, record: RequestRecord) {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.inc();
            }
        }
    }

    /// Waits until everything queued so far is written, retention is applied and the
    /// database is flushed to disk.
    pub async fn flush(&self, timeout: Duration) -> Result<(), RequestLogError> {
        let (tx, rx) = oneshot::channel();
        // `send` waits for room in the queue: off the async workers.
        let sender = self.tx.clone();
        tokio::task::spawn_blocking(move || sender.send(Msg::Flush(tx)))
            .await
            .map_err(|e| RequestLogError::Join(e.to_string()))?
            .map_err(|_| RequestLogError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RequestLogError::Closed),
            Err(_) => Err(RequestLogError::FlushTimeout),
        }
    }

    /// The flush of [`RequestLog::flush`], blocking the calling thread.
    pub fn flush_blocking(&self) -> Result<(), RequestLogError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| RequestLogError::Closed)?;
        rx.blocking_recv().map_err(|_| RequestLogError::Closed)
    }

    /// Records stored now (a scan: for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether no record is stored.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// One page of records matching `filter`, newest first. Blocking (a scan).
    pub fn query(&self, filter: &RecordFilter) -> Result<Page, RequestLogError> {
        let lower = key(filter.since_ms.unwrap_or(0), 0);
        let range = match &filter.before {
            Some(Cursor(upper)) if *upper <= lower => {
                return Ok(Page {
                    records: Vec::new(),
                    next_before: None,
                })
            }
            Some(Cursor(upper)) => self.tree.range(lower..*upper),
            None => self.tree.range(lower..),
        };
        let limit = filter.limit.clamp(1, MAX_LIMIT);
        let mut records = Vec::new();
        let mut last_key: Option<[u8; 16]> = None;
        let mut more = false;
        for item in range.rev() {
            let (k, v) = item?;
            let Some(record) = decode(&v) else {
                tracing::warn!(key = ?k, "skipping an unreadable request record");
                continue;
            };
            if let Some(m) = &filter.model {
                if record.model.as_deref() != Some(m.as_str()) {
                    continue;
                }
            }
            if let Some(s) = filter.status {
                if !s.matches(record.status) {
                    continue;
                }
            }
            if records.len() == limit {
                more = true;
                break;
            }
            last_key = k.as_ref().try_into().ok();
            records.push(record);
        }
        Ok(Page {
            records,
            next_before: more
                .then_some(last_key)
                .flatten()
                .map(|k| Cursor(k).to_string()),
        })
    }

    /// Stops the writer after it has written what was queued and flushed, and waits for
    /// it to end (the database is closed once the other handles are gone). Blocking:
    /// call it off the async workers (`spawn_blocking`). Later records are dropped.
    pub fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = self.tx.send(Msg::Close);
            if handle.join().is_err() {
                tracing::error!(path = %self.path.display(), "the request log writer panicked");
            }
        }
    }
}

impl Drop for RequestLog {
    /// On a thread of a tokio runtime (a worker, perhaps): never waits. The writer is
    /// detached; the queue's sender goes with this handle, so the writer writes what is
    /// queued, flushes and ends by itself. Elsewhere: [`RequestLog::close`].
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let handle = self
                .writer
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(handle);
        } else {
            self.close();
        }
    }
}

/// Whether to keep the record of a request answered with `status`; `routed`: it matched
/// a route. Errors of routed requests always, but 401 and 405; successes, 401s, 405s
/// (a route's path without its method: public paths answer it without a token) and
/// requests that matched no route with probability `rate`: anyone can send those (no
/// token needed) as fast as they like, and kept always they would push every other
/// record out.
pub fn should_record(rate: f64, status: u16, routed: bool) -> bool {
    let always = routed && status >= 400 && status != 401 && status != 405;
    always || rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
}

/// The next sequence number of a log: the one kept in `meta`, and never one at or below
/// a stored record's (a log written before `meta` existed: the highest of all its keys,
/// which, keys being time first, need not be the last key's).
fn next_seq(records: &sled::Db, meta: &sled::Tree) -> Result<u64, RequestLogError> {
    let stored = meta
        .get(NEXT_SEQ_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes);
    let after_last = records
        .last()?
        .and_then(|(k, _)| key_seq(&k))
        .map_or(0, |s| s.saturating_add(1));
    match stored {
        Some(n) => Ok(n.max(after_last)),
        None => {
            let mut next = after_last;
            for k in records.iter().keys() {
                if let Some(s) = key_seq(&k?) {
                    next = next.max(s.saturating_add(1));
                }
            }
            Ok(next)
        }
    }
}

/// The writer thread's state.
struct Writer {
    tree: sled::Db,
    /// Where `next_seq` is kept ([`NEXT_SEQ_KEY`]).
    meta: sled::Tree,
    settings: RequestLogSection,
    counters: LogCounters,
    next_seq: u64,
    /// Records stored (kept up to date by this thread, the only writer).
    count: u64,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        // Records left from an earlier run may be too old already.
        self.trim_age(now_ms());
        let mut last_age_check = Instant::now();
        let mut msgs = Vec::with_capacity(MAX_BATCH);
        loop {
            let mut disconnected = false;
            match rx.recv_timeout(AGE_CHECK_EVERY) {
                Ok(m) => msgs.push(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => disconnected = true,
            }
            while !msgs.is_empty() && msgs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            let mut batch = sled::Batch::default();
            let mut added = 0u64;
            let mut replies = Vec::new();
            let mut close = disconnected;
            for m in msgs.drain(..) {
                match m {
                    Msg::Record(r) => {
                        if self.add(&mut batch, &r) {
                            added += 1;
                        }
                    }
                    Msg::Flush(reply) => replies.push(reply),
                    Msg::Close => close = true,
                    #[cfg(test)]
                    Msg::Hold(gate) => {
                        let _ = gate.recv();
                    }
                }
            }
            if added > 0 {
                // The sequence numbers of the batch are taken for good before it is
                // written: a reopened log never hands them out again.
                let stored = self
                    .meta
                    .insert(NEXT_SEQ_KEY, &self.next_seq.to_be_bytes()[..])
                    .map(|_| ())
                    .and_then(|()| self.tree.apply_batch(batch));
                match stored {
                    Ok(()) => {
                        self.count += added;
                        self.counters.written.inc_by(added);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, records = added, "cannot write request records");
                        self.counters.dropped.inc_by(added);
                    }
                }
            }
            if self.count > self.settings.max_records as u64 {
                self.trim_count();
            }
            let must_flush = !replies.is_empty() || close;
            if must_flush || last_age_check.elapsed() >= AGE_CHECK_EVERY {
                self.trim_age(now_ms());
                last_age_check = Instant::now();
            }
            if must_flush {
                if let Err(e) = self.tree.flush() {
                    tracing::warn!(error = %e, "cannot flush the request log");
                }
                for reply in replies {
                    let _ = reply.send(());
                }
            }
            if close {
                return;
            }
        }
    }

    /// Adds one record to the batch under a key no stored record has; false when it
    /// cannot be encoded or the store cannot be read.
    fn add(&mut self, batch: &mut sled::Batch, r: &RequestRecord) -> bool {
        let Some(value) = encode(r) else {
            self.counters.dropped.inc();
            return false;
        };
        // This thread is the only writer and the batch's own keys have distinct sequence
        // numbers: a key not stored now is not stored when the batch is applied.
        let k = loop {
            let k = key(r.ts_ms, self.next_seq);
            self.next_seq = self.next_seq.wrapping_add(1);
            match self.tree.contains_key(k) {
                Ok(false) => break k,
                Ok(true) => {
                    tracing::warn!(
                        seq = self.next_seq - 1,
                        "request log key already used, skipping it"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the request log");
                    self.counters.dropped.inc();
                    return false;
                }
            }
        };
        batch.insert(&k[..], value);
        true
    }

    /// Removes the oldest records beyond `max_records`.
    fn trim_count(&mut self) {
        let excess = self.count.saturating_sub(self.settings.max_records as u64);
        let keys = self.tree.iter().keys().take(excess as usize);
        self.remove(keys);
    }

    /// Removes the records older than `max_age_s`.
    fn trim_age(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.settings.max_age_s.saturating_mul(1000));
        let keys = self.tree.range(..key(cutoff, 0)).keys();
        self.remove(keys);
    }

    fn remove(&mut self, keys: impl Iterator<Item = sled::Result<sled::IVec>>) {
        let mut batch = sled::Batch::default();
        let mut n = 0u64;
        for k in keys {
            match k {
                Ok(k) => {
                    batch.remove(k);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the request log for retention");
                    break;
                }
            }
        }
        if n == 0 {
            return;
        }
        match self.tree.apply_batch(batch) {
            Ok(()) => self.count = self.count.saturating_sub(n),
            Err(e) => tracing::warn!(error = %e, "cannot remove old request records"),
        }
    }
}

// ---------------------------------------------------------------------------
// One log per node

type Entry = (Weak<NodeContext>, Arc<RequestLog>);

/// The logs open in this process, by directory, with the node that owns each.
fn open_logs() -> &'static Mutex<HashMap<PathBuf, Entry>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Entry>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

fn counters(ctx: &NodeContext) -> LogCounters {
    LogCounters {
        dropped: ctx.metrics.request_log_dropped.clone(),
        written: ctx.metrics.request_log_written.clone(),
    }
}

/// The request log of `ctx`'s node (`None` when `request_log.enabled` is off): opened
/// on the first call, the same one on the calls of a restarted gateway.
pub async fn for_node(ctx: &Arc<NodeContext>) -> Result<Option<Arc<RequestLog>>, RequestLogError> {
    if !ctx.config.request_log.enabled {
        return Ok(None);
    }
    let ctx = Arc::clone(ctx);
    tokio::task::spawn_blocking(move || {
        let path = ctx.config.data_dir.join(DIR);
        let mut logs = open_logs().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((owner, log)) = logs.get(&path) {
            if owner.upgrade().is_some_and(|o| Arc::ptr_eq(&o, &ctx)) {
                return Ok(Some(Arc::clone(log)));
            }
        }
        // A node that ended without shutting down left its log: close it first (this is
        // a blocking thread: wait for its writer, which lets go of the directory).
        if let Some((_, stale)) = logs.remove(&path) {
            if let Some(stale) = Arc::into_inner(stale) {
                stale.close();
            }
        }
        let log = Arc::new(RequestLog::open(
            &path,
            ctx.config.request_log.clone(),
            counters(&ctx),
        )?);
        logs.insert(path, (Arc::downgrade(&ctx), Arc::clone(&log)));
        Ok(Some(log))
    })
    .await
    .map_err(|e| RequestLogError::Join(e.to_string()))?
}

/// Called by the GatewayActor once its server has finished the requests in flight:
/// writes what is queued and, when the node is shutting down, closes the log.
pub async fn after_server_stopped(ctx: &Arc<NodeContext>, log: Arc<RequestLog>) {
    if let Err(e) = log.flush(FLUSH_TIMEOUT).await {
        tracing::warn!(error = %e, "request log not flushed");
    }
    if !ctx.shutting_down() {
        return;
    }
    let ctx = Arc::clone(ctx);
    let closed = tokio::task::spawn_blocking(move || {
        let mut logs = open_logs().lock().unwrap_or_else(|p| p.into_inner());
        let ours = logs
            .get(&log.path)
            .is_some_and(|(owner, _)| owner.as_ptr() == Arc::as_ptr(&ctx));
        let entry = if ours { logs.remove(&log.path) } else { None };
        drop(logs);
        drop(entry);
        // Wait for the writer to write what is queued and end, even when a connection that
        // outlived the drain still holds a handle (its later records are not written): the
        // process may exit right after this, and a detached writer would be killed.
        log.close();
    })
    .await;
    if let Err(e) = closed {
        tracing::warn!(error = %e, "closing the request log failed");
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// Paths that are not recorded: probes and scrapes.
fn cut(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// The middleware (it runs after routing): counts every answered request in
/// `cohort_http_requests_total` and hands a sampled record to the request log.
pub(crate) async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let ts_ms = now_ms();
    // Cheap handles only (reference counts, copies): the strings of a record are made
    // only for the requests that are recorded.
    let uri = req.uri().clone();
    let method = req.method().clone();
    let template = req.extensions().get::<MatchedPath>().cloned();
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| Arc::clone(&r.0));
    let res = next.run(req).await;
    let latency_us = started.elapsed().as_micros() as u64;
    let status = res.status().as_u16();
    let path = uri.path();
    let tag = res.extensions().get::<ModelTag>();
    let model: Option<Cow<'_, str>> = match tag {
        Some(t) => Some(Cow::Borrowed(&t.0)),
        None => template
            .as_ref()
            .and_then(|t| crate::auth::path_model(t.as_str(), path)),
    };
    let model = model.as_deref();
    let dialect = Dialect::of(path);

    // Only served models become label values: a client cannot grow the metrics by
    // inventing names.
    let served = model.filter(|m| state.ctx.router.snapshot().get(m).is_some());
    state
        .ctx
        .metrics
        .http_request(served.unwrap_or("_other"), dialect.as_str(), status);

    if let Some(log) = &state.reqlog {
        if !is_probe(path) && log.should_record(status, template.is_some()) {
            log.submit(RequestRecord {
                ts_ms,
                request_id: request_id.map(|r| r.to_string()).unwrap_or_default(),
                method: method.to_string(),
                path: cut(path, MAX_PATH_CHARS),
                model: model.map(|m| cut(m, MAX_PATH_CHARS)),
                dialect,
                status,
                latency_us,
                client_ip: client.map(|ip| ip.to_string()),
                token: res.extensions().get::<CallerTag>().map(|t| t.0.to_string()),
            });
        }
    }
    res
}

/// The query of `GET /api/v1/requests`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Only this model.
    model: Option<String>,
    /// A code (`404`), a class (`4xx`, `5xx`) or `error` (400 and above).
    status: Option<String>,
    /// Only records at or after this time (ms since the Unix epoch).
    since: Option<String>,
    /// The previous page's `next_before`.
    before: Option<String>,
    /// At most this many (1 to 1000, default 100).
    limit: Option<String>,
}

fn bad_param(param: &str, message: String) -> ApiError {
    ApiError::InvalidInput {
        message,
        details: Some(json!({"param": param})),
    }
}

/// Longest parameter name repeated in an answer.
const MAX_PARAM_CHARS: usize = 64;

impl ListParams {
    /// The parameters of the query's `name=value` pairs: an unknown name or one given
    /// twice is a 400 whose `details.param` names it.
    fn from_pairs(pairs: Vec<(String, String)>) -> Result<ListParams, ApiError> {
        let mut p = ListParams::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "model" => &mut p.model,
                "status" => &mut p.status,
                "since" => &mut p.since,
                "before" => &mut p.before,
                "limit" => &mut p.limit,
                _ => {
                    let name = cut(&name, MAX_PARAM_CHARS);
                    return Err(bad_param(
                        &name,
                        format!(
                            "unknown query parameter {name:?}; the parameters are model, \
                             status, since, before and limit"
                        ),
                    ));
                }
            };
            if slot.is_some() {
                return Err(bad_param(
                    &name,
                    format!("query parameter {name:?} is given more than once"),
                ));
            }
            *slot = Some(value);
        }
        Ok(p)
    }

    fn filter(self) -> Result<RecordFilter, ApiError> {
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(StatusFilter::parse(s).ok_or_else(|| {
                bad_param(
                    "status",
                    format!("status must be a code (404), a class (4xx) or \"error\", got {s:?}"),
                )
            })?),
        };
        let since_ms = match self.since.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
                bad_param(
                    "since",
                    format!("since must be milliseconds since the Unix epoch, got {s:?}"),
                )
            })?),
        };
        let before = match self.before.as_deref() {
            None | Some("") => None,
            Some(s) => Some(Cursor::parse(s).ok_or_else(|| {
                bad_param(
                    "before",
                    format!("before must be a next_before value from a previous page, got {s:?}"),
                )
            })?),
        };
        let limit = match self.limit.as_deref() {
            None | Some("") => DEFAULT_LIMIT,
            Some(s) => match s.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(bad_param(
                        "limit",
                        format!("limit must be a whole number from 1 to {MAX_LIMIT}, got {s:?}"),
                    ))
                }
            },
        };
        Ok(RecordFilter {
            model: self.model.filter(|m| !m.is_empty()),
            status,
            since_ms,
            before,
            limit,
        })
    }
}

/// `GET /api/v1/requests?model=&status=&since=&before=&limit=`: recorded requests,
/// newest first.
#[utoipa::path(get, path = "/api/v1/requests", tag = "audit",
    params(ListParams),
    responses(
        (status = 200, description = "Sampled request records (errors of routed requests, 401 and 405 excepted, always), newest first", body = Object),
        (status = 400, description = "Bad query", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = pairs.map_err(|e| ApiError::invalid(format!("bad query: {e}")))?;
    let filter = ListParams::from_pairs(pairs)?.filter()?;
    let Some(log) = state.reqlog.clone() else {
        return Ok(json_response(
            &json!({"enabled": false, "records": [], "next_before": null}),
        ));
    };
    let page = tokio::task::spawn_blocking(move || log.query(&filter))
        .await
        .map_err(|e| ApiError::InferenceFailed(format!("reading the request log failed: {e}")))?
        .map_err(|e| ApiError::InferenceFailed(format!("reading the request log failed: {e}")))?;
    Ok(json_response(&json!({
        "enabled": true,
        "records": page.records,
        "next_before": page.next_before,
    })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Process-unique ids for the records of tests.
    static TEST_SEQ: AtomicU64 = AtomicU64::new(0);

    fn settings(max_records: usize, max_age_s: u64, sample_rate: f64) -> RequestLogSection {
        RequestLogSection {
            enabled: true,
            sample_rate,
            max_records,
            max_age_s,
        }
    }

    fn rec(ts_ms: u64, model: &str, status: u16) -> RequestRecord {
        RequestRecord {
            ts_ms,
            request_id: format!("r{}", TEST_SEQ.fetch_add(1, Ordering::Relaxed)),
            method: "POST".into(),
            path: format!("/api/v1/models/{model}/infer"),
            model: Some(model.into()),
            dialect: Dialect::Rest,
            status,
            latency_us: 100,
            client_ip: Some("127.0.0.1".into()),
            token: None,
        }
    }

    fn open(dir: &tempfile::TempDir, s: RequestLogSection) -> RequestLog {
        RequestLog::open(&dir.path().join(DIR), s, LogCounters::detached()).expect("opens")
    }

    #[test]
    fn records_come_back_newest_first_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let now = now_ms();
        {
            let log = open(&dir, settings(100, 3600, 1.0));
            for i in 0..5 {
                log.submit(rec(now + i, "a", 200));
            }
            log.flush_blocking().expect("flush");
            let page = log.query(&RecordFilter::default()).expect("query");
            let ts: Vec<u64> = page.records.iter().map(|r| r.ts_ms).collect();
            assert_eq!(ts, (0..5).rev().map(|i| now + i).collect::<Vec<_>>());
            assert_eq!(page.next_before, None);
            assert_eq!(log.counters.written.get(), 5);
        }
        // Same directory again (the first one was closed on drop); new records get keys
        // after the old ones even within the same millisecond.
        let log = open(&dir, settings(100, 3600, 1.0));
        assert_eq!(log.len(), 5);
        log.submit(rec(now + 4, "a", 201));
        log.flush_blocking().expect("flush");
        let page = log.query(&RecordFilter::default()).expect("query");
        assert_eq!(page.records.len(), 6);
        assert_eq!(page.records[0].status, 201);
    }

    #[test]
    fn same_millisecond_records_are_all_kept_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(100, 3600, 1.0));
        let now = now_ms();
        let recs: Vec<_> = (0..10).map(|_| rec(now, "a", 200)).collect();
        for r in &recs {
            log.submit(r.clone());
        }
        log.flush_blocking().expect("flush");
        let page = log.query(&RecordFilter::default()).expect("query");
        let got: Vec<_> = page.records.iter().map(|r| r.request_id.clone()).collect();
        let want: Vec<_> = recs.iter().rev().map(|r| r.request_id.clone()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn retention_keeps_the_newest_max_records() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(10, 3600, 1.0));
        let now = now_ms();
        for i in 0..25 {
            log.submit(rec(now + i, "a", 200));
        }
        log.flush_blocking().expect("flush");
        assert_eq!(log.len(), 10);
        let page = log.query(&RecordFilter::default()).expect("query");
        let ts: Vec<u64> = page.records.iter().map(|r| r.ts_ms).collect();
        assert_eq!(ts, (15..25).rev().map(|i| now + i).collect::<Vec<_>>());
        // Across a reopen the count is known again.
        drop(log);
        let log = open(&dir, settings(10, 3600, 1.0));
        log.submit(rec(now + 30, "a", 200));
        log.flush_blocking().expect("flush");
        assert_eq!(log.len(), 10);
    }

    #[test]
    fn retention_drops_records_older_than_max_age() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(100, 60, 1.0));
        let now = now_ms();
        log.submit(rec(now - 3_600_000, "old", 200));
        log.submit(rec(now - 61_000, "old", 500));
        log.submit(rec(now - 1_000, "new", 200));
        log.submit(rec(now, "new", 200));
        log.flush_blocking().expect("flush");
        let page = log.query(&RecordFilter::default()).expect("query");
        assert_eq!(page.records.len(), 2);
        assert!(page
            .records
            .iter()
            .all(|r| r.model.as_deref() == Some("new")));
    }

    #[test]
    fn filters_limit_and_pages() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(1000, 3600, 1.0));
        let now = now_ms();
        for i in 0..30u64 {
            let model = if i % 2 == 0 { "a" } else { "b" };
            let status = match i % 3 {
                0 => 200,
                1 => 404,
                _ => 503,
            };
            log.submit(rec(now + i, model, status));
        }
        log.flush_blocking().expect("flush");
        let q = |f: RecordFilter| log.query(&f).expect("query");

        let a = q(RecordFilter {
            model: Some("a".into()),
            limit: 1000,
            ..Default::default()
        });
        assert_eq!(a.records.len(), 15);
        assert!(a.records.iter().all(|r| r.model.as_deref() == Some("a")));

        let exact = q(RecordFilter {
            status: Some(StatusFilter::Code(404)),
            ..Default::default()
        });
        assert_eq!(exact.records.len(), 10);
        assert!(exact.records.iter().all(|r| r.status == 404));
        let class = q(RecordFilter {
            status: Some(StatusFilter::Class(5)),
            ..Default::default()
        });
        assert_eq!(class.records.len(), 10);
        let errors = q(RecordFilter {
            status: Some(StatusFilter::Error),
            ..Default::default()
        });
        assert_eq!(errors.records.len(), 20);

        let since = q(RecordFilter {
            since_ms: Some(now + 25),
            ..Default::default()
        });
        assert_eq!(since.records.len(), 5);
        assert!(since.records.iter().all(|r| r.ts_ms >= now + 25));

        // Pages of 7, newest first, with nothing missed or repeated.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = q(RecordFilter {
                limit: 7,
                before,
                ..Default::default()
            });
            assert!(page.records.len() <= 7);
            seen.extend(page.records.iter().map(|r| r.ts_ms));
            match page.next_before {
                Some(c) => before = Some(Cursor::parse(&c).expect("cursor parses")),
                None => break,
            }
        }
        assert_eq!(seen, (0..30).rev().map(|i| now + i).collect::<Vec<_>>());
    }

    #[test]
    fn sampling_keeps_every_routed_error_but_401_and_405() {
        for status in [400, 403, 404, 408, 413, 429, 500, 503, 504] {
            assert!((0..1000).all(|_| should_record(0.0, status, true)));
        }
        assert!((0..1000).all(|_| !should_record(0.0, 200, true)));
        assert!((0..1000).all(|_| should_record(1.0, 200, true)));
        let kept = (0..20_000)
            .filter(|_| should_record(0.25, 200, true))
            .count();
        assert!((4000..6000).contains(&kept), "kept {kept} of 20000 at 0.25");
    }

    #[test]
    fn unauthenticated_and_unrouted_requests_are_sampled_like_successes() {
        // 401s, 405s, and anything that matched no route (404, or a 503 of the
        // concurrency guard): no token needed to send them, so they take the sample rate.
        for (status, routed) in [
            (401, true),
            (401, false),
            (405, true),
            (404, false),
            (503, false),
        ] {
            assert!(
                (0..1000).all(|_| !should_record(0.0, status, routed)),
                "{status} routed={routed}"
            );
            assert!((0..1000).all(|_| should_record(1.0, status, routed)));
            let kept = (0..20_000)
                .filter(|_| should_record(0.25, status, routed))
                .count();
            assert!((4000..6000).contains(&kept), "kept {kept} of 20000 at 0.25");
        }
    }

    #[test]
    fn keys_stay_unique_across_reopens_whatever_the_arrival_times() {
        let dir = tempfile::tempdir().expect("dir");
        let now = now_ms();
        {
            let log = open(&dir, settings(100, 3600, 1.0));
            // A clock that was ahead (or a request that arrived later but was written
            // first), then one that arrived earlier: the newest key is not the highest
            // sequence number.
            log.submit(rec(now + 60_000, "a", 200));
            log.submit(rec(now, "a", 200));
            log.flush_blocking().expect("flush");
        }
        let mut ids: Vec<String> = Vec::new();
        for round in 0..3 {
            let log = open(&dir, settings(100, 3600, 1.0));
            if round == 2 {
                // A log written before the sequence number was kept: found by a scan.
                log.tree
                    .open_tree(META_TREE)
                    .and_then(|m| m.remove(NEXT_SEQ_KEY))
                    .expect("removed");
                drop(log);
                continue;
            }
            let r = rec(now, "b", 200);
            ids.push(r.request_id.clone());
            log.submit(r);
            log.flush_blocking().expect("flush");
            assert_eq!(log.len(), 3 + round, "round {round}");
        }
        let log = open(&dir, settings(100, 3600, 1.0));
        let r = rec(now, "b", 200);
        ids.push(r.request_id.clone());
        log.submit(r);
        // A clock stepped back: still a fresh key.
        let r = rec(now - 1, "b", 200);
        ids.push(r.request_id.clone());
        log.submit(r);
        log.flush_blocking().expect("flush");
        assert_eq!(log.len(), 6);
        let page = log
            .query(&RecordFilter {
                model: Some("b".into()),
                ..Default::default()
            })
            .expect("query");
        let mut got: Vec<String> = page.records.into_iter().map(|r| r.request_id).collect();
        got.sort();
        ids.sort();
        assert_eq!(got, ids);
        assert_eq!(log.counters.written.get(), 2);
    }

    #[test]
    fn a_stored_key_is_never_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let now = now_ms();
        let log = open(&dir, settings(100, 3600, 1.0));
        let newest = rec(now + 60_000, "a", 200);
        log.submit(newest.clone());
        let first = rec(now, "a", 200);
        log.submit(first.clone());
        log.flush_blocking().expect("flush");
        drop(log);
        // The kept sequence number lost (as if it were never written): the writer still
        // finds the key taken and uses the next.
        {
            let db = sled::open(dir.path().join(DIR)).expect("opens");
            db.open_tree(META_TREE)
                .and_then(|m| m.insert(NEXT_SEQ_KEY, &0u64.to_be_bytes()[..]))
                .expect("written");
            db.flush().expect("flush");
        }
        let log = open(&dir, settings(100, 3600, 1.0));
        let second = rec(now, "a", 200);
        log.submit(second.clone());
        log.flush_blocking().expect("flush");
        assert_eq!(log.len(), 3);
        let page = log.query(&RecordFilter::default()).expect("query");
        let ids: Vec<&str> = page.records.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                newest.request_id.as_str(),
                second.request_id.as_str(),
                first.request_id.as_str()
            ]
        );
    }

    #[test]
    fn dropping_on_a_runtime_does_not_wait_for_the_writer_yet_writes_the_queue() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(100, 3600, 1.0));
        // Keep the writer busy until released.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        log.tx.send(Msg::Hold(gate)).expect("queued");
        let queued = rec(now_ms(), "a", 200);
        log.submit(queued.clone());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move { drop(log) });
            let _ = done_tx.send(());
        });
        let returned = done_rx.recv_timeout(Duration::from_secs(2));
        // Let the writer go whatever happened, so that a failing run ends.
        let _ = release.send(());
        dropper.join().expect("dropper ends");
        assert!(
            returned.is_ok(),
            "the drop waited for the writer on a runtime"
        );
        // The detached writer wrote what was queued, then let go of the directory (open
        // waits for that).
        let log = open(&dir, settings(100, 3600, 1.0));
        let page = log.query(&RecordFilter::default()).expect("query");
        assert_eq!(page.records, vec![queued]);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().expect("dir");
        let log = open(&dir, settings(100_000, 3600, 1.0));
        let now = now_ms();
        let n = QUEUE_CAPACITY * 3;
        for i in 0..n {
            log.submit(rec(now + i as u64, "a", 200));
        }
        log.flush_blocking().expect("flush");
        let written = log.counters.written.get();
        let dropped = log.counters.dropped.get();
        assert_eq!(written + dropped, n as u64);
        assert_eq!(log.len() as u64, written);
    }

    #[test]
    fn status_filters_and_cursors_parse() {
        assert_eq!(StatusFilter::parse("404"), Some(StatusFilter::Code(404)));
        assert_eq!(StatusFilter::parse("4xx"), Some(StatusFilter::Class(4)));
        assert_eq!(StatusFilter::parse("5XX"), Some(StatusFilter::Class(5)));
        assert_eq!(StatusFilter::parse("error"), Some(StatusFilter::Error));
        for bad in ["", "99", "600", "6xx", "4x", "abc", "-1", "40x"] {
            assert_eq!(StatusFilter::parse(bad), None, "{bad:?}");
        }
        let c = Cursor(key(1_700_000_000_000, 42));
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        assert_eq!(Cursor::parse("zz"), None);
        assert_eq!(Cursor::parse(&"g".repeat(32)), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_log_per_node_kept_across_gateway_restarts() {
        let dir = tempfile::tempdir().expect("dir");
        let config = cohort_config::NodeConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let ctx = NodeContext::new(config.clone());
        let first = for_node(&ctx).await.expect("opens").expect("enabled");
        // A restarted gateway of the same node gets the same log (sled would refuse a
        // second open of the directory).
        let again = for_node(&ctx).await.expect("opens").expect("enabled");
        assert!(Arc::ptr_eq(&first, &again));
        first.submit(rec(now_ms(), "a", 200));
        first.flush(Duration::from_secs(5)).await.expect("flush");
        drop((first, again));

        // A new node on the same directory in this process, the first one gone without a
        // clean shutdown: the stale log is closed and the directory opened again.
        drop(ctx);
        let ctx = NodeContext::new(config.clone());
        let log = for_node(&ctx).await.expect("reopens").expect("enabled");
        assert_eq!(log.len(), 1);

        // Disabled: no log.
        let mut off = config;
        off.request_log.enabled = false;
        off.data_dir = dir.path().join("other");
        assert!(for_node(&NodeContext::new(off))
            .await
            .expect("ok")
            .is_none());
    }
}
