//! The Open Inference Protocol (KServe v2), as NVIDIA Triton's HTTP clients speak it.
//!
//! Routes, all under `/v2`:
//!
//! | KServe v2 / Triton                                   | Cohort                                   |
//! |------------------------------------------------------|------------------------------------------|
//! | `GET /v2`                                            | server name, version, extensions         |
//! | `GET /v2/health/live`, `/v2/health/ready`            | like `/healthz`, `/readyz`; 200 or 400    |
//! | `GET /v2/models/{m}[/versions/{v}]`                  | the model's metadata (KServe datatypes)  |
//! | `GET /v2/models/{m}[/versions/{v}]/ready`            | 200 when a replica is ready, else 400    |
//! | `GET /v2/models/{m}[/versions/{v}]/config`           | a Triton-style model configuration       |
//! | `GET /v2/models/{m}[/versions/{v}]/stats`            | Triton-style statistics from the replicas |
//! | `POST /v2/models/{m}[/versions/{v}]/infer`           | the native infer path (same queues)      |
//! | `POST /v2/repository/index`                          | models with `READY`/`UNAVAILABLE`        |
//! | `POST /v2/repository/models/{m}/load`, `/unload`     | preload / unload through the supervisor  |
//!
//! Mapping:
//! - Datatypes: `FP32 FP64 FP16 INT64 INT32 INT8 UINT8 BOOL BYTES` are Cohort's
//!   `f32 f64 f16 i64 i32 i8 u8 bool string`; other KServe datatypes are refused (400).
//! - A model has one version, its configured `version`; a request for another version is
//!   answered 404. The platform is `cohort-<engine>`.
//! - An infer request's inputs become the same [`TensorMap`] the native endpoint builds and
//!   go through [`inference::submit_tensors`] and [`inference::answer`]: the same checks
//!   against the model's metadata, the same router, queues, batching and deadline. The
//!   optional request parameter `timeout` is Triton's, in microseconds.
//! - JSON `data` may be flat or nested; its element count must equal the product of
//!   `shape`. With Triton's binary tensor extension the header
//!   `Inference-Header-Content-Length: N` says the first N bytes of the body are the JSON
//!   request; an input whose `parameters` has `binary_data_size` takes that many raw bytes
//!   (little-endian; `BOOL` one byte; `BYTES` each element a 4-byte little-endian length
//!   and its UTF-8 bytes) from what follows, in input order.
//! - Outputs are returned in the order of the request's `outputs` (which selects them),
//!   else in the model's order. An output is binary when its `parameters.binary_data` is
//!   true, or, when it does not say, when the request's `parameters.binary_data_output` is;
//!   it then carries `parameters.binary_data_size`, its bytes follow the JSON in output
//!   order, and the response has `Inference-Header-Content-Length`.
//! - Errors are `{"error": "<message>"}` ([`error_response`]): 400 for the client's
//!   mistakes, 404 for an unknown model or version, 413 for a body over the limit, 503 when
//!   overloaded or no replica serves, 504 on timeout, 500 when the engine fails.
//! - Requests are counted in the metrics with the endpoint label `kserve`.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cohort_actors::router::ModelRoute;
use cohort_actors::{ReplicaState, SupervisorMsg};
use cohort_engines::{DType, ModelMetadata, Tensor, TensorData, TensorMap};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{hardening, inference, json_response, models, AppState, RequestId};

/// The header that gives the length of the JSON part of a binary request or response.
pub static INFERENCE_HEADER_CONTENT_LENGTH: HeaderName =
    HeaderName::from_static("inference-header-content-length");

/// The endpoint label of the metrics.
const ENDPOINT: &str = "kserve";

/// Deepest nesting accepted in JSON `data`.
const MAX_RANK: usize = 8;

/// How long a load waits for a ready replica.
const LOAD_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Errors

/// The one place where errors become KServe responses: the status of [`ApiError`] (which
/// maps [`cohort_actors::InferError`] too) and `{"error": "<message>"}`.
pub(crate) fn error_response(e: impl Into<ApiError>) -> Response {
    let e: ApiError = e.into();
    let status = e.status();
    let mut res = (status, json_response(&json!({"error": e.to_string()}))).into_response();
    e.add_headers(res.headers_mut());
    res
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(error_response)
}

/// The body, with the errors of reading it mapped (too large: 413, too slow: 408).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(hardening::body_error)
}

// ---------------------------------------------------------------------------
// Datatypes

/// The KServe datatype of a Cohort dtype.
pub fn datatype(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::F16 => "FP16",
        DType::I64 => "INT64",
        DType::I32 => "INT32",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::Bool => "BOOL",
        DType::String => "BYTES",
    }
}

/// The Cohort dtype of a KServe datatype, if Cohort has it.
pub fn parse_datatype(s: &str) -> Option<DType> {
    Some(match s {
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "FP16" => DType::F16,
        "INT64" => DType::I64,
        "INT32" => DType::I32,
        "INT8" => DType::I8,
        "UINT8" => DType::U8,
        "BOOL" => DType::Bool,
        "BYTES" => DType::String,
        _ => return None,
    })
}

/// Triton's model-configuration name of a dtype.
fn triton_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "TYPE_FP32",
        DType::F64 => "TYPE_FP64",
        DType::F16 => "TYPE_FP16",
        DType::I64 => "TYPE_INT64",
        DType::I32 => "TYPE_INT32",
        DType::I8 => "TYPE_INT8",
        DType::U8 => "TYPE_UINT8",
        DType::Bool => "TYPE_BOOL",
        DType::String => "TYPE_STRING",
    }
}

// ---------------------------------------------------------------------------
// Server and health

/// `GET /v2`
pub async fn server_metadata() -> Response {
    json_response(&json!({
        "name": "cohort",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

/// `GET /v2/health/live`: 200 with an empty body.
pub async fn live() -> Response {
    StatusCode::OK.into_response()
}

/// `GET /v2/health/ready`: 200 once every model that should run has a ready replica, else
/// 400 (as Triton); empty bodies.
pub async fn ready(State(state): State<AppState>) -> Response {
    let table = state.ctx.router.snapshot();
    if table.all_ready() && !state.ctx.shutting_down() {
        StatusCode::OK.into_response()
    } else {
        StatusCode::BAD_REQUEST.into_response()
    }
}

// ---------------------------------------------------------------------------
// Models

/// `{model}` and, in the `/versions/{version}` routes, `{version}`.
#[derive(Debug, Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

/// The model's route, checking the version when the path names one.
fn route_of<'t>(
    table: &'t cohort_actors::router::RoutingTable,
    path: &ModelPath,
) -> Result<&'t ModelRoute, ApiError> {
    let route = table
        .get(&path.model)
        .ok_or_else(|| ApiError::ModelNotFound(path.model.clone()))?;
    match path.version.as_deref() {
        Some(v) if !v.is_empty() && v != route.config.version => Err(ApiError::NotFound(format!(
            "model {:?} has no version {v:?} (it serves version {:?})",
            path.model, route.config.version
        ))),
        _ => Ok(route),
    }
}

fn metadata_of(route: &ModelRoute) -> Option<std::sync::Arc<ModelMetadata>> {
    route.replicas.iter().find_map(|r| r.metadata().cloned())
}

fn specs_json(specs: &[cohort_engines::TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({"name": s.name, "datatype": datatype(s.dtype), "shape": s.shape}))
        .collect()
}

/// `GET /v2/models/{m}` and `/v2/models/{m}/versions/{v}`
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Response {
    respond((|| {
        let table = state.ctx.router.snapshot();
        let route = route_of(&table, &path)?;
        let meta = metadata_of(route).ok_or_else(|| {
            ApiError::NoReplica(format!(
                "model {:?} is not loaded: no replica has its metadata",
                path.model
            ))
        })?;
        Ok(json_response(&json!({
            "name": route.config.name,
            "versions": [route.config.version],
            "platform": format!("cohort-{}", route.config.engine.as_str()),
            "inputs": specs_json(&meta.inputs),
            "outputs": specs_json(&meta.outputs),
        })))
    })())
}

/// `GET /v2/models/{m}[/versions/{v}]/ready`: 200 when a replica is ready, else 400.
pub async fn model_ready(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    let table = state.ctx.router.snapshot();
    match route_of(&table, &path) {
        Ok(route) if route.replicas.iter().any(|r| r.is_ready()) => StatusCode::OK.into_response(),
        Ok(_) => StatusCode::BAD_REQUEST.into_response(),
        Err(e) => error_response(e),
    }
}

/// `GET /v2/models/{m}[/versions/{v}]/config`: a Triton-style configuration. A model that
/// batches along its first dimension has `dims` without it and the batcher's
/// `max_batch_size`; one that cannot ([`cohort_engines::ModelMetadata::batchable`]) has
/// full `dims` and `max_batch_size` 0, as in Triton.
pub async fn model_config(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    respond((|| {
        let table = state.ctx.router.snapshot();
        let route = route_of(&table, &path)?;
        let c = &route.config;
        let meta = metadata_of(route);
        let batched = meta.as_ref().is_none_or(|m| m.batchable());
        let dims = |specs: &[cohort_engines::TensorSpec]| -> Vec<Value> {
            specs
                .iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "data_type": triton_type(s.dtype),
                        "dims": s.shape.iter().skip(usize::from(batched)).collect::<Vec<_>>(),
                    })
                })
                .collect()
        };
        let (input, output) = match &meta {
            Some(m) => (dims(&m.inputs), dims(&m.outputs)),
            None => (vec![], vec![]),
        };
        // A GPU by the setting, or by where an `auto` replica was placed.
        let on_gpu = c.device.starts_with("cuda")
            || route
                .replicas
                .iter()
                .any(|r| r.device != cohort_engines::Device::Cpu);
        let kind = if on_gpu { "KIND_GPU" } else { "KIND_CPU" };
        let max_batch_size = if batched {
            c.batching.max_batch_size.max(1)
        } else {
            0
        };
        let mut v = json!({
            "name": c.name,
            "platform": format!("cohort-{}", c.engine.as_str()),
            "backend": "cohort",
            "version_policy": {"specific": {"versions": [c.version]}},
            "max_batch_size": max_batch_size,
            "input": input,
            "output": output,
            "instance_group": [{"name": c.name, "kind": kind, "count": c.replicas}],
        });
        if batched && c.batching.max_batch_size > 1 {
            v["dynamic_batching"] = json!({
                "max_queue_delay_microseconds": c.batching.max_queue_delay_us,
            });
        }
        Ok(json_response(&v))
    })())
}

/// How many engine calls (batches) a model ran, from the `cohort_batch_size` histogram.
fn execution_count(state: &AppState, model: &str) -> u64 {
    state.ctx.metrics.batches(model)
}

/// `GET /v2/models/{m}[/versions/{v}]/stats`: Triton-style statistics. `inference_count`
/// and `success` count the requests the replicas answered, `fail` those they failed,
/// `execution_count` the engine calls (batches). Durations are not kept per model here.
pub async fn model_stats(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    respond((|| {
        let table = state.ctx.router.snapshot();
        let route = route_of(&table, &path)?;
        let (served, failed) = route.replicas.iter().fold((0u64, 0u64), |(s, f), r| {
            let st = r.status();
            (s + st.served, f + st.failed)
        });
        Ok(json_response(&json!({
            "model_stats": [{
                "name": route.config.name,
                "version": route.config.version,
                "inference_count": served,
                "execution_count": execution_count(&state, &route.config.name),
                "inference_stats": {
                    "success": {"count": served},
                    "fail": {"count": failed},
                },
            }]
        })))
    })())
}

// ---------------------------------------------------------------------------
// Repository

#[derive(Debug, Default, Deserialize)]
struct IndexBody {
    #[serde(default)]
    ready: Option<bool>,
}

/// A JSON body that may be empty (then `T::default()`).
fn optional_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    max_depth: usize,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    hardening::json_depth(body, max_depth)?;
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON body: {e}")))
}

/// Why a model is not ready, for the repository index.
fn reason(route: &ModelRoute) -> String {
    if route.replicas.iter().any(|r| r.is_ready()) {
        return String::new();
    }
    if route.config.replicas == 0 {
        return "unloaded".into();
    }
    match route.replicas.first() {
        None => "no replica yet".into(),
        Some(r) => match r.last_error() {
            Some(e) => format!("{}: {e}", r.state().as_str()),
            None => r.state().as_str().to_string(),
        },
    }
}

/// `POST /v2/repository/index`, with an empty body or `{"ready": bool}` (only ready models).
pub async fn repository_index(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond((|| {
        let body = read_body(body)?;
        let parsed: IndexBody = optional_body(&body, state.ctx.config.http.max_json_depth)?;
        let table = state.ctx.router.snapshot();
        let models: Vec<Value> = table
            .models()
            .into_iter()
            .filter(|(name, _)| caller.allows_model(name))
            .filter_map(|(name, route)| {
                let ready = route.replicas.iter().any(|r| r.is_ready());
                if parsed.ready == Some(true) && !ready {
                    return None;
                }
                Some(json!({
                    "name": name,
                    "version": route.config.version,
                    "state": if ready { "READY" } else { "UNAVAILABLE" },
                    "reason": reason(route),
                }))
            })
            .collect();
        Ok(json_response(&models))
    })())
}

/// `POST /v2/repository/models/{m}/load` (any body, which is ignored): preloads the model
/// and answers 200 once a replica is ready, 400 when its replicas failed to load.
pub async fn load(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = read_body(body)?;
        let _: Option<Value> = optional_body(&body, state.ctx.config.http.max_json_depth)?;
        models::control(&state, |reply| SupervisorMsg::Preload {
            model: model.clone(),
            reply,
        })
        .await?;
        let meta = caller.audit(&rid, "model.preload", &model, json!({"via": "kserve"}));
        crate::tokens::record(&state, meta).await;
        let deadline = tokio::time::Instant::now() + LOAD_WAIT;
        loop {
            let table = state.ctx.router.snapshot();
            let route = table
                .get(&model)
                .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
            if route.replicas.iter().any(|r| r.is_ready()) {
                return Ok(StatusCode::OK.into_response());
            }
            let failed = !route.replicas.is_empty()
                && route
                    .replicas
                    .iter()
                    .all(|r| r.state() == ReplicaState::Failed);
            if failed {
                return Err(bad(format!(
                    "failed to load model {model:?}: {}",
                    reason(route)
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Timeout(format!(
                    "model {model:?} is still loading after {}s",
                    LOAD_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    .await;
    respond(result)
}

/// `POST /v2/repository/models/{m}/unload` (any body, which is ignored): stops every
/// replica (each drains first); the model stays in the index and can be loaded again.
pub async fn unload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = read_body(body)?;
        let _: Option<Value> = optional_body(&body, state.ctx.config.http.max_json_depth)?;
        models::control(&state, |reply| SupervisorMsg::SetReplicas {
            model: model.clone(),
            replicas: 0,
            reply,
        })
        .await?;
        let meta = caller.audit(&rid, "model.unload", &model, json!({"via": "kserve"}));
        crate::tokens::record(&state, meta).await;
        Ok(StatusCode::OK.into_response())
    }
    .await;
    respond(result)
}

// ---------------------------------------------------------------------------
// Infer: the request

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn bool_param(params: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ApiError> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!(
            "parameter {key:?} must be a boolean, got {other}"
        ))),
    }
}

/// The shape as sizes, and the element count it holds.
fn shape_of(input: &InputTensor) -> Result<(Vec<usize>, usize), ApiError> {
    let dims = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            bad(format!(
                "input {:?}: shape {:?} has a negative dimension",
                input.name, input.shape
            ))
        })?;
    let count = cohort_engines::element_count(&dims)
        .ok_or_else(|| bad(format!("input {:?}: shape is too large", input.name)))?;
    Ok((dims, count))
}

/// Collects the leaves of flat or nested JSON `data`.
fn leaves<'v>(
    name: &str,
    v: &'v Value,
    depth: usize,
    out: &mut Vec<&'v Value>,
) -> Result<(), ApiError> {
    match v {
        Value::Array(items) => {
            if depth >= MAX_RANK {
                return Err(bad(format!(
                    "input {name:?}: data nested deeper than {MAX_RANK} levels"
                )));
            }
            for item in items {
                leaves(name, item, depth + 1, out)?;
            }
            Ok(())
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

/// Reads JSON `data` of `dtype` into a flat buffer of exactly `count` elements.
fn data_from_json(
    name: &str,
    dtype: DType,
    data: &Value,
    count: usize,
) -> Result<TensorData, ApiError> {
    // `count` comes from the client's shape: never allocate by it before the data is
    // known to be that long (a shape of 10^12 with one element would abort the process).
    let mut flat = Vec::new();
    leaves(name, data, 0, &mut flat)?;
    if flat.len() != count {
        return Err(bad(format!(
            "input {name:?}: data has {} elements but its shape holds {count}",
            flat.len()
        )));
    }
    let wrong = |what: &str, v: &Value| {
        bad(format!(
            "input {name:?}: expected {what} elements (datatype {}), got {v}",
            datatype(dtype)
        ))
    };
    fn each<T>(
        flat: &[&Value],
        f: impl Fn(&Value) -> Option<T>,
        err: impl Fn(&Value) -> ApiError,
    ) -> Result<Vec<T>, ApiError> {
        flat.iter().map(|v| f(v).ok_or_else(|| err(v))).collect()
    }
    Ok(match dtype {
        DType::F32 => TensorData::F32(each(
            &flat,
            |v| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()),
            |v| wrong("finite FP32", v),
        )?),
        DType::F64 => TensorData::F64(each(&flat, Value::as_f64, |v| wrong("number", v))?),
        DType::F16 => TensorData::F16(each(
            &flat,
            |v| {
                v.as_f64()
                    .map(half::f16::from_f64)
                    .filter(|x| x.is_finite())
            },
            |v| wrong("finite FP16", v),
        )?),
        DType::I64 => TensorData::I64(each(&flat, Value::as_i64, |v| wrong("integer", v))?),
        DType::I32 => TensorData::I32(each(
            &flat,
            |v| v.as_i64().and_then(|x| i32::try_from(x).ok()),
            |v| wrong("32-bit integer", v),
        )?),
        DType::I8 => TensorData::I8(each(
            &flat,
            |v| v.as_i64().and_then(|x| i8::try_from(x).ok()),
            |v| wrong("-128..127 integer", v),
        )?),
        DType::U8 => TensorData::U8(each(
            &flat,
            |v| v.as_u64().and_then(|x| u8::try_from(x).ok()),
            |v| wrong("0..255 integer", v),
        )?),
        DType::Bool => TensorData::Bool(each(&flat, Value::as_bool, |v| wrong("boolean", v))?),
        DType::String => TensorData::String(each(
            &flat,
            |v| v.as_str().map(str::to_string),
            |v| wrong("string", v),
        )?),
    })
}

/// Reads raw little-endian bytes of `dtype` into a flat buffer of exactly `count` elements.
fn data_from_bytes(
    name: &str,
    dtype: DType,
    raw: &[u8],
    count: usize,
) -> Result<TensorData, ApiError> {
    fn fixed<const N: usize, T>(
        name: &str,
        raw: &[u8],
        count: usize,
        f: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>, ApiError> {
        if Some(raw.len()) != count.checked_mul(N) {
            return Err(bad(format!(
                "input {name:?}: binary data has {} bytes but its shape and datatype need {}",
                raw.len(),
                count.saturating_mul(N)
            )));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }
    Ok(match dtype {
        DType::F32 => TensorData::F32(fixed(name, raw, count, f32::from_le_bytes)?),
        DType::F64 => TensorData::F64(fixed(name, raw, count, f64::from_le_bytes)?),
        DType::F16 => TensorData::F16(fixed(name, raw, count, half::f16::from_le_bytes)?),
        DType::I64 => TensorData::I64(fixed(name, raw, count, i64::from_le_bytes)?),
        DType::I32 => TensorData::I32(fixed(name, raw, count, i32::from_le_bytes)?),
        DType::I8 => TensorData::I8(fixed(name, raw, count, i8::from_le_bytes)?),
        DType::U8 => TensorData::U8(fixed(name, raw, count, u8::from_le_bytes)?),
        DType::Bool => TensorData::Bool(fixed(name, raw, count, |[b]: [u8; 1]| b != 0)?),
        DType::String => {
            // Each element takes at least its 4-byte length prefix.
            let mut out = Vec::with_capacity(count.min(raw.len() / 4));
            let mut rest = raw;
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
                    bad(format!(
                        "input {name:?}: BYTES element {} has a truncated length prefix",
                        out.len()
                    ))
                })?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(bad(format!(
                        "input {name:?}: BYTES element {} needs {len} bytes, {} are left",
                        out.len(),
                        tail.len()
                    )));
                }
                let (s, tail) = tail.split_at(len);
                let s = std::str::from_utf8(s).map_err(|e| {
                    bad(format!(
                        "input {name:?}: BYTES element {} is not UTF-8: {e}",
                        out.len()
                    ))
                })?;
                out.push(s.to_string());
                rest = tail;
            }
            if out.len() != count {
                return Err(bad(format!(
                    "input {name:?}: binary data has {} elements but its shape holds {count}",
                    out.len()
                )));
            }
            TensorData::String(out)
        }
    })
}

/// A parsed infer request: its tensors and what to answer.
#[derive(Debug)]
struct ParsedRequest {
    id: Option<String>,
    inputs: TensorMap,
    /// Requested outputs in order, each with whether it is binary; `None`: all outputs.
    outputs: Option<Vec<(String, bool)>>,
    /// Whether outputs that do not say are binary.
    binary_default: bool,
    timeout_ms: Option<u64>,
}

/// Splits the body by `Inference-Header-Content-Length` (when present) and reads the
/// request. JSON nested deeper than `max_depth` is refused before it is parsed.
fn parse_request(
    headers: &HeaderMap,
    body: &[u8],
    max_depth: usize,
) -> Result<ParsedRequest, ApiError> {
    let header_len = match headers.get(&INFERENCE_HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "Inference-Header-Content-Length must be a byte count, got {v:?}"
                    ))
                })?;
            if n > body.len() {
                return Err(bad(format!(
                    "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                    body.len()
                )));
            }
            Some(n)
        }
    };
    let (json_part, mut binary) = match header_len {
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    hardening::json_depth(json_part, max_depth)?;
    let req: InferRequest = serde_json::from_slice(json_part)
        .map_err(|e| bad(format!("malformed inference request JSON: {e}")))?;
    if req.inputs.is_empty() {
        return Err(bad("the request has no inputs"));
    }
    let mut inputs = TensorMap::new();
    for input in &req.inputs {
        let dtype = parse_datatype(&input.datatype).ok_or_else(|| {
            bad(format!(
                "input {:?}: unsupported datatype {:?} (FP32, FP64, FP16, INT64, INT32, INT8, \
                 UINT8, BOOL or BYTES)",
                input.name, input.datatype
            ))
        })?;
        let (shape, count) = shape_of(input)?;
        let binary_size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "input {:?}: binary_data_size must be a byte count, got {v}",
                            input.name
                        ))
                    })?,
            ),
        };
        let data = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input {:?} has both data and binary_data_size",
                    input.name
                )))
            }
            (Some(_), None) if header_len.is_none() => {
                return Err(bad(format!(
                    "input {:?} has binary_data_size but the request has no \
                     Inference-Header-Content-Length header",
                    input.name
                )))
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(bad(format!(
                        "input {:?}: binary_data_size is {size} but only {} bytes of binary \
                         data are left",
                        input.name,
                        binary.len()
                    )));
                }
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                data_from_bytes(&input.name, dtype, raw, count)?
            }
            (None, Some(data)) => data_from_json(&input.name, dtype, data, count)?,
            (None, None) => {
                return Err(bad(format!(
                    "input {:?} has neither data nor binary_data_size",
                    input.name
                )))
            }
        };
        let tensor =
            Tensor::new(shape, data).map_err(|e| bad(format!("input {:?}: {e}", input.name)))?;
        if inputs.insert(input.name.clone(), tensor).is_some() {
            return Err(bad(format!("input {:?} is given twice", input.name)));
        }
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that no input's binary_data_size \
             accounts for",
            binary.len()
        )));
    }
    let binary_default = bool_param(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = match &req.outputs {
        None => None,
        Some(list) => {
            let mut v = Vec::with_capacity(list.len());
            for o in list {
                let binary = bool_param(&o.parameters, "binary_data")?.unwrap_or(binary_default);
                v.push((o.name.clone(), binary));
            }
            Some(v)
        }
    };
    let timeout_ms = match req.parameters.as_ref().and_then(|p| p.get("timeout")) {
        None | Some(Value::Null) => None,
        Some(v) => {
            let us = v.as_u64().ok_or_else(|| {
                bad(format!(
                    "parameter \"timeout\" must be microseconds, got {v}"
                ))
            })?;
            Some(us.div_ceil(1000))
        }
    };
    Ok(ParsedRequest {
        id: req.id,
        inputs,
        outputs,
        binary_default,
        timeout_ms,
    })
}

// ---------------------------------------------------------------------------
// Infer: the response

/// A flat buffer written as a JSON array.
struct FlatData<'a>(&'a TensorData);

impl Serialize for FlatData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::F32(d) => d.serialize(s),
            TensorData::F64(d) => d.serialize(s),
            TensorData::F16(d) => {
                let mut seq = s.serialize_seq(Some(d.len()))?;
                for v in d {
                    seq.serialize_element(&v.to_f32())?;
                }
                seq.end()
            }
            TensorData::I64(d) => d.serialize(s),
            TensorData::I32(d) => d.serialize(s),
            TensorData::I8(d) => d.serialize(s),
            TensorData::U8(d) => d.serialize(s),
            TensorData::Bool(d) => d.serialize(s),
            TensorData::String(d) => d.serialize(s),
        }
    }
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<FlatData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

/// A requested output the model does not have (400).
fn unknown_output(name: &str, have: Vec<&str>) -> ApiError {
    bad(format!(
        "unknown output {name:?}; the model returns {have:?}"
    ))
}

/// Builds the response: JSON alone, or JSON then the binary outputs.
fn build_response(
    model: &str,
    version: &str,
    req: &ParsedRequest,
    meta: Option<&ModelMetadata>,
    outputs: &TensorMap,
) -> Result<Response, ApiError> {
    // Which outputs, in which order, binary or not.
    let chosen: Vec<(&str, &Tensor, bool)> = match &req.outputs {
        Some(list) => list
            .iter()
            .map(|(name, binary)| {
                outputs
                    .get_key_value(name)
                    .map(|(k, t)| (k.as_str(), t, *binary))
                    .ok_or_else(|| {
                        unknown_output(name, outputs.keys().map(String::as_str).collect())
                    })
            })
            .collect::<Result<_, _>>()?,
        None => {
            let mut names: Vec<&str> = meta
                .map(|m| m.outputs.iter().map(|s| s.name.as_str()).collect())
                .unwrap_or_default();
            names.retain(|n| outputs.contains_key(*n));
            for k in outputs.keys() {
                if !names.contains(&k.as_str()) {
                    names.push(k);
                }
            }
            names
                .into_iter()
                .filter_map(|n| {
                    outputs
                        .get_key_value(n)
                        .map(|(k, t)| (k.as_str(), t, req.binary_default))
                })
                .collect()
        }
    };
    let mut raw = Vec::new();
    let mut list = Vec::with_capacity(chosen.len());
    for (name, t, binary) in &chosen {
        let (data, parameters) = if *binary {
            let before = raw.len();
            t.data.write_le_bytes(&mut raw);
            (None, Some(json!({"binary_data_size": raw.len() - before})))
        } else {
            (Some(FlatData(&t.data)), None)
        };
        list.push(OutputJson {
            name,
            datatype: datatype(t.dtype()),
            shape: &t.shape,
            data,
            parameters,
        });
    }
    let body = InferResponse {
        model_name: model,
        model_version: version,
        id: req.id.as_deref(),
        outputs: list,
    };
    let mut bytes = serde_json::to_vec(&body)
        .map_err(|e| ApiError::InferenceFailed(format!("cannot encode the response: {e}")))?;
    if chosen.iter().any(|(_, _, binary)| *binary) {
        let header_len = bytes.len();
        bytes.extend_from_slice(&raw);
        Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    INFERENCE_HEADER_CONTENT_LENGTH.clone(),
                    HeaderValue::from(header_len),
                ),
            ],
            bytes,
        )
            .into_response())
    } else {
        Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response())
    }
}

/// `POST /v2/models/{m}[/versions/{v}]/infer`: JSON, or Triton's binary tensor extension.
pub async fn infer(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    Path(path): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        // The model first: an unknown model is 404 whatever the body.
        let (version, meta) = {
            let table = state.ctx.router.snapshot();
            let route = route_of(&table, &path)?;
            (route.config.version.clone(), metadata_of(route))
        };
        let body = read_body(body)?;
        let mut req = parse_request(&headers, &body, state.ctx.config.http.max_json_depth)?;
        drop(body);
        // Requested outputs the model does not have: 400 before any compute (a retry can
        // never succeed, so no 503 or 504 may come first).
        if let (Some(list), Some(meta)) = (&req.outputs, meta.as_deref()) {
            if let Some((name, _)) = list
                .iter()
                .find(|(name, _)| !meta.outputs.iter().any(|s| &s.name == name))
            {
                let have = meta.outputs.iter().map(|s| s.name.as_str()).collect();
                return Err(unknown_output(name, have));
            }
        }
        let inputs = std::mem::take(&mut req.inputs);
        let queued =
            inference::submit_tensors(&state, &path.model, inputs, req.timeout_ms, &rid.0)?;
        let out = inference::answer(queued).await?;
        build_response(&path.model, &version, &req, meta.as_deref(), &out.outputs)
    }
    .await;
    let response = respond(result);
    inference::record(&state, &path.model, ENDPOINT, response.status(), started);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary-extension body: `json`, then `tail`; with the header value that says where
    /// the JSON ends.
    fn binary_body(json: &[u8], tail: &[&[u8]]) -> (Vec<u8>, String) {
        let mut body = json.to_vec();
        for part in tail {
            body.extend_from_slice(part);
        }
        (body, json.len().to_string())
    }

    fn headers(n: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = n {
            h.insert(
                INFERENCE_HEADER_CONTENT_LENGTH.clone(),
                HeaderValue::from_str(n).expect("header"),
            );
        }
        h
    }

    #[test]
    fn datatypes_round_trip() {
        for d in [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::I64,
            DType::I32,
            DType::I8,
            DType::U8,
            DType::Bool,
            DType::String,
        ] {
            assert_eq!(parse_datatype(datatype(d)), Some(d));
        }
        assert_eq!(parse_datatype("UINT16"), None);
    }

    #[test]
    fn json_data_flat_or_nested() {
        let body = br#"{"id":"a","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]},
            {"name":"s","shape":[2],"datatype":"BYTES","data":["p","q"]}]}"#;
        let r = parse_request(&headers(None), body, 64).expect("valid");
        assert_eq!(r.id.as_deref(), Some("a"));
        assert_eq!(
            r.inputs["x"].data,
            TensorData::F32(vec![1.0, 2.0, 3.0, 4.0])
        );
        assert_eq!(r.inputs["x"].shape, vec![2, 2]);
        let body = br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}]}"#;
        let e = parse_request(&headers(None), body, 64).expect_err("count");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT16","data":[1]}]}"#;
        assert!(parse_request(&headers(None), body, 64).is_err());
    }

    #[test]
    fn binary_inputs_and_bytes() {
        let json = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"s","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}]}"#;
        let (body, n) = binary_body(
            json,
            &[
                &1.5f32.to_le_bytes(),
                &(-2.0f32).to_le_bytes(),
                &2u32.to_le_bytes(),
                b"hi",
                &1u32.to_le_bytes(),
                b"!",
            ],
        );
        let r = parse_request(&headers(Some(&n)), &body, 64).expect("valid");
        assert_eq!(r.inputs["x"].data, TensorData::F32(vec![1.5, -2.0]));
        assert_eq!(
            r.inputs["s"].data,
            TensorData::String(vec!["hi".into(), "!".into()])
        );
        // Wrong sizes and headers.
        assert!(parse_request(&headers(Some("abc")), &body, 64).is_err());
        assert!(parse_request(&headers(Some("999999")), &body, 64).is_err());
        let mut extra = body.clone();
        extra.push(0);
        assert!(parse_request(&headers(Some(&n)), &extra, 64).is_err());
        assert!(parse_request(&headers(None), json, 64).is_err());
    }

    #[test]
    fn a_huge_shape_with_little_data_is_a_400_not_an_allocation() {
        // 10^12 elements claimed, one given: reserving the claim would abort the process.
        let body =
            br#"{"inputs":[{"name":"x","shape":[1000000000000],"datatype":"FP32","data":[1]}]}"#;
        let e = parse_request(&headers(None), body, 64).expect_err("count");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("1000000000000"), "{e}");
        let json = br#"{"inputs":[{"name":"s","shape":[1000000000000],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}"#;
        let (body, n) = binary_body(json, &[&1u32.to_le_bytes(), b"a"]);
        let e = parse_request(&headers(Some(&n)), &body, 64).expect_err("count");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn deep_json_is_refused_but_binary_data_is_not_scanned() {
        let deep = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[[[[[1]]]]]}]}"#;
        let e = parse_request(&headers(None), deep, 4).expect_err("too deep");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("max_json_depth"), "{e}");
        // The binary tail is all brackets: only the JSON part counts.
        let json = br#"{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":12}}]}"#;
        let (body, n) = binary_body(json, &[&8u32.to_le_bytes(), b"[[[[{{{{"]);
        let r = parse_request(&headers(Some(&n)), &body, 4).expect("shallow JSON");
        assert_eq!(
            r.inputs["s"].data,
            TensorData::String(vec!["[[[[{{{{".into()])
        );
    }

    #[test]
    fn binary_outputs_follow_the_json() {
        let mut outputs = TensorMap::new();
        outputs.insert(
            "y".into(),
            Tensor::new(vec![1, 2], TensorData::F32(vec![0.5, 1.0])).expect("tensor"),
        );
        let req = ParsedRequest {
            id: Some("r".into()),
            inputs: TensorMap::new(),
            outputs: None,
            binary_default: true,
            timeout_ms: None,
        };
        let res = build_response("m", "1", &req, None, &outputs).expect("response");
        let n: usize = res.headers()[&INFERENCE_HEADER_CONTENT_LENGTH]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        assert!(n > 0);
    }
}
