"""ViT runs that start from a pretrained image model (``cfg.model``).

A run's ``config.json`` keeps the spec (hf:DIR, onnx:FILE or dinov2-s,
``astra_jax.io.pretrained_vit``) in ``model``; its architecture is the
checkpoint's at the run's ``image_size``, with the data's channels and
classes, so evaluating or fine-tuning the run rebuilds it from the spec.
"""

from __future__ import annotations

import ml_collections

from astra_jax.core.exchange import Exchange
from astra_jax.data import images as data
from astra_jax.io import pretrained_vit
from astra_jax.models import vit
from astra_jax.run import workdir

CONFIG = "vit_pretrained"  # the recipe a pretrained start defaults to
# the keys that define a pretrained run's model (copied from a run fine-tuned further)
_MODEL_KEYS = ("model", "image_size", "upsample", "dataset")


def is_spec(text: str | None) -> bool:
  return pretrained_vit.is_spec(text)


def config_name(init_from: str | None, config: str, default: str) -> str:
  """``--config`` unless it was left at ``default`` and ``init_from`` is a pretrained
  model, or a run started from one: then the pretrained recipe."""
  if config != default or not init_from:
    return config
  if is_spec(init_from):
    return CONFIG
  try:
    return CONFIG if workdir.load_config(init_from, "vit").get("model") else config
  except ValueError:
    return config  # not a run folder: the caller's own check says so


def use(cfg: ml_collections.ConfigDict, init_from: str | None) -> str | None:
  """Points ``cfg`` at the pretrained model it starts from and returns the spec
  whose weights to load (None: a fresh model, or another run's weights).

  ``--init-from SPEC`` sets ``cfg.model``; a run folder made from a pretrained
  model passes on its model keys; a config naming a ``model`` without
  ``--init-from`` starts from that model.
  """
  if is_spec(init_from):
    cfg.model = init_from
  elif init_from:
    trained = workdir.load_config(init_from, "vit")
    if trained.get("model"):
      for key in _MODEL_KEYS:
        if key in trained:
          cfg[key] = trained[key]
    return None
  if not cfg.get("model"):
    return None
  pretrained_vit.folder(cfg.model)  # a bad spec (or file) fails before anything is written
  return cfg.model


def model_config(cfg: ml_collections.ConfigDict, exchange: Exchange) -> vit.ViTConfig:
  return pretrained_vit.model_config(cfg.model, image_size=cfg.image_size,
                                     channels=cfg.channels, num_classes=cfg.num_classes,
                                     class_token=cfg.class_token, exchange=exchange)


def check(cfg: ml_collections.ConfigDict, model_cfg: vit.ViTConfig, *,
          require_head: bool = False) -> None:
  """``load``'s refusals (e.g. a classifier whose classes differ from the data's
  without ``--config.new_head=true``) from metadata, before anything is written."""
  pretrained_vit.check(cfg.model, model_cfg, **_options(cfg, require_head))


def load(cfg: ml_collections.ConfigDict, model_cfg: vit.ViTConfig, *,
         require_head: bool = False) -> vit.ViT:
  """The checkpoint's weights for ``model_cfg``, fed the run's data (its
  normalization folded into the patch embedding)."""
  return pretrained_vit.load(cfg.model, model_cfg, **_options(cfg, require_head))


def _options(cfg: ml_collections.ConfigDict, require_head: bool) -> dict:
  return dict(input_stats=data.channel_stats(cfg.dataset),
              new_head=bool(cfg.get("new_head", False)), require_head=require_head)
