"""The model a server runs, found as ``infer.gpt2 --prompt`` finds it: a pretrained
checkpoint (``--model gguf:PATH | hf:DIR | smollm2``, ASTRA zero-shot with
k-means codebooks for ``--exchange vq``) or a training run (``--workdir``, its
own exchange unless ``--exchange`` names another it can serve).

``load_group`` is what a rank of the multi-rank server loads: the same model
plus its ``stream`` twins (``Loaded.variants``), one per plan that crosses
processes: exact K/V always, and ASTRA at each G it has codebooks for (a run's
own, or k-means at the G values asked for).  The twins share the weights."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from astra_jax.core import exchange as exchange_lib
from astra_jax.data import text as text_lib
from astra_jax.io import pretrained
from astra_jax.parallel import apply
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
  # load_group: the stream twins, by plan label ("exact", "G=32", ...), and the
  # first ``context`` tokens of the held-out text (each plan's perplexity at start)
  variants: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)
  held_out: list[int] = dataclasses.field(default_factory=list)


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
  return _load(model, workdir, exchange=exchange, context=context, text=text, step=step)[0]


def plan_label(ex: exchange_lib.Exchange) -> str:
  """``exact`` or ``G=32`` (``G=32,K=256`` for a codebook size other than 1024)."""
  if not getattr(ex, "quantize", ex.name == "vq"):
    return "exact"
  return f"G={ex.groups}" + ("" if ex.codebook_size == 1024 else f",K={ex.codebook_size}")


def stream_twin(ex: exchange_lib.Exchange) -> exchange_lib.Exchange:
  """The ``stream`` exchange sending what ``ex`` sends (exact K/V or its codes)."""
  if ex.name == "vq" or (ex.name == "stream" and ex.quantize):
    return exchange_lib.make_exchange("stream", groups=ex.groups,
                                      codebook_size=ex.codebook_size)
  if ex.name in ("exact", "stream"):
    return exchange_lib.make_exchange("stream", quantize=False)
  raise ValueError(f"the multi-rank server streams exact K/V or ASTRA codes; the {ex.name!r} "
                   "exchange is not one of them: use --exchange exact or vq:groups=G")


def _twin(net: nnx.Module, model_cfg, ex: exchange_lib.Exchange) -> nnx.Module:
  """``net`` (weights and, for the same codebook sizes, codebooks) with exchange ``ex``."""
  graphdef, _, fresh = apply.split_model(lm.build(dataclasses.replace(model_cfg, exchange=ex)))
  _, params, rest = apply.split_model(net)
  keep = exchange_lib.same_state(ex, model_cfg.exchange)
  return nnx.merge(graphdef, params, rest if keep else fresh)


def load_group(model: str | None = None, workdir: str | None = None, *,
               exchanges_asked: list[str] | None = None, context: int | None = None,
               text: str | None = None, step: int | None = None) -> Loaded:
  """``load`` plus the stream twins (module docstring): ``exact`` and, for
  ``--model``, each vq spec of ``exchanges_asked`` with k-means codebooks; for
  ``--workdir``, the run's own exchange (a vq run's codebooks) unless
  ``exchanges_asked`` names others it can serve."""
  asked = list(exchanges_asked or [])
  loaded, cfg = _load(model, workdir, exchange="exact" if model else None, context=context,
                      text=text, step=step)
  base_cfg, net = loaded.model_cfg, loaded.model
  specs = asked or ([] if model else [None])
  for spec in specs if not model else ():
    exchanges.for_evaluation(cfg, spec, workdir, f"train.{lm.family(cfg)}")
  wanted = [exchanges.from_config(cfg, spec) for spec in specs]
  twins = {"exact": stream_twin(exchange_lib.make_exchange("exact"))}
  for ex in wanted:
    twins.setdefault(plan_label(ex), stream_twin(ex))
  train_text, held_out = text_lib.load_splits(cfg.text)
  ids = None
  for label, ex in twins.items():
    twin = _twin(net, base_cfg, ex)
    if model and label != "exact":  # ASTRA zero-shot: k-means codebooks only
      if ids is None:
        ids = lm.token_ids(train_text, loaded.tokenizer)
      lm.kmeans_codebooks(twin, cfg, ids)
    loaded.variants[label] = twin
  loaded.held_out = [int(i) for i in lm.token_ids(held_out[:loaded.context * 16],
                                                  loaded.tokenizer)[:loaded.context]]
  return loaded


def _load(model, workdir, *, exchange, context, text, step) -> tuple[Loaded, Any]:
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
  return Loaded(model_name(model, workdir), model, net, model_cfg, tokenizer, cfg.context), cfg
