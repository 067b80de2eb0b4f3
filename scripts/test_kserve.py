#!/usr/bin/env python3
"""Checks Cohort's KServe v2 endpoints with NVIDIA Triton's own HTTP client.

Usage: python3 scripts/test_kserve.py http://127.0.0.1:8080

Needs `tritonclient[http]` and numpy (pip install -r scripts/requirements-test.txt).
Against a running node with the built-in models (`mlp`, `echo`): server live/ready, the
metadata of `mlp`, infer with binary tensors (the client's default) and with JSON tensors,
compared with the native endpoint's answer, `echo` with a 2-D FP32 input, the repository
index, and unload + load of `echo`. Exits non-zero on any mismatch.
"""

import json
import sys
import urllib.request

try:
    import numpy as np
    import tritonclient.http as httpclient
except ImportError as e:  # pragma: no cover - environment problem
    print(
        f"missing Python package ({e}): run `pip install -r scripts/requirements-test.txt`",
        file=sys.stderr,
    )
    sys.exit(2)

FAILURES = []


def check(cond, what):
    if cond:
        print(f"ok   {what}")
    else:
        print(f"FAIL {what}")
        FAILURES.append(what)


def native_infer(url, model, x):
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    req = urllib.request.Request(
        f"{url}/api/v1/models/{model}/infer",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as res:
        return np.array(json.load(res)["outputs"]["y"], dtype=np.float32)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    url = sys.argv[1].rstrip("/")
    host = url.split("://", 1)[-1]
    client = httpclient.InferenceServerClient(url=host)

    check(client.is_server_live(), "server is live")
    check(client.is_server_ready(), "server is ready")
    server = client.get_server_metadata()
    check(server.get("name") == "cohort", f"server metadata {server}")

    meta = client.get_model_metadata("mlp")
    check(meta["name"] == "mlp", "mlp metadata name")
    check(
        meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        f"mlp inputs {meta['inputs']}",
    )
    check(
        meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
        f"mlp outputs {meta['outputs']}",
    )
    check(client.is_model_ready("mlp"), "mlp is ready")

    x = np.sin(np.arange(64, dtype=np.float32) * 0.173).astype(np.float32).reshape(1, 64)
    want = native_infer(url, "mlp", x)
    for binary in (True, False):
        inp = httpclient.InferInput("x", [1, 64], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("y", binary_data=binary)
        res = client.infer("mlp", [inp], outputs=[out], request_id=f"req-{binary}")
        y = res.as_numpy("y")
        check(
            y is not None and y.shape == (1, 10) and np.allclose(y, want, atol=1e-6),
            f"mlp binary_data={binary} equals the native endpoint",
        )
        check(
            res.get_response().get("id") == f"req-{binary}",
            f"mlp binary_data={binary} echoes the id",
        )
    # No outputs named: the client asks for binary outputs of everything.
    inp = httpclient.InferInput("x", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("mlp", [inp])
    y = res.as_numpy("y")
    check(y is not None and np.allclose(y, want, atol=1e-6), "mlp with default outputs")

    x2 = np.array([[1.0, 2.0, 3.0], [4.0, -5.5, 6.25]], dtype=np.float32)
    for binary in (True, False):
        inp = httpclient.InferInput("x", list(x2.shape), "FP32")
        inp.set_data_from_numpy(x2, binary_data=binary)
        res = client.infer(
            "echo", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)]
        )
        y = res.as_numpy("y")
        check(
            y is not None and y.shape == (2, 3) and np.array_equal(y, x2),
            f"echo 2-D binary_data={binary}",
        )

    index = client.get_model_repository_index()
    states = {m["name"]: m.get("state") for m in index}
    check(
        states.get("mlp") == "READY" and states.get("echo") == "READY",
        f"repository index {index}",
    )

    client.unload_model("echo")
    check(not client.is_model_ready("echo"), "echo not ready after unload")
    states = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    check(states.get("echo") == "UNAVAILABLE", f"echo UNAVAILABLE in the index: {states}")
    client.load_model("echo")
    check(client.is_model_ready("echo"), "echo ready after load")
    inp = httpclient.InferInput("x", list(x2.shape), "FP32")
    inp.set_data_from_numpy(x2)
    y = client.infer("echo", [inp]).as_numpy("y")
    check(y is not None and np.array_equal(y, x2), "echo answers after load")

    try:
        client.get_model_metadata("no-such-model")
        check(False, "unknown model is an error")
    except httpclient.InferenceServerException as e:
        check("no-such-model" in str(e), f"unknown model is an error: {e}")

    client.close()
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", file=sys.stderr)
        return 1
    print("all KServe checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
