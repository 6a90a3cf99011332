"""Latency model vs the bandwidth-shaped testbed: predicted and measured side by side.

  python -m infer.lab.model_check --measure   # (root) every measurement below, back to back
  python -m infer.lab.model_check             # only join existing results

``--measure`` runs, one after the other so they see the same machine: the
testbed (2 ranks, one core each) for each strategy and link rate (exact and
ring sequence parallelism, ASTRA G=32 and G=1, tensor parallelism, SPD
dropping every block's attention all-reduce, Flash Communication INT4), the
single-device baseline on one core, and

  taskset -c 0 python -m infer.lab.bench --models gpt2-mini --mesh 2 --bandwidths 10 100 \\
      --strategies exact vq:groups=32 vq:groups=1 ring tp spd:drop=all \\
      flash:bits=4,group_size=128 --profiles measured --out results/bench_testbed

which models gpt2-mini (1024 tokens, 2 devices) with compute timed on one core
(each testbed rank has one core); then it joins the bench rows with the
testbed's measurements (``results/testbed/*.json``) on model, tokens, devices,
link rate and exchange and reports the model's error
(-> results/testbed/model_check.{json,md}).

Calibration.  A TCP collective on a tbf-shaped link does not reach the link's
rate, and how much of it it reaches depends on its kind and on its message
size: on this testbed at 10 Mbit/s a 1 MiB all-gather gets about 60% (a burst
that overflows tbf's queue loses packets and TCP backs off), a 40 KB one about
90%.  So the calibration times every (kind, message size) that a measured
row's program uses, alone on the same shaped links (``infer.lab.collective_time``,
no model around it; the per-message latency alpha the model adds is taken
out of the probe's time), and recomputes each row with its own kinds'
measured fractions of the rate (``Network.link_efficiency``) and with the
testbed's tbf bucket (``Network.burst_bytes`` = ``netns.burst_bytes(rate)``,
the depth the testbed configures: it refills while a rank computes): the
``calibrated`` columns.  The probes measure the collectives, not the forwards
they are compared with, so nothing is fitted to the answer.

Streamed rows (``stream-*``: each layer's block on the stream exchange's own
TCP connection, not a gloo collective) are calibrated with the rate the
testbed measured before the run (``measured_mbit``: one TCP stream over the
same shaped link), and the pipelined schedule credits no bucket.

``--bucket none`` joins again with no bucket credited (every byte of a layer's
exchange at the measured rate), to read how much of a row's calibrated time
the bucket's refill during compute takes off (``--out`` elsewhere keeps the
default files):

  python -m infer.lab.model_check --bucket none --out results/testbed/model_check_no_bucket

and ``--bucket measured`` credits the bucket that idle-gap probes measured
(``infer.lab.collective_time --gap-s``: the same collective after a compute-long
pause, set against it back to back; ``measured_buckets``), read from
``--gap-probes`` (commands in ``results/testbed_gap/COMMANDS.md``):

  python -m infer.lab.model_check --bucket measured --gap-probes results/testbed_gap \\
      --out results/testbed/model_check_gap_bucket

Parts of ``--measure`` can be run alone (``--measure bench probes``): the
probes need the bench rows (their message sizes) and the testbed runs.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from astra_jax.run import cli
from infer import lab


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--bench", default=None,
                 help="bench rows (default: the committed results/bench_testbed/bench.json; "
                      f"with --measure, {os.path.join(lab.OUT, 'bench_testbed', 'bench.json')})")
  p.add_argument("--testbed", default=None,
                 help="testbed measurements (default: the committed results/testbed; with "
                      f"--measure, {os.path.join(lab.OUT, 'testbed')})")
  p.add_argument("--out", default=os.path.join(lab.OUT, "model_check"),
                 help="writes OUT.json and OUT.md (default %(default)s)")
  p.add_argument("--measure", nargs="*", choices=PARTS, default=None,
                 help="run these measurements first (no value: all of them, in this order)")
  p.add_argument("--rates", nargs="+", type=cli.positive, default=[10, 100])
  p.add_argument("--repeats", type=cli.at_least(1), default=5)
  p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                 help="testbed models to measure (default all)")
  p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=None,
                 help="measure only these of each model's strategies (default: all of them)")
  p.add_argument("--bucket", choices=BUCKETS, default="tbf",
                 help="calibrated model's token bucket: tbf = the testbed's tbf depth, "
                      "refilled while a rank computes; none = no credit (every byte at "
                      "the measured rate); measured = what idle-gap probes "
                      "(collective_time --gap-s) measured")
  p.add_argument("--gap-probes", default=None,
                 help="folder of the idle-gap probes for --bucket measured "
                      "(default: --testbed)")
  args = p.parse_args(argv)
  if args.measure == []:
    args.measure = list(PARTS)
  # joining reads the committed measurements; measuring writes under lab.OUT unless told
  root = lab.OUT if args.measure else "results"
  args.bench = args.bench or os.path.join(root, "bench_testbed", "bench.json")
  args.testbed = args.testbed or os.path.join(root, "testbed")
  return args


PARTS = ("testbed", "bench", "probes")
BUCKETS = ("tbf", "none", "measured")

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
    # forward streaming (issue 28): the same three, each layer's block sent only to
    # the later rank, on host threads; the bench walks the pipelined schedule
    "stream-exact": ("stream:quantize=false", ["--exchange", "stream:quantize=false"]),
    "stream-g32": ("stream:groups=32", ["--exchange", "stream:groups=32"]),
    "stream-g1": ("stream:groups=1", ["--exchange", "stream:groups=1"]),
}
STREAMED = ("stream-exact", "stream-g32", "stream-g1")


# testbed model (prefill_time --model) -> the strategies measured on it: every
# baseline on the mid-size model; on GPT-2 small (issue 14's acceptance model)
# and on the pretrained SmolLM2 the sequence-parallel ones and the knobs
MODELS = {
    "gpt2:mini": ("exact", "vq-g32", "vq-g1", "ring", "tp", "spd-all", "flash4"),
    "gpt2:small": ("exact", "vq-g32", "vq-g1", "vq-g32-k256", "vq-g32-k4096",
                   "vq-g32-overlap", *STREAMED),
    "smollm2": ("exact", "vq-g32", "vq-g1", *STREAMED),
}
# prefill_time flags that make a testbed model the bench workload of its name:
# GPT-2 small with GPT-2's vocabulary (its head is a quarter of the one-device prefill)
MODEL_FLAGS = {"gpt2:small": ["--vocab-size", "50257"]}


def measure(args) -> None:
  """The testbed runs and the one-core baselines, the bench that models them,
  then the collective probes at the message sizes the bench rows use."""
  import subprocess

  def run(cmd):
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
      cli.fail(f"{' '.join(cmd)} failed; see its output above")

  py = [sys.executable, "-m"]
  if "testbed" in args.measure:
    for model in args.models:
      probe = ["infer.lab.prefill_time", "--model", model, "--tokens", "1024",
               f"--repeats={args.repeats}", *MODEL_FLAGS.get(model, [])]
      base = os.path.join(args.testbed, f"{model.replace(':', '-')}_1024")
      run(["taskset", "-c", "0", *py, *probe, "--mesh", "1", "--out", f"{base}_single.json"])
      for rate in args.rates:
        for name in strategies(args, model):
          # streamed rows also write one forward's per-rank timeline and its plot
          timeline = ([f"--timeline={base}_rate{rate:g}_{name}_timeline.json"]
                      if name in STREAMED else [])
          run([*py, "infer.lab.testbed", "--procs", "2", f"--rate={rate:g}", "--cores-per-proc",
               "1", "--out", f"{base}_rate{rate:g}_{name}.json", "--", *probe, "--mesh", "2",
               *STRATEGIES[name][1], *timeline])
  if "bench" in args.measure:
    run(["taskset", "-c", "0", *py, "infer.lab.bench", "--models",
         *(m.replace(":", "-") for m in args.models), "--mesh", "2",
         "--bandwidths", *[f"{r:g}" for r in args.rates], "--strategies",
         *dict.fromkeys(STRATEGIES[n][0] for m in args.models for n in strategies(args, m)),
         "--profiles", "measured", "--repeats", str(args.repeats),
         "--out", os.path.dirname(args.bench)])
  if "probes" in args.measure:
    if not os.path.exists(args.bench):
      cli.fail(f"{args.bench} is missing: run --measure bench first")
    for rate, kind, nbytes in sorted(needed_probes(json.load(open(args.bench))["rows"],
                                                   testbed_runs(args.testbed))):
      if rate not in args.rates:
        continue
      count = max(4, min(16, (4 << 20) // nbytes))  # about 4 MiB, 4 to 16 messages
      run([*py, "infer.lab.testbed", "--procs", "2", f"--rate={rate:g}", "--cores-per-proc", "1",
           "--out", probe_file(args.testbed, kind, nbytes, rate), "--",
           "infer.lab.collective_time", "--kind", kind, "--bytes", str(nbytes), "--count",
           str(count), "--mesh", "2", f"--repeats={args.repeats}"])


def strategies(args, model: str) -> list[str]:
  """The strategies measured on ``model``: its own, less those --strategies leaves out."""
  return [n for n in MODELS[model] if args.strategies is None or n in args.strategies]


def probe_file(folder: str, kind: str, nbytes: int, rate: float) -> str:
  return os.path.join(folder, f"collective_{kind}_{nbytes}B_rate{rate:g}.json")


def message_bytes(transfer) -> tuple[str, int]:
  """(kind, operand bytes of one message) of a bench row's (kind, count, bytes)
  transfer: the mean message, rounded down to float32 as collective_time does."""
  kind, count, nbytes = transfer
  return kind.removesuffix("-start"), max(4, nbytes // count // 4 * 4)


def row_messages(row: dict):
  """(kind, message bytes) of every collective in a bench row's model inputs."""
  for part in ("per_layer", "final"):
    for transfer in row["model_inputs"]["transfers"][part]:
      yield message_bytes(transfer)


def testbed_runs(folder: str) -> list[dict]:
  runs = []
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    run = json.load(open(path))
    if "latency_s" in run and "model" in run and "kind" not in run:
      runs.append(run)
  return runs


def matches(bench_rows: list[dict], runs: list[dict]):
  """(testbed run, its bench row or None) for every run."""
  model = {(r["model"], r["tokens"], r["mesh"], r["bandwidth_mbps"], r["exchange"]): r
           for r in bench_rows if r["profile"] == "measured" and r["topology"] == "switched"}
  for run in runs:
    name = run["model"].replace(":", "-")
    if run.get("mesh", 1) == 1:
      key = next((k for k in model if k[:2] == (name, run["tokens"])), None)
      yield run, model[key] if key else None
    else:
      yield run, model.get((name, run["tokens"], run["mesh"], run["rate_mbit"], spec(run)))


def needed_probes(bench_rows: list[dict], runs: list[dict]) -> set[tuple[float, str, int]]:
  """(rate, kind, message bytes) of every collective in a measured multi-device row."""
  need = set()
  for run, row in matches(bench_rows, runs):
    if (row is None or run.get("mesh", 1) == 1 or "model_inputs" not in row
        or spec(run).startswith("stream")):  # calibrated by the testbed's TCP probe
      continue
    need.update((row["bandwidth_mbps"], *key) for key in row_messages(row))
  return need



def efficiencies(folder: str) -> dict[float, dict[tuple[str, int], float]]:
  """Per link rate, each probed (kind, message bytes)'s measured fraction of the
  rate, after taking out the model's per-message latency alpha (capped at 1)."""
  from astra_jax.netsim import latency
  found: dict[float, dict[tuple[str, int], float]] = {}
  for path in glob.glob(os.path.join(folder, "collective_*B_rate*.json")):
    probe = json.load(open(path))
    if probe.get("gap_s", 0) > 0:  # an idle-gap probe: measured_buckets reads it
      continue
    seconds = probe["latency_s"] - probe["count"] * latency.DEFAULT_MESSAGE_LATENCY_S
    bits = 8 * probe["count"] * probe["wire_bytes"]
    eff = 1.0 if seconds <= 0 else min(1.0, bits / seconds / 1e6 / probe["rate_mbit"])
    found.setdefault(probe["rate_mbit"], {})[(probe["kind"], probe["bytes"])] = eff
  return found


def measured_buckets(folder: str) -> dict[float, int]:
  """Per link rate, the bucket an exchange really gets after a compute-long idle
  spell, from the idle-gap probes (``collective_time --gap-s``) in ``folder``:
  a call's time t, less alpha, at the back-to-back probe's efficiency e of the
  same (kind, bytes, rate) sends t x rate x e bytes, so the first
  wire - t x rate x e bytes left at once (clamped to [0, tbf's depth]; the
  mean over the rate's probes)."""
  from astra_jax.netsim import latency, netns
  chained = efficiencies(folder)
  found: dict[float, list[float]] = {}
  for path in sorted(glob.glob(os.path.join(folder, "collective_*B_rate*.json"))):
    probe = json.load(open(path))
    if probe.get("gap_s", 0) <= 0:
      continue
    rate, key = probe["rate_mbit"], (probe["kind"], probe["bytes"])
    if key not in chained.get(rate, {}):
      raise ValueError(f"{path} has no back-to-back probe of {key[0]} {key[1]} bytes at "
                       f"{rate:g} Mbit/s beside it: run infer.lab.collective_time without "
                       "--gap-s too")
    seconds = probe["latency_s"] / probe["calls"] - latency.DEFAULT_MESSAGE_LATENCY_S
    sent = max(0.0, seconds) * rate * 1e6 * chained[rate][key] / 8
    depth = netns.burst_bytes(rate)
    found.setdefault(rate, []).append(min(depth, max(0.0, probe["wire_bytes"] - sent)))
  return {rate: int(round(sum(b) / len(b))) for rate, b in found.items()}


def row_efficiency(row: dict, probed: dict[tuple[str, int], float]) -> dict[str, float] | None:
  """A bench row's link efficiency per kind from the probes of its message
  sizes; None when one of them was not probed."""
  eff = {}
  for key in row_messages(row):
    if key not in probed:
      return None
    eff[key[0]] = probed[key]
  return eff


def recompute(row: dict, efficiency: dict[str, float], burst_bytes: float = 0.0) -> float:
  """A bench row's modelled latency with per-kind link efficiencies and a token bucket."""
  from astra_jax.netsim import latency, pipeline
  inputs = row["model_inputs"]
  transfers = {part: [latency.Transfer(*t) for t in inputs["transfers"][part]]
               for part in ("per_layer", "final")}
  net = latency.Network(latency.Trace.constant(row["bandwidth_mbps"]), row["topology"],
                        inputs["message_latency_s"],
                        tuple(sorted(efficiency.items())), burst_bytes)
  if row["exchange"].startswith("stream"):  # the pipelined schedule (bucket not credited)
    return pipeline.streaming_latency(
        layers=row["layers"], layer_compute_s=inputs["layer_compute_s"],
        layer_transfers=transfers["per_layer"], mesh_size=row["mesh"], network=net,
        embed_s=inputs["embed_s"], head_s=inputs["head_s"]).total_s
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
  if run["exchange"] == "stream" and run.get("quantize") is False:
    return "stream:quantize=false"
  if run["exchange"] in ("vq", "stream"):
    options.append(f"groups={run['groups']}")
    if run.get("codebook_size", 1024) != 1024:
      options.append(f"codebook_size={run['codebook_size']}")
  if run.get("overlap"):
    options.append("overlap=true")
  return run["exchange"] + (":" + ",".join(options) if options else "")


def join(bench_rows: list[dict], runs: list[dict],
         probes: dict[float, dict[tuple[str, int], float]] | None = None,
         bucket: str = "tbf", gap_buckets: dict[float, int] | None = None) -> list[dict]:
  """One row per testbed run that the bench modelled (same model/tokens/P/rate/exchange);
  with ``probes`` (per rate, per (kind, message bytes) efficiency), also the
  calibrated model for every row whose message sizes were probed, with the
  testbed's tbf bucket (``bucket="tbf"``), none (``"none"``) or the bucket
  ``gap_buckets`` measured per rate by idle-gap probes (``"measured"``)."""
  rows = []
  single_s = {(r["model"], r["tokens"]): r["latency_s"] for r in runs if r.get("mesh", 1) == 1}
  for run, hit in matches(bench_rows, runs):
    if hit is None:
      continue
    single = run.get("mesh", 1) == 1
    rate = None if single else run["rate_mbit"]
    predicted = hit["single_device_s"] if single else hit["latency_s"]
    measured = run["latency_s"]
    calibrated = predicted if single and probes else None
    if not single and spec(run).startswith("stream") and run.get("measured_mbit"):
      # the stream exchange's blocks travel on one plain TCP connection per pair of
      # ranks (stream_transport), not through gloo: the testbed's own probe before
      # the run, one TCP stream on the same link, is its measured rate
      eff = {"collective-permute": min(1.0, run["measured_mbit"] / rate)}
      calibrated = recompute(hit, eff)
    elif not single and probes and rate in probes:
      if "model_inputs" not in hit:
        raise ValueError("the bench rows predate model_inputs: rerun the bench command in "
                         "this module's docstring")
      eff = row_efficiency(hit, probes[rate])
      if eff is not None:
        calibrated = recompute(hit, eff, bucket_bytes(bucket, rate, gap_buckets))
    rows.append({"model": hit["model"], "tokens": run["tokens"], "mesh": run.get("mesh", 1),
                 "rate_mbit": rate, "exchange": "-" if single else spec(run),
                 "measured_s": measured, "predicted_s": predicted,
                 "error": predicted / measured - 1,
                 **({"calibrated_s": calibrated, "calibrated_error": calibrated / measured - 1}
                    if calibrated is not None else {}),
                 "bytes_per_device": run.get("bytes_per_device", 0),
                 **({"vs_one_device": single_s[run["model"], run["tokens"]] / measured}
                    if (run["model"], run["tokens"]) in single_s else {}),
                 # a streamed run's timeline (prefill_time --timeline): each rank's
                 # seconds computing and waiting for earlier ranks' blocks
                 **({"ranks_computed_s": [r["computed_s"] for r in run["timeline"]["ranks"]],
                     "ranks_waited_s": [r["waited_s"] for r in run["timeline"]["ranks"]]}
                    if "timeline" in run else {})})
  return sorted(rows, key=lambda r: (r["model"], r["rate_mbit"] or 0, r["exchange"]))


def bucket_bytes(bucket: str, rate: float, gap_buckets: dict[float, int] | None = None) -> int:
  """The token bucket the calibrated model credits at ``rate`` Mbit/s."""
  from astra_jax.netsim import netns
  if bucket not in BUCKETS:
    raise ValueError(f"unknown bucket {bucket!r}; choose one of {list(BUCKETS)}")
  if bucket == "measured":
    if rate not in (gap_buckets or {}):
      raise ValueError(f"no idle-gap probe at {rate:g} Mbit/s for --bucket measured: run "
                       "the commands in results/testbed_gap/COMMANDS.md at that rate")
    return gap_buckets[rate]
  return netns.burst_bytes(rate) if bucket == "tbf" else 0


def _size(nbytes: int) -> str:
  return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:g} KiB"


def markdown(rows: list[dict],
             probes: dict[float, dict[tuple[str, int], float]] | None = None,
             bucket: str = "tbf", gap_buckets: dict[float, int] | None = None) -> str:
  calibrated = any("calibrated_s" in r for r in rows)
  speedups = any("vs_one_device" in r for r in rows)
  timelines = any("ranks_waited_s" in r for r in rows)
  head = ["model", "tokens", "devices", "link Mbit/s", "exchange", "measured s (median)",
          "model s", "model error"] + (["calibrated model s", "calibrated error"]
                                       if calibrated else []) + \
      (["vs one device"] if speedups else []) + \
      (["per rank: computing / waiting s"] if timelines else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["model"], str(r["tokens"]), str(r["mesh"]), f"{r['rate_mbit'] or '-'}",
             r["exchange"], f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
             f"{100 * r['error']:+.0f}%"]
    if calibrated:
      cells += [f"{r['calibrated_s']:.3f}", f"{100 * r['calibrated_error']:+.0f}%"] \
          if "calibrated_s" in r else ["-", "-"]
    if speedups:
      cells.append(f"{r['vs_one_device']:.2f}x" if "vs_one_device" in r else "-")
    if timelines:
      cells.append(", ".join(f"{c:.2f} / {w:.2f}" for c, w in zip(r["ranks_computed_s"],
                                                                  r["ranks_waited_s"]))
                   if "ranks_waited_s" in r else "-")
    lines.append("| " + " | ".join(cells) + " |")
  for rate, kinds in sorted((probes or {}).items()):
    if bucket == "measured" and rate not in (gap_buckets or {}):
      tail = "; no bucket measured at this rate."
    elif bucket == "none":
      tail = "; no bucket credited."
    else:
      what = "tbf bucket" if bucket == "tbf" else "bucket measured after idle gaps"
      tail = f"; {what} {bucket_bytes(bucket, rate, gap_buckets)} bytes."
    lines.append("")
    lines.append(f"Link efficiency at {rate:g} Mbit/s (infer.lab.collective_time, measured, per "
                 "message size): " + ", ".join(f"{k} {_size(n)} {v:.0%}"
                                               for (k, n), v in sorted(kinds.items())) +
                 tail)
  return "\n".join(lines)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.measure:
    measure(args)
  if not os.path.exists(args.bench):
    cli.fail(f"{args.bench} is missing: run the bench command in this module's docstring first")
  runs = testbed_runs(args.testbed)
  if not runs:
    cli.fail(f"no testbed results in {args.testbed}: run python -m infer.lab.testbed first")
  probes = efficiencies(args.testbed)
  try:
    gap_buckets = (measured_buckets(args.gap_probes or args.testbed)
                   if args.bucket == "measured" else None)
    rows = join(json.load(open(args.bench))["rows"], runs, probes, args.bucket, gap_buckets)
  except ValueError as e:
    cli.fail(str(e))
  if not rows:
    cli.fail("no testbed run matches a modelled row: model the same model, tokens, "
             "devices, rates and exchanges with infer.lab.bench")
  with open(args.out + ".json", "w") as f:
    json.dump({"command": "python -m infer.lab.model_check " + " ".join(sys.argv[1:]),
               "bucket": args.bucket,
               **({"measured_bucket_bytes": {f"{r:g}": b for r, b in gap_buckets.items()}}
                  if gap_buckets else {}),
               "link_efficiency": {f"{r:g}": {f"{k} {n}": v for (k, n), v in kinds.items()}
                                   for r, kinds in probes.items()},
               "rows": rows}, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(rows, probes, args.bucket, gap_buckets) + "\n")
  print(markdown(rows, probes, args.bucket, gap_buckets))
  cli.print_result({"rows": len(rows), "out": args.out})


if __name__ == "__main__":
  cli.entry(main)
