"""End-to-end ViT CLIs on a tiny synthetic IDX dataset (8x8 images padded to 16x16).

Their bad inputs that every CLI shares (checkpoint corruption, signals, NaN
loss, full disk, config values, --out/--workdir) are in tests/test_bad_input.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import VIT_TINY as TINY, assert_clean_errors, last_json, run, write_idx_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_idx_dataset(tmp_path_factory.mktemp("tiny_idx"))


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
