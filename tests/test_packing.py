import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astra_jax.core import packing


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("groups", [1, 3, 32])
def test_round_trip_every_power_of_two(bits, groups):
  size = 2**bits
  rng = np.random.default_rng(bits * 100 + groups)
  codes = rng.integers(0, size, (2, 5, groups))
  codes[0, 0] = size - 1  # extremes survive
  codes[0, 1] = 0
  packed = packing.pack_codes(jnp.asarray(codes), size)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (2, 5, math.ceil(groups * bits / 8))
  back = packing.unpack_codes(packed, groups, size)
  np.testing.assert_array_equal(np.asarray(back), codes)


def test_wire_size_is_g_times_bits():
  assert packing.packed_bytes(32, 1024) == 40  # 320 bits, no padding
  assert packing.packed_bytes(1, 1024) == 2  # 10 bits -> 2 bytes
  assert packing.packed_bytes(3, 8) == 2  # 9 bits -> 2 bytes


def test_layout_is_little_endian_bits():
  # two 4-bit codes 0x3, 0xA -> one byte 0xA3
  packed = packing.pack_codes(jnp.array([[3, 10]]), 16)
  assert int(packed[0, 0]) == 0xA3


def test_packing_jits():
  f = jax.jit(lambda c: packing.unpack_codes(packing.pack_codes(c, 1024), 4, 1024))
  c = jnp.array([[1, 1023, 512, 7]])
  np.testing.assert_array_equal(np.asarray(f(c)), np.asarray(c))


@pytest.mark.parametrize("size", [0, 1, 3, 1000, 2**17])
def test_bad_codebook_size(size):
  with pytest.raises(ValueError, match="power of two"):
    packing.code_bits(size)


def test_unpack_rejects_wrong_width():
  with pytest.raises(ValueError, match="disagree"):
    packing.unpack_codes(jnp.zeros((1, 3), jnp.uint8), 32, 1024)
