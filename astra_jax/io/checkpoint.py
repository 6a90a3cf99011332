"""Checkpoints of training runs: a thin wrapper over ``orbax.checkpoint``.

A run's state (usually ``nnx.state((model, optimizer))``) is saved every
``save_every`` steps into ``directory/<step>``, keeping the newest
``max_to_keep``.  Restoring takes an abstract state (from ``nnx.eval_shape``)
and checks it against the checkpoint's metadata first, so every failure is a
``CheckpointError`` that says what to do instead of a deep orbax/tensorstore
traceback.

  ckpt = Checkpointer(workdir, save_every=1000)
  ckpt.save(step, nnx.state((model, opt)))
  abstract = nnx.state(nnx.eval_shape(lambda: make_model_and_opt(cfg)))
  nnx.update((model, opt), ckpt.restore(abstract))
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or belongs to another model config."""


def _no_checkpoint(directory: str) -> CheckpointError:
  return CheckpointError(
      f"no checkpoint in {directory}: train first with `--workdir {directory}` "
      "or check --workdir/--init-from")


def _corrupt(step_dir: str, err: Exception, earlier: list[int]) -> CheckpointError:
  why = (str(err).splitlines() or [""])[0][:300]
  fix = (f"delete {step_dir} to fall back to step {earlier[-1]}" if earlier else
         f"delete {step_dir} (the run's only checkpoint) and train again")
  return CheckpointError(
      f"checkpoint {step_dir} is corrupt or unreadable ({type(err).__name__}: {why}); {fix}")


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """Shape orbax stores for ``leaf``: typed PRNG keys are saved as key data."""
  if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))


def _check_structure(stored: dict, target: dict, step_dir: str) -> None:
  """Raises if the checkpoint's keys/shapes differ from the target's."""
  problems = [f"'{k}' is in the model but not in the checkpoint"
              for k in target if k not in stored]
  problems += [f"'{k}' is in the checkpoint but not in the model"
               for k in stored if k not in target]
  problems += [f"'{k}' has shape {_stored_shape(stored[k])} in the checkpoint but "
               f"{_stored_shape(v)} in the model" for k, v in target.items()
               if k in stored and _stored_shape(stored[k]) != _stored_shape(v)]
  if problems:
    more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
    raise CheckpointError(
        f"checkpoint {step_dir} was written by a different model config: "
        f"{problems[0]}{more}; build the model with that run's config")


def _placed(leaf: Any) -> Any:
  """Gives shardingless abstract leaves the default device (as a fresh init would).

  Without it orbax falls back to the shardings recorded at save time, which
  fail on a machine with a different device count.  In a multi-process run
  every process reads the whole array onto its own first device.
  """
  if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
  return leaf


def _restore(mngr: ocp.CheckpointManager, directory: str, abstract_state: Any,
             step: int | None) -> Any:
  """Checked restore shared by ``Checkpointer.restore`` and ``restore_state``."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise _no_checkpoint(directory)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f"no step {step} in {directory} (it holds steps {steps}); "
                          "pass one of those or leave the step out for the latest")
  step_dir = os.path.join(directory, str(step))
  earlier = [s for s in steps if s < step]
  is_state = isinstance(abstract_state, nnx.State)
  target = nnx.to_pure_dict(abstract_state) if is_state else abstract_state
  target = jax.tree.map(_placed, target)
  try:
    meta = mngr.item_metadata(step)
    if meta is None:
      raise ValueError("orbax found no readable item metadata")
    stored = ocp.tree.to_flat_dict(meta.tree, sep=".")
  except Exception as err:  # garbage/truncated metadata files
    raise _corrupt(step_dir, err, earlier) from err
  _check_structure(stored, ocp.tree.to_flat_dict(target, sep="."), step_dir)
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as err:  # structure matched, so the data files are bad
    raise _corrupt(step_dir, err, earlier) from err
  if not is_state:
    return restored
  state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables: no aliasing
  nnx.replace_by_pure_dict(state, restored)
  return state


class Checkpointer:
  """Periodic, asynchronous checkpoints of one training run.

  ``save`` stores ``nnx.State`` as a pure dict (``nnx.to_pure_dict``): nested
  dicts of arrays keyed by module path (``0.lin.kernel``), with Variable values
  such as NamedTuples kept as they are.  The on-disk layout is then independent
  of how NNX flattens Variables (saving the State itself adds a ``value`` level
  per Variable, tied to Variable's pytree registration, and ``nnx.State`` is
  slated to become a plain dict), Variable metadata is never needed to read it,
  and ``restore`` rebuilds the State from the caller's abstract State, so
  Variable types, NamedTuples and optimizer state come back exactly.  Other
  pytrees are saved as given.

  Args:
    directory: Run directory; created if missing.
    save_every: ``save`` writes at multiples of this step count, plus (orbax's
      policy) the first save of a run with no checkpoint yet and a save on
      preemption.
    max_to_keep: Newest checkpoints kept; older ones are deleted.
  """

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 2):
    if save_every < 1 or max_to_keep < 1:
      raise CheckpointError(f"save_every={save_every} and max_to_keep={max_to_keep} "
                            "must both be >= 1")
    self.directory = os.path.abspath(directory)
    try:
      self._mngr = ocp.CheckpointManager(
          self.directory, item_handlers=ocp.StandardCheckpointHandler(),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, save_interval_steps=save_every, create=True))
    except Exception as err:
      raise CheckpointError(f"cannot use {self.directory} for checkpoints ({err}); "
                            "pass a writable directory as --workdir") from err

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if it is a save step (or ``force``).

    Args:
      step: Training step; steps not past the latest saved one are skipped.
      state: ``nnx.State`` (stored as a pure dict) or any pytree of arrays.
      force: Save even when ``step`` is not a multiple of ``save_every``.

    Returns:
      Whether a checkpoint was started (it completes in the background; see
      ``wait``).
    """
    if force and step in self._mngr.all_steps():
      raise CheckpointError(f"step {step} is already saved in {self.directory}; "
                            "save under a new step or delete that step first")
    tree = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    try:
      return bool(self._mngr.save(step, args=ocp.args.StandardSave(tree), force=force))
    except Exception as err:
      raise CheckpointError(f"saving step {step} to {self.directory} failed: {err}") from err

  def latest_step(self) -> int | None:
    """Newest saved step, or None when the directory holds none."""
    return self._mngr.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Loads ``step`` (default: latest) shaped like ``abstract_state``.

    Args:
      abstract_state: ``nnx.state(nnx.eval_shape(...))`` (or any pytree of
        arrays/``jax.ShapeDtypeStruct``); leaves with a sharding are restored
        with it, the rest onto the default device.
      step: Step to load; the latest when None.

    Returns:
      An ``nnx.State`` if ``abstract_state`` is one (use ``nnx.update``), else
      the restored pytree.

    Raises:
      CheckpointError: no checkpoint, unreadable files, or another model config.
    """
    self.wait()
    return _restore(self._mngr, self.directory, abstract_state, step)

  def wait(self) -> None:
    """Blocks until background saves have finished."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_state(directory: str, abstract_state: Any, step: int | None = None) -> Any:
  """Loads a run's checkpoint without writing to it (``--init-from``, evaluation).

  Same arguments, result and errors as ``Checkpointer.restore``.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise _no_checkpoint(directory)
  try:
    mngr = ocp.CheckpointManager(
        directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                             create=False))
  except Exception as err:
    raise CheckpointError(f"cannot read checkpoints in {directory} ({err}); "
                          "check --workdir/--init-from") from err
  try:
    return _restore(mngr, directory, abstract_state, step)
  finally:
    mngr.close()
