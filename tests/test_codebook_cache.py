"""The k-means codebook cache (astra_jax/run/codebook_cache.py) on tiny models:
a hit gives the codebooks k-means computes, bit for bit; any changed input
misses; a bad file or folder warns once and never gives wrong codebooks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import exchange as ex
from astra_jax.core.attention import attention_layers
from astra_jax.models import gpt2, vit
from astra_jax.run import calibrate, codebook_cache

CONTEXT = 16


def _model(seed=0, groups=4, codebook_size=16):
  cfg = gpt2.GPT2Config(variant="nano", vocab_size=64, context=CONTEXT,
                        exchange=ex.make_exchange("vq", groups=groups,
                                                  codebook_size=codebook_size))
  return gpt2.GPT2(cfg, rngs=nnx.Rngs(seed))


def _batches(seed=1, n=4):
  tokens = np.random.default_rng(seed).integers(0, 64, (n, 1, CONTEXT), dtype=np.int32)
  return [(jnp.asarray(t), jnp.arange(CONTEXT)) for t in tokens]


def _codebooks(model):
  return [jax.tree.map(np.asarray, layer.state.get_value()) for layer in attention_layers(model)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def _fit(model=None, batches=None, seed=2, **kw):
  model = _model() if model is None else model
  calibrate.kmeans_codebooks(model, iter(_batches() if batches is None else batches),
                             jax.random.PRNGKey(seed), max_tokens=40, iters=2, **kw)
  return _codebooks(model)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv(codebook_cache.ENV, str(tmp_path / "cache"))
  return tmp_path / "cache" / "codebooks"


def _files(folder):
  return sorted(p.name for p in folder.glob("*.npz")) if folder.exists() else []


def test_a_hit_equals_k_means_afresh_bit_for_bit(cache, capsys):
  fresh = _fit(cache=False)
  assert _files(cache) == []
  miss = _fit()
  (name,) = _files(cache)
  assert f"codebooks: k-means saved to {cache / name}" in capsys.readouterr().out
  hit = _fit()
  assert capsys.readouterr().out.strip() == f"codebooks: k-means loaded from {cache / name}"
  _assert_same(fresh, miss)
  _assert_same(fresh, hit)
  assert not np.array_equal(fresh[0].k.entries, _codebooks(_model())[0].k.entries)


def test_a_hit_skips_the_recording_forwards(cache, monkeypatch):
  _fit()

  def no_forward(*_):
    raise AssertionError("a hit ran the model")
  monkeypatch.setattr(calibrate, "record_kv", no_forward)
  _fit()


@pytest.mark.parametrize("change", [
    dict(model=lambda: _model(seed=5)),  # other weights
    dict(batches=lambda: _batches(seed=9)),  # other calibration tokens
    dict(model=lambda: _model(groups=8)),  # other G
    dict(model=lambda: _model(codebook_size=32)),  # other K
    dict(seed=3),  # other PRNG key
])
def test_any_changed_input_misses(cache, change):
  _fit()
  kw = {k: (v() if callable(v) else v) for k, v in change.items()}
  fresh = _fit(cache=False, **kw)
  assert len(_files(cache)) == 1
  _assert_same(_fit(**kw), fresh)
  assert len(_files(cache)) == 2


def test_max_tokens_iters_and_positions_are_in_the_key(cache):
  model, batches = _model(), _batches()
  layers = attention_layers(model)
  key = lambda b=batches, **kw: codebook_cache.key(  # noqa: E731
      model, b, jax.random.PRNGKey(2), layers=layers, **({"max_tokens": 40, "iters": 2} | kw))
  base = key()
  assert key() == base
  assert key(max_tokens=41) != base and key(iters=3) != base
  assert key(b=[(t, p + 1) for t, p in batches]) != base
  assert key(b=batches[:3]) != base


def test_only_the_batches_k_means_reads_are_taken():
  """take_batches stops where record_kv does: 40 tokens are 3 batches of 16."""
  assert len(calibrate.take_batches(_model(), iter(_batches(n=10)), 40)) == 3
  assert len(calibrate.take_batches(_model(), iter(_batches(n=10)), 48)) == 3
  assert len(calibrate.take_batches(_model(), iter(_batches(n=2)), 48)) == 2
  cfg = vit.ViTConfig(variant="mu/4", image_size=8,
                      exchange=ex.make_exchange("vq", groups=2, codebook_size=8))
  patches = [(jnp.ones((2, 4, 16)), jnp.arange(4))] * 5  # 2 x 4 rows each, the class token aside
  assert len(calibrate.take_batches(vit.ViT(cfg, rngs=nnx.Rngs(0)), iter(patches), 17)) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_layers", "other_shapes"])
def test_a_bad_file_warns_once_and_is_recomputed(cache, capsys, damage):
  fresh = _fit(cache=False)
  _fit()
  (name,) = _files(cache)
  path = cache / name
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  elif damage == "garbage":
    path.write_bytes(b"not a zip file at all")
  else:
    states = [layer.state.get_value() for layer in attention_layers(_model())]
    if damage == "other_layers":
      states = states[:1]
    else:
      states = [jax.tree.map(lambda a: a[:1], s) for s in states]
    codebook_cache.save(str(path), states)
  capsys.readouterr()
  _assert_same(_fit(), fresh)
  captured = capsys.readouterr()
  warnings = [line for line in captured.err.splitlines() if line.strip()]
  assert len(warnings) == 1 and warnings[0].startswith("warning: ") and name in warnings[0]
  assert "saved to" in captured.out
  assert _files(cache) == [name]
  _assert_same(_fit(), fresh)  # overwritten: a clean hit now
  assert "loaded from" in capsys.readouterr().out


def test_an_unwritable_folder_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv(codebook_cache.ENV, str(blocker / "cache"))  # a folder under a file
  fresh = _fit(cache=False)
  _assert_same(_fit(), fresh)
  captured = capsys.readouterr()
  warnings = [line for line in captured.err.splitlines() if line.strip()]
  assert len(warnings) == 1 and warnings[0].startswith("warning: cannot write"), warnings
  assert "Traceback" not in captured.err and "codebooks:" not in captured.out
  assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_off_and_the_default_folder(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(codebook_cache.ENV, "off")
  assert codebook_cache.folder() is None
  _fit()
  assert capsys.readouterr().out == ""
  monkeypatch.setenv("HOME", str(tmp_path))
  for unset in ("", None):
    if unset is None:
      monkeypatch.delenv(codebook_cache.ENV)
    else:
      monkeypatch.setenv(codebook_cache.ENV, unset)
    assert codebook_cache.folder() == os.path.join(str(tmp_path), ".cache", "astra_jax",
                                                   "codebooks")
