"""What a user sees while waiting: k-means calibration's progress bars and codebook
cache lines (astra_jax/run/calibrate.py), and one ``compiled WHAT in N s`` line per
big compile (astra_jax/parallel/forward.py: timed_compile) that compiles nothing
twice.  The CLIs' lines are checked in test_llama_cli.py."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astra_jax.parallel import forward, mesh as mesh_lib
from astra_jax.run import calibrate, codebook_cache, training
from test_codebook_cache import _fit, _files


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv(codebook_cache.ENV, str(tmp_path / "cache"))
  return tmp_path / "cache" / "codebooks"


def test_a_fit_shows_its_bars_and_says_where_it_cached(cache, capsys, monkeypatch):
  """With QUIET_S at 0 (a tiny fit is under it and stays quiet: test_codebook_cache)."""
  monkeypatch.setattr(calibrate, "QUIET_S", 0.0)
  _fit()
  first = capsys.readouterr()
  (name,) = _files(cache)
  # tqdm redraws with \r: the last state of each bar, the 3 batches that hold 40
  # tokens and the nano model's 2 layers
  bars = [line.strip() for line in re.split(r"[\r\n]", first.err) if line.strip()]
  assert any(re.match(r"calibration forwards: 100%\|.*\| 3/3 \[", b) for b in bars), bars
  assert any(re.match(r"kmeans codebooks: 100%\|.*\| 2/2 \[.*layer", b) for b in bars), bars
  assert re.fullmatch(rf"codebooks: k-means saved to {re.escape(str(cache / name))} after "
                      r"\d+\.\d s; the next run on the same weights, data and settings loads "
                      r"it instead of fitting \(ASTRA_CACHE_DIR picks the folder, =off turns "
                      r"the cache off\)\n", first.out), first.out
  _fit()
  second = capsys.readouterr()
  assert second.out == f"codebooks: k-means loaded from {cache / name}\n"
  assert second.err == ("(fitted by an earlier run on the same weights, data and settings; "
                        "to fit again, delete the file or set ASTRA_CACHE_DIR=off)\n")


def test_a_bar_is_drawn_at_quiet_s_before_its_first_update(capsys, monkeypatch):
  """One slow step (a SmolLM2 forward: ~20 s) does not keep the bar hidden past QUIET_S;
  a phase done before QUIET_S draws nothing."""
  monkeypatch.setattr(calibrate, "QUIET_S", 0.05)
  with calibrate.delayed_bar(None, total=2, desc="slow", unit="batch") as bar:
    time.sleep(0.5)
    drawn = capsys.readouterr().err
    bar.update(2)
  assert re.search(r"slow:\s+0%\|.*\| 0/2 \[", drawn), drawn
  assert re.search(r"slow: 100%\|.*\| 2/2 \[", capsys.readouterr().err)
  monkeypatch.setattr(calibrate, "QUIET_S", 5.0)
  with calibrate.delayed_bar(None, total=2, desc="quick", unit="batch") as bar:
    bar.update(2)
  assert capsys.readouterr().err == ""


class _Compiles:
  """Counts XLA backend compiles while active."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __exit__(self, *exc_info):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def _fresh():
  """A new function each call: nothing jax compiled for another one is reused."""
  return lambda x: jnp.tanh(x @ x.T).sum()


def test_timed_compile_says_its_time_once_and_compiles_once(capsys):
  x = jnp.arange(12.0).reshape(3, 4)
  plain = jax.jit(_fresh())
  with _Compiles() as direct:
    want = [plain(x), plain(x)]
  timed = forward.timed_compile(jax.jit(_fresh()), "the thing")
  with _Compiles() as wrapped:
    got = [timed(x), timed(x)]
  assert direct.count == wrapped.count == 1
  np.testing.assert_array_equal(got, want)
  out = capsys.readouterr()
  assert re.fullmatch(r"compiled the thing in \d+\.\d s\n", out.out) and out.err == ""
  forward.timed_compile(jax.jit(_fresh()), "the thing", stderr=True)(x)
  out = capsys.readouterr()
  assert out.out == "" and re.fullmatch(r"compiled the thing in \d+\.\d s\n", out.err)


def test_a_donating_sharded_train_step_compiles_once_through_timed_compile(capsys):
  """training.make_train_step (state donated) on a 4-device mesh, a linear model
  for a quick compile: the ahead-of-time compile is the one its calls use."""
  mesh = mesh_lib.seq_mesh_or_none(4)
  tx = training.make_optimizer(lr=1e-2, weight_decay=0.0, warmup_steps=1, total_steps=4)
  inputs = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32)
  batch = mesh_lib.to_global(((inputs,), inputs.argmax(-1)), mesh, ((1,), 1))
  counts = []
  for wrap in (False, True):
    apply_fn = lambda params, rest, x: (x @ params["w"], rest, 0.0)  # noqa: E731 (fresh)
    step = training.make_train_step(apply_fn, training.classification_loss, tx)
    step = forward.timed_compile(step, "the training step") if wrap else step
    state = mesh_lib.replicate(training.init_state({"w": jnp.eye(4)}, {}, tx), mesh)
    with _Compiles() as compiles:
      for _ in range(2):
        state, metrics = step(state, *batch)
      float(metrics["loss"])
    counts.append(compiles.count)
  assert counts[0] == counts[1] >= 1, counts
  assert re.fullmatch(r"compiled the training step in \d+\.\d s\n", capsys.readouterr().out)
