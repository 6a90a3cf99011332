"""Hugging Face ViT / DINOv2 checkpoints -> ``astra_jax.models.vit``.

``load_vit(folder)`` reads a transformers folder (``config.json`` plus
``model.safetensors`` or shards with an index) through the same reader as the
language models (``astra_jax.io.hf``: the ``safetensors`` library, tensor by
tensor).  Architectures (``model_type`` in config.json):

  "vit"     ViTModel, ViTForImageClassification (keys under ``vit.``)
  "dinov2"  Dinov2Model, or Dinov2ForImageClassification's backbone (keys under
            ``dinov2.``; its head reads the class token and the mean patch, so
            only a new head can be used)

Names (E = ``embeddings.``, L = ``encoder.layer.N.``; nn.Linear weights are
[out, in] and become our [in, out] kernels):

  E cls_token [1, 1, D]                     -> cls
  E position_embeddings [1, 1 + G*G, D]     -> pos (resized to our grid, below)
  E patch_embeddings.projection.weight [D, C, p, p], .bias
                                            -> embed.kernel [(p p C), D], .bias: the
                                               stride-p conv on our row-major patches
  L attention.attention.{query,key,value}   -> blocks.N.qkv (q | k | v columns; a
                                               model without q/k/v biases gets zeros)
  L attention.output.dense                  -> blocks.N.proj
  L layernorm_before / norm1 (DINOv2)       -> blocks.N.ln1 (weight -> scale)
  L layernorm_after / norm2                 -> blocks.N.ln2
  L intermediate.dense / mlp.fc1            -> blocks.N.fc1
  L output.dense / mlp.fc2                  -> blocks.N.fc2
  L layer_scale1|2.lambda1 (DINOv2)         -> blocks.N.ls1|ls2
  layernorm                                 -> ln (the final norm)
  classifier                                -> head (ViTForImageClassification)

Ignored: ViTModel's ``pooler.dense`` (a tanh layer on the class token that
classification does not use) and ``embeddings.mask_token`` (masked-image
pre-training only).  Our ViT has no pooler, so ``features`` gives
transformers' ``last_hidden_state``.

Image size: a checkpoint at another size than ours has its patch position
grid resized as transformers does at run time (ViT's
``interpolate_pos_encoding=True``, DINOv2 always): ``F.interpolate(grid,
size=(new, new), mode="bicubic", align_corners=False)``, the class position
kept.  Because a size is passed (transformers >= 4.45; older releases passed
``scale_factor=(new + 0.1) / old``), torch maps output pixel i to input
coordinate ``(i + 0.5) * old / new - 0.5``: ``bicubic_matrix`` is that map
with torch's cubic kernel (a = -0.75) and clamped borders.  We resize once,
at import, to the run's image size; the result is the table transformers
computes every forward.

Class tokens: the checkpoint's single class token becomes our ``cls``, which
every device's part of the sequence starts with a copy of (``models.vit``).

Input: ``input_stats=(mean, std)`` (the per-channel constants our data
pipeline normalized with) folds the checkpoint's own normalization
(``preprocessor_config.json``: image_mean / image_std) and a grayscale ->
RGB replication into the patch embedding, exactly: the model then computes
on our normalized 1-channel images what it computes on the RGB images
normalized its way (``fold_input_stats``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core.exchange import Exchange, ExactExchange
from astra_jax.io import hf
from astra_jax.io.hf import HFImportError
from astra_jax.models import vit

FAMILIES = ("vit", "dinov2")
_GELUS = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# our block module -> the HF module under encoder.layer.N., per family
_BLOCK = {
    "vit": {"ln1": "layernorm_before", "ln2": "layernorm_after", "proj": "attention.output.dense",
            "fc1": "intermediate.dense", "fc2": "output.dense"},
    "dinov2": {"ln1": "norm1", "ln2": "norm2", "proj": "attention.output.dense",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2", "ls1": "layer_scale1", "ls2": "layer_scale2"},
}
_QKV = ("query", "key", "value")
_IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token")
_PREPROCESSOR = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What config.json says beyond our ViTConfig."""
  family: str  # "vit" | "dinov2"
  image_size: int  # the size it was trained at (its position grid * patch)
  channels: int
  num_labels: int
  qkv_bias: bool


def read_checkpoint(hf_config: dict, source: str = "config.json") -> Checkpoint:
  """The parsed config.json of a ViT / DINOv2 folder, or HFImportError naming why not."""
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise HFImportError(
        f"{source} describes a {model_type or 'model without model_type'!r} model "
        f"(architectures {hf_config.get('architectures')}); astra-jax imports Hugging Face "
        "ViT ('vit': ViTModel, ViTForImageClassification) and DINOv2 ('dinov2': "
        "Dinov2Model) image checkpoints")
  return Checkpoint(family=model_type, image_size=_square(hf_config, "image_size", source),
                    channels=int(hf_config.get("num_channels", 3)),
                    num_labels=_num_labels(hf_config),
                    qkv_bias=bool(hf_config.get("qkv_bias", True)))


def config_from_hf(hf_config: dict, *, image_size: int | None = None,
                   channels: int | None = None, num_classes: int | None = None,
                   class_token: str = "distributed", exchange: Exchange = ExactExchange(),
                   source: str = "config.json") -> vit.ViTConfig:
  """Our ViTConfig for a parsed config.json, at ``image_size`` (default: the
  checkpoint's), ``channels`` (default its own; fewer when ``load_vit`` folds a
  grayscale input) and ``num_classes`` (default its label count)."""
  ckpt = read_checkpoint(hf_config, source)
  act = hf_config.get("hidden_act", "gelu")
  if act not in _GELUS:
    raise HFImportError(f"{source} has hidden_act {act!r}; astra-jax's ViT implements "
                        f"{sorted(_GELUS)} (exact and tanh GELU)")
  if ckpt.family == "dinov2" and hf_config.get("use_swiglu_ffn"):
    raise HFImportError(f"{source} sets use_swiglu_ffn (DINOv2-g's SwiGLU MLP); astra-jax's "
                        "ViT has the GELU MLP of DINOv2-S/B/L")
  try:
    width, depth = int(hf_config["hidden_size"]), int(hf_config["num_hidden_layers"])
    heads = int(hf_config["num_attention_heads"])
    mlp = (int(width * hf_config.get("mlp_ratio", 4)) if ckpt.family == "dinov2"
           else int(hf_config["intermediate_size"]))
  except (KeyError, TypeError, ValueError) as e:
    raise HFImportError(f"{source} lacks {ckpt.family} field {e}; re-save it with "
                        "transformers' save_pretrained") from None
  try:
    return vit.ViTConfig(
        variant=f"custom/{_square(hf_config, 'patch_size', source)}",
        image_size=image_size or ckpt.image_size, channels=channels or ckpt.channels,
        num_classes=num_classes or ckpt.num_labels, class_token=class_token,
        exchange=exchange, width=width, depth=depth, heads=heads, mlp=mlp,
        layer_scale=ckpt.family == "dinov2", gelu=_GELUS[act],
        layer_norm_eps=float(hf_config.get("layer_norm_eps",
                                           1e-12 if ckpt.family == "vit" else 1e-6)))
  except ValueError as e:
    raise HFImportError(f"{source}: {e}") from None


def load_vit(folder: str | os.PathLike, *, image_size: int | None = None,
             num_classes: int | None = None, new_head: bool = False,
             class_token: str = "distributed", exchange: Exchange = ExactExchange(),
             input_stats: tuple | None = None,
             require_head: bool = False) -> tuple[vit.ViTConfig, vit.ViT]:
  """(ViTConfig, ViT) holding the checkpoint's weights (float32).

  ``num_classes``: the head's classes (default: the checkpoint's labels).  A
  classifier checkpoint keeps its head when the counts agree; ``new_head``
  (or a backbone without a head) starts a fresh zero head instead.
  ``require_head``: refuse a folder without a usable classifier (evaluation).
  ``input_stats``: see the module docstring.  Every parameter comes from the
  file but a new head, which is zeros (as ``vit.ViT`` starts its head).
  """
  folder = os.fspath(folder)
  opened = _open(folder, image_size=image_size, num_classes=num_classes, new_head=new_head,
                 class_token=class_token, exchange=exchange, input_stats=input_stats,
                 require_head=require_head)
  return opened.cfg, _assemble(opened, folder, input_stats)


def check(folder: str | os.PathLike, **kwargs) -> vit.ViTConfig:
  """``load_vit``'s checks (config, tensor names and shapes, head, input
  statistics) without reading a weight; returns the ViTConfig."""
  return _open(os.fspath(folder), **kwargs).cfg


@dataclasses.dataclass(frozen=True)
class _Opened:
  ckpt: Checkpoint
  cfg: vit.ViTConfig
  tensors: dict  # name -> StoredTensor, only those the model takes
  keep_head: bool  # the classifier becomes our head
  model_stats: tuple | None  # the checkpoint's (mean, std) when input_stats are folded


def _open(folder: str, *, image_size: int | None = None, num_classes: int | None = None,
          new_head: bool = False, class_token: str = "distributed",
          exchange: Exchange = ExactExchange(), input_stats: tuple | None = None,
          require_head: bool = False) -> _Opened:
  hf_config = hf.read_config(folder)
  source = os.path.join(folder, "config.json")
  ckpt = read_checkpoint(hf_config, source)
  data_channels = len(input_stats[0]) if input_stats else None
  cfg = config_from_hf(hf_config, image_size=image_size, channels=data_channels,
                       num_classes=num_classes, class_token=class_token, exchange=exchange,
                       source=source)
  tensors = _strip_prefix(hf._read_tensors(folder), ckpt.family)
  tensors = {k: v for k, v in tensors.items() if k not in _IGNORED}
  head = [k for k in ("classifier.weight", "classifier.bias") if k in tensors]
  shapes = _hf_shapes(cfg, ckpt)
  if head and ckpt.family == "vit":
    shapes.update({"classifier.weight": (ckpt.num_labels, cfg.sizes[0]),
                   "classifier.bias": (ckpt.num_labels,)})
  elif head:  # Dinov2ForImageClassification: [cls, mean patch] -> labels, not ours
    if not new_head:
      raise HFImportError(
          f"{folder} is a Dinov2ForImageClassification, whose head reads the class token and "
          "the mean patch; astra-jax's head reads the class token only: import its backbone "
          "with a new head (new_head; train.vit: --config.new_head=true)")
    tensors = {k: v for k, v in tensors.items() if k not in head}
    head = []
  hf._check_tensors(tensors, shapes, folder, ckpt.family, "num_hidden_layers")
  if require_head and not head:
    raise HFImportError(f"{folder} holds a backbone without a classifier "
                        f"({', '.join(hf_config.get('architectures') or [ckpt.family])}); "
                        "fine-tune a head first: python -m train.vit --init-from hf:DIR")
  if head and not new_head and cfg.num_classes != ckpt.num_labels:
    raise HFImportError(
        f"{folder} has a {ckpt.num_labels}-class classifier but the data has "
        f"{cfg.num_classes} classes; start a fresh {cfg.num_classes}-class head with "
        "new_head (train.vit: --config.new_head=true)")
  stats = model_stats(folder, ckpt.channels) if input_stats else None
  if stats:
    fold_input_stats(np.zeros((1, ckpt.channels, 1, 1)), np.zeros(1), stats, input_stats)
  return _Opened(ckpt, cfg, tensors, bool(head) and not new_head, stats)


def _assemble(opened: _Opened, folder: str, input_stats: tuple | None) -> vit.ViT:
  ckpt, cfg, tensors = opened.ckpt, opened.cfg, opened.tensors
  value = lambda name: np.asarray(tensors[name], np.float32)
  weights = {("cls",): value("embeddings.cls_token"),
             ("pos",): resize_positions(value("embeddings.position_embeddings"), cfg.grid,
                                        folder),
             ("ln", "scale"): value("layernorm.weight"), ("ln", "bias"): value("layernorm.bias")}
  kernel = value("embeddings.patch_embeddings.projection.weight")
  bias = value("embeddings.patch_embeddings.projection.bias")
  if input_stats:
    kernel, bias = fold_input_stats(kernel, bias, opened.model_stats, input_stats)
  weights[("embed", "kernel")] = conv_to_kernel(kernel)
  weights[("embed", "bias")] = bias
  width = cfg.sizes[0]
  for n in range(cfg.sizes[1]):
    layer = f"encoder.layer.{n}."
    attn = layer + "attention.attention."
    weights[("blocks", n, "qkv", "kernel")] = np.concatenate(
        [value(f"{attn}{x}.weight").T for x in _QKV], axis=1)
    weights[("blocks", n, "qkv", "bias")] = (
        np.concatenate([value(f"{attn}{x}.bias") for x in _QKV]) if ckpt.qkv_bias
        else np.zeros(3 * width, np.float32))
    for ours, theirs in _BLOCK[ckpt.family].items():
      if ours.startswith("ls"):
        weights[("blocks", n, ours)] = value(f"{layer}{theirs}.lambda1")
      elif ours.startswith("ln"):
        weights[("blocks", n, ours, "scale")] = value(f"{layer}{theirs}.weight")
        weights[("blocks", n, ours, "bias")] = value(f"{layer}{theirs}.bias")
      else:
        weights[("blocks", n, ours, "kernel")] = value(f"{layer}{theirs}.weight").T
        weights[("blocks", n, ours, "bias")] = value(f"{layer}{theirs}.bias")
  if opened.keep_head:
    weights[("head", "kernel")] = value("classifier.weight").T
    weights[("head", "bias")] = value("classifier.bias")

  # the parameters straight from the file: no random initial values drawn and replaced
  graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
  for path, var in nnx.to_flat_state(params):
    shape = var.get_value().shape
    value = weights.pop(path) if path in weights or path[0] != "head" else np.zeros(shape)
    if value.shape != shape:
      raise AssertionError(f"{path}: {value.shape} for {shape}")  # a bug, not a bad file
    var.set_value(jnp.asarray(value, var.get_value().dtype))  # a fresh head: zeros, as ViT's
  if weights:
    raise AssertionError(f"unused weights {sorted(weights)}")
  # the rest (RNG and exchange state) as ViT starts it; jitted, the unused random
  # weights are never computed
  rest = jax.jit(lambda: nnx.split(vit.ViT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, params, rest)


def conv_to_kernel(weight: np.ndarray) -> np.ndarray:
  """A stride-p conv weight [D, C, p, p] -> the Linear kernel [(p p C), D] of our
  row-major ``vit.patchify`` patches."""
  d, c, p, q = weight.shape
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(p * q * c, d))


def resize_positions(table: np.ndarray, grid: int, source: str = "the checkpoint") -> np.ndarray:
  """[1, 1 + G*G, D] position embeddings -> [1, 1 + grid*grid, D], as transformers'
  ``interpolate_pos_encoding`` (bicubic, align_corners=False, by size)."""
  count = table.shape[1] - 1
  old = int(round(count ** 0.5))
  if old * old != count:
    raise HFImportError(f"{source} has {count} patch positions, not a square grid; astra-jax's "
                        "ViT takes square images")
  if old == grid:
    return table
  patches = table[0, 1:].reshape(old, old, -1).astype(np.float64)
  m = bicubic_matrix(old, grid)
  resized = np.einsum("ih,hwd,jw->ijd", m, patches, m).reshape(grid * grid, -1)
  return np.concatenate([table[:, :1], resized[None].astype(table.dtype)], axis=1)


def bicubic_matrix(old: int, new: int, a: float = -0.75) -> np.ndarray:
  """[new, old]: torch's ``interpolate(mode="bicubic", align_corners=False)`` along
  one axis, when a size is given (ONNX Resize "cubic", half_pixel, is the same)."""
  m = np.zeros((new, old))
  ratio = old / new
  for i in range(new):
    x = (i + 0.5) * ratio - 0.5  # no clamp at 0 for cubic (torch's area_pixel_compute_source_index)
    base = min(int(np.floor(x)), old - 1)
    t = min(max(x - base, 0.0), 1.0)
    weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
               ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    for k, w in enumerate(weights):
      m[i, min(max(base - 1 + k, 0), old - 1)] += w
  return m


def model_stats(folder: str, channels: int) -> tuple[tuple, tuple]:
  """(image_mean, image_std) the checkpoint was trained with, from its
  preprocessor_config.json (pixels scaled to [0, 1])."""
  path = os.path.join(folder, _PREPROCESSOR)
  try:
    with open(path) as f:
      pre = json.load(f)
  except FileNotFoundError:
    raise HFImportError(
        f"{folder} has no {_PREPROCESSOR}; astra-jax needs the image_mean and image_std the "
        "model was trained with to feed it your images (write {\"image_mean\": [...], "
        "\"image_std\": [...]} there, one value per channel)") from None
  except json.JSONDecodeError as e:
    raise HFImportError(f"{path} is not valid JSON ({e})") from None
  if not pre.get("do_normalize", True):
    mean, std = [0.0] * channels, [1.0] * channels
  else:
    mean, std = pre.get("image_mean"), pre.get("image_std")
  if abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9 or not pre.get(
      "do_rescale", True):
    raise HFImportError(f"{path} does not scale pixels by 1/255; astra-jax feeds images "
                        "scaled to [0, 1]")
  for v in (mean, std):
    if not isinstance(v, list) or len(v) != channels:
      raise HFImportError(f"{path} needs image_mean and image_std with {channels} values each, "
                          f"got {mean!r} and {std!r}")
  return tuple(map(float, mean)), tuple(map(float, std))


def fold_input_stats(weight: np.ndarray, bias: np.ndarray, model: tuple[tuple, tuple],
                     data: tuple[tuple, tuple]) -> tuple[np.ndarray, np.ndarray]:
  """A patch conv ([D, C, p, p], [D]) expecting ``(x - model_mean) / model_std`` on
  C channels -> one taking ``(x - data_mean) / data_std`` on the data's channels
  (1 replicated to C, or the same C): exactly the same outputs for every image.

  With z = (x - d) / e the model's input is a z + b per channel, a = e / s and
  b = (d - m) / s; the conv is linear, so a scales the weights (summed over the
  replicated channels) and b's contribution moves into the bias.
  """
  m, s, d, e = (np.asarray(v, np.float64) for v in (*model, *data))
  channels = weight.shape[1]
  if len(d) not in (1, channels):
    raise HFImportError(f"the checkpoint takes {channels}-channel images and the data has "
                        f"{len(d)} channels; only grayscale -> RGB is converted")
  source = np.zeros(channels, int) if len(d) == 1 else np.arange(channels)
  a, b = e[source] / s, (d[source] - m) / s
  w = weight.astype(np.float64) * a[None, :, None, None]
  folded = np.zeros((weight.shape[0], len(d)) + weight.shape[2:])
  np.add.at(folded, (slice(None), source), w)
  new_bias = bias + np.einsum("ocij,c->o", weight.astype(np.float64), b)
  return folded.astype(np.float32), new_bias.astype(np.float32)


def expected_shapes(hf_config: dict) -> dict[str, tuple]:
  """The tensors (name -> shape, classifier aside) a config.json implies."""
  return _hf_shapes(config_from_hf(hf_config), read_checkpoint(hf_config))


def _hf_shapes(cfg: vit.ViTConfig, ckpt: Checkpoint) -> dict[str, tuple]:
  """Every tensor name the config implies (classifier aside), with its shape."""
  width, depth, _, mlp = cfg.sizes
  grid, p = ckpt.image_size // cfg.patch, cfg.patch
  shapes = {"embeddings.cls_token": (1, 1, width),
            "embeddings.position_embeddings": (1, 1 + grid * grid, width),
            "embeddings.patch_embeddings.projection.weight": (width, ckpt.channels, p, p),
            "embeddings.patch_embeddings.projection.bias": (width,),
            "layernorm.weight": (width,), "layernorm.bias": (width,)}
  sizes = {"fc1": (mlp, width), "fc2": (width, mlp), "proj": (width, width)}
  for n in range(depth):
    layer = f"encoder.layer.{n}."
    for x in _QKV:
      shapes[f"{layer}attention.attention.{x}.weight"] = (width, width)
      if ckpt.qkv_bias:
        shapes[f"{layer}attention.attention.{x}.bias"] = (width,)
    for ours, theirs in _BLOCK[ckpt.family].items():
      if ours.startswith("ls"):
        shapes[f"{layer}{theirs}.lambda1"] = (width,)
      else:
        shapes[f"{layer}{theirs}.weight"] = sizes.get(ours, (width,))
        shapes[f"{layer}{theirs}.bias"] = (sizes.get(ours, (width,))[0],)
  return shapes


def _strip_prefix(tensors: dict, family: str) -> dict:
  """ViTForImageClassification keeps the backbone under ``vit.`` (DINOv2: ``dinov2.``)."""
  prefix = f"{family}."
  if family and any(k.startswith(prefix) for k in tensors):
    return {k.removeprefix(prefix): v for k, v in tensors.items()}
  return tensors


def _square(hf_config: dict, key: str, source: str) -> int:
  value = hf_config.get(key)
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]
  if not isinstance(value, int) or value < 1:
    raise HFImportError(f"{source} has {key} {value!r}; astra-jax's ViT takes one positive "
                        f"integer (square images and patches)")
  return value


def _num_labels(hf_config: dict) -> int:
  labels = hf_config.get("id2label")
  return len(labels) if isinstance(labels, dict) and labels else int(
      hf_config.get("num_labels", 2))
