"""Forward streaming: each device's block goes to the devices after it, only.

``forward(x, axis_name)`` is what the ``stream`` exchange (``exchange.py``)
uses instead of an all-gather in a causal model: device i receives the
blocks of devices 0..i-1 (the only ones its queries may see) and sends its
own to i+1..P-1; nothing goes backwards.  Two transports, the same result:

  in XLA   P - 1 one-way ``ppermute`` shifts (device j -> j + s), when the
           devices of the axis share a process (fake CPU devices, one GPU
           host).  A collective still makes every layer a meeting point.
  host     with one device per process (``jax.distributed`` runs), an
           ``io_callback`` hands the block to this process's host transport
           (``astra_jax.parallel.stream_transport``, registered with
           ``set_host``), which queues it to the later ranks on sender
           threads and returns at once, then waits only for the earlier
           ranks' blocks of this layer.  Device 0 never waits, and a device
           waits for a layer only when the link is slower than its compute:
           the link hides behind compute (issue 28).  On a ``HostAxis``
           (one process per device and no shared program: the multi-rank
           server) this is the only way, and the host transport is required.

The module is pure JAX apart from that hook; the transport lives in
``astra_jax.parallel``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from astra_jax.core import axes

# host transport: (rank, block) -> [P, *block.shape] with the earlier ranks' blocks
_HOST: Callable | None = None


def set_host(transport: Callable | None) -> None:
  """Registers this process's host transport (None: always use XLA collectives)."""
  global _HOST
  _HOST = transport


def host() -> Callable | None:
  """The registered host transport (None when there is none)."""
  return _HOST


def uses_host(axis_name: str) -> bool:
  """Whether ``forward`` goes through the host transport: one is registered and
  every device of the axis is in its own process."""
  if isinstance(axis_name, axes.HostAxis):
    return True
  return (_HOST is not None and jax.process_count() > 1
          and jax.local_device_count() == 1)


def forward(x: jnp.ndarray, axis_name: str) -> jnp.ndarray:
  """[B, Tl, ...] (this device's block) -> [B, P*Tl, ...]: the blocks of the
  earlier devices in place, zeros for this device's and the later ones'."""
  size, index = axes.axis_size(axis_name), axes.axis_index(axis_name)
  if size == 1:
    return jnp.zeros_like(x)
  if uses_host(axis_name):
    if _HOST is None:
      raise ValueError("a sequence split over processes (HostAxis) needs a host transport: "
                       "register one with streaming.set_host first")
    blocks = io_callback(
        _HOST, jax.ShapeDtypeStruct((size, *x.shape), x.dtype), index, x)
  else:
    by_shift = [jnp.zeros_like(x)]  # by_shift[s]: the block of device index - s
    for s in range(1, size):
      by_shift.append(jax.lax.ppermute(x, axis_name, [(j, j + s) for j in range(size - s)]))
    shifts = index - jnp.arange(size)
    blocks = jnp.take(jnp.stack(by_shift), jnp.clip(shifts, 0, size - 1), axis=0)
    blocks = jnp.where((shifts >= 1).reshape((size,) + (1,) * x.ndim), blocks, 0)
  return jnp.moveaxis(blocks, 0, 1).reshape(x.shape[0], size * x.shape[1], *x.shape[2:])

