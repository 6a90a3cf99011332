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

``attend`` is the pure function: it hands the work to the strategy's own
``Exchange.attend`` (gather, then softmax over all keys at once; or, for the
ring, softmax folded in as the blocks arrive), so nothing here branches on
the strategy.  ``SequenceAttention`` is the thin Flax NNX holder that keeps
the strategy's state (codebooks) and is what models call.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from astra_jax.core.dot_product import dot_product_attention  # noqa: F401 (models use it from here)
from astra_jax.core.exchange import FIRST_STEP, Carry, Exchange, ExchangeOut, received_tokens  # noqa: F401
from astra_jax.core.axes import current_seq_axis


def attend(exchange: Exchange, state: Any, q, k, v, *, causal: bool,
           train: bool = False, key: jax.Array | None = None,
           axis_name: str | None = None,
           private: int = 0,
           query_transform: Callable | None = None,
           key_transform: Callable | None = None,
           carry: Carry | None = None) -> tuple[jnp.ndarray, ExchangeOut]:
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
  ``carry``: inside a diffusion sampler, what this layer's exchange kept from
  the previous step (``exchange.Carry``; None outside a sampler).
  Returns the attention output [B, Tl, H, Dh] and the exchange's output
  (shared K/V of all devices, new state, auxiliary loss, the next carry).
  """
  if private and causal:
    raise ValueError("private (per-device) tokens are only supported in bidirectional attention")
  return exchange.attend(state, q, k, v, causal=causal, train=train, key=key,
                         axis_name=axis_name, private=private,
                         query_transform=query_transform, key_transform=key_transform,
                         carry=carry)


class ExchangeState(nnx.Variable):
  """Non-gradient state of an exchange strategy (codebooks and their statistics)."""


class ExchangeLoss(nnx.Variable):
  """The exchange's auxiliary loss from the latest call (0 at inference)."""


class RecordedKV(nnx.Variable):
  """From the latest call, when recording is on: (k, v) of this device's shared
  tokens, and (k, v) of the whole sequence as this device saw it (its own
  block exact, the rest as the exchange delivered it: a KV cache)."""


class StepCarry(nnx.Variable):
  """While a sampler steps the model (``stepping`` on): what the exchange carries
  to this layer's next call (``exchange.Carry``)."""


class SequenceAttention(nnx.Module):
  """Attention core for models: holds the exchange state, reads the ambient mesh axis.

  Set ``deterministic=False`` (``model.train()``) for training: the exchange
  then updates its state and adds its training noise; its auxiliary loss is
  left in ``self.loss`` (an ``ExchangeLoss`` variable, 0 at inference), which
  ``astra_jax.parallel.apply`` sums into the objective.  With ``record_kv=True`` the
  layer keeps its latest K/V in ``self.recorded`` (a ``RecordedKV``), to
  initialise codebooks by k-means (``astra_jax.run.calibrate``) or to fill a KV
  cache after a sequence-parallel prefill (``astra_jax.run.generate``).
  ``query_transform`` / ``key_transform`` are passed to ``attend`` (hashable
  callables, e.g. a frozen dataclass); recorded keys are untransformed, as
  they crossed the link.  With ``stepping=True`` (a diffusion sampler,
  ``astra_jax.diffusion.sample``) consecutive calls are the steps of one
  sampling run: the exchange's carry goes from one call to the next in
  ``self.carried`` (a ``StepCarry``), which the sampler removes at the end.
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
    self.stepping = False

  def __call__(self, q, k, v) -> jnp.ndarray:
    train = not self.deterministic
    key = self.rngs.exchange() if train or self.exchange.drop_rate > 0 else None
    out, ex = attend(self.exchange, self.state.get_value(), q, k, v,
                     causal=self.causal, train=train, key=key,
                     axis_name=current_seq_axis(), private=self.private,
                     query_transform=self.query_transform, key_transform=self.key_transform,
                     carry=self._carry())
    if self.stepping:
      self.carried = StepCarry(ex.carry if ex.carry is not None else FIRST_STEP)
    if train:
      self.state.set_value(ex.state)
    self.loss.set_value(ex.loss)
    if self.record_kv:
      self.recorded = RecordedKV((k[:, self.private:], v[:, self.private:], ex.k, ex.v))
    return out

  def _carry(self) -> Carry | None:
    if not self.stepping:
      return None
    return self.carried.get_value() if hasattr(self, "carried") else FIRST_STEP

  def end_steps(self) -> None:
    """Leaves stepping mode and drops the carry (a sampling run is over)."""
    self.stepping = False
    if hasattr(self, "carried"):
      del self.carried


def attention_layers(model: nnx.Module) -> list[SequenceAttention]:
  """The model's SequenceAttention layers, in module order."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SequenceAttention)]
