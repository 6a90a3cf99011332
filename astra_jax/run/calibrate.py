"""Codebook initialisation from a trained model's own keys and values.

ASTRA fine-tunes from a full-precision model; its codebooks start from k-means
on that model's K/V.  ``kmeans_codebooks`` runs the model on one device (no
exchange, so every layer sees exact K/V, as the trained model expects),
records each attention layer's K and V, and fits one grouped codebook per
layer for K and one for V.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.core import quantizer as vq
from astra_jax.core.attention import attention_layers
from astra_jax.core.exchange import VQExchange, VQState


def record_kv(model: nnx.Module, batches: Iterable[tuple], max_tokens: int) -> list[tuple]:
  """Runs ``model(*batch)`` on one device; returns per-layer ([N, D] keys, [N, D] values)."""
  layers = attention_layers(model)
  if not layers:
    raise ValueError("the model has no SequenceAttention layers to calibrate")
  ks: list[list] = [[] for _ in layers]
  vs: list[list] = [[] for _ in layers]
  model.eval()
  for layer in layers:
    layer.record_kv = True
  seen = 0
  for batch in batches:
    model(*batch)
    for i, layer in enumerate(layers):
      k, v, _, _ = layer.recorded.get_value()
      ks[i].append(k.reshape(-1, k.shape[-2] * k.shape[-1]))
      vs[i].append(v.reshape(-1, v.shape[-2] * v.shape[-1]))
    seen += ks[0][-1].shape[0]
    if seen >= max_tokens:
      break
  for layer in layers:
    layer.record_kv = False
    del layer.recorded
  return [(jnp.concatenate(k)[:max_tokens], jnp.concatenate(v)[:max_tokens])
          for k, v in zip(ks, vs)]


def kmeans_codebooks(model: nnx.Module, batches: Iterable[tuple], key: jax.Array, *,
                     max_tokens: int = 4096, iters: int = 10) -> None:
  """Sets every VQ layer's codebooks by k-means on ``model``'s own K/V (in place)."""
  layers = attention_layers(model)
  exchanges = {type(m.exchange) for m in layers}
  if exchanges != {VQExchange}:
    raise ValueError(f"k-means calibration needs vq exchanges, the model has {exchanges}")
  samples = record_kv(model, batches, max_tokens)
  fit = jax.jit(vq.kmeans_init, static_argnums=(2, 3, 4))
  for layer, (k, v), layer_key in zip(layers, samples, jax.random.split(key, len(layers))):
    ex = layer.exchange
    kk, kv = jax.random.split(layer_key)
    layer.state.set_value(VQState(fit(kk, k, ex.groups, ex.codebook_size, iters),
                                  fit(kv, v, ex.groups, ex.codebook_size, iters)))
