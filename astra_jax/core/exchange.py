"""K/V exchange strategies: how one device gets the other devices' keys/values.

This is the single plug-in point between the models and the mesh.  A strategy
is a frozen dataclass (a config is data), registered by name, with pure
methods:

  init_state(key, kv_dim)       -> pytree of per-layer, non-gradient state
  gather(state, k, v, ...)      -> ExchangeOut: every device's K/V, own block exact
  attend(state, q, k, v, ...)   -> (attention output, ExchangeOut); by default
                                   ``gather`` then softmax over all keys at once
  bytes_per_token(kv_dim, dtype) -> what one token's K (or V) costs on the wire

Attention (``astra_jax.core.attention``) calls ``attend`` and never branches on the
strategy.  Strategies here:

  exact  full-precision ``all_gather`` of K/V (plain sequence parallelism)
  vq     ASTRA: local K/V exact, everyone else's as grouped-VQ codes, bit-packed
         before the ``all_gather`` and decoded by the receiver.
  ring   exact K/V passed device to device around a ring (``ppermute``), with
         blockwise softmax as the blocks arrive (``astra_jax.core.ring``).
  stream exact K/V or grouped-VQ codes sent only forward, each device's block to
         the later devices (``astra_jax.core.streaming``): causal prefill; with
         one device per process the blocks travel on host threads, so no layer
         waits at a barrier.
  distrifusion  exact K/V, but attention uses the other devices' K/V from the
         previous denoising step (stale), so the all-gather can overlap a whole
         step of compute (DistriFusion, Li et al. 2024); a baseline for DiT.

Across calls (the steps of a diffusion sampler, ``astra_jax.diffusion.sample``)
a strategy may carry what it received (``Carry``): ``distrifusion`` uses it
instead of this step's K/V, and ``vq:refresh=k`` re-sends codes only every k
steps and reuses the decoded K/V in between (no traffic on those steps).
Calls outside a sampler pass no carry and every strategy exchanges afresh.

Boundary context (``vq:boundary_rows=r``, for images split into bands of
patch rows, ``row_tokens`` patches per row): the r rows next to a device's
band arrive exactly from its two neighbours (``ppermute``), the rest as codes.

Overlap (``overlap=true`` on exact or vq, e.g. ``vq:groups=32,overlap=true``):
``attend`` issues the layer's all-gather first, then folds this device's own
block (exact, private tokens included) into the ring's online softmax
(``ring.fold``), which needs nothing from the collective, and only then the
gathered sequence with the own block masked out.  A backend with async
collectives can compute the local block's attention while the codes travel.
The result equals the dense path up to float rounding, with the same one
all-gather per layer and the same attention work, plus one rescale of the
running sums (``astra_jax.netsim.flops``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from astra_jax.core import axes
from astra_jax.core import code_attention
from astra_jax.core import noise as noise_lib
from astra_jax.core import packing
from astra_jax.core import quantizer as vq
from astra_jax.core import ring
from astra_jax.core import streaming
from astra_jax.core.dot_product import dot_product_attention, visible
from astra_jax.core.specs import Registry


class ExchangeOut(NamedTuple):
  """What attention receives from a strategy.

  k, v:  [B, P*Tl, Hkv, Dh], blocks in device order; the calling device's own
         block is its exact local K/V.
  state: the strategy state after this call (updated only in training).
  loss:  scalar auxiliary loss to add to the training objective (mesh-averaged).
  carry: what the next step of a sampler gets back (``Carry``; None: nothing).
  """

  k: jnp.ndarray
  v: jnp.ndarray
  state: Any
  loss: jnp.ndarray
  carry: Any = None


class Carry(NamedTuple):
  """What a layer's exchange keeps from one sampler step to the next.

  step:  how many steps this layer has run (a Python int: the sampler's steps
         are unrolled, so every step traces its own branch).
  k, v:  the whole sequence [B, P*Ts, Hkv, Dh] as this device last received it
         (None before the first step).
  """

  step: int
  k: Any = None
  v: Any = None


FIRST_STEP = Carry(0)  # what a sampler passes to a layer's first call


STRATEGIES = Registry("exchange", "exchange", example="vq:groups=32,codebook_size=1024")
register = STRATEGIES.register
available = STRATEGIES.available
make_exchange = STRATEGIES.make  # name, **options -> a strategy
from_spec = STRATEGIES.from_spec  # 'vq:groups=32,codebook_size=1024' -> a strategy


# options that change how K/V travel, not what a trained state holds
_TRANSPORT_OPTIONS = {"drop_rate": 0.0, "overlap": False, "boundary_rows": 0, "row_tokens": 0,
                      "refresh": 1, "code_attention": False}


def same_state(a: "Exchange", b: "Exchange") -> bool:
  """Whether a model trained with exchange ``a`` can reuse its state under ``b``
  (the same strategy and options; the simulated link loss, the overlap, the
  boundary context, step reuse and codebook-centric attention may differ)."""
  def plain(e):
    if getattr(e, "name", None) == "stream" and e.quantize:  # a vq state, sent forward only
      e = VQExchange(**{f.name: getattr(e, f.name) for f in dataclasses.fields(VQExchange)})
    fields = {f.name for f in dataclasses.fields(e)}
    return dataclasses.replace(e, **{k: v for k, v in _TRANSPORT_OPTIONS.items() if k in fields})
  return plain(a) == plain(b)


def _gather_blocks(x: jnp.ndarray, axis_name: str) -> jnp.ndarray:
  """[B, Tl, ...] on each device -> [B, P*Tl, ...] in device order."""
  return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)


def _gather_pair(a: jnp.ndarray, b: jnp.ndarray, axis_name: str):
  """``_gather_blocks`` of a layer's K and V (or their codes) in ONE all-gather:
  one message per layer instead of two, the same bytes."""
  if a.shape != b.shape or a.dtype != b.dtype:
    return _gather_blocks(a, axis_name), _gather_blocks(b, axis_name)
  both = _gather_blocks(jnp.stack([a, b], axis=2), axis_name)  # [B, P*Tl, 2, ...]
  return both[:, :, 0], both[:, :, 1]


def _own_block(full: jnp.ndarray, local: jnp.ndarray, axis_name: str) -> jnp.ndarray:
  """Overwrites this device's block of ``full`` with its exact ``local`` tokens."""
  start = axes.axis_index(axis_name) * local.shape[1]
  return jax.lax.dynamic_update_slice_in_dim(full, local.astype(full.dtype), start, axis=1)


@dataclasses.dataclass(frozen=True)
class Exchange:
  """Base strategy: nothing to learn, nothing to update.

  drop_rate: simulated loss on the link: each non-local token's K/V reaches a
             receiver with probability 1 - drop_rate, independently per
             receiver, layer and forward; attention masks lost tokens out
             (``attention.attend``), it does not zero-fill them.  0 by default.
  overlap:   start the all-gather before the local block's attention and fold
             the other blocks in afterwards (module docstring); same result.
  """

  name: ClassVar[str] = "base"
  drop_rate: float = 0.0
  overlap: bool = False

  def __post_init__(self):
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

  def init_state(self, key: jax.Array, kv_dim: int) -> Any:
    del key, kv_dim
    return ()

  def gather(self, state, k, v, *, axis_name: str | None, train: bool = False,
             key: jax.Array | None = None) -> ExchangeOut:
    raise NotImplementedError

  def bytes_per_token(self, kv_dim: int, dtype: Any) -> int:
    raise NotImplementedError

  def sends(self, mesh_size: int) -> int:
    """How many times a device hands its block to a collective per K (or V): 1 for
    an all-gather; a ring forwards a block at each of its P - 1 steps."""
    del mesh_size
    return 1

  def stepped_gather(self, carry: Carry | None, state, k, v, *, axis_name: str | None,
                     train: bool, key: jax.Array | None) -> ExchangeOut:
    """``gather`` inside a sampler step (``carry``: this layer's ``Carry``, None
    outside a sampler): by default every step exchanges afresh and carries
    nothing."""
    del carry
    return self.gather(state, k, v, axis_name=axis_name, train=train, key=key)

  def attend(self, state, q, k, v, *, causal: bool, train: bool = False,
             key: jax.Array | None = None, axis_name: str | None = None,
             private: int = 0, query_transform: Callable | None = None,
             key_transform: Callable | None = None,
             carry: Carry | None = None) -> tuple[jnp.ndarray, ExchangeOut]:
    """``attention.attend`` (its docstring has the arguments): ``gather`` the
    shared K/V, then softmax attention over the whole sequence at once (with
    ``overlap``, the own block first, then the rest: ``_attend_overlapped``),
    with tokens lost on the link (``drop_rate``) masked out."""
    if isinstance(axis_name, axes.HostAxis) and self.name != "stream":
      raise ValueError(f"the {self.name!r} exchange needs every device of the sequence in one "
                       "program; across processes without one, use the stream exchange")
    lossy = self.drop_rate > 0 and axis_name is not None
    if lossy:
      if key is None:
        raise ValueError("a lossy link (drop_rate > 0) needs a PRNG key to draw the losses")
      key, drop_key = jax.random.split(key)
    out = self.stepped_gather(carry, state, k[:, private:], v[:, private:],
                              axis_name=axis_name, train=train, key=key if train else None)
    tl = q.shape[1]
    index = 0 if axis_name is None else axes.axis_index(axis_name)
    q_pos = index * tl + jnp.arange(tl)
    if query_transform is not None:
      q = query_transform(q, q_pos)
    received = None
    if lossy:
      received = received_tokens(drop_key, self.drop_rate, out.k.shape[0],
                                 out.k.shape[1], k.shape[1] - private, axis_name)
    if self.overlap and axis_name is not None:
      return _attend_overlapped(q, k, v, out, q_pos=q_pos, index=index, private=private,
                                causal=causal, key_transform=key_transform,
                                received=received), out
    k_all = jnp.concatenate([k[:, :private], out.k], axis=1)
    v_all = jnp.concatenate([v[:, :private], out.v], axis=1)
    k_pos = jnp.arange(k_all.shape[1])
    if key_transform is not None:
      k_all = key_transform(k_all, k_pos)
    valid = None
    if received is not None:
      valid = jnp.concatenate([jnp.ones((k.shape[0], private), bool), received], axis=1)
    return dot_product_attention(q, k_all, v_all, q_pos=q_pos, k_pos=k_pos,
                                 causal=causal, kv_valid=valid), out


def _attend_overlapped(q, k, v, out: ExchangeOut, *, q_pos, index, private: int,
                       causal: bool, key_transform: Callable | None,
                       received: jnp.ndarray | None) -> jnp.ndarray:
  """``Exchange.attend`` with ``overlap``: the own block, then the other P - 1.

  q: this device's queries (transformed), k/v: its local K/V (private tokens
  first), ``out``: the issued exchange; ``received`` [B, P Ts]: the tokens that
  survived a lossy link (None: all).  Positions as in ``attention.attend``.
  """
  ts = k.shape[1] - private
  size = out.k.shape[1] // ts
  own_pos = jnp.concatenate([jnp.arange(private), private + index * ts + jnp.arange(ts)])
  k_own = k if key_transform is None else key_transform(k, own_pos)
  # needs nothing from the collective, so it can run while the K/V travel
  run = ring.fold(None, q, k_own, v, visible(q_pos, own_pos, causal))
  if size == 1:
    return ring.finish(run, q.dtype)
  others = (index + 1 + jnp.arange(size - 1)) % size  # every other device's block

  def pick(x):  # [B, P Ts, ...] -> the other devices' blocks [B, (P-1) Ts, ...]
    blocks = x.reshape(x.shape[0], size, ts, *x.shape[2:])
    return jnp.take(blocks, others, axis=1).reshape(x.shape[0], -1, *x.shape[2:])

  k_pos = private + (others[:, None] * ts + jnp.arange(ts)).reshape(-1)
  k_rest = pick(out.k) if key_transform is None else key_transform(pick(out.k), k_pos)
  mask = visible(q_pos, k_pos, causal)
  if received is not None:
    mask = mask[None] & pick(received)[:, None]  # [B, Tq, (P-1) Ts]
  return ring.finish(ring.fold(run, q, k_rest, pick(out.v), mask), q.dtype)


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


@register
@dataclasses.dataclass(frozen=True)
class ExactExchange(Exchange):
  """Full-precision K/V through ``all_gather`` (Voltage-style sequence parallelism)."""

  name: ClassVar[str] = "exact"

  def gather(self, state, k, v, *, axis_name, train=False, key=None):
    del train, key
    if axis_name is not None:
      k, v = _gather_pair(k, v, axis_name)
    return ExchangeOut(k, v, state, jnp.zeros((), jnp.float32))

  def bytes_per_token(self, kv_dim, dtype):
    return kv_dim * jnp.dtype(dtype).itemsize


@register
@dataclasses.dataclass(frozen=True)
class DistriFusionExchange(ExactExchange):
  """DistriFusion's displaced patch parallelism, as an exchange (a baseline for
  diffusion samplers): every step all-gathers this step's exact K/V, but
  attention reads the *previous* step's K/V of the other devices (its own
  block fresh), so on a backend with async collectives the gather overlaps a
  whole step of compute.  The first ``warmup`` steps of a sampler attend to
  fresh K/V (synchronous), as DistriFusion's warm-up does.  The bytes are
  those of ``exact``; outside a sampler (training, a single forward) it is
  ``exact``.
  """

  name: ClassVar[str] = "distrifusion"
  warmup: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.warmup < 1:
      raise ValueError(f"distrifusion needs warmup >= 1 synchronous step (the first step has "
                       f"no previous K/V), got warmup={self.warmup}")

  def stepped_gather(self, carry, state, k, v, *, axis_name, train, key):
    fresh = self.gather(state, k, v, axis_name=axis_name, train=train, key=key)
    if carry is None or axis_name is None:
      return fresh
    following = Carry(carry.step + 1, fresh.k, fresh.v)
    if carry.step < self.warmup:
      return fresh._replace(carry=following)
    return fresh._replace(k=_own_block(carry.k, k, axis_name),
                          v=_own_block(carry.v, v, axis_name), carry=following)


@register
@dataclasses.dataclass(frozen=True)
class RingExchange(Exchange):
  """Ring attention (``astra_jax.core.ring``): full-precision K/V blocks forwarded to
  the next device P - 1 times (``ppermute``), attention folded in block by block
  with an online softmax, so no device needs the whole K/V at once to attend.
  Exact: equal to ``exact`` up to float rounding, with the same bytes per token.
  It models no link loss (``drop_rate`` must be 0) and takes no ``overlap`` (it
  already folds each block in as it arrives).
  """

  name: ClassVar[str] = "ring"

  def __post_init__(self):
    super().__post_init__()
    if self.drop_rate:
      raise ValueError(
          f"the ring exchange does not model link loss (drop_rate={self.drop_rate}); "
          "use exact or vq for a lossy link")
    if self.overlap:
      raise ValueError("the ring exchange already attends block by block as K/V arrive; "
                       "overlap=true is for exact and vq")

  def gather(self, state, k, v, *, axis_name, train=False, key=None):
    del train, key
    k, v = ring.place(ring.circulate(k, v, axis_name))
    return ExchangeOut(k, v, state, jnp.zeros((), jnp.float32))

  def sends(self, mesh_size):
    return mesh_size - 1

  def attend(self, state, q, k, v, *, causal, train=False, key=None, axis_name=None,
             private=0, query_transform=None, key_transform=None, carry=None):
    del train, key, carry
    out, k_all, v_all = ring.ring_attention(
        q, k, v, causal=causal, axis_name=axis_name, private=private,
        query_transform=query_transform, key_transform=key_transform)
    return out, ExchangeOut(k_all, v_all, state, jnp.zeros((), jnp.float32))

  def bytes_per_token(self, kv_dim, dtype):
    return ExactExchange().bytes_per_token(kv_dim, dtype)


class VQState(NamedTuple):
  """Separate codebooks for the keys and the values of one layer."""

  k: vq.Codebook
  v: vq.Codebook


@register
@dataclasses.dataclass(frozen=True)
class VQExchange(Exchange):
  """ASTRA's mixed-precision exchange with a grouped vector quantizer.

  groups:          G, groups per K (or V) vector; a token costs G*log2(K) bits.
  codebook_size:   K entries per group codebook (power of two; 1024 = 10 bits).
  commitment:      weight of the commitment loss (ASTRA: 1e-4 .. 5e-4).
  noise_scale:     lambda of noise-augmented quantization (training only).
  ema_decay:       decay of the EMA codebook statistics.
  dead_threshold:  an entry is dead below this fraction of the uniform usage;
                   dead entries are re-seeded every training step.
  boundary_rows:   r: the r patch rows next to a device's band (from each
                   neighbour) arrive exactly, by ``ppermute``, the rest as
                   codes (CoDiT's boundary-aware hybrid context; 0: plain ASTRA).
  row_tokens:      tokens per patch row (set by the model's task, e.g. a DiT's
                   grid width); needed when boundary_rows > 0.
  refresh:         in a sampler, send codes every ``refresh`` steps and reuse
                   the decoded K/V of the last refresh in between (1: every step).
  code_attention:  at inference, attend to the other devices' tokens through
                   their distinct key-code tuples (``astra_jax.core.code_attention``:
                   a log-count bias and mean values; equal to token-level
                   attention over the decoded K/V up to float rounding).

  In training the sender applies the straight-through estimator and the
  decoded (float) K/V cross the mesh, so the gradient of a receiver's loss
  flows back to the sender's pre-quantization K/V; the values are exactly the
  decoded codes.  At inference only the packed codes cross the mesh.
  """

  name: ClassVar[str] = "vq"
  groups: int = 32
  codebook_size: int = 1024
  commitment: float = 2.5e-4
  noise_scale: float = 1.0
  ema_decay: float = 0.99
  dead_threshold: float = 0.01
  boundary_rows: int = 0
  row_tokens: int = 0
  refresh: int = 1
  code_attention: bool = False

  def __post_init__(self):
    super().__post_init__()
    packing.code_bits(self.codebook_size)
    if self.groups < 1:
      raise ValueError(f"groups must be >= 1, got {self.groups}")
    if self.boundary_rows < 0 or self.row_tokens < 0:
      raise ValueError("boundary_rows and row_tokens must be >= 0")
    if self.refresh < 1:
      raise ValueError(f"refresh must be >= 1 (codes re-sent every refresh steps), "
                       f"got {self.refresh}")
    if self.code_attention and (self.refresh > 1 or self.overlap):
      raise ValueError("code_attention works on the codes of the current step: drop refresh "
                       "and overlap from the spec (or drop code_attention)")

  @property
  def boundary_tokens(self) -> int:
    """Tokens each neighbour sends exactly per layer (r rows of ``row_tokens``)."""
    if self.boundary_rows and not self.row_tokens:
      raise ValueError("boundary_rows needs row_tokens, the patches per row: the image "
                       "model's task sets it (e.g. python -m infer.dit)")
    return self.boundary_rows * self.row_tokens

  def stepped_gather(self, carry, state, k, v, *, axis_name, train, key):
    if carry is None or axis_name is None or self.refresh == 1:
      return self.gather(state, k, v, axis_name=axis_name, train=train, key=key)
    if carry.step % self.refresh == 0:  # a refresh step: codes cross the link
      got = self.gather(state, k, v, axis_name=axis_name, train=train, key=key)
      return got._replace(carry=Carry(carry.step + 1, got.k, got.v))
    return ExchangeOut(_own_block(carry.k, k, axis_name), _own_block(carry.v, v, axis_name),
                       state, jnp.zeros((), jnp.float32), carry._replace(step=carry.step + 1))

  def attend(self, state, q, k, v, *, causal, train=False, key=None, axis_name=None,
             private=0, query_transform=None, key_transform=None, carry=None):
    if not self.code_attention or train or axis_name is None:
      return super().attend(state, q, k, v, causal=causal, train=train, key=key,
                            axis_name=axis_name, private=private,
                            query_transform=query_transform, key_transform=key_transform,
                            carry=carry)
    if query_transform is not None or key_transform is not None:
      raise ValueError("code_attention needs keys attended as they were decoded; this model "
                       "rotates them by position (RoPE): use it with ViT, GPT-2 or DiT, or "
                       "drop code_attention")
    return self._attend_codes(state, q, k, v, causal=causal, key=key, axis_name=axis_name,
                              private=private)

  def _attend_codes(self, state, q, k, v, *, causal, key, axis_name, private):
    """Codebook-centric attention (``code_attention``): the exact block (private
    tokens, this device's tokens and any exact boundary rows) plus the other
    devices' visible tokens collapsed to their distinct key-code tuples."""
    b, tl_all, hkv, dh = k.shape
    ks, vs = k[:, private:], v[:, private:]
    ts = ks.shape[1]
    k_side, v_side = self._send(ks, state.k, False), self._send(vs, state.v, False)
    k_got, v_got = _gather_pair(k_side[-1], v_side[-1], axis_name)
    codes_k = packing.unpack_codes(k_got, self.groups, self.codebook_size)  # [B, T, G]
    codes_v = packing.unpack_codes(v_got, self.groups, self.codebook_size)
    v_dec = vq.decode(codes_v, state.v.entries).astype(v.dtype).reshape(b, -1, hkv, dh)
    total = codes_k.shape[1]
    size, index = total // ts, jax.lax.axis_index(axis_name)
    device = jnp.arange(total) // ts
    weights = (device < index) if causal else (device != index)
    weights = jnp.broadcast_to(weights[None], (b, total))
    received = jnp.ones((b, total), bool)
    if self.drop_rate > 0:
      if key is None:
        raise ValueError("a lossy link (drop_rate > 0) needs a PRNG key to draw the losses")
      drop_key = jax.random.split(key)[1]  # the losses ``Exchange.attend`` would draw
      received = received_tokens(drop_key, self.drop_rate, b, total, ts, axis_name)
      weights = weights & received
    pos = jnp.arange(total)
    q_pos = index * ts + jnp.arange(tl_all) - private  # (private tokens: bidirectional only)
    own_pos = jnp.concatenate([jnp.full((private,), -1), index * ts + jnp.arange(ts)])
    k_exact, v_exact, exact_pos = [k], [v], [own_pos]
    exact_ok = [jnp.ones((b, private + ts), bool)]
    if self.boundary_rows and size > 1:
      n = self.boundary_tokens
      prev, nxt = _neighbour_rows(jnp.stack([ks, vs], axis=2), n, axis_name)
      prev_pos, next_pos = index * ts - n + jnp.arange(n), (index + 1) * ts + jnp.arange(n)
      for got, at, ok in ((prev, prev_pos, index > 0), (nxt, next_pos, index < size - 1)):
        k_exact.append(got[:, :, 0])
        v_exact.append(got[:, :, 1])
        exact_pos.append(at)
        exact_ok.append(ok & received[:, at])  # boundary rows can be lost too
        weights = weights & ~(ok & (pos[None] >= at[0]) & (pos[None] <= at[-1]))
    exact_pos, exact_ok = jnp.concatenate(exact_pos), jnp.concatenate(exact_ok, axis=1)
    mask = visible(q_pos, exact_pos, causal)[None] & exact_ok[:, None]  # [B, Tq, Te]
    collapsed = code_attention.collapse(
        codes_k, weights, state.k.entries, v_dec,
        size=code_attention.enough_slots(total, self.groups, self.codebook_size))
    out = code_attention.attend(q, jnp.concatenate(k_exact, axis=1),
                                jnp.concatenate(v_exact, axis=1), mask, collapsed)
    # every device's K/V as decoded (own block exact), for a KV cache or recording
    k_all = _own_block(vq.decode(codes_k, state.k.entries).astype(k.dtype),
                       ks.reshape(b, ts, -1), axis_name)
    v_all = _own_block(v_dec.reshape(b, total, -1), vs.reshape(b, ts, -1), axis_name)
    return out, ExchangeOut(k_all.reshape(b, total, hkv, dh), v_all.reshape(b, total, hkv, dh),
                            state, jnp.zeros((), jnp.float32))

  def init_state(self, key, kv_dim):
    vq.check_config(kv_dim, self.groups, self.codebook_size)
    kk, kv = jax.random.split(key)
    return VQState(vq.init_codebook(kk, kv_dim, self.groups, self.codebook_size),
                   vq.init_codebook(kv, kv_dim, self.groups, self.codebook_size))

  def bytes_per_token(self, kv_dim, dtype):
    del dtype
    vq.check_config(kv_dim, self.groups, self.codebook_size)
    return packing.packed_bytes(self.groups, self.codebook_size)

  def gather(self, state, k, v, *, axis_name, train=False, key=None):
    if axis_name is None:  # one device: everything is local and exact
      return ExchangeOut(k, v, state, jnp.zeros((), jnp.float32))
    if train and key is None:
      raise ValueError("the vq exchange needs a PRNG key in training (noise, re-seeding)")
    keys = jax.random.split(key, 2) if train else (None, None)
    k_side = self._send(k, state.k, train)
    v_side = self._send(v, state.v, train)
    k_got, v_got = _gather_pair(k_side[-1], v_side[-1], axis_name)  # one collective per layer
    (k_all, cb_k, loss_k), (v_all, cb_v, loss_v) = (
        self._receive(x, cb, side, got, axis_name, train, kk)
        for x, cb, side, got, kk in ((k, state.k, k_side, k_got, keys[0]),
                                     (v, state.v, v_side, v_got, keys[1])))
    return ExchangeOut(k_all, v_all, VQState(cb_k, cb_v), loss_k + loss_v)

  def _send(self, x, cb: vq.Codebook, train):
    """(flat, codes, decoded, what crosses the link): packed codes at
    inference; in training the decoded vectors with the straight-through
    gradient."""
    b, tl, h, dh = x.shape
    flat = x.reshape(b, tl, h * dh)
    vq.check_config(h * dh, self.groups, self.codebook_size)
    codes = vq.encode(flat, cb.entries)
    if train:
      decoded = vq.decode(codes, cb.entries)
      return flat, codes, decoded, vq.straight_through(flat, decoded)
    return flat, codes, None, packing.pack_codes(codes, self.codebook_size)

  def _receive(self, x, cb: vq.Codebook, side, got, axis_name, train, key):
    """Every block as this device sees it (its own exact), the updated
    codebook and the commitment loss."""
    flat, codes, decoded, _ = side
    b, _, h, dh = x.shape
    if train:
      k_noise, k_seed = jax.random.split(key)
      device_key = jax.random.fold_in(k_noise, jax.lax.axis_index(axis_name))
      received = noise_lib.residual_noise(device_key, got, cb.resid_var, self.noise_scale)
      loss = self.commitment * jax.lax.pmean(vq.commitment_loss(flat, decoded), axis_name)
      cb = vq.ema_update(cb, flat, codes, decay=self.ema_decay, axis_name=axis_name)
      cb = vq.reseed_dead(k_seed, cb, self.dead_threshold)
    else:
      codes_all = packing.unpack_codes(got, self.groups, self.codebook_size)
      received = vq.decode(codes_all, cb.entries)
      loss = jnp.zeros((), jnp.float32)
    received = received.astype(x.dtype)
    if self.boundary_rows:
      received = _exact_boundary(received, flat, self.boundary_tokens, axis_name)
    full = _own_block(received, flat, axis_name)
    return full.reshape(b, -1, h, dh), cb, loss


def _neighbour_rows(local: jnp.ndarray, n: int, axis_name: str):
  """(the previous device's last n tokens, the next device's first n) of
  ``local`` [B, Tl, ...], each sent by one ``ppermute`` (one message per
  direction; at the edges, where no neighbour sends, zeros arrive)."""
  tl = local.shape[1]
  if n > tl:
    raise ValueError(f"boundary context of {n} tokens is more than a device's band of {tl} "
                     "tokens: use fewer boundary_rows (at most the rows of one band)")
  size = jax.lax.axis_size(axis_name)
  return (jax.lax.ppermute(local[:, tl - n:], axis_name, [(j, j + 1) for j in range(size - 1)]),
          jax.lax.ppermute(local[:, :n], axis_name, [(j + 1, j) for j in range(size - 1)]))


def _exact_boundary(full: jnp.ndarray, local: jnp.ndarray, n: int, axis_name: str):
  """Overwrites, in ``full`` [B, P*Tl, D], the ``n`` tokens of each neighbour
  next to this device's block with their exact values (``_neighbour_rows``)."""
  size = jax.lax.axis_size(axis_name)
  if size == 1:
    return full
  tl = local.shape[1]
  index = jax.lax.axis_index(axis_name)
  from_prev, from_next = _neighbour_rows(local, n, axis_name)
  with_prev = jax.lax.dynamic_update_slice_in_dim(full, from_prev, index * tl - n, axis=1)
  full = jnp.where(index > 0, with_prev, full)
  with_next = jax.lax.dynamic_update_slice_in_dim(full, from_next, (index + 1) * tl, axis=1)
  return jnp.where(index < size - 1, with_next, full)


@register
@dataclasses.dataclass(frozen=True)
class StreamExchange(VQExchange):
  """Forward streaming for causal models (``astra_jax.core.streaming``): a
  device's codes (``quantize=true``, the vq options) or exact K/V
  (``quantize=false``) go only to the devices after it, which are the only
  ones whose queries may see them; nothing goes backwards.  The outputs equal
  the all-gather exchanges' (``vq`` with the same codebooks, bit for bit;
  ``exact``): the blocks a device does not receive are masked anyway.
  Inference only (prefill); bidirectional models (ViT, DiT) need every block.
  """

  name: ClassVar[str] = "stream"
  quantize: bool = True

  def __post_init__(self):
    super().__post_init__()
    extras = [f for f in ("boundary_rows", "code_attention", "overlap")
              if getattr(self, f)] + (["refresh"] if self.refresh > 1 else [])
    if extras:
      raise ValueError(f"the stream exchange takes no {', '.join(extras)}: drop them from the "
                       "spec (they are options of vq)")

  def init_state(self, key, kv_dim):
    return super().init_state(key, kv_dim) if self.quantize else ()

  def bytes_per_token(self, kv_dim, dtype):
    if self.quantize:
      return super().bytes_per_token(kv_dim, dtype)
    return ExactExchange().bytes_per_token(kv_dim, dtype)

  def attend(self, state, q, k, v, *, causal, train=False, key=None, axis_name=None,
             private=0, query_transform=None, key_transform=None, carry=None):
    if not causal:
      raise ValueError("the stream exchange sends K/V only to later devices, which is all a "
                       "causal model reads; a bidirectional model (ViT, DiT) needs every "
                       "block: use --exchange vq or exact")
    if train:
      raise ValueError("the stream exchange is for inference (prefill); fine-tune with "
                       "--config.exchange=vq and evaluate with stream")
    return Exchange.attend(self, state, q, k, v, causal=causal, axis_name=axis_name,
                           private=private, query_transform=query_transform,
                           key_transform=key_transform, key=key, carry=carry)

  def gather(self, state, k, v, *, axis_name, train=False, key=None):
    del train, key
    zero = jnp.zeros((), jnp.float32)
    if axis_name is None:
      return ExchangeOut(k, v, state, zero)
    if not self.quantize:
      both = streaming.forward(jnp.stack([k, v], axis=2), axis_name)
      return ExchangeOut(_own_block(both[:, :, 0], k, axis_name),
                         _own_block(both[:, :, 1], v, axis_name), state, zero)
    b, tl, h, dh = k.shape
    packed_k = self._send(k, state.k, False)[-1]
    packed_v = self._send(v, state.v, False)[-1]
    got = streaming.forward(jnp.stack([packed_k, packed_v], axis=2), axis_name)
    out = []
    for i, (x, cb) in enumerate(((k, state.k), (v, state.v))):
      codes = packing.unpack_codes(got[:, :, i], self.groups, self.codebook_size)
      full = _own_block(vq.decode(codes, cb.entries).astype(x.dtype),
                        x.reshape(b, tl, h * dh), axis_name)
      out.append(full.reshape(b, -1, h, dh))
    return ExchangeOut(out[0], out[1], state, zero)
