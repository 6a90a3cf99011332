"""The model a server runs, found as ``infer.gpt2 --prompt`` finds it: a pretrained
checkpoint (``--model gguf:PATH | hf:DIR | smollm2``, ASTRA zero-shot with
k-means codebooks for ``--exchange vq``) or a training run (``--workdir``, its
own exchange unless ``--exchange`` names another it can serve)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from astra_jax.data import text as text_lib
from astra_jax.io import pretrained
from astra_jax.run import config, workdir as workdir_lib
from astra_jax.run.tasks import exchanges, lm


@dataclasses.dataclass
class Loaded:
  name: str  # the model id clients ask for
  spec: str | None  # the pretrained model's spec (None for a run folder)
  model: nnx.Module
  model_cfg: Any  # GPT2Config | LlamaConfig
  tokenizer: Any
  context: int  # tokens per sequence: prompt + reply


def model_name(model: str | None, workdir: str | None) -> str:
  """``smollm2``, a GGUF file's name without ``.gguf``, or a folder's name."""
  if model in pretrained.BUNDLED:
    return model
  path = (model.partition(":")[2] if model else workdir).rstrip("/")
  name = os.path.basename(path)
  return name[:-len(".gguf")] if name.endswith(".gguf") else name


def load(model: str | None = None, workdir: str | None = None, *, exchange: str | None = None,
         context: int | None = None, text: str | None = None, step: int | None = None) -> Loaded:
  """ValueError naming the fix for a bad model, exchange or context."""
  if model:
    cfg = config.load("pretrained_lm", [])
    lm.use_pretrained(cfg, model)
    model_context = pretrained.model_config(pretrained.parse(model)).context
    cfg.context = context or min(cfg.context, model_context)
    cfg.text = text or cfg.text
    if step is not None:
      raise ValueError("--step picks a checkpoint of a --workdir run; --model has none")
  else:
    if context or text:
      raise ValueError("--context and --text are for --model; a run serves the window it "
                       "trained with")
    cfg = workdir_lib.load_config(workdir, "lm")
    exchanges.for_evaluation(cfg, exchange, workdir, f"train.{lm.family(cfg)}")
  target = lm.model_config(cfg, exchange)
  tokenizer = lm.load_tokenizer(cfg)
  if model:
    model_cfg, net = target, lm.load_pretrained(model, target)
    if model_cfg.exchange.name == "vq":  # ASTRA zero-shot: k-means codebooks only
      train_text, _ = text_lib.load_splits(cfg.text)
      lm.kmeans_codebooks(net, cfg, lm.token_ids(train_text, tokenizer))
  else:
    cfg, model_cfg, net = lm.restore_trained(workdir, target, step)
  return Loaded(model_name(model, workdir), model, net, model_cfg, tokenizer, cfg.context)
