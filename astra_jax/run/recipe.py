"""The train CLIs' recipe, shared by every task: start, resume, fit.

  model = recipe.start_model(...)   # fresh, or another run's weights (+ k-means
                                    # codebooks when fine-tuning with ASTRA)
  model = recipe.train(model, ...)  # resume from the workdir, fit, checkpoint

A task supplies only what differs: how to build or restore its model, its
batches (a pure function of the step) and its output layout.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
from flax import nnx

from astra_jax.parallel import apply, forward
from astra_jax.run import calibrate, training, workdir
from astra_jax.io import checkpoint
from astra_jax.parallel import mesh as mesh_lib


def start_model(*, init_from: str | None, ckpt: checkpoint.Checkpointer,
                build: Callable[[], nnx.Module], restore: Callable[[str], nnx.Module],
                exchange: str, calib_batches: Callable[[], Iterable[tuple]], seed: int,
                kmeans_tokens: int) -> nnx.Module:
  """A fresh model, or ``init_from``'s weights when this run has no checkpoint yet.

  Fine-tuning into the ``vq`` exchange starts the codebooks from k-means on
  the trained model's own K/V (``calib_batches()`` yields model inputs that
  training will not see; cached on disk, see ``astra_jax.run.codebook_cache``).
  A run with checkpoints resumes from them instead.
  """
  if not init_from or ckpt.latest_step() is not None:
    return build()
  model = restore(init_from)
  if exchange == "vq":
    calibrate.kmeans_codebooks(model, calib_batches(), jax.random.PRNGKey(seed),
                               max_tokens=kmeans_tokens)
    print(f"codebooks initialised by k-means on {init_from}'s K/V", flush=True)
  return model


def optimizer(cfg, total_steps: int):
  """The run config's AdamW schedule over ``total_steps`` (``training.make_optimizer``)."""
  return training.make_optimizer(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 warmup_steps=cfg.warmup_steps, total_steps=total_steps)


def plan(cfg, steps_per_epoch: int, max_steps: int | None):
  """(total steps, optimizer) of a train CLI: the config's epochs, capped by
  ``--max-steps``."""
  total = steps_per_epoch * cfg.epochs
  if max_steps is not None:
    total = min(total, max_steps)
  return total, optimizer(cfg, total)


def restore(run: str, cfg, build_trained: Callable[[], nnx.Module],
            build_target: Callable[[], nnx.Module], keep_rest: bool,
            step: int | None = None) -> nnx.Module:
  """``workdir.restore_model`` with the abstract train state of ``cfg``'s optimizer
  (its structure does not depend on the step count)."""
  tx = optimizer(cfg, 2)
  return workdir.restore_model(run, build_trained, build_target,
                               lambda p, r: training.init_state(p, r, tx), keep_rest, step)


def train(model: nnx.Module, tx, *, cfg, run: str, mesh, ckpt: checkpoint.Checkpointer,
          total: int, batch_fn: Callable[[int], tuple[Any, Any]], out_seq_dim: Any,
          items_per_step: int, in_seq_dims: tuple = (1, 0),
          loss_fn: Callable = training.classification_loss) -> nnx.Module:
  """Resumes from ``ckpt`` (else starts from ``model``), trains to ``total`` steps.

  ``batch_fn(step) -> ((inputs, positions, ...), targets)`` gives host arrays;
  each model input is split along its entry of ``in_seq_dims`` (default:
  inputs along dim 1, positions along dim 0; None: the same on every device),
  targets along ``out_seq_dim`` (the outputs' layout); ``loss_fn(outputs,
  targets) -> (loss, metrics)`` (default: classification).  Saves ``cfg`` as the run's config.json, logs to metrics.jsonl and returns the
  trained model.  Raises ``CheckpointError`` (a ValueError naming the fix) when
  no checkpoint is readable, before any step runs, or a save fails, and
  ``training.Stopped`` on SIGINT/SIGTERM or a non-finite loss.
  """
  graphdef, params, rest = apply.split_model(model)
  state = training.resume(ckpt, training.init_state(params, rest, tx), run)
  workdir.save_config(run, cfg)
  state = mesh_lib.replicate(training.owned(state), mesh)  # the step donates it
  step_fn = forward.timed_compile(training.make_train_step(
      apply.sequence_apply(graphdef, mesh, in_seq_dims=in_seq_dims, train=True,
                           out_seq_dim=out_seq_dim),
      loss_fn, tx), "the training step")
  # each process puts only its own slice of every batch on its devices
  placed = lambda step: mesh_lib.to_global(batch_fn(step), mesh, (in_seq_dims, out_seq_dim))
  try:
    state = training.fit(step_fn, state, total=total, batch_fn=placed, ckpt=ckpt,
                         log=training.MetricsLog(run), log_every=cfg.log_every,
                         items_per_step=items_per_step)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, state.params, state.rest)
