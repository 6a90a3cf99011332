"""Running a Flax NNX model sequence-parallel, as a pure function.

``sequence_apply`` turns (graphdef, params, rest) plus token-split inputs into
(outputs, updated non-parameter state, auxiliary loss), with the model body
traced per device under ``mesh.sequence_parallel``.  It is differentiable in
``params`` (jax.grad goes through shard_map), so training steps, evaluation and
traffic measurement all use this one entry point.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from astra_jax import attention, mesh as mesh_lib


def split_model(model: nnx.Module):
  """(graphdef, params, rest): rest is every non-parameter variable (codebooks, RNG)."""
  return nnx.split(model, nnx.Param, ...)


def model_body(graphdef, train: bool) -> Callable[..., Any]:
  """``body(params, rest, *inputs) -> (outputs, rest, aux_loss)`` on one device's
  view: the model merged, called, and its non-parameter state split off again."""

  def body(params, rest, *inputs):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.train() if train else model.eval()
    outputs = model(*inputs)
    losses = nnx.state(model, attention.ExchangeLoss)
    aux = sum(jax.tree.leaves(losses), jnp.zeros((), jnp.float32))
    model.eval()
    _, _, new_rest = split_model(model)
    return outputs, new_rest, aux

  return body


def sequence_apply(graphdef, mesh: Mesh | None, *, in_seq_dims: Sequence[int | None],
                   train: bool, out_seq_dim: Any = None) -> Callable[..., Any]:
  """Returns ``apply(params, rest, *inputs) -> (outputs, rest, aux_loss)``.

  ``in_seq_dims`` gives each input's sequence dimension (None: replicated);
  ``out_seq_dim`` the outputs' (None: replicated over the sequence axis, e.g.
  ViT logits after ``seq_mean``; 1 for per-token LM logits [B, T, V]).
  With ``mesh=None`` the model runs on one device with no collectives.
  """
  body = model_body(graphdef, train)
  if mesh is None:
    return body
  return mesh_lib.sequence_parallel(body, mesh, in_seq_dims=(None, None, *in_seq_dims),
                                    out_seq_dims=(out_seq_dim, None, None))


@dataclasses.dataclass(frozen=True)
class Forward:
  """A jitted evaluation forward and where its inputs go.

  ``fn(params, rest, *inputs) -> (outputs, rest, aux)``; ``place(arrays,
  seq_dims)`` puts host inputs on the mesh: split along their sequence
  dimensions for sequence parallelism, whole on every device for tensor
  parallelism.
  """

  fn: Callable[..., Any]
  params: Any
  rest: Any
  mesh: Mesh | None
  tensor: bool = False

  def place(self, arrays: Any, seq_dims: Any) -> Any:
    if self.tensor:
      return mesh_lib.replicate(arrays, self.mesh)
    return mesh_lib.to_global(arrays, self.mesh, seq_dims)


def inference_forward(model: nnx.Module, mesh_size: int, *, out_seq_dim: Any = None,
                      tensor: bool = False) -> Forward:
  """The forward that evaluates ``model`` at ``mesh_size`` devices (eval mode, no
  training noise): sequence-parallel, or tensor-parallel over a ``tp`` axis
  with ``tensor=True`` (the model's ``cfg.sync`` at every sync point).  Params
  and rest are replicated over the mesh (checkpoints restore onto one device).
  """
  graphdef, params, rest = split_model(model)
  if tensor:
    from astra_jax import tensor_parallel
    mesh = tensor_parallel.make_tp_mesh(mesh_size) if mesh_size > 1 else None
    fn = tensor_parallel.tensor_apply(graphdef, mesh, model.tensor_layout(), inputs=2)
  else:
    mesh = mesh_lib.seq_mesh_or_none(mesh_size)
    fn = sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False,
                        out_seq_dim=out_seq_dim)
  params, rest = mesh_lib.replicate((params, rest), mesh)
  return Forward(jax.jit(fn), params, rest, mesh, tensor)
