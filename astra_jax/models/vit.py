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
with "/patch", e.g. "Ti/4" or "B/16", or "custom/patch" with width, depth,
heads and mlp given (a pretrained checkpoint's sizes, ``astra_jax.io.hf_vit``).

The block is the pre-norm one of ViT and DINOv2 (biases everywhere); the
options a checkpoint may need and our own runs leave at their defaults:
``layer_scale`` (DINOv2: a learned per-channel scale on each residual
branch, ``x + ls * branch``), ``gelu`` ("tanh" approximation, ours, or
"exact", the erf form of transformers' "gelu") and ``layer_norm_eps``.
``features`` returns the final-layernormed tokens (transformers'
``last_hidden_state`` of this device's part); the head reads the class token.
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
GELUS = ("tanh", "exact")


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
  # variant "custom/PATCH" takes its sizes from here
  width: int | None = None
  depth: int | None = None
  heads: int | None = None
  mlp: int | None = None
  layer_scale: bool = False  # DINOv2's per-channel scale of both residual branches
  gelu: str = "tanh"  # "tanh" | "exact" (erf)
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    name, _, patch = self.variant.partition("/")
    custom = (self.width, self.depth, self.heads, self.mlp)
    if name == "custom":
      if None in custom:
        raise ValueError("ViT variant 'custom/PATCH' needs width, depth, heads and mlp")
    elif name not in VARIANTS:
      patch = ""  # the message below
    elif custom != (None,) * 4:
      raise ValueError(f"ViT variant {self.variant!r} has its own sizes; width, depth, heads "
                       "and mlp are for 'custom/PATCH'")
    if not patch.isdigit() or not int(patch):
      raise ValueError(f"unknown ViT variant {self.variant!r}; use NAME/PATCH with NAME in "
                       f"{sorted(VARIANTS)}, e.g. 'Ti/4' (or 'custom/PATCH' with sizes)")
    if self.image_size % int(patch):
      raise ValueError(f"image size {self.image_size} is not a multiple of patch {patch}: "
                       f"the patches must tile the image (use a multiple of {patch})")
    if self.class_token not in CLASS_TOKENS:
      raise ValueError(f"class_token must be one of {CLASS_TOKENS}, got {self.class_token!r}")
    if self.gelu not in GELUS:
      raise ValueError(f"gelu must be one of {GELUS}, got {self.gelu!r}")
    width, depth, heads, _ = self.sizes
    if width % heads:
      raise ValueError(f"ViT width {width} is not a multiple of its {heads} heads")
    self.sync.check_layers(depth)

  @property
  def patch(self) -> int:
    return int(self.variant.split("/")[1])

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    """(width, depth, heads, mlp width)."""
    name = self.variant.split("/")[0]
    return (self.width, self.depth, self.heads, self.mlp) if name == "custom" else VARIANTS[name]

  @property
  def grid(self) -> int:
    """Patches along each side of the (square) image."""
    return self.image_size // self.patch

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2


def patchify(images: jnp.ndarray, patch: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patch order."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class Block(nnx.Module):
  """Pre-norm Transformer encoder block (with DINOv2's layer scale if asked)."""

  def __init__(self, cfg: ViTConfig, layer: int, *, rngs: nnx.Rngs):
    width, _, heads, mlp = cfg.sizes
    self.head_dim = width // heads
    self.approximate_gelu = cfg.gelu == "tanh"
    self.layer_scale = cfg.layer_scale
    self.ln1 = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.attn = SequenceAttention(cfg.exchange, width, causal=False, private=1, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.attn_sync = cfg.sync.site(layer, "attn")
    self.ln2 = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp, rngs=rngs)
    self.fc2 = nnx.Linear(mlp, width, rngs=rngs)
    self.mlp_sync = cfg.sync.site(layer, "mlp")
    if cfg.layer_scale:
      self.ls1 = nnx.Param(jnp.ones((width,)))
      self.ls2 = nnx.Param(jnp.ones((width,)))

  def __call__(self, x):
    q, k, v = einops.rearrange(self.qkv(self.ln1(x)), "b t (n h d) -> n b t h d",
                               n=3, d=self.head_dim)
    attn = self.proj(einops.rearrange(self.attn(q, k, v), "b t h d -> b t (h d)"))
    if self.layer_scale:  # scales are linear: before a tensor-parallel all-reduce is fine
      attn = attn * self.ls1
    x, pending = self.attn_sync(x, attn)
    mlp = self.fc2(nnx.gelu(self.fc1(self.ln2(x)), approximate=self.approximate_gelu))
    if self.layer_scale:
      mlp = mlp * self.ls2
    return self.mlp_sync(x, mlp, pending)[0]


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
    self.ln = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.head = nnx.Linear(width, cfg.num_classes, rngs=rngs,
                           kernel_init=nnx.initializers.zeros_init())

  def features(self, patches: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """patches [B, N, p*p*C], positions [N] (global patch indices) -> the final
    layernorm's output [B, 1 + N, width]: this device's class token, then its patches."""
    return self.ln(self._encode(patches, positions))

  def __call__(self, patches: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """patches [B, N, p*p*C], positions [N] (global patch indices) -> logits [B, classes]."""
    logits = self.head(self.ln(self._encode(patches, positions)[:, 0]))
    return seq_mean(logits) if self.cfg.class_token == "distributed" else seq_first(logits)

  def _encode(self, patches, positions):
    x = self.embed(patches) + self.pos[:, positions + 1]
    cls = jnp.broadcast_to(self.cls + self.pos[:, :1], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    for block in self.blocks:
      x = block(x)
    return x

  def tensor_layout(self) -> dict[str, Split]:
    """How tensor parallelism splits the linears (``astra_jax.parallel.tensor_layout``)."""
    width, _, heads, _ = self.cfg.sizes
    return {"qkv": Split("columns", parts=3, unit=width // heads, what="heads"),
            "proj": Split("rows", unit=width // heads, what="heads"),
            "fc1": Split("columns"), "fc2": Split("rows")}
