//! The OpenAI-compatible API on a real node on 127.0.0.1:0: the model list, embeddings of
//! the tiny BERT fixture (float and base64, equal to the native endpoint and the NumPy
//! reference), usage, errors in OpenAI's shape, and OpenAI's own Python client
//! (`scripts/test_openai.py`).

mod common;

use cohort_config::{EngineKind, ModelConfig};
use common::*;
use serde_json::{json, Value};

/// Standard base64 (with padding) to bytes.
fn b64decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes = s.as_bytes();
    assert_eq!(bytes.len() % 4, 0, "base64 length");
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        let n = chunk
            .iter()
            .take(4 - pad)
            .fold(0u32, |n, c| (n << 6) | value(*c))
            << (6 * pad);
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    out
}

fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tinybert() -> ModelConfig {
    let mut bert = ModelConfig::new("tinybert", EngineKind::CandleBert);
    bert.path = Some(workspace().join("engines/tests/fixtures/tiny_bert"));
    bert
}

/// Asserts an OpenAI error: status, type, param and code.
fn assert_error(
    (status, body): (u16, &Value),
    want_status: u16,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
    let keys: Vec<&String> = e.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 4, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_the_native_endpoint_and_the_reference() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(
            workspace().join("engines/tests/fixtures/tiny_bert_expected.json"),
        )
        .expect("fixture"),
    )
    .expect("json");
    // OpenAI refuses empty strings, so the fixture's empty sentence is left out.
    let (sentences, reference): (Vec<String>, Vec<Vec<f32>>) = expected["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .zip(expected["embeddings"].as_array().expect("embeddings"))
        .filter_map(|(s, e)| {
            s.as_str()
                .filter(|s| !s.is_empty())
                .map(|s| (s.to_string(), floats(e)))
        })
        .unzip();
    assert!(sentences.len() >= 3);

    let n = start(vec![tinybert()]).await;

    // The model list.
    let (s, models) = n.get("/v1/models").await;
    assert_eq!(s, 200, "{models}");
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().expect("data");
    let bert = data
        .iter()
        .find(|m| m["id"] == "tinybert")
        .expect("tinybert listed");
    assert_eq!(bert["object"], "model");
    assert_eq!(bert["owned_by"], "cohort");
    let created = bert["created"].as_u64().expect("created");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(created <= now && created + 600 > now, "created {created}");
    assert!(data.iter().any(|m| m["id"] == "mlp"), "{models}");

    // The native endpoint's vectors.
    let (s, _, native) = n
        .infer("tinybert", &json!({"inputs": {"text": sentences}}))
        .await;
    assert_eq!(s, 200, "{native}");
    let native: Vec<Vec<f32>> = native["outputs"]["embedding"]
        .as_array()
        .expect("rows")
        .iter()
        .map(floats)
        .collect();
    let width = native[0].len();

    // A list, as floats: order kept, equal to native and the reference.
    let (s, _, b) = n
        .post(
            "/v1/embeddings",
            &json!({"model": "tinybert", "input": sentences, "user": "someone"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["object"], "list");
    assert_eq!(b["model"], "tinybert");
    let items = b["data"].as_array().expect("data");
    assert_eq!(items.len(), sentences.len());
    let mut float_vectors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let v = floats(&item["embedding"]);
        assert!(close(&v, &native[i]), "sentence {i} vs native");
        assert!(close(&v, &reference[i]), "sentence {i} vs reference");
        float_vectors.push(v);
    }
    // As written: each value is the f32's shortest form (`0.1`, not the f64 widening
    // `0.10000000149011612`), as the native endpoint writes it.
    let text = n
        .http
        .post(format!("{}/v1/embeddings", n.url))
        .json(&json!({"model": "tinybert", "input": sentences[0]}))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let start = text.find("\"embedding\":[").expect("an embedding") + "\"embedding\":[".len();
    let list = &text[start..start + text[start..].find(']').expect("list ends")];
    let tokens: Vec<&str> = list.split(',').collect();
    assert_eq!(tokens.len(), width, "{list}");
    for t in tokens {
        let x: f32 = t.parse().expect("a number");
        assert_eq!(t, serde_json::to_string(&x).expect("f32"), "{list}");
    }
    let usage = &b["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(prompt > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt));

    // Base64: little-endian f32 bytes equal to the float answer.
    let (s, _, b) = n
        .post(
            "/v1/embeddings",
            &json!({"model": "tinybert", "input": sentences, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    for (i, item) in b["data"].as_array().expect("data").iter().enumerate() {
        let v = le_floats(&b64decode(item["embedding"].as_str().expect("string")));
        assert_eq!(v, float_vectors[i], "sentence {i} base64 vs float");
    }

    // One string, with the model's width as `dimensions`.
    let (s, _, b) = n
        .post(
            "/v1/embeddings",
            &json!({"model": "tinybert", "input": sentences[1], "dimensions": width,
                    "encoding_format": "float"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"].as_array().map(Vec::len), Some(1));
    assert!(close(&floats(&b["data"][0]["embedding"]), &native[1]));
    let single = b["usage"]["prompt_tokens"].as_u64().expect("tokens");
    assert!(single > 0 && single < prompt);

    // Errors, in OpenAI's shape.
    let post = |body: Value| {
        let n = &n;
        async move {
            let (s, _, b) = n.post("/v1/embeddings", &body).await;
            (s, b)
        }
    };
    let (s, b) = post(json!({"model": "nope", "input": "x"})).await;
    assert_error(
        (s, &b),
        404,
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    );
    let (s, b) = post(json!({"model": "mlp", "input": "x"})).await;
    assert_error((s, &b), 400, "invalid_request_error", Some("model"), None);
    for empty in [json!(""), json!([]), json!(["a", ""])] {
        let (s, b) = post(json!({"model": "tinybert", "input": empty})).await;
        assert_error((s, &b), 400, "invalid_request_error", Some("input"), None);
    }
    for ids in [json!([1, 2, 3]), json!([[1, 2], [3]])] {
        let (s, b) = post(json!({"model": "tinybert", "input": ids})).await;
        assert_error((s, &b), 400, "invalid_request_error", Some("input"), None);
        assert!(
            b["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("token-id")),
            "{b}"
        );
    }
    let (s, b) = post(json!({"model": "tinybert", "input": "x", "encoding_format": "int8"})).await;
    assert_error(
        (s, &b),
        400,
        "invalid_request_error",
        Some("encoding_format"),
        None,
    );
    let (s, b) = post(json!({"model": "tinybert", "input": "x", "dimensions": width + 1})).await;
    assert_error(
        (s, &b),
        400,
        "invalid_request_error",
        Some("dimensions"),
        None,
    );
    let (s, b) = post(json!({"input": "x"})).await;
    assert_error((s, &b), 400, "invalid_request_error", None, None);

    // Counted under the endpoint label `openai`.
    let (_, metrics) = n.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cohort_requests_total")
                && l.contains("endpoint=\"openai\"")
                && l.contains("model=\"tinybert\"")
                && l.contains("status=\"200\"")),
        "{metrics}"
    );
    n.node.shutdown().await;
}

/// Unknown paths and wrong methods under `/v1` answer in OpenAI's error shape (under
/// `/v2` in KServe's, elsewhere in the envelope), with the `allow` header kept on 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_in_the_paths_error_shape() {
    let n = start(vec![]).await;
    let (s, _, b) = n
        .post(
            "/v1/chat/completions",
            &json!({"model": "echo", "messages": []}),
        )
        .await;
    assert_error(
        (s, &b),
        404,
        "invalid_request_error",
        None,
        Some("not_found"),
    );
    let res = n
        .http
        .get(format!("{}/v1/embeddings", n.url))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.headers()["allow"], "POST");
    assert_eq!(res.headers()["content-type"], "application/json");
    assert!(res.headers().contains_key("x-request-id"));
    let s = res.status().as_u16();
    let b: Value = res.json().await.expect("json");
    assert_error(
        (s, &b),
        405,
        "invalid_request_error",
        None,
        Some("method_not_allowed"),
    );

    // KServe's shape under /v2.
    let (s, b) = n.get("/v2/nothing").await;
    assert_eq!(s, 404, "{b}");
    assert!(b["error"].is_string(), "{b}");
    let (s, b) = n.get("/v2/models/echo/infer").await;
    assert_eq!(s, 405, "{b}");
    assert_eq!(b["error"], "method not allowed", "{b}");
    // The envelope elsewhere.
    for path in ["/api/v1/nothing", "/nothing", "/v1x"] {
        let (s, b) = n.get(path).await;
        assert_eq!(s, 404, "{b}");
        assert_eq!(b["error"]["code"], "NOT_FOUND", "{b}");
    }
    let (s, b) = n.get("/api/v1/models/echo/infer").await;
    assert_eq!(s, 405, "{b}");
    assert_eq!(b["error"]["code"], "METHOD_NOT_ALLOWED", "{b}");
    n.node.shutdown().await;
}

/// OpenAI's own Python client (`openai`) against a real node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_script_passes() {
    let n = start(vec![tinybert()]).await;
    run_python_client("test_openai.py", "openai", &n.url).await;
    n.node.shutdown().await;
}
