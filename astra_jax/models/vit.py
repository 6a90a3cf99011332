"""Vision Transformer (Flax NNX) with distributed class tokens.

The model sees a sequence of patches and their global positions; how that
sequence is split over devices is not its business.  Each device's part of
the sequence gets its own copy of the class token, placed first and private
to that device (``SequenceAttention(private=1)``): it attends to the local
patches exactly and to other devices' patches through the exchange.  The
logits are then reduced over the sequence axis:

  class_token="distributed"  mean of the per-device logits (ASTRA).  Averaging
                             logits rather than features keeps the head
                             linear in each device's view and matches
                             ensembling; with exact exchange all copies are
                             equal, so P devices give the P=1 result.
  class_token="single"       device 0's logits only (one class token that sees
                             the other devices' patches only through the
                             exchange), for comparison.

With one device both are a standard ViT.  Variants: "mu", "xs", "Ti", "S", "B", "L"
with "/patch", e.g. "Ti/4" or "B/16".
"""

from __future__ import annotations

import dataclasses

import einops
import jax.numpy as jnp
from flax import nnx

from astra_jax.core.attention import SequenceAttention
from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.core.axes import seq_first, seq_mean
from astra_jax.core.sync import ExactSync, Split, Sync

# width, depth, heads, mlp width
VARIANTS = {
    "mu": (64, 4, 4, 128),
    "xs": (128, 4, 4, 512),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}
CLASS_TOKENS = ("distributed", "single")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  variant: str = "mu/4"
  image_size: int = 32
  channels: int = 1
  num_classes: int = 10
  class_token: str = "distributed"
  exchange: Exchange = ExactExchange()
  sync: Sync = ExactSync()  # tensor-parallel all-reduces (inert without a tp axis)
  dtype: str = "float32"

  def __post_init__(self):
    name, _, patch = self.variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
      raise ValueError(f"unknown ViT variant {self.variant!r}; use NAME/PATCH with NAME in "
                       f"{sorted(VARIANTS)}, e.g. 'Ti/4'")
    if self.image_size % int(patch):
      raise ValueError(f"image size {self.image_size} is not a multiple of patch {patch}")
    if self.class_token not in CLASS_TOKENS:
      raise ValueError(f"class_token must be one of {CLASS_TOKENS}, got {self.class_token!r}")
    self.sync.check_layers(self.sizes[1])

  @property
  def patch(self) -> int:
    return int(self.variant.split("/")[1])

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    return VARIANTS[self.variant.split("/")[0]]

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2


def patchify(images: jnp.ndarray, patch: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patch order."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class Block(nnx.Module):
  """Pre-norm Transformer encoder block."""

  def __init__(self, cfg: ViTConfig, layer: int, *, rngs: nnx.Rngs):
    width, _, heads, mlp = cfg.sizes
    self.head_dim = width // heads
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.attn = SequenceAttention(cfg.exchange, width, causal=False, private=1, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.attn_sync = cfg.sync.site(layer, "attn")
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp, rngs=rngs)
    self.fc2 = nnx.Linear(mlp, width, rngs=rngs)
    self.mlp_sync = cfg.sync.site(layer, "mlp")

  def __call__(self, x):
    q, k, v = einops.rearrange(self.qkv(self.ln1(x)), "b t (n h d) -> n b t h d",
                               n=3, d=self.head_dim)
    attn = self.proj(einops.rearrange(self.attn(q, k, v), "b t h d -> b t (h d)"))
    x, pending = self.attn_sync(x, attn)
    return self.mlp_sync(x, self.fc2(nnx.gelu(self.fc1(self.ln2(x)))), pending)[0]


class ViT(nnx.Module):
  """ViT classifier over (a device's share of) the patch sequence."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    width, depth, heads, mlp = cfg.sizes
    self.cfg = cfg
    self.embed = nnx.Linear(cfg.patch * cfg.patch * cfg.channels, width, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls = nnx.Param(init(rngs.params(), (1, 1, width)))
    self.pos = nnx.Param(init(rngs.params(), (1, cfg.num_patches + 1, width)))
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, cfg.num_classes, rngs=rngs,
                           kernel_init=nnx.initializers.zeros_init())

  def __call__(self, patches: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """patches [B, N, p*p*C], positions [N] (global patch indices) -> logits [B, classes]."""
    x = self.embed(patches) + self.pos[:, positions + 1]
    cls = jnp.broadcast_to(self.cls + self.pos[:, :1], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln(x[:, 0]))
    return seq_mean(logits) if self.cfg.class_token == "distributed" else seq_first(logits)

  def tensor_layout(self) -> dict[str, Split]:
    """How tensor parallelism splits the linears (``astra_jax.parallel.tensor_layout``)."""
    width, _, heads, _ = self.cfg.sizes
    return {"qkv": Split("columns", parts=3, unit=width // heads, what="heads"),
            "proj": Split("rows", unit=width // heads, what="heads"),
            "fc1": Split("columns"), "fc2": Split("rows")}
