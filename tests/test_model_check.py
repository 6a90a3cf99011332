"""Calibrating the latency model: collectives timed alone (infer.lab.collective_time),
per-kind link efficiencies in the bench, and model_check's calibrated columns."""

import json
import os
import subprocess
import sys

import pytest

from infer.lab import bench, model_check
from tests.cli_helpers import assert_clean_errors, last_json, run
from tests.test_testbed import needs_netns

STRATEGIES = ["exact", "ring", "tp", "flash:bits=4,group_size=128", "vq:groups=32",
              "stream:groups=32", "stream:quantize=false"]


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


def test_a_streamed_run_joins_its_pipelined_row(bench_rows):
  """prefill_time's result names the stream exchange and whether it quantizes;
  the join finds the bench row of that spec, whose recomputation walks the
  pipelined schedule with the permute's measured efficiency."""
  rows_in = [dict(r, profile="measured") for r in bench_rows.values()]
  base = {"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0,
          "exchange": "stream", "groups": 32, "codebook_size": 1024, "measured_mbit": 5.0}
  timeline = {"ranks": [{"computed_s": 0.9, "waited_s": 0.0}, {"computed_s": 0.8,
                                                                  "waited_s": 0.15}]}
  runs = [dict(base, quantize=True, latency_s=1.0, timeline=timeline),
          dict(base, quantize=False, latency_s=2.0),
          {"model": "gpt2:micro", "tokens": 256, "mesh": 1, "latency_s": 1.5}]
  assert [model_check.spec(r) for r in runs[:2]] == ["stream:groups=32", "stream:quantize=false"]
  (kind, count, nbytes), = bench_rows["stream:groups=32"]["model_inputs"]["transfers"][
      "per_layer"]
  assert (kind, count, nbytes) == ("collective-permute", 1, 128 * 2 * 40)  # T/P x (K, V) x 40 B
  # gloo's permute probes do not apply: the blocks ride the transport's own TCP
  # connection, whose rate the testbed measured before the run (5 of 10 Mbit/s)
  probes = {10.0: {("collective-permute", nbytes): 1.0}}
  assert model_check.needed_probes(rows_in, runs) == set()
  rows = {r["exchange"]: r for r in model_check.join(rows_in, runs, probes)}
  g32 = rows["stream:groups=32"]
  assert g32["predicted_s"] == bench_rows["stream:groups=32"]["latency_s"]
  assert g32["calibrated_s"] == pytest.approx(model_check.recompute(
      bench_rows["stream:groups=32"], {"collective-permute": 0.5}), rel=1e-9)
  assert g32["calibrated_s"] > g32["predicted_s"]  # the codes at half the rate
  # beside each: the speed-up over the one-device run, and a streamed run's timeline
  assert g32["vs_one_device"] == 1.5 and rows["stream:quantize=false"]["vs_one_device"] == 0.75
  assert (g32["ranks_computed_s"], g32["ranks_waited_s"]) == ([0.9, 0.8], [0.0, 0.15])
  md = model_check.markdown(list(rows.values()), probes)
  assert "| 1.50x | 0.90 / 0.00, 0.80 / 0.15 |" in md and "| 0.75x | - |" in md
  assert rows["stream:quantize=false"]["calibrated_s"] > rows["stream:quantize=false"][
      "predicted_s"]


def test_join_adds_calibrated_columns(bench_rows):
  runs = [{"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0,
           "exchange": "exact", "latency_s": 2 * bench_rows["exact"]["latency_s"]},
          {"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0, "tp": "tp",
           "exchange": "exact", "latency_s": bench_rows["tp"]["latency_s"]}]
  rows_in = [dict(r, profile="measured") for r in bench_rows.values()]
  (kind, count, nbytes), = bench_rows["exact"]["model_inputs"]["transfers"]["per_layer"]
  probes = {10.0: {("all-gather", nbytes // count): 0.5}}
  assert model_check.needed_probes(rows_in, runs) == {
      (10.0, "all-gather", nbytes // count),
      *((10.0, *model_check.message_bytes(t))
        for t in bench_rows["tp"]["model_inputs"]["transfers"]["per_layer"])}
  rows = {r["exchange"]: r for r in model_check.join(rows_in, runs, probes)}
  assert rows["exact"]["error"] == pytest.approx(-0.5)
  # the all-gathers at half the rate and the testbed's tbf bucket (16384 bytes at 10 Mbit/s)
  assert rows["exact"]["calibrated_s"] == pytest.approx(
      model_check.recompute(bench_rows["exact"], {"all-gather": 0.5}, 16384), rel=1e-9)
  assert -0.5 < rows["exact"]["calibrated_error"] < 0.0
  # tp's all-reduce was not probed at its size: no calibrated value, not a guess
  assert "calibrated_s" not in rows["tp"]
  md = model_check.markdown(list(rows.values()), probes)
  assert "| calibrated model s | calibrated error |" in md
  assert (f"Link efficiency at 10 Mbit/s (infer.lab.collective_time, measured, per message size): "
          f"all-gather {nbytes // count / 1024:g} KiB 50%; tbf bucket 16384 bytes.") in md


def test_the_bucket_speeds_up_only_small_messages(bench_rows):
  # a bucket as deep as a layer's message sends it at once (alpha stays); one far
  # smaller than the exact exchange's message hardly changes it
  vq, exact = bench_rows["vq:groups=32"], bench_rows["exact"]
  deep = model_check.recompute(vq, {}, burst_bytes=1e9)
  assert deep == pytest.approx(vq["compute_s"] + vq["layers"] * 1e-3, rel=1e-5)
  assert model_check.recompute(exact, {}, burst_bytes=64) == pytest.approx(
      exact["latency_s"], rel=1e-3)


def test_efficiencies_read_the_probe_files(tmp_path):
  # 4 all-gathers of 1000 bytes (P=2) in 4 ms + 4 x alpha: 8 Mbit/s of 10
  probes = [("all-gather", 1000, 4, 1000, 0.004 + 0.004, 10.0),
            ("all-reduce", 4096, 2, 4096, 2 * 4096 * 8 / 8e6 + 0.002, 10.0),
            ("all-to-all", 64, 8, 32, 0.001, 100.0)]  # faster than alpha: capped at 1
  for kind, nbytes, count, wire, secs, rate in probes:
    (tmp_path / f"collective_{kind}_{nbytes}B_rate{rate:g}.json").write_text(json.dumps(
        {"kind": kind, "bytes": nbytes, "count": count, "wire_bytes": wire, "latency_s": secs,
         "rate_mbit": rate}))
  (tmp_path / "collective_all-gather_rate10.json").write_text("{}")  # the old layout: ignored
  found = model_check.efficiencies(str(tmp_path))
  assert found[10.0] == {("all-gather", 1000): pytest.approx(0.8),
                         ("all-reduce", 4096): pytest.approx(0.8)}
  assert found[100.0] == {("all-to-all", 64): 1.0}
  assert model_check.message_bytes(["all-gather-start", 3, 3 * 4098]) == ("all-gather", 4096)


def _probe(folder, name, **fields):
  (folder / name).write_text(json.dumps(dict(kind="all-gather", rate_mbit=10.0, **fields)))


def test_measured_buckets_from_idle_gap_probes(tmp_path):
  # back to back: 4 all-gathers of 40,000 bytes at 8 of 10 Mbit/s, plus alpha each
  per_call = 40_000 * 8 / 8e6
  _probe(tmp_path, "collective_all-gather_40000B_rate10.json", bytes=40_000, count=4,
         wire_bytes=40_000, latency_s=4 * (per_call + 1e-3))
  # after idle gaps each call takes 3/4 of that: a quarter of its bytes left at once
  _probe(tmp_path, "collective_all-gather_40000B_rate10_gap0.1.json", bytes=40_000, count=4,
         calls=4, gap_s=0.1, wire_bytes=40_000, latency_s=4 * (0.75 * per_call + 1e-3))
  # the gap probe is not a back-to-back efficiency
  assert model_check.efficiencies(str(tmp_path)) == {
      10.0: {("all-gather", 40_000): pytest.approx(0.8)}}
  assert model_check.measured_buckets(str(tmp_path)) == {10.0: 10_000}
  assert model_check.bucket_bytes("measured", 10.0, {10.0: 10_000}) == 10_000
  with pytest.raises(ValueError, match="no idle-gap probe at 100 Mbit/s"):
    model_check.bucket_bytes("measured", 100.0, {10.0: 10_000})
  # a gap faster than the bucket could allow is capped at tbf's depth (16384 at 10 Mbit/s)
  _probe(tmp_path, "collective_all-gather_40000B_rate10_gap0.1.json", bytes=40_000, count=4,
         calls=4, gap_s=0.1, wire_bytes=40_000, latency_s=4 * 1e-3)
  assert model_check.measured_buckets(str(tmp_path)) == {10.0: 16384}


def test_measured_buckets_need_the_back_to_back_probe(tmp_path):
  _probe(tmp_path, "collective_all-gather_40000B_rate10_gap0.1.json", bytes=40_000, count=4,
         calls=4, gap_s=0.1, wire_bytes=40_000, latency_s=0.2)
  with pytest.raises(ValueError, match="no back-to-back probe of all-gather 40000 bytes"):
    model_check.measured_buckets(str(tmp_path))


@pytest.mark.parametrize("kind", ["all-gather", "all-reduce", "all-to-all",
                                  "collective-permute"])
def test_collective_time_runs_exactly_count_collectives(kind, tmp_path):
  result = last_json(run("infer.lab.collective_time", "--kind", kind, "--bytes", "4096",
                         "--count", "3", "--mesh", "4", "--repeats", "2",
                         "--out", str(tmp_path / "c.json")))
  assert result["hlo_collectives"] == {kind: {"count": 3, "operand_bytes": 3 * 4096}}
  wire = {"all-gather": 3 * 4096, "all-reduce": 1.5 * 4096, "all-to-all": 0.75 * 4096,
          "collective-permute": 4096}[kind]
  assert result["wire_bytes"] == wire and result["latency_s"] > 0
  assert result["achieved_mbit"] == pytest.approx(
      3 * wire * 8 / result["latency_s"] / 1e6, rel=1e-9)
  assert result == json.loads((tmp_path / "c.json").read_text())


def test_collective_time_with_gaps_runs_one_collective_per_call(tmp_path):
  result = last_json(run("infer.lab.collective_time", "--kind", "all-gather", "--bytes", "4096",
                         "--count", "3", "--mesh", "2", "--repeats", "2", "--warmup", "0",
                         "--gap-s", "0.01"))
  # three calls of a one-collective program; the rate counts all three
  assert result["hlo_collectives"] == {"all-gather": {"count": 1, "operand_bytes": 4096}}
  assert result["calls"] == 3 and result["gap_s"] == 0.01
  assert result["achieved_mbit"] == pytest.approx(
      3 * 4096 * 8 / result["latency_s"] / 1e6, rel=1e-9)
  chained = last_json(run("infer.lab.collective_time", "--kind", "all-gather", "--bytes", "4096",
                          "--count", "3", "--mesh", "2", "--repeats", "1"))
  assert chained["calls"] == 1 and chained["gap_s"] == 0.0


def test_collective_time_bad_input():
  assert_clean_errors([
      (("infer.lab.collective_time", "--kind", "broadcast"), "invalid choice"),
      (("infer.lab.collective_time", "--mesh", "1"), "must be >= 2"),
      (("infer.lab.collective_time", "--gap-s", "-1"), "must be in [0, inf)"),
      (("infer.lab.bench", "--tiny", "--link-efficiency", "all-gather=1.5"), "KIND=E"),
      (("infer.lab.bench", "--tiny", "--link-efficiency", "send=0.5"), "unknown collective"),
  ])


@needs_netns
def test_collective_time_over_a_shaped_link(tmp_path):
  rate = 10
  proc = subprocess.run(
      [sys.executable, "-m", "infer.lab.testbed", "--procs=2", f"--rate={rate}", "--probe-mb=0",
       f"--out={tmp_path}/c.json", "--", "infer.lab.collective_time", "--kind=all-gather",
       "--bytes=131072", "--count=2", "--mesh=2", "--repeats=2"],
      capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["processes"] == 2 and result["rate_mbit"] == rate
  # TCP collectives reach part of the link's rate, never more than it
  assert 0.2 * rate < result["achieved_mbit"] < 1.05 * rate, result
  # warm-up + 2 repeats, 2 all-gathers each, crossed the shaped links
  assert all(b >= 3 * 2 * 131072 for b in result["link_bytes"]), result


def test_join_without_the_bucket_credits_no_burst(bench_rows):
  runs = [{"model": "gpt2:micro", "tokens": 256, "mesh": 2, "rate_mbit": 10.0,
           "exchange": "vq", "groups": 32, "latency_s": bench_rows["vq:groups=32"]["latency_s"]}]
  rows_in = [dict(r, profile="measured") for r in bench_rows.values()]
  probes = {10.0: {model_check.message_bytes(t): 0.9 for t in
                   bench_rows["vq:groups=32"]["model_inputs"]["transfers"]["per_layer"]}}
  eff = {"all-gather": 0.9}
  tbf, = model_check.join(rows_in, runs, probes)
  none, = model_check.join(rows_in, runs, probes, bucket="none")
  assert tbf["calibrated_s"] == pytest.approx(
      model_check.recompute(bench_rows["vq:groups=32"], eff, 16384), rel=1e-9)
  assert none["calibrated_s"] == pytest.approx(
      model_check.recompute(bench_rows["vq:groups=32"], eff, 0), rel=1e-9)
  assert none["calibrated_s"] > tbf["calibrated_s"]  # the bucket only ever takes time off
  assert "no bucket credited." in model_check.markdown([none], probes, "none")
  assert "tbf bucket 16384 bytes." in model_check.markdown([tbf], probes, "tbf")
  with pytest.raises(ValueError, match="unknown bucket 'deep'"):
    model_check.bucket_bytes("deep", 10.0)


def test_bucket_option_is_checked_by_the_parser():
  with pytest.raises(SystemExit):
    model_check.parse(["--bucket", "deep"])
  assert model_check.parse([]).bucket == "tbf"


def test_model_check_measured_bucket_without_gap_probes(tmp_path):
  # the repository's testbed files, no idle-gap probe in the folder named
  assert_clean_errors([
      (("infer.lab.model_check", "--bucket", "measured", "--gap-probes", str(tmp_path),
        "--out", str(tmp_path / "m")), "Mbit/s for --bucket measured: run the commands"),
  ])
  assert not list(tmp_path.iterdir())  # nothing written
