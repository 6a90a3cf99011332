"""The ambient mesh axes: which axis a per-device body talks over while it traces.

Model code is written for the tokens (or weight shards) one device holds and
never names a mesh.  The only ops that need other devices are attention (over
the sequence axis) and tensor parallelism's sync points (over the ``tp``
axis); they read the axis name from here.  ``astra_jax.parallel.mesh`` and
``astra_jax.parallel.tensor_apply`` set it while they trace the per-device
body under ``jax.shard_map``.  Outside that (plain calls, dense references)
the axis is ``None`` and the model runs on one device.

A ``HostAxis`` stands where an axis name goes when the devices of the
sequence are separate processes that share no XLA program (the multi-rank
server, ``astra_jax.serve``): the body traced here is device ``index`` of
``size``, and only the ``stream`` exchange crosses to the others, through
the host transport (``astra_jax.core.streaming``).  ``axis_index`` and
``axis_size`` read either kind.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax

SEQ_AXIS = "seq"


@dataclasses.dataclass(frozen=True)
class HostAxis:
  """Device ``index`` of a ``size``-device sequence whose other devices are other
  processes, reached by the host transport only (module docstring)."""

  index: int
  size: int

  def __post_init__(self):
    if not 0 <= self.index < self.size:
      raise ValueError(f"device {self.index} of a {self.size}-device sequence does not exist")


def axis_index(axis: Any) -> Any:
  """This device's position on ``axis`` (a mesh axis name or a ``HostAxis``)."""
  return axis.index if isinstance(axis, HostAxis) else jax.lax.axis_index(axis)


def axis_size(axis: Any) -> int:
  """The devices on ``axis`` (a mesh axis name or a ``HostAxis``)."""
  return axis.size if isinstance(axis, HostAxis) else jax.lax.axis_size(axis)


def _mesh_axis(axis: Any, what: str) -> Any:
  if isinstance(axis, HostAxis):
    raise ValueError(f"{what} needs every device of the sequence in one program; a sequence "
                     "split over processes by the host transport serves causal models only")
  return axis

class AmbientAxis:
  """A mesh axis name set while a per-device body traces, read by the code inside.

  ``current()`` is the name, or None outside (one device); ``use(name)`` is
  the context manager that sets it.  The sequence axis lives here; tensor
  parallelism (``astra_jax.parallel.tensor_apply``) keeps its ``tp`` axis the same way.
  """

  def __init__(self, var_name: str):
    self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar(var_name, default=None)

  def current(self) -> str | None:
    return self._var.get()

  @contextlib.contextmanager
  def use(self, name: str | None):
    token = self._var.set(name)
    try:
      yield
    finally:
      self._var.reset(token)


_SEQ = AmbientAxis("astra_seq_axis")
current_seq_axis = _SEQ.current  # the axis the sequence is split over, or None on one device
seq_axis = _SEQ.use  # context manager setting it while a per-device body traces


def seq_mean(x: Any) -> Any:
  """Mean over the devices of the sequence axis (identity on one device)."""
  axis = current_seq_axis()
  return x if axis is None else jax.lax.pmean(x, _mesh_axis(axis, "a mean over devices"))


def seq_first(x: Any) -> Any:
  """Device 0's value, on every device (identity on one device)."""
  axis = current_seq_axis()
  if axis is None:
    return x
  axis = _mesh_axis(axis, "device 0's value")
  first = jax.lax.axis_index(axis) == 0
  return jax.tree.map(lambda a: jax.lax.psum(jax.numpy.where(first, a, 0), axis), x)


TP_AXIS = "tp"
_TP = AmbientAxis("astra_tp_axis")
current_tp_axis = _TP.current  # the axis the weights are split over, or None
tp_axis = _TP.use  # context manager setting it while a per-device body traces
