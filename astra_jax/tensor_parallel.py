"""Tensor parallelism (Megatron style) and its compressed all-reduces: SPD, Flash Communication.

The baselines ASTRA is compared against split the *weights*, not the tokens:
every one of P devices sees the whole sequence and holds 1/P of each block's
heads and MLP columns.  Per block:

  column-parallel  QKV (by heads) and the first MLP matrices (by columns): no
                   communication, each device computes its own heads / columns
  row-parallel     attention output projection and the last MLP matrix: each
                   device's product is a partial sum of the true output
  sync point       the partial sums are all-reduced into the residual stream,
                   twice per block (after attention, after the MLP)

Model code knows none of this.  A model declares, as data, how its linears
split (``Split`` entries from ``tensor_layout``) and ends each row-parallel
linear at a ``SyncPoint`` (``residual + all_reduce(partial)``), which is the
identity plus an add when no ``tp`` axis is set.  ``tensor_apply`` lays the
parameters out for P devices and runs the model under ``jax.shard_map`` over
the ``tp`` axis.  Row-parallel biases are carried as P copies of bias/P, so
the all-reduce adds the bias exactly once and gradients flow unchanged.

What happens at a sync point is the strategy, chosen by config (``sync``):

  tp     exact ``psum`` at every sync point (2 all-reduces per block)
  spd    Sync-Point Drop: in the blocks listed in ``drop`` the all-reduce after
         attention is skipped; each device's MLP reads the residual plus its
         own partial attention output, and the one all-reduce after the MLP
         sums both partials: x + sum_r (a_r + mlp_r(x + a_r)).  Exact in
         every other block.
  flash  Flash Communication: each all-reduce is two low-bit steps.  The
         partial sum is cut into P chunks, each quantized group-wise
         (asymmetric, ``bits`` per value, an fp16 scale and minimum per
         ``group_size`` values) and sent by ``all_to_all`` to the device that
         owns the chunk; it dequantizes, sums, requantizes its chunk and an
         ``all_gather`` returns every chunk to everyone, who dequantizes.
         Bytes per device and all-reduce (n values):
           exact ring all-reduce  2 (P-1)/P n 4          (float32)
           flash                  2 (P-1)/P n (bits/8 + 4/group_size)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from astra_jax import packing
from astra_jax.specs import parse_spec

TP_AXIS = "tp"

_tp_axis: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "astra_tp_axis", default=None)


def current_tp_axis() -> str | None:
  """The mesh axis the weights are split over, or None without tensor parallelism."""
  return _tp_axis.get()


@contextlib.contextmanager
def tp_axis(name: str | None):
  token = _tp_axis.set(name)
  try:
    yield
  finally:
    _tp_axis.reset(token)


# ---------------------------------------------------------------------------
# Sync strategies: what an all-reduce at a sync point becomes.

_REGISTRY: dict[str, type["Sync"]] = {}


def register(cls):
  _REGISTRY[cls.name] = cls
  return cls


def available() -> list[str]:
  return sorted(_REGISTRY)


def make_sync(name: str, **options) -> "Sync":
  """A sync strategy by name; unknown names or options raise ValueError naming the fix."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown tensor-parallel sync {name!r}; choose one of {available()}")
  cls = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"sync {name!r} has no option(s) {unknown}; its options are "
                     f"{sorted(fields)}")
  return cls(**options)


def from_spec(spec: str) -> "Sync":
  """'flash:bits=4,group_size=128' or 'spd:drop=1+3' -> a strategy."""
  name, options = parse_spec(spec, example="flash:bits=4,group_size=128")
  return make_sync(name, **options)


def is_spec(spec: str) -> bool:
  """Whether ``spec`` names a tensor-parallel strategy (else a K/V exchange)."""
  return spec.partition(":")[0].strip() in _REGISTRY


class Pending(NamedTuple):
  """A sync point SPD skipped: the residual it would have added to and this
  device's partial output, both merged at the next sync point."""

  residual: jnp.ndarray
  partial: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Sync:
  """Base strategy: an exact all-reduce at every sync point."""

  name: ClassVar[str] = "base"

  def defers(self, layer: int, where: str) -> bool:
    """Whether the sync point ``where`` ("attn" | "mlp") of block ``layer`` is skipped."""
    del layer, where
    return False

  def check_layers(self, layers: int) -> None:
    """ValueError when the strategy names blocks the model does not have."""
    del layers

  def all_reduce(self, x: jnp.ndarray, axis_name: str) -> jnp.ndarray:
    return jax.lax.psum(x, axis_name)

  def all_reduce_bytes(self, values: int, mesh_size: int) -> int:
    """Operand bytes one device hands to the collectives of one all-reduce of
    ``values`` float32 numbers (what ``traffic.hlo_traffic`` reads)."""
    del mesh_size
    return 4 * values

  def site(self, layer: int, where: str) -> "SyncPoint":
    return SyncPoint(self, layer, where)

  def spec(self) -> str:
    """The spec string ``from_spec`` reads back, e.g. 'flash:bits=4,group_size=128'."""
    def text(v):
      return "+".join(map(str, v)) if isinstance(v, tuple) else str(v)
    options = ",".join(f"{f.name}={text(getattr(self, f.name))}"
                       for f in dataclasses.fields(self))
    return f"{self.name}:{options}" if options else self.name


@register
@dataclasses.dataclass(frozen=True)
class ExactSync(Sync):
  """Megatron tensor parallelism: ``psum`` at both sync points of every block."""

  name: ClassVar[str] = "tp"


@register
@dataclasses.dataclass(frozen=True)
class SPDSync(Sync):
  """Sync-Point Drop: skip the all-reduce after attention in the ``drop`` blocks.

  ``drop``: block indices, a tuple or a spec string '1+3+5' (empty: plain tp),
  or "all" (every block: one all-reduce per block, SPD's largest saving).
  """

  name: ClassVar[str] = "spd"
  drop: Any = ()

  def __post_init__(self):
    drop = self.drop
    if drop == "all":
      return
    if isinstance(drop, str):
      drop = [d for d in drop.replace(" ", "").split("+") if d]
    elif isinstance(drop, int):
      drop = [drop]
    try:
      drop = tuple(sorted({int(d) for d in drop}))
    except (TypeError, ValueError):
      raise ValueError(f"spd drop must be block indices like 'spd:drop=1+3', got "
                       f"{self.drop!r}") from None
    if any(d < 0 for d in drop):
      raise ValueError(f"spd drop indices must be >= 0, got {drop}")
    object.__setattr__(self, "drop", drop)

  def defers(self, layer, where):
    return where == "attn" and (self.drop == "all" or layer in self.drop)

  def check_layers(self, layers):
    bad = [] if self.drop == "all" else [d for d in self.drop if d >= layers]
    if bad:
      raise ValueError(f"spd drops block(s) {bad} but the model has {layers} blocks "
                       f"(0..{layers - 1})")


@register
@dataclasses.dataclass(frozen=True)
class FlashSync(Sync):
  """Flash Communication: two-step all-reduce of group-wise quantized values."""

  name: ClassVar[str] = "flash"
  bits: int = 4
  group_size: int = 128

  def __post_init__(self):
    if self.bits not in (2, 4, 8):
      raise ValueError(f"flash bits must be 2, 4 or 8 (INT4 default, INT8 option), "
                       f"got {self.bits}")
    if self.group_size < 2 or (self.group_size * self.bits) % 8:
      raise ValueError(f"flash group_size must be >= 2 and fill whole bytes at "
                       f"{self.bits} bits, got {self.group_size}")

  def all_reduce(self, x, axis_name):
    return _flash_all_reduce(x, axis_name, self.bits, self.group_size)

  def all_reduce_bytes(self, values, mesh_size):
    chunk = _padded(values, mesh_size, self.group_size) // mesh_size
    per_chunk = chunk * self.bits // 8 + 4 * (chunk // self.group_size)
    return mesh_size * per_chunk + per_chunk  # all_to_all of every chunk + all_gather of one


# ---------------------------------------------------------------------------
# The sync point models call.

@dataclasses.dataclass(frozen=True)
class SyncPoint:
  """``residual + all_reduce(partial)`` for one row-parallel linear of one block.

  ``__call__(residual, partial, pending=None) -> (new residual, pending)``.
  Without a ``tp`` axis it is ``residual + partial``.  A point SPD defers
  returns this device's ``residual + partial`` and a ``Pending`` that the next
  point (pass it as ``pending``) folds into its all-reduce.
  """

  sync: Sync
  layer: int
  where: str

  def __call__(self, residual, partial, pending: Pending | None = None):
    axis = current_tp_axis()
    partial = partial.astype(residual.dtype)
    if axis is None:
      return residual + partial, None
    if self.sync.defers(self.layer, self.where):
      if pending is not None:
        raise ValueError("two sync points in a row were dropped; SPD drops only the one "
                         "after attention")
      return residual + partial, Pending(residual, partial)
    if pending is not None:
      residual, partial = pending.residual, partial + pending.partial
    return residual + self.sync.all_reduce(partial, axis), None


# ---------------------------------------------------------------------------
# Flash Communication's quantized all-reduce.

def _padded(values: int, mesh_size: int, group: int) -> int:
  unit = mesh_size * group
  return -(-values // unit) * unit


def quantize_groups(x: jnp.ndarray, bits: int):
  """Asymmetric per-group quantization of x [..., group] -> (uint codes, scale, minimum).

  code = round((x - min) / scale) with scale = (max - min) / (2^bits - 1), so
  a value is off by at most scale / 2 (plus fp16 rounding of scale and min).
  """
  lo = jnp.min(x, axis=-1, keepdims=True).astype(jnp.float16)
  hi = jnp.max(x, axis=-1, keepdims=True)
  scale = ((hi - lo.astype(x.dtype)) / (2 ** bits - 1)).astype(jnp.float16)
  safe = jnp.where(scale > 0, scale, jnp.float16(1)).astype(x.dtype)
  codes = jnp.clip(jnp.round((x - lo.astype(x.dtype)) / safe), 0, 2 ** bits - 1)
  return codes.astype(jnp.int32), scale, lo


def dequantize_groups(codes, scale, lo, dtype):
  return codes.astype(dtype) * scale.astype(dtype) + lo.astype(dtype)


def _pack(x, bits, group):
  """[..., group] float -> (uint8 codes [..., group*bits/8], fp16 [..., 2] scale and min)."""
  codes, scale, lo = quantize_groups(x, bits)
  return packing.pack_codes(codes, 2 ** bits), jnp.concatenate([scale, lo], axis=-1)


def _unpack(packed, meta, bits, group, dtype):
  codes = packing.unpack_codes(packed, group, 2 ** bits)
  return dequantize_groups(codes, meta[..., :1], meta[..., 1:], dtype)


def _flash_forward(x, axis_name, bits, group):
  p = jax.lax.axis_size(axis_name)
  n = x.size
  total = _padded(n, p, group)
  flat = jnp.pad(x.reshape(-1), (0, total - n))
  chunks = flat.reshape(p, total // (p * group), group)  # chunk j is reduced by device j
  # step 1: every device's chunk j to device j, which dequantizes and sums them
  got = [jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True) for a in _pack(chunks, bits, group)]
  mine = jnp.sum(_unpack(*got, bits, group, x.dtype), axis=0)
  # step 2: the reduced chunk requantized and gathered by everyone
  full = [jax.lax.all_gather(a, axis_name, axis=0, tiled=False, to="invarying")
          for a in _pack(mine, bits, group)]
  return _unpack(*full, bits, group, x.dtype).reshape(-1)[:n].reshape(x.shape)


def _flash_all_reduce(x, axis_name, bits, group):
  """Sum over ``axis_name`` through Flash Communication's two quantized steps.

  Gradients pass straight through the quantizers: the cotangent of a sum is
  broadcast back unchanged, as for an exact ``psum``.
  """
  @jax.custom_vjp
  def f(x):
    return _flash_forward(x, axis_name, bits, group)

  def fwd(x):
    return f(x), None

  def bwd(_, g):
    return (jax.lax.pcast(g, axis_name, to="varying"),)

  f.defvjp(fwd, bwd)
  return f(x)


# ---------------------------------------------------------------------------
# Parameter layout and the shard_map runner.

@dataclasses.dataclass(frozen=True)
class Split:
  """How one linear layer splits over tensor-parallel devices.

  kind:  "columns" (output features: kernel [in, out] and bias [out] split on
         out) or "rows" (input features: kernel split on in; the bias is added
         once, after the all-reduce)
  parts: fused outputs side by side (3 for a fused q|k|v): each part splits
         on its own, so a device gets its heads of q, of k and of v
  unit:  features that must stay together (head_dim for attention: whole
         heads; 1 for MLP columns)
  what:  the name of a unit in error messages ("heads", "K/V heads", "columns")
  repeat: with fewer units than devices (K/V heads under GQA), each unit is
         copied to the P / units devices whose query heads read it, as
         Megatron and vLLM do; those devices compute it redundantly
  """

  kind: str
  parts: int = 1
  unit: int = 1
  what: str = "columns"
  repeat: bool = False

  def __post_init__(self):
    if self.kind not in ("columns", "rows"):
      raise ValueError(f"Split kind must be 'columns' or 'rows', got {self.kind!r}")


def _names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _leaf_split(layout: dict[str, Split], path) -> tuple[Split | None, str, str]:
  names = _names(path)
  if names and names[-1] == "value":
    names = names[:-1]
  module = str(names[-2]) if len(names) > 1 else ""
  leaf = str(names[-1])
  return layout.get(module), leaf, "/".join(map(str, names))


def shard_params(params: Any, layout: dict[str, Split], mesh_size: int):
  """(params in tensor-parallel layout, their PartitionSpecs) for ``mesh_size`` devices.

  Column splits view kernel [in, parts*out] as [in, parts, out] and split out;
  row splits split the kernel's rows and carry the bias as [P, out] copies of
  bias/P.  Everything else (norms, embeddings, heads) is replicated.  Raises
  ValueError naming the fix when a split does not divide.
  """
  def one(path, x):
    split, leaf, name = _leaf_split(layout, path)
    if split is None:
      return x, PartitionSpec()
    if split.kind == "rows" and leaf == "bias":  # added once, after the all-reduce
      return jnp.broadcast_to(x / mesh_size, (mesh_size, *x.shape)), PartitionSpec(TP_AXIS)
    dim = x.ndim - 1 if split.kind == "columns" else 0
    size = x.shape[dim] // split.parts
    units = size // split.unit
    if split.repeat and split.kind == "columns" and units < mesh_size \
        and mesh_size % units == 0:
      viewed = x.reshape(*x.shape[:-1], units, split.unit)
      viewed = jnp.repeat(viewed, mesh_size // units, axis=-2)
      viewed = viewed.reshape(*x.shape[:-1], 1, mesh_size * split.unit)
      return viewed, PartitionSpec(*([None] * (viewed.ndim - 1)), TP_AXIS)
    if x.shape[dim] % split.parts or size % (mesh_size * split.unit):
      raise ValueError(
          f"{name}: {size // split.unit} {split.what} do not split over {mesh_size} "
          f"tensor-parallel devices; choose a device count that divides "
          f"{size // split.unit}")
    if split.kind == "rows":
      return x, PartitionSpec(TP_AXIS)
    viewed = x.reshape(*x.shape[:-1], split.parts, size)
    return viewed, PartitionSpec(*([None] * (viewed.ndim - 1)), TP_AXIS)

  pairs = jax.tree_util.tree_map_with_path(one, params)
  is_pair = lambda t: isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], PartitionSpec)
  values = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
  specs = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
  return values, specs


def local_params(params: Any, layout: dict[str, Split]) -> Any:
  """Inverse view inside ``shard_map``: one device's shards in the model's shapes."""
  def one(path, x):
    split, leaf, _ = _leaf_split(layout, path)
    if split is None:
      return x
    if split.kind == "rows":
      return x[0] if leaf == "bias" else x  # [1, out] -> [out]
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

  return jax.tree_util.tree_map_with_path(one, params)


def _check_unsplit(rest: Any, layout: dict[str, Split]) -> None:
  """Weights outside ``nnx.Param`` (int8 kernels and scales) are not laid out
  for tensor parallelism; refuse them instead of failing on shapes in XLA."""
  for path, _ in jax.tree_util.tree_flatten_with_path(rest)[0]:
    split, _, name = _leaf_split(layout, path)
    if split is not None:
      raise ValueError(f"{name} is not a float parameter (int8 weight-only?); tensor "
                       "parallelism splits float weights: run --tp on a float model")


def make_tp_mesh(num_devices: int) -> Mesh:
  from astra_jax.mesh import make_seq_mesh
  return make_seq_mesh(num_devices, axis=TP_AXIS)


def tensor_apply(graphdef, mesh: Mesh | None, layout: dict[str, Split], *, inputs: int,
                 train: bool = False) -> Callable[..., Any]:
  """``apply(params, rest, *inputs) -> (outputs, rest, aux_loss)`` over a ``tp`` mesh.

  The same contract as ``apply.sequence_apply``: ``params`` in the model's own
  layout (as checkpoints store them), inputs and outputs whole on every
  device.  Differentiable in ``params``.  With ``mesh=None``: one device.
  """
  from astra_jax import apply
  body_fn = apply.model_body(graphdef, train)
  if mesh is None:
    return body_fn
  size = mesh.shape[TP_AXIS]

  def body(tp_params, rest, *args):
    with tp_axis(TP_AXIS):
      return body_fn(local_params(tp_params, layout), rest, *args)

  def run(params, rest, *args):
    if len(args) != inputs:
      raise ValueError(f"expected {inputs} inputs, got {len(args)}")
    _check_unsplit(rest, layout)
    tp_params, specs = shard_params(params, layout, size)
    mapped = jax.shard_map(body, mesh=mesh,
                           in_specs=(specs, PartitionSpec(), *[PartitionSpec()] * inputs),
                           out_specs=PartitionSpec())
    return mapped(tp_params, rest, *args)

  return run
