"""Hugging Face GPT-2 checkpoints -> ``astra_jax.models.gpt2``.

``load_gpt2(folder)`` reads a transformers GPT-2 folder (``config.json`` plus
``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
with numpy only, through ``safetensors.numpy``; torch is not needed.

HF's GPT-2 stores its linear layers as ``Conv1D`` with weight [in, out], the
layout of an ``nnx.Linear`` kernel, so tensors map one to one:

  wte.weight / wpe.weight          -> wte / wpe .embedding
  h.N.ln_1|ln_2.{weight,bias}      -> h.N.ln_1|ln_2.{scale,bias}
  h.N.attn.c_attn|c_proj.{w,b}     -> h.N.c_attn|c_proj.{kernel,bias}
  h.N.mlp.c_fc|c_proj.{w,b}        -> h.N.c_fc|mlp_proj.{kernel,bias}
  ln_f.{weight,bias}               -> ln_f.{scale,bias}

Keys may carry GPT2LMHeadModel's ``transformer.`` prefix or not.  The causal
mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored, and so is
``lm_head.weight`` when it equals ``wte`` (our head is tied to it).
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.exchange import Exchange, ExactExchange
from astra_jax.models import gpt2

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LEAF = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
_MODULE = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj",
           "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


class HFImportError(ValueError):
  """A Hugging Face folder that cannot become an astra-jax GPT-2 (the message says why)."""


def load_gpt2(folder: str | os.PathLike,
              exchange: Exchange = ExactExchange()) -> tuple[gpt2.GPT2Config, gpt2.GPT2]:
  """(GPT2Config, GPT2 model) holding the checkpoint's weights (float32)."""
  folder = os.fspath(folder)
  hf = _read_config(folder)
  cfg = config_from_hf(hf, exchange)
  tensors = _read_tensors(folder)
  model = gpt2.GPT2(cfg, rngs=nnx.Rngs(0))
  _set_params(model, tensors, folder, tied=hf.get("tie_word_embeddings", True) is not False)
  return cfg, model


def config_from_hf(hf: dict, exchange: Exchange = ExactExchange()) -> gpt2.GPT2Config:
  """Our GPT2Config for a parsed HF ``config.json`` (a named variant when sizes match)."""
  model_type = hf.get("model_type")
  if model_type != "gpt2":
    raise HFImportError(
        f"config.json describes a {model_type or 'model without model_type'!r} model "
        f"(architectures {hf.get('architectures')}), not GPT-2; astra_jax.hf.load_gpt2 "
        "imports only transformers' GPT-2 checkpoints (model_type 'gpt2')")
  act = hf.get("activation_function", "gelu_new")
  if act not in _TANH_GELUS:
    raise HFImportError(
        f"config.json has activation_function {act!r}; astra-jax's GPT-2 uses the tanh GELU "
        f"({' or '.join(_TANH_GELUS)}), so this checkpoint would compute something else")
  try:
    width, layers, heads = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
    vocab = int(hf["vocab_size"])
    context = int(hf.get("n_positions", hf.get("n_ctx")))
  except (KeyError, TypeError) as e:
    raise HFImportError(f"config.json lacks GPT-2 field {e}; re-save it with transformers' "
                        "GPT2Config.save_pretrained") from None
  unsupported = {
      "n_inner": hf.get("n_inner") not in (None, 4 * width),
      "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
      "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
      "add_cross_attention": bool(hf.get("add_cross_attention")),
  }
  bad = [f"{k}={hf.get(k)!r}" for k, v in unsupported.items() if v]
  if bad:
    raise HFImportError(f"config.json sets {', '.join(bad)}, which astra-jax's GPT-2 does not "
                        "implement (it needs n_inner = 4*n_embd, 1/sqrt(d) attention scaling, "
                        "no cross-attention)")
  if width % heads:
    raise HFImportError(f"config.json has n_embd {width} not divisible by n_head {heads}")
  sizes = (width, layers, heads)
  variant = next((name for name, s in gpt2.VARIANTS.items() if s == sizes), None)
  custom = {} if variant else {"width": width, "layers": layers, "heads": heads}
  return gpt2.GPT2Config(variant=variant or "custom", vocab_size=vocab, context=context,
                         exchange=exchange,
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), **custom)


def _read_config(folder: str) -> dict:
  if not os.path.isdir(folder):
    raise HFImportError(f"{folder} is not a folder; pass the directory that transformers' "
                        "save_pretrained wrote (config.json + model.safetensors)")
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise HFImportError(f"{folder} has no config.json; pass the directory that transformers' "
                        "save_pretrained wrote (config.json + model.safetensors)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFImportError(f"{path} is not valid JSON ({e}); re-save the model with "
                        "transformers' save_pretrained") from None


def _read_tensors(folder: str) -> dict[str, np.ndarray]:
  single, index = os.path.join(folder, _SINGLE), os.path.join(folder, _INDEX)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map") or {}
    files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
      raise HFImportError(f"{index} lists shards that are not in {folder}: "
                          f"{[os.path.basename(f) for f in missing] or 'none at all'}; "
                          "copy every model-*-of-*.safetensors file next to it")
  else:
    others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".h5", ".msgpack")))
    hint = (f" (found {others}: convert with transformers, `GPT2LMHeadModel.from_pretrained("
            f"folder).save_pretrained(folder)`, which writes safetensors)") if others else ""
    raise HFImportError(f"{folder} has neither {_SINGLE} nor {_INDEX}{hint}; "
                        "astra_jax.hf reads safetensors checkpoints only")
  from safetensors.numpy import load_file  # optional dependency: only this importer needs it

  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except Exception as e:  # bfloat16 has no numpy dtype; corrupt files
      raise HFImportError(
          f"cannot read {path} with safetensors.numpy ({type(e).__name__}: {e}); if it is "
          "bfloat16, re-save it in float32 or float16 (model.float().save_pretrained(...))"
      ) from None
  return tensors


def _hf_name(path: tuple) -> str:
  *module, leaf = path
  if module[0] == "h":
    _, layer, name = module
    return f"h.{layer}.{_MODULE[name]}.{_LEAF[leaf]}"
  return f"{module[0]}.{_LEAF[leaf]}"


def _set_params(model: gpt2.GPT2, tensors: dict[str, np.ndarray], folder: str, *,
                tied: bool = True) -> None:
  if tensors and all(k.startswith("transformer.") or k == "lm_head.weight" for k in tensors):
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  lm_head = tensors.pop("lm_head.weight", None)
  tensors = {k: v for k, v in tensors.items() if not _BUFFERS.fullmatch(k)}

  params = nnx.state(model, nnx.Param)
  flat = list(nnx.to_flat_state(params))
  wanted = {_hf_name(path): var for path, var in flat}
  missing = sorted(set(wanted) - set(tensors))
  extra = sorted(set(tensors) - set(wanted))
  if missing:
    raise HFImportError(f"{folder} lacks {len(missing)} GPT-2 tensor(s) that config.json "
                        f"implies: {missing[:8]}{' ...' if len(missing) > 8 else ''}; the "
                        "checkpoint is incomplete or config.json does not belong to it")
  if extra:
    raise HFImportError(f"{folder} holds {len(extra)} tensor(s) astra-jax's GPT-2 has no place "
                        f"for: {extra[:8]}{' ...' if len(extra) > 8 else ''}; check n_layer in "
                        "config.json, or the checkpoint is not a plain GPT-2")
  for name, var in wanted.items():
    value, want = tensors[name], var.get_value()
    if value.shape != want.shape:
      raise HFImportError(f"tensor {name} in {folder} has shape {list(value.shape)}, but "
                          f"config.json implies {list(want.shape)}; config.json and the "
                          "weights disagree")
    var.set_value(jnp.asarray(value, want.dtype))
  if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
    raise HFImportError(f"{folder} has an lm_head.weight that differs from wte.weight; "
                        "astra-jax's GPT-2 ties its output head to the token embedding, so "
                        "an untied head cannot be imported")
  if lm_head is None and not tied:
    raise HFImportError(f"config.json in {folder} sets tie_word_embeddings false but there is "
                        "no lm_head.weight; astra-jax's GPT-2 needs a head tied to wte")
  nnx.update(model, params)
