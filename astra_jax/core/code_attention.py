"""Codebook-centric VQ attention: the non-local keys as distinct code tuples.

With the vq exchange a device attends to its own tokens' K/V exactly and to
every other device's tokens through their codes: a key is the concatenation
of G codebook entries, one per group, named by its code tuple (c_1 .. c_G).
Two tokens with the same tuple have the same decoded key, so every query
gives them the same score.  The non-local part of softmax attention can then
run over the distinct tuples s instead of over the tokens:

  sum_j e^(q.k_j/sqrt(Dh)) v_j  =  sum_s n_s e^(q.k_s/sqrt(Dh)) vbar_s
                                =  sum_s e^(q.k_s/sqrt(Dh) + log n_s) vbar_s

where n_s counts the visible tokens with tuple s and vbar_s is the mean of
their (decoded) values; the normalizer is the same sum without the values.
So attention over the tuples, with a log-count bias on each tuple's logit and
the mean value as its value, equals token-level attention over the decoded
non-local K/V exactly, up to float rounding, for any G.  With G = 1 the
tuples are the codebook entries in use (at most K): the classic "softmax over
used codes with a log-count bias and per-code value sums".

The saving is the number of distinct tuples against the number of tokens.
With G = 1 and K << Tn it is large; with G > 1 (32 in the default vq
exchange) a tuple has K^G possible values and real tokens rarely share one,
so ``used`` approaches the number of visible tokens and nothing is saved.
``macs_per_query`` and ``cost`` count the work either way.

Two pure, mesh-free steps:

  collapse  once per layer per device: sort the non-local tokens' key tuples,
            number the distinct ones (a segment id per token), sum counts and
            values per segment, decode one key per segment
  attend    the own block exactly, then the collapsed tuples with their
            log-count bias, folded into one online softmax (``ring.fold``)

Shapes are static (jit-able): the collapsed part has ``size`` slots, of
which the first ``used`` hold a tuple and the rest are masked out.  ``size``
must be at least the number of distinct visible tuples (``enough_slots``:
min(Tn, K^G) always is); tuples beyond ``size`` would be dropped.

Where it applies: the decoded keys must be attended as decoded.  A model that
rotates keys after the exchange (RoPE's ``key_transform`` in Llama) gives two
tokens with the same code tuple different keys at different positions, so
their scores differ and the collapse is not exact there; GPT-2 and ViT attend
to the decoded keys themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from astra_jax.core import quantizer as vq
from astra_jax.core import ring
from astra_jax.core.dot_product import MASKED


class Collapsed(NamedTuple):
  """The non-local keys and values, one slot per distinct visible key tuple.

  keys:       [B, size, Hkv, Dh] the decoded key of each tuple (in v's dtype,
              as the exchange casts decoded keys); empty slots hold entry 0.
  values:     [B, size, Hkv, Dh] float32, the mean value of the tuple's tokens.
  log_counts: [B, size] float32, log n_s; ``MASKED`` (-1e30) in empty slots.
  present:    [B, size] bool, the slot holds a tuple (n_s > 0).
  used:       [B] int32, how many slots hold a tuple (the first ``used``).
  """

  keys: jnp.ndarray
  values: jnp.ndarray
  log_counts: jnp.ndarray
  present: jnp.ndarray
  used: jnp.ndarray


def enough_slots(tokens: int, groups: int, codebook_size: int) -> int:
  """The smallest ``size`` that holds every possible set of distinct tuples of
  ``tokens`` tokens: min(Tn, K^G) (K for G = 1 and Tn >= K)."""
  return min(tokens, codebook_size ** groups)


def collapse(codes_k, weights, entries_k, v_rest, *, size: int) -> Collapsed:
  """Merges the non-local tokens that share a key code tuple.

  codes_k:   int [B, Tn, G] the key codes of the non-local tokens.
  weights:   [B, Tn] bool or {0, 1}: 1 = visible to this device's queries
             (received, and not later in a causal model); 0 = left out.
  entries_k: [G, K, d] the key codebook (G d = Hkv Dh).
  v_rest:    [B, Tn, Hkv, Dh] the tokens' decoded values.
  size:      static number of slots (see the module docstring).

  The tuples are sorted lexicographically (hidden tokens last, so the visible
  ones take segments 0 .. used-1 and the hidden ones none); a token opens a
  new segment where its tuple differs from the previous one; segment sums
  give counts, value sums and one code tuple per segment.  The work is a
  sort of Tn tuples and sums over Tn tokens, once per layer per device, not
  per query.
  """
  b, tn, groups = codes_k.shape
  hkv, dh = v_rest.shape[2:]
  if entries_k.shape[0] != groups or groups * entries_k.shape[2] != hkv * dh:
    raise ValueError(f"codes with {groups} groups and a codebook {entries_k.shape} "
                     f"cannot decode keys of {hkv} heads x {dh} dims")
  seen = jnp.asarray(weights) > 0
  codes = codes_k.astype(jnp.int32)
  token = jax.lax.broadcasted_iota(jnp.int32, (b, tn), 1)
  hidden = (~seen).astype(jnp.int32)
  *keys, order = jax.lax.sort((hidden, *(codes[..., g] for g in range(groups)), token),
                              dimension=1, num_keys=groups + 1)
  hidden_sorted, tuples = keys[0], jnp.stack(keys[1:], axis=-1)  # [B, Tn], [B, Tn, G]
  differs = jnp.any(tuples[:, 1:] != tuples[:, :-1], axis=-1)
  opens = jnp.concatenate([jnp.ones((b, 1), bool), differs], axis=1) & (hidden_sorted == 0)
  used = opens.sum(axis=1, dtype=jnp.int32)
  # segment of each sorted token; hidden tokens (and any beyond ``size``) go to
  # slot ``size``, a spare one dropped at the end
  slot = jnp.where(hidden_sorted == 0, jnp.cumsum(opens, axis=1, dtype=jnp.int32) - 1, size)
  slot = jnp.minimum(slot, size)
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  segment = rows * (size + 1) + slot  # [B, Tn] in sorted order
  segment_of_token = jnp.zeros((b, tn), jnp.int32).at[rows, order].set(segment)

  def per_slot(x, ids):  # [B, Tn, ...] -> [B, size, ...]
    summed = jax.ops.segment_sum(x.reshape(b * tn, *x.shape[2:]), ids.reshape(-1),
                                 num_segments=b * (size + 1))
    return summed.reshape(b, size + 1, *x.shape[2:])[:, :size]

  counts = per_slot(jnp.ones((b, tn), jnp.float32), segment)
  tuple_of_slot = per_slot(jnp.where(opens[..., None], tuples, 0), segment)  # [B, size, G]
  sums = per_slot(v_rest.astype(jnp.float32), segment_of_token)
  present = counts > 0
  values = sums / jnp.maximum(counts, 1.0)[..., None, None]
  keys = vq.decode(tuple_of_slot, entries_k).reshape(b, size, hkv, dh).astype(v_rest.dtype)
  log_counts = jnp.where(present, jnp.log(jnp.maximum(counts, 1.0)), MASKED)
  return Collapsed(keys, values, log_counts, present, used)


def attend(q, k_exact, v_exact, exact_mask, collapsed: Collapsed) -> jnp.ndarray:
  """Softmax attention over the exact block and the collapsed tuples at once.

  q: [B, Tq, H, Dh]; k_exact, v_exact: [B, Te, Hkv, Dh] (H a multiple of Hkv:
  grouped-query attention as in ``dot_product.grouped_logits``); exact_mask:
  [Tq, Te] or [B, Tq, Te] bool, the exact keys each query sees (causal within
  the own block); ``collapsed``: the non-local part from ``collapse``, every
  present slot visible to every query, its logit shifted by log n_s.  The
  exact block is folded first (it holds each causal query's own key), the
  tuples second, into one online softmax; logits in float32.
  Returns [B, Tq, H, Dh] in q's dtype.
  """
  b, tq = q.shape[:2]
  run = ring.fold(None, q, k_exact, v_exact, exact_mask)
  mask = jnp.broadcast_to(collapsed.present[:, None, :], (b, tq, collapsed.present.shape[1]))
  run = ring.fold(run, q, collapsed.keys, collapsed.values, mask, bias=collapsed.log_counts)
  return ring.finish(run, q.dtype)


def macs_per_query(*, exact_tokens: int, keys: int, head_dim: int) -> int:
  """Multiply-adds of one query head over ``exact_tokens`` exact keys and
  ``keys`` non-local keys: a score (Dh) and a weighted value (Dh) per key."""
  return 2 * head_dim * (exact_tokens + keys)


class Cost(NamedTuple):
  """Multiply-adds per query head (``macs_per_query``)."""

  token_level: int  # exact block + every non-local token
  compiled: int     # exact block + ``size`` slots: what a static-shape program runs
  ideal: int        # exact block + ``used`` tuples: what a ragged kernel would run


def cost(*, exact_tokens: int, tokens: int, size: int, used: int, head_dim: int) -> Cost:
  """Token-level against codebook-centric attention, per query head.

  In a static-shape (XLA) program the compiled work is ``size`` slots whatever
  ``used`` is; ``used`` is the ideal.  It pays where the ``size`` (or ``used``)
  slots are much fewer than the ``tokens`` non-local tokens, and the queries
  many enough to amortize ``collapse`` (a sort of Tn tuples of G codes and
  value sums over Tn tokens, once per layer per device, not per query).
  """
  macs = lambda n: macs_per_query(exact_tokens=exact_tokens, keys=n, head_dim=head_dim)
  return Cost(macs(tokens), macs(size), macs(used))
