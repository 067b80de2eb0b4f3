//! `POST /api/v1/models/{model}/infer` and `POST /api/v1/models/{model}/batch`.
//!
//! A request is checked in the handler (JSON shape, names, dtypes and shapes against the
//! model's metadata), queued on the replica the router picks, and awaited until its
//! deadline. If the client goes away the awaiting future is dropped, the reply port
//! closes, and the engine thread skips the request before it costs compute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cohort_actors::{InferError, InferOutput, Pending, Priority, ReplicaShared};
use cohort_engines::{concat_maps, split_map, TensorMap};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::tensor_json::{tensor_from_json, TensorMapJson};
use crate::{json_body, AppState, RequestId};

/// The body of an infer request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"inputs": {"x": [[0.5, 1.0]]}}))]
pub struct InferBody {
    /// Input name → nested array (or list of strings).
    #[schema(value_type = Object)]
    pub inputs: Map<String, Value>,
    /// Engine parameters. Accepted for compatibility with clients that send them; no engine
    /// of this build reads any.
    #[serde(default)]
    #[allow(dead_code)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// `high`, `normal` (default) or `low`.
    #[serde(default)]
    #[schema(pattern = "^(high|normal|low)$")]
    pub priority: Option<String>,
    /// Deadline in milliseconds (default: the node's `limits.request_timeout_ms`).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
}

/// The body of a batch request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    /// Infer bodies, answered one by one (at most `limits.max_batch_items`).
    #[schema(value_type = Vec<InferBody>)]
    requests: Vec<Value>,
    /// Run the items at once (default) or one after the other.
    #[serde(default = "default_parallel")]
    parallel: bool,
}

fn default_parallel() -> bool {
    true
}

#[derive(Serialize)]
struct Timing {
    queue_us: u64,
    compute_us: u64,
    total_us: u64,
}

#[derive(Serialize)]
struct InferResponse<'a> {
    request_id: &'a str,
    model: &'a str,
    version: &'a str,
    outputs: TensorMapJson<'a>,
    timing: Timing,
    replica: &'a str,
    batch_size: usize,
}

/// A request queued on a replica, waiting for its answer: one part, or, for a request
/// larger than one engine call may take, several parts queued as requests of their own
/// (on any replicas), in row order.
pub(crate) struct Queued {
    /// The replica that took the first part.
    replica: Arc<ReplicaShared>,
    /// The request's tokens, for text models (0 otherwise).
    pub(crate) tokens: usize,
    parts: Vec<QueuedPart>,
    /// The request's rows (the joined outputs must have as many).
    rows: usize,
    deadline: tokio::time::Instant,
    timeout_ms: u64,
}

struct QueuedPart {
    replica: Arc<ReplicaShared>,
    rx: oneshot::Receiver<Result<InferOutput, InferError>>,
}

/// Checks a request's deadline: the node's default when none is given, else within
/// `1..=limits.max_request_timeout_ms`.
fn check_timeout(state: &AppState, timeout_ms: Option<u64>) -> Result<u64, ApiError> {
    let limits = &state.ctx.config.limits;
    let timeout_ms = timeout_ms.unwrap_or(limits.request_timeout_ms);
    if timeout_ms == 0 || timeout_ms > limits.max_request_timeout_ms {
        return Err(ApiError::InvalidInput {
            message: format!(
                "timeout_ms must be between 1 and {}",
                limits.max_request_timeout_ms
            ),
            details: Some(json!({"field": "timeout_ms"})),
        });
    }
    Ok(timeout_ms)
}

/// Checks a request and queues it on a replica of `model`.
pub(crate) fn submit(
    state: &AppState,
    model: &str,
    body: InferBody,
    request_id: &str,
) -> Result<Queued, ApiError> {
    let timeout_ms = check_timeout(state, body.timeout_ms)?;
    let priority = match body.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => Priority::parse(p).ok_or_else(|| ApiError::InvalidInput {
            message: format!("priority must be high, normal or low, not {p:?}"),
            details: Some(json!({"field": "priority"})),
        })?,
    };
    let replica = state.ctx.router.pick(model)?;
    let meta = replica
        .metadata()
        .ok_or_else(|| ApiError::NoReplica(format!("model {model:?} has not finished loading")))?;
    let mut inputs = TensorMap::new();
    for (name, value) in &body.inputs {
        let spec = meta
            .inputs
            .iter()
            .find(|s| &s.name == name)
            .ok_or_else(|| {
                let expected: Vec<&str> = meta.inputs.iter().map(|s| s.name.as_str()).collect();
                InferError::InvalidInput(cohort_engines::InputError {
                    input: name.clone(),
                    reason: format!("unknown input; the model takes {expected:?}"),
                })
            })?;
        let t = tensor_from_json(spec, value).map_err(InferError::InvalidInput)?;
        inputs.insert(name.clone(), t);
    }
    enqueue(
        state, model, replica, inputs, priority, timeout_ms, request_id,
    )
}

/// Queues inputs that are already tensors (the KServe path) on a replica of `model`: the
/// same checks against the model's metadata, queueing and retries as [`submit`].
pub(crate) fn submit_tensors(
    state: &AppState,
    model: &str,
    inputs: TensorMap,
    timeout_ms: Option<u64>,
    request_id: &str,
) -> Result<Queued, ApiError> {
    let timeout_ms = check_timeout(state, timeout_ms)?;
    let replica = state.ctx.router.pick(model)?;
    enqueue(
        state,
        model,
        replica,
        inputs,
        Priority::Normal,
        timeout_ms,
        request_id,
    )
}

/// Checks `inputs` against the replica's metadata and queues them on it. A request with
/// more rows than one engine call takes ([`ReplicaShared::part_sizes`]) is queued as parts
/// that the router places one by one; [`answer`] joins their outputs in order. A part
/// that cannot be queued fails the request, and the parts queued before it are dropped
/// unanswered (their caller is gone, so they never reach an engine).
fn enqueue(
    state: &AppState,
    model: &str,
    replica: Arc<ReplicaShared>,
    inputs: TensorMap,
    priority: Priority,
    timeout_ms: u64,
    request_id: &str,
) -> Result<Queued, ApiError> {
    let meta = replica
        .metadata()
        .ok_or_else(|| ApiError::NoReplica(format!("model {model:?} has not finished loading")))?;
    let rows = meta
        .check_inputs(&inputs)
        .map_err(InferError::InvalidInput)?;

    let tokens = replica.count_tokens(&inputs);
    let parts = split_parts(&replica, inputs, rows, tokens)?;
    let now = Instant::now();
    let timeout = Duration::from_millis(timeout_ms);
    let mut queued = Vec::with_capacity(parts.len());
    let mut next = replica;
    for (inputs, rows, tokens) in parts {
        if !queued.is_empty() {
            // Each part goes where the router would send a request of its own.
            next = state.ctx.router.pick(model)?;
        }
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            request_id: request_id.to_string(),
            inputs,
            rows,
            tokens,
            priority,
            enqueued: now,
            deadline: now + timeout,
            timeout_ms,
            reply: tx.into(),
            span: tracing::Span::current(),
        };
        let replica = state.ctx.router.submit(model, next.clone(), pending)?;
        queued.push(QueuedPart { replica, rx });
    }
    let first = queued
        .first()
        .map(|p| Arc::clone(&p.replica))
        .ok_or_else(|| ApiError::InferenceFailed("a request with no parts".into()))?;
    Ok(Queued {
        replica: first,
        tokens,
        parts: queued,
        rows,
        deadline: tokio::time::Instant::from_std(now + timeout),
        timeout_ms,
    })
}

/// The inputs of a request as the parts it is queued in, each with its rows and tokens:
/// the request itself when one engine call takes it ([`ReplicaShared::part_sizes`]). The
/// parts must fit in one replica's queue (413 otherwise: they could never all be queued).
/// Splitting and tokenizing a large text request runs off the async workers.
fn split_parts(
    replica: &ReplicaShared,
    inputs: TensorMap,
    rows: usize,
    tokens: usize,
) -> Result<Vec<(TensorMap, usize, usize)>, ApiError> {
    // Each row's tokens, for a text request over max_batch_tokens only; kept, so that the
    // parts' counts are sums rather than a second tokenization.
    let mut counted: Option<Vec<usize>> = None;
    let row_tokens = || {
        let ones = vec![1; rows];
        let rows = split_map(&inputs, &ones).ok()?;
        let each: Vec<usize> =
            cohort_cluster::blocking(|| rows.iter().map(|r| replica.count_tokens(r)).collect());
        counted = Some(each.clone());
        Some(each)
    };
    let sizes = replica.part_sizes(rows, tokens, row_tokens);
    if sizes.len() <= 1 {
        return Ok(vec![(inputs, rows, tokens)]);
    }
    let capacity = replica.queue_capacity();
    if sizes.len() > capacity {
        return Err(ApiError::PayloadTooLarge {
            message: format!(
                "a request of {rows} rows is {} parts of at most {} rows (max_batch_size, \
                 max_batch_tokens), more than a replica's queue holds ({capacity}); send fewer rows",
                sizes.len(),
                replica.max_rows()
            ),
            details: Some(json!({
                "rows": rows,
                "parts": sizes.len(),
                "max_batch_size": replica.max_rows(),
                "queue_capacity": capacity,
            })),
        });
    }
    let maps = split_map(&inputs, &sizes).map_err(|e| {
        ApiError::InferenceFailed(format!("cannot split a request of {rows} rows: {e}"))
    })?;
    let mut first_row = 0;
    Ok(cohort_cluster::blocking(|| {
        maps.into_iter()
            .zip(sizes)
            .map(|(m, n)| {
                let t = match &counted {
                    Some(each) => each.iter().skip(first_row).take(n).sum(),
                    None => replica.count_tokens(&m),
                };
                first_row += n;
                (m, n, t)
            })
            .collect()
    }))
}

/// Waits for a queued request's answer until its deadline. The parts of a request are
/// awaited together: the first that fails fails the request at once, and the parts not
/// yet answered are dropped (still queued, they never reach an engine). Their answers are
/// joined: outputs concatenated in row order, the longest queue wait, the engine time
/// summed, the largest batch, and the replicas that served it (distinct, in order,
/// comma-separated).
pub(crate) async fn answer(q: Queued) -> Result<InferOutput, ApiError> {
    let mut parts: Vec<(Arc<ReplicaShared>, Option<_>)> = q
        .parts
        .into_iter()
        .map(|p| (p.replica, Some(p.rx)))
        .collect();
    let mut outs: Vec<Option<InferOutput>> = parts.iter().map(|_| None).collect();
    let all = std::future::poll_fn(|cx| {
        let mut waiting = false;
        for ((replica, slot), out) in parts.iter_mut().zip(outs.iter_mut()) {
            let Some(rx) = slot.as_mut() else { continue };
            match std::future::Future::poll(std::pin::Pin::new(rx), cx) {
                std::task::Poll::Pending => waiting = true,
                std::task::Poll::Ready(Ok(Ok(answer))) => {
                    *out = Some(answer);
                    *slot = None;
                }
                std::task::Poll::Ready(Ok(Err(e))) => {
                    return std::task::Poll::Ready(Err(ApiError::from(e)))
                }
                std::task::Poll::Ready(Err(_closed)) => {
                    return std::task::Poll::Ready(Err(ApiError::InferenceFailed(format!(
                        "replica {} stopped before answering",
                        replica.id
                    ))))
                }
            }
        }
        if waiting {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Ok(()))
        }
    });
    match tokio::time::timeout_at(q.deadline, all).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_elapsed) => {
            return Err(InferError::Timeout {
                timeout_ms: q.timeout_ms,
            }
            .into())
        }
    }
    let outs = outs
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::InferenceFailed("a part of the request has no answer".into()))?;
    join_parts(outs, q.rows)
}

/// Joins the answers of a request's parts (see [`answer`]). Every part must give the same
/// outputs, and each joined output the request's `rows`.
fn join_parts(mut outs: Vec<InferOutput>, rows: usize) -> Result<InferOutput, ApiError> {
    if outs.len() == 1 {
        if let Some(out) = outs.pop() {
            return Ok(out);
        }
    }
    let failed = |why: String| {
        ApiError::InferenceFailed(format!("cannot join the parts of a request: {why}"))
    };
    let maps: Vec<&TensorMap> = outs.iter().map(|o| &o.outputs).collect();
    if let Some(first) = maps.first() {
        if maps.iter().any(|m| !m.keys().eq(first.keys())) {
            return Err(failed("the parts gave different outputs".into()));
        }
    }
    let outputs = concat_maps(&maps).map_err(|e| failed(e.to_string()))?;
    if let Some((name, t)) = outputs.iter().find(|(_, t)| t.shape.first() != Some(&rows)) {
        return Err(failed(format!(
            "output {name:?} has shape {:?}, not {rows} rows",
            t.shape
        )));
    }
    let mut replicas: Vec<&str> = Vec::new();
    for o in &outs {
        if !replicas.contains(&o.replica.as_str()) {
            replicas.push(&o.replica);
        }
    }
    Ok(InferOutput {
        replica: replicas.join(","),
        queue_us: outs.iter().map(|o| o.queue_us).max().unwrap_or(0),
        compute_us: outs.iter().map(|o| o.compute_us).sum(),
        batch_size: outs.iter().map(|o| o.batch_size).max().unwrap_or(0),
        outputs,
    })
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidInput {
        message: format!("malformed JSON body: {e}"),
        details: Some(json!({"line": e.line(), "column": e.column()})),
    })
}

pub(crate) fn record(
    state: &AppState,
    model: &str,
    endpoint: &str,
    status: StatusCode,
    started: Instant,
) {
    let m = &state.ctx.metrics;
    // Only served models become label values: a client cannot grow the metrics by
    // inventing model names. A success was served by the model, so only errors look.
    let model = if status.is_success() || state.ctx.router.snapshot().get(model).is_some() {
        model
    } else {
        "_unknown"
    };
    m.requests
        .with_label_values(&[model, endpoint, status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[model, endpoint])
        .observe(started.elapsed().as_secs_f64());
}

/// `POST /api/v1/models/{model}/infer`
#[utoipa::path(
    post,
    path = "/api/v1/models/{model}/infer",
    tag = "inference",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    request_body = InferBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::TokenRefusals,
        (status = 200, description = "The model's outputs", body = crate::openapi::InferResponseDoc),
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
        (status = 429, description = "Over the token's rate limit or quota", body = crate::openapi::ErrorEnvelope),
        (status = 503, description = "Overloaded or no replica", body = crate::openapi::ErrorEnvelope),
        (status = 504, description = "The deadline passed", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn infer(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let body = json_body(&state, &headers, body)?;
        let parsed: InferBody = parse_body(&body)?;
        let queued = submit(&state, &model, parsed, &rid.0)?;
        let replica = Arc::clone(&queued.replica);
        answer(queued).await.map(|out| (out, replica))
    }
    .await;
    let (status, response) = match result {
        Ok((out, replica)) => {
            let body = InferResponse {
                request_id: &rid.0,
                model: &model,
                version: &replica.version,
                outputs: TensorMapJson(&out.outputs),
                timing: Timing {
                    queue_us: out.queue_us,
                    compute_us: out.compute_us,
                    total_us: started.elapsed().as_micros() as u64,
                },
                replica: &out.replica,
                batch_size: out.batch_size,
            };
            (StatusCode::OK, crate::json_response(&body))
        }
        Err(e) => (e.status(), e.into_response()),
    };
    record(&state, &model, "infer", status, started);
    response
}

/// `POST /api/v1/models/{model}/batch`
#[utoipa::path(
    post,
    path = "/api/v1/models/{model}/batch",
    tag = "inference",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    request_body = BatchBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::TokenRefusals,
        (status = 200, description = "One result or error per item, in order", body = crate::openapi::BatchResponseDoc),
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
        (status = 413, description = "Too many items or too large", body = crate::openapi::ErrorEnvelope),
        (status = 429, description = "Over the token's rate limit or quota", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn batch(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = run_batch(&state, &rid, &model, &headers, body).await;
    let (status, response) = match result {
        Ok(v) => (StatusCode::OK, crate::json_response(&v)),
        Err(e) => (e.status(), e.into_response()),
    };
    record(&state, &model, "batch", status, started);
    response
}

async fn run_batch(
    state: &AppState,
    rid: &RequestId,
    model: &str,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<BatchResponse, ApiError> {
    let body = json_body(state, headers, body)?;
    let parsed: BatchBody = parse_body(&body)?;
    let max = state.ctx.config.limits.max_batch_items;
    if parsed.requests.len() > max {
        return Err(ApiError::PayloadTooLarge {
            message: format!(
                "a batch holds at most {max} requests, this one has {}",
                parsed.requests.len()
            ),
            details: Some(json!({"max_items": max, "items": parsed.requests.len()})),
        });
    }
    if parsed.requests.is_empty() {
        return Err(ApiError::invalid("a batch needs at least one request"));
    }
    if state.ctx.router.snapshot().get(model).is_none() {
        return Err(ApiError::ModelNotFound(model.to_string()));
    }
    let total = parsed.requests.len();
    let item_id = |i: usize| format!("{}.{i}", rid.0);
    let submit_item = |i: usize, v: Value| -> Result<Queued, ApiError> {
        let body: InferBody = serde_json::from_value(v)
            .map_err(|e| ApiError::invalid(format!("request {i}: {e}")))?;
        submit(state, model, body, &item_id(i))
    };
    let mut results: Vec<Result<InferOutput, ApiError>> = Vec::with_capacity(total);
    if parsed.parallel {
        // Queue every item first so that they can share engine calls, then collect.
        let queued: Vec<Result<Queued, ApiError>> = parsed
            .requests
            .into_iter()
            .enumerate()
            .map(|(i, v)| submit_item(i, v))
            .collect();
        for q in queued {
            results.push(match q {
                Ok(q) => answer(q).await,
                Err(e) => Err(e),
            });
        }
    } else {
        for (i, v) in parsed.requests.into_iter().enumerate() {
            let r = match submit_item(i, v) {
                Ok(q) => answer(q).await,
                Err(e) => Err(e),
            };
            results.push(r);
        }
    }
    let succeeded = results.iter().filter(|r| r.is_ok()).count();
    let items = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(out) => BatchItem {
                index,
                ok: true,
                timing: Some(json!({"queue_us": out.queue_us, "compute_us": out.compute_us})),
                replica: Some(out.replica),
                outputs: Some(OwnedOutputs(out.outputs)),
                error: None,
            },
            Err(e) => BatchItem {
                index,
                ok: false,
                outputs: None,
                replica: None,
                timing: None,
                error: Some(e.item_json()),
            },
        })
        .collect();
    Ok(BatchResponse {
        request_id: rid.0.to_string(),
        model: model.to_string(),
        summary: json!({"total": total, "succeeded": succeeded, "failed": total - succeeded}),
        results: items,
    })
}

/// Outputs owned by a batch item, written like [`TensorMapJson`] (floats in their
/// shortest form).
struct OwnedOutputs(TensorMap);

impl Serialize for OwnedOutputs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TensorMapJson(&self.0).serialize(s)
    }
}

#[derive(Serialize)]
struct BatchItem {
    index: usize,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<OwnedOutputs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timing: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

#[derive(Serialize)]
struct BatchResponse {
    request_id: String,
    model: String,
    summary: Value,
    results: Vec<BatchItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_rejected() {
        let e = parse_body::<InferBody>(br#"{"inputs": {}, "timeout": 5}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_INPUT");
        let b: InferBody =
            parse_body(br#"{"inputs": {"x": [[1]]}, "priority": "low", "timeout_ms": 10}"#)
                .unwrap();
        assert_eq!(b.priority.as_deref(), Some("low"));
        assert_eq!(b.timeout_ms, Some(10));
    }

    fn out(replica: &str, rows: &[f32], extra: Option<&str>) -> InferOutput {
        let mut outputs = TensorMap::new();
        let t = |v: &[f32]| {
            cohort_engines::Tensor::new(
                vec![v.len(), 1],
                cohort_engines::TensorData::F32(v.to_vec()),
            )
            .unwrap()
        };
        outputs.insert("y".into(), t(rows));
        if let Some(name) = extra {
            outputs.insert(name.into(), t(rows));
        }
        InferOutput {
            outputs,
            replica: replica.into(),
            queue_us: rows.len() as u64,
            compute_us: 10,
            batch_size: rows.len(),
        }
    }

    #[test]
    fn parts_join_in_row_order() {
        let joined = join_parts(
            vec![
                out("m-0", &[1.0, 2.0], None),
                out("m-1", &[3.0, 4.0], None),
                out("m-0", &[5.0], None),
            ],
            5,
        )
        .unwrap();
        assert_eq!(
            joined.outputs["y"].data,
            cohort_engines::TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0])
        );
        assert_eq!(joined.replica, "m-0,m-1");
        assert_eq!(
            (joined.queue_us, joined.compute_us, joined.batch_size),
            (2, 30, 2)
        );
    }

    #[test]
    fn parts_that_do_not_add_up_are_an_error_not_a_short_answer() {
        // A part without an output the others have.
        let e = join_parts(
            vec![out("m-0", &[1.0], Some("z")), out("m-0", &[2.0], None)],
            2,
        )
        .unwrap_err();
        assert!(e.to_string().contains("different outputs"), "{e}");
        // Rows that do not add up to the request's.
        let e =
            join_parts(vec![out("m-0", &[1.0], None), out("m-0", &[2.0], None)], 3).unwrap_err();
        assert!(e.to_string().contains("not 3 rows"), "{e}");
    }

    #[test]
    fn batch_body_defaults_to_parallel() {
        let b: BatchBody = parse_body(br#"{"requests": []}"#).unwrap();
        assert!(b.parallel);
    }
}
