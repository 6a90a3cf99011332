"""Calibrating the latency model: collectives timed alone (infer.collective_time),
per-kind link efficiencies in the bench, and model_check's calibrated columns."""

import json
import os
import subprocess
import sys

import pytest

from infer import bench, model_check
from tests.cli_helpers import assert_clean_errors, last_json, run
from tests.test_testbed import needs_netns

STRATEGIES = ["exact", "ring", "tp", "flash:bits=4,group_size=128", "vq:groups=32"]


@pytest.fixture(scope="module")
def bench_rows(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  bench.main(["--models", "gpt2-micro", "--mesh", "2", "--bandwidths", "10", "--strategies",
              *STRATEGIES, "--profiles", "gtx1660ti", "--out", str(out)])
  return {r["exchange"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}


def test_recomputing_a_bench_row_reproduces_it(bench_rows):
  for spec, row in bench_rows.items():
    assert model_check.recompute(row, {}) == pytest.approx(row["latency_s"], rel=1e-5), spec


def test_link_efficiency_in_the_bench_equals_the_recomputed_row(bench_rows, tmp_path):
  eff = {"all-gather": 0.5, "all-reduce": 0.8, "collective-permute": 0.4, "all-to-all": 0.9}
  bench.main(["--models", "gpt2-micro", "--mesh", "2", "--bandwidths", "10", "--strategies",
              *STRATEGIES, "--profiles", "gtx1660ti", "--out", str(tmp_path),
              "--link-efficiency", ",".join(f"{k}={v}" for k, v in eff.items())])
  slow = {r["exchange"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
  for spec, row in bench_rows.items():
    assert slow[spec]["latency_s"] == pytest.approx(model_check.recompute(row, eff), rel=1e-5)
    # only the bytes slow down: compute and the per-message latency stay
    assert slow[spec]["compute_s"] == row["compute_s"]
  exact, nominal = slow["exact"], bench_rows["exact"]
  alpha = 4 * 1e-3  # 4 layers, one all-gather each
  assert exact["comm_s"] - alpha == pytest.approx(2 * (nominal["comm_s"] - alpha), rel=1e-5)


def test_join_adds_calibrated_columns(bench_rows):
  runs = [{"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0,
           "exchange": "exact", "latency_s": 2 * bench_rows["exact"]["latency_s"]},
          {"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0, "tp": "tp",
           "exchange": "exact", "latency_s": bench_rows["tp"]["latency_s"]}]
  rows = {r["exchange"]: r for r in model_check.join(
      [dict(r, profile="measured") for r in bench_rows.values()], runs,
      {10.0: {"all-gather": 0.5}})}
  assert rows["exact"]["error"] == pytest.approx(-0.5)
  # the all-gathers at half the rate: the bytes' time doubles, alpha and compute do not
  assert -0.5 < rows["exact"]["calibrated_error"] < 0.0
  # all-reduce not probed: as modelled (the bench rounds to 6 digits)
  assert rows["tp"]["calibrated_s"] == pytest.approx(rows["tp"]["predicted_s"], rel=1e-5)
  md = model_check.markdown(list(rows.values()), {10.0: {"all-gather": 0.5}})
  assert "| calibrated model s | calibrated error |" in md
  assert "Link efficiency at 10 Mbit/s (infer.collective_time, measured): all-gather 50%." in md


def test_efficiencies_read_the_probe_files(tmp_path):
  for kind, mbit in (("all-gather", 5.5), ("all-reduce", 8.0)):
    (tmp_path / f"collective_{kind}_rate10.json").write_text(json.dumps(
        {"kind": kind, "rate_mbit": 10.0, "achieved_mbit": mbit}))
  (tmp_path / "collective_all-to-all_rate100.json").write_text(json.dumps(
      {"kind": "all-to-all", "rate_mbit": 100.0, "achieved_mbit": 130.0}))  # capped at 1
  assert model_check.efficiencies(str(tmp_path)) == {
      10.0: {"all-gather": 0.55, "all-reduce": 0.8}, 100.0: {"all-to-all": 1.0}}


@pytest.mark.parametrize("kind", ["all-gather", "all-reduce", "all-to-all",
                                  "collective-permute"])
def test_collective_time_runs_exactly_count_collectives(kind, tmp_path):
  result = last_json(run("infer.collective_time", "--kind", kind, "--bytes", "4096",
                         "--count", "3", "--mesh", "4", "--repeats", "2",
                         "--out", str(tmp_path / "c.json")))
  assert result["hlo_collectives"] == {kind: {"count": 3, "operand_bytes": 3 * 4096}}
  wire = {"all-gather": 3 * 4096, "all-reduce": 1.5 * 4096, "all-to-all": 0.75 * 4096,
          "collective-permute": 4096}[kind]
  assert result["wire_bytes"] == wire and result["latency_s"] > 0
  assert result["achieved_mbit"] == pytest.approx(
      3 * wire * 8 / result["latency_s"] / 1e6, rel=1e-9)
  assert result == json.loads((tmp_path / "c.json").read_text())


def test_collective_time_bad_input():
  assert_clean_errors([
      (("infer.collective_time", "--kind", "broadcast"), "invalid choice"),
      (("infer.collective_time", "--mesh", "1"), "must be >= 2"),
      (("infer.bench", "--tiny", "--link-efficiency", "all-gather=1.5"), "KIND=E"),
      (("infer.bench", "--tiny", "--link-efficiency", "send=0.5"), "unknown collective"),
  ])


@needs_netns
def test_collective_time_over_a_shaped_link(tmp_path):
  rate = 10
  proc = subprocess.run(
      [sys.executable, "-m", "infer.testbed", "--procs=2", f"--rate={rate}", "--probe-mb=0",
       f"--out={tmp_path}/c.json", "--", "infer.collective_time", "--kind=all-gather",
       "--bytes=131072", "--count=2", "--mesh=2", "--repeats=2"],
      capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["processes"] == 2 and result["rate_mbit"] == rate
  # TCP collectives reach part of the link's rate, never more than it
  assert 0.2 * rate < result["achieved_mbit"] < 1.05 * rate, result
  # warm-up + 2 repeats, 2 all-gathers each, crossed the shaped links
  assert all(b >= 3 * 2 * 131072 for b in result["link_bytes"]), result
