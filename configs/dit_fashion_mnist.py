"""A small DiT (width 128, 6 blocks, 4 heads) on Fashion-MNIST padded to 32x32,
patch 4 (an 8x8 grid: bands of 8, 4, 2 or 1 patch rows over 1, 2, 4 or 8
devices), trained by flow matching; the model CoDiT's rows sample from.

  python -m train.dit --mesh=4                        # exact exchange
  python -m infer.dit --workdir workdir/dit --mesh=4 --exchange vq:groups=32 --out grid.png
  python -m infer.results dit --workdir workdir/dit   # the CoDiT table

Cost and result on a 2-core AMD EPYC Zen 4 host (2026-12-06): 2 epochs at
batch 64 (1,874 steps) took 24 min 14 s at mesh 4 with other jobs (tests,
helpers) on the cores, about 2 steps/s while it had them to itself (so about
15 min on a quiet machine); final flow-matching loss 0.179.  Its samples (20
Euler steps, one device) are judged 61.0% of the time as their class by the
main job's ViT (88.97% on real test images), Fréchet (ViT) 9.19 against test
images; exact mesh 4 gives the same images.  RESULTS.md has the CoDiT rows.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.image_size = 32  # 28x28 padded with black
  c.channels = 1  # channels and num_classes are set from the dataset by train.dit
  c.num_classes = 10
  c.patch = 4
  c.width = 128
  c.depth = 6
  c.heads = 4
  c.mlp_ratio = 4
  c.exchange = "exact"
  c.vq = common.vq_defaults()
  c.class_dropout = 0.1  # the null class's share in training (classifier-free guidance)
  c.epochs = 2
  c.batch_size = 64
  c.lr = 1e-3
  c.weight_decay = 0.0
  c.warmup_steps = 200
  c.seed = 0
  c.checkpoint_every = 200
  c.log_every = 50
  c.sample_steps = 20  # the sampler's Euler steps (infer.dit --steps)
  c.guidance = 1.0  # classifier-free guidance scale (infer.dit --guidance)
  return c
