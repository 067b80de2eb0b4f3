//! Tensors as they travel between the gateway, the batcher and the engines.
//!
//! A [`Tensor`] is a shape and a flat, row-major buffer of one element type. Requests are
//! batched by concatenating their tensors along the first dimension ([`Tensor::concat`])
//! and answered by splitting the engine's outputs back ([`Tensor::split_rows`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Element types a tensor may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    F16,
    I64,
    I32,
    I8,
    U8,
    Bool,
    /// UTF-8 strings (text models).
    String,
}

impl DType {
    /// The lowercase name used in the API (`f32`, `string`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::String => "string",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A flat buffer of elements.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<half::f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
    String(Vec<String>),
}

/// Applies `$body` to the vector inside any variant, binding it to `$v`.
macro_rules! each_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::F32($v) => $body,
            TensorData::F64($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::Bool($v) => $body,
            TensorData::String($v) => $body,
        }
    };
}

/// Like `each_variant!`, but rebuilds a `TensorData` of the same variant from `$body`.
macro_rules! map_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F64($v) => TensorData::F64($body),
            TensorData::F16($v) => TensorData::F16($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::Bool($v) => TensorData::Bool($body),
            TensorData::String($v) => TensorData::String($body),
        }
    };
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::F16(_) => DType::F16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
            TensorData::String(_) => DType::String,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each_variant!(self, v => v.len())
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn empty_like(&self, capacity: usize) -> TensorData {
        map_variant!(self, _v => Vec::with_capacity(capacity))
    }

    /// Appends `other` (of the same type) to `self`.
    fn extend_from(&mut self, other: &TensorData) -> bool {
        match (self, other) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend_from_slice(b),
            (TensorData::F64(a), TensorData::F64(b)) => a.extend_from_slice(b),
            (TensorData::F16(a), TensorData::F16(b)) => a.extend_from_slice(b),
            (TensorData::I64(a), TensorData::I64(b)) => a.extend_from_slice(b),
            (TensorData::I32(a), TensorData::I32(b)) => a.extend_from_slice(b),
            (TensorData::I8(a), TensorData::I8(b)) => a.extend_from_slice(b),
            (TensorData::U8(a), TensorData::U8(b)) => a.extend_from_slice(b),
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(b),
            (TensorData::String(a), TensorData::String(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }

    /// Appends the elements as raw little-endian bytes (Triton's binary tensor layout):
    /// booleans as one byte each, strings as a 4-byte little-endian length then the bytes.
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        macro_rules! numbers {
            ($d:expr) => {
                for v in $d {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            };
        }
        match self {
            TensorData::F32(d) => numbers!(d),
            TensorData::F64(d) => numbers!(d),
            TensorData::F16(d) => numbers!(d),
            TensorData::I64(d) => numbers!(d),
            TensorData::I32(d) => numbers!(d),
            TensorData::I8(d) => numbers!(d),
            TensorData::U8(d) => out.extend_from_slice(d),
            TensorData::Bool(d) => out.extend(d.iter().map(|&b| u8::from(b))),
            TensorData::String(d) => {
                for v in d {
                    // Strings come from engines fed by bounded request bodies: far below 4 GiB.
                    let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(v.as_bytes());
                }
            }
        }
    }

    fn slice(&self, start: usize, end: usize) -> TensorData {
        map_variant!(self, v => v[start..end].to_vec())
    }
}

/// A shaped tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Named tensors: a request's inputs or a response's outputs.
pub type TensorMap = BTreeMap<String, Tensor>;

/// Why tensors could not be put together or taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("shape {shape:?} holds {expected} elements but the data has {actual}")]
    Length {
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("cannot join tensors of shapes {a:?} and {b:?} along the first dimension")]
    Mismatch { a: Vec<usize>, b: Vec<usize> },
    #[error("cannot join a {a} tensor with a {b} tensor")]
    DType { a: DType, b: DType },
    #[error("a tensor with no dimensions has no rows")]
    Scalar,
    #[error("rows {wanted} do not add up to the tensor's first dimension {have}")]
    Rows { wanted: usize, have: usize },
    #[error("nothing to join")]
    Empty,
    #[error("shape {shape:?} holds more elements than this machine can address")]
    TooLarge { shape: Vec<usize> },
}

/// The elements a shape holds; `None` when the product does not fit in a `usize`.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl Tensor {
    /// A tensor, checking that the shape matches the data's length.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, ShapeError> {
        let expected = element_count(&shape).ok_or_else(|| ShapeError::TooLarge {
            shape: shape.clone(),
        })?;
        if expected != data.len() {
            return Err(ShapeError::Length {
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A 2-D f32 tensor from rows (all rows must have the same length).
    pub fn from_rows_f32(rows: &[Vec<f32>]) -> Result<Tensor, ShapeError> {
        let cols = rows.first().map_or(0, Vec::len);
        let data: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::new(vec![rows.len(), cols], TensorData::F32(data))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The first dimension: how many rows (batch items) the tensor holds.
    pub fn rows(&self) -> Result<usize, ShapeError> {
        self.shape.first().copied().ok_or(ShapeError::Scalar)
    }

    /// Elements per row.
    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Whether `other` can be concatenated with `self` along the first dimension.
    pub fn joinable(&self, other: &Tensor) -> bool {
        self.dtype() == other.dtype()
            && self.shape.len() == other.shape.len()
            && !self.shape.is_empty()
            && self.shape[1..] == other.shape[1..]
    }

    /// Concatenates tensors along the first dimension.
    pub fn concat(parts: &[&Tensor]) -> Result<Tensor, ShapeError> {
        let first = *parts.first().ok_or(ShapeError::Empty)?;
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let total: usize = parts.iter().map(|t| t.data.len()).sum();
        let mut data = first.data.empty_like(total);
        let mut rows = 0;
        for t in parts {
            if t.dtype() != first.dtype() {
                return Err(ShapeError::DType {
                    a: first.dtype(),
                    b: t.dtype(),
                });
            }
            if !first.joinable(t) {
                return Err(ShapeError::Mismatch {
                    a: first.shape.clone(),
                    b: t.shape.clone(),
                });
            }
            rows += t.shape[0];
            data.extend_from(&t.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Ok(Tensor { shape, data })
    }

    /// Splits along the first dimension into pieces of `rows[i]` rows each.
    pub fn split_rows(&self, rows: &[usize]) -> Result<Vec<Tensor>, ShapeError> {
        let have = self.rows()?;
        let wanted: usize = rows.iter().sum();
        if wanted != have {
            return Err(ShapeError::Rows { wanted, have });
        }
        if rows.len() == 1 {
            return Ok(vec![self.clone()]);
        }
        let row_len = self.row_len();
        let mut start = 0;
        Ok(rows
            .iter()
            .map(|&n| {
                let end = start + n * row_len;
                let mut shape = self.shape.clone();
                shape[0] = n;
                let t = Tensor {
                    shape,
                    data: self.data.slice(start, end),
                };
                start = end;
                t
            })
            .collect())
    }
}

/// Concatenates each named input of several requests along the first dimension.
pub fn concat_maps(maps: &[&TensorMap]) -> Result<TensorMap, ShapeError> {
    let first = *maps.first().ok_or(ShapeError::Empty)?;
    let mut out = TensorMap::new();
    for name in first.keys() {
        let parts: Vec<&Tensor> = maps.iter().filter_map(|m| m.get(name)).collect();
        out.insert(name.clone(), Tensor::concat(&parts)?);
    }
    Ok(out)
}

/// Splits each named output back into one map per request.
pub fn split_map(map: &TensorMap, rows: &[usize]) -> Result<Vec<TensorMap>, ShapeError> {
    let mut out: Vec<TensorMap> = vec![TensorMap::new(); rows.len()];
    for (name, t) in map {
        for (i, piece) in t.split_rows(rows)?.into_iter().enumerate() {
            out[i].insert(name.clone(), piece);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize, start: f32) -> Tensor {
        let data = (0..rows * cols).map(|i| start + i as f32).collect();
        Tensor::new(vec![rows, cols], TensorData::F32(data)).unwrap()
    }

    #[test]
    fn new_checks_length() {
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 5])).is_err());
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 6])).is_ok());
        // A product that overflows is an error, not a wrapped count that happens to match.
        let huge = vec![1 << 32, 1 << 32, 0];
        assert_eq!(
            Tensor::new(huge.clone(), TensorData::F32(vec![])),
            Err(ShapeError::TooLarge { shape: huge })
        );
    }

    #[test]
    fn concat_then_split_is_identity() {
        let a = t(1, 3, 0.0);
        let b = t(2, 3, 10.0);
        let c = t(3, 3, 100.0);
        let joined = Tensor::concat(&[&a, &b, &c]).unwrap();
        assert_eq!(joined.shape, vec![6, 3]);
        let parts = joined.split_rows(&[1, 2, 3]).unwrap();
        assert_eq!(parts, vec![a, b, c]);
    }

    #[test]
    fn concat_rejects_mismatched_rows_and_types() {
        let a = t(1, 3, 0.0);
        let b = t(1, 4, 0.0);
        assert!(matches!(
            Tensor::concat(&[&a, &b]),
            Err(ShapeError::Mismatch { .. })
        ));
        let s = Tensor::new(vec![1], TensorData::String(vec!["x".into()])).unwrap();
        let f = Tensor::new(vec![1], TensorData::F32(vec![1.0])).unwrap();
        assert!(matches!(
            Tensor::concat(&[&f, &s]),
            Err(ShapeError::DType { .. })
        ));
    }

    #[test]
    fn split_checks_row_count() {
        assert!(matches!(
            t(3, 2, 0.0).split_rows(&[1, 1]),
            Err(ShapeError::Rows { .. })
        ));
    }

    #[test]
    fn little_endian_bytes() {
        let mut out = Vec::new();
        TensorData::F32(vec![1.0, -2.0]).write_le_bytes(&mut out);
        TensorData::Bool(vec![true, false]).write_le_bytes(&mut out);
        TensorData::String(vec!["ab".into()]).write_le_bytes(&mut out);
        let mut want = Vec::new();
        want.extend_from_slice(&1.0f32.to_le_bytes());
        want.extend_from_slice(&(-2.0f32).to_le_bytes());
        want.extend_from_slice(&[1, 0]);
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(b"ab");
        assert_eq!(out, want);
    }

    #[test]
    fn maps_roundtrip() {
        let mut m1 = TensorMap::new();
        m1.insert("x".into(), t(1, 2, 0.0));
        let mut m2 = TensorMap::new();
        m2.insert("x".into(), t(2, 2, 5.0));
        let joined = concat_maps(&[&m1, &m2]).unwrap();
        assert_eq!(joined["x"].shape, vec![3, 2]);
        assert_eq!(split_map(&joined, &[1, 2]).unwrap(), vec![m1, m2]);
    }
}
