"""Sequence-parallel attention: local queries against every device's K/V.

Each device holds Tl = T/P contiguous tokens.  Its queries attend to its own
keys/values exactly and to everyone else's as delivered by the exchange
strategy.  Causal attention uses global token positions, so device i sees all
tokens of devices < i, a causal triangle of its own block, and nothing of
devices > i.  Grouped-query attention (fewer K/V heads than query heads) is
supported: K/V heads are exchanged once and shared by their query heads.
Position-dependent maps (RoPE) can be applied after the exchange through
``query_transform`` / ``key_transform``: keys then cross the link as the model
produced them and are rotated by the receiver at their global positions.

``attend`` is the pure function; ``SequenceAttention`` is the thin Flax NNX
holder that keeps the strategy's state (codebooks) and is what models call.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.exchange import Exchange, ExchangeOut
from astra_jax.mesh import current_seq_axis

_MASKED = -1e30


def dot_product_attention(q, k, v, *, q_pos, k_pos, causal: bool,
                          kv_valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax attention with position-based causal masking.

  q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh] with H % Hkv == 0.
  q_pos [Tq], k_pos [Tk]: global positions; kv_valid [B, Tk] optional mask.
  Dots accumulate in float32; logits and softmax are float32; the weights
  meet V in V's dtype.
  """
  b, tq, h, dh = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"{h} query heads cannot share {hkv} K/V heads; H must be a multiple of Hkv")
  qg = q.reshape(b, tq, hkv, h // hkv, dh)
  # No upcast of k/v here: XLA would hoist the convert above the all_gather and
  # put float32 on the wire; accumulate in float32 through the dot instead.
  logits = jnp.einsum("bqkrd,bskd->bkrqs", qg, k.astype(q.dtype),
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dh))
  mask = jnp.ones((tq, k.shape[1]), bool)
  if causal:
    mask = k_pos[None, :] <= q_pos[:, None]
  mask = mask[None, None, None]
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, None, None, :]
  logits = jnp.where(mask, logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkrqs,bskd->bqkrd", weights.astype(v.dtype), v,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, dh).astype(q.dtype)


def attend(exchange: Exchange, state: Any, q, k, v, *, causal: bool,
           train: bool = False, key: jax.Array | None = None,
           axis_name: str | None = None,
           private: int = 0,
           query_transform: Callable | None = None,
           key_transform: Callable | None = None) -> tuple[jnp.ndarray, ExchangeOut]:
  """Attention of this device's queries over the whole (split) sequence.

  q: [B, Tl, H, Dh], k/v: [B, Tl, Hkv, Dh] for this device's tokens.
  ``private``: the first ``private`` local tokens (e.g. a per-device class
  token) are visible to this device only: they never cross the mesh, and
  other devices' private tokens are not seen.  Bidirectional attention only.
  ``query_transform(q, q_pos)`` and ``key_transform(k_all, k_pos)`` (optional,
  e.g. RoPE) map this device's queries and the keys of the whole sequence
  after the exchange (own block exact, the others as delivered), with global
  positions [Tl] / [T] (private tokens count first); the exchange and its
  output (``ExchangeOut.k``) see the keys untransformed.
  Returns the attention output [B, Tl, H, Dh] and the exchange's output
  (shared K/V of all devices, new state, auxiliary loss).
  """
  if private and causal:
    raise ValueError("private (per-device) tokens are only supported in bidirectional attention")
  lossy = exchange.drop_rate > 0 and axis_name is not None
  if lossy:
    if key is None:
      raise ValueError("a lossy link (drop_rate > 0) needs a PRNG key to draw the losses")
    key, drop_key = jax.random.split(key)
  out = exchange.gather(state, k[:, private:], v[:, private:], axis_name=axis_name,
                        train=train, key=key if train else None)
  k_all = jnp.concatenate([k[:, :private], out.k], axis=1)
  v_all = jnp.concatenate([v[:, :private], out.v], axis=1)
  tl = q.shape[1]
  index = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  q_pos = index * tl + jnp.arange(tl)
  k_pos = jnp.arange(k_all.shape[1])
  if query_transform is not None:
    q = query_transform(q, q_pos)
  if key_transform is not None:
    k_all = key_transform(k_all, k_pos)
  valid = None
  if lossy:
    received = received_tokens(drop_key, exchange.drop_rate, out.k.shape[0],
                               out.k.shape[1], k.shape[1] - private, axis_name)
    valid = jnp.concatenate([jnp.ones((k.shape[0], private), bool), received], axis=1)
  return dot_product_attention(q, k_all, v_all, q_pos=q_pos, k_pos=k_pos,
                               causal=causal, kv_valid=valid), out


def received_tokens(key: jax.Array, drop_rate: float, batch: int, total: int, local: int,
                    axis_name: str) -> jnp.ndarray:
  """[B, total] bool: which tokens' K/V reached this device over a lossy link.

  Each non-local token is lost with probability ``drop_rate``, independently
  per receiving device; this device's own block is always present.
  """
  index = jax.lax.axis_index(axis_name)
  keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - drop_rate, (batch, total))
  own = (jnp.arange(total) // local) == index
  return keep | own[None]


class ExchangeState(nnx.Variable):
  """Non-gradient state of an exchange strategy (codebooks and their statistics)."""


class ExchangeLoss(nnx.Variable):
  """The exchange's auxiliary loss from the latest call (0 at inference)."""


class RecordedKV(nnx.Variable):
  """From the latest call, when recording is on: (k, v) of this device's shared
  tokens, and (k, v) of the whole sequence as this device saw it (its own
  block exact, the rest as the exchange delivered it: a KV cache)."""


class SequenceAttention(nnx.Module):
  """Attention core for models: holds the exchange state, reads the ambient mesh axis.

  Set ``deterministic=False`` (``model.train()``) for training: the exchange
  then updates its state and adds its training noise; its auxiliary loss is
  left in ``self.loss`` (an ``ExchangeLoss`` variable, 0 at inference), which
  ``astra_jax.apply`` sums into the objective.  With ``record_kv=True`` the
  layer keeps its latest K/V in ``self.recorded`` (a ``RecordedKV``), to
  initialise codebooks by k-means (``astra_jax.calibrate``) or to fill a KV
  cache after a sequence-parallel prefill (``astra_jax.generate``).
  ``query_transform`` / ``key_transform`` are passed to ``attend`` (hashable
  callables, e.g. a frozen dataclass); recorded keys are untransformed, as
  they crossed the link.
  """

  def __init__(self, exchange: Exchange, kv_dim: int, *, causal: bool,
               rngs: nnx.Rngs, private: int = 0, query_transform: Callable | None = None,
               key_transform: Callable | None = None):
    self.exchange = exchange
    self.causal = causal
    self.private = private
    self.query_transform = query_transform
    self.key_transform = key_transform
    self.state = ExchangeState(exchange.init_state(rngs.params(), kv_dim))
    self.rngs = rngs.fork()
    self.deterministic = True
    self.loss = ExchangeLoss(jnp.zeros((), jnp.float32))
    self.record_kv = False

  def __call__(self, q, k, v) -> jnp.ndarray:
    train = not self.deterministic
    key = self.rngs.exchange() if train or self.exchange.drop_rate > 0 else None
    out, ex = attend(self.exchange, self.state.get_value(), q, k, v,
                     causal=self.causal, train=train, key=key,
                     axis_name=current_seq_axis(), private=self.private,
                     query_transform=self.query_transform, key_transform=self.key_transform)
    if train:
      self.state.set_value(ex.state)
    self.loss.set_value(ex.loss)
    if self.record_kv:
      self.recorded = RecordedKV((k[:, self.private:], v[:, self.private:], ex.k, ex.v))
    return out


def attention_layers(model: nnx.Module) -> list[SequenceAttention]:
  """The model's SequenceAttention layers, in module order."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SequenceAttention)]
