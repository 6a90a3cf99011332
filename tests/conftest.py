"""Test set-up: 8 fake XLA CPU devices, requested before jax is imported."""

import os

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="session")
def _codebook_cache(tmp_path_factory):
  """k-means codebooks cache in a per-session folder, never ~/.cache (CLI
  subprocesses inherit it; tests of the cache point it elsewhere)."""
  os.environ["ASTRA_CACHE_DIR"] = str(tmp_path_factory.mktemp("astra_cache"))
