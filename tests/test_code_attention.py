"""Codebook-centric VQ attention (``astra_jax.core.code_attention``) equals
token-level softmax attention over the decoded non-local K/V, for one group
(the used codes with a log-count bias) and for many, with hidden tokens,
grouped-query heads, causal own blocks, and under jit; ``used`` is the number
of distinct visible key tuples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astra_jax.core import code_attention as ca
from astra_jax.core import quantizer as vq
from astra_jax.core.dot_product import (MASKED, dot_product_attention, grouped_logits,
                                        visible, weighted_values)

B, TQ, TN, H, HKV, DH = 2, 8, 64, 4, 2, 16  # TQ: own (exact) tokens, TN: non-local ones
ATOL = 1e-5


def _case(groups, codebook_size, *, seed=0, pool=None, keep=1.0):
  """Random queries, exact block, key codebook, non-local key codes (drawn from
  ``pool`` distinct tuples if given, so they repeat), values and weights."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  d = HKV * DH // groups
  entries = jax.random.normal(ks[0], (groups, codebook_size, d))
  if pool is None:
    codes = jax.random.randint(ks[1], (B, TN, groups), 0, codebook_size)
  else:
    tuples = jax.random.randint(ks[1], (pool, groups), 0, codebook_size)
    codes = tuples[jax.random.randint(ks[2], (B, TN), 0, pool)]
  weights = jax.random.bernoulli(ks[3], keep, (B, TN)).astype(jnp.float32)
  q = jax.random.normal(ks[4], (B, TQ, H, DH))
  k_exact = jax.random.normal(ks[5], (B, TQ, HKV, DH))
  v_exact = jax.random.normal(ks[6], (B, TQ, HKV, DH))
  v_rest = jax.random.normal(ks[7], (B, TN, HKV, DH))
  return q, k_exact, v_exact, codes, weights, entries, v_rest


@functools.partial(jax.jit, static_argnames="causal")
def _token_level(q, k_exact, v_exact, codes, weights, entries, v_rest, *, causal):
  """Softmax over [decoded non-local keys ; exact block], the non-local tokens
  first (an earlier device's), the own block causal when ``causal``."""
  k_rest = vq.decode(codes, entries).reshape(B, TN, HKV, DH)
  k = jnp.concatenate([k_rest, k_exact], axis=1)
  v = jnp.concatenate([v_rest, v_exact], axis=1)
  valid = jnp.concatenate([weights > 0, jnp.ones((B, TQ), bool)], axis=1)
  return dot_product_attention(q, k, v, q_pos=TN + jnp.arange(TQ), k_pos=jnp.arange(TN + TQ),
                               causal=causal, kv_valid=valid)


@functools.partial(jax.jit, static_argnames=("size", "causal"))
def _codebook_centric(q, k_exact, v_exact, codes, weights, entries, v_rest, *, size, causal):
  mask = visible(jnp.arange(TQ), jnp.arange(TQ), causal)
  collapsed = ca.collapse(codes, weights, entries, v_rest, size=size)
  return ca.attend(q, k_exact, v_exact, mask, collapsed), collapsed


def _distinct_visible(codes, weights):
  """Per example: the distinct visible tuples (sorted) and their tokens' indices."""
  out = []
  for c, w in zip(np.asarray(codes), np.asarray(weights)):
    seen = np.flatnonzero(w > 0)
    tuples, inverse = np.unique(c[seen], axis=0, return_inverse=True)
    out.append((tuples, seen, inverse.reshape(-1)))
  return out


def _check(case, *, size, causal):
  ours, collapsed = _codebook_centric(*case, size=size, causal=causal)
  ref = _token_level(*case, causal=causal)
  err = float(jnp.max(jnp.abs(ours - ref)))
  assert err <= ATOL, err
  distinct = _distinct_visible(case[3], case[4])
  np.testing.assert_array_equal(collapsed.used, [len(t) for t, _, _ in distinct])
  return err, collapsed


@pytest.mark.parametrize("causal", [True, False])
def test_one_group_equals_token_level_and_the_log_count_formula(causal):
  """G = 1, K = 8 codes for 64 tokens: the used codes stand for the tokens."""
  case = _case(1, 8, keep=0.8)
  q, k_exact, v_exact, codes, weights, entries, v_rest = case
  _, collapsed = _check(case, size=ca.enough_slots(TN, 1, 8), causal=causal)
  assert int(collapsed.used.max()) <= 8

  # the formula itself, in float64: softmax over the used codes with logit
  # q.e_c / sqrt(Dh) + log n_c and value (sum of the code's values) / n_c
  qn, ke, ve, e = (np.asarray(x, np.float64) for x in (q, k_exact, v_exact, entries[0]))
  vr = np.asarray(v_rest, np.float64)
  mask = np.asarray(visible(jnp.arange(TQ), jnp.arange(TQ), causal))
  want = np.zeros((B, TQ, H, DH))
  for b, (tuples, seen, inverse) in enumerate(_distinct_visible(codes, weights)):
    n = np.bincount(inverse, minlength=len(tuples))
    sums = np.stack([vr[b, seen[inverse == s]].sum(0) for s in range(len(tuples))])
    for h in range(H):
      g = h // (H // HKV)
      s_exact = np.where(mask, qn[b, :, h] @ ke[b, :, g].T / np.sqrt(DH), -np.inf)
      s_codes = qn[b, :, h] @ e[tuples[:, 0]][:, g * DH:(g + 1) * DH].T / np.sqrt(DH) + np.log(n)
      top = np.maximum(s_exact.max(1), s_codes.max(1))[:, None]
      p_exact, p_codes = np.exp(s_exact - top), np.exp(s_codes - top)
      num = p_exact @ ve[b, :, g] + p_codes @ (sums[:, g] / n[:, None])
      want[b, :, h] = num / (p_exact.sum(1) + p_codes.sum(1))[:, None]
  ref = _token_level(*case, causal=causal)
  assert np.max(np.abs(want - np.asarray(ref))) <= ATOL


@pytest.mark.parametrize("groups,codebook_size,pool", [
    (4, 4, None),   # 256 possible tuples for 64 tokens: some repeat
    (4, 16, 5),     # 5 distinct tuples, many repeats
    (32, 16, None),  # 16^32 possible tuples: (almost surely) none repeats
])
def test_groups_equal_token_level(groups, codebook_size, pool):
  case = _case(groups, codebook_size, pool=pool, seed=1, keep=0.9)
  _, collapsed = _check(case, size=ca.enough_slots(TN, groups, codebook_size), causal=True)
  visible_tokens = np.asarray(case[4]).sum(1)
  if pool is not None:
    assert int(collapsed.used.max()) <= pool
  if groups == 32:  # nothing to merge: one slot per visible token
    np.testing.assert_array_equal(collapsed.used, visible_tokens)


def test_slots_hold_the_sorted_tuples_their_counts_and_mean_values():
  case = _case(4, 4, pool=12, seed=2, keep=0.7)
  _, _, _, codes, weights, entries, v_rest = case
  collapsed = jax.jit(ca.collapse, static_argnames="size")(codes, weights, entries, v_rest,
                                                            size=TN)
  for b, (tuples, seen, inverse) in enumerate(_distinct_visible(codes, weights)):
    used = len(tuples)
    n = np.bincount(inverse, minlength=used)
    np.testing.assert_array_equal(collapsed.present[b], np.arange(TN) < used)
    np.testing.assert_allclose(collapsed.log_counts[b, :used], np.log(n), rtol=0, atol=1e-6)
    assert np.all(np.asarray(collapsed.log_counts[b, used:]) <= -1e29)
    keys = vq.decode(jnp.asarray(tuples), entries).reshape(used, HKV, DH)
    np.testing.assert_array_equal(collapsed.keys[b, :used], keys)
    means = np.stack([np.asarray(v_rest)[b, seen[inverse == s]].mean(0) for s in range(used)])
    np.testing.assert_allclose(collapsed.values[b, :used], means, rtol=0, atol=1e-6)


def test_hidden_tokens_are_left_out_and_an_all_hidden_row_sees_its_block_alone():
  q, k_exact, v_exact, codes, weights, entries, v_rest = _case(1, 8, seed=3, keep=0.5)
  weights = weights.at[1].set(0.0)  # example 1 sees no non-local token
  case = (q, k_exact, v_exact, codes, weights, entries, v_rest)
  ours, collapsed = _codebook_centric(*case, size=8, causal=True)
  assert int(collapsed.used[1]) == 0 and not bool(collapsed.present[1].any())
  ref = _token_level(*case, causal=True)
  assert float(jnp.max(jnp.abs(ours - ref))) <= ATOL
  alone = dot_product_attention(q, k_exact, v_exact, q_pos=jnp.arange(TQ),
                                k_pos=jnp.arange(TQ), causal=True)
  assert float(jnp.max(jnp.abs(ours[1] - alone[1]))) <= ATOL
  # a hidden token's codes and values do not matter
  moved = codes.at[0].set(jnp.where(weights[0][:, None] > 0, codes[0], 7))
  noisy = v_rest.at[0].add(jnp.where(weights[0][:, None, None] > 0, 0.0, 100.0))
  again, _ = _codebook_centric(q, k_exact, v_exact, moved, weights, entries, noisy,
                               size=8, causal=True)
  assert float(jnp.max(jnp.abs(again - ours))) <= ATOL


def test_per_example_exact_mask_and_bool_weights():
  """exact_mask [B, Tq, Te] (a key of the own block hidden in one example) and
  weights given as bool."""
  q, k_exact, v_exact, codes, weights, entries, v_rest = _case(4, 4, pool=9, seed=4, keep=0.8)
  mask = jnp.broadcast_to(visible(jnp.arange(TQ), jnp.arange(TQ), True), (B, TQ, TQ))
  mask = mask.at[0, :, 0].set(False).at[0, 0, 0].set(True)  # key 0 seen only by query 0
  ours = jax.jit(lambda *a: ca.attend(*a[:4], ca.collapse(*a[4:], size=TN)))(
      q, k_exact, v_exact, mask, codes, weights > 0, entries, v_rest)
  # token-level by hand: dot_product_attention takes no per-example query mask
  k = jnp.concatenate([vq.decode(codes, entries).reshape(B, TN, HKV, DH), k_exact], axis=1)
  v = jnp.concatenate([v_rest, v_exact], axis=1)
  full = jnp.concatenate([jnp.broadcast_to((weights > 0)[:, None], (B, TQ, TN)), mask], axis=2)
  logits = jnp.where(full[:, None, None], grouped_logits(q, k), MASKED)
  ref = weighted_values(jax.nn.softmax(logits, -1), v).reshape(B, TQ, H, DH)
  assert float(jnp.max(jnp.abs(ours - ref))) <= ATOL


def test_jit_equals_eager():
  case = _case(1, 8, seed=5, keep=0.9)
  q, k_exact, v_exact, codes, weights, entries, v_rest = case
  mask = visible(jnp.arange(TQ), jnp.arange(TQ), True)
  eager = ca.attend(q, k_exact, v_exact, mask, ca.collapse(codes, weights, entries, v_rest,
                                                           size=8))
  jitted, _ = _codebook_centric(*case, size=8, causal=True)
  assert float(jnp.max(jnp.abs(eager - jitted))) <= ATOL


def test_cost_counts_slots_against_tokens():
  assert ca.macs_per_query(exact_tokens=8, keys=64, head_dim=16) == 2 * 16 * 72
  cost = ca.cost(exact_tokens=8, tokens=64, size=8, used=5, head_dim=16)
  assert cost == ca.Cost(2 * 16 * 72, 2 * 16 * 16, 2 * 16 * 13)
  assert ca.enough_slots(64, 1, 8) == 8 and ca.enough_slots(64, 32, 1024) == 64
  assert ca.enough_slots(4, 1, 8) == 4


def test_mismatched_codebook_is_refused():
  _, _, _, codes, weights, entries, v_rest = _case(4, 4)
  with pytest.raises(ValueError, match="cannot decode"):
    ca.collapse(codes[..., :2], weights, entries, v_rest, size=TN)
