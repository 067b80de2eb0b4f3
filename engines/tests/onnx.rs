//! The ONNX Runtime engine against models written by `scripts/make_onnx_models.py` and the
//! outputs that script computes with NumPy alone.
//!
//! Needs Python 3 with `pip install onnx onnxruntime numpy`: without them these tests fail
//! (they do not skip), saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use cohort_config::{EngineKind, ModelConfig};
use cohort_engines::{
    concat_maps, load_engine, onnx, onnx_raw, DType, Engine, EngineError, LoadContext, Tensor,
    TensorData, TensorMap, TensorSpec,
};
use serde_json::Value;

const PIP: &str = "pip install onnx onnxruntime numpy";

/// Set in the child processes of `a_wrong_library_leaves_the_process_usable`.
const CHILD_ENV: &str = "COHORT_ONNX_TEST_CHILD";
const MODELS_ENV: &str = "COHORT_ONNX_TEST_MODELS";
const GOOD_LIB_ENV: &str = "COHORT_ONNX_TEST_GOOD_LIB";

struct Models {
    dir: PathBuf,
    reference: Value,
}

/// The models and reference outputs, generated once per test process.
fn models() -> &'static Models {
    static MODELS: OnceLock<Result<Models, String>> = OnceLock::new();
    match MODELS.get_or_init(generate) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

fn generate() -> Result<Models, String> {
    let dir = match std::env::var_os(MODELS_ENV) {
        // A child process reuses its parent's models.
        Some(dir) => PathBuf::from(dir),
        None => fresh_dir()?,
    };
    if std::env::var_os(MODELS_ENV).is_none() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make_onnx_models.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .output()
            .map_err(|e| {
                format!("cannot run python3 ({e}); the ONNX tests need Python 3 with: {PIP}")
            })?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}); the ONNX tests need Python 3 with: {PIP}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let text = std::fs::read_to_string(dir.join("reference.json"))
        .map_err(|e| format!("cannot read reference.json in {}: {e}", dir.display()))?;
    let reference = serde_json::from_str(&text).map_err(|e| format!("bad reference.json: {e}"))?;
    Ok(Models { dir, reference })
}

/// A new folder under cargo's scratch space for this process's models; folders left by
/// earlier runs (over an hour old) are removed.
fn fresh_dir() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = std::fs::read_dir(root) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        for e in entries.flatten() {
            let stale = e.file_name().to_string_lossy().starts_with("onnx-models-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < old);
            if stale {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("onnx-models-")
        .tempdir_in(root)
        .map_err(|e| format!("cannot create a folder in {}: {e}", root.display()))?;
    Ok(dir.keep())
}

fn config(name: &str, file: &Path) -> ModelConfig {
    let mut m = ModelConfig::new(name, EngineKind::Onnx);
    m.path = Some(file.to_path_buf());
    m
}

/// Loads a generated model, finding ONNX Runtime with `find_library(None)`'s discovery.
fn load(name: &str) -> onnx::OnnxEngine {
    let m = models();
    let file = m.dir.join(format!("{name}.onnx"));
    match onnx::load(&file, &config(name, &file), &LoadContext::cpu(&m.dir)) {
        Ok(engine) => engine,
        Err(e) => panic!("cannot load {name}: {e}\n(the ONNX tests need: {PIP})"),
    }
}

fn tensor_from_json(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let data = v["data"].as_array().expect("data");
    // f64 and f16 come as strings (see the script): Rust's parser is exact.
    let f = |x: &Value| match x {
        Value::String(s) => s.parse::<f64>().expect("a decimal"),
        x => x.as_f64().expect("number"),
    };
    let i = |x: &Value| x.as_i64().expect("integer");
    let data = match v["dtype"].as_str().expect("dtype") {
        "f32" => TensorData::F32(data.iter().map(|x| f(x) as f32).collect()),
        "f64" => TensorData::F64(data.iter().map(f).collect()),
        "f16" => TensorData::F16(data.iter().map(|x| half::f16::from_f64(f(x))).collect()),
        "i64" => TensorData::I64(data.iter().map(i).collect()),
        "i32" => TensorData::I32(data.iter().map(|x| i(x) as i32).collect()),
        "i8" => TensorData::I8(data.iter().map(|x| i(x) as i8).collect()),
        "u8" => TensorData::U8(data.iter().map(|x| i(x) as u8).collect()),
        "bool" => TensorData::Bool(data.iter().map(|x| x.as_bool().expect("bool")).collect()),
        other => panic!("unexpected dtype {other}"),
    };
    Tensor::new(shape, data).expect("consistent reference tensor")
}

fn map_from_json(v: &Value) -> TensorMap {
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, t)| (k.clone(), tensor_from_json(t)))
        .collect()
}

fn cases(model: &str) -> Vec<(TensorMap, TensorMap)> {
    models().reference["models"][model]["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("no cases for {model} in reference.json"))
        .iter()
        .map(|c| (map_from_json(&c["inputs"]), map_from_json(&c["outputs"])))
        .collect()
}

/// Floats within `tol` (relative to the value, at least absolute); everything else exact.
fn assert_close(what: &str, got: &TensorMap, want: &TensorMap, tol: f32) {
    let names = |m: &TensorMap| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: output names");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{what}: shape of {name}");
        match (&g.data, &w.data) {
            (TensorData::F32(a), TensorData::F32(b)) => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(1.0),
                        "{what}: {name}[{i}] = {x}, expected {y}"
                    );
                }
            }
            (a, b) => assert_eq!(a, b, "{what}: {name}"),
        }
    }
}

#[test]
fn tiny_mlp_metadata() {
    let engine = load("tiny_mlp");
    let meta = engine.metadata();
    assert_eq!(
        meta.inputs,
        vec![TensorSpec::new("x", DType::F32, &[-1, 64])]
    );
    assert_eq!(
        meta.outputs,
        vec![TensorSpec::new("y", DType::F32, &[-1, 10])]
    );
    let size = std::fs::metadata(models().dir.join("tiny_mlp.onnx"))
        .unwrap()
        .len();
    assert_eq!(engine.memory_bytes(), size);
    assert!(engine.health().is_ok());
}

#[test]
fn tiny_mlp_matches_numpy() {
    let mut engine = load("tiny_mlp");
    let cases = cases("tiny_mlp");
    assert!(!cases.is_empty());
    for (i, (inputs, want)) in cases.iter().enumerate() {
        let got = engine.infer(inputs).unwrap();
        assert_close(&format!("tiny_mlp case {i}"), &got, want, 1e-4);
    }
}

#[test]
fn multi_dtype_metadata() {
    let engine = load("multi_dtype");
    let meta = engine.metadata();
    let spec = |n: &str, d| TensorSpec::new(n, d, &[-1, 3]);
    assert_eq!(
        meta.inputs,
        vec![
            spec("a_f64", DType::F64),
            spec("b_f16", DType::F16),
            spec("c_i64", DType::I64),
            spec("d_i32", DType::I32),
            spec("e_i8", DType::I8),
            spec("f_u8", DType::U8),
            spec("g_bool", DType::Bool),
        ]
    );
    assert_eq!(
        meta.outputs,
        vec![
            spec("out_f64", DType::F64),
            spec("out_f16", DType::F16),
            spec("out_f16_id", DType::F16),
            spec("out_i64", DType::I64),
            spec("out_i32", DType::I32),
            spec("out_i8", DType::I8),
            spec("out_u8", DType::U8),
            spec("out_bool", DType::Bool),
            spec("out_gt", DType::Bool),
            spec("out_mixed_f32", DType::F32),
        ]
    );
}

#[test]
fn multi_dtype_matches_numpy() {
    let mut engine = load("multi_dtype");
    let cases = cases("multi_dtype");
    assert!(!cases.is_empty());
    for (i, (inputs, want)) in cases.iter().enumerate() {
        let got = engine.infer(inputs).unwrap();
        assert_eq!(got["out_f16"].dtype(), DType::F16, "f16 stays f16");
        // Every output but out_mixed_f32 is exact; that one holds small integers.
        assert_close(&format!("multi_dtype case {i}"), &got, want, 0.0);
    }
}

/// A model whose requests cannot share an engine call: a fixed first dimension, a scalar
/// input and output, and an input and output without a declared shape (reported as []).
/// It is not batched, its inputs pass the checks as they are, and its outputs match NumPy.
#[test]
fn a_model_without_a_batch_dimension_runs_as_numpy_says() {
    let mut engine = load("unbatched");
    let meta = engine.metadata().clone();
    let f = |n: &str, shape: &[i64]| TensorSpec::new(n, DType::F32, shape);
    assert_eq!(meta.inputs, vec![f("x", &[1, 3]), f("k", &[]), f("z", &[])]);
    assert_eq!(
        meta.outputs,
        vec![f("y", &[1, 3]), f("total", &[]), f("z1", &[])]
    );
    assert!(!meta.batchable());
    assert!(load("tiny_mlp").metadata().batchable());
    let cases = cases("unbatched");
    assert!(cases.len() >= 3);
    for (i, (inputs, want)) in cases.iter().enumerate() {
        assert_eq!(meta.check_inputs(inputs), Ok(1), "case {i}");
        let got = engine.infer(inputs).unwrap();
        assert_eq!(got["total"].shape, Vec::<usize>::new(), "a scalar output");
        assert_close(&format!("unbatched case {i}"), &got, want, 1e-5);
    }
}

/// Several requests joined along dim 0 (as the batcher does) give each request's outputs,
/// and each row alone gives the batch's row.
#[test]
fn batches_equal_their_rows() {
    for (model, tol) in [("tiny_mlp", 1e-5), ("multi_dtype", 0.0)] {
        let mut engine = load(model);
        let cases = cases(model);
        // Several requests joined along dim 0, as the batcher does.
        let inputs: Vec<&TensorMap> = cases.iter().map(|(i, _)| i).collect();
        let joined = concat_maps(&inputs).unwrap();
        let batched = engine.infer(&joined).unwrap();
        let rows_of = |m: &TensorMap| m.values().next().unwrap().shape[0];
        let counts: Vec<usize> = inputs.iter().map(|m| rows_of(m)).collect();
        let total: usize = counts.iter().sum();
        assert!(total > 3, "{model}: the batch has {total} rows");
        for (name, t) in &batched {
            assert_eq!(t.shape[0], total, "{model}: rows of {name}");
        }
        // Per request, against the batch's share and against NumPy.
        let parts = cohort_engines::split_map(&batched, &counts).unwrap();
        for (i, ((_, want), part)) in cases.iter().zip(&parts).enumerate() {
            assert_close(&format!("{model} batch part {i}"), part, want, 1e-4);
        }
        // Per row: one row at a time gives the batch's row.
        let ones = vec![1; total];
        let rows = cohort_engines::split_map(&joined, &ones).unwrap();
        let batched_rows = cohort_engines::split_map(&batched, &ones).unwrap();
        for (r, (row, want)) in rows.iter().zip(&batched_rows).enumerate() {
            let got = engine.infer(row).unwrap();
            assert_close(&format!("{model} row {r}"), &got, want, tol);
        }
    }
}

#[test]
fn raw_sessions_run_the_same_model_as_the_engine() {
    let path = models().dir.join("tiny_mlp.onnx");
    let none = onnx_raw::Shapes::new();
    let mut raw = onnx_raw::RawOnnx::open(&path, None, 1, 2, 8, &none).unwrap();
    let engine = load("tiny_mlp");
    assert_eq!(raw.metadata(), engine.metadata());
    assert_eq!((raw.sessions(), raw.batch()), (2, 8));
    let run = raw.run_for(Duration::from_millis(50)).unwrap();
    assert!(run.calls >= 2, "both sessions ran at least once: {run:?}");
    assert!(run.calls_per_second > 0.0, "{run:?}");

    // The batch the raw sessions run gives the engine's output shape.
    let inputs = onnx_raw::batch_inputs(engine.metadata(), 8, &none).unwrap();
    let mut engine = engine;
    let out = engine.infer(&inputs).unwrap();
    assert_eq!(out["y"].shape, vec![8, 10]);
}

#[test]
fn raw_batch_of_a_model_with_a_fixed_first_dim_is_the_models() {
    // unbatched.onnx takes x as [1, 3]: each raw call runs 1 row, whatever --raw-batch says.
    let path = models().dir.join("unbatched.onnx");
    let mut raw = onnx_raw::RawOnnx::open(&path, None, 1, 1, 32, &onnx_raw::Shapes::new()).unwrap();
    assert_eq!(raw.batch(), 1);
    assert!(raw.run_for(Duration::from_millis(20)).unwrap().calls >= 1);
}

#[test]
fn load_engine_serves_onnx_models() {
    let m = models();
    let mut cfg = config("tiny", Path::new("tiny_mlp.onnx"));
    cfg.options.intra_op_threads = Some(2);
    let mut engine = load_engine(&cfg, &LoadContext::cpu(&m.dir)).unwrap();
    let (inputs, want) = &cases("tiny_mlp")[0];
    assert_close("load_engine", &engine.infer(inputs).unwrap(), want, 1e-4);
}

#[test]
fn bad_inputs_are_input_errors() {
    let mut engine = load("tiny_mlp");
    let x = |t: Tensor| TensorMap::from([("x".to_string(), t)]);
    let wrong_dtype = x(Tensor::new(vec![1, 64], TensorData::F64(vec![0.0; 64])).unwrap());
    match engine.infer(&wrong_dtype) {
        Err(EngineError::Input(e)) => assert_eq!(e.input, "x"),
        other => panic!("expected an input error, got {other:?}"),
    }
    match engine.infer(&TensorMap::new()) {
        Err(EngineError::Input(e)) => {
            assert_eq!((e.input.as_str(), e.reason.as_str()), ("x", "missing"))
        }
        other => panic!("expected an input error, got {other:?}"),
    }
    let mut extra = x(Tensor::new(vec![1, 64], TensorData::F32(vec![0.0; 64])).unwrap());
    extra.insert(
        "z".into(),
        Tensor::new(vec![1], TensorData::F32(vec![0.0])).unwrap(),
    );
    match engine.infer(&extra) {
        Err(EngineError::Input(e)) => assert_eq!(e.input, "z"),
        other => panic!("expected an input error, got {other:?}"),
    }
    // A wrong width reaches ONNX Runtime, which refuses it without harm, as an invalid
    // argument: an input error naming the input (a 400 for the client, not a 500).
    let narrow = x(Tensor::new(vec![1, 3], TensorData::F32(vec![0.0; 3])).unwrap());
    match engine.infer(&narrow) {
        Err(EngineError::Input(e)) => {
            assert_eq!(e.input, "x");
            assert!(e.reason.contains("ONNX Runtime refused it"), "{e}");
        }
        other => panic!("expected an input error, got {other:?}"),
    }
    // The engine still works.
    let (inputs, want) = &cases("tiny_mlp")[0];
    assert_close("after errors", &engine.infer(inputs).unwrap(), want, 1e-4);
}

#[test]
fn a_missing_model_file_is_a_load_error() {
    let m = models();
    let file = m.dir.join("no_such_model.onnx");
    let e = onnx::load(&file, &config("x", &file), &LoadContext::cpu(&m.dir)).unwrap_err();
    assert!(matches!(e, EngineError::Load { .. }), "{e}");
    assert!(e.to_string().contains("no_such_model.onnx"), "{e}");
    // Not a model at all.
    let junk = m.dir.join("reference.json");
    let e = onnx::load(&junk, &config("x", &junk), &LoadContext::cpu(&m.dir)).unwrap_err();
    assert!(matches!(e, EngineError::Load { .. }), "{e}");
}

fn assert_library_error(e: &EngineError, path: &Path) {
    let text = e.to_string();
    assert!(matches!(e, EngineError::Load { .. }), "{text}");
    assert!(text.contains("pip install onnxruntime"), "{text}");
    assert!(text.contains("COHORT_ORT_LIB"), "{text}");
    assert!(text.contains(&*path.to_string_lossy()), "{text}");
}

/// Junk and missing files never reach the dynamic loader, so this is safe in a process that
/// also loads the real library.
#[test]
fn a_wrong_library_path_is_a_clear_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libonnxruntime.so.1.404.0");
    assert_library_error(&onnx::find_library(Some(&missing)).unwrap_err(), &missing);
    assert_library_error(&onnx::init_runtime(&missing).unwrap_err(), &missing);

    let junk = dir.path().join("libonnxruntime.so.1.24.0");
    std::fs::write(&junk, b"\0junk, not a shared library\n").unwrap();
    assert_eq!(onnx::find_library(Some(&junk)).unwrap(), junk);
    assert_library_error(&onnx::init_runtime(&junk).unwrap_err(), &junk);

    // Through the engine, with the library named in the node's config.
    let m = models();
    let file = m.dir.join("tiny_mlp.onnx");
    for bad in [&missing, &junk] {
        let mut ctx = LoadContext::cpu(&m.dir);
        ctx.ort_library = Some(bad.clone());
        let e = onnx::load(&file, &config("tiny", &file), &ctx).unwrap_err();
        assert_library_error(&e, bad);
    }
}

/// Runs this test binary's `child_process_checks` with `env`, and checks it passed.
fn run_child(env: &[(&str, &Path)]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "a_wrong_library_leaves_the_process_usable",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .env(MODELS_ENV, &models().dir)
    .env_remove("COHORT_ORT_LIB");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("child checks passed"),
        "child failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// In fresh processes: `COHORT_ORT_LIB` naming a missing file is a load error; a real
/// shared library that is not ONNX Runtime is a load error, after which the right library
/// still loads; and once it has, another library is refused.
#[test]
fn a_wrong_library_leaves_the_process_usable() {
    // Re-run by itself in a child process (ONNX Runtime loads once per process): there it
    // does the child's half.
    if std::env::var_os(CHILD_ENV).is_some() {
        child_process_checks();
        return;
    }
    let _ = models();
    let good =
        onnx::find_library(None).unwrap_or_else(|e| panic!("{e}\n(the ONNX tests need: {PIP})"));
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libonnxruntime.so.1.404.0");
    run_child(&[("COHORT_ORT_LIB", &missing), (GOOD_LIB_ENV, &good)]);

    // The wheel ships a small shared library that is not the runtime: a real ELF file for
    // the dynamic loader, without ONNX Runtime's entry point.
    let not_ort = good
        .parent()
        .unwrap()
        .join("libonnxruntime_providers_shared.so");
    let wrong = if not_ort.is_file() {
        not_ort
    } else {
        // Any shared library will do; the test binary's own libc is one.
        PathBuf::from("/lib/x86_64-linux-gnu/libm.so.6")
    };
    if wrong.is_file() {
        run_child(&[("COHORT_ORT_LIB", &wrong), (GOOD_LIB_ENV, &good)]);
    }
}

/// The child half of `a_wrong_library_leaves_the_process_usable`, run in a fresh process
/// with `COHORT_ORT_LIB` set to a wrong library.
fn child_process_checks() {
    let bad = PathBuf::from(std::env::var_os("COHORT_ORT_LIB").expect("COHORT_ORT_LIB"));
    let good = PathBuf::from(std::env::var_os(GOOD_LIB_ENV).expect("good library"));
    let m = models();
    let file = m.dir.join("tiny_mlp.onnx");
    let ctx = LoadContext::cpu(&m.dir);

    // COHORT_ORT_LIB wins over Python discovery, and a wrong one is a clear error.
    let e = match onnx::find_library(None) {
        Err(e) => e,
        Ok(found) => {
            assert_eq!(found, bad);
            onnx::init_runtime(&found).unwrap_err()
        }
    };
    assert_library_error(&e, &bad);
    println!("wrong library: {e}");
    let e = onnx::load(&file, &config("tiny", &file), &ctx).unwrap_err();
    assert_library_error(&e, &bad);

    // The right library still loads in this process, and serves.
    let mut ctx = ctx;
    ctx.ort_library = Some(good.clone());
    let mut engine = onnx::load(&file, &config("tiny", &file), &ctx).unwrap();
    let (inputs, want) = &cases("tiny_mlp")[0];
    assert_close("child", &engine.infer(inputs).unwrap(), want, 1e-4);
    // Loading it again reuses it.
    assert!(onnx::init_runtime(&good).is_ok());

    // Once loaded, another library is refused.
    if bad.is_file() {
        let e = onnx::init_runtime(&bad).unwrap_err().to_string();
        assert!(e.contains("already loaded"), "{e}");
        println!("switching libraries: {e}");
    }
    println!("child checks passed");
}
