#!/usr/bin/env python3
"""Writes the ONNX models that Cohort's ONNX Runtime engine is tested and benchmarked with.

README
======

Needs Python 3 with the `onnx` and `numpy` packages (and `onnxruntime`, whose shared library
the engine loads, to run the models):

    pip install onnx onnxruntime numpy

Run:

    python3 scripts/make_onnx_models.py OUTDIR          # tiny_mlp, multi_dtype, reference.json
    python3 scripts/make_onnx_models.py OUTDIR --big    # also big_mlp.onnx (~100 MB)

It writes, into OUTDIR (created if missing):

- `tiny_mlp.onnx`: input `x` float32 [N, 64] -> Gemm 256 -> Relu -> Gemm 10 -> output `y`
  float32 [N, 10]. N is a dynamic (symbolic) dimension. The same shape as the candle demo MLP.
- `big_mlp.onnx` (only with `--big`): float32 [N, 1024] -> 4096 -> Relu -> 4096 -> Relu -> 1000,
  about 25M parameters stored as initializers (~100 MB). For throughput benchmarks.
- `multi_dtype.onnx`: one input per element type (f64, f16, i64, i32, i8, u8, bool), each
  [N, 3], with simple ops (Add, Cast, Not, Greater, Identity) and outputs of those types.
- `unbatched.onnx`: a model whose requests cannot share an engine call. Inputs `x` float32
  [1, 3] (a fixed first dimension, as in a static batch-1 export), `k` float32 [] (a scalar)
  and `z` float32 with no declared shape. Outputs `y` = x * k [1, 3], `total` = sum of x []
  (a scalar) and `z1` = z + 1 (no declared shape).
- `reference.json`: for fixed inputs, the expected outputs of every model written, computed
  with NumPy only (matmul + bias + relu, casts, ...): an implementation independent of ONNX
  Runtime. Layout:

      {"models": {"tiny_mlp": {"file": "tiny_mlp.onnx", "cases": [
          {"inputs":  {"x": {"dtype": "f32", "shape": [3, 64], "data": [...]}},
           "outputs": {"y": {"dtype": "f32", "shape": [3, 10], "data": [...]}}}, ...]}, ...}}

  dtypes are Cohort's names (f32, f64, f16, i64, i32, i8, u8, bool). f32 values are JSON
  numbers; f64 and f16 values, which tests compare exactly, are JSON strings holding the
  shortest decimal that converts back to the exact double (for f16: the exact value of each
  half-precision number), since some JSON parsers round numbers by one unit in the last place.

Everything is generated from fixed seeds: the same command writes the same files.
"""

import argparse
import json
import os
import sys

try:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:  # pragma: no cover - depends on the machine
    sys.stderr.write(
        f"make_onnx_models.py: {e}\n"
        "install the Python packages with: pip install onnx onnxruntime numpy\n"
    )
    sys.exit(2)

# ONNX Runtime 1.24+ reads IR 10 / opset 17 models; pin both so that a newer `onnx`
# package does not write a file the runtime refuses.
IR_VERSION = 10
OPSET = 17

DTYPE_NAMES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.float16): "f16",
    np.dtype(np.int64): "i64",
    np.dtype(np.int32): "i32",
    np.dtype(np.int8): "i8",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}


def tensor_json(a):
    shape = list(np.shape(a))  # before ascontiguousarray, which makes a scalar 1-d
    a = np.ascontiguousarray(a)
    name = DTYPE_NAMES[a.dtype]
    flat = a.reshape(-1)
    if name == "f32":
        data = [float(v) for v in flat]
    elif name in ("f64", "f16"):
        # Compared exactly, so written as strings: repr() round-trips a double, and every
        # reader's string-to-double conversion is exact, unlike some JSON number parsers.
        data = [repr(float(v)) for v in flat]
    elif name == "bool":
        data = [bool(v) for v in flat]
    else:
        data = [int(v) for v in flat]
    return {"dtype": name, "shape": shape, "data": data}


def make_model(graph):
    """A model around `graph`, with the opset and IR version every test model uses."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="cohort-make_onnx_models",
    )
    model.ir_version = IR_VERSION
    return model


def save(model, path, check=True):
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, path)


def mlp_model(name, dims, seed):
    """A Gemm/Relu MLP with input `x` [N, dims[0]] and output `y` [N, dims[-1]].

    Returns the model and its weights as (W [in, out], b [out]) float32 pairs.
    """
    rng = np.random.default_rng(seed)
    layers = []
    nodes = []
    inits = []
    prev = "x"
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        scale = 1.0 / np.sqrt(d_in)
        w = rng.uniform(-scale, scale, size=(d_in, d_out)).astype(np.float32)
        b = rng.uniform(-scale, scale, size=(d_out,)).astype(np.float32)
        layers.append((w, b))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        last = i == len(dims) - 2
        out = "y" if last else f"h{i}"
        gemm_out = out if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])],
        initializer=inits,
    )
    model = make_model(graph)
    return model, layers


def mlp_reference(layers, x):
    """The MLP in NumPy, in float64: matmul + bias, ReLU between layers."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if i != len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


def mlp_cases(layers, in_dim, seed):
    rng = np.random.default_rng(seed)
    cases = []
    for rows in (1, 3, 5):
        x = rng.standard_normal((rows, in_dim)).astype(np.float32)
        cases.append(
            {
                "inputs": {"x": tensor_json(x)},
                "outputs": {"y": tensor_json(mlp_reference(layers, x))},
            }
        )
    return cases


def multi_dtype_model():
    n = "N"
    vi = helper.make_tensor_value_info
    inputs = [
        vi("a_f64", TensorProto.DOUBLE, [n, 3]),
        vi("b_f16", TensorProto.FLOAT16, [n, 3]),
        vi("c_i64", TensorProto.INT64, [n, 3]),
        vi("d_i32", TensorProto.INT32, [n, 3]),
        vi("e_i8", TensorProto.INT8, [n, 3]),
        vi("f_u8", TensorProto.UINT8, [n, 3]),
        vi("g_bool", TensorProto.BOOL, [n, 3]),
    ]
    outputs = [
        vi("out_f64", TensorProto.DOUBLE, [n, 3]),
        vi("out_f16", TensorProto.FLOAT16, [n, 3]),
        vi("out_f16_id", TensorProto.FLOAT16, [n, 3]),
        vi("out_i64", TensorProto.INT64, [n, 3]),
        vi("out_i32", TensorProto.INT32, [n, 3]),
        vi("out_i8", TensorProto.INT8, [n, 3]),
        vi("out_u8", TensorProto.UINT8, [n, 3]),
        vi("out_bool", TensorProto.BOOL, [n, 3]),
        vi("out_gt", TensorProto.BOOL, [n, 3]),
        vi("out_mixed_f32", TensorProto.FLOAT, [n, 3]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one_f32"),
        numpy_helper.from_array(np.array([0.5, -1.25, 2.0], dtype=np.float64), "k_f64"),
        numpy_helper.from_array(np.array([10, -20, 30], dtype=np.int64), "k_i64"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float64), "zero_f64"),
    ]
    F = TensorProto.FLOAT
    mk = helper.make_node
    nodes = [
        # f64: a + [0.5, -1.25, 2.0]
        mk("Add", ["a_f64", "k_f64"], ["out_f64"]),
        # f16: f16(f32(b) + 1)
        mk("Cast", ["b_f16"], ["b_f32"], to=F),
        mk("Add", ["b_f32", "one_f32"], ["b_plus"]),
        mk("Cast", ["b_plus"], ["out_f16"], to=TensorProto.FLOAT16),
        mk("Identity", ["b_f16"], ["out_f16_id"]),
        # i64: c + [10, -20, 30]
        mk("Add", ["c_i64", "k_i64"], ["out_i64"]),
        # i32: d + d
        mk("Add", ["d_i32", "d_i32"], ["out_i32"]),
        mk("Identity", ["e_i8"], ["out_i8"]),
        mk("Identity", ["f_u8"], ["out_u8"]),
        mk("Not", ["g_bool"], ["out_bool"]),
        mk("Greater", ["a_f64", "zero_f64"], ["out_gt"]),
        # f32(e) + f32(f) + f32(d)
        mk("Cast", ["e_i8"], ["e_f32"], to=F),
        mk("Cast", ["f_u8"], ["f_f32"], to=F),
        mk("Cast", ["d_i32"], ["d_f32"], to=F),
        mk("Add", ["e_f32", "f_f32"], ["ef"]),
        mk("Add", ["ef", "d_f32"], ["out_mixed_f32"]),
    ]
    graph = helper.make_graph(nodes, "multi_dtype", inputs, outputs, initializer=inits)
    model = make_model(graph)
    return model


def multi_dtype_reference(inp):
    a, b, c, d, e, f, g = (
        inp["a_f64"],
        inp["b_f16"],
        inp["c_i64"],
        inp["d_i32"],
        inp["e_i8"],
        inp["f_u8"],
        inp["g_bool"],
    )
    return {
        "out_f64": a + np.array([0.5, -1.25, 2.0], dtype=np.float64),
        "out_f16": (b.astype(np.float32) + np.float32(1.0)).astype(np.float16),
        "out_f16_id": b.copy(),
        "out_i64": c + np.array([10, -20, 30], dtype=np.int64),
        "out_i32": d + d,
        "out_i8": e.copy(),
        "out_u8": f.copy(),
        "out_bool": np.logical_not(g),
        "out_gt": a > 0.0,
        "out_mixed_f32": e.astype(np.float32) + f.astype(np.float32) + d.astype(np.float32),
    }


def multi_dtype_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for rows in (1, 2, 4):
        inp = {
            "a_f64": rng.standard_normal((rows, 3)) * 10.0,
            "b_f16": (rng.standard_normal((rows, 3)) * 4.0).astype(np.float16),
            "c_i64": rng.integers(-(10**12), 10**12, size=(rows, 3), dtype=np.int64),
            "d_i32": rng.integers(-(10**6), 10**6, size=(rows, 3), dtype=np.int32),
            "e_i8": rng.integers(-128, 128, size=(rows, 3), dtype=np.int8),
            "f_u8": rng.integers(0, 256, size=(rows, 3), dtype=np.uint8),
            "g_bool": rng.integers(0, 2, size=(rows, 3)).astype(np.bool_),
        }
        out = multi_dtype_reference(inp)
        cases.append(
            {
                "inputs": {k: tensor_json(v) for k, v in inp.items()},
                "outputs": {k: tensor_json(v) for k, v in out.items()},
            }
        )
    return cases


def unbatched_model():
    vi = helper.make_tensor_value_info
    F = TensorProto.FLOAT
    inputs = [vi("x", F, [1, 3]), vi("k", F, []), vi("z", F, None)]
    outputs = [vi("y", F, [1, 3]), vi("total", F, []), vi("z1", F, None)]
    inits = [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")]
    mk = helper.make_node
    nodes = [
        mk("Mul", ["x", "k"], ["y"]),
        mk("ReduceSum", ["x"], ["total"], keepdims=0),
        mk("Add", ["z", "one"], ["z1"]),
    ]
    graph = helper.make_graph(nodes, "unbatched", inputs, outputs, initializer=inits)
    model = make_model(graph)
    return model


def unbatched_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    # z takes any shape: the model declares none.
    for z_shape in ((2, 2), (3,), (1, 2, 2), (5,)):
        x = rng.standard_normal((1, 3)).astype(np.float32)
        k = np.array(rng.standard_normal(), dtype=np.float32)
        z = rng.standard_normal(z_shape).astype(np.float32)
        out = {
            "y": x * k,
            "total": np.array(x.astype(np.float64).sum(), dtype=np.float32),
            "z1": z + np.float32(1.0),
        }
        cases.append(
            {
                "inputs": {"x": tensor_json(x), "k": tensor_json(k), "z": tensor_json(z)},
                "outputs": {n: tensor_json(v) for n, v in out.items()},
            }
        )
    return cases


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", help="directory to write the models and reference.json into")
    p.add_argument("--big", action="store_true", help="also write big_mlp.onnx (~100 MB)")
    args = p.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    models = {}

    tiny, tiny_layers = mlp_model("tiny_mlp", [64, 256, 10], seed=0xC0407)
    save(tiny, os.path.join(args.outdir, "tiny_mlp.onnx"))
    models["tiny_mlp"] = {
        "file": "tiny_mlp.onnx",
        "cases": mlp_cases(tiny_layers, 64, seed=11),
    }

    if args.big:
        big, big_layers = mlp_model("big_mlp", [1024, 4096, 4096, 1000], seed=0xB16)
        save(big, os.path.join(args.outdir, "big_mlp.onnx"))
        models["big_mlp"] = {
            "file": "big_mlp.onnx",
            "cases": mlp_cases(big_layers, 1024, seed=12)[:2],
        }

    save(multi_dtype_model(), os.path.join(args.outdir, "multi_dtype.onnx"))
    models["multi_dtype"] = {"file": "multi_dtype.onnx", "cases": multi_dtype_cases(seed=13)}

    # Not checked: ONNX's checker asks every graph input and output for a shape, but models
    # exported without one exist, and ONNX Runtime runs them.
    save(unbatched_model(), os.path.join(args.outdir, "unbatched.onnx"), check=False)
    models["unbatched"] = {"file": "unbatched.onnx", "cases": unbatched_cases(seed=14)}

    with open(os.path.join(args.outdir, "reference.json"), "w") as fh:
        json.dump({"models": models}, fh)
    print(f"wrote {', '.join(m['file'] for m in models.values())} and reference.json to {args.outdir}")


if __name__ == "__main__":
    main()
