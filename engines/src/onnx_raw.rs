//! Bare ONNX Runtime: the baseline that Cohort's throughput on an ONNX model is measured
//! against (`cohort bench --raw-onnx`, and the `ort_raw` example).
//!
//! [`RawOnnx`] opens `sessions` sessions of a `.onnx` file with the engine's settings
//! (`threads` intra-op threads, one inter-op thread, every graph optimization, the same
//! library lookup) but none of Cohort around them: one deterministic batch of `batch` rows
//! is made once (other dimensions as a request gives them, see [`batch_inputs`]), and each
//! call is `Session::run` on views of its buffers with the outputs dropped unread. (Views
//! were measured 2–4 % faster than values that ONNX Runtime owns, so the baseline uses
//! them.) [`RawOnnx::run_for`] drives every session in a closed loop on a thread of its
//! own, all at once, and returns the calls that finished in time and the rate they
//! finished at.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ort::session::{Session, SessionInputValue, SessionInputs};

use crate::onnx::{commit, find_library, init_runtime, input_value, metadata, session_builder};
use crate::{DType, EngineError, ModelMetadata, Tensor, TensorData, TensorMap};

/// One bare session and the batch it runs, in the session's input order.
struct Worker {
    session: Session,
    inputs: Vec<Tensor>,
}

impl Worker {
    fn call(&mut self) -> Result<(), EngineError> {
        let views = self
            .inputs
            .iter()
            .map(input_value)
            .collect::<Result<Vec<SessionInputValue<'_>>, _>>()
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(SessionInputs::<'_, '_, 0>::ValueSlice(&views))
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        std::hint::black_box(outputs.len());
        Ok(())
    }
}

/// Each input's dimensions as a request gives them, by input name (see [`batch_inputs`]).
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// What [`RawOnnx::run_for`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawRun {
    /// Calls that finished before the time was up, all sessions together. A call still
    /// running then is not counted.
    pub calls: u64,
    /// Calls per second, all sessions together: each session's calls divided by the time
    /// from its start to the end of its last counted call. 0 when no call finished in time.
    pub calls_per_second: f64,
}

/// `sessions` bare ONNX Runtime sessions of one model, each with the same batch.
pub struct RawOnnx {
    workers: Vec<Worker>,
    batch: usize,
    meta: ModelMetadata,
}

impl std::fmt::Debug for RawOnnx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawOnnx")
            .field("sessions", &self.workers.len())
            .field("batch", &self.batch)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl RawOnnx {
    /// Opens `sessions` sessions of `model` with `threads` intra-op threads each, loading
    /// ONNX Runtime from `library` (else found as the engine finds it), and makes a batch of
    /// `batch` rows for them, other dimensions as in `like` (see [`batch_inputs`]).
    pub fn open(
        model: &Path,
        library: Option<&Path>,
        threads: usize,
        sessions: usize,
        batch: usize,
        like: &Shapes,
    ) -> Result<Self, EngineError> {
        let err = |reason: String| EngineError::Load {
            path: model.display().to_string(),
            reason,
        };
        if threads == 0 || sessions == 0 || batch == 0 {
            return Err(err(
                "threads, sessions and batch must each be at least 1".into()
            ));
        }
        let env = init_runtime(&find_library(library)?)?;
        let mut workers = Vec::with_capacity(sessions);
        let mut meta = None;
        for _ in 0..sessions {
            let builder = session_builder(&env, threads, None).map_err(err)?;
            let session = commit(builder, model).map_err(err)?;
            let m = match meta.take() {
                Some(m) => m,
                None => metadata(&session).map_err(err)?,
            };
            let mut inputs = batch_inputs(&m, batch, like)?;
            let inputs = m
                .inputs
                .iter()
                .map(|spec| {
                    inputs
                        .remove(&spec.name)
                        .ok_or_else(|| err(format!("no value made for input {:?}", spec.name)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            meta = Some(m);
            workers.push(Worker { session, inputs });
        }
        let meta = meta.ok_or_else(|| err("no session was opened".into()))?;
        // A model whose first dimension is fixed runs that many rows, whatever `batch` is.
        let batch = workers
            .first()
            .and_then(|w| w.inputs.first())
            .map_or(batch, |t| t.shape.first().copied().unwrap_or(1));
        Ok(Self {
            workers,
            batch,
            meta,
        })
    }

    /// Rows in each call's batch: the first dimension of the model's first input (`batch`
    /// when it is dynamic, else the model's own).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// How many sessions run side by side.
    pub fn sessions(&self) -> usize {
        self.workers.len()
    }

    /// The model's inputs and outputs, as ONNX Runtime reports them.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    /// Runs every session in a closed loop on a thread of its own for `time`; returns the
    /// calls that finished by then and their rate (see [`RawRun`]). A failed call stops
    /// every thread and is the error.
    pub fn run_for(&mut self, time: Duration) -> Result<RawRun, EngineError> {
        let end = Instant::now()
            .checked_add(time)
            .ok_or_else(|| EngineError::Inference(format!("a run of {time:?} is too long")))?;
        let failed = AtomicBool::new(false);
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .map(|w| {
                    let failed = &failed;
                    s.spawn(move || -> Result<RawRun, EngineError> {
                        let start = Instant::now();
                        let (mut calls, mut last) = (0u64, start);
                        while !failed.load(Ordering::Relaxed) {
                            if let Err(e) = w.call() {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                            let done = Instant::now();
                            if done > end {
                                break;
                            }
                            calls += 1;
                            last = done;
                        }
                        Ok(RawRun {
                            calls,
                            calls_per_second: rate(calls, last - start),
                        })
                    })
                })
                .collect();
            let mut total = RawRun {
                calls: 0,
                calls_per_second: 0.0,
            };
            let mut first_error = None;
            for h in handles {
                match h.join() {
                    Ok(Ok(run)) => {
                        total.calls += run.calls;
                        total.calls_per_second += run.calls_per_second;
                    }
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        first_error.get_or_insert(EngineError::Inference(
                            "a raw ONNX Runtime thread panicked".into(),
                        ));
                    }
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })
    }
}

fn rate(calls: u64, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if calls > 0 && secs > 0.0 {
        calls as f64 / secs
    } else {
        0.0
    }
}

/// The most elements one input of a raw benchmark batch may hold (1 GiB of f32).
pub const MAX_BENCH_ELEMENTS: usize = 1 << 28;

/// A deterministic batch for `meta`'s inputs. A dynamic first dimension is `batch`; any
/// other dynamic dimension is the input's in `like` (the shapes of the request the raw
/// figure is compared with), else 1. Fixed dimensions are the model's. Values are spread
/// over [-1, 1) for floats and 0..100 for integers.
pub fn batch_inputs(
    meta: &ModelMetadata,
    batch: usize,
    like: &Shapes,
) -> Result<TensorMap, EngineError> {
    let mut out = TensorMap::new();
    for spec in &meta.inputs {
        let given = like.get(&spec.name);
        if let Some(given) = given.filter(|g| g.len() != spec.shape.len()) {
            return Err(EngineError::Inference(format!(
                "input {:?} has {} dimensions in the request but {} in the model",
                spec.name,
                given.len(),
                spec.shape.len()
            )));
        }
        let shape: Vec<usize> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match usize::try_from(d) {
                Ok(d) => d,
                Err(_) if i == 0 => batch,
                Err(_) => given.map_or(1, |g| g[i]),
            })
            .collect();
        // The model file sets the fixed dimensions: check them before allocating.
        let n = crate::element_count(&shape)
            .filter(|&n| n <= MAX_BENCH_ELEMENTS)
            .ok_or_else(|| {
                EngineError::Inference(format!(
                    "input {:?} of shape {shape:?} is too large for a benchmark batch (at most {MAX_BENCH_ELEMENTS} elements)",
                    spec.name
                ))
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorSpec;

    #[test]
    fn batch_inputs_fill_dynamic_dims() {
        let meta = ModelMetadata {
            inputs: vec![
                TensorSpec::new("x", DType::F32, &[-1, 4]),
                TensorSpec::new("ids", DType::I64, &[-1, -1]),
                TensorSpec::new("fixed", DType::U8, &[2, 3]),
            ],
            outputs: vec![],
        };
        let inputs = batch_inputs(&meta, 5, &Shapes::new()).expect("valid specs");
        assert_eq!(inputs["x"].shape, vec![5, 4]);
        assert_eq!(inputs["ids"].shape, vec![5, 1]);
        assert_eq!(inputs["fixed"].shape, vec![2, 3]);
        let TensorData::F32(x) = &inputs["x"].data else {
            panic!("x is f32")
        };
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        // Deterministic.
        assert_eq!(
            batch_inputs(&meta, 5, &Shapes::new()).expect("valid"),
            inputs
        );
    }

    #[test]
    fn batch_inputs_take_other_dynamic_dims_from_the_request() {
        let meta = ModelMetadata {
            inputs: vec![
                TensorSpec::new("ids", DType::I64, &[-1, -1]),
                TensorSpec::new("x", DType::F32, &[-1, 4]),
            ],
            outputs: vec![],
        };
        // The request's rows do not matter (the batch is `batch`), its other dims do; a
        // fixed dim stays the model's.
        let like = Shapes::from([
            ("ids".to_string(), vec![1, 8]),
            ("x".to_string(), vec![1, 4]),
        ]);
        let inputs = batch_inputs(&meta, 32, &like).expect("valid");
        assert_eq!(inputs["ids"].shape, vec![32, 8]);
        assert_eq!(inputs["x"].shape, vec![32, 4]);

        let wrong_rank = Shapes::from([("ids".to_string(), vec![1, 8, 2])]);
        let e = batch_inputs(&meta, 32, &wrong_rank).expect_err("rank differs");
        assert!(e.to_string().contains("3 dimensions in the request"), "{e}");
    }

    #[test]
    fn rate_is_zero_without_calls_or_time() {
        assert_eq!(rate(0, Duration::from_secs(1)), 0.0);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
        assert_eq!(rate(5, Duration::from_millis(500)), 10.0);
    }

    #[test]
    fn huge_fixed_dimensions_are_an_error_not_an_allocation() {
        for shape in [&[-1, 1 << 40][..], &[i64::MAX, i64::MAX]] {
            let meta = ModelMetadata {
                inputs: vec![TensorSpec::new("x", DType::F32, shape)],
                outputs: vec![],
            };
            let e = batch_inputs(&meta, 32, &Shapes::new()).expect_err("too large");
            assert!(e.to_string().contains("too large"), "{e}");
        }
    }

    #[test]
    fn zero_sizes_are_refused_before_loading() {
        let e = RawOnnx::open(
            Path::new("/nonexistent.onnx"),
            None,
            1,
            0,
            32,
            &Shapes::new(),
        )
        .expect_err("no sessions");
        assert!(e.to_string().contains("at least 1"), "{e}");
    }
}
