"""Running a Flax NNX model sequence-parallel, as a pure function.

``sequence_apply`` turns (graphdef, params, rest) plus token-split inputs into
(outputs, updated non-parameter state, auxiliary loss), with the model body
traced per device under ``mesh.sequence_parallel``.  It is differentiable in
``params`` (jax.grad goes through shard_map), so training steps, evaluation and
traffic measurement all use this one entry point.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from astra_jax.core import attention
from astra_jax.parallel import mesh as mesh_lib


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
