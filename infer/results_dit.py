"""The CoDiT table: distributed DiT sampling under every exchange, against one device.

  python -m infer.results dit --workdir workdir/dit --classifier workdir/vit [--publish]

Samples the same noise and labels (``--per-class`` images of each class,
``--steps`` Euler steps) once on one device and once per row at ``--mesh``
devices, in this process, and scores each row:

  PSNR, SSIM     per image against the single-device sample from the same
                 noise and label ("w/ orig."), averaged
  class acc.     the samples' labels as judged by the project's ViT
                 (``--classifier``, e.g. the main job's workdir/vit)
  Fréchet (ViT)  Fréchet distance between the classifier's class-token
                 features of the samples and of as many test images: an
                 FID-like score in that classifier's feature space (not
                 Inception's FID, and biased upwards by the small sample)
  bytes          into one device per sampling run of one image over switched
                 links (an all-gather brings the other P - 1 blocks, a
                 ppermute one block), from the compiled sampler's collectives
                 (``infer.dit``'s bytes_received_per_device)
  modelled time  per sampling run of one image at 10 and 100 Mbit/s with the
                 project's latency model (``astra_jax.netsim.latency``,
                 switched links, 1 ms per message): compute = this host's
                 measured single-device sampling time per image / P per
                 device, split evenly over the steps x layers; each layer's
                 transfers are the compiled program's collectives spread
                 evenly over them; DistriFusion's transfers overlap the
                 layer's compute (its K/V are read one step later)
  keys/query     attention keys per query per layer: own band + every other
                 token (token level), or own band + exact boundary rows + the
                 distinct code tuples in use (codebook-centric attention,
                 measured on the model's own K/V halfway through sampling)

The vq rows use k-means codebooks fitted on the exact run's own K/V (zero
shot, no fine-tuning; ``infer.dit`` does the same), cached on disk; the
``*_ft`` rows sample from ASTRA fine-tuned runs (``train.dit --init-from``
the exact run with ``--config.exchange=vq``, ``--finetune-steps`` steps at
``--mesh``, trained or resumed under ``--root``).
Writes ROOT/results.json and ROOT/RESULTS.md (``--publish``: the repo's
results/dit_fashion_mnist.json, RESULTS.md, and the sample grids in
results/dit/).
"""

from __future__ import annotations

import json
import os
import sys

from astra_jax.run import cli
from astra_jax.run import markdown as markdown_lib

# name, label, exchange spec (at --mesh; None: one device)
ROWS = [
    ("single_device", "single device", None),
    ("exact", "exact sequence parallel", "exact"),
    ("distrifusion", "DistriFusion (stale K/V, 2 warm-up steps)", "distrifusion:warmup=2"),
    ("vq_g32", "ASTRA G=32", "vq:groups=32"),
    ("vq_g32_boundary", "CoDiT G=32 + boundary row", "vq:groups=32,boundary_rows=1"),
    ("vq_g32_refresh2", "CoDiT G=32, codes every 2nd step", "vq:groups=32,refresh=2"),
    ("vq_g1", "ASTRA G=1", "vq:groups=1"),
    ("vq_g1_boundary", "CoDiT G=1 + boundary row", "vq:groups=1,boundary_rows=1"),
    ("vq_g1_codes", "CoDiT G=1, codebook-centric attention", "vq:groups=1,code_attention=true"),
    ("vq_g1_boundary_codes", "CoDiT G=1 + boundary row, codebook-centric",
     "vq:groups=1,boundary_rows=1,code_attention=true"),
    ("vq_g1_refresh2", "CoDiT G=1, codes every 2nd step", "vq:groups=1,refresh=2"),
    ("vq_g1_k16_codes", "CoDiT G=1, K=16, codebook-centric attention",
     "vq:groups=1,codebook_size=16,code_attention=true"),
    # ASTRA fine-tuning (train.dit --init-from the run, vq with k-means start): FT_RUNS
    ("vq_g32_ft", "ASTRA G=32, fine-tuned", "vq:groups=32"),
    ("vq_g1_ft", "ASTRA G=1, fine-tuned", "vq:groups=1"),
    ("vq_g1_boundary_ft", "CoDiT G=1 + boundary row, fine-tuned", "vq:groups=1,boundary_rows=1"),
]
# fine-tuned rows -> the run they sample from (a folder under --root) and its groups
FT_RUNS = {"vq_g32_ft": ("vq_g32_ft", 32), "vq_g1_ft": ("vq_g1_ft", 1),
           "vq_g1_boundary_ft": ("vq_g1_ft", 1)}
BANDWIDTHS_MBPS = (10, 100)


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0], prog="python -m infer.results dit")
  p.add_argument("--workdir", default="workdir/dit", help="the DiT run (python -m train.dit)")
  p.add_argument("--classifier", default="workdir/vit",
                 help="a ViT run on the same data (python -m train.vit) that judges the samples")
  p.add_argument("--mesh", type=cli.at_least(2), default=4)
  p.add_argument("--steps", type=cli.at_least(1), default=None,
                 help="Euler steps (default: the run's sample_steps)")
  p.add_argument("--per-class", type=cli.at_least(2), default=20)
  p.add_argument("--seed", type=cli.at_least(0), default=0)
  p.add_argument("--only", nargs="*", default=None,
                 help="rows to run (the others are kept, their modelled times recomputed "
                      "with this run's single-device time; --only alone: just that)")
  p.add_argument("--finetune-steps", type=cli.at_least(1), default=400,
                 help="ASTRA fine-tuning steps of the *_ft rows (train.dit --init-from)")
  p.add_argument("--finetune-lr", type=float, default=3e-4)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--root", default="workdir/dit_results")
  p.add_argument("--testbed", type=float, nargs="*", default=None, metavar="MBPS",
                 help="instead of the table: time one-image sampling runs on the shaped "
                      "testbed (2 ranks, one core each, infer.lab.testbed; root) at these "
                      "rates, beside one pinned device and the latency model")
  p.add_argument("--publish", action="store_true",
                 help="write the repo's results/dit_fashion_mnist.json, RESULTS.md and grids")
  args = p.parse_args(argv)
  names = [r[0] for r in ROWS]
  if args.only is not None and set(args.only) - set(names):
    p.error(f"unknown rows {sorted(set(args.only) - set(names))}; choose from {names}")
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  args.command = "python -m infer.results dit " + " ".join(argv)
  cli.ensure_cpu_devices(args.mesh)
  import numpy as np
  from astra_jax.data import images as data
  from astra_jax.diffusion import grid, metrics, sample
  from astra_jax.run import workdir
  from astra_jax.run.tasks import dit as task

  results = "results/dit_fashion_mnist.json" if args.publish else os.path.join(args.root,
                                                                              "results.json")
  markdown = "RESULTS.md" if args.publish else os.path.join(args.root, "RESULTS.md")
  grids = "results/dit" if args.publish else os.path.join(args.root, "grids")
  if args.testbed is not None:
    return testbed(args, results, markdown)
  try:
    cfg = workdir.load_config(args.workdir, "dit")
    judge = Judge(args.classifier, args.data_dir)
    settings = sample.Sampling(args.steps or cfg.sample_steps, cfg.guidance)
    test = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
  except ValueError as e:
    cli.fail(str(e))
  labels = np.repeat(np.arange(cfg.num_classes), args.per_class)
  order = np.random.default_rng(args.seed).permutation(len(test.labels))[:len(labels)]
  real = judge.features(test.images[order])
  kept = _kept(results, args.only)
  rows, reference, single_time = [], None, None
  for name, label, spec in ROWS:
    if name != "single_device" and args.only is not None and name not in args.only:
      continue
    mesh = 1 if spec is None else args.mesh
    run = finetuned(args, name) if name in FT_RUNS else args.workdir
    model_cfg, model = task.load_for_sampling(run, spec or "exact", mesh,
                                              data_dir=args.data_dir)
    images, traffic = task.generate(model, mesh, settings, labels, seed=args.seed)
    seconds = traffic.pop("sampling_s")
    images = task.crop(images, *test.images.shape[1:3])
    if reference is None:  # the single-device row comes first
      reference, single_time = images, task.seconds_per_image(model, settings)
    uint8 = _to_uint8(images)
    row = {"name": name, "label": label, "spec": spec or "exact", "mesh": mesh,
           "steps": settings.steps, "images": int(len(labels)),
           "psnr_db": _finite_mean(metrics.psnr(images, reference)),
           "ssim": float(np.mean(metrics.ssim(images, reference))),
           "class_accuracy": float(np.mean(judge.predict(uint8) == labels)),
           "frechet_vit": metrics.frechet_distance(judge.features(uint8), real),
           "sampling_s_per_image_host": round(seconds / len(labels), 4),  # batched
           "single_device_s_per_image": round(single_time, 4),
           **{k: v for k, v in traffic.items()},
           **keys_per_query(model, model_cfg, mesh, settings, labels, args.seed),
           **modelled_latency(traffic, model_cfg, mesh, settings, single_time)}
    grid.save_grid(images[::args.per_class // 2], os.path.join(grids, f"{name}.png"),
                   columns=2, row_labels=[data.class_name(cfg.dataset, c)
                                          for c in range(cfg.num_classes)])
    rows.append(row)
    print(json.dumps(row), flush=True)
    kept = [remodel(r, cfg.depth, settings, single_time) for r in kept
            if r["name"] not in {x["name"] for x in rows}]
    write(results, markdown, [*rows, *kept], args)
  print(f"wrote {results} and the table in {markdown}")


class Judge:
  """The ViT run that classifies samples and gives their features (one device)."""

  def __init__(self, run: str, data_dir: str | None):
    from astra_jax.run.tasks import vit as vit_task
    self.cfg, self.model_cfg, self.model = vit_task.restore_trained(run)
    self._prepare = lambda x: vit_task.prepare(x, self.cfg, self.model_cfg.patch)

  def _batches(self, images, fn):
    import jax.numpy as jnp
    import numpy as np
    positions = jnp.arange(self.model_cfg.num_patches)
    return np.concatenate([np.asarray(fn(self._prepare(images[i:i + 250]), positions))
                           for i in range(0, len(images), 250)])

  def predict(self, images):
    return self._batches(images, lambda x, p: self.model(x, p).argmax(-1))

  def features(self, images):
    return self._batches(images, lambda x, p: self.model.features(x, p)[:, 0]).astype("float64")


def _to_uint8(images):
  import numpy as np
  return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)


def _finite_mean(values) -> float | None:
  import numpy as np
  values = np.asarray(values)
  return None if np.isinf(values).all() else float(np.mean(values[np.isfinite(values)]))


def keys_per_query(model, model_cfg, mesh: int, settings, labels, seed: int) -> dict:
  """Attention keys one query attends per layer: token level, and with
  codebook-centric attention the own band + exact boundary tokens + the
  distinct key-code tuples of the other devices' visible tokens, counted on
  the model's own K/V at the middle time step of sampling (one device, the
  first 16 samples' noise mixed halfway with nothing: x_t at t = 0.5 of pure noise)."""
  import jax
  import numpy as np
  from astra_jax.core import attention, exchange as exchange_lib, quantizer as vq
  from astra_jax.run.tasks import dit as task
  total = model_cfg.num_patches
  band = total // mesh
  out = {"keys_per_query_token_level": total}
  ex = model_cfg.exchange
  if not (isinstance(ex, exchange_lib.VQExchange) and ex.code_attention):
    return out
  noise = task.sampling_noise(model_cfg, 16, seed)
  layers = attention.attention_layers(model)
  for layer in layers:
    layer.record_kv = True
  import jax.numpy as jnp
  model(jnp.asarray(noise), jnp.arange(total), jnp.full((16,), 0.5),
        jnp.asarray(labels[:16], jnp.int32))
  used = []
  boundary = ex.boundary_rows * ex.row_tokens
  for layer in layers:
    k = np.asarray(layer.recorded.get_value()[0]).reshape(16, total, -1)
    codes = np.asarray(vq.encode(jnp.asarray(k), layer.state.get_value().k.entries))
    for device in range(mesh):
      others = np.ones(total, bool)
      others[device * band:(device + 1) * band] = False
      if device > 0:
        others[max(0, device * band - boundary):device * band] = False
      if device < mesh - 1:
        others[(device + 1) * band:(device + 1) * band + boundary] = False
      for b in range(16):
        used.append(len({tuple(c) for c in codes[b, others]}))
    layer.record_kv = False
    del layer.recorded
  exact = band + boundary * 2 * (mesh - 1) / mesh  # edge devices have one neighbour
  out["keys_per_query_codes"] = round(exact + float(np.mean(used)), 1)
  out["code_tuples_used"] = round(float(np.mean(used)), 1)
  del jax
  return out


def modelled_latency(traffic: dict, model_cfg, mesh: int, settings, single_time,
                     rates=BANDWIDTHS_MBPS) -> dict:
  """Seconds per sampling run of one image at each of ``rates`` Mbit/s (module docstring)."""
  from astra_jax.netsim import latency
  layers = settings.steps * model_cfg.depth
  compute = single_time / mesh / layers
  collectives = traffic.get("collectives", {})
  batch_bytes = sum(row["operand_bytes"] for row in collectives.values())
  per_image = traffic["bytes_per_device"] / batch_bytes if batch_bytes else 0.0  # program: a batch
  transfers = [latency.Transfer(kind, 1, row["operand_bytes"] * per_image / layers)
               for kind, row in collectives.items()]
  messages = sum(row["count"] for row in collectives.values())
  overlap = compute if "distrifusion" in str(model_cfg.exchange.name) else 0.0
  out = {}
  for mbps in rates:
    network = latency.Network(latency.Trace.constant(mbps), message_latency_s=0.0)
    run = latency.prefill_latency(layers=layers, layer_compute_s=compute,
                                  layer_transfers=transfers, mesh_size=mesh, network=network,
                                  layer_overlap_s=overlap)
    per_message = latency.DEFAULT_MESSAGE_LATENCY_S * messages if mesh > 1 else 0.0
    out[f"modelled_s_{mbps:g}mbps"] = round(run.total_s + per_message, 4)
  return out


def finetuned(args, name: str) -> str:
  """The fine-tuned run of row ``name``, trained (or resumed) by train.dit."""
  folder, groups = FT_RUNS[name]
  run = os.path.join(args.root, folder)
  _run_json([sys.executable, "-m", "train.dit", f"--mesh={args.mesh}",
             f"--init-from={args.workdir}", f"--workdir={run}", "--config.exchange=vq",
             f"--config.vq.groups={groups}", f"--max-steps={args.finetune_steps}",
             f"--config.lr={args.finetune_lr}", "--config.warmup_steps=50",
             *([f"--data-dir={args.data_dir}"] if args.data_dir else [])])
  return run


TESTBED_ROWS = [("exact", "exact"), ("distrifusion", "distrifusion:warmup=2"),
                ("vq_g32", "vq:groups=32"), ("vq_g1", "vq:groups=1"),
                ("vq_g1_boundary", "vq:groups=1,boundary_rows=1")]


def testbed(args, results: str, markdown: str) -> None:
  """Measured seconds per one-image sampling run: one device pinned to one core,
  and 2 ranks (one core each) over links shaped to each rate; the latency model
  beside each (compute: the pinned device's time / 2)."""
  import tempfile
  from types import SimpleNamespace
  from astra_jax.core import exchange as exchange_lib
  from astra_jax.diffusion import sample
  from astra_jax.run import workdir
  try:
    cfg = workdir.load_config(args.workdir, "dit")
  except ValueError as e:
    cli.fail(str(e))
  steps = args.steps or cfg.sample_steps
  settings = sample.Sampling(steps, cfg.guidance)
  out = os.path.join(tempfile.mkdtemp(), "grid.png")
  common = ["--workdir", args.workdir, "--per-class", "1", "--batch-size", "1",
            "--steps", str(steps), "--out", out, *(["--data-dir", args.data_dir]
                                                   if args.data_dir else [])]
  one = _run_json(["taskset", "-c", "0", sys.executable, "-m", "infer.dit", "--mesh", "1",
                   "--exchange", "exact", *common])
  rows = [{"name": "single_device", "spec": "exact", "mesh": 1, "rate_mbit": None,
           "measured_s": one["sampling_s_per_image"]}]
  for rate in args.testbed:
    for name, spec in TESTBED_ROWS:
      got = _run_json([sys.executable, "-m", "infer.lab.testbed", "--procs", "2", "--rate",
                       f"{rate:g}", "--", "infer.dit", "--mesh", "2", "--exchange", spec,
                       *common])
      model_cfg = SimpleNamespace(depth=cfg.depth, exchange=exchange_lib.from_spec(spec))
      model = modelled_latency(got, model_cfg, 2, settings, one["sampling_s_per_image"],
                               rates=(rate,))
      rows.append({"name": name, "spec": spec, "mesh": 2, "rate_mbit": rate,
                   "measured_mbit": got.get("measured_mbit"),
                   "measured_s": got["sampling_s_per_image"],
                   "modelled_s": model[f"modelled_s_{rate:g}mbps"],
                   "bytes_received_per_device": got["bytes_received_per_device"],
                   "speedup_measured": round(one["sampling_s_per_image"]
                                             / got["sampling_s_per_image"], 2)})
      print(json.dumps(rows[-1]), flush=True)
  host = _host()
  data = json.load(open(results)) if os.path.exists(results) else {}
  data["testbed"] = {"command": args.command, "host": host, "steps": steps, "rows": rows}
  with open(results, "w") as f:
    json.dump(data, f, indent=2)
  markdown_lib.replace_block(markdown, "dit-testbed", testbed_table(rows, host, steps))
  print(f"wrote the testbed rows to {results} and {markdown}")


def _run_json(cmd: list[str]) -> dict:
  import subprocess
  print("$", " ".join(cmd), flush=True)
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _host() -> str:
  import platform
  try:
    with open("/proc/cpuinfo") as f:
      name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    name = platform.processor()
  return f"{name}, {os.cpu_count()} cores"


def testbed_table(rows: list[dict], host: str, steps: int) -> str:
  lines = [f"Host: {host}; one image per sampling run, {steps} steps; 2 ranks with one core "
           "each over tbf-shaped links vs one device pinned to one core.", "",
           "| exchange | link | measured s/image | model s/image | vs one device | "
           "bytes into a device |", "|---|---|---|---|---|---|"]
  for r in rows:
    if r["mesh"] == 1:
      lines.append(f"| one device | - | {r['measured_s']:.3f} | - | 1.00x | 0 |")
      continue
    lines.append(f"| `{r['spec']}` (P=2) | {r['rate_mbit']:g} Mbit/s | {r['measured_s']:.3f} | "
                 f"{r['modelled_s']:.3f} | {r['speedup_measured']:.2f}x | "
                 f"{r['bytes_received_per_device']:,} |")
  return "\n".join(lines)


def remodel(row: dict, depth: int, settings, single_time: float) -> dict:
  """A kept row's modelled times with this run's single-device time, so every
  row of the table shares one compute measurement."""
  from types import SimpleNamespace
  from astra_jax.core import exchange as exchange_lib
  model_cfg = SimpleNamespace(depth=depth, exchange=exchange_lib.from_spec(row["spec"]))
  return dict(row, single_device_s_per_image=round(single_time, 4),
              **modelled_latency(row, model_cfg, row["mesh"], settings, single_time))


def _kept(results: str, only) -> list[dict]:
  if only is None or not os.path.exists(results):
    return []
  with open(results) as f:
    return json.load(f)["rows"]


def table(rows: list[dict]) -> str:
  head = ("| row | exchange | bytes into a device per run | vs exact | PSNR (dB) | SSIM | "
          "class acc. | Fréchet (ViT) | keys/query | model 10 Mbit/s | model 100 Mbit/s |")
  lines = [head, "|" + "---|" * 11]
  exact = next((r["bytes_received_per_device"] for r in rows if r["name"] == "exact"), None)
  for r in rows:
    got = r["bytes_received_per_device"]
    fewer = ("-" if r["mesh"] == 1 else "(reference)" if r["name"] == "exact"
             else f"{exact / got:.1f}x fewer" if exact and got else "")
    psnr = "(reference)" if r["name"] == "single_device" else (
        "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}")
    keys = str(r["keys_per_query_token_level"])
    if "keys_per_query_codes" in r:
      keys = f"{r['keys_per_query_token_level']} -> {r['keys_per_query_codes']}"
    lines.append(
        f"| {r['label']} | `{r['spec']}` (P={r['mesh']}) | {got:,} | {fewer} | "
        f"{psnr} | {r['ssim']:.4f} | {100 * r['class_accuracy']:.1f}% | "
        f"{r['frechet_vit']:.2f} | {keys} | {r['modelled_s_10mbps']:.2f} s | "
        f"{r['modelled_s_100mbps']:.2f} s |")
  return "\n".join(lines)


def write(results: str, markdown: str, rows: list[dict], args) -> None:
  names = [r[0] for r in ROWS]
  rows = sorted(rows, key=lambda r: names.index(r["name"]))
  os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
  data = json.load(open(results)) if os.path.exists(results) else {}
  data.update(command=args.command, rows=rows)  # (the testbed's rows are kept)
  with open(results, "w") as f:
    json.dump(data, f, indent=2)
  markdown_lib.replace_block(markdown, "dit-results", table(rows))


if __name__ == "__main__":
  cli.entry(main)
