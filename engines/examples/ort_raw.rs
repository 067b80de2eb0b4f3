//! Throughput of an ONNX model through Cohort's [`OnnxEngine`] and through bare `ort`, for
//! the benchmark target "the engine reaches at least 90% of raw ONNX Runtime throughput".
//!
//! ```text
//! cargo run --release -p cohort-engines --example ort_raw -- MODEL.onnx \
//!     [--batch 32] [--seconds 10] [--threads 1] [--sessions 2] [--library PATH]
//! ```
//!
//! Both sides open `--sessions` sessions with the same settings (`--threads` intra-op
//! threads, one inter-op thread, every graph optimization), each driven closed-loop by its
//! own OS thread with the same batch of `--batch` rows:
//!
//! - raw: `ort` alone. The input values are made once; each call is `Session::run` on views
//!   of them, and the outputs are dropped unread.
//! - engine: [`OnnxEngine::infer`] on a [`TensorMap`], as a replica calls it (input views,
//!   outputs copied into Cohort tensors).
//!
//! Each worker thread holds one raw session and one engine. After half a second of warm-up
//! each, the sides take turns in rounds of about a second (all workers on the same side at
//! once, the side that goes first alternating), until each side has run `--seconds`: on a
//! shared machine, background load then weighs on both sides alike. Prints one JSON line:
//! samples/s and calls/s of each, and the engine's share of the raw throughput.
//!
//! [`OnnxEngine`]: cohort_engines::onnx::OnnxEngine
//! [`OnnxEngine::infer`]: cohort_engines::Engine::infer

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cohort_config::{EngineKind, ModelConfig};
use cohort_engines::{onnx, DType, Engine, LoadContext, Tensor, TensorData, TensorMap};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::DynValue;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    model: PathBuf,
    batch: usize,
    seconds: f64,
    threads: usize,
    sessions: usize,
    library: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: ort_raw MODEL.onnx [--batch N] [--seconds S] [--threads T] [--sessions K] \
         [--library PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Result<Args, Error> {
    let mut args = Args {
        model: PathBuf::new(),
        batch: 32,
        seconds: 10.0,
        threads: 1,
        sessions: 2,
        library: None,
    };
    let mut model = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--batch" => args.batch = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--sessions" => args.sessions = value()?.parse()?,
            "--library" => args.library = Some(PathBuf::from(value()?)),
            "-h" | "--help" => usage(),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}").into()),
            _ if model.is_none() => model = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a}").into()),
        }
    }
    args.model = model.ok_or("no model given")?;
    if args.batch == 0 || args.threads == 0 || args.sessions == 0 || args.seconds <= 0.0 {
        return Err("--batch, --seconds, --threads and --sessions must be positive".into());
    }
    Ok(args)
}

/// A deterministic batch for the model's inputs: dynamic dims are `batch` (first) or 1.
fn batch_inputs(engine: &dyn Engine, batch: usize) -> Result<TensorMap, Error> {
    let mut out = TensorMap::new();
    for spec in &engine.metadata().inputs {
        let shape: Vec<usize> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, d) if d < 0 => batch,
                (_, d) if d < 0 => 1,
                (_, d) => d as usize,
            })
            .collect();
        let n: usize = shape.iter().product();
        let x = |i: usize| ((i * 7919) % 1000) as f64 / 500.0 - 1.0;
        let data = match spec.dtype {
            DType::F32 => TensorData::F32((0..n).map(|i| x(i) as f32).collect()),
            DType::F64 => TensorData::F64((0..n).map(x).collect()),
            DType::F16 => TensorData::F16((0..n).map(|i| half::f16::from_f64(x(i))).collect()),
            DType::I64 => TensorData::I64((0..n).map(|i| (i % 100) as i64).collect()),
            DType::I32 => TensorData::I32((0..n).map(|i| (i % 100) as i32).collect()),
            DType::I8 => TensorData::I8((0..n).map(|i| (i % 100) as i8).collect()),
            DType::U8 => TensorData::U8((0..n).map(|i| (i % 100) as u8).collect()),
            DType::Bool => TensorData::Bool((0..n).map(|i| i % 2 == 0).collect()),
            DType::String => TensorData::String((0..n).map(|i| format!("s{i}")).collect()),
        };
        out.insert(spec.name.clone(), Tensor::new(shape, data)?);
    }
    Ok(out)
}

/// The same batch as `ort` values, for the raw side.
fn raw_value(t: &Tensor) -> Result<DynValue, Error> {
    use ort::value::Tensor as OrtTensor;
    let shape = t.shape.clone();
    Ok(match &t.data {
        TensorData::F32(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::F64(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::I64(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::I32(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::I8(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::U8(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::Bool(v) => OrtTensor::from_array((shape, v.clone()))?.into_dyn(),
        TensorData::String(v) => OrtTensor::from_string_array((shape, v.as_slice()))?.into_dyn(),
        TensorData::F16(_) => return Err("the raw side does not do f16 inputs".into()),
    })
}

type Call = Box<dyn FnMut() -> Result<(), Error>>;

/// Calls `call` in a closed loop for `time`; returns the number of calls.
fn closed_loop(time: Duration, call: &mut Call) -> Result<u64, Error> {
    let end = Instant::now() + time;
    let mut calls = 0u64;
    while Instant::now() < end {
        call()?;
        calls += 1;
    }
    Ok(calls)
}

struct Rate {
    calls_per_s: f64,
    samples_per_s: f64,
}

/// Runs `args.sessions` workers, each with the raw side and the engine side made by
/// `make` on its own thread, in alternating rounds; returns (raw, engine) rates.
fn measure<M>(args: &Args, make: M) -> Result<(Rate, Rate), Error>
where
    M: Fn() -> Result<[Call; 2], Error> + Sync,
{
    let barrier = Barrier::new(args.sessions);
    let failed = AtomicBool::new(false);
    let rounds = args.seconds.ceil().max(1.0) as u32;
    let slice = Duration::from_secs_f64(args.seconds / f64::from(rounds));
    let totals: Result<[u64; 2], Error> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.sessions)
            .map(|_| {
                s.spawn(|| -> Result<[u64; 2], Error> {
                    let made = make();
                    if made.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    barrier.wait();
                    if failed.load(Ordering::SeqCst) {
                        return made.map(|_| [0, 0]);
                    }
                    let mut sides = made?;
                    for side in sides.iter_mut() {
                        closed_loop(Duration::from_millis(500), side)?;
                    }
                    let mut calls = [0u64; 2];
                    for round in 0..rounds {
                        for k in 0..2 {
                            let side = (k + round as usize) % 2;
                            barrier.wait();
                            calls[side] += closed_loop(slice, &mut sides[side])?;
                        }
                    }
                    Ok(calls)
                })
            })
            .collect();
        let mut sum = [0u64; 2];
        for h in handles {
            let calls = h.join().map_err(|_| "a worker panicked")??;
            sum[0] += calls[0];
            sum[1] += calls[1];
        }
        Ok(sum)
    });
    let totals = totals?;
    let rate = |calls: u64| Rate {
        calls_per_s: calls as f64 / args.seconds,
        samples_per_s: calls as f64 * args.batch as f64 / args.seconds,
    };
    Ok((rate(totals[0]), rate(totals[1])))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ort_raw: {e}");
        std::process::exit(1);
    }
}

fn load_engine(args: &Args) -> Result<onnx::OnnxEngine, Error> {
    let mut model = ModelConfig::new("bench", EngineKind::Onnx);
    model.options.intra_op_threads = Some(args.threads);
    let mut ctx = LoadContext::cpu(Path::new("."));
    ctx.ort_library = args.library.clone();
    Ok(onnx::load(&args.model, &model, &ctx)?)
}

fn run() -> Result<(), Error> {
    let args = parse_args()?;
    let probe = load_engine(&args)?;
    let inputs = batch_inputs(&probe, args.batch)?;
    drop(probe);
    let env = onnx::init_runtime(&onnx::find_library(args.library.as_deref())?)?;

    let (raw, engine) = measure(&args, || {
        let mut session = raw_session(&env, args.threads, &args.model)?;
        // In the session's input order.
        let mut values = Vec::new();
        for input in session.inputs() {
            let t = inputs
                .get(input.name())
                .ok_or_else(|| format!("no value for input {}", input.name()))?;
            values.push(raw_value(t)?);
        }
        let raw: Call = Box::new(move || {
            let views: Vec<SessionInputValue<'_>> = values.iter().map(Into::into).collect();
            let outputs = session.run(SessionInputs::<'_, '_, 0>::ValueSlice(&views))?;
            std::hint::black_box(outputs.len());
            Ok(())
        });
        let mut engine = load_engine(&args)?;
        let inputs = inputs.clone();
        let engine: Call = Box::new(move || {
            let out = engine.infer(&inputs)?;
            std::hint::black_box(out.len());
            Ok(())
        });
        Ok([raw, engine])
    })?;

    let line = serde_json::json!({
        "model": args.model.display().to_string(),
        "batch": args.batch,
        "seconds": args.seconds,
        "threads": args.threads,
        "sessions": args.sessions,
        "raw": {"samples_per_s": round(raw.samples_per_s), "calls_per_s": round(raw.calls_per_s)},
        "engine": {"samples_per_s": round(engine.samples_per_s), "calls_per_s": round(engine.calls_per_s)},
        "engine_vs_raw": (engine.samples_per_s / raw.samples_per_s * 1000.0).round() / 1000.0,
    });
    println!("{line}");
    Ok(())
}

/// A bare `ort` session with the engine's settings.
fn raw_session(
    env: &ort::environment::Environment,
    threads: usize,
    model: &Path,
) -> ort::Result<Session> {
    Session::builder(env)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .commit_from_file(model)
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
