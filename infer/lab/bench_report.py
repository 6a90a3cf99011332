"""The bench's outputs: bench.json, bench.md (tables, paper comparison) and PNG plots.

Plots, one pair per device profile (first topology, constant bandwidths):
``latency_vs_bandwidth_<profile>.png`` (one panel per model, a line per
exchange at 4 devices, or the largest P in the matrix when 4 is not in it;
dashed: one device) and ``speedup_vs_devices_<profile>.png`` (speedup over one
device against P, a line per exchange at the lowest (solid, circles) and
highest (dashed, squares) bandwidth).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

FORMULA = (
    "latency = embed + sum over layers [compute + sum over collectives "
    "(wire bytes x 8 / bandwidth + per-message latency)] + head + final collectives, "
    "no overlap of compute and communication; a strategy with overlap=true pays "
    "max(0, collectives - local-block attention) per layer instead of the collectives")
TOPOLOGY_TEXT = {
    "switched": "switched full duplex: each device has its own link through a switch; an "
                "all-gather costs (P-1) x shard bytes on a device's downlink",
    "shared": "shared medium: all P devices take turns on one link; an all-gather costs "
              "P x shard bytes on it",
}


def write(out: str, rows: list[dict], paper: dict | None, *, command: str,
          skipped: list[dict] = ()) -> list[str]:
  """Writes every output into ``out``; returns the file paths."""
  os.makedirs(out, exist_ok=True)
  files = [os.path.join(out, "bench.json"), os.path.join(out, "bench.md")]
  with open(files[0], "w") as f:  # one row per line: small, and diffs stay readable
    head = json.dumps({"command": command, "formula": FORMULA, "paper": paper,
                       "skipped": list(skipped)})
    f.write(head[:-1] + ', "rows": [\n')
    f.write(",\n".join(json.dumps(r) for r in rows) + "\n]}\n")
  files += plots(out, rows)
  with open(files[1], "w") as f:
    f.write(markdown(rows, paper, command=command, plots=[os.path.basename(p) for p in files[2:]],
                     skipped=skipped))
  return files


def paper_text(paper: dict) -> str:
  s, p = paper["setting"], paper["paper"]
  lines = [f"paper comparison ({s['model']}, P={s['mesh']}, {s['bandwidth_mbps']:g} Mbit/s; "
           f"paper: {p['speedup_vs_single']}x over one device, {p['speedup_vs_exact']}x over "
           "exact SP):"]
  for r in paper["rows"]:
    lines.append(f"  {r['profile']} {r['exchange']} ({r['accounting']} accounting): "
                 f"{r['speedup_vs_single']:.3g}x over one device, {r['speedup_vs_exact']:.4g}x "
                 "over exact SP")
  return "\n".join(lines)


def _ms(s: float) -> str:
  ms = s * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _x(v: float) -> str:
  return f"{v:.3g}x"


def markdown(rows, paper, *, command: str, plots: list[str], skipped=()) -> str:
  topologies = list(dict.fromkeys(r["topology"] for r in rows))
  lines = ["# Prefill latency bench", "", f"Made by `{command}`; every row is in "
           "`bench.json`.", "", f"Model: {FORMULA}. Bytes per device are read from the "
           "compiled program; compute is the device profile's roofline, max(FLOPs / peak, "
           "bytes / memory bandwidth), or (profile `measured`) timed on this host.", ""]
  lines += [f"- {t}: {TOPOLOGY_TEXT[t]}" for t in topologies] + [""]
  if paper:
    lines += _paper_md(paper)
  lines += _winners(rows)
  if skipped:
    lines += ["Not run (tensor parallelism splits whole heads):", ""]
    lines += [f"- {s['model']} P={s['mesh']} {s['strategy']}: {s['why']}" for s in skipped]
    lines += [""]
  groups = defaultdict(list)
  for r in rows:
    groups[r["profile"], r["topology"]].append(r)
  for (profile, topology), rs in groups.items():
    lines += _table(profile, topology, rs)
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)


def _winners(rows) -> list[str]:
  """Per model, profile and topology at P=4 (else the largest P): the fastest
  strategy at each bandwidth, with its speedup over one device."""
  groups = defaultdict(list)
  for r in rows:
    if r["mesh"] > 1:
      groups[r["model"], r["profile"], r["topology"]].append(r)
  if not groups:
    return []
  bands = list(dict.fromkeys(r["bandwidth"] for r in rows))
  lines = ["## Fastest strategy", "", "At P=4 devices (or the largest P run), the strategy "
           "with the lowest modeled prefill latency and its speedup over one device "
           "(below 1x: one device is faster).", "",
           "| model | profile | topology | P | " + " | ".join(f"{b} Mbit/s" for b in bands) + " |",
           "|---|---|---|---|" + "---|" * len(bands)]
  for (model, profile, topology), rs in groups.items():
    p = 4 if any(r["mesh"] == 4 for r in rs) else max(r["mesh"] for r in rs)
    cells = []
    for b in bands:
      at = [r for r in rs if r["mesh"] == p and r["bandwidth"] == b]
      best = min(at, key=lambda r: r["latency_s"], default=None)
      cells.append("" if best is None else
                   f"{best['exchange']} {_x(best['speedup_vs_single'])}")
    lines.append(f"| {model} | {profile} | {topology} | {p} | " + " | ".join(cells) + " |")
  return lines + [""]


def _paper_md(paper) -> list[str]:
  s, p = paper["setting"], paper["paper"]
  lines = ["## Comparison with the ASTRA paper", "",
           f"{s['mesh']} devices, {s['model']} (1024 tokens), {s['bandwidth_mbps']:g} Mbit/s, "
           f"K=1024 codebooks, efficiency {paper['efficiency']:g}. Two accountings of the "
           f"same compute: *ours* (switched network, {paper['latency_ms_per_message']:g} ms "
           "per collective, what the matrix uses) and *paper* (the bits a device sends / "
           "bandwidth, nothing per message, as the paper simulated).", "",
           "| profile | strategy | accounting | one device ms | exact SP ms | ASTRA ms "
           f"(compute + comm) | vs one device (paper {p['speedup_vs_single']}x) | "
           f"vs exact SP (paper {p['speedup_vs_exact']}x) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in paper["rows"]:
    lines.append(f"| {r['profile']} | {r['exchange']} | {r['accounting']} | "
                 f"{_ms(r['single_device_s'])} | {_ms(r['exact_sp_s'])} | "
                 f"{_ms(r['latency_s'])} ({_ms(r['compute_s'])} + {_ms(r['comm_s'])}) | "
                 f"{_x(r['speedup_vs_single'])} | {_x(r['speedup_vs_exact'])} |")
  lines += ["", "gtx1660ti is the spec-sheet peak; host is this machine's measured FLOP/s "
            "(python -m infer.lab.profile_host). BENCHMARKS.md says which row reproduces the "
            "paper and why."]
  return lines + [""]


def _table(profile, topology, rows) -> list[str]:
  bands = list(dict.fromkeys(r["bandwidth"] for r in rows))
  head = [b if b.startswith("trace") else f"{b} Mbit/s" for b in bands]
  lines = [f"## {profile}, {topology}", "",
           "Latency in ms (speedup over one device); bytes sent per device per forward, "
           "read from the compiled program.", "",
           "| model | P | strategy | bytes/device | compute ms | " + " | ".join(head) + " |",
           "| --- | ---: | --- | ---: | ---: |" + " ---: |" * len(bands)]
  cells = defaultdict(dict)
  for r in rows:
    cells[r["model"], r["mesh"], r["exchange"]][r["bandwidth"]] = r
  seen_single = set()
  for (model, mesh, exchange), by_band in cells.items():
    if mesh == 1:  # no exchange on one device: one row
      if model in seen_single:
        continue
      seen_single.add(model)
      exchange = "(one device)"
    first = next(iter(by_band.values()))
    vals = [f"{_ms(by_band[b]['latency_s'])} ({_x(by_band[b]['speedup_vs_single'])})"
            if b in by_band else "" for b in bands]
    lines.append(f"| {model} | {mesh} | {exchange} | {first['bytes_per_device']:,} | "
                 f"{_ms(first['compute_s'])} | " + " | ".join(vals) + " |")
  return lines + [""]


def plots(out: str, rows: list[dict]) -> list[str]:
  """Writes the PNGs (module docstring); returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  files = []
  rows = [r for r in rows if r["bandwidth_mbps"] is not None]
  if not rows:
    return files
  topology = rows[0]["topology"]
  rows = [r for r in rows if r["topology"] == topology]
  for profile in dict.fromkeys(r["profile"] for r in rows):
    rs = [r for r in rows if r["profile"] == profile]
    models = list(dict.fromkeys(r["model"] for r in rs))
    exchanges = list(dict.fromkeys(r["exchange"] for r in rs))
    meshes = sorted({r["mesh"] for r in rs})
    plot_p = 4 if 4 in meshes else meshes[-1]
    bands = sorted({r["bandwidth_mbps"] for r in rs})

    fig, axes = _panels(plt, len(models))
    for ax, model in zip(axes, models):
      for ex in exchanges:
        pts = sorted((r["bandwidth_mbps"], r["latency_s"]) for r in rs
                     if r["model"] == model and r["exchange"] == ex and r["mesh"] == plot_p)
        ax.plot(*zip(*pts), marker="o", label=f"{ex}, P={plot_p}")
      single = next(r["single_device_s"] for r in rs if r["model"] == model)
      ax.axhline(single, color="k", linestyle="--", label="one device")
      ax.set(xscale="log", yscale="log", title=model, xlabel="bandwidth (Mbit/s)",
             ylabel="prefill latency (s)")
      ax.legend(fontsize=7)
    files.append(_save(fig, out, f"latency_vs_bandwidth_{profile}.png",
                       f"{profile}, {topology}"))

    fig, axes = _panels(plt, len(models))
    for ax, model in zip(axes, models):
      for i, ex in enumerate(exchanges):
        for band, style in ((bands[0], "-o"), (bands[-1], "--s")):
          pts = sorted((r["mesh"], r["speedup_vs_single"]) for r in rs
                       if r["model"] == model and r["exchange"] == ex
                       and r["bandwidth_mbps"] == band)
          ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{ex}, {band:g} Mbit/s")
      ax.axhline(1.0, color="k", linewidth=0.8)
      ax.set(yscale="log", title=model, xlabel="devices P", ylabel="speedup over one device",
             xticks=meshes)
      ax.legend(fontsize=7)
    files.append(_save(fig, out, f"speedup_vs_devices_{profile}.png", f"{profile}, {topology}"))
  return files


def _panels(plt, n):
  cols = min(n, 3)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def _save(fig, out, name, title):
  fig.suptitle(title)
  fig.tight_layout()
  path = os.path.join(out, name)
  fig.savefig(path, dpi=90)
  fig.clf()
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path
