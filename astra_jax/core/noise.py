"""Noise-augmented quantization (training only).

ASTRA adds Gaussian noise, shaped like the quantization residual, to the
decoded non-local K/V while fine-tuning, so the model learns to tolerate codes
that are a little off.  The noise of group g has std ``scale * sqrt(var_g)``,
where ``var_g`` is the running mean squared residual kept in the codebook
(``Codebook.resid_var``).  At inference the exchange never calls this; with
``scale == 0`` it returns its input unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from astra_jax.core.quantizer import merge_groups, split_groups


def residual_noise(key: jax.Array, decoded: jnp.ndarray, resid_var: jnp.ndarray,
                   scale: float) -> jnp.ndarray:
  """Returns ``decoded`` [..., D] plus N(0, scale^2 * resid_var[g]) per group g."""
  if scale == 0:
    return decoded
  groups = resid_var.shape[0]
  std = scale * jnp.sqrt(jax.lax.stop_gradient(resid_var))[:, None]  # [G, 1]
  eps = jax.random.normal(key, split_groups(decoded, groups).shape, decoded.dtype)
  return decoded + merge_groups(eps * std.astype(decoded.dtype))
