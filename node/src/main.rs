//! The `cohort` binary.
//!
//! - `cohort up`: one node with the built-in demo models (`mlp`, `echo`), HTTP on
//!   127.0.0.1:8080 by default. Stops cleanly on SIGINT or SIGTERM: it stops accepting,
//!   finishes the requests in flight, and exits 0.
//! - `cohort bench`: a closed-loop HTTP load generator (Cohort's perf_analyzer).
//!
//! This file is the binary's edge: it parses flags, sets up logging, and turns errors
//! into messages (`anyhow` lives here and nowhere else).

mod bench;
mod ctl;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cohort_config::{NodeConfig, Overrides};

/// mimalloc instead of glibc malloc: the gateway allocates and frees a handful of small
/// buffers per request from whichever worker thread runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cohort: an actor-based inference cluster.
#[derive(Parser, Debug)]
#[command(name = "cohort", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr. The level is set with RUST_LOG (default: info), e.g.
    /// RUST_LOG=cohort=debug,info.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true, env = "COHORT_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one node with the built-in demo models (mlp, echo, and minilm when its files are
    /// in the models dir) and any models in --config.
    ///
    /// Settings come from the config file, then COHORT_* environment variables
    /// (COHORT_HTTP_ADDR, COHORT_DATA_DIR, COHORT_MODELS_DIR, COHORT_NODE_NAME,
    /// COHORT_QUEUE_CAPACITY, COHORT_ORT_LIB,
    /// COHORT_MAX_BODY_BYTES, COHORT_MAX_BATCH_ITEMS, COHORT_REQUEST_TIMEOUT_MS,
    /// COHORT_BUILTIN_MODELS), then these flags; each layer overrides the one before.
    Up(UpArgs),
    /// Run one node of a cluster: bootstraps a new cluster, or joins one with --join.
    ///
    /// The cluster's shared secret (the cookie) is read from --cookie-file or the
    /// COHORT_COOKIE environment variable, never from the command line. Example:
    /// cohort node --name n2 --cluster-addr 127.0.0.1:7102 --http-addr 127.0.0.1:8082
    /// --join 127.0.0.1:7101 --data-dir ./n2 --cookie-file ./cookie
    Node(NodeArgs),
    /// Administer a running cluster over its HTTP API.
    Ctl(ctl::CtlArgs),
    /// Load a model of a running node with a closed-loop HTTP benchmark and report
    /// requests/s and latency percentiles.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// HTTP listen address of the gateway [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// Directory for the node's files; the demo model is written to
    /// <data-dir>/models/mlp.safetensors on first start [default: ./cohort-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Where model directories are looked for; `minilm` is served when
    /// <models-dir>/all-MiniLM-L6-v2 holds its files (scripts/fetch_minilm.sh puts them
    /// there) [default: <data-dir>/models].
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// TOML configuration file (see docs/operations.md); unknown keys are rejected.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The node's name [default: cohort-1].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Check the configuration, print it as TOML, and exit.
    #[arg(long)]
    check_config: bool,
    /// API tokens: `on`, `off`, or `auto` (on unless HTTP listens on loopback only)
    /// [env: COHORT_AUTH] [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    auth: Option<AuthArg>,
    /// Allow auth off on an address other than loopback: anyone who reaches the port may
    /// do anything [env: COHORT_INSECURE].
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AuthArg {
    Auto,
    On,
    Off,
}

impl From<AuthArg> for cohort_config::AuthMode {
    fn from(a: AuthArg) -> Self {
        match a {
            AuthArg::Auto => cohort_config::AuthMode::Auto,
            AuthArg::On => cohort_config::AuthMode::On,
            AuthArg::Off => cohort_config::AuthMode::Off,
        }
    }
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    #[command(flatten)]
    up: UpArgs,
    /// Address of this node's cluster listener (Raft and actor messages); other nodes
    /// reach it here, so it must be a fixed port when it joins [env: COHORT_CLUSTER_ADDR].
    #[arg(long, value_name = "ADDR")]
    cluster_addr: Option<SocketAddr>,
    /// The cluster address of any member to join; without it, this node bootstraps a new
    /// cluster [env: COHORT_JOIN].
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// File holding the cluster's shared secret (else COHORT_COOKIE) [env: COHORT_COOKIE_FILE].
    #[arg(long, value_name = "FILE")]
    cookie_file: Option<PathBuf>,
}

fn init_logging(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) => match tracing_subscriber::EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some((spec, e))),
        },
        Err(_) => (tracing_subscriber::EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some((spec, e)) = bad_filter {
        tracing::warn!(rust_log = %spec, error = %e, "RUST_LOG is not a valid filter; logging at info");
    }
    // Panics (an engine's, say) go through the log too, in the log's format.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), panic = %info, "panic");
    }));
}

/// candle's CPU kernels ask how many threads to use on every matrix product, and without
/// `RAYON_NUM_THREADS` the answer is read from `/proc/cpuinfo` each time (15 % of the CPU
/// of a node serving a small model at full load). Set it once, before any thread starts,
/// to the cores this process may use; a value the user set is kept.
fn pin_rayon_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> std::process::ExitCode {
    pin_rayon_threads();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cohort-worker")
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| match cli.command {
            Command::Up(args) => runtime.block_on(up(args, ClusterFlags::default())),
            Command::Node(args) => runtime.block_on(up(
                args.up,
                ClusterFlags {
                    cluster_addr: args.cluster_addr,
                    join: args.join,
                    cookie_file: args.cookie_file,
                },
            )),
            Command::Ctl(args) => runtime.block_on(ctl::run(args)),
            Command::Bench(args) => runtime.block_on(bench::run(args)),
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, without a backtrace: these are the user's errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Default)]
struct ClusterFlags {
    cluster_addr: Option<SocketAddr>,
    join: Option<String>,
    cookie_file: Option<PathBuf>,
}

async fn up(args: UpArgs, cluster: ClusterFlags) -> anyhow::Result<()> {
    let started = Instant::now();
    // Listen for signals from the start, so that a stop during start-up is clean too.
    let (signalled_tx, mut signalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(true);
    });
    let overrides = Overrides {
        node_name: args.name,
        data_dir: args.data_dir,
        models_dir: args.models_dir,
        http_addr: args.http_addr,
        cluster_addr: cluster.cluster_addr,
        join: cluster.join,
        cookie_file: cluster.cookie_file,
        auth: args.auth.map(Into::into),
        insecure: args.insecure,
    };
    let config = NodeConfig::load(
        args.config.as_deref(),
        cohort_config::cohort_env(std::env::vars_os())?,
        &overrides,
    )?;
    if args.check_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot print the configuration")?
        );
        return Ok(());
    }
    let starting = cohort_actors::start(
        config,
        Arc::new(cohort_gateway::HttpGateway),
        cohort_actors::RestartPolicy::default(),
    );
    // A signal while starting (for instance while waiting to join a cluster) stops at once.
    let mut node = tokio::select! {
        node = starting => node.context("cannot start the node")?,
        _ = signalled.wait_for(|s| *s) => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    let addr = node
        .ctx()
        .http_addr()
        .context("the gateway did not report its address")?;
    let url = format!("http://{addr}");
    let ready = tokio::select! {
        ready = node.wait_ready(Duration::from_secs(30)) => ready,
        _ = signalled.wait_for(|s| *s) => {
            tracing::info!("stopped during start-up");
            node.shutdown().await;
            return Ok(());
        }
    };
    if node.is_stopped() {
        anyhow::bail!("the node stopped during start-up (see the log)");
    }
    if ready {
        tracing::info!(ms = started.elapsed().as_millis() as u64, "ready");
    } else {
        tracing::warn!("not every model is ready; see {url}/api/v1/health/detailed");
    }
    // The banner goes to stdout; a closed stdout must not stop the node.
    let banner = format!(
        "Cohort is serving on {url}\n  models:  curl {url}/api/v1/models\n  infer:   curl -s {url}/api/v1/models/echo/infer -H 'content-type: application/json' -d '{{\"inputs\": {{\"x\": [[1, 2, 3]]}}}}'\n  bench:   cohort bench --url {url} --model mlp\nPress Ctrl-C to stop.\n"
    );
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }

    tokio::select! {
        _ = signalled.wait_for(|s| *s) => {
            tracing::info!("shutting down: finishing in-flight requests");
            node.shutdown().await;
            Ok(())
        }
        _ = node.stopped() => anyhow::bail!("the node stopped: its supervisor gave up (see the log)"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
