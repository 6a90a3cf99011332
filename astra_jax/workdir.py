"""A run's folder: ``config.json`` (the resolved config), ``checkpoints/``, ``metrics.jsonl``.

Evaluation and fine-tuning rebuild the model from ``config.json``, so a run
can be reused without remembering its flags.
"""

from __future__ import annotations

import json
import os

import ml_collections

from astra_jax import checkpoint


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def save_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))


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
