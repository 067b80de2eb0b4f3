//! What one replica shares between its actor, its engine thread and the router: the
//! bounded request queue, the counters, and the engine thread's loop.
//!
//! A [`ReplicaShared`] outlives the `ModelInstance` actors that run it: when a replica is
//! restarted after a crash, the new actor and its new engine thread pick up the same queue,
//! so requests waiting in it are served by the new engine instead of being lost.
//!
//! The engine thread is a plain OS thread. It blocks on a condition variable until work is
//! queued, waits up to `max_queue_delay_us` for a batch to fill, drops requests whose caller
//! went away or whose deadline passed (they never reach the engine), runs the batch inside
//! `catch_unwind`, and answers each request through its reply port.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cohort_config::{BatchingConfig, ModelConfig};
use cohort_engines::{
    concat_maps, split_map, Device, Engine, LoadContext, ModelMetadata, TensorData, TensorMap,
    TokenCounter,
};
use hdrhistogram::Histogram;
use ractor::{ActorRef, RpcReplyPort};
use serde::Serialize;

use crate::metrics::ModelMetrics;
use crate::model_instance::ModelInstanceMsg;
use crate::queue::{Full, Priority, QueueItem, RequestQueue, Taken};
use crate::InferError;

/// The lifecycle of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// The engine is being loaded.
    Loading,
    /// Serving.
    Ready,
    /// The engine crashed; a new one is started after a backoff.
    Restarting,
    /// Finishing its queue before it stops.
    Draining,
    /// Stopped on purpose.
    Stopped,
    /// Given up on: it failed more often than its restart budget allows.
    Failed,
}

impl ReplicaState {
    const ALL: [ReplicaState; 6] = [
        ReplicaState::Loading,
        ReplicaState::Ready,
        ReplicaState::Restarting,
        ReplicaState::Draining,
        ReplicaState::Stopped,
        ReplicaState::Failed,
    ];

    /// The lowercase name used in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Restarting => "restarting",
            ReplicaState::Draining => "draining",
            ReplicaState::Stopped => "stopped",
            ReplicaState::Failed => "failed",
        }
    }

    /// Every state, for metrics that count replicas by state.
    pub fn all() -> &'static [ReplicaState] {
        &Self::ALL
    }
}

/// A request as it waits in a replica's queue.
#[derive(Debug)]
pub struct Pending {
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// Inputs, already checked against the model's metadata.
    pub inputs: TensorMap,
    /// The inputs' first dimension.
    pub rows: usize,
    /// Tokens in the inputs (text models; 0 otherwise).
    pub tokens: usize,
    pub priority: Priority,
    /// Set when queued.
    pub enqueued: Instant,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// The deadline as the caller gave it, for the error message.
    pub timeout_ms: u64,
    /// Where the answer goes.
    pub reply: RpcReplyPort<Result<InferOutput, InferError>>,
    /// The caller's span, so the engine's work shows under the request in traces.
    pub span: tracing::Span,
}

impl QueueItem for Pending {
    fn priority(&self) -> Priority {
        self.priority
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn cancelled(&self) -> bool {
        self.reply.is_closed()
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
    fn joinable(&self, other: &Self) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .all(|(name, t)| other.inputs.get(name).is_some_and(|o| t.joinable(o)))
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct InferOutput {
    pub outputs: TensorMap,
    /// The replica that served it.
    pub replica: String,
    /// Time spent waiting in the queue.
    pub queue_us: u64,
    /// Time the engine spent on the batch.
    pub compute_us: u64,
    /// How many requests shared the engine call.
    pub batch_size: usize,
}

struct QueueState {
    queue: RequestQueue<Pending>,
    /// No new requests; the engine thread exits once the queue is empty.
    closing: bool,
}

/// Text in one request above which counting its tokens leaves the async scheduler.
pub const BLOCKING_TEXT_BYTES: usize = 64 * 1024;

/// Counters and queue of one replica.
pub struct ReplicaShared {
    /// `{model}-{index}`, unique on the node.
    pub id: String,
    pub model: String,
    pub version: String,
    /// The device the replica is pinned to.
    pub device: Device,
    batching: BatchingConfig,
    state: AtomicU8,
    queue: Mutex<QueueState>,
    wake: Condvar,
    queued: AtomicUsize,
    running: AtomicUsize,
    served: AtomicU64,
    failed: AtomicU64,
    restarts: AtomicU64,
    memory_bytes: AtomicU64,
    last_error: Mutex<Option<String>>,
    metadata: OnceLock<Arc<ModelMetadata>>,
    token_counter: OnceLock<TokenCounter>,
    latency_us: Mutex<Histogram<u64>>,
    metrics: ModelMetrics,
}

/// A point-in-time view of a replica, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub id: String,
    pub state: ReplicaState,
    pub device: String,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub in_flight: usize,
    pub served: u64,
    pub failed: u64,
    pub restarts: u64,
    pub memory_bytes: u64,
    pub latency_us: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReplicaShared {
    /// A replica of `model` with index `index` and a queue of `capacity` requests.
    pub fn new(
        model: &ModelConfig,
        index: usize,
        device: Device,
        capacity: usize,
        metrics: ModelMetrics,
    ) -> Arc<Self> {
        let aging = Duration::from_millis(model.batching.priority_aging_ms);
        Arc::new(ReplicaShared {
            id: format!("{}-{index}", model.name),
            model: model.name.clone(),
            version: model.version.clone(),
            device,
            batching: model.batching.clone(),
            state: AtomicU8::new(ReplicaState::Loading as u8),
            queue: Mutex::new(QueueState {
                queue: RequestQueue::new(capacity, aging),
                closing: false,
            }),
            wake: Condvar::new(),
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            memory_bytes: AtomicU64::new(0),
            last_error: Mutex::new(None),
            metadata: OnceLock::new(),
            token_counter: OnceLock::new(),
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3)
                    .expect("static histogram bounds are valid"),
            ),
            metrics,
        })
    }

    /// The replica's state now.
    pub fn state(&self) -> ReplicaState {
        let v = self.state.load(Ordering::Acquire);
        ReplicaState::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(ReplicaState::Failed)
    }

    pub(crate) fn set_state(&self, s: ReplicaState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Whether the router may send it requests.
    pub fn is_ready(&self) -> bool {
        self.state() == ReplicaState::Ready
    }

    /// The most rows one engine call takes: `max_batch_size`, or 1 for a model whose
    /// requests cannot share a call ([`ModelMetadata::batchable`]).
    pub fn max_rows(&self) -> usize {
        if self.metadata().is_none_or(|m| m.batchable()) {
            self.batching.max_batch_size.max(1)
        } else {
            1
        }
    }

    /// The rows of each part of a request of `rows` rows and `tokens` tokens: `[rows]`
    /// when one engine call may take it whole. Else consecutive parts of at most
    /// [`max_rows`](Self::max_rows) rows; for a text model over `max_batch_tokens`, also of
    /// at most that many tokens, by each row's count from `row_tokens` (called only then;
    /// a single row over the limit is a part of its own).
    pub fn part_sizes(
        &self,
        rows: usize,
        tokens: usize,
        row_tokens: impl FnOnce() -> Option<Vec<usize>>,
    ) -> Vec<usize> {
        let (max_rows, max_tokens) = (self.max_rows(), self.batching.max_batch_tokens);
        let over_tokens = max_tokens > 0 && tokens > max_tokens && rows > 1;
        if rows <= max_rows && !over_tokens {
            return vec![rows];
        }
        let per_row = if over_tokens { row_tokens() } else { None };
        part_sizes(rows, max_rows, max_tokens, per_row.as_deref())
    }

    /// Requests the queue holds at most.
    pub fn queue_capacity(&self) -> usize {
        lock(&self.queue).queue.capacity()
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Requests queued or running: the load figure the router balances on.
    pub fn outstanding(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.running.load(Ordering::Relaxed)
    }

    /// The model's metadata, once an engine has loaded.
    pub fn metadata(&self) -> Option<&Arc<ModelMetadata>> {
        self.metadata.get()
    }

    /// Counts a request's tokens, for text models. Called from request handlers: for a
    /// request with more than [`BLOCKING_TEXT_BYTES`] of text the tokenizer runs under
    /// [`cohort_cluster::blocking`], so that the worker's other tasks do not wait behind it.
    pub fn count_tokens(&self, inputs: &TensorMap) -> usize {
        let Some(count) = self.token_counter.get() else {
            return 0;
        };
        let text: usize = inputs
            .values()
            .map(|t| match &t.data {
                TensorData::String(v) => v.iter().map(String::len).sum(),
                _ => 0,
            })
            .sum();
        if text > BLOCKING_TEXT_BYTES {
            cohort_cluster::blocking(|| count(inputs))
        } else {
            count(inputs)
        }
    }

    /// Times the replica was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn note_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.metrics.restarts.inc();
    }

    /// The last load or engine failure.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub(crate) fn set_last_error(&self, e: String) {
        *lock(&self.last_error) = Some(e);
    }

    /// Queues a request. Fails at once, handing the request back, when the queue is full
    /// or the replica is closing.
    pub fn submit(&self, p: Pending) -> Result<(), Box<(InferError, Pending)>> {
        self.enqueue(p, true)
    }

    /// Queues a request that waited in another replica's queue, keeping the time it was
    /// first queued (for its priority's aging and the queue-delay figures).
    pub(crate) fn requeue(&self, p: Pending) -> Result<(), Box<(InferError, Pending)>> {
        self.enqueue(p, false)
    }

    fn enqueue(&self, mut p: Pending, fresh: bool) -> Result<(), Box<(InferError, Pending)>> {
        let mut q = lock(&self.queue);
        if q.closing {
            drop(q);
            let err = InferError::ReplicaStopping {
                model: self.model.clone(),
                replica: self.id.clone(),
            };
            return Err(Box::new((err, p)));
        }
        if fresh {
            p.enqueued = Instant::now();
        }
        let rows_before = q.queue.rows();
        let was_empty = q.queue.is_empty();
        match q.queue.push(p) {
            Ok(()) => {
                self.queued.store(q.queue.len(), Ordering::Relaxed);
                // The engine thread waits without a deadline only on an empty queue, and
                // with one (the batch delay) only while the batch is short of
                // `max_batch_size` rows: only the first request and the one that fills the
                // batch can change what it does. Waking it for the others would cost a
                // syscall and a context switch per request for nothing.
                let max = self.max_rows();
                let wake = was_empty || (rows_before < max && q.queue.rows() >= max);
                drop(q);
                if wake {
                    self.wake.notify_one();
                }
                Ok(())
            }
            Err(Full(p)) => {
                let capacity = q.queue.capacity();
                drop(q);
                let err = InferError::Overloaded {
                    replica: self.id.clone(),
                    capacity,
                };
                Err(Box::new((err, p)))
            }
        }
    }

    /// Stops taking requests and marks the replica draining; the engine thread finishes
    /// the queue, then exits. The state changes under the queue's lock, so an engine that
    /// finishes loading at the same moment cannot mark the replica ready again.
    pub(crate) fn close(&self) {
        let mut q = lock(&self.queue);
        q.closing = true;
        self.set_state(ReplicaState::Draining);
        drop(q);
        self.wake.notify_all();
    }

    /// Marks the replica ready after its engine loaded, unless it is closing (it was
    /// scaled down meanwhile): then it stays draining. Returns whether it is ready.
    fn mark_loaded(&self) -> bool {
        let q = lock(&self.queue);
        let state = if q.closing {
            ReplicaState::Draining
        } else {
            ReplicaState::Ready
        };
        self.set_state(state);
        drop(q);
        state == ReplicaState::Ready
    }

    /// Takes requests again (a restarted replica).
    pub(crate) fn reopen(&self) {
        lock(&self.queue).closing = false;
    }

    /// Closes the queue and takes out everything still waiting in it: the replica is going
    /// away and its engine will not serve them (the supervisor moves them to another
    /// replica, or answers them).
    pub(crate) fn close_and_take(&self) -> Vec<Pending> {
        let mut q = lock(&self.queue);
        q.closing = true;
        let items = q.queue.drain_all();
        self.queued.store(0, Ordering::Relaxed);
        items
    }

    /// Answers a request that no replica will serve, counting it as failed here.
    pub(crate) fn refuse(&self, p: Pending, err: InferError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let _ = p.reply.send(Err(err));
    }

    /// A view for the API.
    pub fn status(&self) -> ReplicaStatus {
        let (queue_depth, queue_capacity) = {
            let q = lock(&self.queue);
            (q.queue.len(), q.queue.capacity())
        };
        let latency_us = {
            let h = lock(&self.latency_us);
            let mut m = BTreeMap::new();
            if !h.is_empty() {
                m.insert("p50", h.value_at_quantile(0.50));
                m.insert("p90", h.value_at_quantile(0.90));
                m.insert("p99", h.value_at_quantile(0.99));
                m.insert("max", h.max());
            }
            m
        };
        ReplicaStatus {
            id: self.id.clone(),
            state: self.state(),
            device: self.device.to_string(),
            queue_depth,
            queue_capacity,
            in_flight: self.running.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            restarts: self.restarts(),
            memory_bytes: self.memory_bytes.load(Ordering::Relaxed),
            latency_us,
            last_error: self.last_error(),
        }
    }

    /// Blocks until a batch is due; `None` once closing and empty.
    fn next_batch(&self) -> Option<Taken<Pending>> {
        let max = self.max_rows();
        let delay = Duration::from_micros(self.batching.max_queue_delay_us);
        let mut q = lock(&self.queue);
        loop {
            if q.queue.is_empty() {
                if q.closing {
                    return None;
                }
                q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if !delay.is_zero() && !q.closing && q.queue.rows() < max {
                if let Some(oldest) = q.queue.oldest() {
                    let now = Instant::now();
                    let due = oldest + delay;
                    if now < due {
                        q = self
                            .wake
                            .wait_timeout(q, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        continue;
                    }
                }
            }
            let taken = q
                .queue
                .take_batch(Instant::now(), max, self.batching.max_batch_tokens);
            self.queued.store(q.queue.len(), Ordering::Relaxed);
            self.running.store(taken.batch.len(), Ordering::Relaxed);
            return Some(taken);
        }
    }
}

/// Why the engine thread stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineExit {
    /// The queue was closed and is now empty.
    Drained,
    /// The engine could not be loaded.
    LoadFailed(String),
    /// The engine panicked.
    Panicked(String),
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Starts the engine thread of a replica; it reports to `instance` when it is ready and
/// when it exits.
pub(crate) fn spawn_engine_thread(
    shared: Arc<ReplicaShared>,
    model: ModelConfig,
    load: LoadContext,
    instance: ActorRef<ModelInstanceMsg>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("engine-{}", shared.id))
        .spawn(move || {
            let exit = engine_thread(&shared, &model, &load, &instance);
            let _ = instance.cast(ModelInstanceMsg::EngineExited(exit));
        })
}

fn engine_thread(
    shared: &Arc<ReplicaShared>,
    model: &ModelConfig,
    load: &LoadContext,
    instance: &ActorRef<ModelInstanceMsg>,
) -> EngineExit {
    let span = tracing::info_span!("replica", replica = %shared.id);
    let _guard = span.enter();
    shared.set_state(ReplicaState::Loading);
    let started = Instant::now();
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        cohort_engines::load_engine(model, load)
    }));
    let mut engine: Box<dyn Engine> = match loaded {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return EngineExit::LoadFailed(e.to_string()),
        Err(p) => return EngineExit::LoadFailed(format!("panicked: {}", panic_message(&*p))),
    };
    let meta = engine.metadata().clone();
    if let Some(existing) = shared.metadata() {
        if **existing != meta {
            return EngineExit::LoadFailed(
                "the model's inputs or outputs changed since the replica first loaded".into(),
            );
        }
    } else {
        if !meta.batchable() {
            tracing::info!(
                "requests run one at a time: not every input and output of the model has a dynamic first (batch) dimension"
            );
        }
        let _ = shared.metadata.set(Arc::new(meta));
    }
    shared
        .memory_bytes
        .store(engine.memory_bytes(), Ordering::Relaxed);
    if let Some(counter) = engine.token_counter() {
        let _ = shared.token_counter.set(counter);
    }
    let ready = shared.mark_loaded();
    tracing::info!(
        load_ms = started.elapsed().as_millis() as u64,
        ready,
        "engine loaded"
    );
    let _ = instance.cast(ModelInstanceMsg::EngineReady);

    while let Some(taken) = shared.next_batch() {
        // Requests that leave the queue without running still waited in it: the longest
        // waits under overload are exactly these, and the queue-delay figures must show them.
        let now = Instant::now();
        for p in taken.expired.iter().chain(&taken.cancelled) {
            let waited = now.saturating_duration_since(p.enqueued);
            shared.metrics.queue_seconds.observe(waited.as_secs_f64());
        }
        for p in taken.expired {
            let err = InferError::Timeout {
                timeout_ms: p.timeout_ms,
            };
            shared.failed.fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(err));
        }
        drop(taken.cancelled);
        if taken.batch.is_empty() {
            shared.running.store(0, Ordering::Relaxed);
            continue;
        }
        if let Err(reason) = run_batch(shared, engine.as_mut(), taken.batch) {
            shared.running.store(0, Ordering::Relaxed);
            return EngineExit::Panicked(reason);
        }
        shared.running.store(0, Ordering::Relaxed);
    }
    EngineExit::Drained
}

/// Runs one batch and answers its requests. `Err` when the engine panicked.
fn run_batch(
    shared: &ReplicaShared,
    engine: &mut dyn Engine,
    batch: Vec<Pending>,
) -> Result<(), String> {
    let size = batch.len();
    let batch_span = tracing::debug_span!("batch", size);
    for p in &batch {
        batch_span.follows_from(&p.span);
    }
    let _g = batch_span.enter();
    let rows: Vec<usize> = batch.iter().map(|p| p.rows).collect();
    let start = Instant::now();
    let joined = if size == 1 {
        Ok(None)
    } else {
        let maps: Vec<&TensorMap> = batch.iter().map(|p| &p.inputs).collect();
        concat_maps(&maps).map(Some)
    };
    let result = match joined {
        Ok(joined) => {
            let inputs = joined.as_ref().unwrap_or(&batch[0].inputs);
            catch_unwind(AssertUnwindSafe(|| engine.infer(inputs)))
        }
        Err(e) => Ok(Err(e.into())),
    };
    let compute = start.elapsed();
    let compute_us = compute.as_micros() as u64;
    shared.metrics.batch_size.observe(size as f64);
    shared
        .metrics
        .compute_seconds
        .observe(compute.as_secs_f64());

    let (answers, panicked): (Vec<Result<TensorMap, InferError>>, Option<String>) = match result {
        // A request that ran alone gets the outputs as the model gave them: a model that
        // is not batched may answer with a scalar, or rows that are not the request's.
        Ok(Ok(out)) if size == 1 => (vec![Ok(out)], None),
        Ok(Ok(out)) => match split_map(&out, &rows) {
            Ok(parts) => (parts.into_iter().map(Ok).collect(), None),
            Err(e) => {
                let err = InferError::InferenceFailed(format!("engine output: {e}"));
                (vec![Err(err); size], None)
            }
        },
        Ok(Err(e)) => {
            let err = match e {
                // The engine's own check of the inputs: the client's mistake (400).
                cohort_engines::EngineError::Input(ie) => InferError::InvalidInput(ie),
                cohort_engines::EngineError::Inference(msg) => InferError::InferenceFailed(msg),
                other => InferError::InferenceFailed(other.to_string()),
            };
            let ids: Vec<&str> = batch.iter().map(|p| p.request_id.as_str()).collect();
            tracing::warn!(replica = %shared.id, requests = ?ids, error = %err, "engine call failed");
            (vec![Err(err); size], None)
        }
        Err(p) => {
            let msg = panic_message(&*p);
            let ids: Vec<&str> = batch.iter().map(|p| p.request_id.as_str()).collect();
            tracing::error!(replica = %shared.id, requests = ?ids, panic = %msg, "engine panicked");
            shared.set_last_error(format!("engine panicked: {msg}"));
            shared.set_state(ReplicaState::Restarting);
            let err = InferError::InferenceFailed(format!("engine panicked: {msg}"));
            (vec![Err(err); size], Some(msg))
        }
    };
    let now = Instant::now();
    {
        let mut hist = lock(&shared.latency_us);
        for p in &batch {
            let total = now.saturating_duration_since(p.enqueued).as_micros() as u64;
            let _ = hist.record(total.max(1));
        }
    }
    for (p, answer) in batch.into_iter().zip(answers) {
        let queue_us = start.saturating_duration_since(p.enqueued).as_micros() as u64;
        shared
            .metrics
            .queue_seconds
            .observe(queue_us as f64 / 1_000_000.0);
        let reply = match answer {
            Ok(outputs) => {
                shared.served.fetch_add(1, Ordering::Relaxed);
                Ok(InferOutput {
                    outputs,
                    replica: shared.id.clone(),
                    queue_us,
                    compute_us,
                    batch_size: size,
                })
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        };
        let _ = p.reply.send(reply);
    }
    match panicked {
        Some(msg) => Err(msg),
        None => Ok(()),
    }
}

/// See [`ReplicaShared::part_sizes`]: greedy, in row order. `max_tokens` 0, or no
/// `row_tokens`, is no token limit.
fn part_sizes(
    rows: usize,
    max_rows: usize,
    max_tokens: usize,
    row_tokens: Option<&[usize]>,
) -> Vec<usize> {
    let max_rows = max_rows.max(1);
    let mut sizes = Vec::new();
    let (mut n, mut t) = (0usize, 0usize);
    for i in 0..rows {
        let rt = row_tokens.and_then(|r| r.get(i)).copied().unwrap_or(0);
        if n > 0 && (n == max_rows || (max_tokens > 0 && t.saturating_add(rt) > max_tokens)) {
            sizes.push(n);
            (n, t) = (0, 0);
        }
        n += 1;
        t = t.saturating_add(rt);
    }
    if n > 0 || sizes.is_empty() {
        sizes.push(n);
    }
    sizes
}

#[cfg(test)]
mod tests {
    #[test]
    fn part_sizes_respect_rows_and_each_rows_tokens() {
        use super::part_sizes;
        // Rows only.
        assert_eq!(part_sizes(10, 4, 0, None), vec![4, 4, 2]);
        assert_eq!(part_sizes(8, 4, 0, None), vec![4, 4]);
        assert_eq!(part_sizes(3, 4, 0, None), vec![3]);
        // Tokens, row by row: no part over 600 unless one row alone is.
        let rows = [1000, 10, 10, 10];
        assert_eq!(part_sizes(4, 32, 600, Some(&rows)), vec![1, 3]);
        let rows = [300, 300, 300, 10, 700, 5];
        assert_eq!(part_sizes(6, 32, 600, Some(&rows)), vec![2, 2, 1, 1]);
        // Both limits.
        assert_eq!(part_sizes(5, 2, 600, Some(&[1, 1, 1, 1, 1])), vec![2, 2, 1]);
        // An empty request is one (empty) part.
        assert_eq!(part_sizes(0, 4, 0, None), vec![0]);
    }

    use super::*;
    use cohort_config::EngineKind;

    fn replica() -> Arc<ReplicaShared> {
        let model = ModelConfig::new("m", EngineKind::Echo);
        let metrics = crate::metrics::Metrics::new().for_model("m");
        ReplicaShared::new(&model, 0, Device::Cpu, 8, metrics)
    }

    /// Refuses every call's inputs, as ONNX Runtime does with an invalid argument.
    struct Refuses(ModelMetadata);

    impl Engine for Refuses {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn infer(&mut self, _: &TensorMap) -> Result<TensorMap, cohort_engines::EngineError> {
            Err(cohort_engines::InputError {
                input: "x".into(),
                reason: "refused".into(),
            }
            .into())
        }
    }

    #[test]
    fn an_input_the_engine_refuses_is_the_clients_mistake() {
        let r = replica();
        let (tx, mut rx) = ractor::concurrency::oneshot();
        let now = Instant::now();
        let p = Pending {
            request_id: "r".into(),
            inputs: TensorMap::new(),
            rows: 1,
            tokens: 0,
            priority: Priority::Normal,
            enqueued: now,
            deadline: now + Duration::from_secs(5),
            timeout_ms: 5000,
            reply: tx.into(),
            span: tracing::Span::none(),
        };
        let mut engine = Refuses(ModelMetadata {
            inputs: vec![],
            outputs: vec![],
        });
        assert!(run_batch(&r, &mut engine, vec![p]).is_ok());
        match rx.try_recv() {
            Ok(Err(InferError::InvalidInput(e))) => assert_eq!(e.input, "x"),
            other => panic!("expected INVALID_INPUT, got {other:?}"),
        }
    }

    #[test]
    fn an_engine_that_loads_after_its_replica_was_closed_does_not_make_it_ready() {
        let r = replica();
        assert!(r.mark_loaded());
        assert_eq!(r.state(), ReplicaState::Ready);

        // Scaled down while its (re)loading engine was still starting.
        let r = replica();
        r.close();
        assert_eq!(r.state(), ReplicaState::Draining);
        assert!(!r.mark_loaded());
        assert_eq!(r.state(), ReplicaState::Draining);
        assert!(!r.is_ready());
    }
}
