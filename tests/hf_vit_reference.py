"""Hugging Face reference for tests/test_hf_vit.py (runs in .venv-hf, not .venv).

  .venv-hf/bin/python tests/hf_vit_reference.py OUTDIR

builds three tiny random transformers models with a fixed seed, every norm
weight, bias and layer scale randomised so that each one matters, and writes
  OUTDIR/vit/         ViTModel (with its pooler), 3 channels, exact GELU,
                      eps 1e-12, 28x28 images in 7x7 patches (a 4x4 grid)
  OUTDIR/classifier/  ViTForImageClassification, 5 labels, 1 channel, tanh
                      GELU (gelu_pytorch_tanh), no q/k/v biases, 28x28 / 7
  OUTDIR/dinov2/      Dinov2Model, layer scale, mlp_ratio 3, 56x56 / 7 (8x8)
  OUTDIR/reference.npz  NCHW pixel values and transformers' float32 outputs:
    vit_pixels28/vit_hidden28      last_hidden_state at the config's size
    vit_pixels56/vit_hidden56      at 56x56 with interpolate_pos_encoding=True
                                   (4x4 position grid -> 8x8, bicubic)
    cls_pixels/cls_logits          the classifier's logits
    dino_pixels56/dino_hidden56    last_hidden_state at the config's size
    dino_pixels28/dino_hidden28    at 28x28 (8x8 grid -> 4x4, bicubic)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import transformers

SEED = 1234


def _randomise(model):
  """LayerNorm weights/biases and layer scales start at 1 / 0 / 1: make them matter."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith(".weight") or "lambda1" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.2)
      elif "cls_token" in name or "position_embeddings" in name:
        p.normal_(0.0, 0.5)
  return model.eval()


def main(out: str) -> None:
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(SEED)
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                initializer_range=0.2, attn_implementation="eager")
  vit = _randomise(transformers.ViTModel(transformers.ViTConfig(
      intermediate_size=48, image_size=28, patch_size=7, num_channels=3, hidden_act="gelu",
      layer_norm_eps=1e-12, **common), add_pooling_layer=True))
  classifier = _randomise(transformers.ViTForImageClassification(transformers.ViTConfig(
      intermediate_size=64, image_size=28, patch_size=7, num_channels=1,
      hidden_act="gelu_pytorch_tanh", qkv_bias=False, num_labels=5, **common)))
  dinov2 = _randomise(transformers.Dinov2Model(transformers.Dinov2Config(
      mlp_ratio=3, image_size=56, patch_size=7, num_channels=3, hidden_act="gelu",
      layer_norm_eps=1e-6, **common)))
  for name, model in (("vit", vit), ("classifier", classifier), ("dinov2", dinov2)):
    model.save_pretrained(os.path.join(out, name))

  g = torch.Generator().manual_seed(SEED)
  pixels = lambda c, s: torch.randn(2, c, s, s, generator=g)
  ref = {"vit_pixels28": pixels(3, 28), "vit_pixels56": pixels(3, 56),
         "cls_pixels": pixels(1, 28), "dino_pixels56": pixels(3, 56),
         "dino_pixels28": pixels(3, 28)}
  with torch.no_grad():
    ref["vit_hidden28"] = vit(ref["vit_pixels28"]).last_hidden_state
    ref["vit_hidden56"] = vit(ref["vit_pixels56"], interpolate_pos_encoding=True).last_hidden_state
    ref["cls_logits"] = classifier(ref["cls_pixels"]).logits
    ref["dino_hidden56"] = dinov2(ref["dino_pixels56"]).last_hidden_state
    ref["dino_hidden28"] = dinov2(ref["dino_pixels28"]).last_hidden_state
  np.savez(os.path.join(out, "reference.npz"),
           versions=np.asarray([torch.__version__, transformers.__version__]),
           **{k: v.float().numpy() for k, v in ref.items()})


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: .venv-hf/bin/python tests/hf_vit_reference.py OUTDIR")
  main(sys.argv[1])
