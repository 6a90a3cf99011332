"""A labelled grid of images, written to a PNG (host side: numpy and Pillow).

Layout of ``save_grid(images, path, columns=3, row_labels=..., column_labels=...)``::

    +--------+---------+---------+---------+
    |        | col 0   | col 1   | col 2   |   <- top margin (column labels)
    +--------+---------+---------+---------+
    | row 0  | img 0   | img 1   | img 2   |
    | row 1  | img 3   | img 4   |         |
    +--------+---------+---------+---------+
      ^ left margin (row labels)

Images fill rows of ``columns`` left to right, each upscaled ``scale`` times
(nearest neighbour, so pixels stay sharp), with ``GAP`` white pixels between
cells.  Margins exist only when labels are given, and sit wholly left of and
above the images: the image block always fills the bottom-right corner of the
canvas.  The canvas is RGB on white; one-channel images are shown in gray.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between cells
PAD = 4  # pixels around a label inside its margin
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def to_uint8(images) -> np.ndarray:
  """[N, H, W, C] float in [-1, 1] (clipped) or uint8 -> uint8 RGB [N, H, W, 3]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"save_grid needs images [N, H, W, C] with C = 1 or 3; got shape "
        f"{images.shape} (add a batch axis with x[None], a channel axis with x[..., None])")
  if images.dtype == np.uint8:
    out = images
  elif np.issubdtype(images.dtype, np.floating):
    out = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  else:
    raise ValueError(
        f"save_grid needs float images in [-1, 1] or uint8 images; got dtype "
        f"{images.dtype} (convert with x.astype(np.uint8) or scale to [-1, 1])")
  return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _text_size(font, text: str) -> tuple[int, int]:
  left, top, right, bottom = font.getbbox(text)
  return right - left, bottom - top


def save_grid(images, path, *, columns: int,
              row_labels: Sequence[str] | None = None,
              column_labels: Sequence[str] | None = None,
              scale: int = 2) -> pathlib.Path:
  """Writes ``images`` as a PNG grid at ``path`` (see the module docstring).

  images:        [N, H, W, C], C = 1 or 3; float in [-1, 1] or uint8.
  columns:       images per row; rows = ceil(N / columns).
  row_labels:    one string per row, drawn in a left margin (optional).
  column_labels: one string per column, drawn in a top margin (optional).
  scale:         integer nearest-neighbour upscaling of each image.

  Parent folders are created.  The PNG is written to a temporary file in the
  target folder and moved into place with ``os.replace``, so a crash leaves
  either the old file or the new one, never half a PNG.  Returns the path (a
  ``pathlib.Path``).
  """
  pixels = to_uint8(images)
  n, h, w, _ = pixels.shape
  if n < 1 or columns < 1 or scale < 1:
    raise ValueError(
        f"save_grid needs at least one image, columns >= 1 and scale >= 1; got "
        f"N={n}, columns={columns}, scale={scale}")
  rows = math.ceil(n / columns)
  if row_labels is not None and len(row_labels) != rows:
    raise ValueError(
        f"save_grid got {len(row_labels)} row labels for {rows} rows "
        f"({n} images in rows of {columns}); pass one label per row")
  if column_labels is not None and len(column_labels) != columns:
    raise ValueError(
        f"save_grid got {len(column_labels)} column labels for {columns} columns; "
        f"pass one label per column")

  font = ImageFont.load_default()
  cell_w, cell_h = w * scale, h * scale
  left = top = 0
  if row_labels is not None:
    left = max(_text_size(font, str(t))[0] for t in row_labels) + 2 * PAD
  if column_labels is not None:
    top = max(_text_size(font, str(t))[1] for t in column_labels) + 2 * PAD
  width = left + columns * cell_w + (columns - 1) * GAP
  height = top + rows * cell_h + (rows - 1) * GAP

  canvas = Image.new("RGB", (width, height), BACKGROUND)
  for i in range(n):
    r, c = divmod(i, columns)
    tile = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(tile), "RGB"),
                 (left + c * (cell_w + GAP), top + r * (cell_h + GAP)))
  draw = ImageDraw.Draw(canvas)
  for r, text in enumerate(row_labels or ()):
    _, th = _text_size(font, str(text))
    y = top + r * (cell_h + GAP) + (cell_h - th) // 2
    x0, y0, _, _ = font.getbbox(str(text))
    draw.text((PAD - x0, y - y0), str(text), fill=INK, font=font)
  for c, text in enumerate(column_labels or ()):
    tw, _ = _text_size(font, str(text))
    x = max(0, left + c * (cell_w + GAP) + (cell_w - tw) // 2)
    x0, y0, _, _ = font.getbbox(str(text))
    draw.text((x - x0, PAD - y0), str(text), fill=INK, font=font)

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = None
  try:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".png",
                                     delete=False) as f:
      tmp = f.name
      canvas.save(f, format="PNG")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
    os.replace(tmp, path)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return path
