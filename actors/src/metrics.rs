//! The node's Prometheus metrics, declared once, all with the `cohort_` prefix.
//!
//! Each node has its own registry (two nodes in one test process do not mix figures).
//! Counters and histograms are updated where the events happen; gauges that describe the
//! present (queue depth, replicas by state) are read from the replicas when scraped.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::replica::ReplicaState;
use crate::router::RoutingTable;

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Up to `max_batch_size`'s limit (4096).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A status code as text, without allocating.
fn status_str(status: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = status;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// All metrics of one node.
pub struct Metrics {
    registry: Registry,
    /// `cohort_requests_total{model, endpoint, status}`: answered requests.
    pub requests: IntCounterVec,
    /// `cohort_request_duration_seconds{model, endpoint}`: time from arrival to answer.
    pub request_duration: HistogramVec,
    queue_seconds: HistogramVec,
    compute_seconds: HistogramVec,
    batch_size: HistogramVec,
    restarts: IntCounterVec,
    queue_depth: IntGaugeVec,
    replicas: IntGaugeVec,
    uptime: IntGauge,
    http_requests: IntCounterVec,
    /// `cohort_http_rejected_total{reason}`: requests refused before reaching a handler.
    pub http_rejected: IntCounterVec,
    /// `cohort_request_log_dropped_total`: records the request log could not keep (its
    /// queue was full, or the write failed).
    pub request_log_dropped: IntCounter,
    /// `cohort_request_log_written_total`: records written to the request log.
    pub request_log_written: IntCounter,
    raft_term: IntGauge,
    raft_commit_index: IntGauge,
    raft_applied_index: IntGauge,
    raft_is_leader: IntGauge,
    raft_leader_changes: IntCounter,
    /// Held while a scrape rebuilds the gauges and gathers, and while the Raft figures are
    /// copied: two scrapes at once would otherwise drop series or count leader changes twice.
    scrape: Mutex<()>,
}

/// Why the gateway refused a request before it reached a handler; the `reason` label of
/// `cohort_http_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Over the token's requests-per-minute limit (429).
    RateLimited,
    /// Over the token's monthly quota (429).
    Quota,
    /// No token, or an unknown or revoked one (401).
    Unauthenticated,
    /// A valid token that may not do this (403).
    Forbidden,
    /// Over the node's concurrent request limit (503).
    Concurrency,
}

impl RejectReason {
    /// Every reason, in a fixed order.
    pub fn all() -> &'static [RejectReason] {
        &[
            RejectReason::RateLimited,
            RejectReason::Quota,
            RejectReason::Unauthenticated,
            RejectReason::Forbidden,
            RejectReason::Concurrency,
        ]
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::RateLimited => "rate_limited",
            RejectReason::Quota => "quota",
            RejectReason::Unauthenticated => "unauthenticated",
            RejectReason::Forbidden => "forbidden",
            RejectReason::Concurrency => "concurrency",
        }
    }
}

/// Handles for one model, taken once so that the engine thread does no label lookups.
#[derive(Clone)]
pub struct ModelMetrics {
    pub(crate) queue_seconds: prometheus::Histogram,
    pub(crate) compute_seconds: prometheus::Histogram,
    pub(crate) batch_size: prometheus::Histogram,
    pub(crate) restarts: prometheus::IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

impl Metrics {
    /// A fresh registry with every metric declared.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(
                &r,
                HistogramVec::new(opts, labels).expect("valid histogram"),
            )
        };
        let requests = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cohort_requests_total",
                    "Requests answered, by model, endpoint and status code.",
                ),
                &["model", "endpoint", "status"],
            )
            .expect("valid counter"),
        );
        let request_duration = hist(
            "cohort_request_duration_seconds",
            "Time from a request's arrival at the gateway to its answer.",
            LATENCY_BUCKETS,
            &["model", "endpoint"],
        );
        let queue_seconds = hist(
            "cohort_queue_duration_seconds",
            "Time a request waited in a replica's queue.",
            LATENCY_BUCKETS,
            &["model"],
        );
        let compute_seconds = hist(
            "cohort_compute_duration_seconds",
            "Time the engine spent on one batch.",
            LATENCY_BUCKETS,
            &["model"],
        );
        let batch_size = hist(
            "cohort_batch_size",
            "Requests per engine call.",
            BATCH_BUCKETS,
            &["model"],
        );
        let restarts = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cohort_replica_restarts_total",
                    "Replica restarts after a failure.",
                ),
                &["model"],
            )
            .expect("valid counter"),
        );
        let queue_depth = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "cohort_queue_depth",
                    "Requests waiting in a replica's queue.",
                ),
                &["model", "replica"],
            )
            .expect("valid gauge"),
        );
        let replicas = register(
            &r,
            IntGaugeVec::new(
                Opts::new("cohort_replicas", "Replicas by model and state."),
                &["model", "state"],
            )
            .expect("valid gauge"),
        );
        let uptime = register(
            &r,
            IntGauge::new("cohort_uptime_seconds", "Seconds since the node started.")
                .expect("valid gauge"),
        );
        let counter = |name: &str, help: &str| {
            register(&r, IntCounter::new(name, help).expect("valid counter"))
        };
        let gauge =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid gauge"));
        let http_requests = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cohort_http_requests_total",
                    "HTTP requests answered, by model (a served model's name, else _other), \
                     dialect (rest, kserve, openai, other) and status code.",
                ),
                &["model", "dialect", "status"],
            )
            .expect("valid counter"),
        );
        let http_rejected = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cohort_http_rejected_total",
                    "Requests refused before reaching a handler, by reason.",
                ),
                &["reason"],
            )
            .expect("valid counter"),
        );
        // Every reason shows from the first scrape, at 0.
        for reason in RejectReason::all() {
            http_rejected.with_label_values(&[reason.as_str()]);
        }
        let request_log_dropped = counter(
            "cohort_request_log_dropped_total",
            "Request records not kept: the request log's queue was full or a write failed.",
        );
        let request_log_written = counter(
            "cohort_request_log_written_total",
            "Request records written to the request log.",
        );
        let raft_term = gauge("cohort_raft_term", "This node's Raft term.");
        let raft_commit_index = gauge(
            "cohort_raft_commit_index",
            "The highest Raft log index this node knows to be committed.",
        );
        let raft_applied_index = gauge(
            "cohort_raft_applied_index",
            "The highest Raft log index this node has applied to its cluster state.",
        );
        let raft_is_leader = gauge(
            "cohort_raft_is_leader",
            "1 while this node is the Raft leader, else 0.",
        );
        let raft_leader_changes = counter(
            "cohort_raft_leader_changes_total",
            "Times this node has seen the Raft leader change (the first election included).",
        );
        Metrics {
            registry: r,
            requests,
            request_duration,
            queue_seconds,
            compute_seconds,
            batch_size,
            restarts,
            queue_depth,
            replicas,
            uptime,
            http_requests,
            http_rejected,
            request_log_dropped,
            request_log_written,
            raft_term,
            raft_commit_index,
            raft_applied_index,
            raft_is_leader,
            raft_leader_changes,
            scrape: Mutex::new(()),
        }
    }

    /// Counts one answered HTTP request. `model` must be a served model's name or
    /// `_other` (the caller keeps the label set bounded).
    pub fn http_request(&self, model: &str, dialect: &str, status: u16) {
        let mut buf = [0u8; 5];
        self.http_requests
            .with_label_values(&[model, dialect, status_str(status, &mut buf)])
            .inc();
    }

    /// Counts one request refused before a handler (auth, rate limits, quotas, the
    /// concurrency limit).
    pub fn rejected(&self, reason: RejectReason) {
        self.http_rejected
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// How many requests were refused for `reason` so far.
    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        self.http_rejected
            .with_label_values(&[reason.as_str()])
            .get()
    }

    /// Copies the Raft figures the RaftActor publishes into the gauges (called before
    /// rendering).
    pub fn observe_raft(&self, raft: &cohort_cluster::RaftGauges) {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.raft_term.set(raft.term.load(Ordering::Relaxed) as i64);
        self.raft_commit_index
            .set(raft.commit_index.load(Ordering::Relaxed) as i64);
        self.raft_applied_index
            .set(raft.applied_index.load(Ordering::Relaxed) as i64);
        self.raft_is_leader
            .set(i64::from(raft.is_leader.load(Ordering::Relaxed)));
        // The actor counts; the counter follows (it only ever moves forward).
        let seen = raft.leader_changes.load(Ordering::Relaxed);
        let shown = self.raft_leader_changes.get();
        if seen > shown {
            self.raft_leader_changes.inc_by(seen - shown);
        }
    }

    /// The handles one model's replicas update.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        ModelMetrics {
            queue_seconds: self.queue_seconds.with_label_values(&[model]),
            compute_seconds: self.compute_seconds.with_label_values(&[model]),
            batch_size: self.batch_size.with_label_values(&[model]),
            restarts: self.restarts.with_label_values(&[model]),
        }
    }

    /// Engine calls (batches) a model has run.
    pub fn batches(&self, model: &str) -> u64 {
        self.batch_size
            .with_label_values(&[model])
            .get_sample_count()
    }

    /// The Prometheus text exposition, with gauges read from `table` now.
    pub fn render(&self, table: &RoutingTable, uptime_s: u64) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.uptime.set(uptime_s as i64);
        self.queue_depth.reset();
        self.replicas.reset();
        for (name, route) in table.models() {
            for state in ReplicaState::all() {
                let n = route
                    .replicas
                    .iter()
                    .filter(|r| r.state() == *state)
                    .count();
                self.replicas
                    .with_label_values(&[name.as_str(), state.as_str()])
                    .set(n as i64);
            }
            for r in &route.replicas {
                self.queue_depth
                    .with_label_values(&[name.as_str(), r.id.as_str()])
                    .set(r.status().queue_depth as i64);
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
