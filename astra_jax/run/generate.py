"""ASTRA text generation: prefill the prompt across the mesh, decode on one device.

``prefill`` runs the causal model sequence-parallel over the (right-padded)
prompt, recording every layer's K/V as each device saw them.  The device that
holds the prompt's last token continues alone: its KV cache is its own block
exact plus the other devices' blocks as its exchange delivered them (decoded
codes for ``vq``), which is what ASTRA does.  Padding past the prompt sits at
positions the decoder overwrites before it can attend to them (attention masks
by position), so it never leaks into the output.

``Generator`` holds a model's jitted prefill and decode step and its placed
weights, so a server compiles each once: the prefill once per padded prompt
length (a server pads to a few bucket lengths), the decode step once per
decoding device (its cache always has ``context`` slots).  ``generate`` makes
one for a single prompt, as the CLIs do.

With ``rank`` (a ``core.axes.HostAxis``) a ``Generator`` is one rank of a
sequence split over processes that share no program (the multi-rank server):
it prefills only its own block of the padded prompt, the ``stream``
exchange's host transport bringing the earlier ranks' K/V, and decodes only
if its block holds the prompt's last token.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.parallel import apply, forward, mesh as mesh_lib
from astra_jax.core import attention, axes


class Generator:
  """``model``'s prefill at ``mesh_size`` devices and its cached decode, compiled
  once each and kept (a snapshot of the model's weights and codebooks).

  ``prefill_prompt`` pads a prompt to ``length`` (a multiple of the mesh size;
  default the next one) and prefills it; ``decode`` continues from its
  result; ``generate`` does both.  Each jitted function says its first
  compile's time on stderr.
  """

  def __init__(self, model: nnx.Module, *, mesh_size: int, context: int, pad_id: int = 0,
               rank: axes.HostAxis | None = None):
    self.mesh_size, self.context, self.pad_id, self.rank = mesh_size, context, pad_id, rank
    graphdef, params, rest = apply.split_model(model)
    body = _prefill_body(graphdef)
    if rank is not None:
      if rank.size != mesh_size:
        raise ValueError(f"rank {rank.index} of {rank.size} in a mesh of {mesh_size}")
      body = _on_axis(body, rank)
      self._mesh = None
    else:
      self._mesh = mesh_lib.seq_mesh_or_none(mesh_size)
    if self._mesh is not None:
      params, rest = mesh_lib.replicate((params, rest), self._mesh)
      body = mesh_lib.sequence_parallel(body, self._mesh, in_seq_dims=(None, None, 1, 0),
                                        out_seq_dims=(1, 0))
    self._weights = (params, rest)
    self._prefill = forward.timed_compile(jax.jit(body), "the prefill", stderr=True)
    self._decode_graphdef, self._decode_state = nnx.split(model)
    self._step = forward.timed_compile(_decode_step(self._decode_graphdef), "the decode step",
                                       stderr=True)
    self._placed: dict[jax.Device, nnx.State] = {}  # the decode weights, per device

  def share_decode(self, other: "Generator") -> None:
    """Decodes with ``other``'s compiled step and placed weights (the same model
    with another exchange: decoding reads only the cache, never the link)."""
    self._decode_graphdef, self._decode_state = other._decode_graphdef, other._decode_state
    self._step, self._placed = other._step, other._placed

  def prefill(self, tokens: jnp.ndarray):
    """tokens [B, T] (T % mesh_size == 0) -> (logits [B, T, V], views); see ``prefill``."""
    t = tokens.shape[1]
    mesh_lib.check_divisible(t, self.mesh_size, what="prompt")
    inputs = (tokens, jnp.arange(t))
    if self.rank is not None:  # this rank's block only
      block = t // self.mesh_size
      inputs = tuple(x[..., self.rank.index * block:(self.rank.index + 1) * block]
                     for x in inputs)
    if self._mesh is not None:
      inputs = mesh_lib.to_global(inputs, self._mesh, (1, 0))
    return self._prefill(*self._weights, *inputs)

  def prefill_prompt(self, prompt: list[int], max_new_tokens: int, length: int | None = None):
    """(logits, views) of ``prompt`` right-padded to ``length`` tokens (default: the
    next multiple of the mesh size).  ValueError when the prompt is empty, or it and
    ``max_new_tokens`` exceed the context, or ``length`` does not fit."""
    n = len(prompt)
    if n == 0:
      raise ValueError("the prompt is empty; give at least one token")
    if n + max_new_tokens > self.context:
      raise ValueError(
          f"prompt ({n} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
          f"context of {self.context} tokens; shorten the prompt or ask for fewer tokens")
    length = length or -(-n // self.mesh_size) * self.mesh_size
    if not n <= length <= self.context:
      raise ValueError(f"a prompt of {n} tokens cannot be padded to {length} tokens in a "
                       f"context of {self.context}")
    tokens = jnp.asarray([list(prompt) + [self.pad_id] * (length - n)], jnp.int32)
    return self.prefill(tokens)

  def decode(self, logits, views, prompt_len: int, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None) -> Iterator[int]:
    """New token ids after a prefill (``logits``, ``views``) of a ``prompt_len``-token
    prompt: the device holding its last token samples and decodes on alone.

    temperature 0 is greedy; ``top_p`` < 1 samples from the smallest set of
    tokens holding that much probability.  The first token and the first
    decode step (its compile) run in this call, before the iterator is read.
    Across processes only the process owning that device yields tokens.
    """
    n = prompt_len
    if self.rank is not None:  # logits and views: this rank's only (its block 0)
      block = logits.shape[1]
      if (n - 1) // block != self.rank.index or max_new_tokens <= 0:
        return iter(())
      owner, device, offset = jax.local_devices()[0], 0, self.rank.index * block
    else:
      owner = decode_device(self.mesh_size, n, logits.shape[1])
      if owner.process_index != jax.process_index() or max_new_tokens <= 0:
        return iter(())
      block = logits.shape[1] // self.mesh_size
      device = (n - 1) // block
      offset = device * block
    cache = _pad_cache(views, device, self.context)
    if owner not in self._placed:
      self._placed[owner] = jax.device_put(self._decode_state, owner)
    state = self._placed[owner]

    def step(token, position, cache):
      return self._step(state, token[:, None], jnp.asarray([position], jnp.int32), cache)

    last = mesh_lib.local_block(logits, 1, device)[:, n - 1 - offset]
    key = key if key is not None else jax.random.PRNGKey(0)
    key, sub = jax.random.split(key)
    token = _sample(last, temperature, sub, top_p)
    logits = None
    if max_new_tokens > 1:  # the first decode step (and its compile) here, not mid-stream
      logits, cache = step(token, n, cache)
    return _stream(step, token, logits, cache, n, max_new_tokens, temperature, top_p, key)

  def generate(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, key: jax.Array | None = None,
               length: int | None = None) -> Iterator[int]:
    """``prefill_prompt`` then ``decode``: the new token ids."""
    logits, views = self.prefill_prompt(prompt, max_new_tokens, length)
    return self.decode(logits, views, len(prompt), max_new_tokens, temperature=temperature,
                       top_p=top_p, key=key)


def _on_axis(body: Callable, rank: axes.HostAxis) -> Callable:
  def on_axis(*args):
    with axes.seq_axis(rank):
      return body(*args)
  return on_axis


def _prefill_body(graphdef) -> Callable:
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

  return body


def prefill(model: nnx.Module, tokens: jnp.ndarray, mesh_size: int):
  """tokens [B, T] (T % mesh_size == 0) -> (logits [B, T, V], views).

  ``views`` has, per layer, (k, v) of shape [P, B, T, H, Dh]: entry d is the
  whole sequence's K/V as device d saw it (its block exact, the others as the
  exchange delivered them).
  """
  mesh_lib.check_divisible(tokens.shape[1], mesh_size, what="prompt")
  return Generator(model, mesh_size=mesh_size, context=tokens.shape[1]).prefill(tokens)


def decode_device(mesh_size: int, prompt_len: int, length: int | None = None) -> jax.Device:
  """The device holding the prompt's last token (it decodes alone); ``length``: the
  padded prompt's (default the next multiple of the mesh size)."""
  padded = length or -(-prompt_len // mesh_size) * mesh_size
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
             context: int, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, pad_id: int = 0) -> Iterator[int]:
  """New token ids: ASTRA prefill on ``mesh_size`` devices, cached decode on one.

  temperature 0 is greedy.  Raises ValueError when prompt + new tokens exceed
  the model's context.  The prefill and the decode step's compile run in this
  call (each compile says its time on stderr), before the first token is
  taken from the iterator, so those lines never land inside streamed text.
  Across processes every process joins the prefill; only the one owning
  ``decode_device`` yields tokens (the others yield none).
  """
  generator = Generator(model, mesh_size=mesh_size, context=context, pad_id=pad_id)
  return generator.generate(prompt, max_new_tokens, temperature=temperature, top_p=top_p,
                            key=key)


def _stream(step, token, logits, cache, n, max_new_tokens, temperature, top_p,
            key) -> Iterator[int]:
  """Yields ``token``, then samples and decodes the rest (``logits``: after ``token``)."""
  yield int(token[0])
  for i in range(1, max_new_tokens):
    key, sub = jax.random.split(key)
    token = _sample(logits[:, 0], temperature, sub, top_p)
    yield int(token[0])
    if i + 1 < max_new_tokens:
      logits, cache = step(token, n + i, cache)


def _sample(logits, temperature, key, top_p=1.0):
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  if top_p < 1.0:
    return _sample_top_p(logits, key, jnp.float32(temperature), jnp.float32(top_p))
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@jax.jit
def _sample_top_p(logits, key, temperature, top_p):
  """Nucleus sampling: only the most likely tokens whose probabilities, summed
  before each, stay under ``top_p`` (the first always) may be drawn."""
  logits = logits / temperature
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_step(graphdef) -> Callable:
  @jax.jit
  def step(state, tokens, positions, cache):
    m = nnx.merge(graphdef, state)
    return m.decode(tokens, positions, cache)

  return step
