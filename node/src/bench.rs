//! `cohort bench`: Cohort's closed-loop HTTP load generator.
//!
//! `--concurrency` workers each hold one keep-alive HTTP/1.1 connection
//! and send the next request as soon as the previous response has been
//! read in full (closed loop). Nothing is recorded during the warmup.
//! After that, latencies of successful (2xx) responses go into HDR
//! histograms, and everything else is counted as an error, keyed by status
//! code or `io` for a connection failure. The run stops by itself at the
//! deadline; a request still in flight then is dropped and not counted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use bytes::Bytes;
use cohort_engines::onnx_raw::{RawOnnx, RawRun, Shapes};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

/// Closed-loop HTTP load test against one model of a running Cohort node.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Base URL of the node to load (plain http only, no TLS). A path in it,
    /// e.g. http://host:8080/prefix, is put in front of every request path.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Name of the model to send requests to.
    #[arg(long, value_name = "NAME")]
    pub model: String,

    /// Number of concurrent closed-loop workers, each on its own keep-alive
    /// HTTP/1.1 connection and with at most one request in flight.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// How long to measure, after the warmup (e.g. 10s, 500ms, 1m).
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// How long to send requests before measuring; requests completed during
    /// the warmup are not recorded (e.g. 1s, 0s).
    #[arg(long, value_name = "DURATION", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// File with the JSON request body to send, as is. Without it, a valid
    /// random request is built from the model's metadata
    /// (GET /api/v1/models/{model}).
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,

    /// Request path to POST to, instead of /api/v1/models/{model}/infer.
    /// Must start with '/'; "{model}" in it is replaced by the model name,
    /// and the base path of --url is put in front of it.
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,

    /// Print exactly one JSON object with the results instead of a readable
    /// report.
    #[arg(long)]
    pub json: bool,

    /// Wire protocol: `rest` (Cohort's /api/v1 JSON), `kserve-json` (KServe v2
    /// JSON to /v2/models/{model}/infer) or `kserve-binary` (Triton's binary
    /// tensor extension: raw little-endian inputs, binary outputs).
    #[arg(long, value_enum, default_value_t = Protocol::Rest)]
    pub protocol: Protocol,
    /// API token sent as `Authorization: Bearer` (a node with auth on needs one).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "COHORT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Also measure bare ONNX Runtime on this `.onnx` file (the model the node serves), on
    /// this machine and in this run: the run is cut into rounds (see --round) that
    /// alternate between the HTTP load and bare sessions (with no HTTP load, so the node
    /// is idle), and the report gives both throughputs in samples/s and their ratio.
    #[arg(long, value_name = "FILE")]
    pub raw_onnx: Option<PathBuf>,

    /// Rows in each bare ONNX Runtime call (--raw-onnx).
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub raw_batch: u32,

    /// Intra-op threads of each bare session (--raw-onnx); default: the cores this
    /// process may use.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub raw_threads: Option<u32>,

    /// Bare sessions run side by side, each on a thread of its own (--raw-onnx).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub raw_sessions: u32,

    /// The ONNX Runtime library for --raw-onnx; default: COHORT_ORT_LIB, else the
    /// `onnxruntime` Python package, as a node finds it.
    #[arg(long, value_name = "FILE")]
    pub onnx_library: Option<PathBuf>,

    /// Length of one round of each side with --raw-onnx; each round starts with a fifth of
    /// it (at most 200 ms) unrecorded, to settle.
    #[arg(long, value_name = "DURATION", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub round: Duration,
}

/// The wire protocol `cohort bench` speaks.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// POST /api/v1/models/{model}/infer with {"inputs": {name: nested arrays}}.
    #[default]
    Rest,
    /// POST /v2/models/{model}/infer with a KServe v2 JSON request.
    KserveJson,
    /// POST /v2/models/{model}/infer with Triton's binary tensor extension.
    KserveBinary,
}

/// Runs `cohort bench`: builds the request body, runs the load and prints the
/// report on stdout (progress notes go to stderr, and none with --json).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.duration <= MAX_DURATION && args.warmup <= MAX_DURATION,
        "--duration and --warmup must each be at most {}",
        humantime::format_duration(MAX_DURATION)
    );
    let mut base = BaseUrl::parse(&args.url)?;
    if let Some(token) = &args.token {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .context("--token is not a valid header value")?;
        value.set_sensitive(true);
        base.authorization = Some(value);
    }
    let mut inference_header = None;
    let body = match &args.body {
        Some(file) => {
            ensure!(
                args.protocol != Protocol::KserveBinary,
                "--body cannot be used with --protocol kserve-binary"
            );
            let raw = std::fs::read(file)
                .with_context(|| format!("cannot read request body {}", file.display()))?;
            serde_json::from_slice::<Value>(&raw)
                .with_context(|| format!("request body {} is not valid JSON", file.display()))?;
            Bytes::from(raw)
        }
        None => {
            let metadata = fetch_metadata(&base, &args.model, args.protocol).await?;
            let mut rng = fastrand::Rng::new();
            let built = match args.protocol {
                Protocol::Rest => build_request_body(&metadata, &mut rng)
                    .and_then(|v| Ok(Bytes::from(serde_json::to_vec(&v)?))),
                Protocol::KserveJson => build_kserve_json(&metadata, &mut rng)
                    .and_then(|v| Ok(Bytes::from(serde_json::to_vec(&v)?))),
                Protocol::KserveBinary => {
                    build_kserve_binary(&metadata, &mut rng).map(|(body, header_len)| {
                        inference_header = Some(header_len);
                        body
                    })
                }
            };
            built.with_context(|| {
                format!(
                    "cannot build a request for model {:?} from its metadata; \
                     pass one with --body",
                    args.model
                )
            })?
        }
    };
    let default_path = match args.protocol {
        Protocol::Rest => None,
        Protocol::KserveJson | Protocol::KserveBinary => Some("/v2/models/{model}/infer"),
    };
    let path = request_path(&args.model, args.path.as_deref().or(default_path))?;
    let mut target = Target::new(base, &path)?;
    if let Some(n) = inference_header {
        target.inference_header = Some(HeaderValue::from(n));
    }
    let concurrency = usize::try_from(args.concurrency)?;

    if !args.json {
        eprintln!(
            "cohort bench: POST {} ({} byte body), {} connections, warmup {}, measuring {}",
            target.url(),
            body.len(),
            concurrency,
            humantime::format_duration(args.warmup),
            humantime::format_duration(args.duration),
        );
    }
    let inputs = request_inputs(&body, inference_header);
    let (report, raw) = match &args.raw_onnx {
        None => (
            load(&target, body, concurrency, args.warmup, args.duration).await?,
            None,
        ),
        Some(model) => {
            let inputs = inputs.context(
                "--raw-onnx compares samples/s, but the inputs' shapes in the request body \
                 cannot be read",
            )?;
            let rows = rows_of(&inputs);
            let like: Shapes = inputs.into_iter().collect();
            let (report, raw) =
                compare_raw(&args, model, &like, &target, body, concurrency).await?;
            ensure!(
                report.ok > 0,
                "--raw-onnx: no request succeeded, so there is nothing to compare ({})",
                report.error_summary()
            );
            (report, Some((raw, rows)))
        }
    };
    if args.json {
        let mut json = report.to_json();
        if let (Some((raw, rows)), Some(obj)) = (&raw, json.as_object_mut()) {
            let samples = report.ok_per_second() * *rows as f64;
            obj.insert("rows_per_request".into(), Value::from(*rows));
            obj.insert("samples_per_second".into(), Value::from(samples));
            obj.insert("raw_onnx".into(), raw.to_json());
            obj.insert(
                "vs_raw".into(),
                Value::from(ratio(samples, raw.samples_per_second())),
            );
        }
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{}", report.to_text());
        if let Some((raw, rows)) = &raw {
            let samples = report.ok_per_second() * *rows as f64;
            println!(
                "samples/s:   {samples:.1}  ({rows} per request, successful requests only)\n\
                 raw ONNX Runtime: {:.1} samples/s  (batch {}, {} session(s) x {} thread(s), \
                 rounds of {} alternating with the load above)\n\
                 vs raw:      {:.3}",
                raw.samples_per_second(),
                raw.batch,
                raw.sessions,
                raw.threads,
                humantime::format_duration(raw.round),
                ratio(samples, raw.samples_per_second()),
            );
        }
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// The name and shape of each input in a request body, in the body's order (name order for
/// Cohort's form). Reads Cohort's `{"inputs": {name: nested arrays}}` (the shape follows the
/// first element at each depth), KServe v2 JSON, and the JSON header of a KServe binary
/// request (`header_len` bytes).
fn request_inputs(body: &[u8], header_len: Option<usize>) -> Option<Vec<(String, Vec<usize>)>> {
    let json = match header_len {
        Some(n) => body.get(..n)?,
        None => body,
    };
    let value: Value = serde_json::from_slice(json).ok()?;
    match value.get("inputs")? {
        // KServe v2: [{"name", "shape", ...}]
        Value::Array(inputs) if !inputs.is_empty() => inputs
            .iter()
            .map(|input| {
                let name = input.get("name")?.as_str()?.to_string();
                let shape = input
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .map(|d| usize::try_from(d.as_u64()?).ok())
                    .collect::<Option<Vec<_>>>()?;
                Some((name, shape))
            })
            .collect(),
        // Cohort: {name: nested arrays}, in name order.
        Value::Object(inputs) if !inputs.is_empty() => Some(
            inputs
                .iter()
                .map(|(name, mut value)| {
                    let mut shape = Vec::new();
                    while let Value::Array(items) = value {
                        shape.push(items.len());
                        match items.first() {
                            Some(first) => value = first,
                            None => break,
                        }
                    }
                    (name.clone(), shape)
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The rows (samples) one request carries: the first dimension of its first input (1 for a
/// scalar).
fn rows_of(inputs: &[(String, Vec<usize>)]) -> usize {
    inputs
        .first()
        .and_then(|(_, shape)| shape.first().copied())
        .unwrap_or(1)
}

#[cfg(test)]
fn rows_per_request(body: &[u8], header_len: Option<usize>) -> Option<usize> {
    request_inputs(body, header_len).map(|inputs| rows_of(&inputs))
}

/// Bare ONNX Runtime throughput, measured in rounds between the HTTP load's.
struct RawReport {
    /// Calls that finished within the rounds.
    calls: u64,
    /// Calls per second, the mean over the rounds (each round's from
    /// [`RawOnnx::run_for`]).
    calls_per_second: f64,
    /// Rows in each call.
    batch: usize,
    sessions: usize,
    threads: usize,
    round: Duration,
    measured: Duration,
}

impl RawReport {
    fn samples_per_second(&self) -> f64 {
        self.calls_per_second * self.batch as f64
    }

    fn to_json(&self) -> Value {
        serde_json::json!({
            "samples_per_second": self.samples_per_second(),
            "calls": self.calls,
            "batch": self.batch,
            "sessions": self.sessions,
            "threads": self.threads,
            "round_s": self.round.as_secs_f64(),
            "duration_s": self.measured.as_secs_f64(),
        })
    }
}

/// How long a paused load may take to finish its requests in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The shortest `--round`: below it timer granularity and each round's fixed costs
/// (pausing the load, starting the raw threads) would weigh on the figures.
const MIN_ROUND: Duration = Duration::from_millis(100);
/// The longest `--duration` or `--warmup`.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `--raw-onnx`: the HTTP load and bare ONNX Runtime sessions take turns in rounds of
/// `args.round` until each has been measured for `args.duration`, the side that goes first
/// alternating. While one side runs the other is idle: the HTTP workers pause and wait for
/// their requests in flight before a raw round starts. Each round's first fifth (at most
/// 200 ms) is not recorded.
async fn compare_raw(
    args: &BenchArgs,
    model: &std::path::Path,
    like: &Shapes,
    target: &Target,
    body: Bytes,
    concurrency: usize,
) -> anyhow::Result<(Report, RawReport)> {
    ensure!(!args.duration.is_zero(), "duration must be more than 0");
    ensure!(
        args.round >= MIN_ROUND,
        "--round must be at least {}",
        humantime::format_duration(MIN_ROUND)
    );
    let threads = match args.raw_threads {
        Some(n) => usize::try_from(n)?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let (batch, sessions) = (
        usize::try_from(args.raw_batch)?,
        usize::try_from(args.raw_sessions)?,
    );
    let (path, library, like) = (model.to_path_buf(), args.onnx_library.clone(), like.clone());
    let mut raw = tokio::task::spawn_blocking(move || {
        RawOnnx::open(&path, library.as_deref(), threads, sessions, batch, &like)
    })
    .await
    .context("opening the raw ONNX Runtime sessions failed")?
    .with_context(|| format!("--raw-onnx {}", model.display()))?;

    let rounds = (args.duration.as_secs_f64() / args.round.as_secs_f64())
        .ceil()
        .max(1.0);
    let slice = args.duration.div_f64(rounds);
    let settle = (slice / 5).min(Duration::from_millis(200));
    // duration <= MAX_DURATION and round >= MIN_ROUND: at most 864,000 rounds.
    let rounds = rounds as u32;
    // A model with a fixed first dimension runs its own rows, not --raw-batch.
    let batch = raw.batch();
    if !args.json {
        eprintln!(
            "cohort bench: {rounds} rounds of {} per side, against bare ONNX Runtime on {} \
             (batch {batch}, {sessions} session(s) x {threads} thread(s))",
            humantime::format_duration(slice),
            model.display(),
        );
    }

    let load = Load::start(target, body, concurrency)?;
    tokio::time::sleep(args.warmup).await;
    load.pause(DRAIN_LIMIT).await?;
    let (back, warmed) = run_raw(raw, args.warmup.min(Duration::from_secs(1))).await?;
    raw = back;
    warmed?;

    let (mut calls, mut rates, mut http_measured) = (0u64, 0.0, Duration::ZERO);
    for round in 0..rounds {
        for side in 0..2 {
            if (side + round) % 2 == 0 {
                load.set(Phase::Warmup);
                tokio::time::sleep(settle).await;
                http_measured += load.measure_for(slice).await;
                load.pause(DRAIN_LIMIT).await?;
            } else {
                let (back, settled) = run_raw(raw, settle).await?;
                settled?;
                let (back, measured) = run_raw(back, slice).await?;
                let measured = measured?;
                ensure!(
                    measured.calls > 0,
                    "no bare ONNX Runtime call finished within a round of {}: use a longer --round",
                    humantime::format_duration(slice)
                );
                calls += measured.calls;
                rates += measured.calls_per_second;
                raw = back;
            }
        }
    }
    let report = load.finish(http_measured).await?;
    Ok((
        report,
        RawReport {
            calls,
            calls_per_second: rates / f64::from(rounds),
            batch,
            sessions,
            threads,
            round: slice,
            measured: slice * rounds,
        },
    ))
}

/// Runs the bare sessions for `time` on a blocking thread; gives them back with the calls.
async fn run_raw(
    mut raw: RawOnnx,
    time: Duration,
) -> anyhow::Result<(RawOnnx, anyhow::Result<RawRun>)> {
    tokio::task::spawn_blocking(move || {
        let calls = raw.run_for(time).map_err(anyhow::Error::from);
        (raw, calls)
    })
    .await
    .context("the raw ONNX Runtime thread failed")
}

// ---------------------------------------------------------------------------
// URLs

/// Where the node is: parsed from `--url`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseUrl {
    /// Host to connect to (IPv6 without brackets).
    host: String,
    port: u16,
    /// Value of the `Host` header.
    host_header: String,
    /// Path prefix without a trailing '/'; empty for none.
    base_path: String,
    /// `Authorization: Bearer <token>`, when a token is given.
    authorization: Option<HeaderValue>,
}

impl BaseUrl {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .trim()
            .parse()
            .with_context(|| format!("invalid --url {url:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "--url {url:?}: https is not supported, cohort bench speaks plain http only \
                 (use http://)"
            ),
            Some(other) => bail!("--url {url:?}: unsupported scheme {other:?}, use http://"),
            None => bail!("--url {url:?} has no scheme, use http://host:port"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("--url {url:?} has no host"))?;
        ensure!(
            !authority.as_str().contains('@'),
            "--url {url:?}: user info is not supported"
        );
        ensure!(uri.query().is_none(), "--url {url:?} must not have a query");
        let host_in_url = authority.host();
        ensure!(!host_in_url.is_empty(), "--url {url:?} has no host");
        let host = host_in_url
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(80);
        let host_header = match authority.port_u16() {
            Some(port) => format!("{host_in_url}:{port}"),
            None => host_in_url.to_string(),
        };
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Self {
            host,
            port,
            host_header,
            base_path,
            authorization: None,
        })
    }

    /// `path` (starting with '/') under the base path, as a request URI.
    fn uri(&self, path: &str) -> anyhow::Result<Uri> {
        let full = format!("{}{}", self.base_path, path);
        full.parse()
            .with_context(|| format!("invalid request path {full:?}"))
    }
}

/// The request path below the base URL for `model`, honouring `--path`.
fn request_path(model: &str, path_override: Option<&str>) -> anyhow::Result<String> {
    let model = encode_path_segment(model);
    match path_override {
        None => Ok(format!("/api/v1/models/{model}/infer")),
        Some(path) => {
            ensure!(path.starts_with('/'), "--path {path:?} must start with '/'");
            Ok(path.replace("{model}", &model))
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a path segment or a
/// query value).
pub(crate) fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// What the load is sent to: a node and the request URI on it.
#[derive(Debug, Clone)]
struct Target {
    base: BaseUrl,
    uri: Uri,
    host_header: HeaderValue,
    /// `Inference-Header-Content-Length` of a KServe binary request.
    inference_header: Option<HeaderValue>,
}

impl Target {
    fn new(base: BaseUrl, path: &str) -> anyhow::Result<Self> {
        let uri = base.uri(path)?;
        let host_header = HeaderValue::from_str(&base.host_header)
            .with_context(|| format!("invalid host {:?}", base.host_header))?;
        Ok(Self {
            base,
            uri,
            host_header,
            inference_header: None,
        })
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.base.host_header, self.uri)
    }

    fn post(&self, body: Bytes) -> anyhow::Result<Request<Full<Bytes>>> {
        let builder = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(HOST, self.host_header.clone())
            .header(USER_AGENT, HeaderValue::from_static("cohort-bench"));
        let builder = match &self.base.authorization {
            Some(auth) => builder.header(AUTHORIZATION, auth.clone()),
            None => builder,
        };
        let builder = match &self.inference_header {
            None => builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json")),
            Some(n) => builder
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )
                .header(INFERENCE_HEADER_CONTENT_LENGTH, n.clone()),
        };
        Ok(builder.body(Full::new(body))?)
    }
}

// ---------------------------------------------------------------------------
// Connections

/// One HTTP/1.1 client connection; its driver task ends with it.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Connection {
    async fn open(base: &BaseUrl) -> anyhow::Result<Self> {
        let stream = TcpStream::connect((base.host.as_str(), base.port))
            .await
            .with_context(|| format!("cannot connect to {}:{}", base.host, base.port))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake failed")?;
        let driver = tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "bench connection ended with an error");
            }
        });
        Ok(Self { sender, driver })
    }

    fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.driver.is_finished()
    }

    /// Sends `request` and reads the whole response. Returns the status, the
    /// response body, whether the connection may be reused, and the latency
    /// from sending to the end of the body.
    async fn roundtrip(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes, bool, Duration)> {
        self.sender.ready().await?;
        let started = Instant::now();
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let keep_alive = !response
            .headers()
            .get(CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body, keep_alive, started.elapsed()))
    }
}

// ---------------------------------------------------------------------------
// Model metadata and random requests

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The header of Triton's binary tensor extension.
const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// `GET {base}/api/v1/models/{model}`; anything but 200 is an error that
/// carries the status and the body.
/// KServe modes read `GET {base}/v2/models/{model}` instead.
async fn fetch_metadata(base: &BaseUrl, model: &str, protocol: Protocol) -> anyhow::Result<Value> {
    let path = match protocol {
        Protocol::Rest => format!("/api/v1/models/{}", encode_path_segment(model)),
        Protocol::KserveJson | Protocol::KserveBinary => {
            format!("/v2/models/{}", encode_path_segment(model))
        }
    };
    let uri = base.uri(&path)?;
    let url = format!("http://{}{}", base.host_header, uri);
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(HOST, HeaderValue::from_str(&base.host_header)?)
        .header(USER_AGENT, HeaderValue::from_static("cohort-bench"));
    if let Some(auth) = &base.authorization {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let request = request.body(Full::new(Bytes::new()))?;
    let (status, body, _, _) = timeout(METADATA_TIMEOUT, async {
        let mut conn = Connection::open(base).await?;
        conn.roundtrip(request).await
    })
    .await
    .map_err(|_| anyhow!("GET {url}: no response within {METADATA_TIMEOUT:?}"))?
    .with_context(|| format!("GET {url} failed"))?;
    if status != StatusCode::OK {
        const MAX_SHOWN: usize = 2000;
        let text = String::from_utf8_lossy(&body);
        let shown: String = text.chars().take(MAX_SHOWN).collect();
        bail!(
            "cannot get metadata of model {model:?}: GET {url} returned {status}: {}",
            shown.trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {url}: response is not valid JSON"))
}

#[derive(Debug, Deserialize)]
struct ModelMetadata {
    inputs: Vec<TensorSpec>,
}

#[derive(Debug, Deserialize)]
struct TensorSpec {
    name: String,
    dtype: String,
    shape: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    Float,
    Int,
    Bool,
    Str,
}

impl Dtype {
    fn parse(dtype: &str) -> anyhow::Result<Self> {
        Ok(match dtype {
            "f32" | "f64" => Self::Float,
            "i64" | "i32" | "u8" => Self::Int,
            "bool" => Self::Bool,
            "string" => Self::Str,
            other => bail!("unsupported dtype {other:?}"),
        })
    }
}

/// Largest number of elements in a generated request.
const MAX_GENERATED_ELEMENTS: usize = 1 << 24;

const SENTENCES: &[&str] = &[
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "a small step for a model",
    "cohort serves models over http",
    "the rain in spain stays mainly in the plain",
];

/// Builds `{"inputs": {name: nested arrays}}` from model metadata: the first
/// dimension -1 becomes 1, any other -1 becomes 8; floats are uniform in
/// [-1, 1], integers in 0..100.
fn build_request_body(metadata: &Value, rng: &mut fastrand::Rng) -> anyhow::Result<Value> {
    let metadata = ModelMetadata::deserialize(metadata).context("unexpected model metadata")?;
    let mut inputs = serde_json::Map::new();
    for input in &metadata.inputs {
        let dtype =
            Dtype::parse(&input.dtype).with_context(|| format!("input {:?}", input.name))?;
        let shape =
            concrete_shape(&input.shape).with_context(|| format!("input {:?}", input.name))?;
        inputs.insert(input.name.clone(), random_tensor(&shape, dtype, rng));
    }
    let mut body = serde_json::Map::new();
    body.insert("inputs".to_string(), Value::Object(inputs));
    Ok(Value::Object(body))
}

fn concrete_shape(shape: &[i64]) -> anyhow::Result<Vec<usize>> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut elements: usize = 1;
    for (i, &dim) in shape.iter().enumerate() {
        let dim = match dim {
            -1 if i == 0 => 1,
            -1 => 8,
            d => usize::try_from(d).map_err(|_| anyhow!("invalid dimension {d} in {shape:?}"))?,
        };
        elements = elements
            .checked_mul(dim)
            .filter(|&n| n <= MAX_GENERATED_ELEMENTS)
            .ok_or_else(|| anyhow!("shape {shape:?} is too large to generate"))?;
        dims.push(dim);
    }
    Ok(dims)
}

fn random_tensor(shape: &[usize], dtype: Dtype, rng: &mut fastrand::Rng) -> Value {
    match shape.split_first() {
        None => random_scalar(dtype, rng),
        Some((&n, rest)) => Value::Array((0..n).map(|_| random_tensor(rest, dtype, rng)).collect()),
    }
}

fn random_scalar(dtype: Dtype, rng: &mut fastrand::Rng) -> Value {
    match dtype {
        // Six decimals keep the JSON short and are exact enough for f32.
        Dtype::Float => Value::from(((rng.f64() * 2.0 - 1.0) * 1e6).round() / 1e6),
        Dtype::Int => Value::from(rng.u8(0..100)),
        Dtype::Bool => Value::from(rng.bool()),
        Dtype::Str => Value::from(SENTENCES[rng.usize(..SENTENCES.len())]),
    }
}

/// One input of KServe v2 model metadata (`GET /v2/models/{model}`).
#[derive(Debug, Deserialize)]
struct KserveSpec {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct KserveMetadata {
    inputs: Vec<KserveSpec>,
}

/// The generator's kind of a KServe datatype.
fn kserve_dtype(datatype: &str) -> anyhow::Result<Dtype> {
    Ok(match datatype {
        "FP32" | "FP64" => Dtype::Float,
        "INT64" | "INT32" | "INT8" | "UINT8" => Dtype::Int,
        "BOOL" => Dtype::Bool,
        "BYTES" => Dtype::Str,
        other => bail!("unsupported datatype {other:?}"),
    })
}

/// One generated input: name, KServe datatype, shape, flat values.
type GeneratedInput = (String, String, Vec<usize>, Vec<Value>);

/// Random flat data for each input of KServe metadata.
fn kserve_inputs(metadata: &Value, rng: &mut fastrand::Rng) -> anyhow::Result<Vec<GeneratedInput>> {
    let metadata =
        KserveMetadata::deserialize(metadata).context("unexpected KServe model metadata")?;
    metadata
        .inputs
        .into_iter()
        .map(|input| {
            let dtype =
                kserve_dtype(&input.datatype).with_context(|| format!("input {:?}", input.name))?;
            let shape =
                concrete_shape(&input.shape).with_context(|| format!("input {:?}", input.name))?;
            let count: usize = shape.iter().product();
            let values = (0..count).map(|_| random_scalar(dtype, rng)).collect();
            Ok((input.name, input.datatype, shape, values))
        })
        .collect()
}

/// Builds a KServe v2 JSON infer request from KServe metadata: flat `data`, the same
/// shapes and values as [`build_request_body`].
fn build_kserve_json(metadata: &Value, rng: &mut fastrand::Rng) -> anyhow::Result<Value> {
    let inputs: Vec<Value> = kserve_inputs(metadata, rng)?
        .into_iter()
        .map(|(name, datatype, shape, data)| {
            serde_json::json!({"name": name, "shape": shape, "datatype": datatype, "data": data})
        })
        .collect();
    Ok(serde_json::json!({ "inputs": inputs }))
}

/// Appends one value as raw little-endian bytes of `datatype` (BYTES: 4-byte length
/// prefix).
fn push_binary(datatype: &str, v: &Value, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let float = || v.as_f64().ok_or_else(|| anyhow!("{v} is not a number"));
    let int = || v.as_i64().ok_or_else(|| anyhow!("{v} is not an integer"));
    match datatype {
        "FP32" => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
        "FP64" => out.extend_from_slice(&float()?.to_le_bytes()),
        "INT64" => out.extend_from_slice(&int()?.to_le_bytes()),
        "INT32" => out.extend_from_slice(&i32::try_from(int()?)?.to_le_bytes()),
        "INT8" => out.extend_from_slice(&i8::try_from(int()?)?.to_le_bytes()),
        "UINT8" => out.push(u8::try_from(int()?)?),
        "BOOL" => out.push(u8::from(
            v.as_bool().ok_or_else(|| anyhow!("{v} is not a boolean"))?,
        )),
        "BYTES" => {
            let s = v.as_str().ok_or_else(|| anyhow!("{v} is not a string"))?;
            out.extend_from_slice(&u32::try_from(s.len())?.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        other => bail!("unsupported datatype {other:?}"),
    }
    Ok(())
}

/// Builds a request of Triton's binary tensor extension: the JSON header (each input with
/// `parameters.binary_data_size`, binary outputs asked for), then each input's raw bytes
/// in order. Returns the body and the header's length (`Inference-Header-Content-Length`).
fn build_kserve_binary(
    metadata: &Value,
    rng: &mut fastrand::Rng,
) -> anyhow::Result<(Bytes, usize)> {
    let mut raw = Vec::new();
    let mut inputs = Vec::new();
    for (name, datatype, shape, data) in kserve_inputs(metadata, rng)? {
        let before = raw.len();
        for v in &data {
            push_binary(&datatype, v, &mut raw).with_context(|| format!("input {name:?}"))?;
        }
        inputs.push(serde_json::json!({
            "name": name,
            "shape": shape,
            "datatype": datatype,
            "parameters": {"binary_data_size": raw.len() - before},
        }));
    }
    let header = serde_json::json!({
        "inputs": inputs,
        "parameters": {"binary_data_output": true},
    });
    let mut body = serde_json::to_vec(&header)?;
    let header_len = body.len();
    body.extend_from_slice(&raw);
    Ok((Bytes::from(body), header_len))
}

// ---------------------------------------------------------------------------
// Load

/// A worker stops after this many connection failures in a row.
const MAX_CONSECUTIVE_FAILURES: u32 = 100;
/// Pause after a failed connect before the next try.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
const LATENCY_MIN_US: u64 = 1;
const LATENCY_MAX_US: u64 = 60_000_000;

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(LATENCY_MIN_US, LATENCY_MAX_US, 3)
        .map_err(|e| anyhow!("cannot create latency histogram: {e:?}"))
}

/// Results of a run.
#[derive(Debug, Clone)]
struct Report {
    /// Latencies of the 2xx responses, in microseconds.
    latency: Histogram<u64>,
    ok: u64,
    /// Failed requests by status code, or "io".
    errors: BTreeMap<String, u64>,
    concurrency: usize,
    /// Length of the measured window.
    duration: Duration,
    /// Workers that stopped early after too many connection failures in a row.
    gave_up: usize,
}

impl Report {
    fn empty(concurrency: usize, duration: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            latency: new_histogram()?,
            ok: 0,
            errors: BTreeMap::new(),
            concurrency,
            duration,
            gave_up: 0,
        })
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// "N errors (400: n, io: m)", or "no errors".
    fn error_summary(&self) -> String {
        if self.errors.is_empty() {
            return "no errors".into();
        }
        let by_kind: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        format!("{} errors ({})", self.error_count(), by_kind.join(", "))
    }

    fn per_second(&self, n: u64) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            n as f64 / secs
        } else {
            0.0
        }
    }

    /// All requests answered in the window, failed ones included, per second.
    fn requests_per_second(&self) -> f64 {
        self.per_second(self.ok + self.error_count())
    }

    /// Successful (2xx) requests per second.
    fn ok_per_second(&self) -> f64 {
        self.per_second(self.ok)
    }

    /// Latency percentiles in µs: p50, p90, p99, p99.9, max (all 0 when there
    /// was no successful response).
    fn percentiles(&self) -> [(&'static str, u64); 5] {
        let h = &self.latency;
        [
            ("p50", h.value_at_quantile(0.50)),
            ("p90", h.value_at_quantile(0.90)),
            ("p99", h.value_at_quantile(0.99)),
            ("p999", h.value_at_quantile(0.999)),
            ("max", h.max()),
        ]
    }

    fn to_json(&self) -> Value {
        let latency: serde_json::Map<String, Value> = self
            .percentiles()
            .iter()
            .map(|&(name, us)| (name.to_string(), Value::from(us)))
            .collect();
        serde_json::json!({
            "requests_per_second": self.requests_per_second(),
            "latency_us": latency,
            "ok": self.ok,
            "errors": self.errors,
            "concurrency": self.concurrency,
            "workers_gave_up": self.gave_up,
            "duration_s": self.duration.as_secs_f64(),
        })
    }

    fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "requests/s:  {:.1}  ({} requests in {:.3} s, {} connections)",
            self.requests_per_second(),
            self.ok + self.error_count(),
            self.duration.as_secs_f64(),
            self.concurrency
        );
        if self.latency.is_empty() {
            let _ = writeln!(out, "latency:     n/a (no successful responses)");
        } else {
            let _ = write!(out, "latency:    ");
            for (name, us) in self.percentiles() {
                let name = if name == "p999" { "p99.9" } else { name };
                let _ = write!(out, " {name} {:.3} ms", us as f64 / 1000.0);
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "ok:          {}", self.ok);
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors:      0");
        } else {
            let _ = writeln!(out, "errors:      {}", self.error_summary());
        }
        if self.gave_up > 0 {
            let _ = writeln!(
                out,
                "gave up:     {} of {} workers stopped early ({MAX_CONSECUTIVE_FAILURES} \
                 connection failures in a row)",
                self.gave_up, self.concurrency
            );
        }
        out
    }
}

/// What one worker saw, plus why it stopped early, if it did.
struct WorkerResult {
    report: Report,
    gave_up: Option<String>,
}

/// What the workers are told to do, by [`Load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Send requests; their responses are not recorded.
    Warmup,
    /// Send requests and record their responses.
    Measure,
    /// Send nothing new; a request in flight finishes but is not recorded.
    Pause,
    /// Stop now; a request in flight is dropped and not counted.
    Stop,
}

/// What the coordinator and the workers of one run share.
struct Shared {
    target: Target,
    body: Bytes,
    phase: tokio::sync::watch::Sender<Phase>,
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// `concurrency` closed-loop workers POSTing one body to one target; the caller steers
/// them through [`Phase`]s and collects their report with [`Load::finish`].
struct Load {
    shared: Arc<Shared>,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<WorkerResult>>>,
    concurrency: usize,
}

impl Load {
    /// Starts the workers in [`Phase::Warmup`].
    fn start(target: &Target, body: Bytes, concurrency: usize) -> anyhow::Result<Self> {
        ensure!(concurrency > 0, "concurrency must be at least 1");
        // Fail now rather than in every worker.
        target.post(body.clone())?;
        let (phase, _) = tokio::sync::watch::channel(Phase::Warmup);
        let shared = Arc::new(Shared {
            target: target.clone(),
            body,
            phase,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        });
        let workers = (0..concurrency)
            .map(|_| tokio::spawn(worker(Arc::clone(&shared), concurrency)))
            .collect();
        Ok(Self {
            shared,
            workers,
            concurrency,
        })
    }

    fn set(&self, phase: Phase) {
        self.shared.phase.send_replace(phase);
    }

    /// Records responses for about `time`; returns how long the workers were told to.
    async fn measure_for(&self, time: Duration) -> Duration {
        self.set(Phase::Measure);
        let start = Instant::now();
        tokio::time::sleep(time).await;
        let measured = start.elapsed();
        // Nothing is recorded from here on.
        self.set(Phase::Warmup);
        measured
    }

    /// Pauses the workers and waits, at most `limit`, until no request is in flight.
    async fn pause(&self, limit: Duration) -> anyhow::Result<()> {
        use std::sync::atomic::{fence, Ordering};
        self.set(Phase::Pause);
        // Pairs with the fence in `worker`: a worker that counted itself in flight after
        // this point sees the pause and sends nothing.
        fence(Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        loop {
            let idle = self.shared.idle.notified();
            if self.shared.in_flight.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            if timeout_at(deadline, idle).await.is_err() {
                bail!(
                    "{} requests still in flight {limit:?} after the load paused",
                    self.shared.in_flight.load(Ordering::SeqCst)
                );
            }
        }
    }

    /// Stops the workers and merges what they recorded; `measured` is the time spent in
    /// [`Phase::Measure`].
    async fn finish(mut self, measured: Duration) -> anyhow::Result<Report> {
        self.set(Phase::Stop);
        let mut report = Report::empty(self.concurrency, measured)?;
        let mut gave_up = Vec::new();
        for handle in std::mem::take(&mut self.workers) {
            let result = handle.await.context("bench worker failed")??;
            report
                .latency
                .add(&result.report.latency)
                .map_err(|e| anyhow!("cannot merge latency histograms: {e:?}"))?;
            report.ok += result.report.ok;
            for (kind, n) in result.report.errors {
                *report.errors.entry(kind).or_default() += n;
            }
            gave_up.extend(result.gave_up);
        }
        report.gave_up = gave_up.len();
        if let Some(reason) = gave_up.first() {
            if gave_up.len() == self.concurrency && report.ok == 0 {
                bail!(
                    "all {} workers gave up after {MAX_CONSECUTIVE_FAILURES} \
                     connection failures in a row against {}: {reason}",
                    self.concurrency,
                    self.shared.target.url()
                );
            }
            tracing::warn!(
                workers = gave_up.len(),
                %reason,
                "bench workers stopped early after {MAX_CONSECUTIVE_FAILURES} connection failures in a row"
            );
        }
        Ok(report)
    }
}

impl Drop for Load {
    /// A load given up on (an error in the middle of a run) stops its workers.
    fn drop(&mut self) {
        self.set(Phase::Stop);
    }
}

/// Runs `concurrency` closed-loop workers POSTing `body` to `target` for
/// `warmup + duration`; only responses completed after the warmup count.
async fn load(
    target: &Target,
    body: Bytes,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Report> {
    ensure!(!duration.is_zero(), "duration must be more than 0");
    let load = Load::start(target, body, concurrency)?;
    tokio::time::sleep(warmup).await;
    let measured = load.measure_for(duration).await;
    load.finish(measured).await
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let before = self
            .0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if before == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

async fn worker(shared: Arc<Shared>, concurrency: usize) -> anyhow::Result<WorkerResult> {
    let mut report = Report::empty(concurrency, Duration::ZERO)?;
    let mut failures: u32 = 0;
    let mut conn: Option<Connection> = None;
    let mut gave_up = None;
    let mut phase = shared.phase.subscribe();
    let stopped = |p: &Phase| *p == Phase::Stop;

    loop {
        // Wait while paused.
        match phase
            .wait_for(|p| matches!(p, Phase::Warmup | Phase::Measure | Phase::Stop))
            .await
        {
            Ok(p) if *p != Phase::Stop => {}
            _ => break,
        }
        if conn.as_ref().is_none_or(Connection::is_closed) {
            conn = None;
            let opened = tokio::select! {
                opened = Connection::open(&shared.target.base) => opened,
                _ = phase.wait_for(stopped) => break,
            };
            match opened {
                Ok(new) => conn = Some(new),
                Err(error) => {
                    if *phase.borrow() == Phase::Measure {
                        *report.errors.entry("io".to_string()).or_default() += 1;
                    }
                    failures += 1;
                    if failures >= MAX_CONSECUTIVE_FAILURES {
                        gave_up = Some(format!("{error:#}"));
                        break;
                    }
                    tracing::debug!(error = format!("{error:#}"), "bench connect failed");
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_BACKOFF) => {}
                        _ = phase.wait_for(stopped) => break,
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };

        let request = shared.target.post(shared.body.clone())?;
        let in_flight = InFlight::new(&shared);
        // Counted in flight first, then the phase read again (pairs with the fence in
        // `Load::pause`): a pause that came after the check above, while this worker was
        // connecting, is seen here, and nothing is sent during it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if matches!(*phase.borrow(), Phase::Pause | Phase::Stop) {
            continue;
        }
        let outcome = tokio::select! {
            outcome = c.roundtrip(request) => outcome,
            // Stopped: the request in flight is not counted.
            _ = phase.wait_for(stopped) => break,
        };
        drop(in_flight);
        let measuring = *phase.borrow() == Phase::Measure;
        match outcome {
            Ok((status, _, keep_alive, latency)) => {
                failures = 0;
                if measuring {
                    if status.is_success() {
                        report.ok += 1;
                        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                        report.latency.saturating_record(us.max(LATENCY_MIN_US));
                    } else {
                        *report
                            .errors
                            .entry(status.as_u16().to_string())
                            .or_default() += 1;
                    }
                }
                if !keep_alive {
                    conn = None;
                }
            }
            Err(error) => {
                conn = None;
                if measuring {
                    *report.errors.entry("io".to_string()).or_default() += 1;
                }
                failures += 1;
                if failures >= MAX_CONSECUTIVE_FAILURES {
                    gave_up = Some(format!("{error:#}"));
                    break;
                }
                tracing::debug!(error = format!("{error:#}"), "bench request failed");
            }
        }
    }
    Ok(WorkerResult { report, gave_up })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn shape_of(value: &Value) -> Vec<usize> {
        let mut shape = Vec::new();
        let mut v = value;
        while let Value::Array(items) = v {
            shape.push(items.len());
            match items.first() {
                Some(first) => v = first,
                None => break,
            }
        }
        shape
    }

    fn leaves(value: &Value) -> Vec<&Value> {
        match value {
            Value::Array(items) => items.iter().flat_map(leaves).collect(),
            other => vec![other],
        }
    }

    #[test]
    fn rows_per_request_reads_every_body_kind() {
        let cohort = br#"{"inputs": {"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}}"#;
        assert_eq!(rows_per_request(cohort, None), Some(3));
        let scalar = br#"{"inputs": {"text": "one sentence"}}"#;
        assert_eq!(rows_per_request(scalar, None), Some(1));
        let kserve =
            br#"{"inputs": [{"name": "x", "shape": [32, 1024], "datatype": "FP32", "data": []}]}"#;
        assert_eq!(rows_per_request(kserve, None), Some(32));
        let header = br#"{"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "parameters": {"binary_data_size": 128}}]}"#;
        let mut binary = header.to_vec();
        binary.extend_from_slice(&[0u8; 128]);
        assert_eq!(rows_per_request(&binary, Some(header.len())), Some(8));
        // The binary tail is not JSON: without the header length nothing is read.
        assert_eq!(rows_per_request(&binary, None), None);
        assert_eq!(rows_per_request(b"not json", None), None);
        assert_eq!(rows_per_request(&binary, Some(binary.len() + 1)), None);
    }

    #[test]
    fn ratio_rounds_and_survives_zero() {
        assert_eq!(ratio(90.0, 100.0), 0.9);
        assert_eq!(ratio(2.0, 3.0), 0.667);
        assert_eq!(ratio(5.0, 0.0), 0.0);
    }

    #[test]
    fn builds_request_from_metadata() {
        let metadata = serde_json::json!({
            "name": "mlp", "version": "1", "engine": "candle-mlp",
            "inputs": [
                {"name": "x", "dtype": "f32", "shape": [-1, 64]},
                {"name": "ids", "dtype": "i64", "shape": [-1, -1]},
                {"name": "mask", "dtype": "bool", "shape": [2, -1, 3]},
                {"name": "text", "dtype": "string", "shape": [-1]},
                {"name": "scale", "dtype": "f64", "shape": []},
                {"name": "pixels", "dtype": "u8", "shape": [1, 4]},
                {"name": "n", "dtype": "i32", "shape": [3]}
            ],
            "outputs": [{"name": "y", "dtype": "f32", "shape": [-1, 10]}]
        });
        let body = build_request_body(&metadata, &mut fastrand::Rng::with_seed(7))
            .expect("valid metadata");
        let inputs = body["inputs"].as_object().expect("inputs object");
        assert_eq!(inputs.len(), 7);

        let x = &inputs["x"];
        assert_eq!(shape_of(x), vec![1, 64]);
        for v in leaves(x) {
            let f = v.as_f64().expect("float");
            assert!((-1.0..=1.0).contains(&f), "{f}");
        }
        assert_eq!(shape_of(&inputs["ids"]), vec![1, 8]);
        for v in leaves(&inputs["ids"]) {
            assert!(v.as_u64().expect("non-negative int") < 100);
        }
        assert_eq!(shape_of(&inputs["mask"]), vec![2, 8, 3]);
        assert_eq!(leaves(&inputs["mask"]).len(), 48);
        assert!(leaves(&inputs["mask"]).iter().all(|v| v.is_boolean()));
        assert_eq!(shape_of(&inputs["text"]), vec![1]);
        assert!(inputs["text"][0].as_str().is_some_and(|s| !s.is_empty()));
        assert!(inputs["scale"].is_f64(), "scalar, not an array");
        assert_eq!(shape_of(&inputs["pixels"]), vec![1, 4]);
        assert!(leaves(&inputs["n"]).iter().all(|v| v.as_u64().is_some()));

        // Round-trips through the bytes actually sent.
        let bytes = serde_json::to_vec(&body).expect("serializes");
        let back: Value = serde_json::from_slice(&bytes).expect("parses");
        assert_eq!(shape_of(&back["inputs"]["x"]), vec![1, 64]);
    }

    #[test]
    fn rejects_bad_metadata() {
        let mut rng = fastrand::Rng::with_seed(1);
        let bad_dtype =
            serde_json::json!({"inputs": [{"name": "x", "dtype": "c64", "shape": [1]}]});
        let err = build_request_body(&bad_dtype, &mut rng).expect_err("unknown dtype");
        assert!(format!("{err:#}").contains("c64"), "{err:#}");
        let bad_dim =
            serde_json::json!({"inputs": [{"name": "x", "dtype": "f32", "shape": [1, -3]}]});
        assert!(build_request_body(&bad_dim, &mut rng).is_err());
        let huge = serde_json::json!({"inputs": [{"name": "x", "dtype": "f32", "shape": [100000, 100000]}]});
        assert!(build_request_body(&huge, &mut rng).is_err());
        let no_inputs = serde_json::json!({"name": "mlp"});
        assert!(build_request_body(&no_inputs, &mut rng).is_err());
    }

    fn kserve_meta() -> Value {
        serde_json::json!({
            "name": "m", "versions": ["1"], "platform": "cohort-onnx",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
                {"name": "s", "datatype": "BYTES", "shape": [-1]},
                {"name": "b", "datatype": "BOOL", "shape": [2]}
            ],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]
        })
    }

    #[test]
    fn builds_kserve_json_request() {
        let body = build_kserve_json(&kserve_meta(), &mut fastrand::Rng::with_seed(3))
            .expect("valid metadata");
        let inputs = body["inputs"].as_array().expect("inputs list");
        assert_eq!(inputs.len(), 4);
        assert_eq!(inputs[0]["name"], "x");
        assert_eq!(inputs[0]["datatype"], "FP32");
        assert_eq!(inputs[0]["shape"], serde_json::json!([1, 4]));
        assert_eq!(inputs[0]["data"].as_array().map(Vec::len), Some(4));
        assert_eq!(inputs[1]["data"].as_array().map(Vec::len), Some(3));
        assert!(inputs[2]["data"][0].is_string());
        assert_eq!(inputs[3]["shape"], serde_json::json!([2]));
        let bad =
            serde_json::json!({"inputs": [{"name": "x", "datatype": "UINT16", "shape": [1]}]});
        assert!(build_kserve_json(&bad, &mut fastrand::Rng::with_seed(3)).is_err());
    }

    #[test]
    fn builds_kserve_binary_request() {
        let (body, n) = build_kserve_binary(&kserve_meta(), &mut fastrand::Rng::with_seed(3))
            .expect("valid metadata");
        let header: Value = serde_json::from_slice(&body[..n]).expect("JSON header");
        assert_eq!(header["parameters"]["binary_data_output"], true);
        let inputs = header["inputs"].as_array().expect("inputs list");
        assert!(inputs.iter().all(|i| i.get("data").is_none()));
        let sizes: Vec<u64> = inputs
            .iter()
            .map(|i| i["parameters"]["binary_data_size"].as_u64().expect("size"))
            .collect();
        assert_eq!(sizes[0], 16, "1x4 FP32");
        assert_eq!(sizes[1], 24, "1x3 INT64");
        assert_eq!(sizes[3], 2, "two BOOL bytes");
        let raw = &body[n..];
        assert_eq!(raw.len() as u64, sizes.iter().sum::<u64>());
        // The first input's floats are in [-1, 1].
        for c in raw[..16].chunks_exact(4) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            assert!((-1.0..=1.0).contains(&v), "{v}");
        }
        // BYTES: a 4-byte little-endian length, then the text.
        let s = &raw[40..40 + sizes[2] as usize];
        let len = u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize;
        assert_eq!(len + 4, s.len());
        assert!(std::str::from_utf8(&s[4..]).is_ok());
    }

    #[test]
    fn kserve_targets_send_the_binary_header() {
        let base = BaseUrl::parse("http://127.0.0.1:8000").expect("url");
        let path = request_path("mlp", Some("/v2/models/{model}/infer")).expect("path");
        let mut target = Target::new(base, &path).expect("target");
        assert_eq!(target.uri, "/v2/models/mlp/infer");
        target.inference_header = Some(HeaderValue::from(42usize));
        let req = target.post(Bytes::from_static(b"x")).expect("request");
        assert_eq!(req.headers()[INFERENCE_HEADER_CONTENT_LENGTH], "42");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/octet-stream");
    }

    #[test]
    fn report_percentiles_and_json() {
        let mut report = Report::empty(4, Duration::from_secs(2)).expect("histogram");
        for us in 1..=1000 {
            report.latency.record(us).expect("in range");
        }
        report.ok = 1000;
        report.errors.insert("503".to_string(), 6);
        report.errors.insert("io".to_string(), 2);

        let json = report.to_json();
        assert_eq!(json["requests_per_second"].as_f64(), Some(504.0));
        assert_eq!(json["latency_us"]["p50"].as_u64(), Some(500));
        assert_eq!(json["latency_us"]["p90"].as_u64(), Some(900));
        assert_eq!(json["latency_us"]["p99"].as_u64(), Some(990));
        assert_eq!(json["latency_us"]["p999"].as_u64(), Some(999));
        assert_eq!(json["latency_us"]["max"].as_u64(), Some(1000));
        assert_eq!(json["ok"].as_u64(), Some(1000));
        assert_eq!(json["errors"]["503"].as_u64(), Some(6));
        assert_eq!(json["errors"]["io"].as_u64(), Some(2));
        assert_eq!(json["concurrency"].as_u64(), Some(4));
        assert_eq!(json["duration_s"].as_f64(), Some(2.0));
        assert_eq!(json["workers_gave_up"].as_u64(), Some(0));
        let keys: Vec<&String> = json.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 7);
        // Samples count successful requests only; requests/s counts every answer.
        assert_eq!(report.ok_per_second(), 500.0);
        assert_eq!(report.error_summary(), "8 errors (503: 6, io: 2)");

        let text = report.to_text();
        assert!(text.contains("requests/s:  504.0"), "{text}");
        assert!(text.contains("p50 0.500 ms"), "{text}");
        assert!(text.contains("p99.9 0.999 ms"), "{text}");
        assert!(text.contains("max 1.000 ms"), "{text}");
        assert!(text.contains("503: 6, io: 2"), "{text}");

        let empty = Report::empty(1, Duration::from_secs(1)).expect("histogram");
        assert_eq!(empty.to_json()["latency_us"]["p99"].as_u64(), Some(0));
        assert_eq!(empty.to_json()["errors"], serde_json::json!({}));
        assert!(empty.to_text().contains("n/a"));
        assert_eq!(empty.error_summary(), "no errors");

        let mut gave_up = empty;
        gave_up.gave_up = 1;
        assert!(gave_up.to_text().contains("1 of 1 workers stopped early"));
    }

    #[test]
    fn request_inputs_give_each_inputs_shape() {
        let cohort =
            br#"{"inputs": {"x": [[1.0, 2.0], [3.0, 4.0]], "ids": [[[1], [2]]], "t": "s"}}"#;
        let inputs = request_inputs(cohort, None).expect("readable");
        assert_eq!(
            inputs,
            vec![
                ("ids".to_string(), vec![1, 2, 1]),
                ("t".to_string(), vec![]),
                ("x".to_string(), vec![2, 2]),
            ]
        );
        let kserve =
            br#"{"inputs": [{"name": "x", "shape": [32, 1024]}, {"name": "m", "shape": [32, 8]}]}"#;
        let inputs = request_inputs(kserve, None).expect("readable");
        assert_eq!(
            inputs,
            vec![
                ("x".to_string(), vec![32, 1024]),
                ("m".to_string(), vec![32, 8])
            ]
        );
        assert_eq!(rows_of(&inputs), 32);
        assert_eq!(request_inputs(br#"{"inputs": []}"#, None), None);
        assert_eq!(request_inputs(br#"{"inputs": {}}"#, None), None);
        let bad = br#"{"inputs": [{"name": "x", "shape": [-1, 4]}]}"#;
        assert_eq!(request_inputs(bad, None), None);
    }

    #[test]
    fn parses_urls() {
        let base = BaseUrl::parse("http://127.0.0.1:8080").expect("valid");
        assert_eq!(base.host, "127.0.0.1");
        assert_eq!(base.port, 8080);
        assert_eq!(base.host_header, "127.0.0.1:8080");
        assert_eq!(base.base_path, "");
        let target = Target::new(base, &request_path("mlp", None).expect("path")).expect("target");
        assert_eq!(target.uri, "/api/v1/models/mlp/infer");
        assert_eq!(
            target.url(),
            "http://127.0.0.1:8080/api/v1/models/mlp/infer"
        );

        let base = BaseUrl::parse("http://node.local/cohort/").expect("valid");
        assert_eq!((base.host.as_str(), base.port), ("node.local", 80));
        assert_eq!(base.host_header, "node.local");
        assert_eq!(base.base_path, "/cohort");
        let path = request_path("my model", Some("/api/v1/models/{model}/batch")).expect("path");
        let target = Target::new(base, &path).expect("target");
        assert_eq!(target.uri, "/cohort/api/v1/models/my%20model/batch");

        let base = BaseUrl::parse("http://[::1]:9000/").expect("ipv6");
        assert_eq!(base.host, "::1");
        assert_eq!(base.host_header, "[::1]:9000");

        let err = BaseUrl::parse("https://127.0.0.1:8443").expect_err("https");
        assert!(format!("{err}").contains("https is not supported"), "{err}");
        assert!(BaseUrl::parse("127.0.0.1:8080").is_err());
        assert!(BaseUrl::parse("ftp://host/").is_err());
        assert!(BaseUrl::parse("http://").is_err());
        assert!(BaseUrl::parse("http://host:8080/?a=b").is_err());
        assert!(request_path("mlp", Some("no-slash")).is_err());
    }

    #[test]
    fn parses_args() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        <Cli as clap::CommandFactory>::command().debug_assert();
        let cli = Cli::try_parse_from(["bench", "--model", "mlp"]).expect("defaults");
        let args = cli.bench;
        assert_eq!(args.url, "http://127.0.0.1:8080");
        assert_eq!(args.concurrency, 16);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(1));
        assert!(args.body.is_none() && args.path.is_none() && !args.json);
        assert_eq!(args.protocol, Protocol::Rest);
        let cli = Cli::try_parse_from(["bench", "--model", "m", "--protocol", "kserve-binary"])
            .expect("protocol");
        assert_eq!(cli.bench.protocol, Protocol::KserveBinary);
        assert!(Cli::try_parse_from(["bench", "--model", "m", "--protocol", "grpc"]).is_err());
        let cli = Cli::try_parse_from([
            "bench",
            "--model",
            "m",
            "--duration",
            "1m 30s",
            "--warmup",
            "0s",
            "--concurrency",
            "3",
            "--json",
        ])
        .expect("parses");
        assert_eq!(cli.bench.duration, Duration::from_secs(90));
        assert!(cli.bench.warmup.is_zero());
        assert!(
            Cli::try_parse_from(["bench"]).is_err(),
            "--model is required"
        );
        assert!(Cli::try_parse_from(["bench", "--model", "m", "--concurrency", "0"]).is_err());
    }

    // A minimal keep-alive HTTP/1.1 responder (hyper's server feature is off).
    async fn spawn_server(status_line: &'static str, body: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let response: Arc<[u8]> = format!(
            "HTTP/1.1 {status_line}\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, Arc::clone(&response)));
            }
        });
        addr
    }

    async fn serve_connection(stream: TcpStream, response: Arc<[u8]>) {
        let mut buf = Vec::new();
        loop {
            let header_end = loop {
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break pos + 4;
                }
                if !read_some(&stream, &mut buf).await {
                    return;
                }
            };
            let headers = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
            let content_length: usize = headers
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < header_end + content_length {
                if !read_some(&stream, &mut buf).await {
                    return;
                }
            }
            buf.drain(..header_end + content_length);
            let mut written = 0;
            while written < response.len() {
                if stream.writable().await.is_err() {
                    return;
                }
                match stream.try_write(&response[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }

    async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            if stream.readable().await.is_err() {
                return false;
            }
            match stream.try_read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
    }

    fn target_for(addr: SocketAddr) -> Target {
        let base = BaseUrl::parse(&format!("http://{addr}")).expect("url");
        Target::new(base, &request_path("mlp", None).expect("path")).expect("target")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn load_against_local_server() {
        let addr = spawn_server("200 OK", "{}").await;
        let target = target_for(addr);
        let body = Bytes::from_static(br#"{"inputs":{"x":[[0.5,-0.25]]}}"#);
        let report = load(
            &target,
            body,
            2,
            Duration::from_millis(200),
            Duration::from_secs(1),
        )
        .await
        .expect("load runs");
        assert!(report.ok > 0, "{report:?}");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.latency.len(), report.ok);
        let json = report.to_json();
        assert_eq!(json["concurrency"].as_u64(), Some(2));
        // The window actually measured: at least the one asked for.
        assert!(
            json["duration_s"]
                .as_f64()
                .is_some_and(|d| (1.0..10.0).contains(&d)),
            "{json}"
        );
        assert!(json["requests_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0));
        assert!(json["latency_us"]["p50"].as_u64().is_some_and(|p| p >= 1));
    }

    /// A server that answers each request with `connection: close` and counts requests.
    async fn spawn_closing_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt as _;
                    let mut buf = Vec::new();
                    loop {
                        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                        if !read_some(&stream, &mut buf).await {
                            return;
                        }
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let response =
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
                    let _ = stream.write_all(response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_load_sends_nothing_even_while_reconnecting() {
        use std::sync::atomic::Ordering;
        let (addr, seen) = spawn_closing_server().await;
        let load = Load::start(&target_for(addr), Bytes::from_static(b"{}"), 8).expect("starts");
        for _ in 0..5 {
            load.measure_for(Duration::from_millis(50)).await;
            load.pause(Duration::from_secs(10)).await.expect("drains");
            // Every worker reconnects after each answer; none may send while paused.
            let before = seen.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                seen.load(Ordering::SeqCst),
                before,
                "a request during a pause"
            );
        }
        let report = load
            .finish(Duration::from_millis(250))
            .await
            .expect("report");
        assert!(report.ok > 0, "{report:?}");

        // A load dropped without finish stops its workers.
        let load = Load::start(&target_for(addr), Bytes::from_static(b"{}"), 4).expect("starts");
        let start = seen.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) == start {
            assert!(Instant::now() < deadline, "the load never sent anything");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(load);
        // Requests already on their way may land; then nothing more.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = seen.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            seen.load(Ordering::SeqCst),
            after,
            "workers kept sending after drop"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_error_statuses() {
        let addr = spawn_server("503 Service Unavailable", r#"{"error":"busy"}"#).await;
        let report = load(
            &target_for(addr),
            Bytes::from_static(b"{}"),
            1,
            Duration::ZERO,
            Duration::from_millis(300),
        )
        .await
        .expect("load runs");
        assert_eq!(report.ok, 0);
        assert!(
            report.errors.get("503").is_some_and(|&n| n > 0),
            "{report:?}"
        );
        assert_eq!(report.errors.len(), 1);
        assert!(report.latency.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_server_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = load(
            &target_for(addr),
            Bytes::from_static(b"{}"),
            2,
            Duration::ZERO,
            Duration::from_secs(5),
        )
        .await
        .expect_err("nothing listens");
        assert!(format!("{err:#}").contains("gave up"), "{err:#}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetches_metadata() {
        let meta =
            r#"{"name":"mlp","inputs":[{"name":"x","dtype":"f32","shape":[-1,4]}],"outputs":[]}"#;
        let addr = spawn_server("200 OK", meta).await;
        let base = BaseUrl::parse(&format!("http://{addr}")).expect("url");
        let value = fetch_metadata(&base, "mlp", Protocol::Rest)
            .await
            .expect("metadata");
        assert_eq!(value["inputs"][0]["shape"], serde_json::json!([-1, 4]));

        let addr = spawn_server("404 Not Found", r#"{"error":"model not found: nope"}"#).await;
        let base = BaseUrl::parse(&format!("http://{addr}")).expect("url");
        let err = fetch_metadata(&base, "nope", Protocol::Rest)
            .await
            .expect_err("404");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("404") && msg.contains("model not found: nope"),
            "{msg}"
        );
    }
}
