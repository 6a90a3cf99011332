"""Checkpoints of training runs: a thin wrapper over ``orbax.checkpoint``.

A run's state (usually ``nnx.state((model, optimizer))``) is saved every
``save_every`` steps into ``directory/<step>``, keeping the newest
``max_to_keep``.  Restoring takes an abstract state (from ``nnx.eval_shape``)
and checks it against the checkpoint's metadata first, so every failure is a
``CheckpointError`` that says what to do instead of a deep orbax/tensorstore
traceback.

Every save also commits the crc32 of each array's bytes (a ``checksums`` JSON
item beside orbax's ``default`` one, so both appear in one atomic commit), and
a restore checks them: a step whose files are unreadable, truncated or whose
arrays do not match is corrupt, and a restore of the latest step falls back to
the newest good one with a one-line warning on stderr.  A training run's own
``Checkpointer`` moves the corrupt step aside to ``<step>.corrupt`` (so the
run can save that step again, and the bytes stay for a post-mortem); readers
(``restore_state``: evaluation, ``--init-from``) never write to a run and
leave it in place.  Steps saved before checksums existed load unverified,
with a warning.

  ckpt = Checkpointer(workdir, save_every=1000)
  ckpt.save(step, nnx.state((model, opt)))
  abstract = nnx.state(nnx.eval_shape(lambda: make_model_and_opt(cfg)))
  nnx.update((model, opt), ckpt.restore(abstract))
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shutil
import sys
import threading
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio

_ITEM = "default"  # orbax's item holding the state (the layout of single-item runs)
_SUMS = "checksums"  # JSON item saved with it: crc32, dtype and shape of every array


class _QuietOrbax(logging.Filter):
  """Drops orbax's own log records (below CRITICAL) from the absl logger.

  Every orbax failure reaches the caller as a one-line ``CheckpointError``;
  left alone, orbax also logs each one with a traceback from every background
  thread involved (a disk-full save printed five), plus routine warnings
  such as "Given directory is read only".
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.CRITICAL
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


logging.getLogger("absl").addFilter(_QuietOrbax())

_FAILED_SAVES: set[str] = set()  # directories whose failed save was reported


class _ReportedSaveFailure(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for the writers of a
  save whose failure was already reported as one ``CheckpointError``.

  When a disk fills, every one of orbax's write tasks fails alike; depending
  on which finish before the first failure stops the save, some are never
  awaited and asyncio logged each with a traceback when it was collected, at
  exit, after our one-line error (seen under load on 2026-12-02: thirty of
  them).  Only records naming a directory in ``_FAILED_SAVES`` are dropped.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if not _FAILED_SAVES or not record.getMessage().startswith(
        "Task exception was never retrieved"):
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return not any(directory in text for directory in _FAILED_SAVES)


logging.getLogger("asyncio").addFilter(_ReportedSaveFailure())


def _run_sync_draining(coro):
  """orbax's ``asyncio_utils._run_sync_via_new_loop``, but a failed coroutine's
  sibling tasks are run to completion before the loop closes.

  orbax gathers one task per array read/write; when one fails (a corrupt
  file, a full disk) it closed the loop with the others still in flight, and
  each of those later printed "RuntimeError: Event loop is closed" from a
  tensorstore thread, after our one-line error.  A task that failed in the
  loop's last iteration has its done-callbacks (where ``gather`` marks its
  exception retrieved) still queued; closing the loop dropped them and asyncio
  logged "Task exception was never retrieved" with a traceback when the task
  was collected (CI, 2026-12-06, a truncated checkpoint under load: 442
  lines).  So the queue is flushed before closing, and once the run has
  failed, its loop drops those records: the failure is reported once, by the
  caller.
  """
  loop = asyncio.new_event_loop()
  failed = False

  def quiet_after_failure(loop_, context):
    if failed and context.get("message", "").startswith("Task exception was never retrieved"):
      return
    loop_.default_exception_handler(context)

  loop.set_exception_handler(quiet_after_failure)
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  except BaseException:
    failed = True
    raise
  finally:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending:
      loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(asyncio.sleep(0))  # the queued done-callbacks
    asyncio.set_event_loop(None)
    loop.close()


if hasattr(_orbax_asyncio, "_run_sync_via_new_loop"):
  _orbax_asyncio._run_sync_via_new_loop = _run_sync_draining


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or belongs to another model config."""


class CorruptCheckpointError(CheckpointError):
  """One step's files are damaged: unreadable, truncated, or arrays that do not
  match their checksums."""

  def __init__(self, step_dir: str, reason: str):
    super().__init__(f"checkpoint {step_dir} is corrupt ({reason})")
    self.step_dir, self.reason = step_dir, reason


def _reason(err: BaseException) -> str:
  """One clean line about ``err``: its root cause, no object reprs or TensorStore specs."""
  while err.__cause__ is not None:
    err = err.__cause__
  text = (str(err).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  text = re.sub(r"<[^<>]*>?", "", text).strip() or type(err).__name__
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:  # tensorstore's wording of an OSError: keep the OS's own words
    text = f"{os.strerror(int(code.group(1)))} ({text.split(':')[0]})"
  elif isinstance(err, OSError) and err.strerror:
    text = err.strerror + (f": {err.filename}" if err.filename else "")
  elif type(err) not in (ValueError, Exception):  # those wrap tensorstore's own codes
    text = f"{type(err).__name__}: {text}"
  return text if len(text) <= 240 else text[:237] + "..."


def _host_array(leaf: Any) -> np.ndarray | None:
  """``leaf`` as this process holds it (typed PRNG keys as key data); None for an
  array sharded over processes, which no process holds whole."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        return None
      leaf = leaf.addressable_data(0)
  array = np.asarray(leaf)
  if array.dtype.kind in "OUS":
    return None
  return array if array.flags.c_contiguous else array.copy(order="C")


def _crc32(array: np.ndarray) -> int:
  return zlib.crc32(array.reshape(-1).view(np.uint8))


def checksums(tree: Any) -> dict[str, dict]:
  """crc32 of every array's host bytes (with dtype and shape), keyed by its
  dotted path in ``tree`` (``params.0.lin.kernel``), as saved with a step."""
  sums = {}
  for key, leaf in ocp.tree.to_flat_dict(tree, sep=".").items():
    array = _host_array(leaf)
    if array is not None:
      sums[key] = {"crc32": _crc32(array), "dtype": str(array.dtype), "shape": list(array.shape)}
  return sums


def _verify(restored: Any, sums: dict[str, dict], step_dir: str) -> None:
  """Raises ``CorruptCheckpointError`` naming the first array whose bytes changed.

  Arrays restored with another dtype or shape than saved (a cast asked for by
  the caller) cannot be compared byte for byte and are skipped.
  """
  for key, leaf in ocp.tree.to_flat_dict(restored, sep=".").items():
    want, array = sums.get(key), _host_array(leaf)
    if (want is None or array is None or str(array.dtype) != want["dtype"]
        or list(array.shape) != want["shape"]):
      continue
    if _crc32(array) != want["crc32"]:
      raise CorruptCheckpointError(step_dir, f"array '{key}' does not match its saved checksum")


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _no_checkpoint(directory: str) -> CheckpointError:
  return CheckpointError(
      f"no checkpoint in {directory}: train first with `--workdir {directory}` "
      "or check --workdir/--init-from")


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


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, item_handlers={_ITEM: ocp.StandardCheckpointHandler(),
                                _SUMS: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(**options))


def _restore_step(mngr: ocp.CheckpointManager, directory: str, target: Any,
                  step: int) -> Any:
  """One step's pytree, checked against ``target``'s structure and its checksums."""
  step_dir = os.path.join(directory, str(step))
  try:
    meta = mngr.item_metadata(step)
    meta = meta[_ITEM] if meta is not None and _ITEM in meta.keys() else None
    if meta is None:
      raise ValueError("no readable item metadata")
    stored = ocp.tree.to_flat_dict(meta.tree, sep=".")
  except Exception as err:  # garbage/truncated metadata files
    raise CorruptCheckpointError(step_dir, _reason(err)) from err
  _check_structure(stored, ocp.tree.to_flat_dict(target, sep="."), step_dir)
  has_sums = os.path.exists(os.path.join(step_dir, _SUMS))
  try:
    args = {_ITEM: ocp.args.StandardRestore(target)}
    if has_sums:
      args[_SUMS] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as err:  # structure matched, so the data files are bad
    raise CorruptCheckpointError(step_dir, _reason(err)) from err
  if has_sums:
    if not isinstance(restored[_SUMS], dict):
      raise CorruptCheckpointError(step_dir, "its checksums file is unreadable")
    _verify(restored[_ITEM], restored[_SUMS], step_dir)
  else:
    _warn(f"checkpoint {step_dir} has no checksums (saved before they existed); "
          "loaded unverified")
  return restored[_ITEM]


def _restore(mngr: ocp.CheckpointManager, directory: str, abstract_state: Any,
             step: int | None) -> tuple[Any, int, list[CorruptCheckpointError]]:
  """Checked restore shared by ``Checkpointer.restore`` and ``restore_state``.

  Returns the state, its step and the corrupt steps newer than it (their
  errors, newest first): with ``step`` None, the newest step that restores
  and verifies is used.  Raises when the asked-for step, or every step, is
  corrupt.
  """
  steps = sorted(mngr.all_steps())
  if not steps:
    raise _no_checkpoint(directory)
  if step is not None and step not in steps:
    raise CheckpointError(f"no step {step} in {directory} (it holds steps {steps}); "
                          "pass one of those or leave the step out for the latest")
  is_state = isinstance(abstract_state, nnx.State)
  target = nnx.to_pure_dict(abstract_state) if is_state else abstract_state
  target = jax.tree.map(_placed, target)
  corrupt = []
  for candidate in ([step] if step is not None else reversed(steps)):
    try:
      restored = _restore_step(mngr, directory, target, candidate)
      break
    except CorruptCheckpointError as err:
      corrupt.append(err)
  else:
    if step is not None:
      raise CheckpointError(f"{corrupt[0]}; pass another step (the run holds {steps}) or "
                            "leave the step out for the newest good one")
    more = f" (and {len(corrupt) - 1} older steps, also corrupt)" if len(corrupt) > 1 else ""
    raise CheckpointError(f"no good checkpoint left: {corrupt[0]}{more}; delete {directory} "
                          "and train again")
  if not is_state:
    return restored, candidate, corrupt
  state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables: no aliasing
  nnx.replace_by_pure_dict(state, restored)
  return state, candidate, corrupt


def _lost_peer(err: BaseException) -> bool:
  """Whether a failed save means another process of a multi-process run died."""
  from astra_jax.parallel import distributed
  return jax.process_count() > 1 and distributed.is_peer_failure(err)


def _save_failed(step: int, directory: str, err: Exception) -> CheckpointError:
  return CheckpointError(
      f"saving step {step} to {directory} failed ({_reason(err)}); free space there or "
      "pass another --workdir, then rerun to resume from the last saved step")


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
    self._pending = None  # step of the save still finishing in the background
    try:
      self._mngr = _manager(self.directory, max_to_keep=max_to_keep,
                            save_interval_steps=save_every, create=True,
                            cleanup_tmp_directories=True)  # a killed run's partial save
    except Exception as err:
      raise CheckpointError(f"cannot use {self.directory} for checkpoints ({_reason(err)}); "
                            "pass a writable directory as --workdir") from err

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if it is a save step (or ``force``).

    The crc32 of every array is computed here, from the host bytes, and
    committed together with the arrays.  A failed save (disk full: ``OSError``
    in orbax's background threads) raises ``CheckpointError`` naming its own
    step, here or at the next ``save``/``wait``/``close``, and leaves no
    ``*.orbax-checkpoint-tmp*`` folder behind.

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
    if not force and not self._mngr.should_save(step):
      return False
    self._finish()  # a failure of the previous save is reported under its own step
    tree = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(tree),
                                 _SUMS: ocp.args.JsonSave(checksums(tree))})
    try:
      started = bool(self._mngr.save(step, args=args, force=force))
    except Exception as err:
      self._discard_partial()
      if _lost_peer(err):
        raise  # not the disk: a collective or barrier failed, the excepthook names the peer
      raise _save_failed(step, self.directory, err) from None
    if started:
      self._pending = step
    return started

  def due(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without ``force`` would write a checkpoint."""
    return self._mngr.should_save(step)

  def latest_step(self) -> int | None:
    """Newest saved step, or None when the directory holds none."""
    return self._mngr.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Loads ``step`` (default: the newest good one) shaped like ``abstract_state``.

    A corrupt newer step is moved aside to ``<step>.corrupt`` with a one-line
    warning on stderr, so that this run can save that step again.

    Args:
      abstract_state: ``nnx.state(nnx.eval_shape(...))`` (or any pytree of
        arrays/``jax.ShapeDtypeStruct``); leaves with a sharding are restored
        with it, the rest onto the default device.
      step: Step to load; the newest that restores and matches its checksums
        when None.

    Returns:
      An ``nnx.State`` if ``abstract_state`` is one (use ``nnx.update``), else
      the restored pytree.

    Raises:
      CheckpointError: no checkpoint, only corrupt ones, a corrupt ``step``,
        or another model config.
    """
    self.wait()
    state, used, corrupt = _restore(self._mngr, self.directory, abstract_state, step)
    for err in corrupt:
      _warn(f"{err}; {self._move_aside(err.step_dir)}, using step {used} instead")
    if corrupt:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("astra_jax: corrupt checkpoints moved aside")
      self._mngr.reload()
    return state

  def _move_aside(self, step_dir: str) -> str:
    """Renames a corrupt step (process 0); says what happened."""
    if jax.process_index() != 0:
      return "moved aside by process 0"
    dest, n = f"{step_dir}.corrupt", 1
    while os.path.exists(dest):
      dest, n = f"{step_dir}.corrupt{n}", n + 1
    try:
      os.rename(step_dir, dest)
    except OSError as err:
      return f"could not move it aside ({err.strerror})"
    return f"moved it to {dest}"

  def _finish(self) -> None:
    """Waits for the save in flight; its failure names its step and cleans up."""
    step, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as err:
      self._discard_partial()
      if _lost_peer(err):
        raise  # not the disk: a collective or barrier failed, the excepthook names the peer
      raise _save_failed(step, self.directory, err) from None

  def _discard_partial(self) -> None:
    """Removes the temporary folders of a failed save (process 0) and silences
    the leftover writers' unretrieved exceptions (``_ReportedSaveFailure``).

    orbax stops waiting at the first failed write while its other writer
    threads (one per array item, sharding file, metadata) run on and would
    recreate files in a folder removed now; they end soon, so join them first.
    """
    _FAILED_SAVES.add(self.directory)
    for thread in threading.enumerate():
      if type(thread).__module__.startswith("orbax.checkpoint._src.futures"):
        thread.join(timeout=60)
    if jax.process_index() == 0:
      for path in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
        shutil.rmtree(path, ignore_errors=True)
    try:
      self._mngr.reload()
    except Exception:  # pylint: disable=broad-except  (best effort after a failure)
      pass

  def wait(self) -> None:
    """Blocks until background saves have finished (raises if one failed)."""
    self._finish()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    try:
      self._finish()
    finally:
      try:
        self._mngr.close()
      except Exception:  # pylint: disable=broad-except  (a failed save, raised above)
        pass

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_state(directory: str, abstract_state: Any, step: int | None = None) -> Any:
  """Loads a run's checkpoint without writing to it (``--init-from``, evaluation).

  Same arguments, result and errors as ``Checkpointer.restore``, except that
  a corrupt newer step is left in place (named in the warning).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise _no_checkpoint(directory)
  try:
    mngr = _manager(directory, read_only=True, save_interval_steps=0, create=False)
  except Exception as err:
    raise CheckpointError(f"cannot read checkpoints in {directory} ({_reason(err)}); "
                          "check --workdir/--init-from") from err
  try:
    state, used, corrupt = _restore(mngr, directory, abstract_state, step)
  finally:
    mngr.close()
  for err in corrupt:  # a reader never writes to the run, so the step stays
    _warn(f"{err}; left in place, using step {used} instead")
  return state
