"""Train a GPT-2 language model sequence-parallel: ``python -m train.gpt2 --mesh=4``.

The same CLI trains every causal LM family (``train.llama`` calls ``main``
with its own default config and workdir); the config's ``family`` picks it.

  --config NAME      a module in configs/ (default gpt2_shakespeare)
  --workdir DIR      config.json, checkpoints/, metrics.jsonl; rerunning resumes
                     (one trainer at a time: a second one is refused, naming the first)
  --init-from SRC    start from another run's weights (a run folder) or a pretrained
                     model (gguf:PATH, hf:DIR, smollm2; the config then defaults to
                     configs/pretrained_lm and the model's tokenizer is used); with
                     --config.exchange=vq the codebooks start by k-means on its own K/V
  --config.KEY=VALUE typed overrides, e.g. --config.steps=300 --config.vq.groups=16
  --show-config      print every key (KEY: TYPE = VALUE, overrides applied) and exit

The last line printed is one JSON object with the validation perplexity.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def main(argv=None, *, config: str = "gpt2_shakespeare", workdir: str = "workdir/gpt2",
         name: str = "GPT-2"):
  """``config`` / ``workdir``: the defaults of --config / --workdir; ``name`` for --help."""
  args, overrides = cli.train_args(
      sys.argv[1:] if argv is None else argv, config=config, workdir=workdir,
      description=f"Train {name} with ASTRA sequence parallelism.")
  default_config = config  # (the name is taken by the config module below)
  if args.show_config:
    cli.show_config(config_name(args, default_config), overrides)
  cli.setup_devices(args)
  import jax.numpy as jnp
  import numpy as np
  from astra_jax.io import checkpoint, pretrained
  from astra_jax.run import config, recipe, training, workdir
  from astra_jax.parallel import mesh as mesh_lib
  from astra_jax.data import text as text_lib
  from astra_jax.run.tasks import lm

  try:
    from_checkpoint = pretrained.is_spec(args.init_from)
    cfg = config.load(config_name(args, default_config), overrides)
    if from_checkpoint:
      lm.use_pretrained(cfg, args.init_from)
    elif args.init_from:  # a run folder, checked before anything is written
      workdir.load_config(args.init_from, "lm")
    training.check_settings(
        cfg, at_least_1=("steps", "batch_size", "context", "checkpoint_every", "log_every",
                         "eval_batch_size", "eval_windows", "kmeans_tokens"),
        positive=("lr",), non_negative=("weight_decay", "warmup_steps"))
    cli.check_writable(args.workdir, "--workdir", directory=True)
    tokenizer = lm.load_tokenizer(cfg)
    if not cfg.get("model"):  # a pretrained model keeps its own (possibly padded) vocabulary
      cfg.vocab_size = int(tokenizer.vocab_size)
    train_text, valid_text = text_lib.load_splits(cfg.text)
    train_ids, valid_ids = lm.token_ids(train_text, tokenizer), lm.token_ids(valid_text, tokenizer)
    model_cfg = lm.model_config(cfg)
    mesh_lib.check_divisible(cfg.context, args.mesh, what="context")
    mesh = mesh_lib.seq_mesh_or_none(args.mesh)
    workdir.lock(args.workdir)  # inputs checked; the first write: one trainer per folder
    ckpt = checkpoint.Checkpointer(workdir.checkpoint_dir(args.workdir),
                                   save_every=cfg.checkpoint_every)
    positions = jnp.arange(cfg.context)

    def batch(step):
      rng = np.random.default_rng([cfg.seed, step])
      inputs, targets = text_lib.random_windows(train_ids, cfg.batch_size, cfg.context, rng)
      return (jnp.asarray(inputs), positions), jnp.asarray(targets)

    model = recipe.start_model(
        init_from=args.init_from, ckpt=ckpt, build=lambda: lm.build(model_cfg, cfg.seed),
        restore=(lambda spec: lm.load_pretrained(spec, model_cfg)) if from_checkpoint
        else (lambda run: lm.restore_trained(run, model_cfg)[2]), exchange=cfg.exchange,
        calib_batches=lambda: (batch(10**9 + i)[0] for i in range(10**6)),  # unseen windows
        seed=cfg.seed, kmeans_tokens=cfg.kmeans_tokens)
    total = cfg.steps if args.max_steps is None else min(cfg.steps, args.max_steps)
  except ValueError as e:
    cli.fail(str(e))
  try:
    model = recipe.train(model, lm.make_optimizer(cfg, total), cfg=cfg, run=args.workdir,
                         mesh=mesh, ckpt=ckpt, total=total, batch_fn=batch, out_seq_dim=1,
                         items_per_step=cfg.batch_size * cfg.context)
  except training.Stopped as e:  # a signal (checkpoint saved) or a non-finite loss
    cli.fail(str(e), e.code)
  except (checkpoint.CheckpointError, OSError) as e:
    cli.fail(str(e))
  result = lm.evaluate(model, cfg, model_cfg, valid_ids, args.mesh, cfg.eval_batch_size,
                       cfg.eval_windows)
  training.MetricsLog(args.workdir).write(total, valid_perplexity=result["perplexity"])
  cli.print_result(dict(result, steps=total, workdir=args.workdir))


def config_name(args, default_config: str) -> str:
  """A pretrained start takes its own recipe (pretrained_lm) unless --config names another."""
  if not args.init_from or args.config != default_config:
    return args.config
  from astra_jax.io import pretrained  # (imports jax)
  return "pretrained_lm" if pretrained.is_spec(args.init_from) else args.config


if __name__ == "__main__":
  cli.entry(main)
