"""Tensor parallelism as models see it: split declarations, sync points, sync strategies.

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

How parameters are laid out for P devices (``astra_jax.parallel.tensor_layout``)
and the ``shard_map`` runner (``astra_jax.parallel.tensor_apply``) live above
this file; Flash Communication's quantized all-reduce is ``astra_jax.core.flash``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from astra_jax.core import flash
from astra_jax.core.axes import current_tp_axis
from astra_jax.core.specs import Registry


# ---------------------------------------------------------------------------
# Sync strategies: what an all-reduce at a sync point becomes.

SYNCS = Registry("tensor-parallel sync", "sync", example="flash:bits=4,group_size=128")
register = SYNCS.register
available = SYNCS.available
make_sync = SYNCS.make  # name, **options -> a strategy
from_spec = SYNCS.from_spec  # 'flash:bits=4,group_size=128' or 'spd:drop=1+3' -> a strategy


def is_spec(spec: str) -> bool:
  """Whether ``spec`` names a tensor-parallel strategy (else a K/V exchange)."""
  return spec.partition(":")[0].strip() in SYNCS


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
    return flash.all_reduce(x, axis_name, self.bits, self.group_size)

  def all_reduce_bytes(self, values, mesh_size):
    chunk = flash.padded(values, mesh_size, self.group_size) // mesh_size
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
# What a model declares about each linear layer.

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
