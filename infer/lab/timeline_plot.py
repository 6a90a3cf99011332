"""Per-rank timeline of one streamed forward: where each rank computes, where it
waits on the link, and when each layer's block arrives.

  python -m infer.lab.timeline_plot results/stream_testbed/timeline_groups_32_10.json

reads a timeline written by ``infer.lab.prefill_time --timeline PATH`` (which
also plots it) and writes the plot beside it (``.png``) and prints the
summary as one JSON line.  A record holds, per rank, the forward's start and
end and ``stream_transport.Timeline``'s events: per exchange (one per
attention layer) when the block was handed over and when the earlier ranks'
blocks had all been taken, and per message when it arrived.  Times are wall
clock (one host, or hosts whose clocks agree).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from astra_jax.run import cli


def summarise(record: dict) -> dict:
  """Per rank: forward seconds, seconds computing and waiting, exchanges,
  messages sent and received, and the median time from a block's hand-over
  on the sending rank to its arrival here (link plus queueing)."""
  ranks = record["ranks"]
  t0 = min(r["start"] for r in ranks)
  rows = []
  for r in ranks:
    waits = [taken - handed for _, handed, taken in r["calls"]]
    slept = sum(handed - reached for reached, handed, _ in r["calls"])
    transit = [arrived - ranks[int(src)]["calls"][n][1]
               for src, times in r["arrived"].items() for n, arrived in enumerate(times)
               if n < len(ranks[int(src)]["calls"])]
    forward = r["end"] - r["start"]
    rows.append({
        "rank": r["rank"], "forward_s": round(forward, 4),
        "finished_at_s": round(r["end"] - t0, 4),
        "waited_s": round(sum(waits), 4),
        "computed_s": round(forward - sum(waits) - slept, 4),
        "slept_s": round(slept, 4),
        "exchanges": len(r["calls"]),
        "messages_sent": sum(len(v) for v in r["sent"].values()),
        "messages_received": sum(len(v) for v in r["arrived"].values()),
        "median_transit_s": round(statistics.median(transit), 4) if transit else None,
    })
  return {"ranks": rows,
          "last_rank_after_first_s": round(rows[-1]["finished_at_s"] - rows[0]["finished_at_s"], 4)}


def plot(record: dict, png: str) -> None:
  """Writes the timeline: a row per rank, compute in blue, waiting for earlier
  ranks' blocks in red, ``--slow-rank``'s sleep in yellow, a grey line per
  message from hand-over to arrival."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  colours = {"computing": "#4c78a8", "waiting for earlier ranks' blocks": "#e45756",
             "slept (--slow-rank)": "#f2cf5b"}
  compute, wait, sleep = colours.values()
  ranks = record["ranks"]
  t0 = min(r["start"] for r in ranks)
  fig, ax = plt.subplots(figsize=(11, 1.2 + 0.9 * len(ranks)))
  for r in ranks:
    y, previous = r["rank"], r["start"]
    for reached, handed, taken in r["calls"]:
      ax.barh(y, reached - previous, left=previous - t0, height=0.5, color=compute,
              edgecolor="white", linewidth=0.3)
      ax.barh(y, handed - reached, left=reached - t0, height=0.5, color=sleep)
      ax.barh(y, taken - handed, left=handed - t0, height=0.5, color=wait)
      previous = taken
    ax.barh(y, r["end"] - previous, left=previous - t0, height=0.5, color=compute)
    for src, times in r["arrived"].items():
      sender = ranks[int(src)]
      for n, arrived in enumerate(times):
        if n < len(sender["calls"]):
          ax.plot([sender["calls"][n][1] - t0, arrived - t0], [int(src) + 0.25, y - 0.25],
                  color="0.45", linewidth=0.6)
  handles = [Patch(color=c, label=name) for name, c in colours.items()]
  handles.append(Line2D([], [], color="0.45", linewidth=0.6,
                        label="a layer's block, hand-over to arrival"))
  ax.set_yticks([r["rank"] for r in ranks], [f"rank {r['rank']}" for r in ranks])
  ax.invert_yaxis()
  ax.set_xlabel("seconds from the first rank's start (a white edge: a layer's block handed over)")
  ax.set_title(f"{record.get('model')} {record.get('tokens')} tokens, "
               f"--exchange {record.get('exchange')}: one streamed forward per rank")
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4,
            fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("timeline", help="a JSON file written by infer.lab.prefill_time --timeline")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    with open(args.timeline) as f:
      record = json.load(f)
    if not isinstance(record, dict) or not record.get("ranks") or "calls" not in record["ranks"][0]:
      raise ValueError
  except FileNotFoundError:
    cli.fail(f"no file {args.timeline}: write one with infer.lab.prefill_time --timeline PATH")
  except (ValueError, OSError):
    cli.fail(f"{args.timeline} is not a timeline from infer.lab.prefill_time --timeline; "
             "pass one of those")
  png = os.path.splitext(args.timeline)[0] + ".png"
  plot(record, png)
  cli.print_result({"timeline": args.timeline, "png": png, **summarise(record)})


if __name__ == "__main__":
  cli.entry(main)
