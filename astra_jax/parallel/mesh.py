"""Meshes, and running token-local code over a mesh.

:func:`sequence_parallel` runs a body written for one device's tokens under
``jax.shard_map`` over the sequence axis, setting the ambient axis
(``astra_jax.core.axes``) that attention reads while the body traces.  The
rest places host arrays on a mesh (``to_global``, ``replicate``), reads them
back (``fetch``) and checks that lengths split.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from astra_jax.core.axes import SEQ_AXIS, seq_axis


def make_seq_mesh(num_devices: int, axis: str = SEQ_AXIS,
                  devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh of ``num_devices`` over all processes' devices.

  The axis is ``Auto``: arrays produced by sequence-parallel code can flow
  into ordinary unsharded code (losses, metrics) without a mesh context.
  Raises ValueError naming the fix when there are not enough devices.
  """
  if not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"mesh size must be a positive integer, got {num_devices!r}")
  devices = list(devices if devices is not None else jax.devices())
  if num_devices > len(devices):
    raise ValueError(
        f"a mesh of {num_devices} devices was requested but only {len(devices)} "
        f"{devices[0].platform.upper()} device(s) are available. On CPU set "
        f"JAX_NUM_CPU_DEVICES={num_devices} before jax is imported (the CLIs do "
        "this for you with --mesh), or launch more processes with "
        "jax.distributed.")
  return jax.make_mesh((num_devices,), (axis,), devices=devices[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def seq_mesh_or_none(num_devices: int) -> Mesh | None:
  """``make_seq_mesh(n)``, or None for one device (no shard_map, no collectives)."""
  return make_seq_mesh(num_devices) if num_devices > 1 else None


def check_divisible(length: int, mesh_size: int, what: str = "sequence") -> int:
  """Tokens per device; ValueError with the fix when ``length % mesh_size``."""
  if length % mesh_size:
    lo = length - length % mesh_size
    multiples = " or ".join(str(m) for m in (lo, lo + mesh_size) if m > 0)
    sizes = ", ".join(str(d) for d in range(1, min(length, 64) + 1) if length % d == 0)
    raise ValueError(
        f"{what} length {length} is not divisible by the mesh size {mesh_size}; "
        f"pad or crop it to a multiple of {mesh_size} (e.g. {multiples}), or choose a "
        f"mesh size that divides {length} ({sizes}).")
  return length // mesh_size


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Places every array of ``tree`` on all devices of ``mesh`` (no-op without one).

  Across processes (``jax.distributed``) every process passes the same values
  and places them on its own devices only.
  """
  if mesh is None:
    return tree
  return to_global(tree, mesh, None)


def to_global(tree: Any, mesh: Mesh | None, seq_dims: Any) -> Any:
  """Host (or single-device) arrays -> arrays sharded over ``mesh``'s sequence axis.

  ``seq_dims`` is an int/None for the whole tree or a tuple with one entry per
  top-level element, as in :func:`sequence_parallel`.  Each process puts only
  the slices its own devices hold (every process computes the same host
  values, e.g. from a seeded batch function), so this works unchanged with
  one process or many.
  """
  if mesh is None:
    return tree
  if isinstance(seq_dims, (tuple, list)):
    if not isinstance(tree, (tuple, list)) or len(tree) != len(seq_dims):
      raise ValueError(f"seq_dims {seq_dims} does not match the inputs' structure")
    return type(tree)(to_global(t, mesh, d) for t, d in zip(tree, seq_dims))
  sharding = jax.sharding.NamedSharding(mesh, seq_spec(seq_dims))
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    host = np.asarray(x)  # a replicated or process-local array reads back locally
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def local_block(x: jax.Array, dim: int, index: int) -> jax.Array:
  """Block ``index`` of ``x`` split evenly along ``dim``, on the device holding it.

  For an array that is not split along ``dim`` (one device), block 0 is the
  whole array.  Across processes only the process owning the block can ask.
  """
  for shard in x.addressable_shards:
    start = shard.index[dim].start or 0
    stop = x.shape[dim] if shard.index[dim].stop is None else shard.index[dim].stop
    if start == index * (stop - start):
      return shard.data
  raise ValueError(f"block {index} along dim {dim} is not held by this process")


def fetch(x: Any) -> Any:
  """Host numpy copies of (possibly multi-process) arrays, on every process."""
  def get(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
      return np.asarray(a)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  return jax.tree.map(get, x)


def seq_spec(seq_dim: int | None, axis: str = SEQ_AXIS) -> PartitionSpec:
  """PartitionSpec splitting dimension ``seq_dim`` over ``axis`` (None: replicated)."""
  if seq_dim is None:
    return PartitionSpec()
  return PartitionSpec(*([None] * seq_dim), axis)


def _specs(dims: Any, axis: str) -> Any:
  """int/None -> one spec (a prefix for a whole pytree); tuples/lists map per entry."""
  if dims is None or isinstance(dims, int):
    return seq_spec(dims, axis)
  return tuple(_specs(d, axis) for d in dims)


def sequence_parallel(fn: Callable[..., Any], mesh: Mesh, *,
                      in_seq_dims: Sequence[Any], out_seq_dims: Any,
                      axis: str = SEQ_AXIS) -> Callable[..., Any]:
  """Runs ``fn``, written for one device's tokens, with its inputs split over ``axis``.

  ``in_seq_dims`` has one entry per positional argument: an int (the sequence
  dimension of every array leaf in that argument) or None (replicated, e.g.
  parameters).  ``out_seq_dims`` is the same for the output: an int/None for
  the whole output pytree, or a tuple with one entry per output.  Sequence
  lengths are checked against the mesh first, so a bad length gives a clear
  error instead of a sharding failure deep inside XLA.
  """
  size = mesh.shape[axis]
  in_specs = _specs(tuple(in_seq_dims), axis)
  out_specs = _specs(out_seq_dims, axis)

  def body(*args):
    with seq_axis(axis):
      return fn(*args)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

  def run(*args):
    if len(args) != len(in_seq_dims):
      raise ValueError(f"expected {len(in_seq_dims)} arguments, got {len(args)}")
    for arg, dim in zip(args, in_seq_dims):
      for leaf in ([] if dim is None else jax.tree.leaves(arg)):
        check_divisible(leaf.shape[dim], size)
    return mapped(*args)

  return run
