"""Flash Communication's all-reduce: two low-bit steps instead of one float sum.

The partial sum is cut into P chunks, each quantized group-wise (asymmetric,
``bits`` per value, an fp16 scale and minimum per ``group`` values) and sent
by ``all_to_all`` to the device that owns the chunk; that device dequantizes,
sums and requantizes its chunk, and an ``all_gather`` returns every chunk to
everyone, who dequantizes.  The strategy that uses it is ``FlashSync`` in
``astra_jax.core.sync``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from astra_jax.core import packing


def padded(values: int, mesh_size: int, group: int) -> int:
  unit = mesh_size * group
  return -(-values // unit) * unit


def quantize_groups(x: jnp.ndarray, bits: int):
  """Asymmetric per-group quantization of x [..., group] -> (uint codes, scale, minimum).

  code = round((x - min) / scale) with scale = (max - min) / (2^bits - 1), so
  a value is off by at most scale / 2 (plus fp16 rounding of scale and min).
  """
  lo = jnp.min(x, axis=-1, keepdims=True).astype(jnp.float16)
  hi = jnp.max(x, axis=-1, keepdims=True)
  scale = ((hi - lo.astype(x.dtype)) / (2 ** bits - 1)).astype(jnp.float16)
  safe = jnp.where(scale > 0, scale, jnp.float16(1)).astype(x.dtype)
  codes = jnp.clip(jnp.round((x - lo.astype(x.dtype)) / safe), 0, 2 ** bits - 1)
  return codes.astype(jnp.int32), scale, lo


def dequantize_groups(codes, scale, lo, dtype):
  return codes.astype(dtype) * scale.astype(dtype) + lo.astype(dtype)


def _pack(x, bits, group):
  """[..., group] float -> (uint8 codes [..., group*bits/8], fp16 [..., 2] scale and min)."""
  codes, scale, lo = quantize_groups(x, bits)
  return packing.pack_codes(codes, 2 ** bits), jnp.concatenate([scale, lo], axis=-1)


def _unpack(packed, meta, bits, group, dtype):
  codes = packing.unpack_codes(packed, group, 2 ** bits)
  return dequantize_groups(codes, meta[..., :1], meta[..., 1:], dtype)


def _flash_forward(x, axis_name, bits, group):
  p = jax.lax.axis_size(axis_name)
  n = x.size
  total = padded(n, p, group)
  flat = jnp.pad(x.reshape(-1), (0, total - n))
  chunks = flat.reshape(p, total // (p * group), group)  # chunk j is reduced by device j
  # step 1: every device's chunk j to device j, which dequantizes and sums them
  got = [jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True) for a in _pack(chunks, bits, group)]
  mine = jnp.sum(_unpack(*got, bits, group, x.dtype), axis=0)
  # step 2: the reduced chunk requantized and gathered by everyone
  full = [jax.lax.all_gather(a, axis_name, axis=0, tiled=False, to="invarying")
          for a in _pack(mine, bits, group)]
  return _unpack(*full, bits, group, x.dtype).reshape(-1)[:n].reshape(x.shape)


def all_reduce(x, axis_name, bits, group):
  """Sum over ``axis_name`` through Flash Communication's two quantized steps.

  Gradients pass straight through the quantizers: the cotangent of a sum is
  broadcast back unchanged, as for an exact ``psum``.
  """
  @jax.custom_vjp
  def f(x):
    return _flash_forward(x, axis_name, bits, group)

  def fwd(x):
    return f(x), None

  def bwd(_, g):
    return (jax.lax.pcast(g, axis_name, to="varying"),)

  f.defvjp(fwd, bwd)
  return f(x)

