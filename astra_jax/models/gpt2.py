"""GPT-2 (Flax NNX): causal LM over (a device's share of) the token sequence.

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, ...),
so ``astra_jax.io.hf`` maps checkpoints one to one.  Two ways to run it:

  ``model(tokens, positions)``   prefill / training.  Attention goes through
      ``SequenceAttention(causal=True)``: under a mesh, device i sees its own
      block exactly and the blocks of devices < i through the exchange.
  ``model.decode(tokens, positions, cache)`` one device with a KV cache
      [L x (k, v)] of shape [B, S, H, Dh]; the new tokens' K/V are written at
      their positions and attention masks by position, so unfilled slots are
      never seen.  After an ASTRA prefill the cache holds the last device's
      exact K/V plus the decoded K/V of the others (``prefill_cache``).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.core.attention import SequenceAttention, dot_product_attention
from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.core.sync import ExactSync, Split, Sync

# width, layers, heads
VARIANTS = {
    "nano": (32, 2, 2),
    "micro": (128, 4, 4),
    "mini": (256, 6, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  variant: str = "micro"
  vocab_size: int = 256
  context: int = 256  # learned position embeddings (n_positions)
  exchange: Exchange = ExactExchange()
  sync: Sync = ExactSync()  # tensor-parallel all-reduces (inert without a tp axis)
  layer_norm_eps: float = 1e-5
  # explicit sizes (e.g. an imported checkpoint's) override the variant's;
  # variant "custom" takes all three from here
  width: int | None = None
  layers: int | None = None
  heads: int | None = None

  def __post_init__(self):
    overrides = (self.width, self.layers, self.heads)
    if self.variant == "custom":
      if None in overrides:
        raise ValueError("GPT-2 variant 'custom' needs width, layers and heads")
    elif self.variant not in VARIANTS:
      raise ValueError(f"unknown GPT-2 variant {self.variant!r}; choose from {sorted(VARIANTS)} "
                       "or 'custom' with width/layers/heads")
    width, layers, heads = self.sizes
    if width % heads:
      raise ValueError(f"GPT-2 width {width} is not a multiple of its {heads} heads")
    self.sync.check_layers(layers)

  @property
  def sizes(self) -> tuple[int, int, int]:
    base = VARIANTS.get(self.variant, (None, None, None))
    return tuple(b if o is None else o for o, b in zip((self.width, self.layers, self.heads), base))


class Block(nnx.Module):
  def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs):
    width, _, heads = cfg.sizes
    self.head_dim = width // heads
    eps = cfg.layer_norm_eps
    self.ln_1 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.c_attn = nnx.Linear(width, 3 * width, rngs=rngs)
    self.attn = SequenceAttention(cfg.exchange, width, causal=True, rngs=rngs)
    self.c_proj = nnx.Linear(width, width, rngs=rngs)
    self.attn_sync = cfg.sync.site(layer, "attn")
    self.ln_2 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.c_fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_proj = nnx.Linear(4 * width, width, rngs=rngs)
    self.mlp_sync = cfg.sync.site(layer, "mlp")

  def _qkv(self, x):
    return einops.rearrange(self.c_attn(self.ln_1(x)), "b t (n h d) -> n b t h d",
                            n=3, d=self.head_dim)

  def _finish(self, x, attn):
    x, pending = self.attn_sync(x, self.c_proj(einops.rearrange(attn, "b t h d -> b t (h d)")))
    mlp = self.mlp_proj(jax.nn.gelu(self.c_fc(self.ln_2(x)), approximate=True))
    return self.mlp_sync(x, mlp, pending)[0]

  def __call__(self, x):
    q, k, v = self._qkv(x)
    return self._finish(x, self.attn(q, k, v))

  def decode(self, x, positions, cache):
    """x [B, t, D] at ``positions`` [t]; cache (k, v) [B, S, H, Dh] -> (x, cache)."""
    q, k, v = self._qkv(x)
    kc, vc = cache
    kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), positions[0], axis=1)
    vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), positions[0], axis=1)
    attn = dot_product_attention(q, kc, vc, q_pos=positions, k_pos=jnp.arange(kc.shape[1]),
                                 causal=True)
    return self._finish(x, attn), (kc, vc)


class GPT2(nnx.Module):
  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    width, layers, _ = cfg.sizes
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, width, rngs=rngs,
                         embedding_init=nnx.initializers.normal(0.02))
    self.wpe = nnx.Embed(cfg.context, width, rngs=rngs,
                         embedding_init=nnx.initializers.normal(0.01))
    self.h = nnx.List([Block(cfg, i, rngs=rngs) for i in range(layers)])
    self.ln_f = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, rngs=rngs)

  def _embed(self, tokens, positions):
    return self.wte(tokens) + self.wpe(positions)[None]

  def _logits(self, x):
    return self.wte.attend(self.ln_f(x))  # tied input/output embeddings

  def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """tokens [B, T], positions [T] (global) -> logits [B, T, V] (float32)."""
    x = self._embed(tokens, positions)
    for block in self.h:
      x = block(x)
    return self._logits(x).astype(jnp.float32)

  def decode(self, tokens, positions, cache):
    """One device, KV cache: tokens [B, t] at positions [t] -> (logits, cache)."""
    x = self._embed(tokens, positions)
    new_cache = []
    for block, layer_cache in zip(self.h, cache):
      x, layer_cache = block.decode(x, positions, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x).astype(jnp.float32), new_cache

  def tensor_layout(self) -> dict[str, Split]:
    """How tensor parallelism splits the linears (``astra_jax.parallel.tensor_layout``)."""
    width, _, heads = self.cfg.sizes
    return {"c_attn": Split("columns", parts=3, unit=width // heads, what="heads"),
            "c_proj": Split("rows", unit=width // heads, what="heads"),
            "c_fc": Split("columns"), "mlp_proj": Split("rows")}

  def empty_cache(self, batch: int, length: int, dtype=jnp.float32):
    width, layers, heads = self.cfg.sizes
    shape = (batch, length, heads, width // heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers)]
