"""Pick SPD's drop set for a trained run: per-block sensitivity, classes, budget, distillation.

  python -m infer.spd --workdir workdir/gpt2 --mesh 4 --budget 2
  python -m infer.spd --workdir workdir/vit --mesh 4 --budget 2 --out results/spd_vit.json

Evaluates the run tensor-parallel over ``--mesh`` devices with plain tensor
parallelism and with each block's attention all-reduce dropped alone (the
block's sensitivity), sorts the blocks into SPD's three classes
(``--insensitive`` / ``--extreme`` thresholds: relative perplexity increase,
or accuracy points lost as a fraction), picks ``--budget`` blocks to drop
(insensitive first, never an extremely sensitive one), evaluates that drop
set, distils its sensitive blocks block-wise on training data
(``astra_jax.parallel.spd``) and evaluates again.  The last line is one JSON object;
``--out`` also writes it.  The distilled weights are not saved.
"""

from __future__ import annotations

import dataclasses
import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run of train.vit / train.gpt2 / train.llama")
  p.add_argument("--mesh", type=cli.at_least(1), default=4, help="tensor-parallel devices")
  p.add_argument("--budget", type=cli.at_least(0), default=None,
                 help="sync points to drop (default: every block that is not extremely "
                      "sensitive)")
  p.add_argument("--insensitive", type=float, default=None,
                 help="largest change for 'insensitive' (default 0.01: 1%% perplexity, or "
                      "0.005: half an accuracy point)")
  p.add_argument("--extreme", type=float, default=None,
                 help="smallest change for 'extremely sensitive' (default 0.1 perplexity, "
                      "0.03 accuracy)")
  p.add_argument("--distill-steps", type=cli.at_least(0), default=200)
  p.add_argument("--distill-lr", type=cli.positive, default=1e-4)
  p.add_argument("--calib-batches", type=cli.at_least(1), default=8, help="training batches whose "
                 "hidden states the distillation fits")
  p.add_argument("--eval-windows", type=cli.at_least(1), default=None,
                 help="LM: validation windows")
  p.add_argument("--data-dir", default=None, help="ViT: dataset folder")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.mesh < 2:
    p.error("--mesh must be >= 2: SPD drops all-reduces between tensor-parallel devices")
  if args.distill_steps < 0 or args.calib_batches < 1:
    p.error("--distill-steps must be >= 0 and --calib-batches >= 1")
  return args


@dataclasses.dataclass
class Task:
  """What the SPD search needs from a task (ViT or LM)."""

  metric: str
  lower_is_better: bool
  restore: object  # sync -> (cfg, model_cfg, model)
  evaluate: object  # (model, model_cfg) -> result dict
  calibration: object  # () -> list of input tuples for the model
  thresholds: tuple


def _vit_task(args) -> Task:
  import numpy as np
  import jax.numpy as jnp
  from astra_jax.run import workdir
  from astra_jax.data import images as data
  from astra_jax.run.tasks import vit as task
  cfg = workdir.load_config(args.workdir, "vit")
  base = task.model_config(cfg)
  test = data.load_image_dataset(cfg.dataset, args.data_dir, "test")

  def calibration():
    train = data.load_image_dataset(cfg.dataset, args.data_dir, "train")
    rng = np.random.default_rng(0)
    out = []
    for images, _ in data.batches(train, cfg.batch_size, rng=rng, drop_remainder=True):
      out.append((task.prepare(images, cfg, base.patch), jnp.arange(base.num_patches)))
      if len(out) == args.calib_batches:
        return out
    return out

  return Task(
      "accuracy", False,
      lambda sync: task.restore_trained(args.workdir, dataclasses.replace(base, sync=sync)),
      lambda model, mcfg: task.evaluate(model, cfg, mcfg, test, args.mesh,
                                        cfg.eval_batch_size, tensor=True),
      calibration, (0.005, 0.03))


def _lm_task(args) -> Task:
  import numpy as np
  import jax.numpy as jnp
  from astra_jax.run import workdir
  from astra_jax.data import text as text_lib
  from astra_jax.run.tasks import lm
  cfg = workdir.load_config(args.workdir, "lm")
  base = lm.model_config(cfg)
  tokenizer = text_lib.load_tokenizer(cfg.tokenizer)
  train_text, valid_text = text_lib.load_splits(cfg.text)
  valid = lm.token_ids(valid_text, tokenizer)

  def calibration():
    ids = lm.token_ids(train_text, tokenizer)
    rng = np.random.default_rng(0)
    return [(text_lib.random_windows(ids, cfg.batch_size, cfg.context, rng)[0],
             jnp.arange(cfg.context)) for _ in range(args.calib_batches)]

  return Task(
      "perplexity", True,
      lambda sync: lm.restore_trained(args.workdir, dataclasses.replace(base, sync=sync)),
      lambda model, mcfg: lm.evaluate(model, cfg, mcfg, valid, args.mesh, cfg.eval_batch_size,
                                      args.eval_windows or cfg.eval_windows, tensor=True),
      calibration, (0.01, 0.1))


def run(args) -> dict:
  import jax.numpy as jnp
  from flax import nnx
  from astra_jax.parallel import spd
  from astra_jax.core import sync as tp
  from astra_jax.run import workdir
  cfg = workdir.load_config(args.workdir)
  task = _vit_task(args) if "dataset" in cfg else _lm_task(args)
  insensitive = task.thresholds[0] if args.insensitive is None else args.insensitive
  extreme = task.thresholds[1] if args.extreme is None else args.extreme
  _, _, teacher = task.restore(tp.make_sync("tp"))
  layers = len(spd.blocks(teacher))

  def evaluate(sync):
    _, mcfg, model = task.restore(sync)
    value = task.evaluate(model, mcfg)[task.metric]
    print(f"  {sync.spec()}: {task.metric} {value:.4f}", flush=True)
    return value

  base, sens = spd.sensitivities(evaluate, layers, lower_is_better=task.lower_is_better,
                                 insensitive=insensitive, extreme=extreme)
  budget = args.budget if args.budget is not None else sum(
      s.kind != spd.CLASSES[2] for s in sens)
  drop, to_distill = spd.pick(sens, budget)
  _, mcfg, student = task.restore(tp.make_sync("spd", drop=drop))
  dropped = task.evaluate(student, mcfg)
  distilled = {}
  if to_distill and args.distill_steps:
    batches = task.calibration()
    layout = student.tensor_layout()
    for b in to_distill:
      io = [spd.block_io(teacher, b, inputs) for inputs in batches]
      xs, ys = jnp.stack([x for x, _ in io]), jnp.stack([y for _, y in io])
      block = spd.blocks(student)[b]
      params, fit = spd.distill(block, layout, xs, ys, mesh_size=args.mesh,
                                steps=args.distill_steps, lr=args.distill_lr)
      nnx.update(block, params)
      distilled[b] = fit
      print(f"  distilled block {b}: mse {fit['mse_before']:.3g} -> {fit['mse_after']:.3g}",
            flush=True)
  final = task.evaluate(student, mcfg) if distilled else dropped
  return {
      "workdir": args.workdir, "mesh": args.mesh, "metric": task.metric,
      "thresholds": {"insensitive": insensitive, "extreme": extreme},
      "tp": base,
      "blocks": [dataclasses.asdict(s) for s in sens],
      "budget": budget, "drop": list(drop), "distilled": {str(k): v for k, v in distilled.items()},
      "spd": final[task.metric], "spd_without_distillation": dropped[task.metric],
      "sync_points": 2 * layers - len(drop), "bytes_per_device": final["bytes_per_device"],
      "bytes_received_per_device": final["bytes_received_per_device"],
      "spec": tp.make_sync("spd", drop=drop).spec() if drop else "tp",
  }


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.ensure_cpu_devices(args.mesh)
  try:
    result = run(args)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  print(f"{result['metric']}: tp {result['tp']:.4f}, SPD dropping blocks {result['drop']} "
        f"{result['spd_without_distillation']:.4f}, after distilling "
        f"{sorted(result['distilled'])}: {result['spd']:.4f}", flush=True)
  cli.print_result(result, args.out)


if __name__ == "__main__":
  cli.entry(main)
