"""Test set-up: 8 fake XLA CPU devices, requested before jax is imported, and
one persistent compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most CLI tests start fresh processes that compile the same tiny programs
# again (an evaluation at mesh 1 and 4, a training step, a decode step); JAX's
# persistent compilation cache lets the second process load what the first
# compiled (test_gpt2_cli.py, one worker: 152 s -> 103 s).  The folder is made
# by the first process that imports this file (pytest's controller, before it
# starts the xdist workers, which inherit it with every CLI subprocess) and
# removed when that process exits; a JAX_COMPILATION_CACHE_DIR already set is
# kept (and left in place).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="astra-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="session")
def _codebook_cache(tmp_path_factory):
  """k-means codebooks cache in a per-session folder, never ~/.cache (CLI
  subprocesses inherit it; tests of the cache point it elsewhere)."""
  os.environ["ASTRA_CACHE_DIR"] = str(tmp_path_factory.mktemp("astra_cache"))


# Files that take a minute or more, started first: pytest-xdist (--dist loadfile)
# hands out whole files in collection order, and a long file picked up last
# leaves the other worker idle at the end (fresh-clone CI, 2 workers: a
# 1.5-minute tail when test_quickstart.py came last).
SLOW_FILES = ("test_multiprocess.py", "test_quickstart.py", "test_bad_input.py",
              "test_gpt2_cli.py", "test_llama_cli.py", "test_pretrained_cli.py",
              "test_vit_cli.py", "test_dit_cli.py", "test_lab_outputs.py", "test_dit.py",
              "test_serve.py", "test_gguf.py", "test_overlap.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
