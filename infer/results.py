"""Regenerate a results table (RESULTS.md) from scratch or from finished runs.

  python -m infer.results vit  --exact-workdir workdir/vit    # ViT, Fashion-MNIST, mesh 4
  python -m infer.results gpt2 --exact-workdir workdir/gpt2   # GPT-2, Shakespeare, mesh 4
  python -m infer.results llama --exact-workdir workdir/llama # tiny Llama 3, same data
  python -m infer.results smollm2 --eval-windows 25 --only vq_g32_kmeans  # SmolLM2-135M
  python -m infer.results dit --workdir workdir/dit --classifier workdir/vit  # CoDiT (infer/results_dit.py)
  python -m infer.results vit-pretrained    # DINOv2-S/14 (bundled) on Fashion-MNIST at 56x56

Trains the exact model (or resumes/reuses ``--exact-workdir``, e.g. the run of
``python -m train.<task> --mesh=4``), evaluates it on one device and at the
mesh, fine-tunes ASTRA variants from it with ``--init-from`` (G=32/16/1 at
K=1024, with and without noise augmentation, k-means only without
fine-tuning, and per-task extras) and evaluates each (the train CLI ends with
the same evaluation as the infer CLI: held-out split, bytes per device from
the compiled program).  Then the G=32 run is evaluated with 1/5/10% of the
non-local codes lost on the link (``--drop-rate``; for ``smollm2`` also the
no-noise G=32 run at 10%, ``vq_g32_nonoise_loss10``), and the exact run under
the other systems at the same device count: ring attention, tensor
parallelism, Flash Communication INT8/INT4, and SPD with the drop set
``python -m infer.spd`` picks (zero-shot and after block-wise distillation).
``--codebook-size K`` runs the ASTRA rows with K entries per codebook
instead of the config's 1024 (log2 K bits per group: the knob that trades
bits per token against the nearest-code search's cost, which grows with K);
their rows and run folders are then named with ``_k<K>`` (``vq_g32_k256``) and
sit beside the K=1024 rows in the same table (without ``--only``, every ASTRA
row runs and the other rows are kept).  Writes ``ROOT/results.json`` and the
table between the task's markers in ``ROOT/RESULTS.md`` after every row; with
``--publish`` (the commands written in RESULTS.md) the repo's own
``results/<task>_<data>.json`` and RESULTS.md instead.  Finished runs in ``--root`` are only re-evaluated
(the train CLI resumes at their last step); ``--only NAME ...`` runs those rows
and keeps the others from the previous results file; with ``--keep-baselines``
it also keeps that file's single-device and exact rows instead of evaluating
them again (checked: same mesh, same tokens scored), which on SmolLM2 saves
two 100-window evaluations (about 20 min each on a 2-core machine);
``--keep-baselines --only`` with no names runs nothing and writes the table
again from the results file.

``smollm2`` starts from the bundled pretrained SmolLM2-135M-Instruct instead of
an exact run (``--model smollm2``; held-out Shakespeare, 1024-token windows,
``--eval-windows`` of them): the exact rows evaluate the checkpoint, the
k-means-only rows evaluate it zero-shot with codebooks from its own K/V
(``infer.llama --model smollm2 --exchange vq:...``), the fine-tuned rows are
``train.llama --init-from smollm2``, and the link-loss rows use the fine-tuned
G=32 run if there is one, else the zero-shot G=32 model.  Baselines and SPD
are not run for it; instead (``--only continuations``) the greedy
continuations of three fixed prompts, exact vs that G=32 model at the mesh,
go into the results file and a table of their own in RESULTS.md.

``vit-pretrained`` is the ``vit`` table on a real backbone: the exact run is a
short fine-tune of the bundled DINOv2-S/14 (``train.vit --init-from dinov2-s``,
a fresh head) at 56x56 (Fashion-MNIST upsampled 2x: 16 patches of 14, 4 a
device), every row is evaluated on the first ``eval_examples`` test images,
and the ASTRA rows add G=32 with a single class token (task ``VIT_PRETRAINED``:
its flags and the cost of each row are in its comment).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable

from astra_jax.run import cli, markdown


@dataclasses.dataclass(frozen=True)
class Task:
  train: str  # train CLI module
  infer: list  # infer CLI module + flags that print the evaluation JSON
  metric: str  # key of the JSON result
  metric_label: str
  fmt: Callable[[float], str]
  change: Callable[[float, float], str]  # (value, exact) -> text
  finetune: Callable[[int, float], list]  # (steps, lr) -> train flags
  variants: list  # (name, label, train flags, fine-tune?)
  results: str  # default results JSON
  columns: list = ()  # extra (header, key) columns
  # simulated link loss: a fine-tuned G=32 run (variant name) evaluated with these
  # fractions of its non-local codes lost; rows named NAME_lossPERCENT
  loss_rows: tuple = (("vq_g32", (0.01, 0.05, 0.1)),)
  default_steps: int = 200
  exact_flags: tuple = ()  # the exact run's extra train flags (e.g. a pretrained start)
  train_flags: tuple = ()  # every train run's extra flags (image size, evaluation subset)
  spd: bool = True  # the SPD rows (python -m infer.spd on the exact run)
  model: str | None = None  # a pretrained model (infer --model, train --init-from) instead
  # of an exact run trained first
  # the other systems, evaluated on the exact run: (name, label, infer flags);
  # "spd" rows come from python -m infer.spd (drop set picked, then distilled)
  baselines: list = (
      ("ring", "ring attention (exact SP over ppermute)", ["--exchange=ring"]),
      ("tp", "tensor parallel (Megatron)", ["--tp=tp"]),
      ("flash8", "Flash Communication INT8, group 128", ["--tp=flash:bits=8,group_size=128"]),
      ("flash4", "Flash Communication INT4, group 128", ["--tp=flash:bits=4,group_size=128"]),
  )


VIT = Task(
    train="train.vit", infer=["infer.vit"], metric="accuracy", metric_label="test accuracy",
    fmt=lambda v: f"{v:.2%}", change=lambda v, e: f"{100 * (v - e):+.2f} pt",
    finetune=lambda steps, lr: ["--config.epochs=1", f"--max-steps={steps}",
                                f"--config.lr={lr}", "--config.warmup_steps=50"],
    variants=[  # cheapest first: G=32 encodes 32x more distances per token than G=1
        ("vq_g1", "ASTRA G=1", ["--config.vq.groups=1"], True),
        ("vq_g1_nonoise", "ASTRA G=1, no noise",
         ["--config.vq.groups=1", "--config.vq.noise_scale=0"], True),
        ("vq_g1_single", "ASTRA G=1, single class token",
         ["--config.vq.groups=1", "--config.class_token=single"], True),
        ("vq_g1_kmeans", "ASTRA G=1, k-means only (no fine-tuning)",
         ["--config.vq.groups=1"], False),
        ("vq_g16", "ASTRA G=16", ["--config.vq.groups=16"], True),
        ("vq_g32", "ASTRA G=32", ["--config.vq.groups=32"], True),
        ("vq_g32_kmeans", "ASTRA G=32, k-means only (no fine-tuning)",
         ["--config.vq.groups=32"], False),
        ("vq_g32_nonoise", "ASTRA G=32, no noise",
         ["--config.vq.groups=32", "--config.vq.noise_scale=0"], True),
    ],
    results="results/vit_fashion_mnist.json", columns=[("class token", "class_token")])

GPT2 = Task(
    train="train.gpt2", infer=["infer.gpt2", "--eval"], metric="perplexity",
    metric_label="validation perplexity", fmt=lambda v: f"{v:.3f}",
    change=lambda v, e: f"{100 * (v / e - 1):+.1f}%",
    finetune=lambda steps, lr: [f"--config.steps={steps}", f"--config.lr={lr}",
                                "--config.warmup_steps=30"],
    variants=[  # the acceptance row (G=32) first
        ("vq_g32", "ASTRA G=32", ["--config.vq.groups=32"], True),
        ("vq_g32_kmeans", "ASTRA G=32, k-means only (no fine-tuning)",
         ["--config.vq.groups=32"], False),
        ("vq_g16", "ASTRA G=16", ["--config.vq.groups=16"], True),
        ("vq_g1", "ASTRA G=1", ["--config.vq.groups=1"], True),
        ("vq_g1_kmeans", "ASTRA G=1, k-means only (no fine-tuning)",
         ["--config.vq.groups=1"], False),
        ("vq_g32_nonoise", "ASTRA G=32, no noise",
         ["--config.vq.groups=32", "--config.vq.noise_scale=0"], True),
        # the same fine-tuning with the exact exchange: what the extra steps alone buy
        ("exact_ft", "exact, fine-tuned like the ASTRA rows", ["--config.exchange=exact"], True),
    ],
    results="results/gpt2_shakespeare.json", default_steps=150)

LLAMA = dataclasses.replace(
    GPT2, train="train.llama", infer=["infer.llama", "--eval"],
    variants=[v for v in GPT2.variants if v[0] in ("vq_g32", "vq_g1", "exact_ft")],
    results="results/llama_shakespeare.json")

SMOLLM2 = dataclasses.replace(
    LLAMA, model="smollm2", results="results/smollm2_shakespeare.json", default_steps=100,
    finetune=lambda steps, lr: [f"--config.steps={steps}", f"--config.lr={lr}"],
    # exact_ft right after G=32: fine-tuning on the plays also adapts the model to
    # them, so a fine-tuned ASTRA row compares with it, not with the checkpoint
    variants=GPT2.variants[:1] + GPT2.variants[-1:] + GPT2.variants[1:3] + [
        ("vq_g16_kmeans", "ASTRA G=16, k-means only (no fine-tuning)",
         ["--config.vq.groups=16"], False)] + GPT2.variants[3:6], baselines=(),
    # does training with noise buy robustness to lost codes? the no-noise run at 10%
    loss_rows=GPT2.loss_rows + (("vq_g32_nonoise", (0.1,)),))

# greedy continuations, exact vs ASTRA G=32 at the mesh, of a pretrained model
PROMPTS = ("The capital of France is", "To be, or not to be, that is",
           "Water boils at a temperature of")
CONTINUATION_TOKENS = 24

# DINOv2-S/14 (12 layers, width 384) at 56x56 on a 2-core CPU: its exact run
# fine-tunes the backbone and a fresh head for EXACT_STEPS steps of 32 images,
# the ASTRA rows fine-tune from it for --finetune-steps (100) steps at lr 5e-5,
# and every row is scored on the first 2,000 test images
EXACT_STEPS = 300
VIT_PRETRAINED = dataclasses.replace(
    VIT, results="results/vit_dinov2_fashion_mnist.json", baselines=(), spd=False,
    default_steps=100,
    exact_flags=("--init-from=dinov2-s", f"--max-steps={EXACT_STEPS}"),
    train_flags=("--config.image_size=56", "--config.upsample=2",
                 "--config.eval_examples=2000", "--config.eval_batch_size=250"),
    finetune=lambda steps, lr: [f"--max-steps={steps}", f"--config.lr={lr}",
                                "--config.warmup_steps=20"],
    variants=VIT.variants + [("vq_g32_single", "ASTRA G=32, single class token",
                              ["--config.vq.groups=32", "--config.class_token=single"], True),
                             # the exact run trained as long as the ASTRA rows: a short
                             # exact run still gains from 100 more steps
                             GPT2.variants[-1]])

TASKS = {"vit": VIT, "gpt2": GPT2, "llama": LLAMA, "smollm2": SMOLLM2,
         "vit-pretrained": VIT_PRETRAINED}


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("task", choices=sorted(TASKS))
  p.add_argument("--root", default=None, help="run folders go here (default workdir/TASK_results)")
  p.add_argument("--exact-workdir", default=None,
                 help="the exact run to start from (default ROOT/exact; e.g. workdir/vit, "
                      "the main job's run); trained or resumed as needed")
  p.add_argument("--mesh", type=cli.at_least(1), default=4)
  p.add_argument("--finetune-steps", type=cli.at_least(1), default=None,
                 help="ASTRA fine-tuning steps from the exact run (default: the task's)")
  p.add_argument("--finetune-lr", type=cli.positive, default=None,
                 help="default 5e-4, and 5e-5 for a pretrained model")
  p.add_argument("--eval-windows", type=cli.at_least(1), default=None,
                 help="LM: validation windows scored per row (default: the config's)")
  p.add_argument("--data-dir", default=None, help="vit: folder with the dataset files")
  p.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
  p.add_argument("--keep-baselines", action="store_true",
                 help="with --only: keep the results file's single-device and exact rows "
                      "(same mesh and tokens scored) instead of evaluating them again")
  p.add_argument("--codebook-size", type=cli.at_least(2), default=None, metavar="K",
                 help="entries per codebook of every ASTRA row (a power of two; default the "
                      "config's, 1024); rows are then named NAME_kK")
  p.add_argument("--publish", action="store_true",
                 help="write the repo's own results: the task's file in results/ and its "
                      "table in RESULTS.md (default: ROOT/results.json and ROOT/RESULTS.md)")
  p.add_argument("--results", default=None, help="results JSON (overrides the above)")
  p.add_argument("--markdown", default=None, help="markdown file for the table (likewise)")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                 help="further --config.* overrides for every run (e.g. a tiny test config)")
  args = p.parse_args(argv)
  args.root = args.root or f"workdir/{args.task}_results"
  args.results = args.results or (TASKS[args.task].results if args.publish
                                  else os.path.join(args.root, "results.json"))
  args.markdown = args.markdown or ("RESULTS.md" if args.publish
                                    else os.path.join(args.root, "RESULTS.md"))
  if args.finetune_steps is None:
    args.finetune_steps = TASKS[args.task].default_steps
  if args.only is not None:
    task = TASKS[args.task]
    names = [v[0] for v in task.variants] + loss_names(task) + \
        [b[0] for b in task.baselines] + (["continuations"] if task.model else
                                          list(SPD_ROWS) if task.spd else [])
    unknown = set(args.only) - set(names)
    if unknown:
      p.error(f"unknown variants {sorted(unknown)}; choose from {names}")
  if args.keep_baselines and args.only is None:
    p.error("--keep-baselines keeps rows of a previous run: name the rows to run with --only")
  size = args.codebook_size
  if size is not None and size & (size - 1):
    p.error(f"argument --codebook-size: must be a power of two, got {size}")
  if suffix(args) and args.only is None:  # another K: its ASTRA rows, kept beside the rest
    task = TASKS[args.task]
    args.only = [v[0] for v in task.variants if "--config.exchange=exact" not in v[2]] + \
        loss_names(task)
  return args


DEFAULT_CODEBOOK_SIZE = 1024  # configs/common.py's vq.codebook_size


def suffix(args) -> str:
  """Row and run-folder suffix of the ASTRA rows: '' at the configs' K, else '_kK'."""
  size = args.codebook_size
  return "" if size in (None, DEFAULT_CODEBOOK_SIZE) else f"_k{size}"


BASELINE_ROWS = ("single_device", "exact")


def check_kept_baselines(args, kept: list[dict]) -> None:
  """--keep-baselines: the results file must hold both baseline rows, at this mesh and,
  when --eval-windows is given, scored on as many windows as the new rows will be."""
  have = {r["name"]: r for r in kept if r["name"] in BASELINE_ROWS}
  missing = [n for n in BASELINE_ROWS if n not in have]
  if missing:
    cli.fail(f"--keep-baselines: {args.results} has no {' or '.join(missing)} row; "
             "run once without --keep-baselines")
  if have["exact"].get("mesh") != args.mesh:
    cli.fail(f"--keep-baselines: the kept exact row ran at mesh {have['exact'].get('mesh')}, "
             f"not --mesh={args.mesh}; run without --keep-baselines")
  context = have["exact"].get("context")
  if args.eval_windows and context and any(
      r.get("tokens") != args.eval_windows * context for r in have.values()):
    cli.fail(f"--keep-baselines: the kept rows scored {have['exact'].get('tokens')} tokens, "
             f"not --eval-windows={args.eval_windows} x {context}; run without it")


def _run(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  print("$ python", " ".join(cmd[1:]), flush=True)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
  last = ""
  for line in proc.stdout:  # show the run's output as it comes; its last line is the JSON
    print(line, end="", flush=True)
    last = line.strip() or last
  if proc.wait() == 2:  # refused (bad input, a run folder in use): its one error line says why
    raise SystemExit(2)
  if proc.returncode:
    raise SystemExit(f"error: {' '.join(cmd[2:])} failed with exit code {proc.returncode}")
  return json.loads(last)


def table(task: Task, rows: list[dict]) -> str:
  """The markdown table; with an ``exact_ft`` row (the exact model fine-tuned like
  the ASTRA rows), fine-tuned rows also get their change against it."""
  exact = next(r for r in rows if r["name"] == "exact")
  tuned = next((r for r in rows if r["name"] == "exact_ft"), None)
  extra = [h for h, _ in task.columns]
  head = ["setting", *extra, "G", "bits/token (K or V)", "bytes/device/example",
          "less traffic than exact", "received/device/example", task.metric_label, "change"]
  head += ["change vs exact fine-tuned"] if tuned else []
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    ratio = exact["bytes_per_device"] / r["bytes_per_device"] if r["bytes_per_device"] else None
    cells = [r["label"], *[str(r.get(k, "-")) for _, k in task.columns],
             str(r.get("groups") or "-"), str(r.get("bits_per_token", "-")),
             f"{r['bytes_per_device']:,}",
             f"{ratio:.1f}x" if ratio else "-", _received(r), task.fmt(r[task.metric]),
             "-" if r["name"] == "exact" else task.change(r[task.metric], exact[task.metric])]
    if tuned:
      cells.append(task.change(r[task.metric], tuned[task.metric])
                   if is_finetuned(r) and r is not tuned else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines + ["", NOTE])


def is_finetuned(row: dict) -> bool:
  """Whether a row's model was fine-tuned: it trained steps (the train CLI's
  ``steps``), or it is a link-loss row of a fine-tuned G=32 run."""
  return bool(row.get("steps")) or bool(row.get("finetuned"))


NOTE = ("bytes/device/example: operand bytes a device hands to collectives per example "
        "(compiled HLO); its ratio to exact compares the all-gather exchanges like for like. "
        "received/device/example: bytes reaching a device over switched full-duplex links "
        "(all-gather (P-1)x its operand, ring P-1 permutes of one block, all-reduce 2(P-1)/P "
        "x the buffer): the column to compare tensor parallelism and ring with sequence "
        "parallelism; '-' for rows evaluated before it was recorded.")


def _received(row: dict) -> str:
  value = row.get("bytes_received_per_device")
  return "-" if value is None else f"{value:,}"


def loss_name(rate: float, run: str = "vq_g32") -> str:
  return f"{run}_loss{rate * 100:g}"


def loss_names(task: Task) -> list[str]:
  return [loss_name(rate, run) for run, rates in task.loss_rows for rate in rates]


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["dit"]:  # the diffusion table has its own rows and metrics
    from infer import results_dit
    return results_dit.main(argv[1:])
  args = parse(argv)
  task = TASKS[args.task]
  data = [f"--data-dir={args.data_dir}"] if args.data_dir else []
  mesh = f"--mesh={args.mesh}"
  windows = [f"--eval-windows={args.eval_windows}"] if args.eval_windows else []
  exact_dir = args.exact_workdir or os.path.join(args.root, "exact")
  sfx = suffix(args)  # ASTRA rows at another codebook size: named and stored apart
  size = [] if args.codebook_size is None else [f"--config.vq.codebook_size={args.codebook_size}"]
  size_spec = "" if args.codebook_size is None else f",codebook_size={args.codebook_size}"
  size_label = "" if not sfx else f", K={args.codebook_size}"
  if task.model:  # the pretrained checkpoint is the exact model
    start, source = [f"--model={task.model}"], [f"--init-from={task.model}"]
    windows_cfg = [f"--config.eval_windows={args.eval_windows}"] if args.eval_windows else []
  else:
    _run(task.train, mesh, f"--workdir={exact_dir}", *task.exact_flags, *task.train_flags,
         *data, *args.extra)
    start, source, windows_cfg = [f"--workdir={exact_dir}"], [f"--init-from={exact_dir}"], []
  # with --only, rows of the other variants are kept from the previous results file
  vq_names = {v[0] for v in task.variants} | set(loss_names(task))
  baselines = () if args.keep_baselines else BASELINE_ROWS  # evaluated again below
  fresh = {*baselines, *(n + sfx if n in vq_names else n for n in (args.only or ()))}
  if fresh & set(SPD_ROWS):  # one infer.spd run makes both SPD rows
    fresh |= set(SPD_ROWS)
  kept = [] if args.only is None or not os.path.exists(args.results) else [
      r for r in json.load(open(args.results))["rows"] if r["name"] not in fresh]
  rows = []
  evaluate = [*task.infer, *start, *data, *windows]
  if args.keep_baselines:
    check_kept_baselines(args, kept)
  else:
    rows.append(dict(_run(*evaluate, "--mesh=1"), name="single_device", label="single device"))
    rows.append(dict(_run(*evaluate, mesh), name="exact",
                     label=f"exact sequence parallel (P={args.mesh})"))
    write(args, task, rows, kept)
  for name, label, overrides, finetune in task.variants:
    if args.only is not None and name not in args.only:
      continue
    vq_row = "--config.exchange=exact" not in overrides
    row = dict(name=name + sfx, label=label + size_label) if vq_row else dict(name=name, label=label)
    if task.model and not finetune:  # zero-shot: k-means codebooks in the infer CLI
      spec = "vq:" + ",".join(o.removeprefix("--config.vq.") for o in overrides) + size_spec
      result = _run(*evaluate, mesh, f"--exchange={spec}")
      rows.append(dict(result, **row))
      write(args, task, rows, kept)
      continue
    lr = args.finetune_lr or (5e-5 if task.model or task.exact_flags else 5e-4)
    steps = task.finetune(args.finetune_steps, lr) if finetune else ["--max-steps=0"]
    result = _run(task.train, mesh, f"--workdir={os.path.join(args.root, row['name'])}",
                  *source, "--config.exchange=vq", *steps, *overrides,
                  *(size if vq_row else []), *windows_cfg, *task.train_flags, *data,
                  *args.extra)
    rows.append(dict(result, **row))
    write(args, task, rows, kept)  # after every row, so a long run leaves a usable table
  def finished(run):  # a run counts as fine-tuned once its row is in the table (a
    # killed run's folder may hold a checkpoint of its first steps only)
    return os.path.isdir(os.path.join(args.root, run + sfx)) and \
        any(r["name"] == run + sfx for r in rows + kept)

  g32 = os.path.join(args.root, "vq_g32" + sfx)
  finetuned = finished("vq_g32")
  labels = {v[0]: v[1] for v in task.variants}
  for run, rates in task.loss_rows:
    for rate in rates:
      name = loss_name(rate, run)
      if args.only is not None and name not in args.only:
        continue
      if finished(run):
        result = _run(*task.infer, f"--workdir={os.path.join(args.root, run + sfx)}", mesh,
                      f"--drop-rate={rate}", *data, *windows)
        label = f"{labels[run]}{size_label}, {rate:.0%} of codes lost"
      elif task.model and run == "vq_g32":  # noise is training-only: zero-shot is one model
        result = _run(*evaluate, mesh, f"--exchange=vq:groups=32{size_spec}",
                      f"--drop-rate={rate}")
        label = f"ASTRA G=32{size_label} zero-shot (k-means only), {rate:.0%} of codes lost"
      else:
        print(f"skipping {name}: no finished {run} run ({os.path.join(args.root, run + sfx)} "
              f"with its row in {args.results}; run --only {run} first)", flush=True)
        continue
      rows.append(dict(result, name=name + sfx, label=label, finetuned=finished(run)))
      write(args, task, rows, kept)
  if task.model and (args.only is None or "continuations" in args.only):
    g32_start = [f"--workdir={g32}"] if finetuned else \
        [*start, f"--exchange=vq:groups=32{size_spec}"]
    continuations(args, task, [
        ("exact", [*task.infer[:1], *start]),
        ("ASTRA G=32" + (" (fine-tuned)" if finetuned else " (k-means only)"),
         [*task.infer[:1], *g32_start])], mesh)
  for name, label, flags in task.baselines:
    if args.only is None or name in args.only:
      rows.append(dict(_run(*evaluate, mesh, *flags), name=name, label=label))
      write(args, task, rows, kept)
  if not task.model and task.spd and (args.only is None or set(args.only) & set(SPD_ROWS)):
    rows += spd_rows(task, _run("infer.spd", f"--workdir={exact_dir}", mesh, *data))
  write(args, task, rows, kept)  # (--keep-baselines --only with no names: only this)
  print(table(task, order(task, rows + kept)))


def continuations(args, task: Task, systems: list, mesh: str) -> None:
  """Greedy continuations of ``PROMPTS`` by each (label, infer command) in ``systems``,
  into the results file (``continuations``) and a table of RESULTS.md."""
  rows = []
  for prompt in PROMPTS:
    row = {"prompt": prompt}
    for label, command in systems:
      result = _run(*command, mesh, f"--prompt={prompt}",
                    f"--max-new-tokens={CONTINUATION_TOKENS}", "--temperature=0")
      row[label] = result["completion"]
    rows.append(row)
  data = json.load(open(args.results)) if os.path.exists(args.results) else {"rows": []}
  data["continuations"] = {"systems": [label for label, _ in systems], "rows": rows,
                           "mesh": int(mesh.split("=")[1]),
                           "new_tokens": CONTINUATION_TOKENS}
  with open(args.results, "w") as f:
    json.dump(data, f, indent=2)
  if not args.markdown:
    return
  labels = [label for label, _ in systems]
  lines = ["| prompt | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
  cell = lambda text: text.replace("|", "\\|").replace("\n", " ⏎ ")
  for row in rows:
    lines.append(f"| {cell(row['prompt'])} | " +
                 " | ".join(cell(row[label]) for label in labels) + " |")
  markdown.replace_block(args.markdown, f"{args.task}-continuations", "\n".join(lines))


SPD_ROWS = {"spd": "spd_without_distillation", "spd_distilled": "spd"}


def spd_rows(task: Task, picked: dict) -> list[dict]:
  """The two table rows of an ``infer.spd`` result: its drop set zero-shot and distilled."""
  drop = "+".join(map(str, picked["drop"])) or "none"
  distilled = ("block(s) " + "+".join(sorted(picked["distilled"])) + " distilled"
               if picked["distilled"] else "none sensitive, nothing to distil")
  common = {k: picked[k] for k in ("bytes_per_device", "bytes_received_per_device", "mesh",
                                   "drop", "blocks", "budget")}
  return [dict(common, name="spd", parallelism="tensor",
               label=f"SPD, blocks {drop} dropped (picked by infer.spd)",
               **{task.metric: picked["spd_without_distillation"]}),
          dict(common, name="spd_distilled", parallelism="tensor",
               label=f"SPD, blocks {drop} dropped, {distilled}",
               **{task.metric: picked["spd"]})]


def order(task: Task, rows: list[dict]) -> list[dict]:
  """Rows in the task's canonical order (single device, exact, variants, losses)."""
  names = ["single_device", "exact", *(v[0] for v in task.variants),
           *loss_names(task), *(b[0] for b in task.baselines),
           *SPD_ROWS]

  def key(row):  # a row at another codebook size (NAME_kK) right after NAME, by K
    base, _, size = row["name"].rpartition("_k")
    if row["name"] not in names and base in names and size.isdigit():
      return names.index(base), int(size)
    return (names.index(row["name"]) if row["name"] in names else len(names)), 0

  return sorted(rows, key=key)


def write(args, task: Task, rows: list[dict], kept: list[dict] = ()) -> None:
  rows = order(task, [*rows, *kept])
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  data = json.load(open(args.results)) if os.path.exists(args.results) else {}
  data.update(command="python -m infer.results " + " ".join(sys.argv[1:]), rows=rows)
  with open(args.results, "w") as f:  # other keys (continuations) are kept
    json.dump(data, f, indent=2)
  if args.markdown:
    markdown.replace_block(args.markdown, f"{args.task}-results", table(task, rows))


if __name__ == "__main__":
  cli.entry(main)
