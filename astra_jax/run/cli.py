"""Plumbing shared by the command-line tools (imports no JAX at module load).

``ensure_cpu_devices`` must run before jax is imported: XLA's CPU backend fixes
its device count when it starts.  The CLIs call it from their ``--mesh`` flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors: ``error: argument --mesh: ...`` and exit 2,
  without the usage block (``--help`` still prints it).

  An ``--out`` flag is checked as soon as the flags are parsed, so a path that
  cannot be written fails in seconds, not after the work: a file path, or
  with ``out="folder"`` a folder (``out=None``: not checked).
  """

  def __init__(self, *args, out: str | None = "file", **kwargs):
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and "prog" not in kwargs:  # `python -m infer.gpt2`, not gpt2.py
      kwargs["prog"] = f"python -m {spec.name}"
    super().__init__(*args, **kwargs)
    self.out_kind = out

  def parse_known_args(self, args=None, namespace=None):
    parsed, rest = super().parse_known_args(args, namespace)
    out = getattr(parsed, "out", None)
    if out and self.out_kind:
      try:
        check_writable(out, "--out", directory=self.out_kind == "folder")
      except ValueError as e:
        fail(str(e))
    return parsed, rest

  def error(self, message: str) -> None:  # argparse's hook for every bad flag
    fail(f"{message} (see {self.prog} --help)")


def at_least(minimum: int):
  """argparse type: an integer >= ``minimum``, else a message naming the bound."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value
  parse.__name__ = f"integer >= {minimum}"
  return parse


def number(low: float = 0.0, high: float | None = None, *, open_low: bool = False,
           open_high: bool = True):
  """argparse type: a finite float in [low, high) (``open_low``: (low, ...))."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    below = value <= low if open_low else value < low
    above = high is not None and (value >= high if open_high else value > high)
    if value != value or below or above or value in (float("inf"), float("-inf")):
      lo, hi = "(" if open_low else "[", ")" if open_high or high is None else "]"
      raise argparse.ArgumentTypeError(
          f"must be in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}, got {text}")
    return value
  parse.__name__ = "number"
  return parse


positive = number(0.0, open_low=True)  # seconds, Mbit/s, learning rates
nonnegative = number(0.0)  # temperatures, latencies
fraction = number(0.0, 1.0)  # loss rates: 0 <= r < 1


def ensure_cpu_devices(n: int) -> None:
  """Asks XLA:CPU for at least ``n`` fake devices (a no-op once jax is imported)."""
  if "jax" in sys.modules:
    return
  have = int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1)
  os.environ["JAX_NUM_CPU_DEVICES"] = str(max(have, n))


def setup_devices(args: argparse.Namespace) -> None:
  """Before jax starts: this process's devices for ``--mesh``, joining the
  ``jax.distributed`` process group when the multi-process flags ask for it."""
  from astra_jax.parallel import distributed
  if not distributed.requested(args):
    ensure_cpu_devices(args.mesh)
    return
  try:
    distributed.initialize(args, args.mesh)
  except ValueError as e:
    fail(str(e))


def train_args(argv, *, description: str, config: str, workdir: str, extra=None):
  """The train CLIs' flags (``extra(parser)`` adds more); returns (args, overrides).

  The overrides are the remaining ``--config.KEY=VALUE`` arguments; with
  ``--show-config`` the CLI prints the config (``show_config``) instead of training.
  """
  p = Parser(description=description)
  if extra:
    extra(p)
  g = p.add_argument_group(
      "config", "--config.KEY=VALUE overrides one key of the config, typed by the value it "
      "replaces, e.g. --config.batch_size=64 --config.vq.groups=16 (a str key also takes "
      "none); --show-config lists every key with its value and type")
  g.add_argument("--config", default=config, metavar="NAME",
                 help=f"a module in configs/ with get_config() (default {config})")
  g.add_argument("--show-config", action="store_true",
                 help="print every key of the config as KEY: TYPE = VALUE, after the "
                      "--config.KEY=VALUE overrides, and exit without training")
  p.add_argument("--mesh", type=at_least(1), default=4, help="devices on the seq axis")
  p.add_argument("--workdir", default=workdir,
                 help="the run folder: config.json, checkpoints/, metrics.jsonl; rerunning "
                      "resumes; one trainer at a time (a second one is refused)")
  p.add_argument("--init-from", default=None,
                 help="weights to start from: a run folder, or (LMs) a pretrained model "
                      "gguf:PATH | hf:DIR | smollm2 (--config then defaults to pretrained_lm)")
  p.add_argument("--max-steps", type=at_least(0), default=None,
                 help="stop after this many steps (0 with --init-from: only the start, "
                      "e.g. k-means codebooks)")
  from astra_jax.parallel import distributed
  distributed.add_flags(p)
  return p.parse_known_args(argv)


def show_config(name: str, overrides) -> None:
  """``--show-config``: prints config ``name`` with ``overrides`` applied, one
  ``KEY: TYPE = VALUE`` line per key, and exits 0 (a bad override: exit 2).
  Nothing else runs: no devices, data or workdir."""
  from astra_jax.run import config
  try:
    cfg = config.load(name, overrides)
  except ValueError as e:
    fail(str(e))
  print(f"# {name if '.' in name else f'configs.{name}'}, overrides applied; set a key "
        "with --config.KEY=VALUE")
  print("\n".join(config.listing(cfg)))
  raise SystemExit(0)


def check_writable(path: str, flag: str, *, directory: bool) -> None:
  """Raises ValueError (one line naming ``flag``) unless ``path`` can be written.

  ``path`` is an existing folder (``directory``) or file we may write in or
  to, or a new one under a writable folder.  Called before the work starts,
  so a bad --out/--workdir fails in seconds, not after an evaluation.  Leaves
  nothing on disk (it probes with a temporary file that is removed at once).
  """
  import tempfile
  path = os.path.abspath(path)
  kind = "folder" if directory else "file"
  if os.path.exists(path) and os.path.isdir(path) != directory:
    raise ValueError(f"{flag} {path} is a {'file' if directory else 'folder'}; pass a {kind} path")
  parent = path if directory and os.path.isdir(path) else os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag} {path} cannot be created: {parent} is a file; pass a {kind} "
                     "path under a folder")
  try:
    if not directory and os.path.exists(path) and not os.access(path, os.W_OK):
      raise PermissionError(13, os.strerror(13))
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise ValueError(f"{flag} {path} is not writable ({e.strerror} in {parent}); pass a "
                     f"writable {kind} path") from None


def add_exchange_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("exchange (how K/V cross devices)")
  g.add_argument("--exchange", default="exact",
                 help="strategy: exact | vq | ring, or a spec, e.g. vq:groups=32,overlap=true")
  g.add_argument("--groups", type=at_least(1), default=32, help="vq: groups G per K/V vector")
  g.add_argument("--codebook-size", type=at_least(2), default=1024,
                 help="vq: entries K per codebook")


def add_link_flags(parser: argparse.ArgumentParser) -> None:
  """The flags every evaluation CLI shares: simulated link loss, tensor-parallel
  baselines and multi-process."""
  from astra_jax.parallel import distributed
  add_tp_flag(parser)
  parser.add_argument("--drop-rate", type=fraction, default=0.0,
                      help="simulated link loss: fraction of non-local tokens' K/V (codes) "
                           "lost per exchange, masked out of attention")
  distributed.add_flags(parser)


def add_tp_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tp", default=None, metavar="SYNC",
                      help="tensor-parallel baseline instead of sequence parallelism: the "
                           "weights split over --mesh devices, all-reduces done as SYNC: tp "
                           "(exact), spd:drop=1+3 (Sync-Point Drop), flash:bits=4,group_size=128 "
                           "(Flash Communication)")


def sync_from_flags(args: argparse.Namespace):
  """The ``--tp`` strategy, or None for sequence parallelism; ValueError on bad combos."""
  if args.tp is None:
    return None
  from astra_jax.core import sync
  if getattr(args, "exchange", None) not in (None, "exact"):
    raise ValueError(f"--tp runs tensor parallelism, which exchanges no K/V; drop "
                     f"--exchange {args.exchange}")
  if getattr(args, "drop_rate", 0.0):
    raise ValueError("--drop-rate simulates lost K/V of sequence parallelism; it does not "
                     "apply to --tp")
  return sync.from_spec(args.tp)


def exchange_from_flags(args: argparse.Namespace):
  """The exchange of ``--exchange`` (a name or a spec such as
  ``vq:groups=32,overlap=true``); vq options the spec leaves out come from
  ``--groups`` / ``--codebook-size``.  ValueError naming the fix."""
  from astra_jax.core import exchange, specs
  name, options = specs.parse_spec(args.exchange, example=exchange.STRATEGIES.example)
  if name == "vq" or (name == "stream" and options.get("quantize", True) not in (False, "false")):
    options = {"groups": args.groups, "codebook_size": args.codebook_size, **options}
  return exchange.make_exchange(name, **options)


def print_result(result: dict[str, Any], out: str | None = None, *,
                 writer: bool | None = None) -> None:
  """Prints ``result`` as the last line (one JSON object) and writes it to ``out``
  (in multi-process runs, only where ``writer`` is true; by default process 0).

  The line is printed first, so a failed write (disk full) loses nothing: it
  ends the command with a one-line error and exit status 1.
  """
  line = json.dumps(result, sort_keys=True)
  # one write, newline included: with unbuffered output (PYTHONUNBUFFERED) print()
  # writes the text and the newline apart, and a C++ log line (gloo) on the same
  # pipe could land between them
  sys.stdout.write(line + "\n")
  sys.stdout.flush()
  if out and (_main_process() if writer is None else writer):
    path = os.path.abspath(out)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(tmp, "w") as f:
        f.write(line + "\n")
      os.replace(tmp, path)  # never a half-written file at --out
    except OSError as e:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      fail(f"could not write --out {path} ({e.strerror or e}); the result is the JSON line "
           "printed above", code=1)


def _main_process() -> bool:
  if "jax" not in sys.modules:
    return True
  import jax
  return jax.process_index() == 0


def entry(main) -> None:
  """Runs a CLI's ``main()``: Ctrl-C outside training (which handles it itself,
  saving a checkpoint) ends with one line and exit status 130, not a traceback."""
  try:
    main()
  except KeyboardInterrupt:
    fail("interrupted (Ctrl-C); nothing more was written", code=130)


def fail(message: str, code: int = 2) -> None:
  """Exits with a one-line error naming the fix (no traceback)."""
  print(f"error: {message}", file=sys.stderr)
  if "jax" in sys.modules:
    import jax
    if jax.process_count() > 1:  # skip the shutdown barrier the other ranks never reach
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  raise SystemExit(code)
