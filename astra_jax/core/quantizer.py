"""Grouped vector quantizer: pure functions over a codebook pytree.

A D-dimensional vector (one token's keys, or values, of one layer) is split into
G groups of d = D/G dims; group g is replaced by the index of its nearest entry
in its own K-entry codebook.  A token then costs G*log2(K) bits.

Codebook learning: exponential moving averages (EMA) of the assignment
statistics, not gradients.  Why EMA:
  * every device must hold a bit-identical codebook, since the receiver decodes
    codes the sender produced.  EMA updates are a deterministic function of
    sufficient statistics (counts and sums) that we ``psum`` over the mesh
    axis, so all devices apply the same update with no extra parameter sync;
  * the codebook stays out of the optimizer: AdamW's weight decay and learning
    rate schedule (tuned for the Transformer) would otherwise shrink or stall
    the codebook, and the loss needs no codebook term, only the small
    commitment term that pulls the encoder towards the codes;
  * EMA statistics give usage counts for free, which drive dead-code re-seeding
    and the usage metrics.

Everything here is a pure function of arrays; ``Codebook`` is a NamedTuple
(a pytree) that carries the entries and their statistics.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from astra_jax.core.packing import code_bits

AxisNames = str | Sequence[str] | None


class Codebook(NamedTuple):
  """One grouped codebook and its running statistics (a pytree).

  entries:   [G, K, d] code vectors.
  ema_count: [G, K] running assignment counts (per update, EMA-smoothed).
  ema_sum:   [G, K, d] running sum of assigned vectors.
  resid_var: [G] running mean squared quantization residual per group (the
             scale of the training noise, see ``astra_jax.core.noise``).
  """

  entries: jnp.ndarray
  ema_count: jnp.ndarray
  ema_sum: jnp.ndarray
  resid_var: jnp.ndarray

  @property
  def groups(self) -> int:
    return self.entries.shape[0]

  @property
  def size(self) -> int:
    return self.entries.shape[1]


def check_config(dim: int, groups: int, codebook_size: int) -> None:
  """Raises ValueError with the fix when (D, G, K) cannot form a quantizer."""
  if groups < 1 or dim % groups:
    divisors = [g for g in (1, 2, 4, 8, 16, 32, 64, 128) if dim % g == 0]
    raise ValueError(
        f"groups={groups} does not divide the K/V dimension {dim}; choose G from "
        f"its divisors, e.g. {divisors}."
    )
  code_bits(codebook_size)  # validates the power of two


def split_groups(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """[..., D] -> [..., G, D/G]."""
  return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def merge_groups(x: jnp.ndarray) -> jnp.ndarray:
  """[..., G, d] -> [..., G*d]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def init_codebook(key: jax.Array, dim: int, groups: int, size: int,
                  scale: float = 1.0) -> Codebook:
  """Random-normal codebook; replace with :func:`kmeans_init` from real data."""
  check_config(dim, groups, size)
  d = dim // groups
  entries = scale * jax.random.normal(key, (groups, size, d), jnp.float32)
  return Codebook(
      entries=entries,
      ema_count=jnp.ones((groups, size), jnp.float32),
      ema_sum=entries,
      resid_var=jnp.zeros((groups,), jnp.float32),
  )


def encode_reference(x: jnp.ndarray, entries: jnp.ndarray) -> jnp.ndarray:
  """Nearest-entry codes: x [..., D], entries [G, K, d] -> int32 [..., G].

  argmin_k |x_g - e_gk|^2 = argmin_k (|e_gk|^2 - 2 x_g . e_gk): the |x_g|^2 term
  is dropped, and the groups lead so the cross term is one batched matmul.
  The definition of the codes; :func:`encode` returns the same ones faster.
  """
  groups = entries.shape[0]
  lead = x.shape[:-1]
  xg = jnp.moveaxis(split_groups(x, groups).reshape(-1, groups, x.shape[-1] // groups), 1, 0)
  cross = jnp.einsum("gnd,gkd->gnk", xg.astype(jnp.float32), entries,
                     precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(entries * entries, -1)[:, None, :] - 2.0 * cross
  codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # [G, N]
  return codes.T.reshape(*lead, groups)


# The blocked search (``_encode_blocked``) holds one [g, tokens, K] block of
# distances at a time: about this many, 512 KiB of float32, so it stays in cache.
_BLOCK_DISTANCES = 1 << 17


def _blocked_search_applies(tokens: int, entries: jnp.ndarray) -> bool:
  """Whether :func:`_encode_blocked` rounds every distance as the reference does.

  Its blocks keep the reference's matmul (tokens x entries, groups batched),
  and XLA:CPU rounds that one the same for any number of tokens from 2 up
  and any batch of 2 or more groups (tests/test_quantizer.py checks codes on
  near-ties that only rounding decides).  Not for one token (a matrix-vector
  kernel) nor for one-dimensional groups (the matmul becomes a fused multiply).
  """
  size, dim = entries.shape[1:]
  return tokens >= 16 and dim >= 2 and size < 1 << 24 and entries.dtype == jnp.float32


def _groups_per_block(groups: int) -> int:
  """The smallest divisor of ``groups`` above 1: the reference's batched matmul
  rounds differently once a batch of one group collapses to a plain matmul."""
  return next(g for g in range(2, groups + 1) if groups % g == 0) if groups > 1 else 1


def _chunk_tokens(tokens: int, per_token: int) -> int:
  """Tokens per block: about _BLOCK_DISTANCES / per_token, a multiple of 8, little padding."""
  target = min(max(_BLOCK_DISTANCES // per_token, 8), 512)
  blocks = -(-tokens // target)
  per_block = -(-tokens // blocks)
  return -(-per_block // 8) * 8


def _first_minimum(dist: jnp.ndarray) -> jnp.ndarray:
  """``jnp.argmin(dist, -1)`` as two min-reductions, which XLA:CPU vectorizes
  (argmin's (value, index) reduction is a scalar loop): the minimum, then the
  lowest index holding it.  A NaN wins, the first one, as in argmin: NaNs
  take the indices k - K (below every other), whatever the minimum made of
  them.  Indices are carried as float32 (exact below 2^24): XLA:CPU hands
  float min-reductions to its fast YNNPACK kernels."""
  size = dist.shape[-1]
  low = jnp.min(dist, -1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, dist.shape, dist.ndim - 1)
  candidate = jnp.where(dist == low, index, float(size))
  candidate = jnp.where(dist != dist, index - size, candidate)
  first = jnp.min(candidate, -1).astype(jnp.int32)
  return jnp.where(first < 0, first + size, first)


@jax.jit
def _encode_blocked(x: jnp.ndarray, entries: jnp.ndarray) -> jnp.ndarray:
  """:func:`encode_reference`, a few groups and one chunk of tokens at a time.

  Each step computes the reference's distances for a [g, chunk, K] block while
  it is in cache and reduces it there; the reference writes the whole
  [G, N, K] block to memory and scans it with argmin.  Tokens are zero-padded
  to whole chunks and their codes dropped.  Compiled even when called
  outside jit (one program, not dozens of small ones), so it always rounds
  as the compiled reference does.
  """
  groups, size, dim = entries.shape
  lead = x.shape[:-1]
  per = _groups_per_block(groups)
  xf = x.reshape(-1, groups, dim).astype(jnp.float32)
  tokens = xf.shape[0]
  chunk = _chunk_tokens(tokens, per * size)
  blocks = -(-tokens // chunk)
  xf = jnp.pad(xf, ((0, blocks * chunk - tokens), (0, 0), (0, 0)))
  # [G/per, blocks, per, chunk, d]
  xs = xf.reshape(blocks, chunk, groups // per, per, dim).transpose(2, 0, 3, 1, 4)
  sq = jnp.sum(entries * entries, -1)  # [G, K], as in the reference

  def group(args):
    xg, eg, sqg = args

    def block(xb):
      cross = jnp.einsum("gnd,gkd->gnk", xb, eg, precision=jax.lax.Precision.HIGHEST)
      return _first_minimum(sqg[:, None, :] - 2.0 * cross)  # [per, chunk]

    return jax.lax.map(block, xg)  # [blocks, per, chunk]

  codes = jax.lax.map(group, (xs, entries.reshape(groups // per, per, size, dim),
                              sq.reshape(groups // per, per, size)))
  codes = codes.transpose(1, 3, 0, 2).reshape(blocks * chunk, groups)[:tokens]
  return codes.reshape(*lead, groups)


def encode(x: jnp.ndarray, entries: jnp.ndarray) -> jnp.ndarray:
  """Nearest-entry codes: x [..., D], entries [G, K, d] -> int32 [..., G].

  The codes of :func:`encode_reference` (lowest index on ties), found faster:
  on CPU by :func:`_encode_blocked` where it rounds the distances as the
  reference does, elsewhere (other platforms, fewer than 16 tokens, d = 1)
  by the reference itself.  A pure function: jit, vmap, grad (integer
  output) and shard_map apply unchanged.
  """
  tokens = math.prod(x.shape[:-1])
  if not _blocked_search_applies(tokens, entries):
    return encode_reference(x, entries)
  return jax.lax.platform_dependent(x, entries, cpu=_encode_blocked,
                                    default=encode_reference)


def decode(codes: jnp.ndarray, entries: jnp.ndarray) -> jnp.ndarray:
  """Codes [..., G] -> vectors [..., G*d] (float32)."""
  groups = entries.shape[0]
  picked = entries[jnp.arange(groups), codes]  # [..., G, d]
  return merge_groups(picked)


def straight_through(x: jnp.ndarray, quantized: jnp.ndarray) -> jnp.ndarray:
  """Value of ``quantized``, gradient of the identity w.r.t. ``x``."""
  return x + jax.lax.stop_gradient(quantized.astype(x.dtype) - x)


def commitment_loss(x: jnp.ndarray, quantized: jnp.ndarray) -> jnp.ndarray:
  """mean ||x - sg(q)||^2: pulls the encoder output towards its codes."""
  diff = x.astype(jnp.float32) - jax.lax.stop_gradient(quantized.astype(jnp.float32))
  return jnp.mean(diff * diff)


def _psum(x, axis_name: AxisNames):
  return jax.lax.psum(x, axis_name) if axis_name else x


def assignment_stats(x: jnp.ndarray, codes: jnp.ndarray, entries: jnp.ndarray,
                     axis_name: AxisNames = None):
  """Counts [G,K], sums [G,K,d] and residual sq. sum [G] of a batch, summed over the mesh."""
  groups, size, d = entries.shape
  xg = split_groups(x, groups).astype(jnp.float32)
  xg = xg.reshape(-1, groups, d)  # [N, G, d]
  codes = codes.reshape(-1, groups)
  g = jnp.broadcast_to(jnp.arange(groups), codes.shape)
  # scatter-adds: O(N G d), where a one-hot [N, G, K] would cost O(N G K)
  counts = jnp.zeros((groups, size), jnp.float32).at[g, codes].add(1.0)
  sums = jnp.zeros((groups, size, d), jnp.float32).at[g, codes].add(xg)
  resid = xg - entries[jnp.arange(groups), codes]
  resid_sq = jnp.sum(resid * resid, axis=(0, 2))
  n_elems = jnp.asarray(xg.shape[0] * xg.shape[2], jnp.float32)
  return (_psum(counts, axis_name), _psum(sums, axis_name),
          _psum(resid_sq, axis_name), _psum(n_elems, axis_name))


def ema_update(cb: Codebook, x: jnp.ndarray, codes: jnp.ndarray, *,
               decay: float = 0.99, eps: float = 1e-5,
               axis_name: AxisNames = None) -> Codebook:
  """One EMA codebook step from a batch ``x`` [..., D] and its ``codes``.

  Statistics are summed over ``axis_name`` first, so every device computes the
  same new codebook.  Counts get Laplace smoothing so unused entries never
  divide by zero; they keep their place until :func:`reseed_dead` moves them.
  """
  x = jax.lax.stop_gradient(x)
  counts, sums, resid_sq, n = assignment_stats(x, codes, cb.entries, axis_name)
  ema_count = decay * cb.ema_count + (1 - decay) * counts
  ema_sum = decay * cb.ema_sum + (1 - decay) * sums
  total = jnp.sum(ema_count, -1, keepdims=True)
  smoothed = (ema_count + eps) / (total + cb.size * eps) * total
  entries = ema_sum / smoothed[..., None]
  resid_var = decay * cb.resid_var + (1 - decay) * resid_sq / n
  return Codebook(entries, ema_count, ema_sum, resid_var)


def dead_mask(cb: Codebook, threshold: float = 0.01) -> jnp.ndarray:
  """[G, K] True where an entry's usage is below ``threshold`` x the uniform share."""
  share = jnp.sum(cb.ema_count, -1, keepdims=True) / cb.size
  return cb.ema_count < threshold * share


def reseed_dead(key: jax.Array, cb: Codebook, threshold: float = 0.01,
                jitter: float = 0.01) -> Codebook:
  """Moves dead entries next to busy ones (code splitting).

  Each dead entry becomes a copy of an entry drawn in proportion to usage, plus
  a small jitter scaled by that group's residual std; the two then share the
  donor's cluster and drift apart under EMA.  Depends only on the (already
  mesh-reduced) statistics and ``key``, so it stays identical across devices
  when all devices pass the same key.
  """
  dead = dead_mask(cb, threshold)
  groups, size, d = cb.entries.shape
  k_pick, k_jit = jax.random.split(key)
  # inverse-CDF sampling of donors by usage: O(G K log K), not a [G, K, K] Gumbel draw
  cdf = jnp.cumsum(cb.ema_count, -1)
  u = jax.random.uniform(k_pick, (groups, size)) * cdf[:, -1:]
  donors = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
  donors = donors.clip(0, size - 1)  # [G, K]
  donor_entries = jnp.take_along_axis(cb.entries, donors[..., None], axis=1)
  std = jnp.sqrt(cb.resid_var + 1e-12)[:, None, None]
  fresh = donor_entries + jitter * std * jax.random.normal(k_jit, cb.entries.shape)
  donor_count = jnp.take_along_axis(cb.ema_count, donors, axis=1)
  new_count = jnp.where(dead, donor_count / 2, cb.ema_count)
  entries = jnp.where(dead[..., None], fresh, cb.entries)
  return Codebook(entries, new_count, entries * new_count[..., None], cb.resid_var)


def usage_metrics(cb: Codebook, threshold: float = 0.01) -> dict[str, jnp.ndarray]:
  """Mean code perplexity over groups (max K) and the fraction of dead entries."""
  p = cb.ema_count / jnp.sum(cb.ema_count, -1, keepdims=True)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), -1)
  return {
      "code_perplexity": jnp.mean(jnp.exp(entropy)),
      "dead_fraction": jnp.mean(dead_mask(cb, threshold).astype(jnp.float32)),
  }


def kmeans_init(key: jax.Array, x: jnp.ndarray, groups: int, size: int,
                iters: int = 10) -> Codebook:
  """k-means codebook per group from real activations ``x`` [N, D].

  Lloyd iterations from K distinct random samples (drawn with replacement and
  jittered when N < K).  Entries that end up empty keep their seed point.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  n, dim = x.shape
  check_config(dim, groups, size)
  k_seed, k_jit = jax.random.split(key)
  idx = jax.random.choice(k_seed, n, (size,), replace=n < size)
  entries = jnp.swapaxes(split_groups(x[idx], groups), 0, 1)  # [G, K, d]
  if n < size:
    scale = jnp.std(x) * 1e-3 + 1e-6
    entries = entries + scale * jax.random.normal(k_jit, entries.shape)

  def step(entries, _):
    codes = encode(x, entries)
    counts, sums, _, _ = assignment_stats(x, codes, entries)
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return jnp.where(counts[..., None] > 0, means, entries), None

  entries, _ = jax.lax.scan(step, entries, None, length=iters)
  codes = encode(x, entries)
  counts, sums, resid_sq, n_el = assignment_stats(x, codes, entries)
  counts = jnp.maximum(counts, 1e-3)
  return Codebook(entries, counts, entries * counts[..., None], resid_sq / n_el)
