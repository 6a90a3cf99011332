"""Which K/V exchange a run is built, evaluated or fine-tuned with.

A run's ``config.json`` names its exchange (``cfg.exchange``) and, for ``vq``,
its options (``cfg.vq``).  The CLIs take the bench's spec strings on top:
``exact``, ``ring``, ``vq``, ``vq:drop_rate=0.05``; options a spec names
override the run's, and an unknown option is named as an option.
"""

from __future__ import annotations

import ml_collections

from astra_jax.core import exchange
from astra_jax.core.specs import parse_spec


def from_config(cfg: ml_collections.ConfigDict, spec: str | None = None) -> exchange.Exchange:
  """``spec`` (default: the run's own ``cfg.exchange``) as a strategy; ``vq``
  starts from the run's ``cfg.vq`` options.  ValueError naming the fix."""
  name, options = parse_spec(spec or cfg.exchange, example="vq:groups=32,codebook_size=1024")
  if name == "vq" or (name == "stream" and options.get("quantize", True) not in (False, "false")):
    options = {**dict(cfg.vq), **options}
  return exchange.make_exchange(name, **options)


def for_evaluation(cfg: ml_collections.ConfigDict, spec: str | None, run: str,
                   train_cli: str) -> exchange.Exchange:
  """The exchange ``run`` is evaluated with: ``spec`` if the run's weights and
  state serve it (a ``vq`` evaluation needs the run's own codebooks, so only
  the simulated ``drop_rate`` may differ), else ValueError naming the fix."""
  target, trained = from_config(cfg, spec), from_config(cfg)
  quantized = isinstance(target, exchange.VQExchange) and getattr(target, "quantize", True)
  if quantized and not exchange.same_state(target, trained):
    if trained.name != "vq":
      raise ValueError(
          f"{run} was trained with the {trained.name!r} exchange and has no codebooks; "
          f"fine-tune one first: python -m {train_cli} --init-from {run} "
          "--config.exchange=vq --workdir NEW_DIR")
    raise ValueError(
        f"{run}'s codebooks are G={trained.groups} groups of K={trained.codebook_size} "
        f"entries; evaluate it with --exchange vq (only drop_rate and overlap may change), or fine-tune "
        f"a run with the other sizes: python -m {train_cli} --init-from {run} "
        "--config.exchange=vq --config.vq.groups=G --workdir NEW_DIR")
  return target
