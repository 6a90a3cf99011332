"""Hugging Face ViT / DINOv2 import: parity with transformers, and clear import errors.

The reference is three tiny random transformers models (ViTModel with its
pooler, ViTForImageClassification with tanh GELU and no q/k/v biases,
Dinov2Model with layer scale; norms, biases and layer scales randomised) and
their outputs, also at an image size other than the config's (ViT 28 -> 56:
its 4x4 position grid interpolated to 8x8; DINOv2 56 -> 28: 8x8 -> 4x4),
written by tests/hf_vit_reference.py in ``.venv-hf`` (tests/hf_helpers.py;
without it the parity tests skip, saying why).  Features and logits must
match to 1e-4 at mesh 1 and at mesh 4, where the patches are split over four
devices and each device has its own copy of the class token.  The error tests
write checkpoints with safetensors.numpy and need no torch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors", reason="these tests write checkpoints with safetensors: "
                    ".venv/bin/python -m pip install safetensors")
from safetensors.numpy import save_file  # noqa: E402

import hf_helpers  # noqa: E402
from astra_jax.core import exchange as ex  # noqa: E402
from astra_jax.io import hf_vit  # noqa: E402
from astra_jax.models import vit  # noqa: E402
from astra_jax.parallel import apply, mesh as mesh_lib  # noqa: E402

TOL = dict(rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """Folder with vit/, classifier/, dinov2/ and reference.npz written by transformers."""
  return hf_helpers.reference(tmp_path_factory.mktemp("hf_vit"), None, "hf_vit_reference.py")


class _Features(nnx.Module):
  """The model's ``features`` as its call, for ``apply.sequence_apply``."""

  def __init__(self, model):
    self.model = model

  def __call__(self, patches, positions):
    return self.model.features(patches, positions)


def _patches(pixels, patch):
  return vit.patchify(jnp.asarray(pixels.transpose(0, 2, 3, 1)), patch)  # NCHW -> NHWC


def _run(module, cfg, pixels, mesh_size, out_seq_dim):
  graphdef, params, rest = apply.split_model(module)
  fn = apply.sequence_apply(graphdef, mesh_lib.seq_mesh_or_none(mesh_size), in_seq_dims=(1, 0),
                            train=False, out_seq_dim=out_seq_dim)
  out = jax.jit(fn)(params, rest, _patches(pixels, cfg.patch), jnp.arange(cfg.num_patches))
  return np.asarray(out[0])


def _features(model, cfg, pixels, mesh_size):
  """(class token of each device [B, P, D], patches [B, N, D])."""
  out = _run(_Features(model), cfg, pixels, mesh_size, out_seq_dim=1)
  b, _, d = out.shape
  parts = out.reshape(b, mesh_size, 1 + cfg.num_patches // mesh_size, d)
  return parts[:, :, 0], parts[:, :, 1:].reshape(b, cfg.num_patches, d)


def test_configs_from_transformers(ref):
  folder, _ = ref
  cfg, _ = hf_vit.load_vit(folder / "vit")
  assert (cfg.variant, cfg.sizes, cfg.image_size, cfg.channels) == ("custom/7", (32, 2, 4, 48),
                                                                     28, 3)
  assert (cfg.gelu, cfg.layer_scale, cfg.layer_norm_eps) == ("exact", False, 1e-12)
  cfg, model = hf_vit.load_vit(folder / "classifier")
  assert (cfg.channels, cfg.num_classes, cfg.gelu, cfg.sizes[3]) == (1, 5, "tanh", 64)
  assert not np.asarray(model.blocks[0].qkv.bias.get_value()).any()  # no q/k/v biases
  cfg, model = hf_vit.load_vit(folder / "dinov2", image_size=28)
  assert (cfg.sizes, cfg.image_size, cfg.grid, cfg.layer_scale) == ((32, 2, 4, 96), 28, 4, True)
  assert (cfg.gelu, cfg.layer_norm_eps) == ("exact", 1e-6)
  assert model.pos.get_value().shape == (1, 17, 32)


@pytest.mark.parametrize("name,key,size,mesh_size", [
    ("vit", "vit", 28, 1), ("vit", "vit", 28, 4), ("vit", "vit", 56, 4),
    ("dinov2", "dino", 56, 1), ("dinov2", "dino", 56, 4), ("dinov2", "dino", 28, 4)])
def test_features_match_transformers(ref, name, key, size, mesh_size):
  """last_hidden_state; at 56 (ViT) and 28 (DINOv2) the position grid is resized
  (there at mesh 4: the devices index the resized grid at their global positions)."""
  folder, want = ref
  cfg, model = hf_vit.load_vit(folder / name, image_size=size)
  hidden = want[f"{key}_hidden{size}"]
  cls, patches = _features(model, cfg, want[f"{key}_pixels{size}"], mesh_size)
  np.testing.assert_allclose(patches, hidden[:, 1:], **TOL)
  for device in range(mesh_size):  # every device's copy of the class token
    np.testing.assert_allclose(cls[:, device], hidden[:, 0], **TOL)


@pytest.mark.parametrize("mesh_size,class_token", [(1, "distributed"), (4, "distributed"),
                                                    (4, "single")])
def test_classifier_logits_match_transformers(ref, mesh_size, class_token):
  folder, want = ref
  cfg, model = hf_vit.load_vit(folder / "classifier", class_token=class_token)
  got = _run(model, cfg, want["cls_pixels"], mesh_size, out_seq_dim=None)
  np.testing.assert_allclose(got, want["cls_logits"], **TOL)


def test_new_head_and_class_counts(ref):
  folder, want = ref
  with pytest.raises(hf_vit.HFImportError, match=r"5-class classifier but the data has 10 "
                     r"classes; .*--config.new_head=true"):
    hf_vit.load_vit(folder / "classifier", num_classes=10)
  cfg, model = hf_vit.load_vit(folder / "classifier", num_classes=10, new_head=True)
  assert cfg.num_classes == 10 and not np.asarray(model.head.kernel.get_value()).any()
  _, same = hf_vit.load_vit(folder / "classifier")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model.blocks, nnx.Param),
               nnx.state(same.blocks, nnx.Param))
  with pytest.raises(hf_vit.HFImportError, match="backbone without a classifier"):
    hf_vit.load_vit(folder / "dinov2", require_head=True)
  cfg, model = hf_vit.load_vit(folder / "dinov2", num_classes=7)  # a backbone: a fresh head
  assert model.head.kernel.get_value().shape == (32, 7)


def test_vq_exchange_on_imported_dinov2(ref):
  """ASTRA on the imported model: the class token of each device sees the others'
  patches through 8-group codes."""
  folder, want = ref
  vq = ex.make_exchange("vq", groups=8, codebook_size=16)
  cfg, model = hf_vit.load_vit(folder / "dinov2", exchange=vq, num_classes=3)
  got = _run(model, cfg, want["dino_pixels56"], 4, out_seq_dim=None)
  assert got.shape == (2, 3) and np.isfinite(got).all()


def test_folded_grayscale_input_is_the_rgb_model(ref, tmp_path):
  """input_stats: our 1-channel images normalized with Fashion-MNIST's constants give
  exactly the features of the 3-channel model on the gray image replicated to RGB and
  normalized with the checkpoint's preprocessor_config.json."""
  folder, _ = ref
  stats = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
  (folder / "dinov2" / "preprocessor_config.json").write_text(json.dumps(stats))
  cfg3, rgb = hf_vit.load_vit(folder / "dinov2")
  cfg1, gray = hf_vit.load_vit(folder / "dinov2", input_stats=((0.2860,), (0.3530,)))
  assert (cfg3.channels, cfg1.channels) == (3, 1)
  x = np.random.default_rng(0).integers(0, 256, (2, 1, 56, 56)).astype(np.float32) / 255
  ours = (x - 0.2860) / 0.3530
  mean, std = (np.asarray(stats[k], np.float32)[:, None, None] for k in ("image_mean", "image_std"))
  theirs = (np.repeat(x, 3, 1) - mean) / std
  np.testing.assert_allclose(_features(gray, cfg1, ours, 1)[1], _features(rgb, cfg3, theirs, 1)[1],
                             rtol=0, atol=1e-5)


# --- no torch needed below: checkpoints written with safetensors.numpy ---------------

def _dinov2_config(**over):
  cfg = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 14,
         "patch_size": 7, "num_channels": 1, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
  return {**cfg, **over}


def _write(folder, config, tensors=None):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  if tensors is None:
    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(size=s).astype(np.float32)
               for k, s in hf_vit.expected_shapes(config).items()}
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


def test_small_dinov2_without_torch(tmp_path):
  folder = _write(tmp_path / "d", _dinov2_config())
  cfg, model = hf_vit.load_vit(folder, image_size=28)  # 2x2 grid -> 4x4
  cls, patches = _features(model, cfg, np.ones((1, 1, 28, 28), np.float32), 1)
  assert patches.shape == (1, 16, 16) and np.isfinite(patches).all()


@pytest.mark.parametrize("over,message", [
    ({"model_type": "swin", "architectures": ["SwinModel"]}, "'swin' model"),
    ({"model_type": "dinov2_with_registers"}, "imports Hugging Face ViT"),
    ({"use_swiglu_ffn": True}, "SwiGLU"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"image_size": [14, 28]}, "square images"),
])
def test_config_errors(tmp_path, over, message):
  folder = _write(tmp_path / "d", _dinov2_config(), None)
  (folder / "config.json").write_text(json.dumps(_dinov2_config(**over)))
  with pytest.raises(hf_vit.HFImportError, match=message):
    hf_vit.load_vit(folder)


def test_patch_that_does_not_tile_the_image(tmp_path):
  folder = _write(tmp_path / "d", _dinov2_config())
  with pytest.raises(hf_vit.HFImportError, match="image size 30 is not a multiple of patch 7"):
    hf_vit.load_vit(folder, image_size=30)


def test_missing_layer_scale_is_named(tmp_path):
  tensors = {k: np.zeros(s, np.float32)
             for k, s in hf_vit.expected_shapes(_dinov2_config()).items()}
  del tensors["encoder.layer.0.layer_scale2.lambda1"]
  folder = _write(tmp_path / "d", _dinov2_config(), tensors)
  with pytest.raises(hf_vit.HFImportError, match="layer_scale2.lambda1"):
    hf_vit.load_vit(folder)


def test_bicubic_matrix_rows_sum_to_one_and_identity():
  np.testing.assert_allclose(hf_vit.bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
  for old, new in [(37, 8), (4, 8), (8, 4), (37, 16)]:
    np.testing.assert_allclose(hf_vit.bicubic_matrix(old, new).sum(1), 1, atol=1e-12)
