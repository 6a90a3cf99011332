"""GGUF files (llama.cpp's format) -> ``astra_jax.models.llama``, a tokenizer, or a
Hugging Face folder.

A GGUF file is one self-describing blob: the magic ``GGUF``, a version, a table
of metadata (typed key/value pairs: the model's hyper-parameters under
``<arch>.*`` keys, its tokenizer under ``tokenizer.ggml.*``), a table of
tensors (name, dimensions listed fastest-varying first, ggml type, offset) and
then the aligned tensor bytes, most of them block-quantized (Q4_1: blocks of 32
weights sharing a float16 scale and minimum, 4 bits each).  llama.cpp's own
Python package ``gguf`` parses it (``GGUFReader``, memory-mapped) and
``gguf.quants.dequantize`` turns every quantized type it knows into float32;
nothing else of it is used here, and nothing is ever downloaded.

Only ``general.architecture == "llama"`` files are read (Llama 1/2/3, SmolLM,
Mistral-7B and the other dense models llama.cpp stores as ``llama``).  The file
is turned into what transformers' ``LlamaForCausalLM`` would hold, and the HF
reader's back half (``astra_jax.io.hf.llama_from_tensors``) builds our model
from that, so both readers share one mapping, one set of checks and one
int8 / bf16 path.

Metadata -> Hugging Face ``config.json`` (then ``hf.llama_config_from_hf``):

  llama.embedding_length                 -> hidden_size
  llama.block_count                      -> num_hidden_layers
  llama.feed_forward_length              -> intermediate_size
  llama.attention.head_count(_kv)        -> num_attention_heads / num_key_value_heads
  llama.attention.key_length             -> head_dim (default width / heads)
  llama.attention.layer_norm_rms_epsilon -> rms_norm_eps
  llama.context_length                   -> max_position_embeddings
  llama.rope.freq_base                   -> rope_theta (default 10000)
  llama.vocab_size, else the token count -> vocab_size
  no ``output.weight`` tensor            -> tie_word_embeddings
  tokenizer.ggml.{bos,eos,padding}_token_id -> {bos,eos,pad}_token_id

RoPE scaling: llama.cpp writes Llama 3's frequency scaling not as metadata but
as a tensor ``rope_freqs.weight`` (one divisor per frequency); it is matched
against Llama 3's formula (``llama.rope_frequencies``) and becomes
``rope_scaling = {"rope_type": "llama3", ...}``.  ``llama.rope.scaling.type``
linear / yarn, a partial rotary dimension and mixture-of-experts files are
refused with ``GGUFImportError``.

Tensors.  A ggml tensor with dimensions [in, out] reads in numpy as [out, in],
which is already ``nn.Linear``'s layout, so names map one to one:

  token_embd.weight          -> model.embed_tokens.weight
  blk.N.attn_norm.weight     -> model.layers.N.input_layernorm.weight
  blk.N.attn_{q,k,v}.weight  -> model.layers.N.self_attn.{q,k,v}_proj.weight
  blk.N.attn_output.weight   -> model.layers.N.self_attn.o_proj.weight
  blk.N.ffn_norm.weight      -> model.layers.N.post_attention_layernorm.weight
  blk.N.ffn_{gate,up,down}.weight -> model.layers.N.mlp.{gate,up,down}_proj.weight
  output_norm.weight         -> model.norm.weight
  output.weight              -> lm_head.weight (absent: tied to the embedding)

Hugging Face rotates each head's dimension i together with i + head_dim/2
(``rotate_half``), ggml's llama RoPE pairs neighbours 2i and 2i+1, so
llama.cpp's converter reorders every head's rows of q_proj and k_proj: HF rows
[head, 2, head_dim/2] are stored as [head, head_dim/2, 2].  ``HFTensor`` undoes
that (the transpose of the last two of [head, head_dim/2, 2, in]), so the
tensors are exactly what transformers' own GGUF loader produces.  Tensors are
dequantized lazily, one at a time as the model takes them.

Tokenizer (``load_tokenizer_gguf``): ``tokenizer.ggml.model == "gpt2"`` files
(byte-level BPE) are rebuilt with the ``tokenizers`` library from
``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` (CONTROL tokens become
special tokens, USER_DEFINED ones added tokens, both matched whole), the BOS /
EOS / padding ids and flags, and the pre-tokenizer that ``tokenizer.ggml.pre``
names: GPT-2's regex; ``smollm`` and its kin split every digit off first
(llama.cpp's ``\\p{N}`` pass, SmolLM2's own tokenizer.json); ``llama-bpe``
uses Llama 3's regex.  SentencePiece vocabularies (``tokenizer.ggml.model ==
"llama"``) are refused with a message.

``write_hf_folder(source, out_dir)`` writes ``config.json`` and
``model.safetensors`` (float32, HF names, via ``safetensors.numpy``) and, for a
GGUF, ``tokenizer.json``, so transformers and ``hf.load_llama`` read the same
weights; the source is a GGUF file or one of our Llama models.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import nnx

from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.io import hf
from astra_jax.models import llama

_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd(\.weight)?")  # old files' RoPE tables
_ROPE_FREQS = "rope_freqs.weight"
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType

HOW_TO_INSTALL = "pip install gguf"


class GGUFImportError(ValueError):
  """A GGUF file that cannot become an astra-jax model or tokenizer (the message says why)."""


def _gguf():
  try:
    import gguf
  except ImportError:
    raise GGUFImportError(f"reading GGUF files needs llama.cpp's `gguf` package: "
                          f"{HOW_TO_INSTALL}") from None
  return gguf


# --- the file -------------------------------------------------------------------------

class GGUFFile:
  """A parsed GGUF file: ``metadata`` (key -> Python value), the raw tensor table,
  and the ``hf_config()`` / ``hf_tensors()`` / ``tokenizer()`` made from them.

  Parsing reads the headers only (the tensor bytes stay mapped from disk);
  pass one ``GGUFFile`` to several functions to parse once.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise GGUFImportError(f"{self.path} does not exist or is not a file; pass the path of a "
                            ".gguf file")
    with open(self.path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise GGUFImportError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not "
                            "b'GGUF'); pass a llama.cpp .gguf model, or a Hugging Face folder "
                            "to astra_jax.io.hf.load_llama")
    gguf = _gguf()
    try:
      reader = gguf.GGUFReader(self.path)
    except Exception as e:  # ValueError / IndexError / KeyError from a short or damaged file
      raise GGUFImportError(f"{self.path} is a truncated or corrupt GGUF file "
                            f"({type(e).__name__}: {_first_line(e)}); download or convert it "
                            "again") from None
    size = os.path.getsize(self.path)
    for t in reader.tensors:
      if t.data_offset + t.n_bytes > size:
        raise GGUFImportError(f"{self.path} is truncated: tensor {t.name} ends at byte "
                              f"{t.data_offset + t.n_bytes} of a {size}-byte file; download or "
                              "convert it again")
    self._reader = reader
    self.tensors = {t.name: t for t in reader.tensors}
    self.metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
      if not key.startswith("GGUF."):
        self.metadata[key] = _value(field, gguf)
    self.architecture = self.metadata.get("general.architecture")

  def require_llama(self) -> None:
    if self.architecture != "llama":
      raise GGUFImportError(
          f"{self.path} holds a {self.architecture or 'model without general.architecture'!r} "
          "model (general.architecture), not Llama; astra_jax.io.gguf imports only 'llama' "
          "GGUF files (for other models convert their Hugging Face folder; GPT-2 folders load "
          "with astra_jax.io.hf.load_gpt2)")

  def _meta(self, key: str, default=None, *, required: bool = False):
    value = self.metadata.get(f"llama.{key}", default)
    if required and value is None:
      raise GGUFImportError(f"{self.path} lacks metadata llama.{key}; convert the model again "
                            "with llama.cpp's convert_hf_to_gguf.py")
    if isinstance(value, list):  # per-layer values: one Llama needs them all equal
      if len(set(value)) != 1:
        raise GGUFImportError(f"{self.path} sets llama.{key} per layer ({value[:8]}...); "
                              "astra-jax's Llama has the same shape in every layer")
      value = value[0]
    return value

  def hf_config(self) -> dict:
    """The Hugging Face ``config.json`` (as a dict) this file's metadata describes."""
    self.require_llama()
    if (self._meta("expert_count") or 0) > 0 or any(".ffn_gate_exps" in n for n in self.tensors):
      raise GGUFImportError(f"{self.path} is a mixture-of-experts 'llama' model (Mixtral "
                            "style); astra-jax's Llama has one dense SwiGLU per layer")
    width = int(self._meta("embedding_length", required=True))
    heads = int(self._meta("attention.head_count", required=True))
    kv_heads = int(self._meta("attention.head_count_kv") or heads)
    head_dim = int(self._meta("attention.key_length") or width // heads)
    if int(self._meta("attention.value_length") or head_dim) != head_dim:
      raise GGUFImportError(f"{self.path} has keys of {head_dim} and values of "
                            f"{self._meta('attention.value_length')} values per head; "
                            "astra-jax's Llama needs them equal")
    rotary = int(self._meta("rope.dimension_count") or head_dim)
    if rotary != head_dim:
      raise GGUFImportError(f"{self.path} rotates {rotary} of each head's {head_dim} "
                            "dimensions (llama.rope.dimension_count); astra-jax's Llama rotates "
                            "the whole head (partial rotary RoPE is not implemented)")
    kind = self._meta("rope.scaling.type")
    if kind not in (None, "none"):
      raise GGUFImportError(f"{self.path} asks for RoPE scaling {kind!r} "
                            "(llama.rope.scaling.type); astra-jax's Llama implements plain RoPE "
                            "and Llama 3's frequency scaling (a rope_freqs tensor)")
    tokens = self.metadata.get("tokenizer.ggml.tokens")
    vocab = self._meta("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in self.tensors:
      vocab = int(self.tensors["token_embd.weight"].shape[-1])
    theta = float(self._meta("rope.freq_base") or 10000.0)
    context = int(self._meta("context_length", required=True))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": width, "intermediate_size": int(self._meta("feed_forward_length",
                                                                  required=True)),
        "num_hidden_layers": int(self._meta("block_count", required=True)),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": float(self._meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "tie_word_embeddings": "output.weight" not in self.tensors,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_theta": theta,
        "rope_scaling": self._llama3_scaling(theta, head_dim),
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id")):
      if f"tokenizer.ggml.{key}" in self.metadata:
        config[f"{name}_token_id"] = int(self.metadata[f"tokenizer.ggml.{key}"])
    return config

  def _llama3_scaling(self, theta: float, head_dim: int) -> dict | None:
    """Llama 3's scaling recovered from the ``rope_freqs`` divisors, or None."""
    if _ROPE_FREQS not in self.tensors:
      return None
    stored = np.asarray(_dequantize(self.tensors[_ROPE_FREQS], self.path), np.float64).ravel()
    if stored.shape != (head_dim // 2,):
      raise GGUFImportError(f"{self.path} has {stored.size} RoPE frequency factors "
                            f"({_ROPE_FREQS}) for a head of {head_dim}; it needs {head_dim // 2}")
    if np.all(stored == 1.0):
      return None
    # Only original/low_freq_factor and original/high_freq_factor shape the curve, so
    # Llama 3.1's (1, 4) with the file's original context (8192 by default) is tried.
    scaling = llama.RopeScaling(
        factor=float(stored.max()), low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=int(self._meta("rope.scaling.original_context_length")
                                              or 8192))
    plain = llama.rope_frequencies(head_dim, theta, None).astype(np.float64)
    implied = plain / llama.rope_frequencies(head_dim, theta, scaling).astype(np.float64)
    if not np.allclose(implied, stored, rtol=1e-5, atol=0):
      raise GGUFImportError(f"{self.path} scales RoPE frequencies ({_ROPE_FREQS}) in a way that "
                            f"is not Llama 3's (factor {scaling.factor}, low/high frequency "
                            "factors 1/4); astra-jax's Llama implements only that scaling")
    return {"rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}

  def hf_tensors(self) -> dict[str, HFTensor]:
    """Every weight under transformers' name, dequantized (float32, Q/K rows in HF's
    order) when read: ``np.asarray(tensors[name])``."""
    config = self.hf_config()
    rows = {"self_attn.q_proj": config["num_attention_heads"],
            "self_attn.k_proj": config["num_key_value_heads"]}
    out, unknown = {}, []
    for name, t in self.tensors.items():
      if name == _ROPE_FREQS or _IGNORED.fullmatch(name):
        continue
      match = _BLOCK_TENSOR.fullmatch(name)
      if name in _GLOBAL:
        out[_GLOBAL[name]] = HFTensor(t, self.path)
      elif match and match[2] in _BLOCK:
        module = _BLOCK[match[2]]
        out[f"model.layers.{match[1]}.{module}.weight"] = HFTensor(t, self.path,
                                                                   heads=rows.get(module))
      else:
        unknown.append(name)
    if unknown:
      raise GGUFImportError(f"{self.path} holds {len(unknown)} tensor(s) a Llama has no place "
                            f"for: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; it is not "
                            "a plain Llama (biases, experts or another layout)")
    for t in out.values():
      t.check_type()
    return out

  def tokenizer(self) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(self)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _value(field, gguf) -> Any:
  """A metadata field as Python: str, int, float, bool, or a list of those."""
  kind = field.types[0] if field.types else None
  if kind == gguf.GGUFValueType.ARRAY and field.types[-1] != gguf.GGUFValueType.STRING:
    return [v for i in field.data for v in field.parts[i].tolist()]
  return field.contents()


def _open(source: str | os.PathLike | GGUFFile) -> GGUFFile:
  return source if isinstance(source, GGUFFile) else GGUFFile(source)


def _dequantize(t, path: str) -> np.ndarray:
  """float32 array of a reader tensor, numpy shape (dimensions slowest first)."""
  gguf = _gguf()
  shape = tuple(int(d) for d in reversed(t.shape.tolist()))
  if t.tensor_type == gguf.GGMLQuantizationType.F64:
    value = np.asarray(t.data, np.float64)
  else:
    try:
      value = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise GGUFImportError(_unsupported(t, path)) from None
  return np.array(value, np.float32).reshape(shape)  # a copy: never a view of the file


def _unsupported(t, path: str) -> str:
  return (f"tensor {t.name} in {path} is stored as {t.tensor_type.name}, which gguf.quants "
          "cannot dequantize (float F32/F16/BF16/F64 and the Q*/IQ*/TQ* quantizations are "
          "read); re-quantize the model with llama.cpp to one of those (e.g. Q8_0 or Q4_K_M)")


class HFTensor:
  """One GGUF tensor as transformers holds it: ``shape`` now; ``np.asarray(t)``
  dequantizes to float32 (and undoes llama.cpp's Q/K row order when ``heads``)."""

  def __init__(self, tensor, path: str, *, heads: int | None = None):
    self._tensor, self._path, self._heads = tensor, path, heads
    self.name = tensor.name
    self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    self.dtype = np.dtype(np.float32)
    self.ggml_type = tensor.tensor_type.name

  def check_type(self) -> None:
    """Raises GGUFImportError now if this tensor's type cannot be dequantized."""
    gguf = _gguf()
    if self._tensor.tensor_type in (gguf.GGMLQuantizationType.F32,
                                    gguf.GGMLQuantizationType.F64):
      return
    _, size = gguf.GGML_QUANT_SIZES[self._tensor.tensor_type]
    try:
      gguf.quants.dequantize(np.zeros(size, np.uint8), self._tensor.tensor_type)
    except NotImplementedError:
      raise GGUFImportError(_unsupported(self._tensor, self._path)) from None

  def __array__(self, dtype=None, copy=None):
    value = _dequantize(self._tensor, self._path)
    if self._heads:
      value = unpermute_rows(value, self._heads)
    return value if dtype is None else value.astype(dtype)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """HF's q_proj / k_proj rows from llama.cpp's: each head's rows [head_dim/2, 2]
  (neighbours rotate together) back to [2, head_dim/2] (i with i + head_dim/2)."""
  out_dim = weight.shape[0]
  if out_dim % (2 * heads):
    raise GGUFImportError(f"a Q/K projection of {out_dim} rows cannot hold {heads} heads of an "
                          "even size; the file's head counts do not match its tensors")
  half = out_dim // heads // 2
  return (weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
          .reshape(weight.shape))


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's order from HF's (the inverse of ``unpermute_rows``; for tests and writers)."""
  half = weight.shape[0] // heads // 2
  return (weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2)
          .reshape(weight.shape))


# --- the model ------------------------------------------------------------------------

def load_llama_gguf(source: str | os.PathLike | GGUFFile, exchange: Exchange = ExactExchange(),
                    *, dtype: str = "float32",
                    quantize_int8: bool = False) -> tuple[llama.LlamaConfig, llama.Llama]:
  """(LlamaConfig, Llama model) holding a GGUF file's weights, dequantized.

  ``dtype`` is the model's compute and parameter dtype ("float32" or
  "bfloat16"); ``quantize_int8`` stores the Linear kernels int8 weight-only
  (re-quantized from the dequantized floats), tensor by tensor.
  """
  f = _open(source)
  config, tensors = f.hf_config(), f.hf_tensors()
  try:
    return hf.llama_from_tensors(config, tensors, f.path, exchange, dtype=dtype,
                                 quantize_int8=quantize_int8)
  except hf.HFImportError as e:
    raise GGUFImportError(f"{f.path} (GGUF metadata read as a Hugging Face config): "
                          f"{e}") from None


# --- the tokenizer --------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) and how each splits text
# before byte-level BPE: GPT-2's regex; the same after isolating every digit; or
# Llama 3's regex (numbers in runs of up to three digits).
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFTokenizer:
  """A GGUF file's byte-level BPE tokenizer (``tokenizers``), usable wherever
  ``astra_jax.data.text`` takes a tokenizer: ``vocab_size``, ``encode``, ``decode``.

  ``encode`` adds BOS / EOS only where the file says so (``add_bos_token``);
  special tokens written in the text (``<|im_start|>``) become their ids, and
  ``decode`` writes them back, so ``decode(encode(text)) == text``.
  ``save(folder)`` writes ``tokenizer.json`` (``--config.tokenizer=folder``).
  """

  def __init__(self, tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, special_tokens: dict[str, int] | None = None):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.special_tokens = dict(special_tokens or {})

  @classmethod
  def from_gguf(cls, source: str | os.PathLike | GGUFFile) -> GGUFTokenizer:
    f = _open(source)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors
    meta = f.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise GGUFImportError(
          f"{f.path} has a {kind or 'missing'!r} tokenizer (tokenizer.ggml.model); astra_jax "
          "rebuilds only byte-level BPE ('gpt2') tokenizers; use the model's Hugging Face "
          "tokenizer.json with --config.tokenizer=FOLDER")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
      raise GGUFImportError(f"{f.path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges; "
                            "convert the model again with llama.cpp's convert_hf_to_gguf.py")
    pre = meta.get("tokenizer.ggml.pre", "default")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    if pre in _GPT2_PRE:
      split = byte_level
    elif pre in _DIGITS_PRE:
      split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       byte_level])
    elif pre in _LLAMA3_PRE:
      split = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    else:
      known = sorted(_GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE)
      raise GGUFImportError(f"{f.path} names pre-tokenizer {pre!r} (tokenizer.ggml.pre), which "
                            f"astra_jax does not know (it knows {known}); use the model's "
                            "Hugging Face tokenizer.json with --config.tokenizer=FOLDER")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
      vocab.setdefault(token, i)
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
      raise GGUFImportError(f"{f.path} has malformed BPE merges (not 'a b'): {bad[:3]}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRE))
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = {tokens[i]: i for i, t in enumerate(types) if t == _TOKEN_CONTROL}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED])

    def token_id(key):
      value = meta.get(f"tokenizer.ggml.{key}")
      return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
      ends = [(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on]
      tok.post_processor = processors.TemplateProcessing(
          single=([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else []),
          special_tokens=sorted(set(ends), key=lambda e: e[1]))
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
      raise GGUFImportError(f"{f.path}'s tokenizer has {len(tokens)} tokens but "
                            f"{tok.get_vocab_size(with_added_tokens=True)} distinct ones; "
                            "duplicated token strings cannot be rebuilt")
    return cls(tok, bos_id=bos, eos_id=eos, pad_id=token_id("padding_token_id"),
               special_tokens=special)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, folder: str | os.PathLike) -> str:
    """Writes ``folder/tokenizer.json`` (what ``data.text.BPETokenizer`` reads) and a
    ``tokenizer_config.json`` naming the plain fast tokenizer and the special
    tokens, so transformers adds nothing of its own (a Llama class would add
    BOS); returns the tokenizer.json path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    self.tokenizer.save(path)
    names = {f"{name}_token": self.tokenizer.id_to_token(i)
             for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
             if i is not None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **names}, fh, indent=2)
    return path


def load_tokenizer_gguf(source: str | os.PathLike | GGUFFile) -> GGUFTokenizer:
  """The tokenizer a GGUF file describes (see ``GGUFTokenizer``)."""
  return GGUFTokenizer.from_gguf(source)


# --- Hugging Face folders -------------------------------------------------------------

def hf_config_from_llama(cfg: llama.LlamaConfig) -> dict:
  """A transformers ``config.json`` (as a dict) for our LlamaConfig (the inverse of
  ``hf.llama_config_from_hf``); RoPE in the layout transformers 4 and 5 both read."""
  s = cfg.sizes
  scaling = None
  if cfg.rope_scaling is not None:
    r = cfg.rope_scaling
    scaling = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
               "high_freq_factor": r.high_freq_factor,
               "original_max_position_embeddings": r.original_max_position_embeddings}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "hidden_size": s.width, "intermediate_size": s.mlp_dim,
          "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
          "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
          "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.rms_eps,
          "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def _model_tensors(model: llama.Llama) -> dict[str, np.ndarray]:
  """Our Llama's weights as float32 under transformers' names ([out, in] Linears)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, llama.WEIGHTS)))
  out = {}
  for path in llama.weight_shapes(model.cfg):
    value = np.asarray(flat[path].get_value(), np.float32)
    if isinstance(flat[path], llama.Int8Kernel):  # int8 * per-column scale
      value = value * np.asarray(flat[path[:-1] + ("scale",)].get_value(), np.float32)
    out[hf._llama_name(path)] = value.T if path[-1] == "kernel" else value
  return out


def write_hf_folder(source: str | os.PathLike | GGUFFile | llama.Llama,
                    out_dir: str | os.PathLike) -> str:
  """Writes a transformers Llama folder: ``config.json`` and ``model.safetensors``
  (float32; a GGUF's weights dequantized with HF's Q/K row order; an int8 model's
  kernels as int8 * scale), plus ``tokenizer.json`` for a GGUF with a byte-level BPE
  tokenizer.  ``LlamaForCausalLM.from_pretrained(out_dir)`` and
  ``hf.load_llama(out_dir)`` then read the same weights.  Returns ``out_dir``.
  """
  from safetensors.numpy import save_file
  out_dir = os.fspath(out_dir)
  tokenizer = None
  if isinstance(source, llama.Llama):
    config, tensors = hf_config_from_llama(source.cfg), _model_tensors(source)
  else:
    f = _open(source)
    config = f.hf_config()
    tensors = {name: np.asarray(t) for name, t in f.hf_tensors().items()}
    try:
      tokenizer = f.tokenizer()
    except GGUFImportError:
      tokenizer = None  # the weights still export; the tokenizer is the user's to bring
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(config, fh, indent=2)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return out_dir

