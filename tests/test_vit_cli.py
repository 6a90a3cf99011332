"""End-to-end ViT CLIs on a tiny synthetic IDX dataset (8x8 images padded to 16x16)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import (assert_clean_errors, assert_one_line_error, last_json, run,
                         stderr_lines)

from test_data_images import idx_bytes

TINY = ["--config.variant=mu/4", "--config.image_size=16", "--config.batch_size=8", "--config.log_every=1",
        "--config.warmup_steps=2", "--config.eval_batch_size=16", "--config.lr=3e-3",
        "--config.augment=false"]


def _write_dataset(folder: Path, n_train=64, n_test=32):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
    images[np.arange(n), labels % 8, :] = 250  # the label is a bright row: learnable
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
  return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _write_dataset(tmp_path_factory.mktemp("tiny_idx"))


@pytest.fixture(scope="module")
def exact_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("exact")
  result = last_json(run("train.vit", "--mesh=2", f"--workdir={workdir}",
                         f"--data-dir={data_dir}", "--config.epochs=3",
                         "--config.checkpoint_every=8", *TINY))
  return workdir, result


def test_train_writes_metrics_and_checkpoints(exact_run):
  workdir, result = exact_run
  assert result["mesh"] == 2 and result["exchange"] == "exact" and result["examples"] == 32
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4])
  assert rows[-1]["test_accuracy"] == result["accuracy"]
  assert (workdir / "config.json").exists()
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "24"


def test_exact_eval_same_at_mesh_1_and_4(exact_run, data_dir, tmp_path):
  workdir, train_result = exact_run
  one = last_json(run("infer.vit", f"--workdir={workdir}", "--mesh=1", f"--data-dir={data_dir}"))
  out = tmp_path / "four.json"
  four = last_json(run("infer.vit", f"--workdir={workdir}", "--mesh=4",
                       f"--data-dir={data_dir}", f"--out={out}"))
  assert one["accuracy"] == four["accuracy"] == train_result["accuracy"]
  assert one["bytes_per_device"] == 0
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] > 0
  assert json.loads(out.read_text()) == four
  for key in ("accuracy", "exchange", "mesh", "groups", "codebook_size", "bits_per_token",
              "bytes_per_device", "examples"):
    assert key in four


def test_vq_finetune_from_exact_run(exact_run, data_dir, tmp_path):
  workdir, _ = exact_run
  vq_dir = tmp_path / "vq"
  proc = run("train.vit", "--mesh=4", f"--workdir={vq_dir}", f"--data-dir={data_dir}",
             f"--init-from={workdir}", "--config.exchange=vq", "--config.vq.groups=4",
             "--config.vq.codebook_size=16", "--config.epochs=1", *TINY)
  result = last_json(proc)
  assert "k-means" in proc.stdout
  assert result["exchange"] == "vq" and result["bits_per_token"] == 16
  evald = last_json(run("infer.vit", f"--workdir={vq_dir}", "--mesh=4", f"--data-dir={data_dir}"))
  assert evald["accuracy"] == result["accuracy"]
  assert evald["bytes_per_device"] == evald["bytes_per_device_formula"]
  exact_eval = last_json(run("infer.vit", f"--workdir={vq_dir}", "--mesh=4",
                             "--exchange=exact", f"--data-dir={data_dir}"))
  assert exact_eval["bytes_per_device"] > 10 * evald["bytes_per_device"]


LONG = ["--mesh=2", "--config.epochs=10", "--config.checkpoint_every=4", *TINY]  # 80 steps


def _rows(workdir):
  """metrics.jsonl, every line strict JSON (a bare NaN fails)."""
  def no_nan(name):
    raise AssertionError(f"non-finite {name} in metrics.jsonl")
  return [json.loads(line, parse_constant=no_nan)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _values(rows):
  """Each row without its wall-clock fields: equal for equal training."""
  return [{k: v for k, v in r.items() if k not in ("time", "items_per_s")} for r in rows]


@pytest.fixture(scope="module")
def long_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("long")
  result = last_json(run("train.vit", f"--workdir={workdir}", f"--data-dir={data_dir}", *LONG))
  return workdir, result


def _interrupt(cmd, logs, ready, what, sig):
  """Runs ``cmd`` until ``ready()``, sends ``sig``; returns (exit status, stdout, stderr).

  Output goes to files: a pipe nobody reads would fill with progress bars and
  stall the run.
  """
  with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    while not ready():
      assert proc.poll() is None, f"the run ended before {what}: {Path(f'{logs}.err').read_text()}"
      assert time.time() < deadline, f"no {what} within 300 s"
      time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
  return code, Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _saved_steps(workdir):
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_interrupts_and_kill_then_rerun_match_an_uninterrupted_run(long_run, data_dir, tmp_path):
  """SIGINT, then SIGTERM, then kill -9 mid-training, each followed by the same
  command: the run ends exactly where an uninterrupted one does, every step
  logged once."""
  reference, expected = long_run
  workdir = tmp_path / "interrupted"
  cmd = [sys.executable, "-m", "train.vit", f"--workdir={workdir}", f"--data-dir={data_dir}",
         *LONG]
  stopped_at = 0
  for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    status, out, err = _interrupt(cmd, tmp_path / sig.name, lambda: _logged_steps(workdir)
                                  >= stopped_at + 5, "5 more logged steps", sig)
    lines = stderr_lines(err)
    assert status == code and len(lines) == 1, (status, err[-3000:])
    prefix = f"error: stopped by {sig.name} after step "
    assert lines[0].startswith(prefix) and "rerun the same command to resume" in lines[0]
    step = int(lines[0][len(prefix):].split(":")[0])
    assert stopped_at < step < 80 and _saved_steps(workdir)[-1] == step
    assert [r["step"] for r in _rows(workdir)] == list(range(1, step + 1))
    if stopped_at:
      assert f"resuming from step {stopped_at} in" in out
    stopped_at = step
  status, _, _ = _interrupt(cmd, tmp_path / "KILL", lambda: _saved_steps(workdir)[-1]
                            >= stopped_at + 4, "a new checkpoint", signal.SIGKILL)
  assert status == -signal.SIGKILL
  killed_at = _saved_steps(workdir)[-1]
  again = run(*cmd[2:])
  assert f"resuming from step {killed_at} in" in again.stdout
  assert last_json(again)["accuracy"] == expected["accuracy"]
  assert stderr_lines(again) == []
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 81)) + [80]  # the last one: test accuracy
  assert _values(rows) == _values(_rows(reference))
  assert not list((workdir / "checkpoints").glob("*tmp*"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  workdir = tmp_path / "nan"
  proc = run("train.vit", "--mesh=2", f"--workdir={workdir}", f"--data-dir={data_dir}",
             "--config.epochs=3", "--config.checkpoint_every=2", *TINY, "--config.lr=1e30")
  line = assert_one_line_error(proc, 1, "training stopped without saving that state")
  found = re.search(r"error: loss is nan\b.*? at step (\d+): .*last good checkpoint, "
                    r"step (\d+), is kept in .*lower --config.lr", line)
  bad_step, kept = int(found.group(1)), int(found.group(2))
  assert kept < bad_step and _saved_steps(workdir)[-1] == kept
  assert [r["step"] for r in _rows(workdir)] == list(range(1, bad_step))
  evald = last_json(run("infer.vit", f"--workdir={workdir}", "--mesh=1", f"--data-dir={data_dir}"))
  assert 0.0 <= evald["accuracy"] <= 1.0


def test_full_disk_names_the_step_and_leaves_no_temporary_folder(data_dir, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                          str(disk)], capture_output=True).returncode:
    pytest.skip("needs root and tmpfs to make a small disk (tests/test_checkpoint.py "
                "simulates ENOSPC without them)")
  try:
    proc = run("train.vit", "--mesh=1", f"--workdir={disk}/run", f"--data-dir={data_dir}",
               "--config.epochs=10", "--config.checkpoint_every=4", *TINY)
    line = assert_one_line_error(proc, 2, "failed (No space left on device")
    step = int(re.search(r"saving step (\d+) to ", line).group(1))
    assert f"{disk}/run/checkpoints" in line and "free space there" in line
    assert step not in _saved_steps(disk / "run") and _saved_steps(disk / "run")
    assert not list((disk / "run" / "checkpoints").glob("*tmp*"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_bad_input_gives_clear_errors(exact_run, data_dir, tmp_path):
  workdir, _ = exact_run
  cases = [
      (["train.vit", "--mesh=3", f"--data-dir={data_dir}", f"--workdir={tmp_path}/a", *TINY],
       "not divisible by the mesh size 3"),
      (["train.vit", "--mesh=1", f"--data-dir={tmp_path}/none", f"--workdir={tmp_path}/b"],
       "dataset-fashion-mnist"),
      (["train.vit", "--mesh=1", "--config.epoch=3", f"--workdir={tmp_path}/c"],
       "unknown config key 'epoch'"),
      (["infer.vit", f"--workdir={tmp_path}/nothing", "--mesh=1"], "not a training run"),
      (["infer.vit", f"--workdir={workdir}", "--mesh=2", "--exchange=vq",
        f"--data-dir={data_dir}"], "has no codebooks; fine-tune"),
  ]
  assert_clean_errors(cases)


def _flip_half(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 4, len(data) * 3 // 4):
    data[i] ^= 0x5A
  path.write_bytes(data)


def _truncate_half(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _damage(step_dir, damage):
  files = [f for f in step_dir.glob("default/**/d/*") if f.is_file()]
  assert files
  for f in files:
    damage(f)


def test_corrupt_latest_checkpoint_falls_back_to_the_older_step(exact_run, data_dir, tmp_path):
  workdir, trained = exact_run
  evaluate = lambda run_dir, *flags: run("infer.vit", f"--workdir={run_dir}", "--mesh=1",
                                         f"--data-dir={data_dir}", *flags)
  older = last_json(evaluate(workdir, "--step=16"))
  for name, damage in (("garbled", _flip_half), ("truncated", _truncate_half)):
    broken = tmp_path / name
    shutil.copytree(workdir, broken)
    _damage(broken / "checkpoints" / "24", damage)
    proc = evaluate(broken)
    assert last_json(proc)["accuracy"] == older["accuracy"]
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: checkpoint {broken}/checkpoints/24 is corrupt ("), lines
    assert lines[0].endswith("left in place, using step 16 instead") and "<" not in lines[0]
    assert (broken / "checkpoints" / "24").is_dir()
  # the training command moves the corrupt step aside and trains it again
  again = run("train.vit", "--mesh=2", f"--workdir={broken}", f"--data-dir={data_dir}",
              "--config.epochs=3", "--config.checkpoint_every=8", *TINY)
  assert last_json(again)["accuracy"] == trained["accuracy"]
  assert "resuming from step 16 in" in again.stdout
  lines = stderr_lines(again)
  assert len(lines) == 1 and lines[0].endswith(
      f"moved it to {broken}/checkpoints/24.corrupt, using step 16 instead"), lines
  assert _saved_steps(broken) == [16, 24] and (broken / "checkpoints" / "24.corrupt").is_dir()
  # no good step left: one line naming the fix
  _damage(broken / "checkpoints" / "16", _truncate_half)
  _damage(broken / "checkpoints" / "24", _truncate_half)
  line = assert_one_line_error(evaluate(broken), 2, f"no good checkpoint left: checkpoint "
                               f"{broken}/checkpoints/24 is corrupt")
  assert line.endswith(f"(and 1 older steps, also corrupt); delete {broken}/checkpoints and "
                       "train again")


def test_bad_config_values_fail_before_anything_is_written(data_dir, tmp_path):
  cases = [("--config.batch_size=0", "--config.batch_size=0 is out of range; pass "
                                     "--config.batch_size as an integer >= 1"),
           ("--config.batch_size=1000", "more than the 64 training images"),
           ("--config.epochs=0", "--config.epochs=0 is out of range"),
           ("--config.checkpoint_every=0", "--config.checkpoint_every=0 is out of range"),
           ("--config.lr=0", "--config.lr=0.0 is out of range; pass --config.lr as a number > 0"),
           ("--config.warmup_steps=-1", "--config.warmup_steps=-1 is out of range")]
  for flag, message in cases:
    workdir = tmp_path / "run"
    proc = run("train.vit", "--mesh=1", f"--workdir={workdir}", f"--data-dir={data_dir}", *TINY,
               flag)
    assert_one_line_error(proc, 2, message)
    assert not workdir.exists(), flag


def test_unwritable_out_and_workdir_fail_before_the_work(exact_run, data_dir, tmp_path):
  workdir, _ = exact_run
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = run("infer.vit", f"--workdir={workdir}", "--mesh=1", f"--data-dir={data_dir}",
             f"--out={a_file}/result.json")
  assert_one_line_error(proc, 2, f"--out {a_file}/result.json cannot be created: {a_file} is "
                        "a file")
  assert proc.stdout == ""  # nothing evaluated
  proc = run("train.vit", "--mesh=1", f"--workdir={a_file}/run", f"--data-dir={data_dir}", *TINY)
  assert_one_line_error(proc, 2, f"--workdir {a_file}/run cannot be created")
  if os.geteuid() != 0:  # root writes through permissions
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = run("infer.vit", f"--workdir={workdir}", "--mesh=1", f"--data-dir={data_dir}",
               f"--out={locked}/result.json")
    assert_one_line_error(proc, 2, "is not writable (Permission denied")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["a_file"] + (["locked"] if os.geteuid() != 0 else []))


def test_result_is_printed_even_when_writing_out_fails(tmp_path, capsys, monkeypatch):
  from astra_jax.run import cli

  def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "replace", disk_full)
  with pytest.raises(SystemExit) as exit_:
    cli.print_result({"accuracy": 0.5}, str(tmp_path / "r.json"))
  captured = capsys.readouterr()
  assert exit_.value.code == 1 and json.loads(captured.out) == {"accuracy": 0.5}
  assert captured.err == (f"error: could not write --out {tmp_path}/r.json (No space left on "
                          "device); the result is the JSON line printed above\n")
  assert list(tmp_path.iterdir()) == []  # no half-written or temporary file


def test_results_command_writes_table(data_dir, tmp_path):
  md = tmp_path / "RESULTS.md"
  md.write_text("# Results\n\nintro kept\n")
  out = tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "-m", "infer.results", "vit", f"--root={tmp_path}/runs", "--mesh=2",
       f"--data-dir={data_dir}", "--only", "vq_g1_kmeans", f"--results={out}",
       f"--markdown={md}", "--extra", "--config.epochs=1", *TINY],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["single_device", "exact", "vq_g1_kmeans"]
  assert rows[0]["accuracy"] == rows[1]["accuracy"]  # exact SP == one device
  text = md.read_text()
  assert text.startswith("# Results\n\nintro kept\n")
  assert "| ASTRA G=1, k-means only (no fine-tuning) | distributed | 1 | 16 |" in text
