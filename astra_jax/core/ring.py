"""Ring attention: exact sequence-parallel attention, K/V passed around the mesh.

Each of the P devices holds Tl = private + Ts local tokens: ``private``
per-device tokens (ViT's class token) and Ts shared ones (device i's block of
the T = P Ts shared tokens).  Instead of gathering every device's K/V and then
attending (the ``exact`` exchange), the shared K/V blocks travel around a ring
(cf. Liu et al., "Ring Attention with Blockwise Transformers", 2023):

  step 0      device i attends to its own tokens (private ones included)
  step s      every device forwards the block it holds to device i + 1
  (1..P-1)    (one ``ppermute`` of K and one of V) and attends to the block
              it receives: device (i - s) mod P's

so after P - 1 steps every device has seen every shared block once, and each
device has sent P - 1 blocks of K and of V: the bytes an all-gather moves,
in neighbour-to-neighbour messages.  The loop over steps is a Python loop (P
is static): collectives inside an XLA loop could not be counted by
``astra_jax.netsim.traffic``.

Attention over the blocks is the blockwise ("online", flash) softmax.  With
s_j the logits of one block's keys and v_j its values, a running max m, sum l
and accumulator a (all float32) fold in each block:

  m' = max(m, max_j s_j)
  l' = l e^(m - m') + sum_j e^(s_j - m')
  a' = a e^(m - m') + sum_j e^(s_j - m') v_j          out = a / l

which equals softmax(s) v over all blocks at once for any choice of m, so m
is held constant under differentiation.  The local block comes first: for
causal attention it holds every query's own (diagonal) key, so m is a real
logit before any block of a later device arrives; those are fully masked
(-1e30) and add e^(-1e30 - m) = 0.  The device index is dynamic under
``shard_map``, so such blocks are masked, not skipped, as the dense path
computes masked logits too.

Positions are those of ``attention.attend``: queries at i Tl + [0, Tl), the
private keys first at [0, private), then shared block j at private + j Ts +
[0, Ts).  ``key_transform`` (RoPE) rotates each block at its own positions
once it arrives, so keys cross the ring as the model produced them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from astra_jax.core.dot_product import MASKED, grouped_logits, visible, weighted_values


class Block(NamedTuple):
  """One shared K/V block as it reached this device, and whose it is."""

  source: jnp.ndarray  # device index (int32 scalar; traced under shard_map)
  k: jnp.ndarray       # [B, Ts, Hkv, Dh]
  v: jnp.ndarray


def circulate(k, v, axis_name: str | None) -> list[Block]:
  """This device's shared K/V, then the P - 1 blocks the ring brings it, in step order.

  Step s holds device (i - s) mod P's block; each step forwards the previous
  one's block to device i + 1 (2 ``ppermute`` per step, none at step 0).
  """
  if axis_name is None:
    return [Block(jnp.int32(0), k, v)]
  size, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  to_next = [(j, (j + 1) % size) for j in range(size)]
  blocks = [Block(index, k, v)]
  for step in range(1, size):
    k, v = (jax.lax.ppermute(x, axis_name, to_next) for x in (k, v))
    blocks.append(Block((index - step) % size, k, v))
  return blocks


def place(blocks: list[Block]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The whole shared K and V [B, P Ts, Hkv, Dh] in device order, each block at its source's slot."""
  ts = blocks[0].k.shape[1]

  def one(parts):
    full = jnp.zeros((parts[0].shape[0], len(parts) * ts, *parts[0].shape[2:]), parts[0].dtype)
    for block, x in zip(blocks, parts):
      full = jax.lax.dynamic_update_slice_in_dim(full, x, block.source * ts, axis=1)
    return full

  return one([b.k for b in blocks]), one([b.v for b in blocks])


class Running(NamedTuple):
  """Online-softmax state over the keys seen so far (module docstring)."""

  max: jnp.ndarray  # m [B, Hkv, R, Tq], float32, no gradient
  sum: jnp.ndarray  # l [B, Hkv, R, Tq]
  acc: jnp.ndarray  # a [B, Tq, Hkv, R, Dh]


def _per_query(x):
  """[B, Hkv, R, Tq] -> [B, Tq, Hkv, R, 1], to scale the accumulator."""
  return jnp.moveaxis(x, -1, 1)[..., None]


def fold(run: Running | None, q, k, v, mask, bias=None) -> Running:
  """Folds one block of keys k, values v [B, Tk, Hkv, Dh] into ``run``; ``mask``:
  the visible keys, [Tq, Tk] (every example) or [B, Tq, Tk].  ``bias`` [B, Tk]
  (float32, optional): added to every query's logit of each key before the
  softmax (``code_attention``: log n for a key that stands for n tokens)."""
  mask = mask[None] if mask.ndim == 2 else mask
  logits = grouped_logits(q, k)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[:, None, None, None, :]
  logits = jnp.where(mask[:, None, None], logits, MASKED)
  block_max = logits.max(axis=-1)
  new_max = jax.lax.stop_gradient(
      block_max if run is None else jnp.maximum(run.max, block_max))
  weights = jnp.exp(logits - new_max[..., None])
  total, acc = weights.sum(axis=-1), weighted_values(weights, v)
  if run is None:
    return Running(new_max, total, acc)
  scale = jnp.exp(run.max - new_max)
  return Running(new_max, run.sum * scale + total, run.acc * _per_query(scale) + acc)


def finish(run: Running, dtype) -> jnp.ndarray:
  """a / l -> attention output [B, Tq, H, Dh] in ``dtype``."""
  out = run.acc / _per_query(run.sum)
  b, tq, hkv, r, dh = out.shape
  return out.reshape(b, tq, hkv * r, dh).astype(dtype)


def ring_attention(q, k, v, *, causal: bool, axis_name: str | None, private: int = 0,
                   query_transform: Callable | None = None,
                   key_transform: Callable | None = None):
  """This device's queries against the whole sequence, K/V arriving around the ring.

  q: [B, Tl, H, Dh], k/v: [B, Tl, Hkv, Dh], the first ``private`` tokens never
  sent.  Returns (output [B, Tl, H, Dh], shared K, shared V [B, P Ts, Hkv, Dh]
  as this device received them, untransformed, in device order).
  """
  tl, ts = q.shape[1], q.shape[1] - private
  index = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  q_pos = index * tl + jnp.arange(tl)
  if query_transform is not None:
    q = query_transform(q, q_pos)
  blocks = circulate(k[:, private:], v[:, private:], axis_name)
  run = None
  for step, block in enumerate(blocks):
    kb, vb = block.k, block.v
    k_pos = private + block.source * ts + jnp.arange(ts)
    if step == 0:  # private tokens take part in the local step only
      kb, vb = k, v
      k_pos = jnp.concatenate([jnp.arange(private), k_pos])
    if key_transform is not None:
      kb = key_transform(kb, k_pos)
    run = fold(run, q, kb, vb, visible(q_pos, k_pos, causal))
  return (finish(run, q.dtype), *place(blocks))
