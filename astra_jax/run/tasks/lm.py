"""Causal language modelling: model from a config, data, perplexity.

One task for every causal LM family; ``cfg.family`` picks the model:
``"gpt2"`` (``models.gpt2``) or ``"llama"`` (``models.llama``).  Run folders
written before there was a choice have no ``family`` in their config.json
and are GPT-2.  The families share the config keys variant / vocab_size /
context / exchange / vq and the model interface (``model(tokens, positions)``,
``decode``, ``empty_cache``), so the train and infer CLIs serve both.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from astra_jax.parallel import apply, forward, mesh as mesh_lib
from astra_jax.core import exchange
from astra_jax.run import calibrate, recipe, workdir
from astra_jax.run.tasks import exchanges
from astra_jax.netsim import traffic
from astra_jax.data import text as text_lib
from astra_jax.io import pretrained
from astra_jax.models import gpt2, llama

ModelConfig = gpt2.GPT2Config | llama.LlamaConfig
# family -> (its config class, its model class, what messages call it)
FAMILIES = {"gpt2": (gpt2.GPT2Config, gpt2.GPT2, "GPT-2"),
            "llama": (llama.LlamaConfig, llama.Llama, "Llama")}


def family(cfg: ml_collections.ConfigDict) -> str:
  """The run's model family; config.json files from before Llama have none: GPT-2."""
  name = cfg.get("family", "gpt2")
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; set --config.family to one of "
                     f"{sorted(FAMILIES)}")
  return name


def model_config(cfg: ml_collections.ConfigDict, exchange_spec: str | None = None) -> ModelConfig:
  """The run's model with ``exchange_spec`` (a spec string; default: the run's own).

  A run started from a pretrained checkpoint (``cfg.model``: gguf:PATH, hf:DIR
  or a bundled name) has that checkpoint's architecture, read from its
  metadata; ``cfg.context`` is then the window it trains and evaluates on.
  """
  ex = exchanges.from_config(cfg, exchange_spec)
  if cfg.get("model"):
    source = pretrained.parse(cfg.model)
    model_cfg = pretrained.model_config(source, ex)
    if cfg.context > model_cfg.context:
      raise ValueError(f"--config.context={cfg.context} exceeds {cfg.model}'s context of "
                       f"{model_cfg.context} tokens; use a window of at most {model_cfg.context}")
    return model_cfg
  config_cls, _, _ = FAMILIES[family(cfg)]
  return config_cls(variant=cfg.variant, vocab_size=cfg.vocab_size, context=cfg.context,
                    exchange=ex)


def use_pretrained(cfg: ml_collections.ConfigDict, spec: str) -> None:
  """Points ``cfg`` at the pretrained model ``spec``: its family, vocabulary and
  tokenizer (in place; PretrainedError naming the fix for a bad spec)."""
  source = pretrained.parse(spec)
  cfg.model = spec
  cfg.family = pretrained.family(source)
  cfg.tokenizer = spec
  cfg.variant = "pretrained"
  cfg.vocab_size = int(pretrained.model_config(source).vocab_size)


def load_pretrained(spec: str, target: ModelConfig) -> nnx.Module:
  """The weights of the pretrained model ``spec`` in a model built for ``target``
  (which may differ in its exchange, whose state starts fresh, and its sync)."""
  # a big checkpoint (SmolLM2's GGUF: ~13 s on 2 cores) shows a bar after a few seconds
  with calibrate.delayed_bar(None, total=1, desc=f"loading {spec}", unit="model") as bar:
    loaded_cfg, loaded = pretrained.load(pretrained.parse(spec))
    bar.update()
  same = dataclasses.replace(target, exchange=loaded_cfg.exchange, sync=loaded_cfg.sync)
  if same != loaded_cfg:
    raise ValueError(f"{spec} does not hold the model this run describes; start a new "
                     "--workdir for it")
  graphdef, _, rest = apply.split_model(build(target))
  _, params, _ = apply.split_model(loaded)
  return nnx.merge(graphdef, params, rest)


def kmeans_codebooks(model: nnx.Module, cfg: ml_collections.ConfigDict, ids: np.ndarray) -> None:
  """ASTRA's codebook start: k-means on ``model``'s own K/V over ``cfg.kmeans_tokens``
  tokens of random ``cfg.context`` windows of ``ids`` (training text), in place.

  The windows are a pure function of ``ids``, the context and the seed, so a
  second run with the same model and text loads the result from the codebook
  cache (``astra_jax.run.codebook_cache``) instead of fitting again.
  """
  rng = np.random.default_rng([cfg.seed, 10**9])
  positions = jnp.arange(cfg.context)
  windows = ((jnp.asarray(text_lib.random_windows(ids, 1, cfg.context, rng)[0]), positions)
             for _ in range(-(-cfg.kmeans_tokens // cfg.context)))
  calibrate.kmeans_codebooks(model, windows, jax.random.PRNGKey(cfg.seed),
                             max_tokens=cfg.kmeans_tokens)


def load_tokenizer(cfg: ml_collections.ConfigDict) -> text_lib.Tokenizer:
  """The run's tokenizer: a pretrained model's own, else ``cfg.tokenizer`` ('byte'
  or a folder with tokenizer files)."""
  if pretrained.is_spec(cfg.tokenizer):
    return pretrained.tokenizer(pretrained.parse(cfg.tokenizer))
  return text_lib.load_tokenizer(cfg.tokenizer)


def build(model_cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  model_cls = next(m for c, m, _ in FAMILIES.values() if isinstance(model_cfg, c))
  return model_cls(model_cfg, rngs=nnx.Rngs(seed))


def exchanged_shape(model_cfg: ModelConfig) -> tuple[int, int]:
  """(values per token in one K (or V) exchange, attention layers): GPT-2 exchanges
  its full width, Llama its K/V heads (kv_heads * head_dim)."""
  if isinstance(model_cfg, llama.LlamaConfig):
    return model_cfg.kv_dim, model_cfg.sizes.layers
  width, layers, _ = model_cfg.sizes
  return width, layers


make_optimizer = recipe.optimizer  # (cfg, total_steps) -> the run's AdamW schedule


def restore_trained(run: str, target: ModelConfig | None = None, step: int | None = None):
  """(cfg, model config, model) from a run; ``target`` may change only the exchange."""
  cfg = workdir.load_config(run, "lm")
  trained = model_config(cfg)
  target = target or trained
  if (type(target) is not type(trained)
      or dataclasses.replace(target, exchange=trained.exchange, sync=trained.sync) != trained):
    what = cfg.get("model") or trained.variant
    raise ValueError(f"{run} holds {FAMILIES[family(cfg)][2]} {what} (vocab "
                     f"{trained.vocab_size}, context {trained.context}); the requested model "
                     "differs in more than the exchange or the tensor-parallel sync")
  model = recipe.restore(run, cfg, lambda: build(trained), lambda: build(target),
                         exchange.same_state(target.exchange, trained.exchange), step)
  return cfg, target, model


def token_ids(text: str, tokenizer) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def evaluate(model: nnx.Module, cfg, model_cfg: ModelConfig, ids: np.ndarray,
             mesh_size: int, batch_size: int, windows: int | None,
             tensor: bool = False) -> dict:
  """Validation perplexity at ``mesh_size`` devices and bytes per device (HLO).

  ``tensor``: tensor-parallel over the devices with ``model_cfg.sync`` instead
  of sequence-parallel with ``model_cfg.exchange``.
  """
  if not tensor:
    mesh_lib.check_divisible(cfg.context, mesh_size, what="context")
  fwd = forward.inference_forward(model, mesh_size, out_seq_dim=1, tensor=tensor)
  positions = jnp.arange(cfg.context)

  def nll(params, rest, inputs, positions, targets):
    logits, rest, _ = fwd.fn(params, rest, inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), rest
  nll = forward.timed_compile(jax.jit(nll), "the evaluation forward")

  total, count = 0.0, 0
  rest = fwd.rest
  for inputs, targets in tqdm(text_lib.eval_windows(ids, batch_size, cfg.context, windows),
                              desc="evaluate", unit="batch", leave=False):
    inputs, pos, targets_ = fwd.place((inputs, positions, targets), (1, 0, 1))
    batch_nll, rest = nll(fwd.params, rest, inputs, pos, targets_)  # rest: fresh link losses
    total += float(mesh_lib.fetch(batch_nll))
    count += targets.size
  kv_dim, layers = exchanged_shape(model_cfg)
  one = jax.ShapeDtypeStruct((1, cfg.context), jnp.int32)
  example = (fwd.fn, (fwd.params, rest, one, positions))
  start = time.perf_counter()  # the summary compiles fwd.fn alone for its HLO
  if tensor:
    summary = traffic.tensor_summary(*example, model_cfg.sync, layers=layers,
                                     values=cfg.context * model_width(model_cfg),
                                     mesh_size=mesh_size)
  else:
    summary = traffic.exchange_summary(*example, model_cfg.exchange, width=kv_dim,
                                       layers=layers, tokens=cfg.context, mesh_size=mesh_size)
  forward.say_compiled("the forward again for its bytes per device",
                       time.perf_counter() - start)
  loss = total / count
  return {
      "perplexity": math.exp(loss), "loss": loss, "tokens": count, **summary,
      "drop_rate": model_cfg.exchange.drop_rate,
      "family": family(cfg), "variant": model_cfg.variant, "context": cfg.context,
  }


def model_width(model_cfg: ModelConfig) -> int:
  """The residual stream's width (what a tensor-parallel all-reduce sums per token)."""
  return model_cfg.sizes[0] if isinstance(model_cfg, gpt2.GPT2Config) else model_cfg.sizes.width
