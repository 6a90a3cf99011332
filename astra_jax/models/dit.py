"""Diffusion Transformer (DiT, Peebles & Xie 2023) in Flax NNX, mesh-free.

The model maps a (device's share of the) noisy patch sequence, the time step
and the class label to a per-patch prediction of the same shape (the
velocity of a flow-matching sampler, ``astra_jax.diffusion.flow``); it knows
neither the sampler nor the mesh:

  patches [B, N, p*p*C], positions [N] (global patch indices, row-major),
  t [B] in [0, 1], labels [B] (``num_classes`` = the null class of
  classifier-free guidance)  ->  [B, N, p*p*C]

Pieces, as in the reference design: a linear patch embedding; fixed 2-D
sin-cos positions added at the input (a table, not parameters); a sinusoidal
time-step embedding through a 2-layer MLP plus a class embedding with one
extra row for the null class, summed into the conditioning vector c; blocks
with adaLN-Zero (c -> shift, scale and gate of both residual branches, the
modulation's linear initialised to zero so every block starts as the
identity); a final adaLN layer and a zero-initialised linear back to
patches.  Attention goes through ``SequenceAttention(causal=False)``, so
the exchange strategies (exact, ring, vq, stale, ...) apply unchanged: under
a mesh each device holds a band of patch rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import einops
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core.attention import SequenceAttention
from astra_jax.core.exchange import Exchange, ExactExchange

FREQ_DIM = 256  # width of the sinusoidal time-step features
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, like integer DDPM steps


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  image_size: int = 32
  channels: int = 1
  patch: int = 4
  width: int = 128
  depth: int = 6
  heads: int = 4
  mlp_ratio: int = 4
  num_classes: int = 10
  exchange: Exchange = ExactExchange()

  def __post_init__(self):
    if self.patch < 1 or self.image_size % self.patch:
      raise ValueError(f"image size {self.image_size} is not a multiple of patch "
                       f"{self.patch}: the patches must tile the image")
    if self.width % self.heads:
      raise ValueError(f"DiT width {self.width} is not a multiple of its {self.heads} heads")
    if self.width % 4:
      raise ValueError(f"DiT width {self.width} must be a multiple of 4 (2-D sin-cos positions)")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

  @property
  def grid(self) -> int:
    """Patches along each side of the (square) image: the patch rows."""
    return self.image_size // self.patch

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch * self.patch * self.channels

  @property
  def null_class(self) -> int:
    """The label that means "no class" (classifier-free guidance)."""
    return self.num_classes


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim]: sin of dim/2 frequencies, then cos."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.asarray(positions, np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """The fixed position table [grid*grid, dim], row-major: half the channels
  encode the column, half the row."""
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, cols.reshape(-1)),
                         sincos_1d(dim // 2, rows.reshape(-1))], axis=1).astype(np.float32)


def timestep_features(t: jnp.ndarray, dim: int = FREQ_DIM) -> jnp.ndarray:
  """t [B] in [0, 1] -> [B, dim] sinusoidal features of t * TIME_SCALE (cos, then sin)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * TIME_SCALE)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, per example ([B, D] broadcast over tokens)."""
  return x * (1 + scale[:, None]) + shift[:, None]


def _zeros_linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.zeros_init(),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without its own scale and shift (adaLN supplies them)."""
  return nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)


class Block(nnx.Module):
  """A DiT block with adaLN-Zero conditioning."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    width = cfg.width
    self.head_dim = width // cfg.heads
    self.norm1 = _norm(width, rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.attn = SequenceAttention(cfg.exchange, width, causal=False, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = _norm(width, rngs)
    self.fc1 = nnx.Linear(width, cfg.mlp_ratio * width, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_ratio * width, width, rngs=rngs)
    self.ada = _zeros_linear(width, 6 * width, rngs)

  def __call__(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
    q, k, v = einops.rearrange(self.qkv(modulate(self.norm1(x), shift1, scale1)),
                               "b t (n h d) -> n b t h d", n=3, d=self.head_dim)
    attn = self.proj(einops.rearrange(self.attn(q, k, v), "b t h d -> b t (h d)"))
    x = x + gate1[:, None] * attn
    mlp = self.fc2(nnx.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate=True))
    return x + gate2[:, None] * mlp


class DiT(nnx.Module):
  """Class-conditional DiT over (a device's share of) the patch sequence."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    width = cfg.width
    self.embed = nnx.Linear(cfg.patch_dim, width, rngs=rngs)
    self.t_fc1 = nnx.Linear(FREQ_DIM, width, rngs=rngs,
                            kernel_init=nnx.initializers.normal(0.02))
    self.t_fc2 = nnx.Linear(width, width, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
    self.classes = nnx.Embed(cfg.num_classes + 1, width, rngs=rngs,
                             embedding_init=nnx.initializers.normal(0.02))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = _norm(width, rngs)
    self.final_ada = _zeros_linear(width, 2 * width, rngs)
    self.out = _zeros_linear(width, cfg.patch_dim, rngs)

  def condition(self, t: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """c [B, width]: the time-step embedding plus the class embedding."""
    temb = self.t_fc2(nnx.silu(self.t_fc1(timestep_features(t))))
    return temb + self.classes(labels)

  def __call__(self, patches, positions, t, labels):
    x = self.embed(patches) + jnp.asarray(sincos_2d(self.cfg.width, self.cfg.grid))[positions][None]
    c = self.condition(t, labels)
    for block in self.blocks:
      x = block(x, c)
    shift, scale = jnp.split(self.final_ada(nnx.silu(c)), 2, axis=-1)
    return self.out(modulate(self.norm(x), shift, scale))


def patchify(images: jnp.ndarray, patch: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patch order."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: jnp.ndarray, patch: int, channels: int) -> jnp.ndarray:
  """The inverse of ``patchify`` for square images."""
  grid = int(round(math.sqrt(patches.shape[1])))
  return einops.rearrange(patches, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, w=grid,
                          p=patch, q=patch, c=channels)


def band_rows(cfg: DiTConfig, mesh_size: int) -> int:
  """Patch rows per device when the grid is split into ``mesh_size`` equal bands."""
  if mesh_size < 1 or cfg.grid % mesh_size:
    ok = [p for p in (1, 2, 4, 8, 16) if cfg.grid % p == 0]
    raise ValueError(f"the {cfg.grid} patch rows of a {cfg.image_size}px image with patch "
                     f"{cfg.patch} do not split into {mesh_size} equal bands: use --mesh "
                     f"in {ok}")
  return cfg.grid // mesh_size

