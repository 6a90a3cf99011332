"""Llama 3 (Flax NNX): RMSNorm, RoPE with Llama-3 frequency scaling, grouped-query
attention, SwiGLU; causal LM over (a device's share of) the token sequence.

Module names follow Hugging Face's ``LlamaForCausalLM`` (embed_tokens,
layers.N.q_proj / k_proj / v_proj / o_proj, gate_proj / up_proj / down_proj,
input_layernorm, post_attention_layernorm, norm, lm_head), so
``astra_jax.io.hf.load_llama`` maps checkpoints one to one.  Two ways to run it,
as GPT-2 (``astra_jax.models.gpt2``), so ``astra_jax.run.generate`` works as is:

  ``model(tokens, positions)``  prefill / training.  Attention goes through
      ``SequenceAttention(causal=True)`` with kv_dim = kv_heads * head_dim:
      ASTRA exchanges (and quantizes) the K/V *heads*, 8 x 128 = 1024 values
      per token for Llama 3 8B, not the 4096-wide hidden state.
  ``model.decode(tokens, positions, cache)``  one device with a KV cache
      [L x (k, v)] of shape [B, S, kv_heads, head_dim].

RoPE and the exchange
---------------------
Keys cross the link *before* RoPE.  Each device projects its tokens to q, k, v
and hands the unrotated k to the exchange; ``attention.attend`` then rotates
(its ``key_transform`` hook) the whole sequence's keys as this device holds
them, its own block exact and the other blocks as decoded from their codes,
each key at its global position; queries are rotated (``query_transform``)
at their global positions on the device that owns them.  Why before: a VQ
codebook then learns the *content* of keys, one distribution for every
position, instead of content times a rotation that differs for each position
(a rotated key's distribution spreads over every angle, so a codebook of the
same size would quantize it worse, and positions unseen in calibration
would fall off it).  The receiver knows each block's positions (device d
holds tokens d*Tl .. d*Tl+Tl-1), so nothing about position crosses the link.
Values carry no position and are exchanged as they are.  With the exact
exchange the result is the same as rotating before the exchange, bit for bit:
the rotation is elementwise, with the same positions either way.

The KV cache holds keys as they crossed the link (unrotated), which is what
``SequenceAttention`` records and ``generate`` turns into the cache;
``decode`` writes the new tokens' unrotated keys and rotates the cache by
slot position when it reads it (elementwise, as cheap as reading it once).

Precision: ``dtype`` is the compute dtype, ``param_dtype`` the weights'
(both "bfloat16" for bf16 inference).  RMSNorm and RoPE compute in float32
and cast back, as Hugging Face does; attention logits and softmax are float32
(``attention.dot_product_attention``); the logits come out float32.
``quantize_int8`` stores every Linear kernel as int8 with one float32 scale
per output column (symmetric, weight-only: activations keep ``dtype``); the
embedding and norms keep ``param_dtype``.  Int8 weights are not
``nnx.Param``s: an int8 model is for inference (quantize a trained one with
``quantize_weights``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core.attention import SequenceAttention, dot_product_attention
from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.core.sync import ExactSync, Split, Sync


class Sizes(NamedTuple):
  width: int
  layers: int
  heads: int
  kv_heads: int
  mlp_dim: int
  head_dim: int


# width, layers, heads, kv_heads, mlp_dim (head_dim = width // heads)
VARIANTS = {
    "nano": (32, 2, 4, 2, 96),
    "micro": (128, 4, 4, 2, 384),
    "mini": (256, 6, 8, 2, 768),
    "1b": (2048, 16, 32, 8, 8192),  # Llama 3.2 1B
    "3b": (3072, 28, 24, 8, 8192),  # Llama 3.2 3B
    "8b": (4096, 32, 32, 8, 14336),  # Llama 3.1 8B
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's RoPE frequency scaling (Hugging Face ``rope_type: "llama3"``).

  Wavelengths shorter than original/high_freq_factor are kept, longer than
  original/low_freq_factor are stretched by ``factor``, and the band between
  is interpolated smoothly (``rope_frequencies``).  Defaults: Llama 3.1's.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError("llama3 RoPE scaling needs high_freq_factor > low_freq_factor > 0, got "
                       f"{self.high_freq_factor} and {self.low_freq_factor}")
    if self.factor <= 0 or self.original_max_position_embeddings <= 0:
      raise ValueError("llama3 RoPE scaling needs factor > 0 and "
                       "original_max_position_embeddings > 0")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float32): theta^(-2i/head_dim), then Llama 3's scaling."""
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv.astype(np.float32)
  s = scaling
  wavelen = 2 * math.pi / inv
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor   # longer: stretched
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # shorter: kept
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  out = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  out = np.where(between, (1 - smooth) * inv / s.factor + smooth * inv, out)
  return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary position embedding in Hugging Face's layout: dimension i pairs with
  i + head_dim/2 (``rotate_half``), not with its neighbour.  A hashable
  callable ``rope(x [B, T, H, Dh], positions [T]) -> x rotated``, used as
  attention's query/key transform and by ``decode``."""

  head_dim: int
  theta: float
  scaling: RopeScaling | None

  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    inv = jnp.asarray(rope_frequencies(self.head_dim, self.theta, self.scaling))
    angles = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, Dh/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  variant: str = "micro"
  vocab_size: int = 256
  context: int = 256  # longest sequence: prompt + generated tokens (RoPE itself has no limit)
  exchange: Exchange = ExactExchange()
  sync: Sync = ExactSync()  # tensor-parallel all-reduces (inert without a tp axis)
  rms_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = RopeScaling()  # None: plain RoPE
  tie_embeddings: bool = True  # output head = token embedding (Llama 3.2 1B/3B); 8B is untied
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"  # weights
  quantize_int8: bool = False  # int8 weight-only Linear kernels (inference)
  # explicit sizes (e.g. an imported checkpoint's) override the variant's;
  # variant "custom" takes width, layers, heads, kv_heads and mlp_dim from here
  width: int | None = None
  layers: int | None = None
  heads: int | None = None
  kv_heads: int | None = None
  mlp_dim: int | None = None
  head_dim: int | None = None  # default width // heads

  def __post_init__(self):
    overrides = (self.width, self.layers, self.heads, self.kv_heads, self.mlp_dim)
    if self.variant == "custom":
      if None in overrides:
        raise ValueError("Llama variant 'custom' needs width, layers, heads, kv_heads and mlp_dim")
    elif self.variant not in VARIANTS:
      raise ValueError(f"unknown Llama variant {self.variant!r}; choose from {sorted(VARIANTS)} "
                       "or 'custom' with width/layers/heads/kv_heads/mlp_dim")
    s = self.sizes
    if self.head_dim is None and s.width % s.heads:
      raise ValueError(f"Llama width {s.width} is not a multiple of its {s.heads} heads; "
                       "set head_dim explicitly")
    self.sync.check_layers(s.layers)
    if s.heads % s.kv_heads:
      raise ValueError(f"Llama's {s.heads} query heads cannot share {s.kv_heads} K/V heads; "
                       "heads must be a multiple of kv_heads")
    if s.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {s.head_dim}")
    for name in ("dtype", "param_dtype"):
      if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
        raise ValueError(f"Llama {name} must be a float type (float32, bfloat16), "
                         f"got {getattr(self, name)!r}")

  @property
  def sizes(self) -> Sizes:
    base = VARIANTS.get(self.variant, (None,) * 5)
    width, layers, heads, kv_heads, mlp = (
        b if o is None else o for o, b in zip(
            (self.width, self.layers, self.heads, self.kv_heads, self.mlp_dim), base))
    return Sizes(width, layers, heads, kv_heads, mlp,
                 self.head_dim if self.head_dim is not None else width // heads)

  @property
  def kv_dim(self) -> int:
    """What one token's K (or V) holds on the link: kv_heads * head_dim."""
    return self.sizes.kv_heads * self.sizes.head_dim

  @property
  def rope(self) -> Rope:
    return Rope(self.sizes.head_dim, self.rope_theta, self.rope_scaling)


# The released models' settings beyond their shape (Hugging Face config.json).
RELEASES = {
    "1b": dict(vocab_size=128256, context=131072, rope_scaling=RopeScaling(factor=32.0),
               tie_embeddings=True),
    "3b": dict(vocab_size=128256, context=131072, rope_scaling=RopeScaling(factor=32.0),
               tie_embeddings=True),
    "8b": dict(vocab_size=128256, context=131072, rope_scaling=RopeScaling(factor=8.0),
               tie_embeddings=False),
}


def release_config(name: str, **overrides) -> LlamaConfig:
  """Llama 3.2 1B / 3B or 3.1 8B as released (shape, vocabulary, RoPE, head tying)."""
  if name not in RELEASES:
    raise ValueError(f"no released Llama {name!r}; choose from {sorted(RELEASES)}")
  return LlamaConfig(variant=name, **{**RELEASES[name], **overrides})


class Int8Kernel(nnx.Variable):
  """int8 weight-only kernel [in, out]; the float kernel is int8 * ``Int8Scale``."""


class Int8Scale(nnx.Variable):
  """float32 scale per output column of an ``Int8Kernel``."""


WEIGHTS = (nnx.Param, Int8Kernel, Int8Scale)  # everything a checkpoint provides


def quantize_int8(kernel) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Symmetric per-output-column int8: kernel [in, out] -> (int8 [in, out], scale [out]).

  Each column's largest |w| maps to 127, so every weight is off by at most
  half a step, scale / 2 = max|w_col| / 254.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  scale = jnp.max(jnp.abs(kernel), axis=0) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8), scale


_INIT = nnx.initializers.normal(0.02)  # Hugging Face Llama's initializer_range


class Linear(nnx.Module):
  """y = x @ kernel (no bias, as in Llama); the kernel is a float ``nnx.Param`` or int8."""

  def __init__(self, d_in: int, d_out: int, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.quantized = cfg.quantize_int8
    kernel = _INIT(rngs.params(), (d_in, d_out), jnp.float32)
    if self.quantized:
      q, scale = quantize_int8(kernel)
      self.kernel, self.scale = Int8Kernel(q), Int8Scale(scale)
    else:
      self.kernel = nnx.Param(kernel.astype(cfg.param_dtype))

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
    if self.quantized:
      y = y * self.scale.get_value().astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 and cast back before
  the scale, as Hugging Face's LlamaRMSNorm."""

  def __init__(self, dim: int, cfg: LlamaConfig):
    self.eps = cfg.rms_eps
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale.get_value() * normed.astype(x.dtype)


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs):
    s = cfg.sizes
    self.head_dim = s.head_dim
    self.rope = cfg.rope
    self.input_layernorm = RMSNorm(s.width, cfg)
    self.q_proj = Linear(s.width, s.heads * s.head_dim, cfg, rngs=rngs)
    self.k_proj = Linear(s.width, s.kv_heads * s.head_dim, cfg, rngs=rngs)
    self.v_proj = Linear(s.width, s.kv_heads * s.head_dim, cfg, rngs=rngs)
    self.attn = SequenceAttention(cfg.exchange, cfg.kv_dim, causal=True, rngs=rngs,
                                  query_transform=self.rope, key_transform=self.rope)
    self.o_proj = Linear(s.heads * s.head_dim, s.width, cfg, rngs=rngs)
    self.attn_sync = cfg.sync.site(layer, "attn")
    self.post_attention_layernorm = RMSNorm(s.width, cfg)
    self.gate_proj = Linear(s.width, s.mlp_dim, cfg, rngs=rngs)
    self.up_proj = Linear(s.width, s.mlp_dim, cfg, rngs=rngs)
    self.down_proj = Linear(s.mlp_dim, s.width, cfg, rngs=rngs)
    self.mlp_sync = cfg.sync.site(layer, "mlp")

  def _qkv(self, x):
    h = self.input_layernorm(x)
    split = lambda y: einops.rearrange(y, "b t (h d) -> b t h d", d=self.head_dim)
    return split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))

  def _finish(self, x, attn):
    x, pending = self.attn_sync(x, self.o_proj(einops.rearrange(attn, "b t h d -> b t (h d)")))
    h = self.post_attention_layernorm(x)
    mlp = self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
    return self.mlp_sync(x, mlp, pending)[0]

  def __call__(self, x):
    q, k, v = self._qkv(x)  # k unrotated: SequenceAttention rotates after the exchange
    return self._finish(x, self.attn(q, k, v))

  def decode(self, x, positions, cache):
    """x [B, t, D] at ``positions`` [t]; cache (k unrotated, v) [B, S, Hkv, Dh] -> (x, cache)."""
    q, k, v = self._qkv(x)
    kc, vc = cache
    kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), positions[0], axis=1)
    vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), positions[0], axis=1)
    slots = jnp.arange(kc.shape[1])
    attn = dot_product_attention(self.rope(q, positions), self.rope(kc, slots), vc,
                                 q_pos=positions, k_pos=slots, causal=True)
    return self._finish(x, attn), (kc, vc)


class Llama(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    s = cfg.sizes
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, s.width, dtype=jnp.dtype(cfg.dtype),
                                  param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                                  embedding_init=_INIT)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(s.layers)])
    self.norm = RMSNorm(s.width, cfg)
    self.lm_head = None if cfg.tie_embeddings else Linear(s.width, cfg.vocab_size, cfg,
                                                          rngs=rngs)

  def _logits(self, x):
    x = self.norm(x)
    if self.lm_head is None:
      table = self.embed_tokens.embedding.get_value()
      logits = jnp.dot(x, table.astype(x.dtype).T)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """tokens [B, T], positions [T] -> logits [B, T, V] (float32).

    ``positions`` are the tokens' global positions, 0 .. T-1 split like the
    tokens (what every caller passes); attention derives the same ones from
    the device index for its causal mask and RoPE, so they are not read here.
    """
    del positions
    x = self.embed_tokens(tokens)
    for block in self.layers:
      x = block(x)
    return self._logits(x)

  def decode(self, tokens, positions, cache):
    """One device, KV cache: tokens [B, t] at positions [t] -> (logits, cache)."""
    x = self.embed_tokens(tokens)
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x, layer_cache = block.decode(x, positions, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x), new_cache

  def tensor_layout(self) -> dict[str, Split]:
    """How tensor parallelism splits the linears (``astra_jax.parallel.tensor_layout``)."""
    d = self.cfg.sizes.head_dim
    return {"q_proj": Split("columns", unit=d, what="heads"),
            "k_proj": Split("columns", unit=d, what="K/V heads", repeat=True),
            "v_proj": Split("columns", unit=d, what="K/V heads", repeat=True),
            "o_proj": Split("rows", unit=d, what="heads"),
            "gate_proj": Split("columns"), "up_proj": Split("columns"),
            "down_proj": Split("rows")}

  def empty_cache(self, batch: int, length: int, dtype=jnp.float32):
    s = self.cfg.sizes
    shape = (batch, length, s.kv_heads, s.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(s.layers)]


def weight_shapes(cfg: LlamaConfig) -> dict[tuple, tuple[int, ...]]:
  """Every float weight of the model ``cfg`` describes, path -> shape (Linear
  kernels are [in, out]); with ``quantize_int8`` the kernels are stored int8."""
  plain = dataclasses.replace(cfg, quantize_int8=False)
  abstract = nnx.eval_shape(lambda: Llama(plain, rngs=nnx.Rngs(0)))
  return {path: tuple(var.get_value().shape)
          for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def assemble(cfg: LlamaConfig, weight: Callable[[tuple], object], *, rest=None,
             seed: int = 0) -> Llama:
  """A Llama with the given float weights, never holding a random initialisation
  of them (an 8B model is built in place).  ``weight(path)`` returns the float
  array for each path of ``weight_shapes(cfg)``; it is cast to ``param_dtype``
  or int8-quantized.  The non-weight state (exchange codebooks, RNG) is
  ``rest`` when given, else freshly initialised from ``seed``.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))
  graphdef, weights, _ = nnx.split(abstract, WEIGHTS, ...)
  if rest is None:
    rest = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)), WEIGHTS, ...)[2])()
  flat = dict(nnx.to_flat_state(weights))
  for path in weight_shapes(cfg):
    value, var = weight(path), flat[path]
    if isinstance(var, Int8Kernel):
      q, scale = quantize_int8(value)
      var.set_value(q)
      flat[path[:-1] + ("scale",)].set_value(scale)
    else:
      var.set_value(jnp.asarray(value, var.get_value().dtype))
  return nnx.merge(graphdef, weights, rest)


def quantize_weights(model: Llama) -> Llama:
  """A copy of ``model`` with int8 weight-only Linear kernels (codebooks kept)."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  _, _, rest = nnx.split(model, WEIGHTS, ...)
  return assemble(dataclasses.replace(model.cfg, quantize_int8=True),
                  lambda path: params[path].get_value(), rest=rest)
