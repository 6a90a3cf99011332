"""Checkpointer: round trips of NNX model + optimizer state, retention, errors."""

import asyncio
import errno
import gc
import glob
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from astra_jax.io import checkpoint as ckpt_lib
from astra_jax.io.checkpoint import CheckpointError, Checkpointer, restore_state


class Pair(NamedTuple):
  a: jax.Array
  b: jax.Array


class Stats(nnx.Variable):
  """Non-Param state holding a NamedTuple, like attention.ExchangeState."""


class Tiny(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.lin = nnx.Linear(4, width, rngs=rngs)
    key = rngs.params()
    self.stats = Stats(Pair(jax.random.normal(key, (3,)), jnp.zeros((2, 2))))
    self.rngs = rngs.fork()

  def __call__(self, x):
    self.stats.set_value(Pair(self.stats.get_value().a + 1.0, self.stats.get_value().b - 2.0))
    return self.lin(x) + jax.random.normal(self.rngs.noise(), ())


def make(seed: int = 0, width: int = 8):
  model = Tiny(width, nnx.Rngs(seed))
  return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def trained(seed: int = 0, steps: int = 1):
  model, opt = make(seed)
  for _ in range(steps):
    grads = nnx.grad(lambda m: jnp.mean(m(jnp.ones((2, 4))) ** 2))(model)
    opt.update(model, grads)
  return model, opt


def abstract(width: int = 8):
  return nnx.state(nnx.eval_shape(lambda: make(123, width)))


def plain_leaves(tree):
  def plain(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return [np.asarray(plain(x)) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(plain_leaves(a), plain_leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def save_steps(directory, steps, **kwargs):
  model, opt = trained()
  with Checkpointer(str(directory), **{"save_every": 1, **kwargs}) as ckpt:
    for s in steps:
      ckpt.save(s, nnx.state((model, opt)))
  return model, opt


def test_round_trip_into_fresh_model(tmp_path):
  model, opt = trained(steps=2)
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    assert ckpt.save(2, nnx.state((model, opt)))
    fresh, fresh_opt = make(seed=1)  # different init: restore must overwrite all of it
    assert not np.array_equal(fresh.lin.kernel.get_value(), model.lin.kernel.get_value())
    assert not np.array_equal(fresh.stats.get_value().a, model.stats.get_value().a)
    nnx.update((fresh, fresh_opt), ckpt.restore(abstract()))
  assert_same(nnx.state((model, opt)), nnx.state((fresh, fresh_opt)))
  assert isinstance(fresh.stats, Stats) and isinstance(fresh.stats.get_value(), Pair)
  assert int(fresh_opt.step.get_value()) == 2
  assert_same(nnx.state((model, opt)), restore_state(str(tmp_path), abstract()))
  fresh(jnp.ones((2, 4)))  # the restored model still runs (keys, counters usable)


def test_plain_pytree_round_trip(tmp_path):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "pair": Pair(jnp.ones(2), jnp.int32(7))}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.save(1, tree)
    assert_same(tree, ckpt.restore(jax.eval_shape(lambda: tree)))


def test_latest_step_and_max_to_keep(tmp_path):
  with Checkpointer(str(tmp_path), save_every=1, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    model, opt = trained()
    for s in (1, 2, 3):
      assert ckpt.save(s, nnx.state((model, opt)))
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    ckpt.restore(abstract(), step=2)
    with pytest.raises(CheckpointError, match=r"no step 1 .*holds steps \[2, 3\]"):
      ckpt.restore(abstract(), step=1)


def test_save_every_skips_and_force(tmp_path):
  model, opt = trained()
  state = nnx.state((model, opt))
  with Checkpointer(str(tmp_path), save_every=5, max_to_keep=5) as ckpt:
    saved = [s for s in range(1, 12) if ckpt.save(s, state)]
    assert saved == [1, 5, 10]  # a fresh run's first save is orbax's baseline checkpoint
    assert ckpt.save(11, state, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 11
    with pytest.raises(CheckpointError, match="already saved"):
      ckpt.save(11, state, force=True)
    assert not ckpt.save(9, state)  # not past the latest step
  with Checkpointer(str(tmp_path), save_every=5, max_to_keep=5) as resumed:
    assert [s for s in range(12, 16) if resumed.save(s, state)] == [15]  # no baseline on resume
  assert sorted(os.listdir(tmp_path), key=int) == ["1", "5", "10", "11", "15"]


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match=r"no checkpoint in .*nope: train first .*--init-from"):
    restore_state(str(tmp_path / "nope"), abstract())


def test_empty_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint in .*train first"):
    restore_state(str(tmp_path), abstract())
  with Checkpointer(str(tmp_path / "run"), save_every=1) as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoint in .*--workdir"):
      ckpt.restore(abstract())


def _garbage(path):
  with open(path, "wb") as f:
    f.write(b"\x00garbage\xff" * 7)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path):
  """XORs 16 bytes in the middle of a file: same size, different bytes."""
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for i in range(middle, min(middle + 16, len(data))):
    data[i] ^= 0x5A
  with open(path, "wb") as f:
    f.write(data)


def _damage(step_dir, damage, which):
  files = [p for p in glob.glob(str(step_dir / "**" / which), recursive=True) if os.path.isfile(p)]
  assert files
  for p in files:
    damage(p)


def save_two_states(directory):
  """Different states at steps 1 and 2; returns both."""
  one, two = nnx.state(trained(steps=1)), nnx.state(trained(steps=2))
  with Checkpointer(str(directory), save_every=1) as ckpt:
    ckpt.save(1, one)
    ckpt.save(2, two)
  return one, two


def one_warning(capfd) -> str:
  """The one line a fallback writes to stderr (no reprs, no tracebacks)."""
  lines = capfd.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: "), lines
  assert "<" not in lines[0] and "Traceback" not in lines[0], lines[0]
  return lines[0]


# orbax's aborted reads once printed "RuntimeError: Event loop is closed" (an unraisable exception)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, which", [
    (_garbage, "*"),  # every file in the step directory
    (_garbage, "default/d/*"),  # array data only (metadata still fine)
    (_garbage, "default/_METADATA"),
    (_truncate, "*"),
    (_truncate, "**/d/*"),
    (_garbage, "checksums/*"),
])
def test_corrupt_latest_step_falls_back_to_older_one(tmp_path, capfd, damage, which):
  one, two = save_two_states(tmp_path)
  step_dir = tmp_path / "2"
  _damage(step_dir, damage, which)
  capfd.readouterr()
  # a reader (evaluation, --init-from) uses step 1 and leaves step 2 in place
  assert_same(one, restore_state(str(tmp_path), abstract()))
  warning = one_warning(capfd)
  assert f"checkpoint {step_dir} is corrupt (" in warning
  assert warning.endswith("left in place, using step 1 instead")
  assert step_dir.is_dir()
  with pytest.raises(CheckpointError, match=rf"{step_dir} is corrupt .*pass another step "
                     r"\(the run holds \[1, 2\]\)") as err:
    restore_state(str(tmp_path), abstract(), step=2)
  assert "\n" not in str(err.value) and "<" not in str(err.value)
  # the run's own Checkpointer moves step 2 aside, so training can save it again
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    capfd.readouterr()
    assert_same(one, ckpt.restore(abstract()))
    assert one_warning(capfd).endswith(f"moved it to {step_dir}.corrupt, using step 1 instead")
    assert ckpt.latest_step() == 1 and (tmp_path / "2.corrupt").is_dir()
    assert ckpt.save(2, two)
    assert_same(two, ckpt.restore(abstract()))
  assert capfd.readouterr().err == ""
  assert_same(two, restore_state(str(tmp_path), abstract()))


@pytest.mark.parametrize("later", range(6))
def test_a_read_task_failing_as_the_loop_stops_logs_nothing(caplog, later):
  """A gathered read that fails in the iteration where the loop stops (which
  iteration that is depends on ``later``) once logged "Task exception was
  never retrieved" with a traceback when collected: its done-callback, where
  ``gather`` retrieves it, was still queued when the loop closed."""
  async def read(delay):
    for _ in range(delay):
      await asyncio.sleep(0)
    raise OSError(f"read failed after {delay} yields")

  async def restore():
    await asyncio.gather(read(0), read(later))

  with pytest.raises(OSError, match="after 0 yields"):
    ckpt_lib._run_sync_draining(restore())
  gc.collect()
  assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_garbled_array_bytes_are_caught_by_checksums(tmp_path, capfd):
  """Bytes flipped inside an array orbax stores raw (random floats do not
  compress) load without any error from orbax; the checksum catches them."""
  rng = np.random.default_rng(0)
  trees = [{"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)} for _ in range(2)]
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    for step, tree in enumerate(trees, start=1):
      ckpt.save(step, tree)
  data = max((p for p in glob.glob(str(tmp_path / "2" / "**" / "d" / "*"), recursive=True)),
             key=os.path.getsize)
  _flip(data)
  target = jax.eval_shape(lambda: trees[0])
  capfd.readouterr()
  assert_same(trees[0], restore_state(str(tmp_path), target))
  assert "array 'w' does not match its saved checksum" in one_warning(capfd)


def test_no_good_checkpoint_left_names_the_fix(tmp_path):
  save_two_states(tmp_path)
  for step in ("1", "2"):
    _damage(tmp_path / step, _garbage, "*")
  with pytest.raises(CheckpointError, match=rf"no good checkpoint left: checkpoint {tmp_path}/2 "
                     rf"is corrupt .*\(and 1 older steps, also corrupt\); delete {tmp_path} and "
                     "train again") as err:
    restore_state(str(tmp_path), abstract())
  assert "\n" not in str(err.value)
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    with pytest.raises(CheckpointError, match="no good checkpoint left"):
      ckpt.restore(abstract())
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing moved when nothing is usable


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path, capfd):
  """Runs saved before checksums existed (orbax's single-item layout) still load."""
  model, opt = trained()
  mngr = ocp.CheckpointManager(str(tmp_path), item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(1, args=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state((model, opt)))))
  mngr.close()
  capfd.readouterr()
  assert_same(nnx.state((model, opt)), restore_state(str(tmp_path), abstract()))
  assert "has no checksums (saved before they existed); loaded unverified" in one_warning(capfd)


def test_failed_background_save_names_its_step_and_leaves_no_temporary_folder(
    tmp_path, capfd, caplog, monkeypatch):
  """Disk full while orbax finishes a save in the background."""
  model, opt = trained()
  state = nnx.state((model, opt))
  with Checkpointer(str(tmp_path), save_every=2) as ckpt:
    assert ckpt.save(2, state)
    ckpt.wait()

    async def disk_full(self, *args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=rf"saving step 4 to {tmp_path} failed "
                       r"\(No space left on device\); free space") as err:
      assert ckpt.save(4, state)  # the failure surfaces here or when waiting
      assert not ckpt.save(5, state)
      ckpt.wait()
    assert "\n" not in str(err.value)
    assert glob.glob(str(tmp_path / "*tmp*")) == []
    assert ckpt.latest_step() == 2
    monkeypatch.undo()
  assert capfd.readouterr().err == ""  # orbax's own tracebacks are not printed
  assert sorted(os.listdir(tmp_path)) == ["2"]
  # a writer of that save whose exception nobody awaited is not logged when collected;
  # one about another directory still is
  for where in (tmp_path / "4.orbax-checkpoint-tmp" / "d", "/elsewhere"):
    _unretrieved_failure(OSError(errno.ENOSPC, f"Failed writing {where}"))
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "never retrieved" in logged[0] and "/elsewhere" in logged[0]


def _unretrieved_failure(exc: BaseException) -> None:
  """A task that fails, is never awaited and is collected (asyncio then logs it)."""
  async def fail():
    raise exc

  loop = asyncio.new_event_loop()
  task = loop.create_task(fail())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task
  gc.collect()


def test_different_config_names_key_and_shapes(tmp_path):
  save_steps(tmp_path, [1])
  with pytest.raises(CheckpointError, match=r"different model config: '0\.lin\.bias' has "
                     r"shape \(8,\) in the checkpoint but \(16,\) in the model"):
    restore_state(str(tmp_path), abstract(width=16))


def test_different_structure_names_key(tmp_path):
  save_steps(tmp_path, [1])
  model_only = nnx.state(nnx.eval_shape(lambda: make(0)[0]))
  with pytest.raises(CheckpointError, match=r"different model config: 'lin\.bias' is in the "
                     "model but not in the checkpoint"):
    restore_state(str(tmp_path), model_only)


def test_bad_arguments():
  with pytest.raises(CheckpointError, match="save_every"):
    Checkpointer("/tmp/unused", save_every=0)
  assert issubclass(ckpt_lib.CheckpointError, ValueError)
