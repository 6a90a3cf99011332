"""A content-addressed disk cache for k-means codebooks (``astra_jax.run.calibrate``).

k-means on a pretrained model's K/V takes minutes, and zero-shot ASTRA, a
fine-tuning start and every row of a results table repeat it with the same
inputs.  The result is stored once under a hash of everything it depends on:

  - the code: a format version, the jax version, the backend platform, the
    matmul precision and x64 flags, and a digest of the sources that turn
    weights and inputs into codebooks (``astra_jax/core``, ``astra_jax/models``,
    this module and ``calibrate``: an edited model or quantizer never reuses
    an old result);
  - the model: its class, its config without the exchange (rope, norms, sizes)
    and every ``nnx.Param``'s path, dtype, shape and bytes;
  - the calibration inputs actually fed (each batch's arrays: dtype, shape,
    bytes), ``max_tokens``, ``iters`` and the PRNG key's bits;
  - each layer's exchange (groups, codebook_size) and codebook layout.

The value is ``<folder>/codebooks/<sha256>.npz`` holding every layer's
``VQState`` arrays (``{layer}.{k|v}.{field}``, written with numpy through a
temporary file and ``os.replace``, so a reader never sees half a file).

The folder is ``$ASTRA_CACHE_DIR`` if set, else ``~/.cache/astra_jax``;
``ASTRA_CACHE_DIR=off`` turns the cache off (an empty value counts as unset).
A file that cannot be read back as the codebooks this model expects (corrupt,
truncated, other layer count or shapes) prints one ``warning:`` line and is
recomputed and overwritten; an unwritable folder prints one ``warning:`` line
and the run goes on without the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core import quantizer as vq
from astra_jax.core.exchange import VQState

ENV = "ASTRA_CACHE_DIR"
OFF = "off"
FORMAT = 1  # bump when the file layout or the meaning of the key changes
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # astra_jax/


def folder() -> str | None:
  """The codebook cache folder, or None when ``ASTRA_CACHE_DIR=off``."""
  base = os.environ.get(ENV, "")
  if base.strip().lower() == OFF:
    return None
  base = base or os.path.join(os.path.expanduser("~"), ".cache", "astra_jax")
  return os.path.join(base, "codebooks")


def path_for(digest: str) -> str | None:
  """Where the codebooks of ``digest`` live (None: the cache is off)."""
  where = folder()
  return None if where is None else os.path.join(where, f"{digest}.npz")


class _Hasher:
  """sha256 over a sequence of tagged texts and arrays (dtype, shape and bytes)."""

  def __init__(self):
    self._h = hashlib.sha256()

  def text(self, tag: str, value) -> None:
    data = str(value).encode()
    self._h.update(f"{tag}:{len(data)}:".encode() + data)

  def array(self, tag: str, value) -> None:
    a = np.ascontiguousarray(np.asarray(value))
    self.text(tag, f"{a.dtype.str}{a.dtype.name}{a.shape}")
    self._h.update(a.reshape(-1).view(np.uint8).data)

  def hexdigest(self) -> str:
    return self._h.hexdigest()


# the code between (weights, batches) and codebooks: the models' forward, the method
# (attention, exchanges, quantizer) and the recording and fitting here
_SOURCES = ("core/**/*.py", "models/**/*.py", "run/calibrate.py", "run/codebook_cache.py")


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
  h = hashlib.sha256()
  for path in sorted({p for pattern in _SOURCES for p in _PACKAGE.glob(pattern)}):
    h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def _config_text(model: nnx.Module) -> str:
  """The model's architecture: its config without the exchange (the exchange does
  not change the exact K/V recorded on one device; (G, K) enter the key per layer)."""
  cfg = getattr(model, "cfg", None)
  if dataclasses.is_dataclass(cfg):
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name != "exchange"}
    return f"{type(cfg).__qualname__}{sorted(fields.items())}"
  return repr(cfg)


def key(model: nnx.Module, batches: list[tuple], rng_key: jax.Array, *, max_tokens: int,
        iters: int, layers: list) -> str | None:
  """The hex sha256 naming the codebooks k-means fits from these inputs (None when
  the weights are spread over other processes: this one cannot read them all).

  ``layers``: the model's attention layers (their exchange and current state
  give (G, K) and the codebook layout).
  """
  params = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  if not all(getattr(leaf, "is_fully_addressable", True) for _, leaf in params):
    return None
  h = _Hasher()
  h.text("format", FORMAT)
  h.text("jax", jax.__version__)
  h.text("platform", jax.default_backend())
  h.text("precision", jax.config.jax_default_matmul_precision)
  h.text("x64", jax.config.jax_enable_x64)
  h.text("source", _source_digest())
  h.text("model", f"{type(model).__module__}.{type(model).__qualname__}")
  h.text("config", _config_text(model))
  h.text("params", len(params))
  for path, leaf in params:
    h.array(jax.tree_util.keystr(path), leaf)
  h.text("batches", len(batches))
  for i, batch in enumerate(batches):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    h.text(f"batch {i}", treedef)
    for j, leaf in enumerate(leaves):
      h.array(f"batch {i}.{j}", leaf)
  h.text("max_tokens", max_tokens)
  h.text("iters", iters)
  typed = jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key)
  h.text("key impl", str(jax.random.key_impl(rng_key)) if typed else "raw")
  h.array("key", jax.random.key_data(rng_key) if typed else rng_key)
  h.text("layers", len(layers))
  for i, layer in enumerate(layers):
    ex = layer.exchange
    h.text(f"layer {i}", (ex.groups, ex.codebook_size, _layout(layer.state.get_value())))
  return h.hexdigest()


def _layout(state: VQState) -> list:
  return [(a.shape, str(a.dtype)) for a in jax.tree.leaves(state)]


def _names(layer: int) -> list[str]:
  return [f"{layer}.{kv}.{field}" for kv in VQState._fields for field in vq.Codebook._fields]


def load(path: str, like: list[VQState]) -> list[VQState] | None:
  """The cached per-layer codebooks at ``path``, shaped as ``like``; None when
  there is no file, or (with one warning) when it does not hold exactly that."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as saved:
      want = [name for i in range(len(like)) for name in _names(i)]
      if sorted(saved.files) != sorted(want):
        raise ValueError(f"it holds {len(saved.files)} arrays, this model's {len(like)} "
                         f"layers need {len(want)}")
      states = []
      for i, state in enumerate(like):
        leaves = jax.tree.leaves(state)
        arrays = [saved[name] for name in _names(i)]
        for name, leaf, a in zip(_names(i), leaves, arrays):
          if a.shape != leaf.shape or a.dtype != leaf.dtype:
            raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, the model needs "
                             f"{leaf.dtype}{list(leaf.shape)}")
        states.append(jax.tree.unflatten(jax.tree.structure(state),
                                         [jnp.asarray(a) for a in arrays]))
      return states
  except Exception as e:  # noqa: BLE001 -- whatever is wrong with the file, recompute
    warn(f"codebook cache file {path} is unreadable ({type(e).__name__}: {e}); "
         "recomputing k-means and overwriting it")
    return None


def save(path: str, states: list[VQState]) -> bool:
  """Writes ``states`` to ``path`` atomically; False (with one warning) on failure."""
  arrays = {name: np.asarray(a) for i, state in enumerate(states)
            for name, a in zip(_names(i), jax.tree.leaves(state))}
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".tmp-",
                                     suffix=".npz", delete=False) as f:
      tmp = f.name
      np.savez(f, **arrays)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
    os.replace(tmp, path)
    return True
  except OSError as e:
    warn(f"cannot write the codebook cache {path} ({e.strerror or e}); continuing "
         f"without it (set {ENV} to a writable folder, or {ENV}=off)")
    if tmp is not None and os.path.exists(tmp):
      try:
        os.remove(tmp)
      except OSError:
        pass
    return False


def say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def note(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)
