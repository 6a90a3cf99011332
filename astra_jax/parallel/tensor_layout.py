"""Tensor-parallel parameter layout: a model's weights cut into P devices' shards.

A model declares how each linear splits (``astra_jax.core.sync.Split``, from
``model.tensor_layout()``); ``shard_params`` lays the parameters out for P
devices with their ``PartitionSpec``s and ``local_params`` views one device's
shards in the model's own shapes inside ``shard_map``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from astra_jax.core.axes import TP_AXIS
from astra_jax.core.sync import Split


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


def check_unsplit(rest: Any, layout: dict[str, Split]) -> None:
  """Weights outside ``nnx.Param`` (int8 kernels and scales) are not laid out
  for tensor parallelism; refuse them instead of failing on shapes in XLA."""
  for path, _ in jax.tree_util.tree_flatten_with_path(rest)[0]:
    split, _, name = _leaf_split(layout, path)
    if split is not None:
      raise ValueError(f"{name} is not a float parameter (int8 weight-only?); tensor "
                       "parallelism splits float weights: run --tp on a float model")
