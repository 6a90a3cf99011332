"""Evaluate or sample a trained Llama run, sequence-parallel prefill.

  python -m infer.llama --workdir workdir/llama --mesh=4 --eval
  python -m infer.llama --workdir workdir/llama --mesh=4 --prompt "ROMEO:" --max-new-tokens 200

The GPT-2 infer CLI (``infer.gpt2``, where every flag is documented): the
model family is read from the run's config.json.
"""

from __future__ import annotations

from astra_jax.run import cli
from infer import gpt2


def main(argv=None):
  gpt2.main(argv, description="Evaluate or sample a trained Llama run, sequence-parallel prefill.")


if __name__ == "__main__":
  cli.entry(main)
