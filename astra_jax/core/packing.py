"""Bit packing of vector-quantizer codes for the wire.

A token quantized into G groups against a K-entry codebook carries G codes of
b = log2(K) bits each.  ``pack_codes`` lays those G*b bits little-endian into
``ceil(G*b / 8)`` bytes per token, so an ``all_gather`` of the packed array puts
exactly the information (plus at most 7 bits of padding per token) on the wire;
``unpack_codes`` inverts it.  Both are pure ``jax.numpy`` and work for any
power-of-two K from 2 to 2**16 on any backend.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def code_bits(codebook_size: int) -> int:
  """Bits per code for a power-of-two codebook size (K=1024 -> 10)."""
  if (
      not isinstance(codebook_size, int)
      or codebook_size < 2
      or codebook_size > 2**16
      or codebook_size & (codebook_size - 1)
  ):
    raise ValueError(
        f"codebook_size must be a power of two between 2 and 65536, got "
        f"{codebook_size!r}; pick e.g. 256, 1024 or 4096."
    )
  return codebook_size.bit_length() - 1


def packed_bytes(groups: int, codebook_size: int) -> int:
  """Bytes one token occupies on the wire: ceil(G * log2(K) / 8)."""
  return math.ceil(groups * code_bits(codebook_size) / 8)


def pack_codes(codes: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
  """Packs integer codes ``[..., G]`` (values in [0, K)) into uint8 ``[..., nbytes]``."""
  bits = code_bits(codebook_size)
  groups = codes.shape[-1]
  nbytes = packed_bytes(groups, codebook_size)
  codes = codes.astype(jnp.uint32)
  # [..., G, b] -> [..., G*b]: bit j of code g sits at position g*b + j.
  flat = (codes[..., None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
  flat = flat.reshape(*codes.shape[:-1], groups * bits)
  pad = nbytes * 8 - groups * bits
  if pad:
    flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  octets = flat.reshape(*codes.shape[:-1], nbytes, 8)
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(8, dtype=jnp.uint32))
  return jnp.sum(octets * weights, axis=-1).astype(jnp.uint8)


def unpack_codes(packed: jnp.ndarray, groups: int, codebook_size: int) -> jnp.ndarray:
  """Inverse of :func:`pack_codes`: uint8 ``[..., nbytes]`` -> int32 ``[..., G]``."""
  bits = code_bits(codebook_size)
  nbytes = packed_bytes(groups, codebook_size)
  if packed.shape[-1] != nbytes:
    raise ValueError(
        f"packed codes have {packed.shape[-1]} bytes per token, expected {nbytes} "
        f"for G={groups}, K={codebook_size}; sender and receiver disagree on the "
        "quantizer config."
    )
  octets = packed.astype(jnp.uint32)
  flat = (octets[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1
  flat = flat.reshape(*packed.shape[:-1], nbytes * 8)[..., : groups * bits]
  per_code = flat.reshape(*packed.shape[:-1], groups, bits)
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(bits, dtype=jnp.uint32))
  return jnp.sum(per_code * weights, axis=-1).astype(jnp.int32)
