"""Choosing SPD's drop set: per-block sensitivity, three classes, a budget, distillation.

Sync-Point Drop (``astra_jax.core.sync.SPDSync``) removes the all-reduce after
attention in chosen blocks.  Which blocks tolerate it is measured, not
guessed (SPD, Kim et al. 2025):

  sensitivity  the task metric with only block b dropped, against plain
               tensor parallelism (relative perplexity increase, or accuracy
               points lost)
  classes      insensitive  change <= ``insensitive``: drop as is
               sensitive    up to ``extreme``: drop, then distil the block
               extremely sensitive  above ``extreme``: keep its sync point
  budget       the number of sync points to drop: insensitive blocks first,
               then sensitive ones, least sensitive first; extremely
               sensitive blocks never
  distillation block-wise: the dropped block, run tensor-parallel with its
               sync point dropped, is trained to reproduce the exact block's
               output on the exact model's hidden states at its input
               (mean squared error, Adam), every other weight frozen

The functions here are model-agnostic: a block is any module with an
``attn_sync`` sync point (``blocks``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import sync as sync_lib
from astra_jax.parallel.tensor_apply import make_tp_mesh, tensor_apply

CLASSES = ("insensitive", "sensitive", "extremely sensitive")


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  block: int
  metric: float
  change: float  # worse-is-positive: relative perplexity increase or accuracy points lost
  kind: str


def classify(change: float, insensitive: float, extreme: float) -> str:
  if not 0 <= insensitive <= extreme:
    raise ValueError(f"thresholds must satisfy 0 <= insensitive ({insensitive}) <= extreme "
                     f"({extreme})")
  if change <= insensitive:
    return CLASSES[0]
  return CLASSES[1] if change <= extreme else CLASSES[2]


def sensitivities(evaluate: Callable[[sync_lib.Sync], float], layers: int, *, lower_is_better: bool,
                  insensitive: float, extreme: float) -> tuple[float, list[Sensitivity]]:
  """(metric with plain tp, one ``Sensitivity`` per block dropped alone).

  ``evaluate(sync)`` runs the task metric tensor-parallel with that sync.
  """
  base = evaluate(sync_lib.make_sync("tp"))
  out = []
  for block in range(layers):
    value = evaluate(sync_lib.make_sync("spd", drop=(block,)))
    change = value / base - 1 if lower_is_better else base - value
    out.append(Sensitivity(block, value, change, classify(change, insensitive, extreme)))
  return base, out


def pick(sens: list[Sensitivity], budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(blocks to drop, those of them to distil) for ``budget`` dropped sync points."""
  usable = sorted((s for s in sens if s.kind != CLASSES[2]),
                  key=lambda s: (CLASSES.index(s.kind), s.change))
  if not 0 <= budget <= len(usable):
    raise ValueError(f"a budget of {budget} dropped sync points is not possible: "
                     f"{len(usable)} of {len(sens)} blocks are not extremely sensitive; "
                     f"choose --budget between 0 and {len(usable)} or raise --extreme")
  chosen = usable[:budget]
  return (tuple(sorted(s.block for s in chosen)),
          tuple(sorted(s.block for s in chosen if s.kind == CLASSES[1])))


def blocks(model: nnx.Module) -> nnx.List:
  """The model's list of Transformer blocks (the modules with an ``attn_sync``)."""
  for value in vars(model).values():
    if isinstance(value, nnx.List) and len(value) and hasattr(value[0], "attn_sync"):
      return value
  raise ValueError(f"{type(model).__name__} has no list of blocks with sync points")


class _Capture(nnx.Variable):
  pass


class _Recorder(nnx.Module):
  """Runs ``block`` and keeps its input and output."""

  def __init__(self, block):
    self.block = block

  def __call__(self, x):
    y = self.block(x)
    self.seen = _Capture((x, y))
    return y


def block_io(model: nnx.Module, index: int, inputs: tuple) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(input, output) hidden states of block ``index`` when ``model(*inputs)`` runs on
  one device (no mesh: the exact model)."""
  layer_list = blocks(model)
  block = layer_list[index]
  recorder = _Recorder(block)
  layer_list[index] = recorder
  try:
    model(*inputs)
    return recorder.seen.get_value()
  finally:
    layer_list[index] = block


def distill(block: nnx.Module, layout: dict, xs: jnp.ndarray, ys: jnp.ndarray, *,
            mesh_size: int, steps: int, lr: float, seed: int = 0) -> tuple[Any, dict]:
  """Trains ``block`` (built with its sync point dropped) to map ``xs`` to ``ys``.

  xs, ys: [N, B, T, D] batches of the exact block's input/output.  The block
  runs tensor-parallel over ``mesh_size`` devices; returns (its new params,
  {"mse_before", "mse_after"} on the whole set).
  """
  graphdef, params, rest = apply.split_model(block)
  mesh = make_tp_mesh(mesh_size)
  fn = tensor_apply(graphdef, mesh, layout, inputs=1)
  params, rest, xs, ys = mesh_lib.replicate((params, rest, xs, ys), mesh)

  def mse(params, x, y):
    return jnp.mean((fn(params, rest, x)[0] - y) ** 2)

  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt, x, y):
    loss, grads = jax.value_and_grad(mse)(params, x, y)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  full = jax.jit(lambda p: jnp.mean(jax.vmap(lambda x, y: mse(p, x, y))(xs, ys)))
  before = float(full(params))
  opt = tx.init(params)
  order = jax.random.permutation(jax.random.PRNGKey(seed), steps) % xs.shape[0]
  for i in order:
    params, opt, _ = step(params, opt, xs[i], ys[i])
  return params, {"mse_before": before, "mse_after": float(full(params))}
