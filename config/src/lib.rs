//! Typed configuration of one Cohort node.
//!
//! A node's configuration is read in three layers, each overriding the one before:
//!
//! 1. a TOML file (`--config FILE`), whose unknown keys are rejected;
//! 2. `COHORT_*` environment variables (the table in [`ENV_VARS`]);
//! 3. command-line flags, handed in as [`Overrides`].
//!
//! With no file at all the defaults describe the embedded single node of `cohort up`:
//! HTTP on `127.0.0.1:8080`, data under `./cohort-data`, and the built-in demo models.
//! [`NodeConfig::validate`] reports every problem at once, each with its field path
//! (`models[1].batching.max_batch_size: must be between 1 and 4096`).
//!
//! ```
//! use cohort_config::{NodeConfig, Overrides};
//! let cfg = NodeConfig::load(None, std::iter::empty(), &Overrides::default()).unwrap();
//! assert_eq!(cfg.http_addr.to_string(), "127.0.0.1:8080");
//! assert!(cfg.builtin_models);
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version of the configuration format this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// Everything that can go wrong while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// An environment variable could not be parsed.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// The configuration parsed but breaks one or more rules.
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<FieldError>),
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One broken rule, with the path of the field that breaks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The whole configuration of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Version of this file's format; only [`CONFIG_VERSION`] is accepted.
    pub config_version: u32,
    /// The node's name, shown in the API and the logs.
    pub node_name: String,
    /// Where the node keeps its files (generated models, later Raft and jobs).
    pub data_dir: PathBuf,
    /// The HTTP gateway's listen address.
    pub http_addr: SocketAddr,
    /// Where model directories are looked for (default: `<data_dir>/models`).
    pub models_dir: Option<PathBuf>,
    /// Serve the built-in demo models (`mlp`, `echo`, and `minilm` when its files are in
    /// the models dir) besides those in `models`.
    pub builtin_models: bool,
    /// Where the ONNX Runtime shared library comes from.
    pub onnxruntime: OnnxRuntimeConfig,
    /// Cluster membership and Raft.
    pub cluster: ClusterSection,
    /// Limits that protect the node.
    pub limits: Limits,
    /// The HTTP server's protections: timeouts, header and JSON limits, concurrency, CORS.
    pub http: HttpSection,
    /// API tokens and access control.
    pub auth: AuthSection,
    /// Sampled per-request records kept in this node's sled.
    pub request_log: RequestLogSection,
    /// The models this node serves.
    pub models: Vec<ModelConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            config_version: CONFIG_VERSION,
            node_name: "cohort-1".into(),
            data_dir: PathBuf::from("./cohort-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            models_dir: None,
            builtin_models: true,
            onnxruntime: OnnxRuntimeConfig::default(),
            cluster: ClusterSection::default(),
            limits: Limits::default(),
            http: HttpSection::default(),
            auth: AuthSection::default(),
            request_log: RequestLogSection::default(),
            models: Vec::new(),
        }
    }
}

/// Where the ONNX Runtime shared library (`libonnxruntime.so`) comes from: this path,
/// else `COHORT_ORT_LIB`, else the `onnxruntime` package of the machine's `python3`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxRuntimeConfig {
    pub library: Option<PathBuf>,
}

/// Cluster membership and Raft. A node without `join` bootstraps a new cluster (`cohort
/// up` is a cluster of one on loopback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Where this node's cluster listener (Raft, actors) listens; other nodes reach it
    /// here. Port 0 picks a free port (only useful for a cluster of one).
    pub cluster_addr: SocketAddr,
    /// A member's cluster address to join; absent: bootstrap a new cluster.
    pub join: Option<String>,
    /// File holding the shared secret (the cookie); else `COHORT_COOKIE`. A cluster of
    /// one on loopback makes up its own when neither is given.
    pub cookie_file: Option<PathBuf>,
    /// Raft's tick, in milliseconds (elections take 10 to 20 ticks).
    pub tick_ms: u64,
    /// A member not heard from for this long is marked down.
    pub down_after_ms: u64,
    /// Applied entries between snapshots (the log is compacted at each).
    pub snapshot_threshold: u64,
    /// How long to keep trying to reach `join` at start.
    pub join_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            cluster_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            join: None,
            cookie_file: None,
            tick_ms: 50,
            down_after_ms: 5_000,
            snapshot_threshold: 10_000,
            join_timeout_ms: 30_000,
        }
    }
}

/// Limits on requests and queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most items in one `/batch` request.
    pub max_batch_items: usize,
    /// Requests waiting in one replica's queue before it answers 503 OVERLOADED.
    pub queue_capacity: usize,
    /// Deadline of a request that gives no `timeout_ms`.
    pub request_timeout_ms: u64,
    /// Longest deadline a request may ask for.
    pub max_request_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 * 1024 * 1024,
            max_batch_items: 100,
            queue_capacity: 1024,
            request_timeout_ms: 30_000,
            max_request_timeout_ms: 600_000,
        }
    }
}

/// Protections of the HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// A client must send a request's whole header block within this long, or the
    /// connection is closed (a slow client cannot hold a connection open).
    pub header_read_timeout_ms: u64,
    /// A client must send a request's whole body within this long (408 otherwise).
    pub body_read_timeout_ms: u64,
    /// Writing an answer may make no progress (the client reads nothing) for at most this
    /// long; then the connection is closed and the answer dropped.
    pub write_timeout_ms: u64,
    /// Largest request header block, in bytes (431 above it).
    pub max_header_bytes: usize,
    /// Deepest nesting of arrays and objects accepted in a JSON body (400 above it).
    pub max_json_depth: usize,
    /// Requests served at once by this node; above it, 503 OVERLOADED with Retry-After.
    /// Health probes are not counted.
    pub max_concurrent_requests: usize,
    /// Origins allowed by CORS (`*` for any). Empty: CORS is off (no CORS headers).
    pub cors_allowed_origins: Vec<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_json_depth: 64,
            max_concurrent_requests: 4096,
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// Whether the API asks for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// On, unless the HTTP listener is on loopback.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Off: anyone who reaches the port may do anything. Refused on an address other than
    /// loopback unless `insecure` is set.
    Off,
}

/// API tokens and access control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// On, off, or auto (on unless HTTP listens on loopback only).
    pub mode: AuthMode,
    /// Allows auth off on an address other than loopback (`--insecure`).
    pub insecure: bool,
    /// Where a bootstrapping cluster writes its first admin token (mode 0600); default
    /// `<data_dir>/admin-token`.
    pub admin_token_file: Option<PathBuf>,
    /// How often this node sends the usage it counted to the cluster (quotas lag by
    /// about this long).
    pub usage_flush_ms: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            mode: AuthMode::Auto,
            insecure: false,
            admin_token_file: None,
            usage_flush_ms: 1_000,
        }
    }
}

impl NodeConfig {
    /// Whether API tokens are required on this node.
    pub fn auth_enabled(&self) -> bool {
        match self.auth.mode {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => !self.http_addr.ip().is_loopback(),
        }
    }

    /// Where the first admin token is written.
    pub fn admin_token_path(&self) -> PathBuf {
        self.auth
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }
}

/// Sampled per-request records, kept in this node's sled with bounded retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLogSection {
    /// Whether records are kept at all.
    pub enabled: bool,
    /// Share of successful requests recorded (0.0 to 1.0); errors are always recorded.
    pub sample_rate: f64,
    /// Most records kept; the oldest go first.
    pub max_records: usize,
    /// Records older than this are dropped.
    pub max_age_s: u64,
}

impl Default for RequestLogSection {
    fn default() -> Self {
        RequestLogSection {
            enabled: true,
            sample_rate: 0.01,
            max_records: 100_000,
            max_age_s: 7 * 24 * 3600,
        }
    }
}

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// A multi-layer perceptron read from safetensors, run with candle.
    CandleMlp,
    /// Any `.onnx` model, run with ONNX Runtime.
    Onnx,
    /// A BERT-family sentence-embedding model (sentence-transformers layout), run with
    /// candle.
    CandleBert,
    /// Returns its input unchanged.
    Echo,
    /// Echoes after sleeping `options.sleep_ms`.
    Sleep,
    /// Echoes, but fails every `options.fail_every`-th call.
    Fail,
}

impl EngineKind {
    /// The name used in configuration files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::CandleMlp => "candle-mlp",
            EngineKind::Onnx => "onnx",
            EngineKind::CandleBert => "candle-bert",
            EngineKind::Echo => "echo",
            EngineKind::Sleep => "sleep",
            EngineKind::Fail => "fail",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the `fail` test engine fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// The call returns an error.
    #[default]
    Error,
    /// The call panics (the replica is restarted).
    Panic,
}

/// One model served by this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`/api/v1/models/{name}/infer`).
    pub name: String,
    /// The engine that runs it.
    pub engine: EngineKind,
    /// Model file; relative paths are read from the data dir.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The version reported to clients.
    #[serde(default = "default_version")]
    pub version: String,
    /// How many replicas this node runs.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Where the replicas run: `cpu`, `cuda:N`, or `auto` (a GPU with enough free memory,
    /// else the CPU).
    #[serde(default = "default_device")]
    pub device: String,
    /// Dynamic batching.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Engine-specific options.
    #[serde(default)]
    pub options: EngineOptions,
}

fn default_version() -> String {
    "1".into()
}
fn default_replicas() -> usize {
    1
}
fn default_device() -> String {
    "cpu".into()
}

impl ModelConfig {
    /// A model with default settings.
    pub fn new(name: impl Into<String>, engine: EngineKind) -> Self {
        ModelConfig {
            name: name.into(),
            engine,
            path: None,
            version: default_version(),
            replicas: default_replicas(),
            device: default_device(),
            batching: BatchingConfig::default(),
            options: EngineOptions::default(),
        }
    }

    /// The model file's path, resolved against the data dir.
    pub fn resolved_path(&self, data_dir: &Path) -> Option<PathBuf> {
        self.path.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                data_dir.join(p)
            }
        })
    }
}

/// How a replica groups queued requests into one engine call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Most rows (the inputs' first dimension, summed over the requests) in one engine
    /// call; a request of more rows still runs, alone. 1 turns batching off.
    pub max_batch_size: usize,
    /// Longest wait for a batch to fill once its first request is queued, as Triton's
    /// `max_queue_delay_microseconds`. 0: take what is queued and go.
    pub max_queue_delay_us: u64,
    /// After this long in the queue a request moves up one priority level, so that low
    /// priority is never starved.
    pub priority_aging_ms: u64,
    /// Text models: most tokens in one engine call, as TEI's `max-batch-tokens`.
    /// 0 turns the limit off.
    pub max_batch_tokens: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_size: 32,
            max_queue_delay_us: 0,
            priority_aging_ms: 100,
            max_batch_tokens: 0,
        }
    }
}

/// Engine-specific options; each engine reads the ones it needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// `onnx`: intra-op threads per replica (default: the node's cores divided among the
    /// node's ONNX replicas, at least 1).
    pub intra_op_threads: Option<usize>,
    /// `onnx`: let idle intra-op threads spin-wait for work (ONNX Runtime's
    /// `session.intra_op.allow_spinning`). Default false: they sleep, and leave the cores to
    /// the node's HTTP workers; spinning helps latency only where cores are to spare.
    pub intra_op_spinning: Option<bool>,
    /// `candle-bert`: L2-normalize the embeddings (default true).
    pub normalize: Option<bool>,
    /// `candle-bert`: truncate inputs to this many tokens (default: the model's maximum).
    pub max_length: Option<usize>,
    /// `sleep`: how long each call sleeps.
    pub sleep_ms: Option<u64>,
    /// `fail`: every Nth call fails.
    pub fail_every: Option<u64>,
    /// `fail`: an error or a panic.
    pub fail_mode: FailMode,
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub models_dir: Option<PathBuf>,
    pub http_addr: Option<SocketAddr>,
    pub cluster_addr: Option<SocketAddr>,
    pub join: Option<String>,
    pub cookie_file: Option<PathBuf>,
    /// `--auth on|off|auto`.
    pub auth: Option<AuthMode>,
    /// `--insecure`: allows auth off beyond loopback.
    pub insecure: bool,
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("expected true or false, got {other:?}")),
    }
}

/// The largest `http.max_header_bytes` accepted (400 KiB). hyper's HTTP/1 read buffer is
/// capped at 417792 bytes (8 KiB + 400 × 4 KiB, its default `max_buf_size`, which the gateway
/// keeps), and a header block that fills it is refused before `max_header_bytes` is looked
/// at; a larger setting would not take effect.
pub const MAX_HEADER_BYTES_CEILING: usize = 400 * 1024;

/// The largest `http.max_json_depth` accepted. serde_json refuses to parse nesting 128 deep
/// (its recursion limit), so deeper settings would not take effect.
pub const MAX_JSON_DEPTH_CEILING: usize = 127;

/// The environment variables a node reads, with the field each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("COHORT_NODE_NAME", "node_name"),
    ("COHORT_DATA_DIR", "data_dir"),
    ("COHORT_MODELS_DIR", "models_dir"),
    ("COHORT_HTTP_ADDR", "http_addr"),
    ("COHORT_CLUSTER_ADDR", "cluster.cluster_addr"),
    ("COHORT_JOIN", "cluster.join"),
    ("COHORT_COOKIE_FILE", "cluster.cookie_file"),
    ("COHORT_BUILTIN_MODELS", "builtin_models"),
    ("COHORT_MAX_BODY_BYTES", "limits.max_body_bytes"),
    ("COHORT_MAX_BATCH_ITEMS", "limits.max_batch_items"),
    ("COHORT_QUEUE_CAPACITY", "limits.queue_capacity"),
    ("COHORT_REQUEST_TIMEOUT_MS", "limits.request_timeout_ms"),
    ("COHORT_AUTH", "auth.mode"),
    ("COHORT_INSECURE", "auth.insecure"),
    (
        "COHORT_MAX_CONCURRENT_REQUESTS",
        "http.max_concurrent_requests",
    ),
    ("COHORT_REQUEST_LOG_SAMPLE_RATE", "request_log.sample_rate"),
];

/// Picks the `COHORT_*` variables out of a process environment (`std::env::vars_os()`), as
/// UTF-8 pairs for [`NodeConfig::load`]. Variables without the `COHORT_` prefix are ignored
/// whatever bytes they hold; a variable the node reads ([`ENV_VARS`]) whose value is not valid
/// UTF-8 is an error naming it. Other `COHORT_*` variables with bad bytes (for instance
/// `COHORT_TOKEN`, read by `cohort ctl` only) are skipped, as [`NodeConfig::apply_env`] would.
pub fn cohort_env(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let Some(name) = name.to_str().filter(|n| n.starts_with("COHORT_")) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => out.push((name.to_string(), value)),
            Err(_) if ENV_VARS.iter().any(|(known, _)| *known == name) => {
                return Err(ConfigError::Env {
                    var: name.to_string(),
                    message: "the value is not valid UTF-8".to_string(),
                })
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

impl NodeConfig {
    /// Reads the file (if any), applies the environment and the flags, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<NodeConfig, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_toml_str(&text, &path.display().to_string())?
            }
            None => NodeConfig::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_overrides(overrides);
        cfg.validate().map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Parses TOML text (`origin` names it in errors). Does not validate.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<NodeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Applies the `COHORT_*` variables of [`ENV_VARS`]; other variables are ignored.
    pub fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in env {
            let Some((_, field)) = ENV_VARS.iter().find(|(name, _)| *name == var) else {
                continue;
            };
            let bad = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            let num = |v: &str| v.trim().parse::<u64>().map_err(|e| bad(e.to_string()));
            match *field {
                "node_name" => self.node_name = value.clone(),
                "data_dir" => self.data_dir = PathBuf::from(&value),
                "models_dir" => self.models_dir = Some(PathBuf::from(&value)),
                "http_addr" => {
                    self.http_addr = value.trim().parse().map_err(|e| {
                        bad(format!("{e} (expected host:port, e.g. 127.0.0.1:8080)"))
                    })?
                }
                "cluster.cluster_addr" => {
                    self.cluster.cluster_addr = value.trim().parse().map_err(|e| {
                        bad(format!("{e} (expected host:port, e.g. 127.0.0.1:7100)"))
                    })?
                }
                "cluster.join" => self.cluster.join = Some(value.trim().to_string()),
                "cluster.cookie_file" => self.cluster.cookie_file = Some(PathBuf::from(&value)),
                "builtin_models" => self.builtin_models = boolean(&value).map_err(bad)?,
                "auth.insecure" => self.auth.insecure = boolean(&value).map_err(bad)?,
                "auth.mode" => {
                    self.auth.mode = match value.trim() {
                        "auto" => AuthMode::Auto,
                        "on" => AuthMode::On,
                        "off" => AuthMode::Off,
                        other => {
                            return Err(bad(format!("expected auto, on or off, got {other:?}")))
                        }
                    }
                }
                "http.max_concurrent_requests" => {
                    self.http.max_concurrent_requests = num(&value)? as usize
                }
                "request_log.sample_rate" => {
                    self.request_log.sample_rate = value
                        .trim()
                        .parse::<f64>()
                        .map_err(|e| bad(format!("{e} (expected a number from 0.0 to 1.0)")))?
                }
                "limits.max_body_bytes" => self.limits.max_body_bytes = num(&value)? as usize,
                "limits.max_batch_items" => self.limits.max_batch_items = num(&value)? as usize,
                "limits.queue_capacity" => self.limits.queue_capacity = num(&value)? as usize,
                "limits.request_timeout_ms" => self.limits.request_timeout_ms = num(&value)?,
                other => unreachable!("ENV_VARS names a field apply_env does not know: {other}"),
            }
        }
        Ok(())
    }

    /// Applies command-line flags.
    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(v) = &o.node_name {
            self.node_name = v.clone();
        }
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.models_dir {
            self.models_dir = Some(v.clone());
        }
        if let Some(v) = o.http_addr {
            self.http_addr = v;
        }
        if let Some(v) = o.cluster_addr {
            self.cluster.cluster_addr = v;
        }
        if let Some(v) = &o.join {
            self.cluster.join = Some(v.clone());
        }
        if let Some(v) = &o.cookie_file {
            self.cluster.cookie_file = Some(v.clone());
        }
        if let Some(v) = o.auth {
            self.auth.mode = v;
        }
        if o.insecure {
            self.auth.insecure = true;
        }
    }

    /// Checks every rule and returns every broken one.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: &str| {
            errs.push(FieldError {
                path,
                message: message.to_string(),
            })
        };
        if self.config_version != CONFIG_VERSION {
            err(
                "config_version".into(),
                &format!("this build reads version {CONFIG_VERSION}"),
            );
        }
        if !valid_name(&self.node_name) {
            err("node_name".into(), NAME_RULE);
        }
        if self.data_dir.as_os_str().is_empty() {
            err("data_dir".into(), "must not be empty");
        }
        let l = &self.limits;
        if !(1024..=1 << 30).contains(&l.max_body_bytes) {
            err(
                "limits.max_body_bytes".into(),
                "must be between 1024 and 1073741824",
            );
        }
        if !(1..=10_000).contains(&l.max_batch_items) {
            err(
                "limits.max_batch_items".into(),
                "must be between 1 and 10000",
            );
        }
        if !(1..=1_000_000).contains(&l.queue_capacity) {
            err(
                "limits.queue_capacity".into(),
                "must be between 1 and 1000000",
            );
        }
        if l.request_timeout_ms == 0 {
            err("limits.request_timeout_ms".into(), "must be at least 1");
        }
        if l.max_request_timeout_ms < l.request_timeout_ms {
            err(
                "limits.max_request_timeout_ms".into(),
                "must be at least limits.request_timeout_ms",
            );
        }
        let h = &self.http;
        if !(100..=3_600_000).contains(&h.header_read_timeout_ms) {
            err(
                "http.header_read_timeout_ms".into(),
                "must be between 100 and 3600000",
            );
        }
        if !(100..=3_600_000).contains(&h.body_read_timeout_ms) {
            err(
                "http.body_read_timeout_ms".into(),
                "must be between 100 and 3600000",
            );
        }
        if !(100..=3_600_000).contains(&h.write_timeout_ms) {
            err(
                "http.write_timeout_ms".into(),
                "must be between 100 and 3600000",
            );
        }
        if !(8192..=MAX_HEADER_BYTES_CEILING).contains(&h.max_header_bytes) {
            err(
                "http.max_header_bytes".into(),
                &format!("must be between 8192 and {MAX_HEADER_BYTES_CEILING}"),
            );
        }
        if !(2..=MAX_JSON_DEPTH_CEILING).contains(&h.max_json_depth) {
            err(
                "http.max_json_depth".into(),
                &format!("must be between 2 and {MAX_JSON_DEPTH_CEILING}"),
            );
        }
        if !(1..=1_000_000).contains(&h.max_concurrent_requests) {
            err(
                "http.max_concurrent_requests".into(),
                "must be between 1 and 1000000",
            );
        }
        for (i, o) in h.cors_allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                err(
                    format!("http.cors_allowed_origins[{i}]"),
                    "must be * or an origin such as https://console.example.com",
                );
            }
        }
        if self.auth.mode == AuthMode::Off
            && !self.auth.insecure
            && !self.http_addr.ip().is_loopback()
        {
            err(
                "auth.mode".into(),
                "auth is off but HTTP listens beyond loopback: turn auth on, or give --insecure (auth.insecure = true) to accept that anyone who reaches the port may do anything",
            );
        }
        if !(10..=3_600_000).contains(&self.auth.usage_flush_ms) {
            err(
                "auth.usage_flush_ms".into(),
                "must be between 10 and 3600000",
            );
        }
        let r = &self.request_log;
        if !(0.0..=1.0).contains(&r.sample_rate) {
            err(
                "request_log.sample_rate".into(),
                "must be between 0.0 and 1.0",
            );
        }
        if !(1..=100_000_000).contains(&r.max_records) {
            err(
                "request_log.max_records".into(),
                "must be between 1 and 100000000",
            );
        }
        if r.max_age_s == 0 {
            err("request_log.max_age_s".into(), "must be at least 1");
        }
        let c = &self.cluster;
        if !(1..=10_000).contains(&c.tick_ms) {
            err("cluster.tick_ms".into(), "must be between 1 and 10000");
        }
        if c.down_after_ms < c.tick_ms.saturating_mul(20) {
            err(
                "cluster.down_after_ms".into(),
                "must be at least 20 ticks (an election's worst case)",
            );
        }
        if c.snapshot_threshold == 0 {
            err("cluster.snapshot_threshold".into(), "must be at least 1");
        }
        if let Some(j) = &c.join {
            if j.parse::<SocketAddr>().is_err() && !j.contains(':') {
                err("cluster.join".into(), "must be host:port");
            }
        }
        if c.join.is_some() && c.cluster_addr.port() == 0 {
            err(
                "cluster.cluster_addr".into(),
                "a node that joins needs a fixed port (other nodes must reach it)",
            );
        }
        let mut seen = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let p = |f: &str| format!("models[{i}].{f}");
            if !valid_name(&m.name) {
                err(p("name"), NAME_RULE);
            } else if self.builtin_models && BUILTIN_MODEL_NAMES.contains(&m.name.as_str()) {
                err(
                    p("name"),
                    "is a built-in model's name (set builtin_models = false to replace it)",
                );
            } else if !seen.insert(m.name.as_str()) {
                err(p("name"), "is used by another model");
            }
            if m.version.is_empty() || m.version.len() > 64 {
                err(p("version"), "must be 1 to 64 characters");
            }
            if m.replicas > 64 {
                err(p("replicas"), "must be between 0 and 64");
            }
            if DeviceSpec::parse(&m.device).is_none() {
                err(p("device"), "must be \"cpu\", \"cuda:N\" or \"auto\"");
            }
            if let Some(t) = m.options.intra_op_threads {
                if !(1..=256).contains(&t) {
                    err(p("options.intra_op_threads"), "must be between 1 and 256");
                }
            }
            if let Some(l) = m.options.max_length {
                if !(2..=65_536).contains(&l) {
                    err(p("options.max_length"), "must be between 2 and 65536");
                }
            }
            if !(1..=4096).contains(&m.batching.max_batch_size) {
                err(p("batching.max_batch_size"), "must be between 1 and 4096");
            }
            if m.batching.max_queue_delay_us > 1_000_000 {
                err(
                    p("batching.max_queue_delay_us"),
                    "must be at most 1000000 (1 s)",
                );
            }
            if m.batching.priority_aging_ms == 0 {
                err(p("batching.priority_aging_ms"), "must be at least 1");
            }
            match m.engine {
                EngineKind::CandleMlp | EngineKind::Onnx | EngineKind::CandleBert
                    if m.path.is_none() =>
                {
                    err(p("path"), &format!("is required by engine {}", m.engine))
                }
                EngineKind::Sleep if m.options.sleep_ms.is_none() => {
                    err(p("options.sleep_ms"), "is required by engine sleep")
                }
                EngineKind::Fail if !matches!(m.options.fail_every, Some(n) if n >= 1) => err(
                    p("options.fail_every"),
                    "is required by engine fail and must be at least 1",
                ),
                _ => {}
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// Where model directories are looked for.
    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("models"))
    }

    /// The models this node serves: the built-in ones (when enabled) then the configured
    /// ones. `minilm` is built in only when its files are in the models dir.
    pub fn all_models(&self) -> Vec<ModelConfig> {
        let mut out = Vec::new();
        if self.builtin_models {
            out.extend(builtin_models());
            let minilm = self.models_dir().join(MINILM_DIR);
            if minilm.join("config.json").is_file() {
                let mut m = ModelConfig::new("minilm", EngineKind::CandleBert);
                m.path = Some(minilm);
                m.batching.max_batch_tokens = 16_384;
                out.push(m);
            }
        }
        out.extend(self.models.iter().cloned());
        out
    }
}

/// Names taken by the built-in models.
pub const BUILTIN_MODEL_NAMES: &[&str] = &["mlp", "echo", "minilm"];

/// Directory (inside the models dir) of all-MiniLM-L6-v2, served as `minilm` when present.
pub const MINILM_DIR: &str = "all-MiniLM-L6-v2";

/// Where a model's replicas run, as written in `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// A GPU with enough free memory, else the CPU.
    Auto,
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda:N` (or `cuda`, meaning `cuda:0`) and `auto`.
    pub fn parse(s: &str) -> Option<DeviceSpec> {
        match s {
            "cpu" => Some(DeviceSpec::Cpu),
            "auto" => Some(DeviceSpec::Auto),
            "cuda" => Some(DeviceSpec::Cuda(0)),
            // Digits only, no leading zero: `cuda:+1` or `cuda:01` would be shown as written.
            _ => s
                .strip_prefix("cuda:")
                .filter(|n| {
                    n.bytes().all(|b| b.is_ascii_digit()) && (*n == "0" || !n.starts_with('0'))
                })
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda),
        }
    }
}

/// File name of the generated demo MLP inside the data dir.
pub const BUILTIN_MLP_FILE: &str = "models/mlp.safetensors";

/// The built-in demo models of `cohort up`.
pub fn builtin_models() -> Vec<ModelConfig> {
    let mut mlp = ModelConfig::new("mlp", EngineKind::CandleMlp);
    mlp.path = Some(PathBuf::from(BUILTIN_MLP_FILE));
    mlp.replicas = 2;
    let echo = ModelConfig::new("echo", EngineKind::Echo);
    vec![mlp, echo]
}

const NAME_RULE: &str =
    "must be 1 to 64 characters of a-z, A-Z, 0-9, '-', '_' or '.', starting with a letter or digit";

/// Whether `s` is a valid node or model name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name)
    }

    fn load_fixture(name: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::load(
            Some(&fixture(name)),
            std::iter::empty(),
            &Overrides::default(),
        )
    }

    #[test]
    fn defaults_are_an_embedded_loopback_node() {
        let cfg = NodeConfig::default();
        assert!(cfg.validate().is_ok());
        assert!(cfg.http_addr.ip().is_loopback());
        let names: Vec<_> = cfg.all_models().into_iter().map(|m| m.name).collect();
        assert_eq!(names, vec!["mlp", "echo"]);
    }

    #[test]
    fn good_fixture_loads() {
        let cfg = load_fixture("good.toml").expect("good.toml loads");
        assert_eq!(cfg.node_name, "box-a");
        assert_eq!(cfg.http_addr.port(), 9090);
        assert_eq!(cfg.limits.queue_capacity, 256);
        assert_eq!(cfg.models.len(), 3);
        assert_eq!(cfg.models[0].engine, EngineKind::CandleMlp);
        assert_eq!(cfg.models[0].batching.max_batch_size, 64);
        assert_eq!(cfg.models[0].batching.max_queue_delay_us, 500);
        assert_eq!(cfg.models[1].options.sleep_ms, Some(20));
        assert_eq!(cfg.models[2].options.fail_mode, FailMode::Panic);
        assert_eq!(
            cfg.models[0].resolved_path(Path::new("/data")),
            Some(PathBuf::from("/data/models/big.safetensors"))
        );
    }

    #[test]
    fn minimal_fixture_takes_defaults() {
        let cfg = load_fixture("minimal.toml").expect("minimal.toml loads");
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.models[0].replicas, 1);
        assert_eq!(cfg.models[0].version, "1");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = load_fixture("bad_unknown_key.toml").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains("max_batch"), "{msg}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let err = load_fixture("bad_values.toml").unwrap_err();
        let ConfigError::Invalid(errs) = err else {
            panic!("expected Invalid, got {err}");
        };
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "node_name",
            "limits.queue_capacity",
            "models[0].path",
            "models[0].batching.max_batch_size",
            "models[1].name",
            "models[1].options.sleep_ms",
            "models[2].name",
            "models[2].options.fail_every",
            "models[2].device",
            "models[3].path",
            "models[3].options.intra_op_threads",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn a_huge_tick_is_a_range_error_not_an_overflow() {
        let mut cfg = NodeConfig::default();
        cfg.cluster.tick_ms = u64::MAX / 10;
        let Err(errs) = cfg.validate() else {
            panic!("a tick of {} ms passed", u64::MAX / 10);
        };
        assert!(errs.iter().any(|e| e.path == "cluster.tick_ms"), "{errs:?}");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = load_fixture("does-not-exist.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let env = vec![
            ("COHORT_HTTP_ADDR".to_string(), "127.0.0.1:7000".to_string()),
            ("COHORT_NODE_NAME".to_string(), "from-env".to_string()),
            ("COHORT_QUEUE_CAPACITY".to_string(), "12".to_string()),
            ("COHORT_COOKIE".to_string(), "ignored".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let flags = Overrides {
            http_addr: Some("127.0.0.1:7001".parse().unwrap()),
            ..Overrides::default()
        };
        let cfg = NodeConfig::load(Some(&fixture("good.toml")), env, &flags).unwrap();
        assert_eq!(cfg.http_addr.port(), 7001, "flag beats env");
        assert_eq!(cfg.node_name, "from-env", "env beats file");
        assert_eq!(cfg.limits.queue_capacity, 12);
    }

    #[test]
    fn every_listed_env_var_is_applied() {
        for (var, field) in ENV_VARS {
            let value = match *field {
                "http_addr" | "cluster.cluster_addr" => "127.0.0.1:7777",
                "builtin_models" => "false",
                "auth.insecure" => "true",
                "auth.mode" => "on",
                "request_log.sample_rate" => "0.5",
                f if f.starts_with("limits.") || f.starts_with("http.") => "4095",
                _ => "/some/where",
            };
            let mut cfg = NodeConfig::default();
            let before = cfg.clone();
            cfg.apply_env(vec![(var.to_string(), value.to_string())])
                .unwrap_or_else(|e| panic!("{var}: {e}"));
            assert_ne!(cfg, before, "{var} changed nothing");
        }
    }

    #[test]
    fn auth_off_beyond_loopback_needs_insecure() {
        let mut cfg = NodeConfig::default();
        assert!(!cfg.auth_enabled(), "loopback: auto is off");
        cfg.http_addr = "0.0.0.0:8080".parse().unwrap();
        assert!(cfg.auth_enabled(), "beyond loopback: auto is on");
        assert!(cfg.validate().is_ok());
        cfg.auth.mode = AuthMode::Off;
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs[0].path, "auth.mode");
        assert!(
            errs[0].message.contains("--insecure"),
            "{}",
            errs[0].message
        );
        cfg.auth.insecure = true;
        assert!(cfg.validate().is_ok());
        assert!(!cfg.auth_enabled());
    }

    #[test]
    fn write_timeout_is_checked() {
        let mut cfg = NodeConfig::default();
        assert_eq!(cfg.http.write_timeout_ms, 30_000);
        cfg.http.write_timeout_ms = 50;
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs[0].path, "http.write_timeout_ms");
        let toml: NodeConfig = toml::from_str("[http]\nwrite_timeout_ms = 2000\n").unwrap();
        assert_eq!(toml.http.write_timeout_ms, 2000);
        assert!(toml.validate().is_ok());
    }

    #[test]
    fn header_and_json_depth_ceilings_match_what_takes_effect() {
        let mut cfg = NodeConfig::default();
        cfg.http.max_header_bytes = 400 * 1024;
        cfg.http.max_json_depth = 127;
        assert!(cfg.validate().is_ok());
        // Beyond hyper's read buffer (417792 bytes) and serde_json's recursion limit (128).
        cfg.http.max_header_bytes = 417_792;
        cfg.http.max_json_depth = 128;
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["http.max_header_bytes", "http.max_json_depth"]);
        assert!(errs[0].message.contains("409600"), "{}", errs[0]);
        assert!(errs[1].message.contains("127"), "{}", errs[1]);
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let env = vec![("COHORT_HTTP_ADDR".to_string(), "nope".to_string())];
        let err = NodeConfig::load(None, env, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("COHORT_HTTP_ADDR"), "{err}");
    }

    #[test]
    fn cohort_env_ignores_foreign_bad_bytes_and_rejects_bad_cohort_values() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt as _;
        let bad = || OsString::from_vec(vec![b'a', 0xff]);
        let env = vec![
            (OsString::from("X"), bad()),
            (OsString::from_vec(vec![b'Y', 0xfe]), OsString::from("1")),
            (OsString::from("COHORT_TOKEN"), bad()),
            (OsString::from("PATH"), OsString::from("/bin")),
            (OsString::from("COHORT_NODE_NAME"), OsString::from("n1")),
        ];
        let vars = cohort_env(env).unwrap();
        assert_eq!(
            vars,
            vec![("COHORT_NODE_NAME".to_string(), "n1".to_string())]
        );

        let env = vec![(OsString::from("COHORT_DATA_DIR"), bad())];
        let err = cohort_env(env).unwrap_err();
        assert!(err.to_string().contains("COHORT_DATA_DIR"), "{err}");
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn builtin_names_cannot_be_reused_unless_builtins_are_off() {
        let mut cfg = NodeConfig::default();
        cfg.models.push(ModelConfig::new("echo", EngineKind::Echo));
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs[0].path, "models[0].name");
        cfg.builtin_models = false;
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn devices_parse() {
        assert_eq!(DeviceSpec::parse("cpu"), Some(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda:1"), Some(DeviceSpec::Cuda(1)));
        assert_eq!(DeviceSpec::parse("cuda"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("auto"), Some(DeviceSpec::Auto));
        assert_eq!(DeviceSpec::parse("gpu"), None);
        assert_eq!(DeviceSpec::parse("cuda:x"), None);
        for odd in [
            "cuda:", "cuda:+1", "cuda:-1", "cuda:01", " cuda:0", "CUDA:0",
        ] {
            assert_eq!(DeviceSpec::parse(odd), None, "{odd}");
        }
        assert_eq!(DeviceSpec::parse("cuda:0"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:10"), Some(DeviceSpec::Cuda(10)));
    }

    #[test]
    fn minilm_is_built_in_only_when_its_files_are_there() {
        let dir = std::env::temp_dir().join(format!("cohort-cfg-{}", std::process::id()));
        let mut cfg = NodeConfig {
            data_dir: dir.clone(),
            ..NodeConfig::default()
        };
        assert!(!cfg.all_models().iter().any(|m| m.name == "minilm"));
        let minilm = dir.join("models").join(MINILM_DIR);
        std::fs::create_dir_all(&minilm).unwrap();
        std::fs::write(minilm.join("config.json"), "{}").unwrap();
        let m = cfg.all_models().into_iter().find(|m| m.name == "minilm");
        assert_eq!(m.map(|m| m.engine), Some(EngineKind::CandleBert));
        cfg.builtin_models = false;
        assert!(cfg.all_models().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names() {
        assert!(valid_name("mlp"));
        assert!(valid_name("bert-base_v2.1"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(65)));
    }

    #[test]
    fn roundtrips_through_toml() {
        let mut cfg = NodeConfig::default();
        cfg.models.push(ModelConfig::new("e2", EngineKind::Echo));
        let text = toml::to_string(&cfg).unwrap();
        let back = NodeConfig::from_toml_str(&text, "mem").unwrap();
        assert_eq!(back, cfg);
    }
}
