"""DiT on images: model from a config, training batches, sampling, k-means codebooks.

The images are scaled to [-1, 1] and padded with -1 (black) to the config's
``image_size`` (Fashion-MNIST 28x28 -> 32x32, so 4x4 patches make an 8x8
grid that splits into equal bands of rows over 1, 2, 4 or 8 devices).
Training is the flow-matching regression of ``astra_jax.diffusion.flow`` with
the class replaced by the null class for ``class_dropout`` of the examples
(classifier-free guidance); every batch is a pure function of the step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from astra_jax.core import exchange as exchange_lib
from astra_jax.data import images as data
from astra_jax.diffusion import flow, sample
from astra_jax.models import dit
from astra_jax.netsim import traffic
from astra_jax.parallel import apply, forward, mesh as mesh_lib
from astra_jax.run import recipe, workdir
from astra_jax.run.tasks import exchanges


def model_config(cfg: ml_collections.ConfigDict, exchange_spec: str | None = None) -> dit.DiTConfig:
  """The run's DiT with ``exchange_spec`` (default: the run's own exchange); a
  ``vq`` exchange learns the patch rows' length (``row_tokens``) from the model."""
  ex = exchanges.from_config(cfg, exchange_spec)
  grid = cfg.image_size // cfg.patch if cfg.patch else 0
  if isinstance(ex, exchange_lib.VQExchange):
    ex = dataclasses.replace(ex, row_tokens=grid)
  return dit.DiTConfig(image_size=cfg.image_size, channels=cfg.channels, patch=cfg.patch,
                       width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                       mlp_ratio=cfg.mlp_ratio, num_classes=cfg.num_classes, exchange=ex)


def build(model_cfg: dit.DiTConfig, seed: int = 0) -> dit.DiT:
  return dit.DiT(model_cfg, rngs=nnx.Rngs(seed))


def check_mesh(model_cfg: dit.DiTConfig, mesh_size: int) -> None:
  """Bands of whole patch rows, and boundary context no wider than a band;
  ValueError naming the fix."""
  rows = dit.band_rows(model_cfg, mesh_size)
  ex = model_cfg.exchange
  r = getattr(ex, "boundary_rows", 0)
  if r > rows and mesh_size > 1:
    raise ValueError(f"boundary_rows={r} is more than the {rows} patch rows of a device's "
                     f"band at mesh {mesh_size}: use boundary_rows <= {rows}")


def to_unit(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [B, H, W, C] -> float32 in [-1, 1], padded with -1 to ``image_size``."""
  x = images.astype(np.float32) / 127.5 - 1.0
  _, h, w, _ = x.shape
  if image_size < max(h, w):
    raise ValueError(f"image_size {image_size} is smaller than the {h}x{w} images; use "
                     f"--config.image_size >= {max(h, w)}")
  top, left = (image_size - h) // 2, (image_size - w) // 2
  return np.pad(x, ((0, 0), (top, image_size - h - top), (left, image_size - w - left),
                    (0, 0)), constant_values=-1.0)


def crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """The inverse of ``to_unit``'s padding: the central height x width."""
  _, size, _, _ = images.shape
  top, left = (size - height) // 2, (size - width) // 2
  return images[:, top:top + height, left:left + width]


def training_batch(split: data.ImageSplit, cfg, model_cfg: dit.DiTConfig, step: int,
                   steps_per_epoch: int) -> tuple[tuple, np.ndarray]:
  """((x_t patches, positions, t, labels), velocity target) for ``step``."""
  epoch, index = divmod(step, steps_per_epoch)
  order = np.random.default_rng([cfg.seed, epoch]).permutation(len(split.labels))
  idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
  rng = np.random.default_rng([cfg.seed, 1, step])
  x0 = np.asarray(dit.patchify(to_unit(split.images[idx], cfg.image_size), cfg.patch))
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = flow.train_times(rng, len(idx))
  labels = np.where(rng.random(len(idx)) < cfg.class_dropout, model_cfg.null_class,
                    split.labels[idx]).astype(np.int32)
  return ((flow.noisy(x0, noise, t), np.arange(model_cfg.num_patches), t, labels),
          flow.velocity(x0, noise))


def mse_loss(outputs, targets):
  """The flow-matching objective: mean squared error of the velocity."""
  return jnp.mean(jnp.square(outputs - targets)), {}


def restore_trained(run: str, target: dit.DiTConfig | None = None, step: int | None = None):
  """(cfg, DiTConfig, model) from a run's config.json and checkpoint; ``target``
  rebuilds it with another exchange (the same architecture; a ``vq`` state
  the run does not have starts fresh: calibrate it, ``kmeans``)."""
  cfg = workdir.load_config(run, "dit")
  trained = model_config(cfg)
  target = target or trained
  if dataclasses.replace(target, exchange=trained.exchange) != trained:
    raise ValueError(f"{run} holds another DiT architecture than the one requested")
  model = recipe.restore(run, cfg, lambda: build(trained), lambda: build(target),
                         exchange_lib.same_state(target.exchange, trained.exchange), step)
  return cfg, target, model


def calibration_batches(split: data.ImageSplit, cfg, model_cfg: dit.DiTConfig, count: int):
  """Model inputs k-means codebooks are fitted on: training-like noisy images at
  random times, from a permutation training never uses."""
  steps = len(split.labels) // cfg.batch_size
  return [training_batch(split, cfg, model_cfg, steps * 10**6 + i, steps)[0]
          for i in range(count)]


def sampler(model: nnx.Module, mesh_size: int, settings: sample.Sampling):
  """(jitted run(params, rest, noise, positions, labels), params, rest, mesh)."""
  graphdef, params, rest = apply.split_model(model)
  mesh = mesh_lib.seq_mesh_or_none(mesh_size)
  run = jax.jit(sample.sampler(graphdef, mesh, settings, model.cfg.null_class))
  params, rest = mesh_lib.replicate((params, rest), mesh)
  return run, params, rest, mesh


def sampling_noise(model_cfg: dit.DiTConfig, count: int, seed: int) -> np.ndarray:
  """The starting noise of ``count`` samples [count, N, p*p*C], a function of ``seed``
  alone, so every plan samples from the same noise."""
  rng = np.random.default_rng([seed, 2])
  return rng.standard_normal((count, model_cfg.num_patches, model_cfg.patch_dim)).astype(
      np.float32)


def generate(model: nnx.Module, mesh_size: int, settings: sample.Sampling, labels: np.ndarray,
             *, seed: int = 0, batch_size: int = 100) -> tuple[np.ndarray, dict[str, Any]]:
  """Images [B, H, W, C] in [-1, 1] for ``labels``, and the sampling run's bytes.

  The bytes per device of one sampling run of one image are read from the
  compiled program (``traffic``: the batch's collectives over its size; they
  are linear in it), beside the formula (``formula_bytes``).  One program is
  compiled for all batches (the last one padded); ``sampling_s`` is the time
  of the batches after it.
  """
  cfg = model.cfg
  check_mesh(cfg, mesh_size)
  run, params, rest, mesh = sampler(model, mesh_size, settings)
  noise = sampling_noise(cfg, len(labels), seed)
  labels = np.asarray(labels, np.int32)
  batch_size = min(batch_size, len(labels))
  positions = np.arange(cfg.num_patches)

  def inputs(start):
    stop = start + batch_size
    pad = max(0, stop - len(labels))
    take = lambda a: np.concatenate([a[start:stop], np.repeat(a[-1:], pad, axis=0)])
    return mesh_lib.to_global((take(noise), positions, take(labels)), mesh, (1, 0, None))

  began = time.perf_counter()
  compiled = run.lower(params, rest, *inputs(0)).compile()
  forward.say_compiled("the sampler", time.perf_counter() - began)
  report = traffic.hlo_traffic(compiled.as_text())
  out = []
  began = time.perf_counter()
  for start in range(0, len(labels), batch_size):
    out.append(np.asarray(mesh_lib.fetch(compiled(params, rest, *inputs(start)))))
  seconds = time.perf_counter() - began
  patches = np.concatenate(out)[:len(labels)]
  images = np.asarray(dit.unpatchify(jnp.asarray(patches), cfg.patch, cfg.channels))
  per_image = lambda n: int(round(n / batch_size))
  return images, {
      "bytes_per_device": per_image(report.bytes_per_device),
      "bytes_received_per_device": per_image(traffic.received_bytes(report, mesh_size)),
      "bytes_per_device_formula": formula_bytes(cfg, mesh_size, settings),
      "collectives": report.by_kind(), "sampling_s": round(seconds, 3)}


def formula_bytes(cfg: dit.DiTConfig, mesh_size: int, settings: sample.Sampling) -> int:
  """The analytic bytes one device hands to collectives per sampling run of one image."""
  if mesh_size == 1:
    return 0
  ex = cfg.exchange
  batch = 1 if settings.guidance == 1 else 2
  band = cfg.num_patches // mesh_size
  per_step = 2 * batch * band * ex.bytes_per_token(cfg.width, jnp.float32) * ex.sends(mesh_size)
  steps = settings.steps
  if isinstance(ex, exchange_lib.DistriFusionExchange):
    steps -= 1 if settings.steps > ex.warmup else 0  # the last gather has no reader
  if getattr(ex, "refresh", 1) > 1:
    steps = -(-steps // ex.refresh)
  boundary = getattr(ex, "boundary_rows", 0) and ex.boundary_tokens
  per_boundary = 2 * 2 * batch * boundary * cfg.width * 4  # 2 directions, K and V, float32
  return cfg.depth * steps * (per_step + per_boundary)


FORMULA = ("depth x exchange steps x (2 (K, V) x B x band tokens x bytes/token + "
           "boundary: 2 neighbours x 2 (K, V) x B x r x row tokens x width x 4); B = 2 with "
           "guidance != 1; exchange steps: all (exact, vq), steps - 1 (distrifusion), "
           "ceil(steps / refresh) (vq:refresh)")


def check_exchange_spec(spec: str | None) -> None:
  """Codebook-centric attention needs codebooks: one line naming the fix."""
  if spec and "code_attention" in spec and not spec.startswith("vq"):
    raise ValueError(f"codebook-centric attention (code_attention) needs an exchange with "
                     f"codebooks, not {spec.split(':')[0]!r}: use "
                     "--exchange vq:groups=G,code_attention=true")


def load_for_sampling(run: str, spec: str | None, mesh_size: int, *,
                      data_dir: str | None = None, step: int | None = None,
                      calibration_batches_count: int = 4):
  """(DiTConfig, model) of ``run`` under the exchange ``spec``, checked against
  ``mesh_size``; a ``vq`` exchange the run was not trained with gets k-means
  codebooks from the run's own K/V (zero-shot; ``calibrate``, cached on disk).
  ValueError naming the fix."""
  from astra_jax.run import calibrate
  check_exchange_spec(spec)
  cfg = workdir.load_config(run, "dit")
  target = model_config(cfg, spec)
  check_mesh(target, mesh_size)
  trained = model_config(cfg)
  fresh_codebooks = (isinstance(target.exchange, exchange_lib.VQExchange)
                     and not exchange_lib.same_state(target.exchange, trained.exchange))
  cfg, target, model = restore_trained(run, target, step)
  if fresh_codebooks:
    split = data.load_image_dataset(cfg.dataset, data_dir, "train")
    batches = calibration_batches(split, cfg, target, calibration_batches_count)
    calibrate.kmeans_codebooks(model, batches, jax.random.PRNGKey(cfg.seed),
                               max_tokens=cfg.get("kmeans_tokens", 16384))
  return target, model


def seconds_per_image(model: nnx.Module, settings: sample.Sampling, repeats: int = 3) -> float:
  """This host's time for one sampling run of one image on one device (compile
  excluded; the median of ``repeats``)."""
  run, params, rest, _ = sampler(model, 1, settings)
  cfg = model.cfg
  args = (sampling_noise(cfg, 1, 0), np.arange(cfg.num_patches), np.zeros((1,), np.int32))
  compiled = run.lower(params, rest, *args).compile()
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(compiled(params, rest, *args))
    times.append(time.perf_counter() - began)
  return float(np.median(times))
