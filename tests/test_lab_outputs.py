"""Measurement commands leave the repo's own results alone unless told.

Every lab tool (``infer.lab.*``) and the results command run here with their
default output paths, in a clean copy of the checkout (its files committed to
a fresh git repo), on the cheapest flags that still do the real work; then
``git status`` must show no tracked file changed, and the outputs must be
under ``workdir/`` (ignored).  The committed files in ``results/`` are
rewritten only by the commands written beside them in RESULTS.md and
BENCHMARKS.md, which name their folder (``--out results/...``, ``--publish``).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from infer import results
from infer.lab import testbed

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (module, args): the work shrunk to seconds; the output paths left at their defaults
COMMANDS = [
    ("infer.lab.bench", ["--tiny"]),
    ("infer.lab.profile_host", ["--matmul-size=128", "--buffer-mib=4", "--repeats=1"]),
    ("infer.lab.model_check", []),  # joins the committed testbed files
    ("infer.lab.layer_time", ["--model=gpt2-micro", "--mesh=2", "--exchanges", "vq:groups=1",
                              "--bandwidths", "10", "--repeats=1"]),
    ("infer.lab.code_search", ["--rows", "64/32/4/64", "--repeats=1"]),
    ("infer.lab.prefill_time", ["--model=gpt2:nano", "--tokens=64", "--mesh=2", "--repeats=1"]),
    ("infer.lab.collective_time", ["--kind=all-gather", "--bytes=1024", "--count=2", "--mesh=2",
                                   "--repeats=1"]),
    ("infer.traffic", ["--mesh=2", "--exchange=vq", "--groups=4", "--dim=64", "--heads=4", "--seq-len=32"]),
]


def _git(cwd, *args):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                        capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  """The checkout's files (tracked, and new ones git does not ignore), committed afresh."""
  copy = tmp_path_factory.mktemp("checkout")
  names = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
  for name in filter(None, names.split("\0")):
    src = ROOT / name
    if src.is_file():
      (copy / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, copy / name)
  _git(copy, "init", "-q")
  _git(copy, "add", "-A")
  _git(copy, "commit", "-q", "-m", "clean")
  return copy


def test_measurement_commands_change_no_tracked_file(checkout):
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(checkout))
  for module, args in COMMANDS:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (module, proc.stderr[-3000:])
    changed = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    assert changed == "", f"python -m {module} {' '.join(args)} changed tracked files:\n{changed}"
  written = {p.relative_to(checkout / "workdir" / "lab").as_posix()
             for p in (checkout / "workdir" / "lab").rglob("*") if p.is_file()}
  assert {"bench/bench.json", "host_profile.json", "model_check.json",
          "llama8b_layer.json"} <= written, written
  assert _git(checkout, "status", "--porcelain") == ""  # and nothing outside ignored folders


def test_defaults_of_commands_not_run_above():
  args = results.parse(["vit"])  # the results command writes its own folder...
  assert (args.results, args.markdown) == ("workdir/vit_results/results.json",
                                           "workdir/vit_results/RESULTS.md")
  args = results.parse(["vit", "--publish"])  # ...and the repo's files only when asked
  assert (args.results, args.markdown) == ("results/vit_fashion_mnist.json", "RESULTS.md")
  assert testbed.parse(["--", "infer.lab.prefill_time"]).out is None  # root only: prints
