"""Llama "micro" (width 128, 4 layers, 4 query / 2 K/V heads) on Shakespeare, byte
tokens, 4-way sequence parallel.

  python -m train.llama --mesh=4                      # exact exchange
  python -m train.llama --mesh=4 --init-from workdir/llama --workdir workdir/llama_g32 \
      --config.exchange=vq --config.steps=150 --config.lr=5e-4   # ASTRA fine-tuning
  python -m infer.llama --workdir workdir/llama_g32 --mesh=4 --eval

The GPT-2 recipe (``configs/gpt2_shakespeare``: same corpus, held-out plays,
windows, optimizer) with the Llama family.  ASTRA exchanges the 2 K/V heads
(kv_dim 64 per token), so G=32 groups are 2 values each.
Cost on this project's 2-core CPU machine (4 fake devices, JAX 0.12), from a
20-step run (``--max-steps=20``; steps 5..20, after the ~8 s compile) while
other jobs kept the load average near 7: 0.99 s/step, against 0.87 s/step for
GPT-2 micro measured alongside (its config: about 0.4 s/step alone), so Llama micro costs
about 1.15x GPT-2 micro per step.  The default 1000 steps of 16 x 256 tokens
(4.1M tokens) should take about 8 min alone and 10 to 17 min on shared cores.
Perplexity not yet measured (no full run made).
"""

import ml_collections

from configs import gpt2_shakespeare


def get_config() -> ml_collections.ConfigDict:
  c = gpt2_shakespeare.get_config()
  c.family = "llama"
  c.variant = "micro"  # nano / micro / mini; 1b / 3b / 8b are Llama 3 shapes
  c.steps = 1000  # about 10 minutes here (see above)
  return c
