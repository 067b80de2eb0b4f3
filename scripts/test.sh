#!/usr/bin/env bash
# Runs Cohort's whole test suite on a fresh machine: installs the Python packages the tests
# need (ONNX test models are generated with `onnx`, ONNX Runtime's shared library comes from
# the `onnxruntime` wheel), then runs every Rust test.
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import numpy, onnx, onnxruntime, tritonclient.http, openai' >/dev/null 2>&1; then
    echo "== installing the Python test dependencies"
    python3 -m pip install --quiet -r scripts/requirements-test.txt \
        || python3 -m pip install --quiet --break-system-packages -r scripts/requirements-test.txt
fi

# Install pip packages does not put ORT on the library path: the engine finds it through
# python3 (see docs/operations.md), so nothing else is needed here.
echo "== cargo test --workspace"
cargo test --workspace "$@"
