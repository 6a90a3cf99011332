"""Rectified flow (flow matching with straight paths): the objective and the
deterministic Euler sampler, as pure functions.

A data image x0 and Gaussian noise e are joined by the straight path
x_t = (1 - t) x0 + t e, t in [0, 1]; the model learns the velocity
v = dx_t/dt = e - x0 (a mean-squared error).  Sampling integrates
dx/dt = v from pure noise at t = 1 down to t = 0 with Euler steps on a
uniform grid: deterministic, so the same noise and labels give the same
images on one device and on a mesh, which is what the quality metrics of
``infer.results dit`` compare.  Classifier-free guidance mixes the
conditional and unconditional velocities: v_u + s (v_c - v_u) (s = 1: the
conditional model alone; s = 0: unconditional).
"""

from __future__ import annotations

import numpy as np


def noisy(x0, noise, t):
  """x_t for images (or patches) [B, ...] and times t [B]."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1 - t) * x0 + t * noise


def velocity(x0, noise):
  """The regression target of the model at every t: e - x0."""
  return noise - x0


def train_times(rng: np.random.Generator, batch: int) -> np.ndarray:
  """Training times t [B] (float32): logit-normal(0, 1), which weights the
  middle of the path where the velocity is hardest to predict (Esser et al.
  2024, rectified-flow transformers)."""
  return (1 / (1 + np.exp(-rng.standard_normal(batch)))).astype(np.float32)


def time_grid(steps: int) -> np.ndarray:
  """The sampler's times, [steps + 1] from 1 (noise) to 0 (image)."""
  if steps < 1:
    raise ValueError(f"a sampler needs at least 1 step, got {steps}: pass --steps 1 or more")
  return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def guided(v_cond, v_uncond, scale: float):
  """Classifier-free guidance: v_u + s (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def euler(x, v, t: float, t_next: float):
  """One Euler step of dx/dt = v from t to t_next (t_next < t)."""
  return x + (t_next - t) * v
