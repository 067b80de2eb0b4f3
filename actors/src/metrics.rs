//! The node's Prometheus metrics, declared once, all with the `cohort_` prefix.
//!
//! Each node has its own registry (two nodes in one test process do not mix figures).
//! Counters and histograms are updated where the events happen; gauges that describe the
//! present (queue depth, replicas by state) are read from the replicas when scraped.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::replica::ReplicaState;
use crate::router::RoutingTable;

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// All metrics of one node.
pub struct Metrics {
    registry: Registry,
    /// `cohort_requests_total{model, endpoint, status}`: answered requests.
    pub requests: IntCounterVec,
    /// `cohort_request_duration_seconds{model, endpoint}`: time from arrival to answer.
    pub request_duration: HistogramVec,
    /// `cohort_http_rejected_total{reason}`: requests the HTTP server refused before
    /// serving them (`concurrency`: the node's limit of requests at once was reached).
    pub http_rejected: IntCounterVec,
    queue_seconds: HistogramVec,
    compute_seconds: HistogramVec,
    batch_size: HistogramVec,
    restarts: IntCounterVec,
    queue_depth: IntGaugeVec,
    replicas: IntGaugeVec,
    uptime: IntGauge,
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
        let http_rejected = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "cohort_http_rejected_total",
                    "Requests refused by the HTTP server before being served, by reason.",
                ),
                &["reason"],
            )
            .expect("valid counter"),
        );
        // Shown at 0 from the start, so that alerts can rate() it.
        http_rejected.with_label_values(&["concurrency"]);
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
        Metrics {
            registry: r,
            requests,
            request_duration,
            http_rejected,
            queue_seconds,
            compute_seconds,
            batch_size,
            restarts,
            queue_depth,
            replicas,
            uptime,
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
