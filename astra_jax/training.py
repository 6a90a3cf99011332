"""Training pieces shared by the train CLIs: optimizer, jitted step, metrics log.

The model is handled as (graphdef, params, rest) from ``apply.split_model``;
the step is a pure function of a ``TrainState`` pytree, so it checkpoints with
orbax as is and runs the same on a CPU mesh and a GPU/TPU host.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
  step: jnp.ndarray
  params: Any
  rest: Any  # non-gradient model state: exchange codebooks, RNG counters
  opt_state: Any


def make_optimizer(*, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay, global-norm clipping at 1."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(warmup_steps, max(total_steps - 1, 1)), max(total_steps, 2))
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))


def init_state(params, rest, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def make_train_step(apply_fn: Callable, loss_fn: Callable, tx) -> Callable:
  """``step(state, inputs, targets) -> (state, metrics)``.

  ``apply_fn(params, rest, *inputs) -> (outputs, rest, aux_loss)`` (from
  ``apply.sequence_apply``); ``loss_fn(outputs, targets) -> (loss, metrics)``.
  The exchange's auxiliary loss (VQ commitment) is added to the objective.
  """

  def objective(params, rest, inputs, targets):
    outputs, new_rest, aux = apply_fn(params, rest, *inputs)
    loss, metrics = loss_fn(outputs, targets)
    return loss + aux, (new_rest, dict(metrics, loss=loss, aux_loss=aux))

  @jax.jit
  def step(state: TrainState, inputs, targets):
    grads, (rest, metrics) = jax.grad(objective, has_aux=True)(
        state.params, state.rest, inputs, targets)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return TrainState(state.step + 1, params, rest, opt_state), metrics

  return step


class MetricsLog:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, **values) -> None:
    row = {"step": int(step), "time": time.time()}
    row.update({k: float(v) if hasattr(v, "__float__") else v for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
