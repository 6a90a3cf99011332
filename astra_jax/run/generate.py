"""ASTRA text generation: prefill the prompt across the mesh, decode on one device.

``prefill`` runs the causal model sequence-parallel over the (right-padded)
prompt, recording every layer's K/V as each device saw them.  The device that
holds the prompt's last token continues alone: its KV cache is its own block
exact plus the other devices' blocks as its exchange delivered them (decoded
codes for ``vq``), which is what ASTRA does.  Padding past the prompt sits at
positions the decoder overwrites before it can attend to them (attention masks
by position), so it never leaks into the output.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.parallel import apply, forward, mesh as mesh_lib
from astra_jax.core import attention


def prefill(model: nnx.Module, tokens: jnp.ndarray, mesh_size: int):
  """tokens [B, T] (T % mesh_size == 0) -> (logits [B, T, V], views).

  ``views`` has, per layer, (k, v) of shape [P, B, T, H, Dh]: entry d is the
  whole sequence's K/V as device d saw it (its block exact, the others as the
  exchange delivered them).
  """
  graphdef, params, rest = apply.split_model(model)
  mesh = mesh_lib.seq_mesh_or_none(mesh_size)
  t = tokens.shape[1]
  mesh_lib.check_divisible(t, mesh_size, what="prompt")

  def body(params, rest, tokens, positions):
    m = nnx.merge(graphdef, params, rest, copy=True)
    m.eval()
    for layer in attention.attention_layers(m):
      layer.record_kv = True
    logits = m(tokens, positions)
    # [1, B, T, H, Dh] per device -> [P, B, T, H, Dh] across the mesh
    views = [tuple(x[None] for x in layer.recorded.get_value()[2:])
             for layer in attention.attention_layers(m)]
    return logits, views

  if mesh is None:
    logits, views = body(params, rest, tokens, jnp.arange(t))
  else:
    params, rest = mesh_lib.replicate((params, rest), mesh)
    run = mesh_lib.sequence_parallel(body, mesh, in_seq_dims=(None, None, 1, 0),
                                     out_seq_dims=(1, 0))
    tokens, positions = mesh_lib.to_global((tokens, jnp.arange(t)), mesh, (1, 0))
    run = forward.timed_compile(jax.jit(run), "the prefill", stderr=True)
    logits, views = run(params, rest, tokens, positions)
  return logits, views


def decode_device(mesh_size: int, prompt_len: int) -> jax.Device:
  """The device holding the prompt's last token (it decodes alone)."""
  padded = -(-prompt_len // mesh_size) * mesh_size
  return jax.devices()[(prompt_len - 1) // (padded // mesh_size)]  # mesh order


def _pad_cache(views, device: int, cache_len: int):
  """Device ``device``'s view as a cache of ``cache_len`` slots, on that device."""
  cache = []
  for k, v in views:
    k, v = (mesh_lib.local_block(x, 0, device)[0] for x in (k, v))
    pad = [(0, 0), (0, cache_len - k.shape[1]), (0, 0), (0, 0)]
    cache.append((jnp.pad(k, pad), jnp.pad(v, pad)))
  return cache


def generate(model: nnx.Module, prompt: list[int], max_new_tokens: int, *, mesh_size: int,
             context: int, temperature: float = 0.0, key: jax.Array | None = None,
             pad_id: int = 0) -> Iterator[int]:
  """New token ids: ASTRA prefill on ``mesh_size`` devices, cached decode on one.

  temperature 0 is greedy.  Raises ValueError when prompt + new tokens exceed
  the model's context.  The prefill and the decode step's compile run in this
  call (each compile says its time on stderr), before the first token is
  taken from the iterator, so those lines never land inside streamed text.
  Across processes every process joins the prefill; only the one owning
  ``decode_device`` yields tokens (the others yield none).
  """
  n = len(prompt)
  if n == 0:
    raise ValueError("the prompt is empty; give at least one token")
  if n + max_new_tokens > context:
    raise ValueError(
        f"prompt ({n} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
        f"context of {context} tokens; shorten the prompt or ask for fewer tokens")
  padded = -(-n // mesh_size) * mesh_size
  tokens = jnp.asarray([list(prompt) + [pad_id] * (padded - n)], jnp.int32)
  logits, views = prefill(model, tokens, mesh_size)
  owner = decode_device(mesh_size, n)
  if owner.process_index != jax.process_index() or max_new_tokens <= 0:
    return iter(())
  device, block = (n - 1) // (padded // mesh_size), padded // mesh_size
  cache = _pad_cache(views, device, context)
  step = forward.timed_compile(_decode_step(model, owner), "the decode step", stderr=True)
  last = mesh_lib.local_block(logits, 1, device)[:, n - 1 - device * block]
  key = key if key is not None else jax.random.PRNGKey(0)
  key, sub = jax.random.split(key)
  token = _sample(last, temperature, sub)
  logits = None
  if max_new_tokens > 1:  # the first decode step (and its compile) here, not mid-stream
    logits, cache = step(token[:, None], jnp.asarray([n], jnp.int32), cache)
  return _stream(step, token, logits, cache, n, max_new_tokens, temperature, key)


def _stream(step, token, logits, cache, n, max_new_tokens, temperature, key) -> Iterator[int]:
  """Yields ``token``, then samples and decodes the rest (``logits``: after ``token``)."""
  yield int(token[0])
  for i in range(1, max_new_tokens):
    key, sub = jax.random.split(key)
    token = _sample(logits[:, 0], temperature, sub)
    yield int(token[0])
    if i + 1 < max_new_tokens:
      logits, cache = step(token[:, None], jnp.asarray([n + i], jnp.int32), cache)


def _sample(logits, temperature, key):
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _decode_step(model, device) -> Callable:
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, device)

  @jax.jit
  def step(tokens, positions, cache):
    m = nnx.merge(graphdef, state)
    return m.decode(tokens, positions, cache)

  return step
