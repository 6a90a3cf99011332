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

from astra_jax.parallel import mesh as mesh_lib


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


def classification_loss(logits, labels):
  """Mean softmax cross-entropy and accuracy; logits [..., C], integer labels [...]."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


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
    if jax.process_index() != 0:  # one log per run, however many processes
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: float(v) if hasattr(v, "__float__") else v for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def resume(ckpt, state: TrainState, workdir: str) -> TrainState:
  """The latest checkpoint in ``ckpt`` if there is one, else ``state``."""
  start = ckpt.latest_step()
  if start is None:
    return state
  state = ckpt.restore(jax.eval_shape(lambda: state))
  print(f"resuming from step {start} in {workdir}", flush=True)
  return state


def fit(step_fn: Callable, state: TrainState, *, total: int,
        batch_fn: Callable[[int], tuple[Any, Any]], ckpt, log: MetricsLog,
        log_every: int, items_per_step: int, desc: str = "train") -> TrainState:
  """Runs steps ``state.step .. total-1`` with a progress bar, logs and checkpoints.

  ``batch_fn(step) -> (inputs, targets)`` must be a pure function of the step
  (so a resumed run sees the same data).  Ends with a checkpoint at ``total``.
  """
  from tqdm import tqdm

  bar = tqdm(range(int(state.step), total), initial=int(state.step), total=total,
             desc=desc, unit="step")
  for step in bar:
    inputs, targets = batch_fn(step)
    state, metrics = step_fn(state, inputs, targets)
    if (step + 1) % log_every == 0 or step + 1 == total:
      m = mesh_lib.fetch(metrics)
      bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "accuracy") if k in m})
      log.write(step + 1, items_per_s=(bar.format_dict["rate"] or 0.0) * items_per_step, **m)
    ckpt.save(step + 1, state)
  if ckpt.latest_step() != total:
    ckpt.save(total, state, force=True)
  ckpt.wait()
  return state
