"""ViT image classification: model from a config, input preparation, evaluation."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from astra_jax.parallel import forward, mesh as mesh_lib
from astra_jax.core import exchange
from astra_jax.run import recipe, workdir
from astra_jax.run.tasks import exchanges, vit_pretrained
from astra_jax.netsim import traffic
from astra_jax.data import images as data
from astra_jax.models import vit


def model_config(cfg: ml_collections.ConfigDict, exchange_spec: str | None = None) -> vit.ViTConfig:
  """The run's ViT with ``exchange_spec`` (a spec string; default: the run's own);
  a run started from a pretrained model has its architecture (``vit_pretrained``)."""
  if cfg.get("model"):
    return vit_pretrained.model_config(cfg, exchanges.from_config(cfg, exchange_spec))
  return vit.ViTConfig(variant=cfg.variant, image_size=cfg.image_size,
                       channels=cfg.channels, num_classes=cfg.num_classes,
                       class_token=cfg.class_token,
                       exchange=exchanges.from_config(cfg, exchange_spec))


def build(model_cfg: vit.ViTConfig, seed: int = 0) -> vit.ViT:
  return vit.ViT(model_cfg, rngs=nnx.Rngs(seed))


def prepare(images: np.ndarray, cfg: ml_collections.ConfigDict, patch: int) -> jnp.ndarray:
  """uint8 [B, H, W, C] -> normalised patches [B, N, p*p*C] (upsampled by
  ``cfg.upsample`` if the config has it, then padded to ``cfg.image_size``)."""
  images = data.upsample(images, cfg.get("upsample", 1))
  x = data.normalize(data.pad_to(images, cfg.image_size), cfg.dataset)
  return vit.patchify(jnp.asarray(x), patch)


def check_mesh(model_cfg: vit.ViTConfig, mesh_size: int) -> None:
  mesh_lib.check_divisible(model_cfg.num_patches, mesh_size, what="patch sequence")


def restore_trained(run: str, target: vit.ViTConfig | None = None,
                    step: int | None = None):
  """(cfg, ViTConfig, model) from a run's config.json and checkpoint.

  ``target`` rebuilds the model with another exchange or class-token mode
  (same architecture): the parameters are reused and, when the exchange
  differs, its state is fresh (``exact`` has none; ``vq`` codebooks must then
  be calibrated, see ``astra_jax.run.calibrate``).
  """
  cfg = workdir.load_config(run, "vit")
  trained = model_config(cfg)
  target = target or trained
  same_arch = dataclasses.replace(target, exchange=trained.exchange,
                                  class_token=trained.class_token, sync=trained.sync)
  if same_arch != trained:
    raise ValueError(f"{run} holds a {trained.variant} model for {trained.image_size}px "
                     f"images; the requested model is {target.variant} at "
                     f"{target.image_size}px: use the same variant/image_size")
  model = recipe.restore(run, cfg, lambda: build(trained), lambda: build(target),
                         exchange.same_state(target.exchange, trained.exchange), step)
  return cfg, target, model


def evaluate(model: nnx.Module, cfg, model_cfg: vit.ViTConfig, split: data.ImageSplit,
             mesh_size: int, batch_size: int, tensor: bool = False) -> dict:
  """Test accuracy at ``mesh_size`` devices, and bytes per device per image from HLO.

  ``tensor``: tensor-parallel over the devices with ``model_cfg.sync`` (one
  class token, every device sees every patch) instead of sequence-parallel.
  ``cfg.eval_examples`` (if set and > 0): only the split's first that many
  images (a CPU-sized evaluation of a large backbone; the result says how many).
  """
  if not tensor:
    check_mesh(model_cfg, mesh_size)
  limit = int(cfg.get("eval_examples", 0) or 0)
  if 0 < limit < len(split.labels):
    split = dataclasses.replace(split, images=split.images[:limit], labels=split.labels[:limit])
  fwd = forward.inference_forward(model, mesh_size, tensor=tensor)
  positions = jnp.arange(model_cfg.num_patches)

  def hits(params, rest, patches, positions, labels):
    logits, rest, _ = fwd.fn(params, rest, patches, positions)
    return jnp.sum(jnp.argmax(logits, -1) == labels), rest
  hits = forward.timed_compile(jax.jit(hits), "the evaluation forward")

  correct = 0
  rest = fwd.rest
  batches = data.batches(split, batch_size, rng=None, drop_remainder=False)
  for images, labels in tqdm(batches, desc="evaluate", unit="batch", leave=False,
                             total=-(-len(split.labels) // batch_size)):
    patches, pos, labels = fwd.place(
        (np.asarray(prepare(images, cfg, model_cfg.patch)), positions, labels), (1, 0, None))
    batch_hits, rest = hits(fwd.params, rest, patches, pos, labels)  # rest: fresh link losses
    correct += int(mesh_lib.fetch(batch_hits))
  one = jax.ShapeDtypeStruct((1, model_cfg.num_patches,
                              model_cfg.patch ** 2 * model_cfg.channels), jnp.float32)
  width, layers = model_cfg.sizes[:2]
  example = (fwd.fn, (fwd.params, rest, one, positions))
  start = time.perf_counter()  # the summary compiles fwd.fn alone for its HLO
  if tensor:  # the patches and the one class token, every all-reduce
    summary = traffic.tensor_summary(*example, model_cfg.sync, layers=layers,
                                     values=(model_cfg.num_patches + 1) * width,
                                     mesh_size=mesh_size)
  else:  # K/V exchange of every layer + the float32 logits averaged over devices
    summary = traffic.exchange_summary(*example, model_cfg.exchange, width=width,
                                       layers=layers, tokens=model_cfg.num_patches,
                                       mesh_size=mesh_size,
                                       extra_formula_bytes=4 * model_cfg.num_classes)
  forward.say_compiled("the forward again for its bytes per device",
                       time.perf_counter() - start)
  return {
      "accuracy": correct / len(split.labels),
      "examples": int(len(split.labels)), **summary,
      # tensor parallelism runs the plain model: one class token seeing every patch
      "class_token": "one (all patches)" if tensor else model_cfg.class_token,
      "drop_rate": model_cfg.exchange.drop_rate,
      "variant": model_cfg.variant,
  }
