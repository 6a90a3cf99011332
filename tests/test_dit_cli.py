"""train.dit and infer.dit as a user runs them (subprocesses), on a tiny DiT.

One tiny run is trained once for the module (``train.dit --mesh=4``: an 8x8
image with patch 2 is a 4x4 grid of patches, bands of 4/2/1 rows at mesh
1/2/4; 4 steps of 16 images of ``write_idx_dataset``'s 8x8 Fashion-MNIST
layout); the sampling commands read it:

- the exact exchange at mesh 4 and mesh 1: a labelled PNG grid of 10 rows x
  2 columns, the bytes read from the compiled program equal to the formula
  (> 0 at mesh 4, 0 at mesh 1), and the same pixels at both meshes
  (test_exact_sampling_writes_a_grid_and_its_bytes_match_the_formula)
- vq codebooks fitted zero-shot on the exact run (k-means), at mesh 2, plain
  and with boundary rows + codebook-centric attention
  (test_zero_shot_vq_sampling_matches_the_formula)
- bad input: exit status 2 and exactly one stderr line starting ``error: ``
  naming the fix, nothing written (test_bad_sampling_input_is_one_line,
  test_train_with_a_mesh_that_does_not_divide_the_bands_writes_nothing)
- ``train.dit --show-config`` (test_show_config_lists_the_sampling_keys)
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, last_json, run, write_idx_dataset, write_vit_run

TINY = ["--config.image_size=8", "--config.patch=2", "--config.width=32", "--config.depth=2",
        "--config.heads=2", "--config.batch_size=16", "--config.log_every=1",
        "--config.warmup_steps=2", "--config.sample_steps=3", "--config.checkpoint_every=2"]
STEPS = 4
PER_CLASS = 2
VQ = "vq:groups=4,codebook_size=16"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_idx_dataset(tmp_path_factory.mktemp("dit_idx"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """(run folder, result) of ``train.dit --mesh=4`` on the tiny config."""
  workdir = tmp_path_factory.mktemp("dit") / "run"
  proc = run("train.dit", "--mesh=4", f"--workdir={workdir}", f"--data-dir={data_dir}", *TINY,
             f"--max-steps={STEPS}")
  return workdir, last_json(proc)


@pytest.fixture(scope="module")
def sample(trained, data_dir, tmp_path_factory):
  """sample(mesh, exchange) -> (result, PNG path) of infer.dit, each run once."""
  workdir, _ = trained
  out_dir = tmp_path_factory.mktemp("dit_samples")
  done = {}

  def sample(mesh, exchange):
    if (mesh, exchange) not in done:
      out = out_dir / f"mesh{mesh}_{len(done)}.png"
      proc = run("infer.dit", "--workdir", str(workdir), "--mesh", str(mesh), "--exchange",
                 exchange, "--out", str(out), "--per-class", str(PER_CLASS),
                 "--data-dir", str(data_dir))
      done[mesh, exchange] = last_json(proc), out
    return done[mesh, exchange]
  return sample


def _grid(path):
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB")).astype(np.int16)


def test_train_prints_a_finite_loss_and_writes_the_run(trained):
  workdir, result = trained
  assert result["steps"] == STEPS and result["mesh"] == 4 and result["exchange"] == "exact"
  assert math.isfinite(result["loss"]) and result["loss"] > 0
  config = json.loads((workdir / "config.json").read_text())
  assert config["sample_steps"] == 3 and config["image_size"] == 8 and config["patch"] == 2
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]
  losses = [r["loss"] for r in rows if r.get("loss") is not None]
  assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
  assert losses[-1] == result["loss"]


def test_exact_sampling_writes_a_grid_and_its_bytes_match_the_formula(sample):
  four, four_png = sample(4, "exact")
  assert four["exchange"] == "exact" and four["images"] == 10 * PER_CLASS
  assert four["steps"] == 3 and four["mesh"] == 4
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] > 0
  grid = _grid(four_png)
  # 10 class rows of 8x8 images upscaled x2 with 2-px gaps; 2 columns plus a label margin
  cell = 8 * 2
  assert grid.shape[0] == 10 * cell + 9 * 2
  assert PER_CLASS * cell + 2 < grid.shape[1] < PER_CLASS * cell + 2 + 200
  cells = grid[:, -(PER_CLASS * cell + 2):]
  assert cells.std() > 1  # images, not a blank canvas
  # (mesh 4 = mesh 1 images: tests/test_dit.py, in one process)


def test_zero_shot_vq_sampling_matches_the_formula(sample):
  """An exact-trained run sampled with vq (k-means codebooks from its own K/V),
  boundary rows and codebook-centric attention, through the CLI."""
  spec = f"{VQ},boundary_rows=1,code_attention=true"
  hybrid, hybrid_png = sample(2, spec)
  assert hybrid["exchange"] == "vq" and hybrid["spec"] == spec and hybrid["mesh"] == 2
  assert hybrid["bytes_per_device"] == hybrid["bytes_per_device_formula"] > 0
  exact_four, exact_png = sample(4, "exact")
  assert _grid(hybrid_png).shape == _grid(exact_png).shape


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
  """A ViT run folder (what infer.dit must refuse)."""
  return write_vit_run(tmp_path_factory.mktemp("vit"))


BAD_SAMPLING = {
    "mesh_not_dividing_the_bands": (["--mesh", "3"], "use --mesh in [1, 2, 4]"),
    "boundary_rows_wider_than_a_band": (
        ["--mesh", "4", "--exchange", f"{VQ},boundary_rows=2"], "use boundary_rows <= 1"),
    "code_attention_without_codebooks": (
        ["--mesh", "2", "--exchange", "exact:code_attention=true"],
        "use --exchange vq:groups=G,code_attention=true"),
    "negative_guidance": (["--mesh", "1", "--guidance", "-1"], ">= 0"),
    "zero_steps": (["--mesh", "1", "--steps", "0"], "pass --steps 1 or more"),
    "out_not_png": (["--mesh", "1", "--out", "{tmp}/grid.jpg"], "name the grid FILE.png"),
    "vit_run": (["--mesh", "1", "--workdir", "{vit}"], "infer.vit"),
}


@pytest.fixture(scope="module")
def bad_runs(trained, data_dir, vit_run, tmp_path_factory):
  """case -> (process, folder it may write to) for every bad command, two at a time
  (each is mostly Python start-up, so two share the 2 cores well)."""
  commands = {}
  for case, (args, _) in BAD_SAMPLING.items():
    folder = tmp_path_factory.mktemp(case)
    args = [a.format(tmp=folder, vit=vit_run) for a in args]
    out = [] if "--out" in args else ["--out", str(folder / "grid.png")]
    workdir = [] if "--workdir" in args else ["--workdir", str(trained[0])]
    commands[case] = folder, ["infer.dit", *workdir, *out, "--per-class", "1",
                              "--data-dir", str(data_dir), *args]
  folder = tmp_path_factory.mktemp("train_mesh3")
  commands["train_mesh3"] = folder, ["train.dit", "--mesh=3", f"--workdir={folder / 'run'}",
                                     f"--data-dir={data_dir}", *TINY, f"--max-steps={STEPS}"]
  with ThreadPoolExecutor(2) as pool:
    procs = {case: pool.submit(run, *argv) for case, (_, argv) in commands.items()}
    return {case: (procs[case].result(), commands[case][0]) for case in commands}


@pytest.mark.parametrize("case", BAD_SAMPLING)
def test_bad_sampling_input_is_one_line(case, bad_runs):
  proc, folder = bad_runs[case]
  line = assert_one_line_error(proc, 2, BAD_SAMPLING[case][1])
  if case == "negative_guidance":
    assert "guidance" in line
  assert list(folder.iterdir()) == []  # no grid, not even a temporary file


def test_train_with_a_mesh_that_does_not_divide_the_bands_writes_nothing(bad_runs):
  proc, folder = bad_runs["train_mesh3"]
  assert_one_line_error(proc, 2, "use --mesh in [1, 2, 4]")
  assert list(folder.iterdir()) == []  # no run folder, no lock, no config.json


def test_show_config_lists_the_sampling_keys():
  proc = run("train.dit", "--show-config", "--config.sample_steps=7")
  assert proc.returncode == 0, proc.stderr[-3000:]
  keys = {line.split(":")[0] for line in proc.stdout.splitlines() if not line.startswith("#")}
  assert {"sample_steps", "guidance", "class_dropout", "patch", "exchange"} <= keys
  assert "sample_steps: int = 7" in proc.stdout
