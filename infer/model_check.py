"""Latency model vs the bandwidth-shaped testbed: predicted and measured side by side.

  taskset -c 0 python -m infer.bench --models gpt2-mini --mesh 2 --bandwidths 10 100 \\
      --exchanges exact vq:groups=32 vq:groups=1 --profiles measured --out results/bench_testbed
  python -m infer.model_check      # -> results/testbed/model_check.{json,md}

The first command models gpt2-mini (1024 tokens, 2 devices) with compute timed
on one core of this host (``taskset``: each testbed rank has one core); the
second joins its rows with the testbed's measurements (``results/testbed/*.json``,
made by ``python -m infer.testbed ... -- infer.prefill_time ...``) on model,
tokens, devices, link rate and exchange, and reports the model's error.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from astra_jax import cli


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bench", default="results/bench_testbed/bench.json")
  p.add_argument("--testbed", default="results/testbed")
  p.add_argument("--out", default="results/testbed/model_check")
  return p.parse_args(argv)


def spec(run: dict) -> str:
  return "exact" if run["exchange"] == "exact" else f"vq:groups={run['groups']}"


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
  main()
