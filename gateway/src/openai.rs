//! The OpenAI-compatible API: the embeddings endpoint and the model list, as OpenAI's
//! clients speak them.
//!
//! | OpenAI                 | Cohort                                                        |
//! |------------------------|---------------------------------------------------------------|
//! | `GET /v1/models`       | every served model, `owned_by: "cohort"`, `created` = node start |
//! | `POST /v1/embeddings`  | the native infer path (same queues, batching and deadline)    |
//!
//! Mapping:
//! - An embedding model is one whose metadata has one `string` input and one `f32` output
//!   of rank 2 (`[-1, width]`), as `candle-bert`. Other models are refused with 400
//!   (`param: "model"`).
//! - `input` is a string or a list of strings; all strings of a request become one queued
//!   request of that many rows, so the dynamic batcher sees it whole. Token-id input
//!   (`[int]` or `[[int]]`) is refused with 400 (`param: "input"`): the engines take text.
//!   Empty strings and empty lists are refused, as OpenAI does.
//! - `encoding_format` is `float` (default) or `base64` (each vector's little-endian `f32`
//!   bytes); `dimensions`, when given, must equal the model's width; `user` is accepted and
//!   ignored.
//! - `usage.prompt_tokens` (= `total_tokens`) is the engine's token count of the inputs (for
//!   a text over 32 × `max_length` bytes, `max_length` without tokenizing: an upper bound).
//! - Errors are `{"error": {"message", "type", "param", "code"}}`, made from
//!   [`ApiError`] in [`error_response`] only.
//! - Requests are counted in the metrics with the endpoint label `openai`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cohort_engines::{DType, ModelMetadata, Tensor, TensorData, TensorMap};
use serde::ser::{Error as _, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{hardening, inference, json_response, AppState, RequestId};

/// The endpoint label of the metrics.
const ENDPOINT: &str = "openai";

/// Most strings in one embeddings request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

// ---------------------------------------------------------------------------
// Errors

/// An error with the request parameter it is about.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    error: ApiError,
    param: Option<&'static str>,
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        let param = matches!(error, ApiError::ModelNotFound(_)).then_some("model");
        OpenAiError { error, param }
    }
}

impl From<cohort_actors::InferError> for OpenAiError {
    fn from(e: cohort_actors::InferError) -> Self {
        ApiError::from(e).into()
    }
}

/// A 400 about `param`.
fn invalid(param: &'static str, message: impl Into<String>) -> OpenAiError {
    OpenAiError {
        error: ApiError::invalid(message),
        param: Some(param),
    }
}

/// The one place where errors become OpenAI responses: the status of [`ApiError`] and
/// `{"error": {"message", "type", "param", "code"}}`; 503 carries `Retry-After`.
pub(crate) fn error_response(e: impl Into<OpenAiError>) -> Response {
    let OpenAiError { error, param } = e.into();
    let status = error.status();
    let (kind, code) = match &error {
        ApiError::InvalidInput { .. } => ("invalid_request_error", Value::Null),
        ApiError::PayloadTooLarge { .. } => ("invalid_request_error", json!("payload_too_large")),
        ApiError::ModelNotFound(_) => ("invalid_request_error", json!("model_not_found")),
        ApiError::NotFound(_) => ("invalid_request_error", json!("not_found")),
        ApiError::MethodNotAllowed => ("invalid_request_error", json!("method_not_allowed")),
        ApiError::Overloaded(_) => ("service_unavailable", json!("overloaded")),
        ApiError::NoReplica(_) => ("service_unavailable", json!("no_replica")),
        ApiError::Timeout(_) => ("timeout", json!("timeout")),
        ApiError::RequestTimeout(_) => ("invalid_request_error", json!("request_timeout")),
        ApiError::InferenceFailed(_) => ("server_error", json!("inference_failed")),
        ApiError::Unauthenticated(_) => ("authentication_error", json!("invalid_api_key")),
        ApiError::Forbidden(_) => ("permission_error", json!("forbidden")),
        ApiError::RateLimited { .. } => ("rate_limit_error", json!("rate_limit_exceeded")),
    };
    let message = match &error {
        ApiError::ModelNotFound(m) => format!("The model `{m}` does not exist"),
        e => e.to_string(),
    };
    let body = json!({"error": {
        "message": message,
        "type": kind,
        "param": param,
        "code": code,
    }});
    let mut res = (status, json_response(&body)).into_response();
    error.add_headers(res.headers_mut());
    res
}

// ---------------------------------------------------------------------------
// Models

/// Unix seconds of the node's start.
fn node_started(state: &AppState) -> u64 {
    let started = SystemTime::now()
        .checked_sub(state.ctx.started.elapsed())
        .unwrap_or(UNIX_EPOCH);
    started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `GET /v1/models`
pub async fn list_models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let created = node_started(&state);
    let table = state.ctx.router.snapshot();
    let data: Vec<Value> = table
        .models()
        .into_iter()
        .filter(|(name, _)| caller.allows_model(name))
        .map(|(name, _)| {
            json!({"id": name, "object": "model", "created": created, "owned_by": "cohort"})
        })
        .collect();
    json_response(&json!({"object": "list", "data": data}))
}

// ---------------------------------------------------------------------------
// Embeddings

#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

/// The input's name, the output's name and the width of an embedding model, else why it
/// is not one.
fn embedding_shape(meta: &ModelMetadata) -> Option<(String, String, Option<usize>)> {
    match (meta.inputs.as_slice(), meta.outputs.as_slice()) {
        ([i], [o]) if i.dtype == DType::String && o.dtype == DType::F32 && o.shape.len() == 2 => {
            let width = usize::try_from(o.shape[1]).ok().filter(|w| *w > 0);
            Some((i.name.clone(), o.name.clone(), width))
        }
        _ => None,
    }
}

/// The strings of `input`: a string or a non-empty list of non-empty strings.
fn parse_input(input: &Value) -> Result<Vec<String>, OpenAiError> {
    let token_ids = || {
        invalid(
            "input",
            "token-id input ([int] or [[int]]) is not supported by this engine: send text",
        )
    };
    let texts = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(invalid("input", "input must not be an empty list"));
            }
            let mut texts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => texts.push(s.clone()),
                    Value::Number(_) | Value::Array(_) => return Err(token_ids()),
                    _ => {
                        return Err(invalid(
                            "input",
                            "input must be a string or a list of strings",
                        ))
                    }
                }
            }
            texts
        }
        _ => {
            return Err(invalid(
                "input",
                "input must be a string or a list of strings",
            ))
        }
    };
    if texts.len() > MAX_INPUTS {
        return Err(invalid(
            "input",
            format!(
                "at most {MAX_INPUTS} inputs per request, got {}",
                texts.len()
            ),
        ));
    }
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(invalid(
            "input",
            format!("input {i} is an empty string; every input must have text"),
        ));
    }
    Ok(texts)
}

/// Standard base64 (with padding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (k, s) in sextets.iter().enumerate() {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[*s as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let mut model = String::new();
    let result = run_embeddings(&state, &rid, &caller, body, &mut model).await;
    let mut response = result.unwrap_or_else(error_response);
    inference::record(&state, &model, ENDPOINT, response.status(), started);
    if !model.is_empty() {
        // The model is in the body: tell the request log.
        response
            .extensions_mut()
            .insert(crate::reqlog::ModelTag(model.into()));
    }
    response
}

async fn run_embeddings(
    state: &AppState,
    rid: &RequestId,
    caller: &Caller,
    body: Result<Bytes, BytesRejection>,
    model_out: &mut String,
) -> Result<Response, OpenAiError> {
    let body = body.map_err(hardening::body_error)?;
    hardening::json_depth(&body, state.ctx.config.http.max_json_depth)?;
    let req: EmbeddingsBody = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::from(ApiError::invalid(format!("malformed JSON body: {e}"))))?;
    drop(body);
    *model_out = req.model.clone();
    let model = req.model.as_str();
    // The token's models before anything else: no answer tells it which models exist.
    // Only then is the request charged to the token's rate limit and quota.
    caller
        .use_model(state, model)
        .map_err(|error| OpenAiError {
            error,
            param: Some("model"),
        })?;

    // The model first: an unknown model is 404 whatever the rest says.
    let meta = {
        let table = state.ctx.router.snapshot();
        let route = table
            .get(model)
            .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))?;
        let replica = route
            .replicas
            .iter()
            .find(|r| r.metadata().is_some())
            .cloned()
            .ok_or_else(|| {
                ApiError::NoReplica(format!(
                    "model {model:?} is not loaded: no replica has its metadata"
                ))
            })?;
        replica.metadata().cloned().ok_or_else(|| {
            ApiError::NoReplica(format!("model {model:?} has not finished loading"))
        })?
    };
    let (input_name, output_name, width) = embedding_shape(&meta).ok_or_else(|| {
        invalid(
            "model",
            format!(
                "model {model:?} is not an embedding model (it must take one string input \
                 and give one f32 output of rank 2)"
            ),
        )
    })?;

    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(invalid(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", not {other:?}"),
            ))
        }
    };
    let dimensions = match &req.dimensions {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|d| *d > 0)
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| invalid("dimensions", "dimensions must be a positive integer"))?,
        ),
    };
    let wrong_dimensions = |d: usize, w: usize| {
        invalid(
            "dimensions",
            format!(
                "model {model:?} gives {w}-dimensional embeddings and cannot shorten them; \
                 dimensions must be {w} or left out, not {d}"
            ),
        )
    };
    if let (Some(d), Some(w)) = (dimensions, width) {
        if d != w {
            return Err(wrong_dimensions(d, w));
        }
    }

    let texts = parse_input(&req.input)?;
    let n = texts.len();
    let mut inputs = TensorMap::new();
    let tensor = Tensor::new(vec![n], TensorData::String(texts))
        .map_err(|e| ApiError::invalid(format!("cannot build the input tensor: {e}")))?;
    inputs.insert(input_name, tensor);
    // All strings as one request of n rows (queued in parts of at most a batch).
    let queued = inference::submit_tensors(state, model, inputs, None, &rid.0)?;
    let tokens = queued.tokens;
    let out = inference::answer(queued).await?;

    let tensor = out.outputs.get(&output_name).ok_or_else(|| {
        ApiError::InferenceFailed(format!("the engine gave no output {output_name:?}"))
    })?;
    let values = match &tensor.data {
        TensorData::F32(v) => v,
        _ => {
            return Err(
                ApiError::InferenceFailed(format!("output {output_name:?} is not f32")).into(),
            )
        }
    };
    let (rows, w) = match tensor.shape.as_slice() {
        [rows, w] if *rows == n && rows * w == values.len() => (*rows, *w),
        shape => {
            return Err(ApiError::InferenceFailed(format!(
                "output {output_name:?} has shape {shape:?}, expected [{n}, width]"
            ))
            .into())
        }
    };
    if let Some(d) = dimensions {
        if d != w {
            return Err(wrong_dimensions(d, w));
        }
    }
    let body = embeddings_json(values, rows, w, encoding, model, tokens)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The body of an embeddings answer, written straight from the engine's `f32`s: each
/// value in its shortest form that reads back to the same `f32` (`0.1`, not the `f64`
/// widening `0.10000000149011612`), with no JSON tree built per element. A value that
/// is not finite (JSON has no NaN or infinity; OpenAI's clients cannot read `null` in a
/// vector) is an engine fault: 500 `server_error`, whatever the encoding.
fn embeddings_json(
    values: &[f32],
    rows: usize,
    width: usize,
    encoding: Encoding,
    model: &str,
    tokens: usize,
) -> Result<Vec<u8>, OpenAiError> {
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        let (row, col) = (i / width.max(1), i % width.max(1));
        return Err(ApiError::InferenceFailed(format!(
            "the engine gave a value that is not finite ({}) in embedding {row}, element {col}",
            values[i]
        ))
        .into());
    }
    let body = EmbeddingsAnswer {
        object: "list",
        data: Embeddings {
            values,
            rows,
            width,
            encoding,
        },
        model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    serde_json::to_vec(&body)
        .map_err(|e| ApiError::InferenceFailed(format!("cannot encode the embeddings: {e}")).into())
}

#[derive(Serialize)]
struct EmbeddingsAnswer<'a> {
    object: &'static str,
    data: Embeddings<'a>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// `data`: one `{"object": "embedding", "index", "embedding"}` per row of `values`.
struct Embeddings<'a> {
    values: &'a [f32],
    rows: usize,
    width: usize,
    encoding: Encoding,
}

impl Serialize for Embeddings<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.rows))?;
        let w = self.width;
        for index in 0..self.rows {
            let row = self
                .values
                .get(index * w..(index + 1) * w)
                .unwrap_or_default();
            seq.serialize_element(&EmbeddingItem {
                object: "embedding",
                index,
                embedding: Vector {
                    row,
                    encoding: self.encoding,
                },
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

/// One vector: a list of `f32`s (`serialize_f32`, shortest form) or the base64 of their
/// little-endian bytes.
struct Vector<'a> {
    row: &'a [f32],
    encoding: Encoding,
}

impl Serialize for Vector<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.encoding {
            Encoding::Float => {
                let mut seq = s.serialize_seq(Some(self.row.len()))?;
                for x in self.row {
                    if !x.is_finite() {
                        // Checked before; never written as `null`.
                        return Err(S::Error::custom(format!(
                            "embedding value {x} is not finite"
                        )));
                    }
                    seq.serialize_element(&F32(*x))?;
                }
                seq.end()
            }
            Encoding::Base64 => {
                let bytes: Vec<u8> = self.row.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.serialize_str(&base64(&bytes))
            }
        }
    }
}

/// An `f32` written as an `f32` (serde's impl for `f32` does the same; spelled out so a
/// change of the element type cannot widen it to `f64` unnoticed).
struct F32(f32);

impl Serialize for F32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f32(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
    }

    #[test]
    fn inputs_are_strings_only() {
        assert_eq!(
            parse_input(&json!("a")).map_err(|e| e.param),
            Ok(vec!["a".into()])
        );
        assert_eq!(
            parse_input(&json!(["a", "b"])).map_err(|e| e.param),
            Ok(vec!["a".into(), "b".into()])
        );
        for bad in [
            json!([]),
            json!(""),
            json!(["a", ""]),
            json!([1, 2]),
            json!([[1, 2]]),
            json!(3),
            json!({"a": 1}),
        ] {
            let e = parse_input(&bad).expect_err("refused");
            assert_eq!(e.param, Some("input"));
            assert_eq!(e.error.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn errors_have_openai_shape() {
        let res = error_response(ApiError::Overloaded("full".into()));
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[axum::http::header::RETRY_AFTER], "1");
        let res = error_response(ApiError::Timeout("late".into()));
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        let res = error_response(ApiError::ModelNotFound("x".into()));
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn float_embeddings_are_written_as_f32_in_shortest_form() {
        let values = [0.1f32, -0.2, 1e-8, 3.0, 0.3, 0.14027637];
        let body = embeddings_json(&values, 2, 3, Encoding::Float, "m", 7).expect("encodes");
        let text = String::from_utf8(body).expect("utf-8");
        assert!(text.contains("[0.1,-0.2,1e-8]"), "{text}");
        assert!(text.contains("[3.0,0.3,0.14027637]"), "{text}");
        assert!(!text.contains("0.1000000014"), "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "m");
        assert_eq!(v["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
        let data = v["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["object"], "embedding");
        assert_eq!(data[1]["index"], 1);
        // Every value reads back to the same f32.
        let back: Vec<f32> = data
            .iter()
            .flat_map(|d| d["embedding"].as_array().expect("list").clone())
            .map(|x| x.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(back, values);

        let body = embeddings_json(&values, 2, 3, Encoding::Base64, "m", 7).expect("encodes");
        let v: Value = serde_json::from_slice(&body).expect("json");
        let bytes: Vec<u8> = values[..3].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(v["data"][0]["embedding"], base64(&bytes));
    }

    #[test]
    fn a_non_finite_embedding_value_is_a_server_error_not_null() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for encoding in [Encoding::Float, Encoding::Base64] {
                let e = embeddings_json(&[0.5, 0.5, bad, 0.5], 2, 2, encoding, "m", 1)
                    .expect_err("refused");
                assert_eq!(e.error.status(), StatusCode::INTERNAL_SERVER_ERROR);
                let message = e.error.to_string();
                assert!(message.contains("not finite"), "{message}");
                assert!(message.contains("embedding 1, element 0"), "{message}");
                let res = error_response(e);
                assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
        // The serializer refuses one too, should a caller skip the check.
        let vector = Vector {
            row: &[f32::NAN],
            encoding: Encoding::Float,
        };
        assert!(serde_json::to_string(&vector).is_err());
    }
}
