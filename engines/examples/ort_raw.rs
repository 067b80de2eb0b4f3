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
//! - raw: [`RawOnnx`], `ort` alone. The input values are made once; each call is
//!   `Session::run` on views of them, and the outputs are dropped unread.
//! - engine: [`OnnxEngine::infer`] on a [`TensorMap`], as a replica calls it (input views,
//!   outputs copied into Cohort tensors).
//!
//! After half a second of warm-up each, the sides take turns in rounds of about a second
//! (all sessions of one side at once, the side that goes first alternating), until each
//! side has run `--seconds`: on a shared machine, background load then weighs on both sides
//! alike. `cohort bench --raw-onnx` does the same with the whole node in place of the
//! engine. Prints one JSON line:
//! samples/s and calls/s of each, and the engine's share of the raw throughput.
//!
//! [`RawOnnx`]: cohort_engines::onnx_raw::RawOnnx
//! [`OnnxEngine`]: cohort_engines::onnx::OnnxEngine
//! [`OnnxEngine::infer`]: cohort_engines::Engine::infer

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cohort_config::{EngineKind, ModelConfig};
use cohort_engines::onnx_raw::{self, RawOnnx};
use cohort_engines::{onnx, Engine, EngineError, LoadContext, TensorMap};

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

/// Runs every engine in a closed loop on a thread of its own for `time`; returns the calls
/// that finished by then.
fn engines_for(
    engines: &mut [onnx::OnnxEngine],
    inputs: &TensorMap,
    time: Duration,
) -> Result<u64, Error> {
    let end = Instant::now() + time;
    std::thread::scope(|s| {
        let handles: Vec<_> = engines
            .iter_mut()
            .map(|engine| {
                s.spawn(move || -> Result<u64, EngineError> {
                    // Counted as RawOnnx::run_for counts: calls that finished in time.
                    let mut calls = 0u64;
                    loop {
                        std::hint::black_box(engine.infer(inputs)?.len());
                        if Instant::now() > end {
                            break;
                        }
                        calls += 1;
                    }
                    Ok(calls)
                })
            })
            .collect();
        let mut total = 0u64;
        for h in handles {
            total += h.join().map_err(|_| "an engine thread panicked")??;
        }
        Ok(total)
    })
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
    let none = onnx_raw::Shapes::new();
    let mut raw = RawOnnx::open(
        &args.model,
        args.library.as_deref(),
        args.threads,
        args.sessions,
        args.batch,
        &none,
    )?;
    let inputs = onnx_raw::batch_inputs(raw.metadata(), args.batch, &none)?;
    let mut engines = (0..args.sessions)
        .map(|_| load_engine(&args))
        .collect::<Result<Vec<_>, _>>()?;

    // Warm-up, then rounds of about a second, the side that goes first alternating.
    raw.run_for(Duration::from_millis(500))?;
    engines_for(&mut engines, &inputs, Duration::from_millis(500))?;
    let rounds = args.seconds.ceil().max(1.0) as u32;
    let slice = Duration::from_secs_f64(args.seconds / f64::from(rounds));
    let (mut raw_calls, mut engine_calls) = (0u64, 0u64);
    for round in 0..rounds {
        for k in 0..2 {
            if (k + round) % 2 == 0 {
                raw_calls += raw.run_for(slice)?.calls;
            } else {
                engine_calls += engines_for(&mut engines, &inputs, slice)?;
            }
        }
    }
    let rate = |calls: u64| {
        (
            calls as f64 / args.seconds,
            calls as f64 * raw.batch() as f64 / args.seconds,
        )
    };
    let ((raw_cps, raw_sps), (engine_cps, engine_sps)) = (rate(raw_calls), rate(engine_calls));

    let line = serde_json::json!({
        "model": args.model.display().to_string(),
        "batch": raw.batch(),
        "seconds": args.seconds,
        "threads": args.threads,
        "sessions": args.sessions,
        "raw": {"samples_per_s": round(raw_sps), "calls_per_s": round(raw_cps)},
        "engine": {"samples_per_s": round(engine_sps), "calls_per_s": round(engine_cps)},
        "engine_vs_raw": (engine_sps / raw_sps * 1000.0).round() / 1000.0,
    });
    println!("{line}");
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
