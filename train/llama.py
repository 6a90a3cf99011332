"""Train a Llama language model sequence-parallel: ``python -m train.llama --mesh=4``.

The GPT-2 train CLI (``train.gpt2``) with the Llama defaults: --config
llama_shakespeare, --workdir workdir/llama.  Every flag is the same:

  --config NAME      a module in configs/ (default llama_shakespeare)
  --workdir DIR      config.json, checkpoints/, metrics.jsonl; rerunning resumes
                     (one trainer at a time: a second one is refused, naming the first)
  --init-from DIR    start from another run's weights (ASTRA fine-tuning with
                     --config.exchange=vq: k-means codebooks from its own K/V)
  --config.KEY=VALUE typed overrides, e.g. --config.steps=300 --config.vq.groups=16
  --show-config      print every key (KEY: TYPE = VALUE, overrides applied) and exit

The last line printed is one JSON object with the validation perplexity.
"""

from __future__ import annotations

from astra_jax.run import cli
from train import gpt2


def main(argv=None):
  gpt2.main(argv, config="llama_shakespeare", workdir="workdir/llama", name="Llama")


if __name__ == "__main__":
  cli.entry(main)
