"""A pretrained ViT (default: the bundled DINOv2-S/14) fine-tuned on Fashion-MNIST
upsampled to 112x112 (8x8 = 64 patches of 14x14), 4-way sequence parallel.

  python -m train.vit --init-from dinov2-s --workdir workdir/dinov2        # exact
  python -m train.vit --init-from workdir/dinov2 --workdir workdir/dinov2_g32 \\
      --config.exchange=vq --config.vq.groups=32 --config.epochs=1          # ASTRA fine-tuning
  python -m infer.vit --workdir workdir/dinov2 --mesh=4                    # evaluate
  python -m train.vit --init-from hf:DIR --config.new_head=true            # a HF classifier
  python -m infer.vit --model hf:DIR --mesh=4                              # a HF classifier as is

``--init-from`` takes hf:DIR (a transformers ViT / DINOv2 folder), onnx:FILE
(a DINOv2 ONNX backbone) or dinov2-s; the run keeps that spec in ``model`` and
rebuilds the architecture from it.  Each 28x28 image is upsampled 4x (nearest)
to 112x112; the gray channel is fed as RGB normalised the checkpoint's way
(folded exactly into the patch embedding, ``astra_jax.io.hf_vit``).  A
backbone gets a fresh zero head; a classifier keeps its head only when its
classes match the data's (else ``--config.new_head=true``).

Cost on this project's 2-core CPU host (AMD EPYC Zen 4, load average 4-7 from
other jobs), DINOv2-S/14 at 112x112: loading 1 s (the first use converts the
ONNX file, about 3 s); one forward of a batch of 32 images 1.55 s at mesh 1
(48 ms an image; batch 128: 6.9 s) and 1.9-2.1 s at mesh 4 (4 fake devices);
one training step (AdamW, batch 32, mesh 4) 4.5-6.7 s after a 20-55 s compile,
so the 1,875 steps of an epoch take about 2.5-3.5 h.  At 56x56
(``--config.image_size=56 --config.upsample=2``, 16 patches: what
``python -m infer.results vit-pretrained`` runs) a step takes 0.9 s exact and
1.3-2.1 s with ASTRA; 300 exact steps reach 76.75% on the first 2,000 test
images, 400 steps 80.20% (RESULTS.md).
"""

import ml_collections

from configs import vit_fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  c = vit_fashion_mnist.get_config()
  c.model = "dinov2-s"  # hf:DIR | onnx:FILE | dinov2-s; --init-from sets it
  c.variant = "pretrained"  # the architecture is the checkpoint's
  c.image_size = 112
  c.upsample = 4  # 28 -> 112 (nearest), then padded to image_size if smaller
  c.new_head = False  # true: a fresh zero head even when the checkpoint has a classifier
  c.epochs = 1
  c.batch_size = 32
  c.lr = 1e-4  # a pretrained model: small steps
  c.weight_decay = 0.05
  c.warmup_steps = 100
  c.checkpoint_every = 200
  c.log_every = 20
  c.eval_batch_size = 100
  c.kmeans_tokens = 4096
  return c
