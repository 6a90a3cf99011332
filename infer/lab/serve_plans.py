"""Does the server's per-request plan pick the fastest?  Every plan measured the
way the server runs it, beside the plan it picks on its own.

  sudo python -m infer.lab.testbed --procs 2 --rate 10 --out results/serve_plans/10mbit.json \\
      -- infer.lab.serve_plans --model smollm2 --exchange vq:groups=32 --exchange vq:groups=1 \\
      --prompts 32,256,1024

Rank 0 is the multi-rank server's engine (``astra_jax.serve.group``) without
HTTP, the other ranks its workers, all started as ``infer.serve`` starts
them; the buckets are the prompt lengths.  After the warm-up (link probe,
every plan compiled and timed) it takes, for each prompt length, that many
tokens of held-out text (one less for a prompt as long as the window, padded
to the same bucket; the start of the text's validation part, whose
perplexity the warm-up also measures per plan) and runs each plan forced (one device, exact K/V,
ASTRA at each G), then the plan the server picks by itself, ``--repeats``
times each (short prompts more often, up to 2 s of runs), greedy, one new token; the time is to the first token, as a
client sees it minus HTTP.  The JSON line has per length every plan's median
and prediction, the pick, and ``pick_vs_best`` (the pick's time over the
fastest plan's) and ``pick_vs_one_device``.

  python -m infer.lab.serve_plans --report results/serve_plans/10mbit.json \
      results/serve_plans/100mbit.json --publish BENCHMARKS.md

prints those results as one markdown table (and with ``--publish`` puts it
between the ``serve-plans`` markers of that file).
"""

from __future__ import annotations

import statistics
import sys
import time

from astra_jax.parallel import distributed
from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run folder made by train.gpt2 / train.llama")
  source.add_argument("--model", help="gguf:PATH, hf:DIR or smollm2 (bundled)")
  source.add_argument("--report", nargs="+", metavar="JSON",
                      help="print the table of these results (the testbed's --out files)")
  p.add_argument("--publish", default=None, metavar="MARKDOWN",
                 help="--report: also put the table between the serve-plans markers here")
  p.add_argument("--exchange", action="append", default=None,
                 help="an ASTRA plan, e.g. vq:groups=32 (repeat it; exact K/V is always a plan)")
  p.add_argument("--prompts", default="32,256,1024",
                 help="prompt lengths in tokens, comma-separated multiples of the ranks")
  p.add_argument("--repeats", type=cli.at_least(1), default=3, help="runs per plan and length")
  p.add_argument("--context", type=cli.at_least(1), default=None)
  p.add_argument("--text", default=None, help="the text prompts (held-out part) and k-means "
                 "come from (default: the model config's)")
  p.add_argument("--join-timeout", type=cli.positive, default=900)
  distributed.add_flags(p)
  return p.parse_args(argv)


def _lengths(text: str, ranks: int) -> list[int]:
  try:
    values = sorted({int(x) for x in text.split(",") if x.strip()})
  except ValueError:
    raise ValueError(f"--prompts {text!r}: give comma-separated token counts, e.g. 32,256,1024"
                     ) from None
  bad = [v for v in values if v <= 0 or v % ranks]
  if not values or bad:
    raise ValueError(f"--prompts {text!r}: give positive multiples of the {ranks} ranks")
  return values


MIN_TOTAL_S, MAX_RUNS = 2.0, 15  # a short prompt's time is noisy: more runs, same cost


def measure(engine, prompt: list[int], plan: str | None, repeats: int,
            bucket: int) -> tuple[float, dict]:
  """Median seconds to the first token over ``repeats`` runs, more for a short
  prompt (until the runs add up to MIN_TOTAL_S, at most MAX_RUNS); the last
  run's plan."""
  from astra_jax.serve.engine import Sampling
  times = []
  while len(times) < repeats or (sum(times) < MIN_TOTAL_S and len(times) < MAX_RUNS):
    gen = engine.generate(prompt, Sampling(max_tokens=1, temperature=0.0, seed=0, plan=plan),
                          bucket=bucket, quiet=True)
    list(gen)
    times.append(gen.prefill_s)
  return statistics.median(times), gen.plan


def table(results: list[dict]) -> str:
  """One row per link and prompt length: every plan's measured (predicted) time
  to first token, the pick and how it compares."""
  plans = list(dict.fromkeys(p for r in results for p in r["plans"]))
  head = ("| link | prompt | " + " | ".join(f"{p} s (model)" for p in plans)
          + " | picked | picked s | vs best | vs one device |")
  lines = [head, "|" + " --- |" * (head.count("|") - 1)]
  for r in results:
    link = f"{r['rate_mbit']:g} Mbit/s (probe {r['link']['mbit']:.1f})"
    for row in r["rows"]:
      cells = []
      for p in plans:
        got = row["plans"].get(p)
        cells.append("-" if got is None else
                     f"{got['measured_s']:.3f} ({got['predicted_s'] or float('nan'):.3f})")
      lines.append(f"| {link} | {row['prompt_tokens']} | " + " | ".join(cells)
                   + f" | {row['pick']} | {row['pick_s']:.3f} | {row['pick_vs_best']:.2f}x"
                   f" | {row['pick_vs_one_device']:.2f}x |")
  quality = "; ".join(f"{r['rate_mbit']:g} Mbit/s: " + ", ".join(
      f"{k} {v + 0.0:+.1f} %".replace("-0.0", "+0.0")
      for k, v in r.get("quality_loss_pct", {}).items()) for r in results)
  return "\n".join(lines) + f"\n\nPerplexity over one device's, measured at start: {quality}.\n"


def report(args) -> None:
  import json
  from astra_jax.run import markdown
  results = []
  for path in args.report:
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      cli.fail(f"{path}: cannot read a JSON result ({e}); give the --out files of "
               "infer.lab.testbed ... -- infer.lab.serve_plans")
    if not isinstance(result, dict) or "rows" not in result or "rate_mbit" not in result:
      cli.fail(f"{path} is not a serve_plans result from the testbed (no rows or rate_mbit); "
               "run it under infer.lab.testbed with --out")
    results.append(result)
  text = table(results)
  print(text)
  if args.publish:
    markdown.replace_block(args.publish, "serve-plans", text)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.report:
    return report(args)
  if not distributed.requested(args) or args.num_processes is None:
    cli.fail("run it on several ranks: python -m infer.launch --procs N -- infer.lab.serve_plans "
             "... (or under infer.lab.testbed)")
  try:
    distributed.check(args, args.num_processes)
    lengths = _lengths(args.prompts, args.num_processes)
  except ValueError as e:
    cli.fail(str(e))
  cli.ensure_cpu_devices(1)
  from astra_jax.parallel import stream_transport
  from astra_jax.serve import group, load, plan as plan_lib, rank as rank_lib
  from astra_jax.serve.engine import CompileCounter
  start = time.perf_counter()
  rank, host = args.process_id, stream_transport.local_address(args.coordinator)
  try:
    compiles = CompileCounter()
    loaded = load.load_group(args.model, args.workdir, exchanges_asked=args.exchange,
                             context=args.context, text=args.text)
    if max(lengths) > loaded.context:
      raise ValueError(f"--prompts up to {max(lengths)} tokens exceed the context of "
                       f"{loaded.context}; give shorter ones or a longer --context")
    if rank:
      rank_lib.serve_worker(loaded, rank=rank, front=args.coordinator, host=host,
                            compiles=lambda: compiles.count)
      return
    engine = group.GroupEngine(loaded, size=args.num_processes, control=args.coordinator,
                               links_host=host, buckets=lengths)
    engine.wait_for_ranks(args.join_timeout)
    warm = engine.warm_up(loaded.held_out)
    ids = loaded.held_out
    if len(ids) < max(lengths):
      raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than --prompts needs")
  except (ValueError, group.RankLost) as e:  # a rank lost during the warm-up too
    cli.fail(str(e))
  rows = []
  for length in lengths:
    # a prompt filling the whole window leaves no room for its reply: one token less,
    # padded to the same bucket (the same programs, the same time)
    prompt = ids[:min(length, loaded.context - 1)]
    plans = {}
    for label in [plan_lib.ONE] + engine.labels:
      seconds, ran = measure(engine, prompt, label, args.repeats, length)
      plans[label] = {"measured_s": round(seconds, 4), "predicted_s": ran["predicted_s"]}
    seconds, picked = measure(engine, prompt, None, args.repeats, length)
    best = min(plans, key=lambda k: plans[k]["measured_s"])
    row = {"prompt_tokens": length, "prompt_ids": len(prompt), "plans": plans, "pick": picked["plan"],
           "pick_s": round(seconds, 4), "best": best,
           "pick_vs_best": round(seconds / plans[best]["measured_s"], 3),
           "pick_vs_one_device": round(seconds / plans[plan_lib.ONE]["measured_s"], 3)}
    print(f"{length} tokens: picked {row['pick']} {seconds:.3f} s; best {best} "
          f"{plans[best]['measured_s']:.3f} s; one device {plans[plan_lib.ONE]['measured_s']:.3f} s",
          file=sys.stderr, flush=True)
    rows.append(row)
  engine.shutdown()
  cli.print_result({"model": loaded.name, "ranks": args.num_processes, "plans":
                    [plan_lib.ONE] + engine.labels, "link": warm["link"],
                    "warm_up_s": warm["compile_s"], "repeats": args.repeats, "rows": rows,
                    "quality": warm["quality"], "quality_loss_pct": engine.planner.loss,
                    "compiles_after_warm_up": engine.compiles_since_warm_up,
                    "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
  cli.entry(main)
