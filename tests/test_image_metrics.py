"""Image metrics and the PNG grid of ``astra_jax.diffusion``, against references
written here a different way: SSIM by a double loop over every valid 11x11
window with explicit 2-D Gaussian weights and centred moments, and by
scikit-image's own recipe (reflect-padded ``scipy.ndimage.gaussian_filter``,
then a 5-pixel crop); PSNR from its definition; the Fréchet distance with
``scipy.linalg.sqrtm`` of the (non-symmetric) covariance product.
"""

import math
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
from PIL import Image

from astra_jax.diffusion import grid
from astra_jax.diffusion import metrics

RTOL = 1e-6


def _pair(shape, seed=0, noise=0.3):
  """A smooth image batch in [-1, 1] and a noisy copy (so SSIM is far from 0 and 1)."""
  rng = np.random.default_rng(seed)
  n, h, w, c = shape
  yy, xx = np.meshgrid(np.linspace(0, 3, h), np.linspace(0, 3, w), indexing="ij")
  base = np.stack([np.sin(xx * (k + 1) + yy * (i + 1) + rng.uniform(0, 6))
                   for i in range(n) for k in range(c)], -1)
  a = 0.8 * base.reshape(h, w, n, c).transpose(2, 0, 1, 3)
  b = np.clip(a + noise * rng.standard_normal(a.shape), -1, 1)
  return a, b


# ------------------------------------------------------------------ PSNR


def _psnr_reference(a, b, data_range):
  out = []
  for x, y in zip(a, b):
    sq = 0.0
    for v, u in zip(x.ravel().tolist(), y.ravel().tolist()):
      sq += (v - u) ** 2
    mse = sq / x.size
    out.append(20 * math.log10(data_range) - 10 * math.log10(mse))
  return np.array(out)


def test_psnr_matches_its_definition():
  a, b = _pair((3, 9, 7, 3))
  np.testing.assert_allclose(metrics.psnr(a, b), _psnr_reference(a, b, 2.0), rtol=RTOL)
  np.testing.assert_allclose(metrics.psnr(a, b, data_range=1.0),
                             _psnr_reference(a, b, 1.0), rtol=RTOL)


def test_psnr_known_value_and_identical_images():
  a = np.zeros((2, 4, 4, 1))
  b = a + np.array([0.1, 0.0])[:, None, None, None]  # MSE 0.01 for image 0, 0 for image 1
  out = metrics.psnr(a, b)
  assert out.shape == (2,)
  assert out[0] == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-12)  # 26.02 dB
  assert out[1] == np.inf


def test_psnr_of_uint8_images_is_computed_without_wraparound():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  as_float = metrics.psnr(a / 127.5 - 1, b / 127.5 - 1, data_range=2.0)
  np.testing.assert_allclose(metrics.psnr(a, b, data_range=255), as_float, rtol=1e-12)


# ------------------------------------------------------------------ SSIM


def _ssim_reference_loop(a, b, data_range):
  """Every valid 11x11 window, 2-D Gaussian weights, centred moments."""
  r = np.arange(11) - 5.0
  weights = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
  weights /= weights.sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for x, y in zip(a, b):
    values = []
    for ch in range(x.shape[2]):
      for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
          px, py = x[i:i + 11, j:j + 11, ch], y[i:i + 11, j:j + 11, ch]
          mx, my = (weights * px).sum(), (weights * py).sum()
          vx = (weights * (px - mx) ** 2).sum()
          vy = (weights * (py - my) ** 2).sum()
          cxy = (weights * (px - mx) * (py - my)).sum()
          values.append((2 * mx * my + c1) * (2 * cxy + c2)
                        / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    out.append(np.mean(values))
  return np.array(out)


def _ssim_reference_skimage_recipe(a, b, data_range):
  """scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False): reflect-padded filtering, crop 5, mean, per channel."""
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for x, y in zip(a, b):
    per_channel = []
    for ch in range(x.shape[2]):
      f = lambda z: scipy.ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")
      px, py = x[..., ch], y[..., ch]
      ux, uy = f(px), f(py)
      vx, vy, vxy = f(px * px) - ux * ux, f(py * py) - uy * uy, f(px * py) - ux * uy
      s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
      per_channel.append(s[5:-5, 5:-5].mean())
    out.append(np.mean(per_channel))
  return np.array(out)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (1, 20, 17, 1)])
def test_ssim_matches_a_per_window_loop(shape):
  a, b = _pair(shape, seed=2)
  got = metrics.ssim(a, b)
  assert got.shape == (shape[0],)
  assert np.all((got > 0.05) & (got < 0.95))  # a non-trivial comparison
  np.testing.assert_allclose(got, _ssim_reference_loop(a, b, 2.0), rtol=RTOL)
  np.testing.assert_allclose(metrics.ssim(a, b, data_range=1.0),
                             _ssim_reference_loop(a, b, 1.0), rtol=RTOL)


def test_ssim_matches_the_scikit_image_recipe_on_28x28():
  a, b = _pair((3, 28, 28, 3), seed=3)
  np.testing.assert_allclose(metrics.ssim(a, b), _ssim_reference_skimage_recipe(a, b, 2.0),
                             rtol=RTOL)


def test_ssim_of_identical_images_is_one():
  a, _ = _pair((2, 28, 28, 3), seed=4)
  np.testing.assert_allclose(metrics.ssim(a, a), 1.0, rtol=1e-12)
  assert np.all(metrics.psnr(a, a) == np.inf)


def test_ssim_and_psnr_fall_as_noise_grows():
  a, _ = _pair((1, 28, 28, 3), seed=5)
  noise = np.random.default_rng(6).standard_normal(a.shape)
  levels = [0.01, 0.05, 0.1, 0.3, 1.0]
  s = [metrics.ssim(a, a + level * noise)[0] for level in levels]
  p = [metrics.psnr(a, a + level * noise)[0] for level in levels]
  assert all(x > y for x, y in zip(s, s[1:])), s
  assert all(x > y for x, y in zip(p, p[1:])), p
  assert s[0] > 0.99 and s[-1] < 0.2


# ------------------------------------------------------------------ Fréchet


def _frechet_reference(x, y):
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(sx @ sy)
  return float(np.sum((x.mean(0) - y.mean(0)) ** 2)
               + np.trace(sx) + np.trace(sy) - 2 * np.trace(root).real)


def test_frechet_matches_scipy_sqrtm():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((60, 8)) @ rng.standard_normal((8, 8))
  y = 0.5 + rng.standard_normal((50, 8)) @ rng.standard_normal((8, 8))
  got = metrics.frechet_distance(x, y)
  assert isinstance(got, float)
  assert got == pytest.approx(_frechet_reference(x, y), rel=RTOL)


def test_frechet_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(8).standard_normal((40, 16)).astype(np.float32)
  assert abs(metrics.frechet_distance(x, x)) < 1e-9


def test_frechet_with_equal_covariances_is_the_squared_mean_difference():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((30, 5)) @ rng.standard_normal((5, 5))
  shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
  assert metrics.frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=RTOL)


def test_frechet_with_one_feature_and_rank_deficient_covariances():
  rng = np.random.default_rng(10)
  x, y = rng.standard_normal((20, 1)), 2.0 * rng.standard_normal((25, 1)) + 1
  sx, sy = x.var(ddof=1), y.var(ddof=1)
  expected = (x.mean() - y.mean()) ** 2 + sx + sy - 2 * math.sqrt(sx * sy)
  assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=RTOL)
  few = rng.standard_normal((4, 10))  # 4 samples in 10-D: covariance of rank 3
  assert metrics.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, fragment", [
    (lambda: metrics.psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 1))), "one shape"),
    (lambda: metrics.psnr(np.zeros((8, 8, 3)), np.zeros((8, 8, 3))), "x[None]"),
    (lambda: metrics.ssim(np.zeros((1, 16, 16, 3)), np.zeros((2, 16, 16, 3))), "one shape"),
    (lambda: metrics.ssim(np.zeros((1, 10, 16, 3)), np.zeros((1, 10, 16, 3))), "11x11"),
    (lambda: metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))), "feature size"),
    (lambda: metrics.frechet_distance(np.zeros(5), np.zeros(5)), "[N, D]"),
    (lambda: metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3))), "at least 2"),
    (lambda: metrics.frechet_distance(np.zeros((5, 3)), np.zeros((1, 3))), "at least 2"),
    (lambda: grid.save_grid(np.zeros((2, 4, 4, 2)), "unused.png", columns=2), "C = 1 or 3"),
    (lambda: grid.save_grid(np.zeros((2, 4, 4, 3), np.int32), "unused.png", columns=2), "dtype"),
    (lambda: grid.save_grid(np.zeros((3, 4, 4, 3)), "unused.png", columns=2,
                            row_labels=["one"]), "row labels"),
    (lambda: grid.save_grid(np.zeros((3, 4, 4, 3)), "unused.png", columns=2,
                            column_labels=["a", "b", "c"]), "column labels"),
])
def test_bad_shapes_raise_one_line_value_errors(call, fragment):
  with pytest.raises(ValueError) as err:
    call()
  assert fragment in str(err.value)
  assert "\n" not in str(err.value)


# ------------------------------------------------------------------ grid


def _read(path):
  with Image.open(path) as im:
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB"))


def test_save_grid_places_each_uint8_image_at_its_cell(tmp_path):
  rng = np.random.default_rng(11)
  images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  path = tmp_path / "nested" / "folder" / "grid.png"
  assert grid.save_grid(images, str(path), columns=3, scale=2) == path
  out = _read(path)
  # 3 columns of 6*2 px and 2 rows of 4*2 px, 2-px gaps between cells
  assert out.shape == (2 * 8 + 2, 3 * 12 + 2 * 2, 3)
  for i, image in enumerate(images):
    r, c = divmod(i, 3)
    cell = out[r * 10:r * 10 + 8, c * 14:c * 14 + 12]
    np.testing.assert_array_equal(cell[::2, ::2], image)
    np.testing.assert_array_equal(cell, image.repeat(2, 0).repeat(2, 1))
  assert np.all(out[8:10] == 255) and np.all(out[:, 12:14] == 255)  # gaps
  assert np.all(out[10:, 28:] == 255)  # the sixth cell is empty
  assert os.listdir(path.parent) == ["grid.png"]  # no temporary file left behind


def test_save_grid_gray_floats_and_labels(tmp_path):
  images = np.full((4, 5, 5, 1), -1.0)
  images[:, 1:4, 1:4] = 1.0
  images[:, 2, 2] = 0.5
  plain = _read(grid.save_grid(images, tmp_path / "plain.png", columns=2, scale=1))
  assert plain.shape == (2 * 5 + 2, 2 * 5 + 2, 3)
  labelled = _read(grid.save_grid(images, tmp_path / "labelled.png", columns=2, scale=1,
                                  row_labels=["step 10", "step 100"],
                                  column_labels=["euler", "heun"]))
  top = labelled.shape[0] - plain.shape[0]
  left = labelled.shape[1] - plain.shape[1]
  assert top > 0 and left > 0
  # the image block fills the bottom-right corner, unchanged by the margins
  np.testing.assert_array_equal(labelled[top:, left:], plain)
  expected = np.round((images[0, ..., 0] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(plain[:5, :5, 0], expected)
  assert plain[2, 2, 0] == 191 and np.all(plain[:5, :5, 0] == plain[:5, :5, 2])
  # the labels leave ink in both margins
  assert labelled[top:, :left].min() < 128 and labelled[:top, left:].min() < 128


def test_save_grid_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
  path = tmp_path / "grid.png"
  grid.save_grid(np.zeros((1, 4, 4, 3), np.uint8), path, columns=1)
  before = path.read_bytes()

  def broken_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG half")
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    grid.save_grid(np.full((2, 4, 4, 3), 255, np.uint8), path, columns=2)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["grid.png"]
