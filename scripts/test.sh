#!/usr/bin/env bash
# Runs Cohort's whole test suite on a fresh machine: installs the Python packages the tests
# need (ONNX test models are generated with `onnx`, ONNX Runtime's shared library comes from
# the `onnxruntime` wheel), then runs every Rust test.
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# pip puts console scripts (schemathesis, run by node/tests/fuzz.rs) in the user base's bin
# directory when it installs with --user (its default when site-packages is not writable):
# put it on PATH, before the check, so that an earlier user install is found.
user_base="$(python3 -m site --user-base 2>/dev/null || true)"
user_bin="${user_base:+$user_base/bin}"
if [ -n "$user_bin" ] && [ -d "$user_bin" ]; then
    export PATH="$user_bin:$PATH"
fi

if ! python3 -c 'import numpy, onnx, onnxruntime, tritonclient.http, openai, schemathesis' >/dev/null 2>&1 \
    || ! command -v schemathesis >/dev/null 2>&1; then
    echo "== installing the Python test dependencies"
    python3 -m pip install --quiet -r scripts/requirements-test.txt \
        || python3 -m pip install --quiet --break-system-packages -r scripts/requirements-test.txt
    # The user base's bin directory may exist only now.
    if [ -n "$user_bin" ] && [ -d "$user_bin" ]; then
        case ":$PATH:" in
            *":$user_bin:"*) ;;
            *) export PATH="$user_bin:$PATH" ;;
        esac
    fi
fi

# Install pip packages does not put ORT on the library path: the engine finds it through
# python3 (see docs/operations.md), so nothing else is needed here.
echo "== cargo test --workspace"
cargo test --workspace "$@"
