"""Regenerate the ViT results table (RESULTS.md) from scratch or from finished runs.

  python -m infer.vit_results                      # default ViT, Fashion-MNIST, mesh 4

Trains the exact model (the main job), fine-tunes ASTRA variants from it with
``--init-from`` (``--finetune-steps``, default 200 steps of 128 images) (G=32/16/1 at K=1024, with and without noise augmentation,
distributed vs single class token, and k-means only without fine-tuning),
evaluates each (the train CLI's own final test evaluation) and writes ``results/vit_fashion_mnist.json``
plus the table between the markers in RESULTS.md.  Runs that already finished
in ``--root`` are only re-evaluated (the train CLI resumes at their last step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MARK_BEGIN, MARK_END = "<!-- vit-results:begin -->", "<!-- vit-results:end -->"

# name, label, train overrides (on top of the exact run), eval flags
VARIANTS = [  # cheapest first: G=32 encodes 32x more distances per token than G=1
    ("vq_g1", "ASTRA G=1", ["--config.vq.groups=1"], []),
    ("vq_g1_nonoise", "ASTRA G=1, no noise", ["--config.vq.groups=1",
                                              "--config.vq.noise_scale=0"], []),
    ("vq_g1_single", "ASTRA G=1, single class token", ["--config.vq.groups=1",
                                                       "--config.class_token=single"], []),
    ("vq_g1_kmeans", "ASTRA G=1, k-means only (no fine-tuning)", ["--config.vq.groups=1"],
     ["--max-steps=0"]),
    ("vq_g16", "ASTRA G=16", ["--config.vq.groups=16"], []),
    ("vq_g32", "ASTRA G=32", ["--config.vq.groups=32"], []),
    ("vq_g32_kmeans", "ASTRA G=32, k-means only (no fine-tuning)", ["--config.vq.groups=32"],
     ["--max-steps=0"]),
    ("vq_g32_nonoise", "ASTRA G=32, no noise", ["--config.vq.groups=32",
                                                "--config.vq.noise_scale=0"], []),
]


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="workdir/vit_results", help="run folders go here")
  p.add_argument("--exact-workdir", default=None,
                 help="the exact run to start from (default ROOT/exact; e.g. workdir/vit, "
                      "the main job's run); trained or resumed as needed")
  p.add_argument("--mesh", type=int, default=4)
  p.add_argument("--finetune-steps", type=int, default=200,
                 help="ASTRA fine-tuning steps from the exact run (batch 128)")
  p.add_argument("--finetune-lr", type=float, default=5e-4)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
  p.add_argument("--results", default="results/vit_fashion_mnist.json")
  p.add_argument("--markdown", default="RESULTS.md")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                 help="further --config.* overrides for every run (e.g. a tiny test config)")
  return p.parse_args(argv)


def _run(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  print("$ python", " ".join(cmd[1:]), flush=True)
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    raise SystemExit(f"error: {' '.join(cmd[2:])} failed with exit code {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  exact = next(r for r in rows if r["name"] == "exact")
  lines = ["| setting | class token | G | bits/token (K or V) | bytes/device/image | less traffic than exact | test accuracy | change |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = (exact["bytes_per_device"] / r["bytes_per_device"]) if r["bytes_per_device"] else None
    lines.append("| {label} | {ct} | {g} | {bits} | {bytes:,} | {ratio} | {acc:.2%} | {delta} |".format(
        label=r["label"], ct=r["class_token"], g=r["groups"] or "-", bits=r["bits_per_token"],
        bytes=r["bytes_per_device"], ratio=f"{ratio:.1f}x" if ratio else "-",
        acc=r["accuracy"],
        delta="-" if r["name"] == "exact" else f"{100 * (r['accuracy'] - exact['accuracy']):+.2f} pt"))
  return "\n".join(lines)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  data = [f"--data-dir={args.data_dir}"] if args.data_dir else []
  mesh = f"--mesh={args.mesh}"
  exact_dir = args.exact_workdir or os.path.join(args.root, "exact")
  _run("train.vit", mesh, f"--workdir={exact_dir}", *data, *args.extra)
  rows = []
  single = _run("infer.vit", f"--workdir={exact_dir}", "--mesh=1", *data)
  rows.append(dict(single, name="single_device", label="single device"))
  rows.append(dict(_run("infer.vit", f"--workdir={exact_dir}", mesh, *data),
                   name="exact", label=f"exact sequence parallel (P={args.mesh})"))
  write(args, rows)
  for name, label, overrides, train_flags in VARIANTS:
    if args.only is not None and name not in args.only:
      continue
    run_dir = os.path.join(args.root, name)
    # train.vit ends with the same evaluation infer.vit prints (test split, HLO bytes)
    result = _run("train.vit", mesh, f"--workdir={run_dir}", f"--init-from={exact_dir}",
                  "--config.exchange=vq", "--config.epochs=1",
                  f"--max-steps={args.finetune_steps}", f"--config.lr={args.finetune_lr}",
                  "--config.warmup_steps=50", *overrides, *train_flags, *data, *args.extra)
    rows.append(dict(result, name=name, label=label))
    write(args, rows)  # after every row, so a long run leaves a usable table
  print(table(rows))


def write(args, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, "w") as f:
    json.dump({"command": "python -m infer.vit_results " + " ".join(sys.argv[1:]),
               "rows": rows}, f, indent=2)
  if args.markdown:
    body = open(args.markdown).read() if os.path.exists(args.markdown) else ""
    block = f"{MARK_BEGIN}\n{table(rows)}\n{MARK_END}"
    if MARK_BEGIN in body:
      head, rest = body.split(MARK_BEGIN, 1)
      body = head + block + rest.split(MARK_END, 1)[1]
    else:
      body += ("\n" if body else "") + block + "\n"
    with open(args.markdown, "w") as f:
      f.write(body)


if __name__ == "__main__":
  main()
