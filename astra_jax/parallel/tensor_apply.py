"""Running a model tensor-parallel (Megatron style) over a ``tp`` mesh axis.

Every one of P devices sees the whole sequence and holds 1/P of each block's
heads and MLP columns (``astra_jax.parallel.tensor_layout``); row-parallel
linears end at sync points whose all-reduce is the configured strategy
(``astra_jax.core.sync``: tp, spd, flash).  ``tensor_apply`` has the contract
of ``astra_jax.parallel.apply.sequence_apply``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from astra_jax.core.axes import TP_AXIS, tp_axis
from astra_jax.core.sync import Split
from astra_jax.parallel.apply import model_body
from astra_jax.parallel.mesh import make_seq_mesh
from astra_jax.parallel.tensor_layout import check_unsplit, local_params, shard_params


def make_tp_mesh(num_devices: int) -> Mesh:
  return make_seq_mesh(num_devices, axis=TP_AXIS)


def tensor_apply(graphdef, mesh: Mesh | None, layout: dict[str, Split], *, inputs: int,
                 train: bool = False) -> Callable[..., Any]:
  """``apply(params, rest, *inputs) -> (outputs, rest, aux_loss)`` over a ``tp`` mesh.

  The same contract as ``apply.sequence_apply``: ``params`` in the model's own
  layout (as checkpoints store them), inputs and outputs whole on every
  device.  Differentiable in ``params``.  With ``mesh=None``: one device.
  """
  body_fn = model_body(graphdef, train)
  if mesh is None:
    return body_fn
  size = mesh.shape[TP_AXIS]

  def body(tp_params, rest, *args):
    with tp_axis(TP_AXIS):
      return body_fn(local_params(tp_params, layout), rest, *args)

  def run(params, rest, *args):
    if len(args) != inputs:
      raise ValueError(f"expected {inputs} inputs, got {len(args)}")
    check_unsplit(rest, layout)
    tp_params, specs = shard_params(params, layout, size)
    mapped = jax.shard_map(body, mesh=mesh,
                           in_specs=(specs, PartitionSpec(), *[PartitionSpec()] * inputs),
                           out_specs=PartitionSpec())
    return mapped(tp_params, rest, *args)

  return run
