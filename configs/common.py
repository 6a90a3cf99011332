"""Pieces shared by the configs."""

import ml_collections


def vq_defaults() -> ml_collections.ConfigDict:
  """ASTRA's grouped VQ exchange: G=32 groups, K=1024 entries (10 bits), commitment
  2.5e-4 (ASTRA's best was 1e-4..5e-4), noise lambda 1.0, EMA codebooks."""
  return ml_collections.ConfigDict(dict(
      groups=32, codebook_size=1024, commitment=2.5e-4, noise_scale=1.0,
      ema_decay=0.99, dead_threshold=0.01))
