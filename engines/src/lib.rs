//! Engines: the code that actually computes a model's outputs.
//!
//! Everything else in Cohort (queues, batching, routing, HTTP) is overhead around one call:
//! [`Engine::infer`] on a batch. The trait is small and synchronous on purpose: each replica
//! runs its engine on a dedicated OS thread (see `cohort-actors`), never on a tokio worker.
//!
//! A batch is a [`TensorMap`] whose tensors all have the batch's rows as their first
//! dimension; the engine answers with outputs that have the same number of rows, in order.
//!
//! Backends in this crate:
//! - [`mlp::CandleMlp`]: a multi-layer perceptron read from safetensors, run with candle;
//!   [`mlp::write_demo_mlp`] writes the deterministic demo model of `cohort up`.
//! - [`testing`]: `echo`, `sleep` and `fail` engines for tests and the chaos harness.
//!
//! ```
//! use cohort_engines::{testing::Echo, Engine, Tensor, TensorData, TensorMap};
//! let mut engine = Echo::new();
//! let mut inputs = TensorMap::new();
//! inputs.insert("x".into(), Tensor::new(vec![1, 2], TensorData::F32(vec![1.0, 2.0])).unwrap());
//! let rows = engine.metadata().check_inputs(&inputs).unwrap();
//! assert_eq!(rows, 1);
//! let out = engine.infer(&inputs).unwrap();
//! assert_eq!(out["y"].data, TensorData::F32(vec![1.0, 2.0]));
//! ```

pub mod bert;
pub mod device;
pub mod mlp;
pub mod onnx;
pub mod onnx_raw;
pub mod tensor;
pub mod testing;

use std::path::{Path, PathBuf};

use cohort_config::{EngineKind, ModelConfig};
use serde::{Deserialize, Serialize};

pub use device::{Device, DeviceInfo};
pub use tensor::{
    concat_maps, element_count, split_map, DType, ShapeError, Tensor, TensorData, TensorMap,
};

/// What can go wrong in an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded.
    #[error("cannot load {path}: {reason}")]
    Load { path: String, reason: String },
    /// The inputs do not match the model's metadata.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The computation failed.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The engine is not healthy.
    #[error("engine unhealthy: {0}")]
    Unhealthy(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Inference(e.to_string())
    }
}

impl From<ShapeError> for EngineError {
    fn from(e: ShapeError) -> Self {
        EngineError::Inference(e.to_string())
    }
}

/// A request's input that does not fit the model; `input` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input {input:?}: {reason}")]
pub struct InputError {
    /// The offending input's name.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One input or output of a model. A dimension of `-1` is dynamic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn new(name: &str, dtype: DType, shape: &[i64]) -> Self {
        TensorSpec {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// What a model takes and gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl ModelMetadata {
    /// Whether requests to this model can share an engine call: every input and every
    /// output has a dynamic first dimension, taken to be the batch (as Triton assumes for
    /// a model with `max_batch_size > 0`). A model with a fixed first dimension (a
    /// static batch-1 export), a scalar, or an input without a declared shape is run one
    /// request at a time, and its outputs go back to the caller as the model gives them.
    pub fn batchable(&self) -> bool {
        !self.inputs.is_empty()
            && self
                .inputs
                .iter()
                .chain(&self.outputs)
                .all(|s| s.shape.first() == Some(&-1))
    }

    /// Checks names, dtypes and shapes of a request's inputs, and returns its row count:
    /// the first dimension, shared by every input, for a [batchable](Self::batchable)
    /// model; 1 for any other, whose requests run one at a time.
    ///
    /// An input declared with no dimensions (`[]`) is not shape-checked: ONNX Runtime
    /// reports both scalars and inputs whose model declares no shape that way, and checks
    /// such inputs itself when it runs.
    pub fn check_inputs(&self, inputs: &TensorMap) -> Result<usize, InputError> {
        let err = |input: &str, reason: String| InputError {
            input: input.to_string(),
            reason,
        };
        for name in inputs.keys() {
            if !self.inputs.iter().any(|s| &s.name == name) {
                let expected: Vec<_> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(err(
                    name,
                    format!("unknown input; the model takes {expected:?}"),
                ));
            }
        }
        if self.inputs.is_empty() {
            return Err(err("", "the model takes no inputs".into()));
        }
        let batchable = self.batchable();
        let mut rows = None;
        for spec in &self.inputs {
            let t = inputs
                .get(&spec.name)
                .ok_or_else(|| err(&spec.name, "missing".into()))?;
            if t.dtype() != spec.dtype {
                return Err(err(
                    &spec.name,
                    format!("expected dtype {}, got {}", spec.dtype, t.dtype()),
                ));
            }
            let shape_ok = spec.shape.is_empty()
                || (t.shape.len() == spec.shape.len()
                    && t.shape
                        .iter()
                        .zip(&spec.shape)
                        .all(|(&have, &want)| want < 0 || have as i64 == want));
            if !shape_ok {
                return Err(err(
                    &spec.name,
                    format!("expected shape {:?}, got {:?}", spec.shape, t.shape),
                ));
            }
            if t.shape.first() == Some(&0) {
                return Err(err(&spec.name, "has no rows".into()));
            }
            // An empty dimension past the first would let a body with no data claim any
            // number of rows (shape [10^18, 0]), and the batcher counts rows.
            if t.shape.contains(&0) {
                return Err(err(
                    &spec.name,
                    format!("has an empty dimension: shape {:?}", t.shape),
                ));
            }
            if !batchable {
                continue;
            }
            let r = t.shape.first().copied().unwrap_or(1);
            match rows {
                None => rows = Some(r),
                Some(prev) if prev != r => {
                    return Err(err(
                        &spec.name,
                        format!("has {r} rows but other inputs have {prev}"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(rows.unwrap_or(1))
    }
}

/// A loaded model. Runs on one OS thread; never shared between threads.
pub trait Engine: Send + 'static {
    /// The model's inputs and outputs.
    fn metadata(&self) -> &ModelMetadata;

    /// Runs a batch: every input's first dimension is the batch's rows; every output has
    /// the same rows in the same order.
    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError>;

    /// Whether the engine can serve.
    fn health(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// A rough estimate of the memory this engine holds, in bytes.
    fn memory_bytes(&self) -> u64 {
        0
    }

    /// Text models: counts the tokens of one request's inputs, so that the batcher can
    /// honour `max_batch_tokens`. Called on tokio workers, so it must be cheap.
    fn token_counter(&self) -> Option<TokenCounter> {
        None
    }
}

/// Counts the tokens of a request's inputs (see [`Engine::token_counter`]).
pub type TokenCounter = std::sync::Arc<dyn Fn(&TensorMap) -> usize + Send + Sync>;

/// What an engine needs to know, besides its model's configuration, to load.
#[derive(Debug, Clone)]
pub struct LoadContext {
    /// Relative model paths are read from here.
    pub data_dir: PathBuf,
    /// The device this replica is pinned to.
    pub device: Device,
    /// The ONNX Runtime library named in the node's config, if any.
    pub ort_library: Option<PathBuf>,
    /// Intra-op threads for engines that have a thread pool (ONNX Runtime), when the
    /// model's options do not say.
    pub default_threads: usize,
}

impl LoadContext {
    /// A context for the CPU with one intra-op thread.
    pub fn cpu(data_dir: &Path) -> LoadContext {
        LoadContext {
            data_dir: data_dir.to_path_buf(),
            device: Device::Cpu,
            ort_library: None,
            default_threads: 1,
        }
    }
}

fn model_path(model: &ModelConfig, ctx: &LoadContext) -> Result<PathBuf, EngineError> {
    model
        .resolved_path(&ctx.data_dir)
        .ok_or_else(|| EngineError::Load {
            path: String::new(),
            reason: format!("engine {} needs a path", model.engine),
        })
}

/// Loads the engine a model's configuration names.
pub fn load_engine(model: &ModelConfig, ctx: &LoadContext) -> Result<Box<dyn Engine>, EngineError> {
    let engine: Box<dyn Engine> = match model.engine {
        EngineKind::CandleMlp => {
            Box::new(mlp::CandleMlp::load(&model_path(model, ctx)?, ctx.device)?)
        }
        EngineKind::CandleBert => Box::new(bert::BertEmbedder::load(
            &model_path(model, ctx)?,
            model,
            ctx,
        )?),
        EngineKind::Onnx => Box::new(onnx::load(&model_path(model, ctx)?, model, ctx)?),
        EngineKind::Echo => Box::new(testing::Echo::new()),
        EngineKind::Sleep => Box::new(testing::Sleep::new(std::time::Duration::from_millis(
            model.options.sleep_ms.unwrap_or(0),
        ))),
        EngineKind::Fail => Box::new(testing::Fail::new(
            model.options.fail_every.unwrap_or(1),
            model.options.fail_mode,
        )),
    };
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMetadata {
        ModelMetadata {
            inputs: vec![
                TensorSpec::new("x", DType::F32, &[-1, 3]),
                TensorSpec::new("ids", DType::I64, &[-1]),
            ],
            outputs: vec![TensorSpec::new("y", DType::F32, &[-1, 1])],
        }
    }

    fn inputs(x_rows: usize, x_cols: usize, ids: usize) -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "x".into(),
            Tensor::new(
                vec![x_rows, x_cols],
                TensorData::F32(vec![0.0; x_rows * x_cols]),
            )
            .unwrap(),
        );
        m.insert(
            "ids".into(),
            Tensor::new(vec![ids], TensorData::I64(vec![0; ids])).unwrap(),
        );
        m
    }

    #[test]
    fn good_inputs_give_rows() {
        assert_eq!(meta().check_inputs(&inputs(2, 3, 2)), Ok(2));
    }

    #[test]
    fn each_mistake_names_the_input() {
        let e = meta().check_inputs(&inputs(2, 4, 2)).unwrap_err();
        assert_eq!(e.input, "x");
        assert!(e.reason.contains("shape"));

        let e = meta().check_inputs(&inputs(2, 3, 3)).unwrap_err();
        assert_eq!(e.input, "ids");
        assert!(e.reason.contains("rows"));

        let mut m = inputs(1, 3, 1);
        m.insert(
            "z".into(),
            Tensor::new(vec![1], TensorData::F32(vec![0.0])).unwrap(),
        );
        assert_eq!(meta().check_inputs(&m).unwrap_err().input, "z");

        let mut m = inputs(1, 3, 1);
        m.remove("ids");
        assert_eq!(meta().check_inputs(&m).unwrap_err().reason, "missing");

        let mut m = inputs(1, 3, 1);
        m.insert(
            "ids".into(),
            Tensor::new(vec![1], TensorData::F32(vec![0.0])).unwrap(),
        );
        let e = meta().check_inputs(&m).unwrap_err();
        assert!(e.reason.contains("dtype"), "{e}");
    }

    #[test]
    fn only_models_with_a_batch_dimension_everywhere_are_batched() {
        assert!(meta().batchable());
        let f32_input = |shape: &[i64]| ModelMetadata {
            inputs: vec![TensorSpec::new("x", DType::F32, shape)],
            outputs: vec![TensorSpec::new("y", DType::F32, &[-1, 1])],
        };
        // A static batch-1 export: requests of one row pass, and run alone.
        let fixed = f32_input(&[1, 3]);
        assert!(!fixed.batchable());
        let mut one = TensorMap::new();
        one.insert(
            "x".into(),
            Tensor::new(vec![1, 3], TensorData::F32(vec![0.0; 3])).unwrap(),
        );
        assert_eq!(fixed.check_inputs(&one), Ok(1));
        let mut two = TensorMap::new();
        two.insert(
            "x".into(),
            Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 6])).unwrap(),
        );
        assert!(fixed
            .check_inputs(&two)
            .unwrap_err()
            .reason
            .contains("shape"));

        // An output that is not per row (a scalar) makes the model unbatchable too.
        let mut scalar_out = f32_input(&[-1, 3]);
        scalar_out.outputs = vec![TensorSpec::new("sum", DType::F32, &[])];
        assert!(!scalar_out.batchable());
        assert_eq!(scalar_out.check_inputs(&two), Ok(1));

        // A scalar input beside a batch input: no row agreement is asked of it.
        let mut with_scalar = f32_input(&[-1, 3]);
        with_scalar
            .inputs
            .push(TensorSpec::new("threshold", DType::F32, &[]));
        let mut m = two.clone();
        m.insert(
            "threshold".into(),
            Tensor::new(vec![], TensorData::F32(vec![0.5])).unwrap(),
        );
        assert!(!with_scalar.batchable());
        assert_eq!(with_scalar.check_inputs(&m), Ok(1));

        // An input whose model declares no shape (reported as []) takes any shape.
        let unknown = f32_input(&[]);
        assert_eq!(unknown.check_inputs(&two), Ok(1));
        // ... but an empty dimension is still refused.
        let mut empty = TensorMap::new();
        empty.insert(
            "x".into(),
            Tensor::new(vec![4, 0], TensorData::F32(vec![])).unwrap(),
        );
        assert!(unknown.check_inputs(&empty).is_err());
    }

    #[test]
    fn an_empty_dimension_cannot_claim_rows() {
        // No data at all, yet 10^18 rows: the batcher would count them.
        let mut m = TensorMap::new();
        m.insert(
            "x".into(),
            Tensor::new(vec![1_000_000_000_000_000_000, 0], TensorData::F32(vec![])).unwrap(),
        );
        m.insert(
            "ids".into(),
            Tensor::new(vec![1], TensorData::I64(vec![0])).unwrap(),
        );
        let meta = ModelMetadata {
            inputs: vec![
                TensorSpec::new("x", DType::F32, &[-1, -1]),
                TensorSpec::new("ids", DType::I64, &[-1]),
            ],
            outputs: vec![],
        };
        let e = meta.check_inputs(&m).unwrap_err();
        assert_eq!(e.input, "x");
        assert!(e.reason.contains("empty dimension"), "{e}");
    }
}
