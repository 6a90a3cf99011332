"""Scaled dot-product attention on arrays one device holds.

The math every attention path shares, with no mesh and no exchange in it:
``dot_product_attention`` (softmax over all keys at once, as the gathering
exchanges use it) and the pieces it is made of, which ring attention
(``astra_jax.core.ring``) folds block by block:

  grouped_logits   s = q k^T / sqrt(Dh), float32, query heads grouped over K/V heads
  visible          which keys each query may see (causal: k_pos <= q_pos)
  weighted_values  sum_j w_j v_j, accumulated in float32

Grouped-query attention: with H query heads and Hkv K/V heads (H % Hkv == 0),
query head h = g R + r (R = H / Hkv) uses K/V head g.  Logits are laid out
[B, Hkv, R, Tq, Tk]; masked logits are set to ``MASKED`` (not -inf, so a row
with no visible key stays finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30


def grouped_logits(q, k) -> jnp.ndarray:
  """q [B, Tq, H, Dh], k [B, Tk, Hkv, Dh] -> float32 logits [B, Hkv, R, Tq, Tk]."""
  b, tq, h, dh = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"{h} query heads cannot share {hkv} K/V heads; H must be a multiple of Hkv")
  qg = q.reshape(b, tq, hkv, h // hkv, dh)
  # No upcast of k here: XLA would hoist the convert above the exchange's
  # collective and put float32 on the wire; accumulate in float32 through the dot.
  return jnp.einsum("bqkrd,bskd->bkrqs", qg, k.astype(q.dtype),
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dh))


def visible(q_pos, k_pos, causal: bool) -> jnp.ndarray:
  """[Tq, Tk] bool: key j is visible to query i (causal: k_pos[j] <= q_pos[i])."""
  if causal:
    return k_pos[None, :] <= q_pos[:, None]
  return jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)


def weighted_values(weights, v) -> jnp.ndarray:
  """weights [B, Hkv, R, Tq, Tk] (any scale), v [B, Tk, Hkv, Dh] -> float32 [B, Tq, Hkv, R, Dh].

  The weights meet V in V's dtype; the sum accumulates in float32.
  """
  return jnp.einsum("bkrqs,bskd->bqkrd", weights.astype(v.dtype), v,
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def dot_product_attention(q, k, v, *, q_pos, k_pos, causal: bool,
                          kv_valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax attention with position-based causal masking.

  q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh] with H % Hkv == 0.
  q_pos [Tq], k_pos [Tk]: global positions; kv_valid [B, Tk] optional mask.
  Dots accumulate in float32; logits and softmax are float32; the weights
  meet V in V's dtype.
  """
  b, tq, h, dh = q.shape
  mask = visible(q_pos, k_pos, causal)[None, None, None]
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, None, None, :]
  logits = jnp.where(mask, grouped_logits(q, k), MASKED)
  out = weighted_values(jax.nn.softmax(logits, axis=-1), v)
  return out.reshape(b, tq, h, dh).astype(q.dtype)
