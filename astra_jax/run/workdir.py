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


# what a run's config.json holds, by the key only that task writes
_TASKS = {"vit": ("dataset", "an image classifier (train.vit; evaluate with infer.vit)"),
          "lm": ("context", "a language model (train.gpt2 / train.llama; evaluate with "
                            "infer.gpt2 / infer.llama)")}


def load_config(workdir: str, task: str | None = None) -> ml_collections.ConfigDict:
  """The run's config.json; with ``task`` ("vit" | "lm"), CheckpointError unless
  the run is of that task (a ViT run handed to an LM CLI is named as such)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    hint = ""
    if os.path.isfile(os.path.join(workdir, "model.safetensors")) or os.path.isfile(
        os.path.join(workdir, "model.safetensors.index.json")):
      hint = " (it looks like a Hugging Face model folder: pass it as hf:" + workdir + ")"
    elif os.path.basename(os.path.normpath(workdir)) == "checkpoints":
      hint = f" (pass the run folder above it: {os.path.dirname(os.path.normpath(workdir))})"
    raise checkpoint.CheckpointError(
        f"{workdir} is not a training run (no config.json){hint}; pass the --workdir of a "
        "run made by the train CLI")
  try:
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, OSError) as e:
    raise checkpoint.CheckpointError(
        f"{path} is unreadable ({type(e).__name__}: {e}); retrain or restore it") from None
  if "model_type" in cfg or "architectures" in cfg:
    raise checkpoint.CheckpointError(
        f"{workdir} is not a training run (it looks like a Hugging Face model folder: pass it "
        f"as hf:{workdir})")
  if task is not None:
    kind = next((k for k, (key, _) in _TASKS.items() if key in cfg), None)
    if kind != task:
      what = _TASKS[kind][1] if kind else "no task astra-jax knows"
      raise checkpoint.CheckpointError(
          f"{workdir} is a run of {what}, not {_TASKS[task][1].split(' (')[0]}")
  return cfg


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
