"""Training pieces shared by the train CLIs: optimizer, jitted step, metrics log.

The model is handled as (graphdef, params, rest) from ``apply.split_model``;
the step is a pure function of a ``TrainState`` pytree, so it checkpoints with
orbax as is and runs the same on a CPU mesh and a GPU/TPU host.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def check_settings(cfg, *, at_least_1=(), positive=(), non_negative=()) -> None:
  """Raises ValueError, one line naming the fix, for the first config value out of range.

  The train CLIs call it right after loading the config, before anything is
  written: ``batch_size=0`` would otherwise train to a NaN loss, ``steps=0``
  save an untrained model as a finished run.
  """
  rules = [(at_least_1, lambda v: v >= 1, "an integer >= 1"),
           (positive, lambda v: v > 0, "a number > 0"),
           (non_negative, lambda v: v >= 0, "a number >= 0")]
  for keys, ok, what in rules:
    for key in keys:
      value = cfg[key]
      if not (ok(value) and math.isfinite(value)):
        raise ValueError(f"--config.{key}={value} is out of range; pass --config.{key} as "
                         f"{what}")


def init_state(params, rest, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def owned(state: TrainState) -> TrainState:
  """``state`` with a buffer of its own for every leaf, for the train step to donate.

  The step donates its state (XLA reuses the old buffers for the new state),
  so the state must not share a buffer with the model its weights came from,
  nor two leaves one buffer (a fresh VQ codebook's ``ema_sum`` is its
  ``entries``: XLA refuses to donate a buffer twice).
  """
  def copy(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(copy(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jnp.array(x, copy=True)

  return jax.tree.map(copy, state)


def make_train_step(apply_fn: Callable, loss_fn: Callable, tx) -> Callable:
  """``step(state, inputs, targets) -> (state, metrics)``; ``state`` is donated
  (its arrays are deleted by the call: use the returned one).

  ``apply_fn(params, rest, *inputs) -> (outputs, rest, aux_loss)`` (from
  ``apply.sequence_apply``); ``loss_fn(outputs, targets) -> (loss, metrics)``.
  The exchange's auxiliary loss (VQ commitment) is added to the objective.
  """

  def objective(params, rest, inputs, targets):
    outputs, new_rest, aux = apply_fn(params, rest, *inputs)
    loss, metrics = loss_fn(outputs, targets)
    return loss + aux, (new_rest, dict(metrics, loss=loss, aux_loss=aux))

  # donated: the old state's buffers become the new state's, so memory holds one
  # state, not two (SmolLM2-135M replicated on 4 CPU devices: 6.4 GB each)
  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, inputs, targets):
    grads, (rest, metrics) = jax.grad(objective, has_aux=True)(
        state.params, state.rest, inputs, targets)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return TrainState(state.step + 1, params, rest, opt_state), metrics

  return step


class MetricsLog:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``.

  Every line is valid JSON: non-finite numbers are written as ``null``.
  ``rewind`` (called when training starts or resumes) keeps each step once.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, **values) -> None:
    if jax.process_index() != 0:  # one log per run, however many processes
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _json_value(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")

  def rewind(self, step: int) -> None:
    """Drops rows a resumed run will write again: training rows past ``step``,
    evaluation rows (no ``loss``) from ``step`` on, and torn lines."""
    if jax.process_index() != 0 or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.read().splitlines()
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:  # half-written when a run was killed
        continue
      if isinstance(row, dict) and (row.get("step", 0) < step
                                    or (row.get("step") == step and "loss" in row)):
        kept.append(line)
    if len(kept) == len(lines):
      return
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)


def _json_value(value: Any) -> Any:
  if hasattr(value, "__float__") and not isinstance(value, (bool, int)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def resume(ckpt, state: TrainState, workdir: str) -> TrainState:
  """The newest good checkpoint in ``ckpt`` if there is one, else ``state``."""
  if ckpt.latest_step() is None:
    return state
  state = ckpt.restore(jax.eval_shape(lambda: state))
  print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
  return state


class Stopped(Exception):
  """Training ended early; ``code`` is the CLI's exit status: 128 + the signal
  number (130 SIGINT, 143 SIGTERM) after saving a checkpoint, or 1 for a
  non-finite loss (the last good checkpoint is kept, nothing newer saved)."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class _StopOnSignal:
  """SIGINT/SIGTERM ask training to stop after the step in flight; a second
  one exits at once, without a checkpoint."""

  def __enter__(self):
    self.signum, self._previous = None, {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:
      print(f"\nerror: second {signal.Signals(signum).name} while saving: stopped without a "
            "checkpoint at this step", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum

  def pending(self) -> bool:
    """Whether to stop after this step; in a multi-process run the processes
    agree (a rank that got the signal a step later must not stop a step after
    the others, who would wait for it in the next collective)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      got = multihost_utils.process_allgather(np.int32(self.signum or 0))
      self.signum = int(np.max(got)) or None
    return self.signum is not None

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _nonfinite(ckpt, step: int, what: str) -> Stopped:
  ckpt.wait()  # the last good save, if still being written
  last = ckpt.latest_step()
  kept = (f"the last good checkpoint, step {last}, is kept in {ckpt.directory}" if last is not None
          else "no checkpoint was saved before it")
  return Stopped(f"{what} at step {step}: training stopped without saving that state; {kept}; "
                 "lower --config.lr or check the data, then rerun to resume", code=1)


def fit(step_fn: Callable, state: TrainState, *, total: int,
        batch_fn: Callable[[int], tuple[Any, Any]], ckpt, log: MetricsLog,
        log_every: int, items_per_step: int, desc: str = "train") -> TrainState:
  """Runs steps ``state.step .. total-1`` with a progress bar, logs and checkpoints.

  ``batch_fn(step) -> (inputs, targets)`` must be a pure function of the step
  (so a resumed run sees the same data).  Ends with a checkpoint at ``total``.
  Log rows past ``state.step`` (from an interrupted run) are dropped first.
  The loss and gradient norm are checked every step (one host sync per step),
  the parameters before every save.

  Raises:
    Stopped: SIGINT/SIGTERM arrived (the step in flight completes and is
      checkpointed first), or the loss, gradient norm or parameters stopped
      being finite (that state is never saved).
    CheckpointError: a save failed (disk full), naming its step.
  """
  from tqdm import tqdm

  start = int(state.step)
  log.rewind(start)
  bar = tqdm(range(start, total), initial=start, total=total, desc=desc, unit="step")
  with _StopOnSignal() as stop, bar:
    for step in bar:
      inputs, targets = batch_fn(step)
      state, metrics = step_fn(state, inputs, targets)
      done = step + 1
      checked = mesh_lib.fetch({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
      bad = [f"{k} is {float(checked[k])}" for k in ("loss", "grad_norm")
             if k in checked and not math.isfinite(float(checked[k]))]
      if bad:
        raise _nonfinite(ckpt, done, ", ".join(bad))
      stopping = stop.pending()
      last = done == total or stopping
      if (last or ckpt.due(done)) and not bool(_all_finite(state.params)):
        raise _nonfinite(ckpt, done, "the parameters overflowed to inf/nan")
      if done % log_every == 0 or done == total:
        m = mesh_lib.fetch(metrics)
        bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "accuracy") if k in m})
        log.write(done, items_per_s=(bar.format_dict["rate"] or 0.0) * items_per_step, **m)
      ckpt.save(done, state, force=last)
      if stopping:
        break
    ckpt.wait()
    if stop.pending():  # (also a signal that came during the last step)
      raise Stopped(f"stopped by {signal.Signals(stop.signum).name} after step "
                    f"{int(state.step)}: saved a checkpoint there in {ckpt.directory}; rerun "
                    "the same command to resume", code=128 + stop.signum)
  return state
