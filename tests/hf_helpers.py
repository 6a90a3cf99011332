"""The transformers reference for the HF parity tests, built in .venv-hf.

torch exists here only for Python 3.11, so transformers lives in a separate
venv (``bash setup.sh test`` creates it) and tests/hf_reference.py runs there.
Without it the parity tests skip, saying why.
"""

import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_PYTHON = ROOT / ".venv-hf" / "bin" / "python"
HOW = ("create it with `bash setup.sh test`, or by hand: /path/to/python3.11 -m venv .venv-hf && "
       ".venv-hf/bin/python -m pip install torch==2.13.0 transformers safetensors numpy gguf "
       "accelerate")


def reference(out: pathlib.Path, family: str | None,
              script: str = "hf_reference.py") -> tuple[pathlib.Path, dict]:
  """(folder, reference.npz as a dict) from ``script out [family]`` (tests/hf_reference.py
  or tests/hf_vit_reference.py), or a skip."""
  if not HF_PYTHON.exists():
    pytest.skip(f"HF parity reference needs {HF_PYTHON} (Python 3.11 with torch + "
                f"transformers), which is missing; {HOW}")
  probe = subprocess.run([str(HF_PYTHON), "-c", "import torch, transformers, safetensors"],
                         capture_output=True, text=True)
  if probe.returncode:
    why = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
    pytest.skip(f"{HF_PYTHON} cannot import torch/transformers ({why}); {HOW}")
  run = subprocess.run([str(HF_PYTHON), str(ROOT / "tests" / script), str(out),
                        *([family] if family else [])], capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, f"tests/{script} failed:\n{run.stderr[-3000:]}"
  return out, dict(np.load(out / "reference.npz"))


TINY_LLAMA_VOCAB = 300


def tiny_llama_config() -> dict:
  """config.json of the tiny Llama the CLI tests load (tests/test_hf_llama.py's)."""
  from test_hf_llama import _hf_config
  return _hf_config(vocab_size=TINY_LLAMA_VOCAB, max_position_embeddings=64)


def write_tiny_llama(folder: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
  """A random tiny Llama as transformers saves it (config.json + model.safetensors,
  tests/test_hf_llama.py's), with a byte-level BPE tokenizer trained on ``corpus``."""
  tokenizers = pytest.importorskip("tokenizers")
  from test_hf_llama import _hf_tensors, _write
  config = tiny_llama_config()
  folder = _write(folder, config, _hf_tensors(config))
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(corpus.read_text().splitlines(), vocab_size=TINY_LLAMA_VOCAB,
                          min_frequency=1, show_progress=False)
  tok.save(str(folder / "tokenizer.json"))
  return folder
