//! A multi-layer perceptron read from safetensors and run with candle on the CPU.
//!
//! File layout: `layers.{i}.weight` with shape `[out, in]` and `layers.{i}.bias` with shape
//! `[out]`, for `i = 0, 1, ...`; ReLU between layers, none after the last. The model takes
//! input `x` `[N, in]` (f32) and gives output `y` `[N, out]` (f32).
//!
//! [`write_demo_mlp`] writes such a file from a fixed seed, so every node that generates
//! the demo model `mlp` serves the very same weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor as CTensor;

use crate::{
    DType, Device, Engine, EngineError, ModelMetadata, Tensor, TensorData, TensorMap, TensorSpec,
};

/// Layer sizes of the demo model: 64 → 256 → ReLU → 10.
pub const DEMO_MLP_DIMS: &[usize] = &[64, 256, 10];
/// Seed of the demo model's weights.
pub const DEMO_MLP_SEED: u64 = 0x00C0_4027;

/// One dense layer, with its weight kept transposed (`[in, out]`) for the matmul.
struct Layer {
    weight_t: CTensor,
    bias: CTensor,
}

/// The candle MLP engine.
pub struct CandleMlp {
    layers: Vec<Layer>,
    in_dim: usize,
    out_dim: usize,
    meta: ModelMetadata,
    params: u64,
    device: candle_core::Device,
}

impl CandleMlp {
    /// Loads the layers from a safetensors file onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<CandleMlp, EngineError> {
        let load_err = |reason: String| EngineError::Load {
            path: path.display().to_string(),
            reason,
        };
        let device = device.candle()?;
        let tensors =
            candle_core::safetensors::load(path, &device).map_err(|e| load_err(e.to_string()))?;
        Self::from_tensors(tensors, device).map_err(load_err)
    }

    fn from_tensors(
        mut tensors: HashMap<String, CTensor>,
        device: candle_core::Device,
    ) -> Result<CandleMlp, String> {
        let mut layers = Vec::new();
        let mut dims: Vec<usize> = Vec::new();
        let mut params = 0u64;
        for i in 0.. {
            let Some(w) = tensors.remove(&format!("layers.{i}.weight")) else {
                break;
            };
            let b = tensors
                .remove(&format!("layers.{i}.bias"))
                .ok_or_else(|| format!("layers.{i}.bias is missing"))?;
            let (out_d, in_d) = w
                .dims2()
                .map_err(|_| format!("layers.{i}.weight must be 2-D, is {:?}", w.dims()))?;
            if b.dims() != [out_d] {
                return Err(format!(
                    "layers.{i}.bias has shape {:?}, expected [{out_d}]",
                    b.dims()
                ));
            }
            if let Some(&prev) = dims.last() {
                if prev != in_d {
                    return Err(format!(
                        "layers.{i}.weight takes {in_d} inputs but the layer before gives {prev}"
                    ));
                }
            } else {
                dims.push(in_d);
            }
            dims.push(out_d);
            params += (out_d * in_d + out_d) as u64;
            let to_f32 = |t: CTensor| t.to_dtype(candle_core::DType::F32);
            let weight_t = to_f32(w)
                .and_then(|w| w.t()?.contiguous())
                .map_err(|e| e.to_string())?;
            let bias = to_f32(b).map_err(|e| e.to_string())?;
            layers.push(Layer { weight_t, bias });
        }
        if layers.is_empty() {
            return Err("no layers.0.weight in the file".into());
        }
        // A layer after a gap in the numbering would otherwise be left out silently.
        if let Some(stray) = tensors.keys().filter(|k| k.starts_with("layers.")).min() {
            return Err(format!(
                "{stray} does not follow layers 0 to {}: layer numbers must have no gaps",
                layers.len() - 1
            ));
        }
        let (in_dim, out_dim) = (dims[0], dims[dims.len() - 1]);
        let meta = ModelMetadata {
            inputs: vec![TensorSpec::new("x", DType::F32, &[-1, in_dim as i64])],
            outputs: vec![TensorSpec::new("y", DType::F32, &[-1, out_dim as i64])],
        };
        Ok(CandleMlp {
            layers,
            in_dim,
            out_dim,
            meta,
            params,
            device,
        })
    }
}

impl Engine for CandleMlp {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        let x = inputs
            .get("x")
            .ok_or_else(|| EngineError::Inference("input x is missing".into()))?;
        let TensorData::F32(data) = &x.data else {
            return Err(EngineError::Inference("input x must be f32".into()));
        };
        let rows = x.rows()?;
        let mut h = CTensor::from_slice(data.as_slice(), (rows, self.in_dim), &self.device)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = h.matmul(&layer.weight_t)?.broadcast_add(&layer.bias)?;
            if i != last {
                h = h.relu()?;
            }
        }
        let y = h.flatten_all()?.to_vec1::<f32>()?;
        let mut out = TensorMap::new();
        out.insert(
            "y".into(),
            Tensor::new(vec![rows, self.out_dim], TensorData::F32(y))?,
        );
        Ok(out)
    }

    fn memory_bytes(&self) -> u64 {
        self.params * 4
    }
}

/// SplitMix64: a tiny, well-known generator, enough for reproducible weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * bound
    }
}

/// Deterministic weights for an MLP with the given layer sizes: for each layer a weight
/// `[out, in]` and a bias `[out]`, uniform in `±1/sqrt(in)` (PyTorch's default range).
pub fn demo_weights(dims: &[usize], seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::new();
    for (i, pair) in dims.windows(2).enumerate() {
        let (in_d, out_d) = (pair[0], pair[1]);
        let bound = 1.0 / (in_d as f32).sqrt();
        let w = (0..in_d * out_d).map(|_| rng.uniform(bound)).collect();
        let b = (0..out_d).map(|_| rng.uniform(bound)).collect();
        out.push((format!("layers.{i}.weight"), vec![out_d, in_d], w));
        out.push((format!("layers.{i}.bias"), vec![out_d], b));
    }
    out
}

/// Writes a deterministic MLP to `path` (atomically: a temporary file, then a rename).
pub fn write_demo_mlp(path: &Path, dims: &[usize], seed: u64) -> Result<(), EngineError> {
    let io_err = |e: String| EngineError::Load {
        path: path.display().to_string(),
        reason: e,
    };
    if dims.len() < 2 {
        return Err(io_err("an MLP needs at least two layer sizes".into()));
    }
    let weights = demo_weights(dims, seed);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .into_iter()
        .map(|(name, shape, data)| {
            let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, raw)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| io_err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(e.to_string()))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| io_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = W2 relu(W1 x + b1) + b2, by plain loops.
    fn reference(dims: &[usize], seed: u64, x: &[f32]) -> Vec<f32> {
        let w = demo_weights(dims, seed);
        let mut h = x.to_vec();
        let layers = w.len() / 2;
        for l in 0..layers {
            let (_, shape, weight) = &w[2 * l];
            let (_, _, bias) = &w[2 * l + 1];
            let (out_d, in_d) = (shape[0], shape[1]);
            let mut next = vec![0f32; out_d];
            for o in 0..out_d {
                let mut acc = bias[o];
                for i in 0..in_d {
                    acc += weight[o * in_d + i] * h[i];
                }
                next[o] = if l + 1 < layers { acc.max(0.0) } else { acc };
            }
            h = next;
        }
        h
    }

    #[test]
    fn demo_weights_are_deterministic() {
        assert_eq!(demo_weights(&[4, 3, 2], 7), demo_weights(&[4, 3, 2], 7));
        assert_ne!(demo_weights(&[4, 3, 2], 7), demo_weights(&[4, 3, 2], 8));
    }

    #[test]
    fn loads_and_matches_plain_matrix_products_batched_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/mlp.safetensors");
        let dims = [8, 16, 3];
        write_demo_mlp(&path, &dims, 42).unwrap();
        let mut mlp = CandleMlp::load(&path, Device::Cpu).unwrap();
        assert_eq!(mlp.metadata().inputs[0].shape, vec![-1, 8]);
        assert_eq!(mlp.metadata().outputs[0].shape, vec![-1, 3]);

        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| (0..8).map(|c| ((r * 8 + c) as f32 * 0.37).sin()).collect())
            .collect();
        let mut batch = TensorMap::new();
        batch.insert("x".into(), Tensor::from_rows_f32(&rows).unwrap());
        let out = mlp.infer(&batch).unwrap();
        let TensorData::F32(y) = &out["y"].data else {
            panic!("f32 output")
        };
        for (r, row) in rows.iter().enumerate() {
            let want = reference(&dims, 42, row);
            let mut single = TensorMap::new();
            single.insert(
                "x".into(),
                Tensor::from_rows_f32(std::slice::from_ref(row)).unwrap(),
            );
            let one = mlp.infer(&single).unwrap();
            let TensorData::F32(y1) = &one["y"].data else {
                panic!("f32 output")
            };
            for c in 0..3 {
                assert!((y[r * 3 + c] - want[c]).abs() < 1e-5, "batched row {r}");
                assert!((y1[c] - want[c]).abs() < 1e-5, "single row {r}");
            }
        }
    }

    #[test]
    fn a_gap_in_the_layer_numbers_is_a_load_error() {
        let dev = candle_core::Device::Cpu;
        let t = |dims: &[usize]| CTensor::zeros(dims, candle_core::DType::F32, &dev).unwrap();
        let mut tensors = HashMap::new();
        tensors.insert("layers.0.weight".to_string(), t(&[3, 4]));
        tensors.insert("layers.0.bias".to_string(), t(&[3]));
        tensors.insert("layers.1.weight".to_string(), t(&[2, 3]));
        tensors.insert("layers.1.bias".to_string(), t(&[2]));
        assert!(CandleMlp::from_tensors(tensors.clone(), dev.clone()).is_ok());
        // layers.2 is missing: layers.3 would have been left out silently.
        tensors.insert("layers.3.weight".to_string(), t(&[2, 2]));
        tensors.insert("layers.3.bias".to_string(), t(&[2]));
        let err = CandleMlp::from_tensors(tensors, dev).err().unwrap();
        assert!(
            err.contains("layers.3.bias") && err.contains("gaps"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_load_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(matches!(
            CandleMlp::load(&path, Device::Cpu),
            Err(EngineError::Load { .. })
        ));
        assert!(matches!(
            CandleMlp::load(&dir.path().join("missing"), Device::Cpu),
            Err(EngineError::Load { .. })
        ));
    }
}
