"""Hugging Face checkpoints -> ``astra_jax.models.gpt2`` / ``astra_jax.models.llama``.

``load_gpt2(folder)`` and ``load_llama(folder)`` read a transformers folder
(``config.json`` plus ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) with the ``safetensors`` library's numpy
loader, tensor by tensor as they are used (bfloat16 through ml_dtypes);
torch is not needed.

GPT-2: HF stores its linear layers as ``Conv1D`` with weight [in, out], the
layout of an ``nnx.Linear`` kernel, so tensors map one to one:

  wte.weight / wpe.weight          -> wte / wpe .embedding
  h.N.ln_1|ln_2.{weight,bias}      -> h.N.ln_1|ln_2.{scale,bias}
  h.N.attn.c_attn|c_proj.{w,b}     -> h.N.c_attn|c_proj.{kernel,bias}
  h.N.mlp.c_fc|c_proj.{w,b}        -> h.N.c_fc|mlp_proj.{kernel,bias}
  ln_f.{weight,bias}               -> ln_f.{scale,bias}

Keys may carry GPT2LMHeadModel's ``transformer.`` prefix or not.  The causal
mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored, and so is
``lm_head.weight`` when it equals ``wte`` (our head is tied to it).

Llama (``LlamaForCausalLM``): ``nn.Linear`` weights are [out, in] and are
transposed into our [in, out] kernels:

  model.embed_tokens.weight                      -> embed_tokens.embedding
  model.layers.N.self_attn.{q,k,v,o}_proj.weight -> layers.N.{q,k,v,o}_proj.kernel (T)
  model.layers.N.mlp.{gate,up,down}_proj.weight  -> layers.N.{gate,up,down}_proj.kernel (T)
  model.layers.N.{input,post_attention}_layernorm.weight -> layers.N.<same>.scale
  model.norm.weight                              -> norm.scale
  lm_head.weight                                 -> lm_head.kernel (T), or tied

HF's q/k projections are already permuted to its ``rotate_half`` RoPE layout
(dimension i pairs with i + head_dim/2), which ``llama.Rope`` uses too.
``llama_from_tensors(config, tensors, source)`` is the part after reading the
folder: ``astra_jax.io.gguf`` hands it a GGUF file's tensors under these names.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.models import gpt2, llama

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LEAF = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
_MODULE = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj",
           "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


_LLAMA_MODULE = {name: f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
_LLAMA_MODULE.update({name: f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")})
_LLAMA_MODULE.update(input_layernorm="input_layernorm",
                     post_attention_layernorm="post_attention_layernorm")
_LLAMA_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFImportError(ValueError):
  """A Hugging Face folder that cannot become an astra-jax model (the message says why)."""


def load_gpt2(folder: str | os.PathLike,
              exchange: Exchange = ExactExchange()) -> tuple[gpt2.GPT2Config, gpt2.GPT2]:
  """(GPT2Config, GPT2 model) holding the checkpoint's weights (float32)."""
  folder = os.fspath(folder)
  hf = read_config(folder)
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
        f"(architectures {hf.get('architectures')}), not GPT-2; astra_jax.io.hf.load_gpt2 "
        "imports only transformers' GPT-2 checkpoints (model_type 'gpt2'); "
        "for Llama folders use astra_jax.io.hf.load_llama")
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


def load_llama(folder: str | os.PathLike, exchange: Exchange = ExactExchange(), *,
               dtype: str = "float32",
               quantize_int8: bool = False) -> tuple[llama.LlamaConfig, llama.Llama]:
  """(LlamaConfig, Llama model) holding the checkpoint's weights.

  ``dtype`` is the model's compute and parameter dtype ("float32" or
  "bfloat16"; bf16 checkpoints are read as stored and cast).
  ``quantize_int8`` stores the Linear kernels int8 weight-only, quantized
  tensor by tensor as they are read, so no float copy of the model is made.
  """
  folder = os.fspath(folder)
  hf = read_config(folder)
  llama_config_from_hf(hf, exchange)  # a config that cannot be a Llama fails before any file
  return llama_from_tensors(hf, _read_tensors(folder), folder, exchange, dtype=dtype,
                            quantize_int8=quantize_int8)


def llama_from_tensors(hf: dict, tensors: dict, source: str,
                       exchange: Exchange = ExactExchange(), *, dtype: str = "float32",
                       quantize_int8: bool = False) -> tuple[llama.LlamaConfig, llama.Llama]:
  """(LlamaConfig, Llama model) from a parsed HF ``config.json`` and its tensors
  under transformers' names, as ``LlamaForCausalLM`` holds them ([out, in] Linear
  weights); ``source`` names where they came from in error messages.

  The shared back half of ``load_llama`` and ``astra_jax.io.gguf.load_llama_gguf``.
  A tensor may be anything ``np.array`` reads and that has a ``shape`` (a lazily
  read or dequantized one is read once, when its weight is set).
  """
  cfg = llama_config_from_hf(hf, exchange, dtype=dtype, quantize_int8=quantize_int8)
  if tensors and not any(k.startswith("model.") for k in tensors):  # saved from LlamaModel
    tensors = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in tensors.items()}
  tensors = {k: v for k, v in tensors.items() if not _LLAMA_BUFFERS.fullmatch(k)}
  embed = "model.embed_tokens.weight"
  if cfg.tie_embeddings:
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and embed in tensors and not np.array_equal(lm_head, tensors[embed]):
      raise HFImportError(f"config.json in {source} sets tie_word_embeddings but lm_head.weight "
                          "differs from model.embed_tokens.weight; set tie_word_embeddings "
                          "false in config.json if the head is its own matrix")
  shapes = llama.weight_shapes(cfg)
  names = {path: _llama_name(path) for path in shapes}
  _check_tensors(tensors, {names[p]: _hf_shape(p, s) for p, s in shapes.items()}, source,
                 "Llama", "num_hidden_layers")

  def weight(path):  # a fresh array, never a view of a file; nn.Linear [out, in] -> [in, out]
    value = np.array(tensors[names[path]])
    return value.T if path[-1] == "kernel" else value

  return cfg, llama.assemble(cfg, weight)


def llama_config_from_hf(hf: dict, exchange: Exchange = ExactExchange(), *,
                         dtype: str = "float32",
                         quantize_int8: bool = False) -> llama.LlamaConfig:
  """Our LlamaConfig for a parsed HF ``config.json`` (a named variant when sizes match)."""
  model_type = hf.get("model_type")
  if model_type != "llama":
    hint = "; for GPT-2 folders use astra_jax.io.hf.load_gpt2" if model_type == "gpt2" else ""
    raise HFImportError(
        f"config.json describes a {model_type or 'model without model_type'!r} model "
        f"(architectures {hf.get('architectures')}), not Llama; astra_jax.io.hf.load_llama "
        f"imports only transformers' Llama checkpoints (model_type 'llama'){hint}")
  try:
    width, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    heads, mlp = int(hf["num_attention_heads"]), int(hf["intermediate_size"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or width // heads)
    vocab, context = int(hf["vocab_size"]), int(hf["max_position_embeddings"])
  except (KeyError, TypeError, ValueError) as e:
    raise HFImportError(f"config.json lacks Llama field {e}; re-save it with transformers' "
                        "LlamaConfig.save_pretrained") from None
  unsupported = {
      "hidden_act": hf.get("hidden_act", "silu") != "silu",
      "attention_bias": bool(hf.get("attention_bias")),
      "mlp_bias": bool(hf.get("mlp_bias")),
  }
  bad = [f"{k}={hf.get(k)!r}" for k, v in unsupported.items() if v]
  if bad:
    raise HFImportError(f"config.json sets {', '.join(bad)}, which astra-jax's Llama does not "
                        "implement (it needs hidden_act 'silu' and no attention or MLP biases)")
  theta, scaling = _rope_from_hf(hf, context)
  sizes = (width, layers, heads, kv_heads, mlp)
  variant = next((name for name, s in llama.VARIANTS.items()
                  if s == sizes and head_dim == width // heads), None)
  custom = {} if variant else dict(width=width, layers=layers, heads=heads, kv_heads=kv_heads,
                                   mlp_dim=mlp, head_dim=head_dim)
  try:
    return llama.LlamaConfig(
        variant=variant or "custom", vocab_size=vocab, context=context, exchange=exchange,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
        param_dtype=dtype, quantize_int8=quantize_int8, **custom)
  except ValueError as e:
    raise HFImportError(f"config.json describes a Llama astra-jax cannot build: {e}") from None


def _rope_from_hf(hf: dict, context: int) -> tuple[float, llama.RopeScaling | None]:
  """(theta, scaling) from ``rope_parameters`` (transformers >= 5) or the older
  top-level ``rope_theta`` + ``rope_scaling``."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise HFImportError(f"config.json has per-layer RoPE parameters {params!r}; astra-jax's "
                        "Llama uses one RoPE for every layer")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
    raise HFImportError("config.json sets partial_rotary_factor; astra-jax's Llama rotates "
                        "the whole head dimension")
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise HFImportError(f"config.json asks for RoPE type {kind!r}; astra-jax's Llama implements "
                        "plain RoPE ('default') and Llama 3's frequency scaling ('llama3')")
  try:
    return theta, llama.RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", context)))
  except KeyError as e:
    raise HFImportError(f"config.json's llama3 RoPE parameters lack {e}") from None
  except ValueError as e:
    raise HFImportError(f"config.json's llama3 RoPE parameters are invalid: {e}") from None


def _llama_name(path: tuple) -> str:
  if path[0] == "layers":
    _, layer, module, _ = path
    return f"model.layers.{layer}.{_LLAMA_MODULE[module]}.weight"
  if path[0] == "lm_head":
    return "lm_head.weight"
  return f"model.{path[0]}.weight"  # embed_tokens, norm


def _hf_shape(path: tuple, shape: tuple) -> tuple:
  """Our kernels are [in, out]; HF's nn.Linear weights [out, in]."""
  return tuple(reversed(shape)) if path[-1] == "kernel" else shape


def read_config(folder: str) -> dict:
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
    hint = (f" (found {others}: convert with transformers, `AutoModelForCausalLM."
            f"from_pretrained(folder).save_pretrained(folder)`, which writes safetensors)"
            ) if others else ""
    raise HFImportError(f"{folder} has neither {_SINGLE} nor {_INDEX}{hint}; "
                        "astra_jax.io.hf reads safetensors checkpoints only")
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    tensors.update(read_safetensors(path))
  return tensors


class StoredTensor:
  """One tensor of a ``.safetensors`` file, read only when used.

  ``shape`` and ``dtype`` come from the header; ``np.asarray(t)`` (or
  ``np.array``) reads the bytes through the ``safetensors`` library into a
  fresh numpy array (bfloat16 as ``ml_dtypes.bfloat16``), so a model never
  aliases the file and a big checkpoint is read one tensor at a time.
  """

  def __init__(self, handle, name: str, path: str):
    self._handle, self._name, self._path = handle, name, path
    info = handle.get_slice(name)
    self.shape = tuple(int(d) for d in info.get_shape())
    self.dtype = info.get_dtype()

  def __array__(self, dtype=None, copy=None):
    try:
      value = self._handle.get_tensor(self._name)
    except Exception as e:  # the library's SafetensorError, or an OS error
      raise _unreadable(self._path, f"tensor {self._name!r}: {_first_line(e)}") from None
    return value if dtype is None else value.astype(dtype)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _unreadable(path: str, why: str) -> HFImportError:
  return HFImportError(f"{path} is not a readable safetensors file ({why}); download or "
                       "save it again (transformers' save_pretrained writes safetensors)")


def read_safetensors(path: str) -> dict[str, StoredTensor]:
  """Every tensor of one ``.safetensors`` file, by name, as a ``StoredTensor``
  (header read now, bytes when used), through the ``safetensors`` library."""
  from safetensors import safe_open
  try:
    handle = safe_open(path, framework="numpy")
    return {name: StoredTensor(handle, name, path) for name in handle.keys()}
  except Exception as e:  # SafetensorError: bad header, truncated body, unknown dtype
    why = _first_line(e)
    if "not fully covered" in why or "incomplete" in why:
      why += " (truncated?)"
    raise _unreadable(path, why) from None


def _check_tensors(tensors: dict, shapes: dict[str, tuple], folder: str, what: str,
                   layers_key: str) -> None:
  """Raises HFImportError unless ``tensors`` holds exactly ``shapes``' names and shapes."""
  missing = sorted(set(shapes) - set(tensors))
  extra = sorted(set(tensors) - set(shapes))
  if missing:
    raise HFImportError(f"{folder} lacks {len(missing)} {what} tensor(s) that config.json "
                        f"implies: {missing[:8]}{' ...' if len(missing) > 8 else ''}; the "
                        "checkpoint is incomplete or config.json does not belong to it")
  if extra:
    raise HFImportError(f"{folder} holds {len(extra)} tensor(s) astra-jax's {what} has no place "
                        f"for: {extra[:8]}{' ...' if len(extra) > 8 else ''}; check {layers_key} "
                        f"in config.json, or the checkpoint is not a plain {what}")
  for name, want in shapes.items():
    if tuple(tensors[name].shape) != tuple(want):
      raise HFImportError(f"tensor {name} in {folder} has shape {list(tensors[name].shape)}, "
                          f"but config.json implies {list(want)}; config.json and the "
                          "weights disagree")


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
  _check_tensors(tensors, {k: v.get_value().shape for k, v in wanted.items()}, folder, "GPT-2",
                 "n_layer")
  for name, var in wanted.items():
    var.set_value(jnp.asarray(np.array(tensors[name]), var.get_value().dtype))  # copy: mmap
  if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
    raise HFImportError(f"{folder} has an lm_head.weight that differs from wte.weight; "
                        "astra-jax's GPT-2 ties its output head to the token embedding, so "
                        "an untied head cannot be imported")
  if lm_head is None and not tied:
    raise HFImportError(f"config.json in {folder} sets tie_word_embeddings false but there is "
                        "no lm_head.weight; astra-jax's GPT-2 needs a head tied to wte")
  nnx.update(model, params)
