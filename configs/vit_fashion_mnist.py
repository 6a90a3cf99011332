"""ViT-mu/4 on Fashion-MNIST padded to 32x32 (64 patches), sequence-parallel.

  python -m train.vit --mesh=4                                   # exact exchange
  python -m train.vit --mesh=4 --config.epochs=1 --workdir=/tmp/v  # overrides

Cost measured on this project's 2-core CPU machine (JAX 0.12, fake devices):
one epoch at batch 128 takes about 2 min at --mesh=1 and about 6 min at
--mesh=4 (4 fake devices share 2 cores). Accuracy targets are tracked in the
ViT issue; this config is the bundled default, not a tuned result yet.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.image_size = 32
  c.variant = "mu/4"
  c.class_token = "distributed"
  c.exchange = "exact"
  c.vq = ml_collections.ConfigDict(dict(
      groups=32, codebook_size=1024, commitment=2.5e-4, noise_scale=1.0,
      ema_decay=0.99, dead_threshold=0.01))
  c.augment = True  # random crop (pad 2) + horizontal flip
  c.epochs = 2
  c.batch_size = 128
  c.lr = 1e-3
  c.weight_decay = 0.05
  c.warmup_steps = 200
  c.seed = 0
  c.checkpoint_every = 200
  c.log_every = 50
  c.eval_batch_size = 500
  return c
