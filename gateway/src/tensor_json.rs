//! Tensors in JSON: nested arrays in requests, nested arrays in responses.
//!
//! A request's input is read against the model's [`TensorSpec`]: the nesting gives the
//! shape (it must be rectangular), the spec gives the element type, and every leaf must
//! be of that type (numbers for floats, integers for integer types, booleans, strings).
//! Outputs are written as nested arrays with `f32` values printed in their shortest form.

use cohort_engines::{element_count, DType, InputError, Tensor, TensorData, TensorSpec};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

/// Deepest nesting accepted for one input.
const MAX_RANK: usize = 8;

/// Most elements reserved before an input's data has been read.
const MAX_RESERVE: usize = 1 << 16;

fn input_err(input: &str, reason: impl Into<String>) -> InputError {
    InputError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Reads one input from JSON, as `spec` says.
pub fn tensor_from_json(spec: &TensorSpec, value: &Value) -> Result<Tensor, InputError> {
    let name = spec.name.as_str();
    // The shape, from the first element at each depth.
    let mut shape = Vec::new();
    let mut cur = value;
    while let Value::Array(items) = cur {
        if shape.len() == MAX_RANK {
            return Err(input_err(
                name,
                format!("nested deeper than {MAX_RANK} levels"),
            ));
        }
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    let count = element_count(&shape)
        .ok_or_else(|| input_err(name, "has more elements than this machine can address"))?;
    // The shape is read from the first element at each depth, before the array is known
    // to be rectangular: a small body can claim 10^12 elements. Reserve at most
    // `MAX_RESERVE` up front; `flatten` checks every level and the vector grows as it must.
    let count = count.min(MAX_RESERVE);
    let mut data = match spec.dtype {
        DType::F32 => TensorData::F32(Vec::with_capacity(count)),
        DType::F64 => TensorData::F64(Vec::with_capacity(count)),
        DType::F16 => TensorData::F16(Vec::with_capacity(count)),
        DType::I64 => TensorData::I64(Vec::with_capacity(count)),
        DType::I32 => TensorData::I32(Vec::with_capacity(count)),
        DType::I8 => TensorData::I8(Vec::with_capacity(count)),
        DType::U8 => TensorData::U8(Vec::with_capacity(count)),
        DType::Bool => TensorData::Bool(Vec::with_capacity(count)),
        DType::String => TensorData::String(Vec::with_capacity(count)),
    };
    flatten(name, value, &shape, 0, &mut data)?;
    Tensor::new(shape, data).map_err(|e| input_err(name, e.to_string()))
}

fn flatten(
    name: &str,
    v: &Value,
    shape: &[usize],
    depth: usize,
    out: &mut TensorData,
) -> Result<(), InputError> {
    if depth < shape.len() {
        let Value::Array(items) = v else {
            return Err(input_err(
                name,
                "is not rectangular: a value where a list was expected",
            ));
        };
        if items.len() != shape[depth] {
            return Err(input_err(
                name,
                format!(
                    "is not rectangular: a list of {} where {} were expected at depth {depth}",
                    items.len(),
                    shape[depth]
                ),
            ));
        }
        for item in items {
            flatten(name, item, shape, depth + 1, out)?;
        }
        return Ok(());
    }
    let dtype = out.dtype();
    let wrong = |what: &str| {
        input_err(
            name,
            format!("expected {what} elements (dtype {dtype}), got {v}"),
        )
    };
    match out {
        TensorData::F32(d) => {
            let x = v.as_f64().ok_or_else(|| wrong("number"))? as f32;
            if !x.is_finite() {
                return Err(wrong("finite f32"));
            }
            d.push(x)
        }
        TensorData::F64(d) => d.push(v.as_f64().ok_or_else(|| wrong("number"))?),
        TensorData::F16(d) => {
            let x = half::f16::from_f64(v.as_f64().ok_or_else(|| wrong("number"))?);
            if !x.is_finite() {
                return Err(wrong("finite f16"));
            }
            d.push(x)
        }
        TensorData::I8(d) => d.push(
            v.as_i64()
                .and_then(|x| i8::try_from(x).ok())
                .ok_or_else(|| wrong("-128..127 integer"))?,
        ),
        TensorData::I64(d) => d.push(v.as_i64().ok_or_else(|| wrong("integer"))?),
        TensorData::I32(d) => d.push(
            v.as_i64()
                .and_then(|x| i32::try_from(x).ok())
                .ok_or_else(|| wrong("32-bit integer"))?,
        ),
        TensorData::U8(d) => d.push(
            v.as_u64()
                .and_then(|x| u8::try_from(x).ok())
                .ok_or_else(|| wrong("0..255 integer"))?,
        ),
        TensorData::Bool(d) => d.push(v.as_bool().ok_or_else(|| wrong("boolean"))?),
        TensorData::String(d) => d.push(v.as_str().ok_or_else(|| wrong("string"))?.to_string()),
    }
    Ok(())
}

/// Writes a tensor as nested JSON arrays.
pub struct TensorJson<'a>(pub &'a Tensor);

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let shape = &self.0.shape;
        match &self.0.data {
            TensorData::F32(d) => Nested { shape, data: d }.serialize(s),
            TensorData::F64(d) => Nested { shape, data: d }.serialize(s),
            TensorData::F16(d) => {
                let widened: Vec<f32> = d.iter().map(|v| v.to_f32()).collect();
                Nested {
                    shape,
                    data: &widened,
                }
                .serialize(s)
            }
            TensorData::I64(d) => Nested { shape, data: d }.serialize(s),
            TensorData::I32(d) => Nested { shape, data: d }.serialize(s),
            TensorData::I8(d) => Nested { shape, data: d }.serialize(s),
            TensorData::U8(d) => Nested { shape, data: d }.serialize(s),
            TensorData::Bool(d) => Nested { shape, data: d }.serialize(s),
            TensorData::String(d) => Nested { shape, data: d }.serialize(s),
        }
    }
}

struct Nested<'a, T> {
    shape: &'a [usize],
    data: &'a [T],
}

impl<T: Serialize> Serialize for Nested<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.shape {
            [] => match self.data.first() {
                Some(v) => v.serialize(s),
                None => s.serialize_none(),
            },
            [n] => {
                let mut seq = s.serialize_seq(Some(*n))?;
                for v in self.data.iter().take(*n) {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            [n, rest @ ..] => {
                let stride: usize = rest.iter().product();
                let mut seq = s.serialize_seq(Some(*n))?;
                for i in 0..*n {
                    let start = (i * stride).min(self.data.len());
                    let end = (start + stride).min(self.data.len());
                    seq.serialize_element(&Nested {
                        shape: rest,
                        data: &self.data[start..end],
                    })?;
                }
                seq.end()
            }
        }
    }
}

/// Writes named tensors as a JSON object of nested arrays.
pub struct TensorMapJson<'a>(pub &'a cohort_engines::TensorMap);

impl Serialize for TensorMapJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, &TensorJson(v))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(dtype: DType) -> TensorSpec {
        TensorSpec::new("x", dtype, &[-1, -1])
    }

    #[test]
    fn nested_arrays_become_shaped_tensors() {
        let t = tensor_from_json(&spec(DType::F32), &json!([[1, 2.5, 3], [4, 5, 6]])).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, TensorData::F32(vec![1.0, 2.5, 3.0, 4.0, 5.0, 6.0]));
        let t = tensor_from_json(&spec(DType::String), &json!(["a", "b"])).unwrap();
        assert_eq!(t.shape, vec![2]);
    }

    /// Nested `levels` deep: the first element at each depth is a list of `width`, every
    /// other element is a bare 0. A body of a few KB whose first elements claim
    /// `width^levels` elements.
    fn claiming(levels: usize, width: usize) -> Value {
        let mut v = json!(0);
        for _ in 0..levels {
            let mut items = vec![v];
            items.resize(width, json!(0));
            v = Value::Array(items);
        }
        v
    }

    #[test]
    fn a_small_body_claiming_a_huge_shape_is_refused_without_allocating_it() {
        let spec = TensorSpec::new("x", DType::F32, &[-1, -1, -1]);
        // 10^12 elements claimed: reserving them would abort the process.
        let e = tensor_from_json(&spec, &claiming(3, 10_000)).unwrap_err();
        assert!(e.reason.contains("rectangular"), "{}", e.reason);
        // 256^8 = 2^64 overflows the element count.
        let spec = TensorSpec::new("x", DType::F32, &[-1; 8]);
        let e = tensor_from_json(&spec, &claiming(8, 256)).unwrap_err();
        assert!(e.reason.contains("address"), "{}", e.reason);
    }

    #[test]
    fn ragged_or_mistyped_input_is_an_error_naming_it() {
        let e = tensor_from_json(&spec(DType::F32), &json!([[1, 2], [3]])).unwrap_err();
        assert_eq!(e.input, "x");
        assert!(e.reason.contains("rectangular"), "{}", e.reason);
        let e = tensor_from_json(&spec(DType::F32), &json!([["a"]])).unwrap_err();
        assert!(e.reason.contains("number"), "{}", e.reason);
        let e = tensor_from_json(&spec(DType::I64), &json!([[1.5]])).unwrap_err();
        assert!(e.reason.contains("integer"), "{}", e.reason);
        let e = tensor_from_json(&spec(DType::U8), &json!([[300]])).unwrap_err();
        assert!(e.reason.contains("0..255"), "{}", e.reason);
        let e = tensor_from_json(&spec(DType::F32), &json!([[1e300]])).unwrap_err();
        assert!(e.reason.contains("finite"), "{}", e.reason);
        let deep = json!([[[[[[[[[[1]]]]]]]]]]);
        assert!(tensor_from_json(&spec(DType::F32), &deep).is_err());
    }

    #[test]
    fn outputs_print_nested_with_short_floats() {
        let t = Tensor::new(vec![2, 2], TensorData::F32(vec![0.1, 0.2, 0.3, 1e-8])).unwrap();
        let s = serde_json::to_string(&TensorJson(&t)).unwrap();
        assert_eq!(s, "[[0.1,0.2],[0.3,1e-8]]");
        let back = tensor_from_json(&spec(DType::F32), &serde_json::from_str(&s).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
