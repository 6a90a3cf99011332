"""A whole sampling run, sequence-parallel, as one compiled program.

``sampler(graphdef, mesh, settings)`` returns
``run(params, rest, noise, positions, labels) -> patches``: noise [B, N, p*p*C]
split over the devices by patch (each holds a band of rows), positions [N]
split the same way, labels [B] on every device.  Each device runs every
Euler step (``astra_jax.diffusion.flow``) on its band; attention inside the
model crosses the mesh through the model's exchange, and the steps are
unrolled in Python so that

  * an exchange can carry what it received from one step to the next
    (``exchange.Carry``: DistriFusion's stale K/V, ``vq:refresh=k``), held
    by each attention layer while ``stepping`` is on;
  * the bytes per sampling run are read from the compiled program
    (``astra_jax.netsim.traffic`` rejects collectives inside loops).

With a guidance scale other than 1 each step runs the model once on the
conditional and the null-class halves of a doubled batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from astra_jax.core.attention import attention_layers
from astra_jax.diffusion import flow
from astra_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """steps: Euler steps from noise to image; guidance: the classifier-free scale s."""

  steps: int = 20
  guidance: float = 1.0

  def __post_init__(self):
    flow.time_grid(self.steps)  # checks steps >= 1
    if not self.guidance >= 0:
      raise ValueError(f"the guidance scale must be >= 0 (1: conditional only, 0: "
                       f"unconditional), got {self.guidance}")


def sample_body(graphdef, settings: Sampling, null_class: int) -> Callable[..., Any]:
  """``body(params, rest, noise, positions, labels) -> images as patches`` on one
  device's band (or the whole image without a mesh)."""
  times = flow.time_grid(settings.steps)
  guide = settings.guidance != 1.0

  def body(params, rest, noise, positions, labels):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    layers = attention_layers(model)
    for layer in layers:
      layer.stepping = True
    if guide:
      labels = jnp.concatenate([labels, jnp.full_like(labels, null_class)])
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
      inputs = jnp.concatenate([x, x]) if guide else x
      v = model(inputs, positions, jnp.full((inputs.shape[0],), t, jnp.float32), labels)
      if guide:
        v = flow.guided(v[:x.shape[0]], v[x.shape[0]:], settings.guidance)
      x = flow.euler(x, v, float(t), float(t_next))
    for layer in layers:
      layer.end_steps()
    return x

  return body


def sampler(graphdef, mesh: Mesh | None, settings: Sampling,
            null_class: int) -> Callable[..., Any]:
  """The sampling run of ``sample_body`` over ``mesh`` (None: one device)."""
  body = sample_body(graphdef, settings, null_class)
  if mesh is None:
    return body
  return mesh_lib.sequence_parallel(body, mesh, in_seq_dims=(None, None, 1, 0, None),
                                    out_seq_dims=1)
