"""Codebook initialisation from a trained model's own keys and values.

ASTRA fine-tunes from a full-precision model; its codebooks start from k-means
on that model's K/V.  ``kmeans_codebooks`` runs the model on one device (no
exchange, so every layer sees exact K/V, as the trained model expects),
records each attention layer's K and V, and fits one grouped codebook per
layer for K and one for V.  The result is cached on disk under a hash of
everything it depends on (``astra_jax.run.codebook_cache``): the same model,
calibration batches, seed and (G, K) load it instead of fitting again.

A calibration that has run ``QUIET_S`` seconds shows its progress on stderr:
a bar over the recording forwards, then one over the layers k-means fits
(SmolLM2-135M on 2 busy CPU cores: 16 forwards of ~20 s, then 30 layers of
~22 s).  Tiny ones stay quiet.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from astra_jax.core import quantizer as vq
from astra_jax.core.attention import attention_layers
from astra_jax.core.exchange import VQExchange, VQState
from astra_jax.run import codebook_cache


QUIET_S = 5.0  # seconds a calibration runs before its progress bars appear


@contextlib.contextmanager
def delayed_bar(started: float | None, **kw) -> Iterator[tqdm]:
  """A tqdm bar on stderr (process 0) that appears once ``QUIET_S`` seconds have
  passed since ``started`` (a ``time.monotonic()``; None: since now), drawn by a
  timer then, not at the first update after it (one SmolLM2 forward: ~20 s)."""
  waited = 0.0 if started is None else time.monotonic() - started
  delay = max(0.0, QUIET_S - waited)
  with tqdm(delay=delay, disable=jax.process_index() != 0, **kw) as bar:
    if not delay:  # drawn already
      yield bar
      return
    timer = threading.Timer(delay, bar.refresh)
    timer.daemon = True
    timer.start()
    try:
      yield bar
    finally:
      timer.cancel()
      timer.join()  # before the bar closes: no redraw after its last line


def record_kv(model: nnx.Module, batches: Iterable[tuple], max_tokens: int, *,
              started: float | None = None) -> list[tuple]:
  """Runs ``model(*batch)`` on one device; returns per-layer ([N, D] keys, [N, D] values).

  ``started``: when the calibration began, for its progress bar (``delayed_bar``).
  """
  layers = attention_layers(model)
  if not layers:
    raise ValueError("the model has no SequenceAttention layers to calibrate")
  ks: list[list] = [[] for _ in layers]
  vs: list[list] = [[] for _ in layers]
  model.eval()
  for layer in layers:
    layer.record_kv = True
  seen = 0
  total = len(batches) if isinstance(batches, (list, tuple)) else None
  with delayed_bar(started, total=total, desc="calibration forwards", unit="batch") as bar:
    for batch in batches:
      model(*batch)
      for i, layer in enumerate(layers):
        k, v, _, _ = layer.recorded.get_value()
        ks[i].append(k.reshape(-1, k.shape[-2] * k.shape[-1]))
        vs[i].append(v.reshape(-1, v.shape[-2] * v.shape[-1]))
      jax.block_until_ready((ks[-1][-1], vs[-1][-1]))  # the bar counts finished forwards
      bar.update()
      seen += ks[0][-1].shape[0]
      if seen >= max_tokens:
        break
  for layer in layers:
    layer.record_kv = False
    del layer.recorded
  return [(jnp.concatenate(k)[:max_tokens], jnp.concatenate(v)[:max_tokens])
          for k, v in zip(ks, vs)]


def take_batches(model: nnx.Module, batches: Iterable[tuple], max_tokens: int) -> list[tuple]:
  """The batches ``record_kv(model, batches, max_tokens)`` would consume, as a list.

  A batch's K/V rows (tokens after the layer's private ones, times the batch)
  come from the model's abstract evaluation (``jax.eval_shape``, no compute),
  once per batch shape.
  """
  layers = attention_layers(model)
  if not layers:
    raise ValueError("the model has no SequenceAttention layers to calibrate")
  model.eval()
  graphdef, state = nnx.split(model)

  def first_keys(state, batch):
    m = nnx.merge(graphdef, state)
    layer = attention_layers(m)[0]
    layer.record_kv = True
    m(*batch)
    return layer.recorded.get_value()[0]

  rows: dict = {}
  taken, seen = [], 0
  for batch in batches:
    taken.append(batch)
    shape = str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), batch))
    if shape not in rows:
      k = jax.eval_shape(first_keys, state, batch)
      rows[shape] = math.prod(k.shape[:-2])
    seen += rows[shape]
    if seen >= max_tokens:
      break
  return taken


def fit_codebooks(layers: list, samples: list[tuple], key: jax.Array, iters: int, *,
                  started: float | None = None) -> list[VQState]:
  """Per layer, k-means codebooks for its keys and its values (``samples``: per
  layer ([N, D] keys, [N, D] values), as ``record_kv`` returns them).

  ``started``: when the calibration began, for its progress bar (``delayed_bar``).
  """
  fit = jax.jit(vq.kmeans_init, static_argnums=(2, 3, 4))
  states = []
  with delayed_bar(started, total=len(layers), desc="kmeans codebooks", unit="layer") as bar:
    for layer, (k, v), layer_key in zip(layers, samples, jax.random.split(key, len(layers))):
      ex = layer.exchange
      kk, kv = jax.random.split(layer_key)
      states.append(jax.block_until_ready(  # the bar counts finished layers
          VQState(fit(kk, k, ex.groups, ex.codebook_size, iters),
                  fit(kv, v, ex.groups, ex.codebook_size, iters))))
      bar.update()
  return states


def kmeans_codebooks(model: nnx.Module, batches: Iterable[tuple], key: jax.Array, *,
                     max_tokens: int = 4096, iters: int = 10, cache: bool = True) -> None:
  """Sets every VQ layer's codebooks by k-means on ``model``'s own K/V (in place).

  With ``cache`` (and the cache not turned off, ``ASTRA_CACHE_DIR=off``) the
  result is looked up first under a hash of the model's weights, the batches
  consumed, ``max_tokens``, ``iters``, ``key`` and each layer's (G, K), and
  saved there after a miss: see ``astra_jax.run.codebook_cache``.  A hit
  skips both the recording forwards and k-means; its codebooks are bit for bit
  those k-means computes.
  """
  started = time.monotonic()
  layers = attention_layers(model)
  exchanges = {type(m.exchange) for m in layers}
  if not all(isinstance(m.state.get_value(), VQState) for m in layers):
    raise ValueError(f"k-means calibration needs vq exchanges, the model has {exchanges}")
  path = None
  if cache and codebook_cache.folder() is not None:
    batches = take_batches(model, batches, max_tokens)
    digest = codebook_cache.key(model, batches, key, max_tokens=max_tokens, iters=iters,
                                layers=layers)
    path = digest and codebook_cache.path_for(digest)
  if path:
    states = codebook_cache.load(path, [layer.state.get_value() for layer in layers])
    if states is not None:
      for layer, state in zip(layers, states):
        layer.state.set_value(state)
      codebook_cache.say(f"codebooks: k-means loaded from {path}")
      codebook_cache.note("(fitted by an earlier run on the same weights, data and settings; "
                          f"to fit again, delete the file or set {codebook_cache.ENV}=off)")
      return
  samples = record_kv(model, batches, max_tokens, started=started)
  states = fit_codebooks(layers, samples, key, iters, started=started)
  for layer, state in zip(layers, states):
    layer.state.set_value(state)
  if path and codebook_cache.save(path, states):
    codebook_cache.say(f"codebooks: k-means saved to {path} after "
                       f"{time.monotonic() - started:.1f} s; the next run on the same weights, "
                       "data and settings loads it instead of fitting "
                       f"({codebook_cache.ENV} picks the folder, ={codebook_cache.OFF} turns "
                       "the cache off)")
