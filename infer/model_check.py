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

Calibration.  TCP collectives do not reach the link's rate, and not all kinds
reach the same part of it (on this testbed gloo's all-reduce gets about 80%,
its all-gather under 60%, a ring's collective-permute about 50%: see
``collective_*.json``; Flash Communication also uses all-to-all).  So ``--measure`` also times each kind of collective
alone on the same shaped links (``infer.collective_time``: ``--count`` x 1 MiB
per device, no model around it) and the join recomputes every bench row with
each kind's measured fraction of the rate as its link efficiency
(``astra_jax.netsim.latency.Network.link_efficiency``): the ``calibrated``
columns.  The probes measure the collectives, not the forwards they are
compared with, so nothing is fitted to the answer.
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
  p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                 help="testbed models to measure (default all)")
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
    # the codebook-size knob and the overlapped exchange
    "vq-g32-k256": ("vq:groups=32,codebook_size=256",
                    ["--exchange", "vq", "--groups", "32", "--codebook-size", "256"]),
    "vq-g32-k4096": ("vq:groups=32,codebook_size=4096",
                     ["--exchange", "vq", "--groups", "32", "--codebook-size", "4096"]),
    "vq-g32-overlap": ("vq:groups=32,overlap=true", ["--exchange", "vq:groups=32,overlap=true"]),
}


# testbed model (prefill_time --model) -> the strategies measured on it: every
# baseline on the mid-size model; on GPT-2 small (issue 14's acceptance model)
# and on the pretrained SmolLM2 the sequence-parallel ones and the knobs
MODELS = {
    "gpt2:mini": ("exact", "vq-g32", "vq-g1", "ring", "tp", "spd-all", "flash4"),
    "gpt2:small": ("exact", "vq-g32", "vq-g1", "vq-g32-k256", "vq-g32-k4096",
                   "vq-g32-overlap"),
    "smollm2": ("exact", "vq-g32", "vq-g1"),
}


def measure(args) -> None:
  """The testbed runs, the one-core baselines, the collective probes and the
  modelled rows, back to back."""
  import subprocess

  def run(cmd):
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
      cli.fail(f"{' '.join(cmd)} failed; see its output above")

  py = [sys.executable, "-m"]
  for model in args.models:
    probe = ["infer.prefill_time", "--model", model, "--tokens", "1024",
             f"--repeats={args.repeats}"]
    base = os.path.join(args.testbed, f"{model.replace(':', '-')}_1024")
    run(["taskset", "-c", "0", *py, *probe, "--mesh", "1", "--out", f"{base}_single.json"])
    for rate in args.rates:
      for name in MODELS[model]:
        run([*py, "infer.testbed", "--procs", "2", f"--rate={rate:g}", "--cores-per-proc",
             "1", "--out", f"{base}_rate{rate:g}_{name}.json", "--", *probe, "--mesh", "2",
             *STRATEGIES[name][1]])
  for rate in args.rates:
    for kind in COLLECTIVES:
      run([*py, "infer.testbed", "--procs", "2", f"--rate={rate:g}", "--cores-per-proc", "1",
           "--out", collective_file(args.testbed, kind, rate), "--", "infer.collective_time",
           "--kind", kind, "--bytes", str(PROBE_BYTES), "--count", "4", "--mesh", "2",
           f"--repeats={args.repeats}"])
  run(["taskset", "-c", "0", *py, "infer.bench", "--models",
       *(m.replace(":", "-") for m in args.models), "--mesh", "2",
       "--bandwidths", *[f"{r:g}" for r in args.rates], "--strategies",
       *dict.fromkeys(STRATEGIES[n][0] for m in args.models for n in MODELS[m]),
       "--profiles", "measured", "--repeats", str(args.repeats),
       "--out", os.path.dirname(args.bench)])


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute")
PROBE_BYTES = 1 << 20


def collective_file(folder: str, kind: str, rate: float) -> str:
  return os.path.join(folder, f"collective_{kind}_rate{rate:g}.json")


def efficiencies(folder: str) -> dict[float, dict[str, float]]:
  """Per link rate, each probed collective kind's measured fraction of the rate."""
  found: dict[float, dict[str, float]] = {}
  for path in glob.glob(os.path.join(folder, "collective_*_rate*.json")):
    probe = json.load(open(path))
    rate = probe["rate_mbit"]
    found.setdefault(rate, {})[probe["kind"]] = min(1.0, probe["achieved_mbit"] / rate)
  return found


def recompute(row: dict, efficiency: dict[str, float]) -> float:
  """A bench row's modelled latency with per-kind link efficiencies."""
  from astra_jax.netsim import latency
  inputs = row["model_inputs"]
  transfers = {part: [latency.Transfer(*t) for t in inputs["transfers"][part]]
               for part in ("per_layer", "final")}
  net = latency.Network(latency.Trace.constant(row["bandwidth_mbps"]), row["topology"],
                        inputs["message_latency_s"],
                        tuple(sorted(efficiency.items())))
  return latency.prefill_latency(
      layers=row["layers"], layer_compute_s=inputs["layer_compute_s"],
      layer_transfers=transfers["per_layer"], mesh_size=row["mesh"], network=net,
      embed_s=inputs["embed_s"], head_s=inputs["head_s"], final_transfers=transfers["final"],
      layer_overlap_s=inputs["layer_overlap_s"]).total_s


def spec(run: dict) -> str:
  """The bench's strategy spec of a prefill_time result."""
  if run.get("tp"):
    return run["tp"]
  options = []
  if run["exchange"] == "vq":
    options.append(f"groups={run['groups']}")
    if run.get("codebook_size", 1024) != 1024:
      options.append(f"codebook_size={run['codebook_size']}")
  if run.get("overlap"):
    options.append("overlap=true")
  return run["exchange"] + (":" + ",".join(options) if options else "")


def join(bench_rows: list[dict], runs: list[dict],
         efficiency: dict[float, dict[str, float]] | None = None) -> list[dict]:
  """One row per testbed run that the bench modelled (same model/tokens/P/rate/exchange);
  with ``efficiency`` (per rate, per collective kind), also the calibrated model."""
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
    calibrated = predicted
    if rate is not None and efficiency and rate in efficiency:
      if "model_inputs" not in hit:
        raise ValueError("the bench rows predate model_inputs: rerun the bench command in "
                         "this module's docstring")
      calibrated = recompute(hit, efficiency[rate])
    rows.append({"model": name, "tokens": run["tokens"], "mesh": run.get("mesh", 1),
                 "rate_mbit": rate, "exchange": spec(run) if run.get("mesh", 1) > 1 else "-",
                 "measured_s": measured, "predicted_s": predicted,
                 "error": predicted / measured - 1,
                 **({"calibrated_s": calibrated, "calibrated_error": calibrated / measured - 1}
                    if efficiency else {}),
                 "bytes_per_device": run.get("bytes_per_device", 0)})
  return sorted(rows, key=lambda r: (r["model"], r["rate_mbit"] or 0, r["exchange"]))


def markdown(rows: list[dict], efficiency: dict[float, dict[str, float]] | None = None) -> str:
  calibrated = any("calibrated_s" in r for r in rows)
  head = ["model", "tokens", "devices", "link Mbit/s", "exchange", "measured s (median)",
          "model s", "model error"] + (["calibrated model s", "calibrated error"]
                                       if calibrated else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["model"], str(r["tokens"]), str(r["mesh"]), f"{r['rate_mbit'] or '-'}",
             r["exchange"], f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
             f"{100 * r['error']:+.0f}%"]
    if calibrated:
      cells += [f"{r['calibrated_s']:.3f}", f"{100 * r['calibrated_error']:+.0f}%"] \
          if "calibrated_s" in r else ["-", "-"]
    lines.append("| " + " | ".join(cells) + " |")
  for rate, kinds in sorted((efficiency or {}).items()):
    lines.append("")
    lines.append(f"Link efficiency at {rate:g} Mbit/s (infer.collective_time, measured): " +
                 ", ".join(f"{k} {v:.0%}" for k, v in sorted(kinds.items())) + ".")
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
  efficiency = efficiencies(args.testbed)
  try:
    rows = join(json.load(open(args.bench))["rows"], runs, efficiency)
  except ValueError as e:
    cli.fail(str(e))
  if not rows:
    cli.fail("no testbed run matches a modelled row: model the same model, tokens, "
             "devices, rates and exchanges with infer.bench")
  with open(args.out + ".json", "w") as f:
    json.dump({"command": "python -m infer.model_check " + " ".join(sys.argv[1:]),
               "link_efficiency": {f"{r:g}": k for r, k in efficiency.items()},
               "rows": rows}, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(rows, efficiency) + "\n")
  print(markdown(rows, efficiency))
  cli.print_result({"rows": len(rows), "out": args.out})


if __name__ == "__main__":
  cli.entry(main)
