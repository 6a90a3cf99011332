"""train.vit / infer.vit with pretrained image models (hf:DIR, onnx:FILE, dinov2-s),
on the tiny synthetic IDX dataset of tests/test_vit_cli.py (8x8 gray images,
upsampled 2x to 16x16 here).

The checkpoints are tiny random transformers folders written with
safetensors.numpy (no torch): a 3-channel Dinov2Model backbone (the gray
images are fed to it as RGB, normalised its way), a 10-class and a 5-class
1-channel ViTForImageClassification, and a Swin config.  Bad inputs exit 2
with one line, checked in-process (no subprocess start per case).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="these tests write checkpoints with safetensors")
from safetensors.numpy import save_file  # noqa: E402

from cli_helpers import last_json, run, write_idx_dataset  # noqa: E402
from astra_jax.io import hf_vit  # noqa: E402

TRAIN = ["--config.image_size=16", "--config.upsample=2", "--config.epochs=1",
         "--config.batch_size=16", "--config.log_every=1", "--config.warmup_steps=1",
         "--config.eval_batch_size=16", "--config.lr=1e-3"]


def _folder(path, config, classifier_prefix=None, preprocessor=None):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  if preprocessor:
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
  if config["model_type"] not in hf_vit.FAMILIES:
    return path
  rng = np.random.default_rng(0)
  tensors = {k: rng.normal(0, 0.3, s).astype(np.float32)
             for k, s in hf_vit.expected_shapes(config).items()}
  if classifier_prefix is not None:
    labels = len(config["id2label"])
    tensors = {classifier_prefix + k: v for k, v in tensors.items()}
    tensors["classifier.weight"] = rng.normal(0, 0.3, (labels, config["hidden_size"]))
    tensors["classifier.bias"] = rng.normal(0, 0.3, labels)
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()},
            str(path / "model.safetensors"))
  return path


def _vit_classifier(labels):
  return {"model_type": "vit", "architectures": ["ViTForImageClassification"],
          "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 32, "image_size": 16, "patch_size": 4, "num_channels": 1,
          "hidden_act": "gelu", "layer_norm_eps": 1e-12,
          "id2label": {str(i): f"c{i}" for i in range(labels)}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
  gray = {"image_mean": [0.5], "image_std": [0.5]}
  dinov2 = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_ratio": 2,
            "image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_act": "gelu"}
  return {"data": write_idx_dataset(root / "data"),
          "dinov2": _folder(root / "dinov2", dinov2, preprocessor=imagenet),
          "cls10": _folder(root / "cls10", _vit_classifier(10), "vit.", gray),
          "cls5": _folder(root / "cls5", _vit_classifier(5), "vit.", gray),
          "swin": _folder(root / "swin", {"model_type": "swin", "architectures": ["SwinModel"]})}


def _in_process(module, *argv, capsys):
  """The CLI's JSON result line, run in this process (no second jax start-up)."""
  import importlib
  capsys.readouterr()
  importlib.import_module(module).main(list(argv))
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_finetune_a_pretrained_backbone_then_evaluate_the_run(folders, tmp_path, capsys):
  workdir = tmp_path / "run"
  spec = f"hf:{folders['dinov2']}"
  trained = last_json(run("train.vit", "--mesh=2", f"--init-from={spec}",
                          f"--workdir={workdir}", f"--data-dir={folders['data']}", *TRAIN,
                          "--config.eval_examples=20"))
  # the run scores the first 20 of the 32 test images, and so does infer.vit on it
  assert (trained["steps"], trained["examples"], trained["variant"]) == (4, 20, "custom/4")
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["model"], saved["image_size"], saved["upsample"]) == (spec, 16, 2)
  again = _in_process("infer.vit", f"--workdir={workdir}", "--mesh=4",
                      f"--data-dir={folders['data']}", capsys=capsys)
  assert again["accuracy"] == trained["accuracy"]  # the run rebuilt from its spec
  assert again["examples"] == 20


def test_evaluate_a_pretrained_classifier_as_is(folders, capsys):
  """infer.vit --model: the 8x8 images upsampled 2x to the model's 16x16; the
  accuracy is the one of the same classifier computed here directly."""
  spec = f"hf:{folders['cls10']}"
  result = _in_process("infer.vit", f"--model={spec}", "--mesh=2",
                       f"--data-dir={folders['data']}", capsys=capsys)
  assert (result["model"], result["examples"], result["exchange"]) == (spec, 32, "exact")
  from astra_jax.data import images as data
  from astra_jax.models import vit
  _, model = hf_vit.load_vit(folders["cls10"], input_stats=data.channel_stats("fashion_mnist"))
  split = data.load_image_dataset("fashion_mnist", folders["data"], "test")
  x = data.normalize(data.upsample(split.images, 2), "fashion_mnist")
  logits = model(vit.patchify(jnp.asarray(x), 4), jnp.arange(16))
  assert result["accuracy"] == float(np.mean(np.argmax(logits, -1) == split.labels))


def _bad_onnx(path):
  from onnx import TensorProto, helper, save
  graph = helper.make_graph(
      [helper.make_node("Add", ["x", "w"], ["y"])], "add",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
      [helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])])
  save(helper.make_model(graph), str(path))
  return path


@pytest.mark.parametrize("case", ["unknown architecture", "patch does not tile",
                                  "not the backbone", "classes differ", "no classifier"])
def test_bad_pretrained_input_one_line_exit_2(folders, tmp_path, capsys, case):
  pytest.importorskip("onnx")
  import infer.vit
  import train.vit
  data = f"--data-dir={folders['data']}"
  cli, argv, message = {
      "unknown architecture": (train.vit, [f"--init-from=hf:{folders['swin']}", *TRAIN],
                               "describes a 'swin' model"),
      "patch does not tile": (train.vit, [f"--init-from=hf:{folders['dinov2']}", *TRAIN,
                                          "--config.image_size=18"],
                              "image size 18 is not a multiple of patch 4"),
      "not the backbone": (train.vit, [f"--init-from=onnx:{_bad_onnx(tmp_path / 'a.onnx')}",
                                       *TRAIN], "is not the expected DINOv2 backbone"),
      "classes differ": (train.vit, [f"--init-from=hf:{folders['cls5']}", *TRAIN],
                         "5-class classifier but the data has 10 classes; start a fresh "
                         "10-class head with new_head (train.vit: --config.new_head=true)"),
      "no classifier": (infer.vit, [f"--model=hf:{folders['dinov2']}"],
                        "holds a backbone without a classifier"),
  }[case]
  workdir = [f"--workdir={tmp_path / 'run'}"] if cli is train.vit else []
  with pytest.raises(SystemExit) as exit:
    cli.main([*argv, *workdir, data, "--mesh=2"])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert exit.value.code == 2 and len(lines) == 1 and message in lines[0], lines
  assert not (tmp_path / "run").exists()  # refused before anything was written
