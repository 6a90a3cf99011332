"""Latency model vs the bandwidth-shaped testbed: predicted and measured side by side.

  python -m infer.model_check --measure   # (root) every measurement below, back to back
  python -m infer.model_check             # only join existing results

``--measure`` runs, one after the other so they see the same machine: the
testbed (2 ranks, one core each) for each strategy and link rate (exact and
ring sequence parallelism, ASTRA G=32 and G=1, tensor parallelism, SPD
dropping every block's attention all-reduce, Flash Communication INT4), the
single-device baseline on one core, and

  taskset -c 0 python -m infer.bench --models gpt2-mini --mesh 2 --bandwidths 10 100 \\
      --strategies exact vq:groups=32 vq:groups=1 ring tp spd:drop=all \\
      flash:bits=4,group_size=128 --profiles measured --out results/bench_testbed

which models gpt2-mini (1024 tokens, 2 devices) with compute timed on one core
(each testbed rank has one core); then it joins the bench rows with the
testbed's measurements (``results/testbed/*.json``) on model, tokens, devices,
link rate and exchange and reports the model's error
(-> results/testbed/model_check.{json,md}).
"""

from __future__ import annotations

import glob
import json
import os
import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--bench", default="results/bench_testbed/bench.json")
  p.add_argument("--testbed", default="results/testbed")
  p.add_argument("--out", default="results/testbed/model_check")
  p.add_argument("--measure", action="store_true", help="run the testbed and the bench first")
  p.add_argument("--rates", nargs="+", type=cli.positive, default=[10, 100])
  p.add_argument("--repeats", type=cli.at_least(1), default=5)
  return p.parse_args(argv)


# file suffix -> (bench strategy spec, prefill_time flags)
STRATEGIES = {
    "exact": ("exact", ["--exchange", "exact"]),
    "vq-g32": ("vq:groups=32", ["--exchange", "vq", "--groups", "32"]),
    "vq-g1": ("vq:groups=1", ["--exchange", "vq", "--groups", "1"]),
    "ring": ("ring", ["--exchange", "ring"]),
    "tp": ("tp", ["--tp", "tp"]),
    "spd-all": ("spd:drop=all", ["--tp", "spd:drop=all"]),
    "flash4": ("flash:bits=4,group_size=128", ["--tp", "flash:bits=4,group_size=128"]),
}


def measure(args) -> None:
  """The testbed runs, the one-core baseline and the modelled rows, back to back."""
  import subprocess

  def run(cmd):
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
      cli.fail(f"{' '.join(cmd)} failed; see its output above")

  py = [sys.executable, "-m"]
  probe = ["infer.prefill_time", "--model", "gpt2:mini", "--tokens", "1024",
           f"--repeats={args.repeats}"]
  base = os.path.join(args.testbed, "gpt2-mini_1024")
  run(["taskset", "-c", "0", *py, *probe, "--mesh", "1", "--out", f"{base}_single.json"])
  for rate in args.rates:
    for name, (_, flags) in STRATEGIES.items():
      run([*py, "infer.testbed", "--procs", "2", f"--rate={rate:g}", "--cores-per-proc", "1",
           "--out", f"{base}_rate{rate:g}_{name}.json", "--", *probe, "--mesh", "2", *flags])
  run(["taskset", "-c", "0", *py, "infer.bench", "--models", "gpt2-mini", "--mesh", "2",
       "--bandwidths", *[f"{r:g}" for r in args.rates], "--strategies",
       *(spec for spec, _ in STRATEGIES.values()), "--profiles", "measured",
       "--out", os.path.dirname(args.bench)])


def spec(run: dict) -> str:
  """The bench's strategy spec of a prefill_time result."""
  if run.get("tp"):
    return run["tp"]
  return run["exchange"] if run["exchange"] != "vq" else f"vq:groups={run['groups']}"


def join(bench_rows: list[dict], runs: list[dict]) -> list[dict]:
  """One row per testbed run that the bench modelled (same model/tokens/P/rate/exchange)."""
  model = {(r["model"], r["tokens"], r["mesh"], r["bandwidth_mbps"], r["exchange"]): r
           for r in bench_rows if r["profile"] == "measured" and r["topology"] == "switched"}
  rows = []
  for run in runs:
    name = run["model"].replace(":", "-")
    if run.get("mesh", 1) == 1:
      key = next((k for k in model if k[:2] == (name, run["tokens"])), None)
      predicted = model[key]["single_device_s"] if key else None
      rate = None
    else:
      rate = run["rate_mbit"]
      hit = model.get((name, run["tokens"], run["mesh"], rate, spec(run)))
      predicted = hit["latency_s"] if hit else None
    if predicted is None:
      continue
    measured = run["latency_s"]
    rows.append({"model": name, "tokens": run["tokens"], "mesh": run.get("mesh", 1),
                 "rate_mbit": rate, "exchange": spec(run) if run.get("mesh", 1) > 1 else "-",
                 "measured_s": measured, "predicted_s": predicted,
                 "error": predicted / measured - 1,
                 "bytes_per_device": run.get("bytes_per_device", 0)})
  return sorted(rows, key=lambda r: (r["model"], r["rate_mbit"] or 0, r["exchange"]))


def markdown(rows: list[dict]) -> str:
  lines = ["| model | tokens | devices | link Mbit/s | exchange | measured s (median) | "
           "model s | model error |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['tokens']} | {r['mesh']} | {r['rate_mbit'] or '-'} | "
                 f"{r['exchange']} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | "
                 f"{100 * r['error']:+.0f}% |")
  return "\n".join(lines)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.measure:
    measure(args)
  if not os.path.exists(args.bench):
    cli.fail(f"{args.bench} is missing: run the bench command in this module's docstring first")
  runs = []
  for path in sorted(glob.glob(os.path.join(args.testbed, "*.json"))):
    run = json.load(open(path))
    if "latency_s" in run and "model" in run:
      runs.append(run)
  if not runs:
    cli.fail(f"no testbed results in {args.testbed}: run python -m infer.testbed first")
  rows = join(json.load(open(args.bench))["rows"], runs)
  if not rows:
    cli.fail("no testbed run matches a modelled row: model the same model, tokens, "
             "devices, rates and exchanges with infer.bench")
  with open(args.out + ".json", "w") as f:
    json.dump({"command": "python -m infer.model_check " + " ".join(sys.argv[1:]),
               "rows": rows}, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(rows) + "\n")
  print(markdown(rows))
  cli.print_result({"rows": len(rows), "out": args.out})


if __name__ == "__main__":
  cli.entry(main)
