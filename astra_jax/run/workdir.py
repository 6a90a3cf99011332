"""A run's folder: ``config.json`` (the resolved config), ``checkpoints/``, ``metrics.jsonl``,
and ``train.lock`` (who trains into it; see ``lock``).

Evaluation and fine-tuning rebuild the model from ``config.json``, so a run
can be reused without remembering its flags.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

import ml_collections

from astra_jax.io import checkpoint


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


LOCK = "train.lock"

_held: dict[str, int] = {}  # run folder (its real path) -> this process's open lock file


class Busy(ValueError):
  """Another process trains into the run folder (one line naming it)."""


def lock(run: str) -> None:
  """Makes this process the one trainer of ``run`` for the rest of its life.

  Takes ``fcntl.flock`` on ``run/train.lock`` (creating the folder) and writes
  the holder's pid, host, command and start time into the file.  The OS drops
  the lock when the process ends, however it ends (kill -9 included), so the
  next trainer takes a dead run's folder over; the file's text only names the
  holder in the refusal.  Raises ``Busy``, naming the holder, while another
  process holds it; the folder is then left as it was.  The train CLIs call it
  once their inputs are checked, before the first write into the folder.

  In a multi-process run (jax.distributed) process 0 alone takes it, for the
  whole run (it writes config.json, metrics.jsonl and the checkpoints'
  metadata; the others write their checkpoint shards in step with it), and
  every process learns its answer in a collective: a run never refuses
  itself, and a refused run stops all its processes before they write.
  """
  import jax
  import numpy as np
  key = os.path.realpath(run)
  error = None
  if jax.process_index() == 0 and key not in _held:
    try:
      _held[key] = _take(run)
    except ValueError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and refused.any():
      error = Busy(f"process 0 of this run could not lock {run} (its error line names the "
                   "holder); wait for it or stop it")
  if error is not None:
    raise error


def release(run: str) -> None:
  """Lets go of ``run``'s lock before this process ends (tests; the CLIs never do)."""
  fd = _held.pop(os.path.realpath(run), None)
  if fd is not None:
    os.close(fd)  # (closing the file releases its flock)


def _take(run: str) -> int:
  path = os.path.join(run, LOCK)
  try:
    os.makedirs(run, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"cannot lock {path} ({e.strerror}); pass a writable --workdir") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 4096, 0)
    os.close(fd)
    raise Busy(f"{run} is being trained by {_holder(holder)}; wait for it or stop it") from None
  me = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.orig_argv,
        "started": time.time()}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
  return fd


def _holder(text: bytes) -> str:
  """``process PID (COMMAND, started TIME on host HOST)`` from a lock file's text."""
  try:
    holder = json.loads(text)
    argv = holder["command"]
    command = " ".join([os.path.basename(argv[0]), *argv[1:]])
    if len(command) > 120:
      command = command[:116] + " ..."
    started = time.localtime(holder["started"])
    today = started[:3] == time.localtime()[:3]
    clock = time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S", started)
    return f"process {int(holder['pid'])} ({command}, started {clock} on host {holder['host']})"
  except (ValueError, KeyError, TypeError, IndexError, OverflowError):
    return f"another process (it has not yet written its name into {LOCK})"


def save_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (processes of one run may all call this)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)


# what a run's config.json holds, by the key only that task writes
_TASKS = {"dit": ("sample_steps", "a diffusion model (train.dit; sample with infer.dit)"),
          "vit": ("dataset", "an image classifier (train.vit; evaluate with infer.vit)"),
          "lm": ("context", "a language model (train.gpt2 / train.llama; evaluate with "
                            "infer.gpt2 / infer.llama)")}


def load_config(workdir: str, task: str | None = None) -> ml_collections.ConfigDict:
  """The run's config.json; with ``task`` ("dit" | "vit" | "lm"), CheckpointError unless
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
