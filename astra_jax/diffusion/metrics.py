"""Image-quality metrics for generated samples (host side, pure numpy, float64).

The diffusion results table compares generated images with references and
feature sets of generated images with feature sets of real ones:

  * ``psnr``: per-image peak signal-to-noise ratio in dB;
  * ``ssim``: per-image structural similarity (Wang et al. 2004), the same
    numbers as scikit-image's ``structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=..., channel_axis=-1)``;
  * ``frechet_distance``: the Fréchet distance between Gaussians fitted to two
    feature sets (FID when the features come from an Inception network).

Images are [N, H, W, C] arrays.  Generated images live in [-1, 1], so the
default ``data_range`` is 2; pass ``data_range=255`` for uint8 images.  All
arithmetic is float64, so results do not depend on the input dtype.
"""

from __future__ import annotations

import numpy as np

# SSIM constants of Wang et al. (2004)
SSIM_WINDOW = 11  # taps of the Gaussian window: 2 * int(3.5 * sigma + 0.5) + 1
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _image_pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Both arrays as float64 [N, H, W, C]; ValueError naming the fix otherwise."""
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.ndim != 4 or a.shape != b.shape:
    raise ValueError(
        f"{name} needs two image batches of one shape [N, H, W, C]; got {a.shape} "
        f"and {b.shape} (add a batch axis with x[None] for one image)")
  return a, b


def psnr(a, b, data_range: float = 2.0) -> np.ndarray:
  """Per-image PSNR in dB: 10 log10(data_range^2 / MSE), MSE over H, W and C.

  Returns [N] float64.  Identical images (MSE 0) give ``np.inf``; average such
  a column with care (or report the share of exact matches separately).
  """
  a, b = _image_pair(a, b, "psnr")
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(float(data_range) ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The normalized 1-D Gaussian taps [size] (the 2-D window is their outer product)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of [N, H, W, C] by w x w over H and W.

  Out[i, j] = sum_{k, l} w[k] w[l] x[i + k, j + l]: only windows that lie
  wholly inside the image, so no padding convention enters the result.
  """
  k = len(w)
  h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(w[i] * x[:, i:i + h] for i in range(k))
  return sum(w[j] * rows[:, :, j:j + wd] for j in range(k))


def ssim(a, b, data_range: float = 2.0) -> np.ndarray:
  """Per-image SSIM [N] (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5.

  Local means, variances and the covariance are Gaussian-weighted averages
  (population statistics: the weights sum to 1, no n/(n-1) correction).  The
  SSIM map

    ((2 mu_a mu_b + C1)(2 cov_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),

  with C1 = (0.01 R)^2, C2 = (0.03 R)^2 and R = ``data_range``, is taken per
  channel at every position where the window fits inside the image ('valid':
  an H x W image gives (H-10) x (W-10) values) and averaged over positions and
  channels.  This matches scikit-image's Gaussian-weighted SSIM, which filters
  with reflection padding and then crops the 5-pixel border.
  """
  a, b = _image_pair(a, b, "ssim")
  if min(a.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(
        f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its "
        f"window); got {a.shape[1]}x{a.shape[2]} (upsample small images first)")
  w = gaussian_window()
  mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
  var_a = _filter_valid(a * a, w) - mu_a * mu_a
  var_b = _filter_valid(b * b, w) - mu_b * mu_b
  cov = _filter_valid(a * b, w) - mu_a * mu_b
  c1 = (SSIM_K1 * float(data_range)) ** 2
  c2 = (SSIM_K2 * float(data_range)) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
  vals, vecs = np.linalg.eigh((s + s.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(x, y) -> float:
  """Fréchet distance between Gaussians fitted to features x [N, D] and y [M, D].

    d^2 = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)),

  with sample covariances (ddof=1).  S_x S_y is not symmetric, so its square
  root is not taken directly: tr (S_x S_y)^(1/2) equals the sum of the square
  roots of the eigenvalues of the symmetric PSD matrix S_x^(1/2) S_y S_x^(1/2)
  (similar to S_x S_y), computed with ``eigh`` and tiny negative eigenvalues
  (rounding) clipped to 0.  Float64 throughout; the result is clipped at 0,
  since rounding can leave about -1e-13 for two equal sets.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(
        f"frechet_distance needs two feature sets [N, D] and [M, D] of one "
        f"feature size D; got {x.shape} and {y.shape} (flatten features to 2-D "
        f"and take both from the same layer)")
  if len(x) < 2 or len(y) < 2:
    raise ValueError(
        f"frechet_distance needs at least 2 samples per set to estimate a "
        f"covariance; got N={len(x)} and M={len(y)} (pass more samples)")
  mean_term = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
  sx = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
  sy = np.atleast_2d(np.cov(y, rowvar=False, ddof=1))
  root_x = _sqrt_psd(sx)
  m = root_x @ sy @ root_x
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  trace_root = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  d = mean_term + float(np.trace(sx) + np.trace(sy)) - 2.0 * trace_root
  return max(d, 0.0)
