"""Analytic FLOPs and memory traffic of one Transformer layer on one device.

The latency model (``astra_jax.netsim.latency``) turns these counts into seconds on a
device profile with a roofline.  Counts are per example (batch 1), 2 FLOPs per
multiply-add, for the sequence-parallel layer as ``astra_jax.core.attention``
computes it.  A device holds ``n = T/P + private`` query tokens (its share of
the T shared tokens plus per-device tokens such as ViT's class token) and
attends to ``Tk = T + private`` keys; masked logits (causal) are computed too,
as the dense implementation does.  With width D, H heads, MLP width M:

  qkv       2 n D (D + 2 Dkv)    Dkv = D, or KV heads x head dim with GQA
  scores    2 n Tk D            Q K^T over all heads
  softmax   5 n H Tk            max, subtract, exp, sum, divide
  values    2 n Tk D            weights @ V
  proj      2 n D D
  mlp       2 m n D M           m = 2 matrices (GELU MLP) or 3 (SwiGLU)
  total     4 n D^2 + 4 n D Dkv + 2 m n D M + 4 n Tk D + 5 n H Tk  (+ the exchange's work)
            (with Da for D in the query/projection/score terms: 4 n D Da, 4 n Tk Da)

Elementwise work (LayerNorm, GELU, residual adds, biases) is left out: XLA's
own FLOP count of a compiled layer is within 0.5% of this total for ViT-B/16
and GPT-2 small at 1024 tokens, 2% for GPT-2 micro and 5% for the 64-wide
ViT-mu (the last two are tested).

Memory traffic, unfused, ``itemsize`` bytes per element: weights and biases
read once; every activation (LayerNorm outputs, QKV, the full K/V, logits and
softmax weights, attention output, MLP hidden and output) written once and
read once:

  bytes = s (2 D Da + 2 D Dkv + m D M + 7 D + 2 Da + M)
          + 2 s (n (4 D + 2 Da + 2 Dkv + m M) + 2 Tk Dkv + 2 n H Tk)

Tensor parallelism (``tensor_layer_cost``): every device holds all T tokens
(n = T + private) and 1/P of the heads (H/P, Da = D/P, Dkv/P but at least one
K/V head, which GQA devices then compute redundantly) and of the MLP (M/P);
the residual stream, LayerNorms and biases stay whole.  The sync strategy
adds its own work through ``SYNC_COSTS`` (flash: quantizing and dequantizing).

Exchanges add their own work through ``EXCHANGE_COSTS`` (per device, P > 1):

  exact  nothing (the all_gather is communication only)
  ring   the online softmax at each of the P - 1 received blocks: rescale the
         float32 accumulator [n, D] and the running max/sum [n, H]:
         (P-1) (2 n D + 5 n H) FLOPs, (P-1) 8 (n D + 2 n H) bytes
  vq     per tensor (K and V), for the ns = T/P tokens this device encodes into
         G groups of K_cb entries: distances 2 ns K_cb Dkv + 2 ns G K_cb (|e|^2
         add and argmin) + 2 K_cb Dkv (|e|^2); bytes: the codebook twice (K_cb Dkv s
         each) and the distance matrix written and read (2 ns G K_cb s).
         Decoding is a gather whose output is the K/V already counted above.

  overlap=true on an exchange (``astra_jax.core.exchange``) adds one online-softmax
  merge (the own block's running sums rescaled when the other blocks are
  folded in): one ring step, 2 n D + 5 n H FLOPs, 8 (n D + 2 n H) bytes.

``local_attention_cost``: the part of the attention terms above over this
device's own Tl = T/P + private keys, which an overlapped exchange computes
while the K/V travel (``astra_jax.netsim.latency``'s ``layer_overlap_s``):

  local     4 n Tl Da + 5 n H Tl FLOPs;  bytes 2 s (2 Tl Dkv + 2 n H Tl)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs and bytes of memory traffic of some work on one device."""

  flops: float = 0.0
  bytes: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.bytes + other.bytes)

  def scale(self, k: float) -> "Cost":
    return Cost(self.flops * k, self.bytes * k)


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """What the cost of one Transformer layer depends on.

  tokens:  T, the whole shared sequence (split T/P over the devices)
  width, heads, mlp: D, H, M
  private: per-device tokens that never cross the mesh (ViT's class token)
  itemsize: bytes per activation/weight element (4 for float32)
  kv_width: Dkv, the K (or V) width per token (None: D; GQA: KV heads x head dim)
  mlp_matrices: 2 for a GELU MLP, 3 for SwiGLU (gate, up, down)
  attn_width: Da, the query/attention-output width (None: D); a tensor-parallel
           device holds D/P of it (``tensor_layer_cost``)
  """

  tokens: int
  width: int
  heads: int
  mlp: int
  private: int = 0
  itemsize: int = 4
  kv_width: int | None = None
  mlp_matrices: int = 2
  attn_width: int | None = None

  @property
  def kv(self) -> int:
    return self.width if self.kv_width is None else self.kv_width

  @property
  def attn(self) -> int:
    return self.width if self.attn_width is None else self.attn_width

  def local_tokens(self, mesh_size: int) -> int:
    if mesh_size < 1 or self.tokens % mesh_size:
      raise ValueError(f"{self.tokens} tokens do not split over {mesh_size} devices; "
                       f"choose a mesh size that divides {self.tokens}")
    return self.tokens // mesh_size


def layer_cost(shape: LayerShape, mesh_size: int, exchange: Any = None) -> Cost:
  """One layer's FLOPs and bytes on one of ``mesh_size`` devices (formula above)."""
  d, h, m, s = shape.width, shape.heads, shape.mlp, shape.itemsize
  dkv, mats, da = shape.kv, shape.mlp_matrices, shape.attn
  n = shape.local_tokens(mesh_size) + shape.private
  tk = shape.tokens + shape.private
  flops = 4 * n * d * da + 4 * n * d * dkv + 2 * mats * n * d * m + 4 * n * tk * da \
      + 5 * n * h * tk
  weights = 2 * d * da + 2 * d * dkv + mats * d * m + 7 * d + 2 * da + m
  activations = n * (4 * d + 2 * da + 2 * dkv + mats * m) + 2 * tk * dkv + 2 * n * h * tk
  cost = Cost(flops, s * weights + 2 * s * activations)
  if exchange is not None and mesh_size > 1:
    cost = cost + exchange_cost(exchange, shape, mesh_size)
  return cost


def local_attention_cost(shape: LayerShape, mesh_size: int) -> Cost:
  """The scores, softmax and values of one layer over this device's own keys
  only (``local`` in the module docstring)."""
  h, s, dkv, da = shape.heads, shape.itemsize, shape.kv, shape.attn
  n = tl = shape.local_tokens(mesh_size) + shape.private
  return Cost(4 * n * tl * da + 5 * n * h * tl, 2 * s * (2 * tl * dkv + 2 * n * h * tl))


def dense_cost(rows: int, fan_in: int, fan_out: int, itemsize: int = 4) -> Cost:
  """A linear layer applied to ``rows`` vectors (embeddings, heads)."""
  return Cost(2 * rows * fan_in * fan_out,
              itemsize * (fan_in * fan_out + fan_out + rows * (fan_in + fan_out)))


StrategyCost = Callable[[Any, LayerShape, int], Cost]


class CostModels:
  """Per-strategy extra work per layer and device (P > 1), by strategy name.

  ``what`` names the strategies in errors; ``decorator`` is the public name
  of ``register``, so a missing model's error says how to add one.
  """

  def __init__(self, what: str, decorator: str):
    self.what, self.decorator = what, decorator
    self.table: dict[str, StrategyCost] = {}

  def register(self, name: str):
    """Decorator: ``fn(strategy, shape, mesh_size) -> Cost`` for strategy ``name``."""
    def wrap(fn: StrategyCost) -> StrategyCost:
      self.table[name] = fn
      return fn
    return wrap

  def __call__(self, strategy: Any, shape: LayerShape, mesh_size: int) -> Cost:
    name = getattr(strategy, "name", strategy)
    if name not in self.table:
      raise ValueError(
          f"no compute-cost model for {self.what} {name!r}; add one to astra_jax.netsim.flops with "
          f"@{self.decorator}({name!r}) (known: {sorted(self.table)})")
    return self.table[name](strategy, shape, mesh_size)


EXCHANGE_COSTS = CostModels("exchange", "register_exchange_cost")
register_exchange_cost = EXCHANGE_COSTS.register  # the work an exchange adds
SYNC_COSTS = CostModels("tensor-parallel sync", "register_sync_cost")
register_sync_cost = SYNC_COSTS.register  # the work a tensor-parallel sync adds


def exchange_cost(exchange: Any, shape: LayerShape, mesh_size: int) -> Cost:
  """The extra work of ``exchange`` (an ``astra_jax.core.exchange`` strategy) per layer."""
  cost = EXCHANGE_COSTS(exchange, shape, mesh_size)
  if getattr(exchange, "overlap", False):
    cost = cost + _online_merge_cost(shape, mesh_size, steps=1)
  return cost


def _online_merge_cost(shape: LayerShape, mesh_size: int, steps: int) -> Cost:
  """``steps`` rescales of the float32 accumulator [n, D] and running max/sum [n, H]."""
  n, d, h = shape.local_tokens(mesh_size) + shape.private, shape.width, shape.heads
  return Cost(steps * (2 * n * d + 5 * n * h), steps * 2 * 4 * (n * d + 2 * n * h))


@register_exchange_cost("exact")
def _exact_cost(exchange, shape, mesh_size) -> Cost:
  del exchange, shape, mesh_size
  return Cost()


@register_exchange_cost("ring")
def _ring_cost(exchange, shape, mesh_size) -> Cost:
  del exchange
  return _online_merge_cost(shape, mesh_size, steps=mesh_size - 1)


@register_exchange_cost("vq")
def _vq_cost(exchange, shape, mesh_size) -> Cost:
  g, k, d, s = exchange.groups, exchange.codebook_size, shape.kv, shape.itemsize
  ns = shape.local_tokens(mesh_size)
  per_tensor = Cost(2 * ns * k * d + 2 * ns * g * k + 2 * k * d,
                    s * (2 * k * d + 2 * ns * g * k))
  return per_tensor.scale(2)


@register_exchange_cost("stream")
def _stream_cost(exchange, shape, mesh_size) -> Cost:
  """The vq work (encode and decode) with codes, none with exact K/V: the
  schedule differs from the all-gather's, not the arithmetic."""
  return _vq_cost(exchange, shape, mesh_size) if exchange.quantize else Cost()


def tensor_layer_cost(shape: LayerShape, mesh_size: int, sync: Any = None,
                      head_dim: int | None = None) -> Cost:
  """One layer's FLOPs and bytes on one of ``mesh_size`` tensor-parallel devices.

  ``head_dim`` (default D / H) sets the smallest K/V share a device can hold.
  """
  p = mesh_size
  head_dim = head_dim or shape.attn // shape.heads
  if shape.heads % p or shape.mlp % p:
    raise ValueError(f"{shape.heads} heads / MLP width {shape.mlp} do not split over {p} "
                     "tensor-parallel devices")
  local = dataclasses.replace(
      shape, tokens=shape.tokens, heads=shape.heads // p, mlp=shape.mlp // p,
      attn_width=shape.attn // p, kv_width=max(shape.kv // p, head_dim))
  cost = layer_cost(local, 1)
  if sync is not None and p > 1:
    cost = cost + SYNC_COSTS(sync, shape, p)
  return cost


@register_sync_cost("tp")
@register_sync_cost("spd")
def _psum_cost(sync, shape, mesh_size) -> Cost:
  del sync, shape, mesh_size
  return Cost()  # the all-reduce's additions are part of the collective


@register_sync_cost("flash")
def _flash_cost(sync, shape, mesh_size) -> Cost:
  """Per sync point (2 per layer), v = n D values: quantize all of them (min, max,
  scale, round: ~6 ops/value), dequantize and sum the P received chunks
  (2 v ops), requantize the own chunk (6 v / P) and dequantize everything (2 v);
  every pass reads and writes the values once."""
  v = (shape.tokens + shape.private) * shape.width
  flops = 6 * v + 2 * v + 6 * v / mesh_size + 2 * v
  return Cost(flops, shape.itemsize * 2 * 4 * v).scale(2)
