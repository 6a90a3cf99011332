"""A run's folder: ``config.json`` (the resolved config), ``checkpoints/``, ``metrics.jsonl``.

Evaluation and fine-tuning rebuild the model from ``config.json``, so a run
can be reused without remembering its flags.
"""

from __future__ import annotations

import json
import os

import ml_collections

from astra_jax.io import checkpoint


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def save_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (processes of one run may all call this)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(
        f"{workdir} is not a training run (no config.json); pass the --workdir of a "
        "run made by the train CLI")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, OSError) as e:
    raise checkpoint.CheckpointError(f"{path} is unreadable ({e}); retrain or restore it") from e


def restore_model(run: str, build_trained, build_target,
                  abstract_train_state, keep_rest: bool, step: int | None = None):
  # (the optimizer state's structure does not depend on its schedule's values,
  # so callers may build ``abstract_train_state`` with any step count)
  """A model built by ``build_target()`` with the parameters of ``run``'s checkpoint.

  ``build_trained()`` builds the model the run trained (its abstract state is
  what the checkpoint is checked against); ``abstract_train_state(params,
  rest)`` gives the full abstract TrainState.  ``keep_rest`` also restores the
  non-parameter state (codebooks), for a target with the run's own exchange.
  """
  from flax import nnx
  import jax
  from astra_jax.parallel import apply

  _, params, rest = apply.split_model(nnx.eval_shape(build_trained))
  state = checkpoint.restore_state(checkpoint_dir(run),
                                   jax.eval_shape(lambda: abstract_train_state(params, rest)),
                                   step)
  graphdef, _, fresh_rest = apply.split_model(build_target())
  return nnx.merge(graphdef, state.params, state.rest if keep_rest else fresh_rest)
