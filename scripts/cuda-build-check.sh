#!/usr/bin/env bash
# Builds the `cuda` feature and runs the whole test suite with it, on any Linux machine.
#
# What it needs and where it gets it:
# - nvcc (candle compiles its CUDA kernels at build time): from the CUDA toolkit when
#   `nvcc` is on PATH, else CUDA 13.0's compiler packages from PyPI, installed into a
#   virtual environment under target/ (about 250 MB).
# - the CUDA libraries the binaries link against (libcuda, cuBLAS, cuBLASLt, cuRAND,
#   NVRTC): the machine's own when the driver is installed (`ldconfig -p` lists
#   libcuda.so.1). Without a driver, stand-ins are generated: a shared library per
#   library with every function cudarc declares, each returning CUDA_ERROR_NO_DEVICE. The
#   binaries then link and run, and find no GPU (cuInit fails), which is what a `cuda`
#   build does on a machine without a GPU. Stand-ins are written only into the PyPI
#   toolkit's directory: with a system nvcc but no driver, the script stops. With stand-ins, nothing runs on a GPU: this
#   checks that the feature's code compiles, is clippy-clean and links, and that a cuda
#   build without a GPU serves on the CPU and passes every test.
#
# Usage: scripts/cuda-build-check.sh [extra `cargo test` arguments]
# The build goes to target/cuda, or CARGO_TARGET_DIR (a debug build of the workspace:
# about 20 minutes on two cores, half of it candle's kernels); the PyPI compiler to
# target/cuda-toolkit-venv, or CUDA_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"
# The multi-process tests run this build's binary.
export COHORT_BIN="${COHORT_BIN:-$CARGO_TARGET_DIR/debug/cohort}"

have_driver=false
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    have_driver=true
fi

if command -v nvcc >/dev/null 2>&1; then
    cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
    echo "== nvcc from $cuda_root"
    if ! $have_driver; then
        # Stand-ins are only ever written into the PyPI toolkit this script installs.
        echo "nvcc is here but no CUDA driver: the test binaries cannot link. Run this on a" >&2
        echo "machine with the driver, or without nvcc on PATH to use the PyPI compiler" >&2
        echo "and stand-in libraries." >&2
        exit 1
    fi
else
    venv="${CUDA_VENV:-$root/target/cuda-toolkit-venv}"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    echo "== CUDA 13.0 compiler from PyPI into $venv"
    # nvcc's companions (cicc, ptxas, headers) must have the same version as nvcc.
    "$venv/bin/pip" install --quiet \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    cuda_root=$("$venv/bin/python" -c \
        'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    chmod +x "$cuda_root"/bin/* "$cuda_root"/nvvm/bin/* 2>/dev/null || true
    if [ ! -e "$cuda_root/lib/libcudart.so" ]; then
        ln -s libcudart.so.13 "$cuda_root/lib/libcudart.so"
    fi
fi
export PATH="$cuda_root/bin:$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
# No GPU to ask: build the kernels for Hopper (H100/H200) unless told otherwise.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if $have_driver; then
    echo "== linking against the machine's CUDA driver"
else
    # Only reached with the PyPI toolkit. cudarc's build script searches
    # $CUDA_ROOT/lib/stubs among others.
    stubs="$cuda_root/lib/stubs"
    mkdir -p "$stubs"
    cudarc=$(cargo metadata --locked --format-version 1 --features cohort-engines/cuda |
        python3 -c 'import json, sys, os
d = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in d["packages"] if p["name"] == "cudarc"))')
    echo "== no CUDA driver here: stand-in libraries from $cudarc into $stubs"
    for pair in cuda:driver cublas:cublas cublasLt:cublaslt curand:curand nvrtc:nvrtc; do
        lib=${pair%%:*}
        module=${pair##*:}
        # 100 = CUDA_ERROR_NO_DEVICE.
        grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$cudarc/src/$module/sys/mod.rs" |
            awk '{print $4}' | sort -u |
            awk '{print "int " $1 "(void) { return 100; }"}' >"$stubs/$lib.c"
        cc -shared -fPIC -o "$stubs/lib$lib.so" -Wl,-soname,"lib$lib.so" "$stubs/$lib.c"
    done
    export LD_LIBRARY_PATH="$stubs:$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

echo "== cargo clippy --features cohort-engines/cuda"
cargo clippy --locked --workspace --all-targets --features cohort-engines/cuda -- -D warnings
echo "== cargo test --features cohort-engines/cuda"
scripts/test.sh --locked --features cohort-engines/cuda "$@"
