"""python -m infer.lab.bench end to end: tiny matrix, measured compute, paper point, bad input."""

import json

import pytest

from infer.lab import bench
from tests.cli_helpers import assert_clean_errors, last_json, run


def test_tiny_bench_writes_json_markdown_and_plots(tmp_path):
  out = tmp_path / "bench"
  result = last_json(run("infer.lab.bench", "--tiny", "--out", str(out), "--trace", "0:10,0.005:1000",
                         timeout=300))
  data = json.loads((out / "bench.json").read_text())
  rows = data["rows"]
  # 2 models x 1 profile x 1 topology x (2 bandwidths + trace) x 2 mesh sizes x 2 exchanges
  assert result["rows"] == len(rows) == 24
  for r in rows:
    assert r["latency_s"] == pytest.approx(r["compute_s"] + r["comm_s"], rel=1e-5)  # 6 digits
    if r["mesh"] == 1:
      assert r["bytes_per_device"] == 0 and r["speedup_vs_single"] == pytest.approx(1)
    if r["exchange"] == "exact":
      assert r["speedup_vs_exact"] == pytest.approx(1)
  g32 = next(r for r in rows if r["model"] == "gpt2-micro" and r["mesh"] == 4
             and r["exchange"] == "vq:groups=32")
  assert g32["bytes_per_device"] == 4 * 2 * 64 * 40  # layers x (K, V) x T/P x 40 bytes
  assert {r["bandwidth"] for r in rows} == {"10", "1000", "trace:0:10,0.005:1000"}
  md = (out / "bench.md").read_text()
  assert "python -m infer.lab.bench --tiny" in md and "| gpt2-micro | 4 | vq:groups=32 |" in md
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert pngs == ["latency_vs_bandwidth_gtx1660ti.png", "speedup_vs_devices_gtx1660ti.png"]
  assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_measured_compute_and_paper_comparison(tmp_path, capsys):
  bench.main(["--models", "vit-mu7", "--mesh", "1", "2", "--bandwidths", "100",
              "--exchanges", "vq:groups=32", "--profiles", "gtx1660ti", "--measure",
              "--repeats", "1", "--out", str(tmp_path / "m")])
  rows = json.loads((tmp_path / "m" / "bench.json").read_text())["rows"]
  measured = [r for r in rows if r["profile"] == "measured"]
  assert len(measured) == 2 and all(r["compute_s"] > 0 for r in measured)

  bench.main(["--models", "vit-b16", "--mesh", "4", "--bandwidths", "10", "--exchanges",
              "vq:groups=32", "vq:groups=1", "--profiles", "gtx1660ti", "--out",
              str(tmp_path / "p")])
  paper = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["paper"]
  assert paper["paper"] == {"speedup_vs_single": 2.64, "speedup_vs_exact": 171.8}
  rows = {(r["exchange"], r["accounting"]): r for r in paper["rows"]}
  assert sorted(rows) == [(g, a) for g in ("vq:groups=1", "vq:groups=32")
                          for a in ("ours", "paper")]
  for g, ratio in (("vq:groups=32", 76.8), ("vq:groups=1", 76.8 * 32)):
    ours, theirs = rows[g, "ours"], rows[g, "paper"]
    # compute is shared, so the gain over exact SP stays under the byte ratio ...
    assert 1 < ours["speedup_vs_exact"] < ratio and 1 < theirs["speedup_vs_exact"] < ratio
    # ... and the paper's accounting (no per-message cost) is the faster one
    assert theirs["latency_s"] < ours["latency_s"] and theirs["compute_s"] == ours["compute_s"]
    # its communication is exactly the bits sent / bandwidth
    assert theirs["comm_s"] == pytest.approx(8 * ours["bytes_per_device"] / 10e6, rel=1e-5)
  assert "Comparison with the ASTRA paper" in (tmp_path / "p" / "bench.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--models", "vit-z"], "unknown model"),
    (["--profiles", "tpu"], "unknown device profile"),
    (["--profiles", "host", "--host-profile", "/nonexistent.json"], "infer.lab.profile_host"),
    (["--tiny", "--bandwidths", "0"], "argument --bandwidths: must be in (0, inf), got 0"),
    (["--tiny", "--topology", "ring"], "unknown topology"),
    (["--tiny", "--trace", "0-10"], "SECONDS:MBITS"),
    (["--tiny", "--mesh", "3"], "not divisible by the mesh size 3"),
    (["--tiny", "--exchanges", "zigzag"], "unknown strategy 'zigzag': choose a K/V exchange"),
    (["--tiny", "--exchanges", "vq:grups=32"], "has no option"),
    (["--tiny", "--exchanges", "vq:groups=7"], "does not fit vit-mu7"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main([*argv, "--out", str(tmp_path)])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and err.startswith("error: ") and message in err, err


def test_bad_input_exits_2_without_traceback():
  assert_clean_errors([(("infer.lab.bench", "--models", "vit-z"), "unknown model")])


def test_tensor_parallel_strategies_in_the_bench(tmp_path):
  bench.main(["--models", "gpt2-micro", "--mesh", "1", "4", "8", "--bandwidths", "10",
              "--strategies", "tp", "spd:drop=all", "flash:bits=4,group_size=128",
              "--profiles", "gtx1660ti", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "bench.json").read_text())
  rows = {(r["mesh"], r["exchange"]): r for r in data["rows"]}
  all_reduce = 256 * 128 * 4  # T x D float32
  assert rows[4, "tp"]["bytes_per_device"] == 4 * 2 * all_reduce  # layers x 2 syncs
  assert rows[4, "spd:drop=all"]["bytes_per_device"] == 4 * all_reduce
  assert rows[4, "tp"]["parallelism"] == "tensor" and rows[4, "tp"]["collectives_per_layer"] == 2
  flash = rows[4, "flash:bits=4,group_size=128"]
  assert flash["bytes_per_device"] == 4 * 2 * 5 * (8192 // 2 + 4 * 8192 // 128)
  assert (8, "tp") not in rows and (8, "exact") not in rows  # 4 heads do not split over 8
  assert {s["mesh"] for s in data["skipped"]} == {8}
  assert "4 heads do not split over 8" in (tmp_path / "bench.md").read_text() or \
      "do not split over 8" in (tmp_path / "bench.md").read_text()


def test_stream_rows_walk_the_pipelined_schedule(tmp_path):
  """The stream exchange's rows: the pipelined schedule's time from the same
  compute and per-message bytes, and a ViT skipped with the reason."""
  from astra_jax.netsim import pipeline
  bench.main(["--models", "gpt2-micro", "vit-mu7", "--mesh", "1", "4", "--bandwidths", "10",
              "1000", "--exchanges", "vq:groups=32", "stream:groups=32",
              "--profiles", "gtx1660ti", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "bench.json").read_text())
  rows = {(r["model"], r["mesh"], r["bandwidth"], r["exchange"]): r for r in data["rows"]}
  for mbps in ("10", "1000"):
    vq, stream = rows["gpt2-micro", 4, mbps, "vq:groups=32"], rows["gpt2-micro", 4, mbps,
                                                                   "stream:groups=32"]
    assert stream["compute_s"] == pytest.approx(vq["compute_s"], rel=1e-5)
    # the block of 64 tokens x 40 bytes x (K, V) shifted by 1, 2, 3 devices each layer
    assert stream["model_inputs"]["transfers"]["per_layer"] == [
        ["collective-permute", 3, 3 * 2 * 64 * 40]]
    inputs = stream["model_inputs"]
    walked = pipeline.streaming_prefill(
        layers=4, layer_compute_s=inputs["layer_compute_s"], mesh_size=4,
        message_s=2 * 64 * 40 * 8 / (int(mbps) * 1e6), latency_s=inputs["message_latency_s"],
        embed_s=inputs["embed_s"], head_s=inputs["head_s"])
    assert stream["latency_s"] == pytest.approx(walked.total_s, rel=1e-5)
  # at 1000 Mbit/s the per-message latencies overlap instead of adding up per
  # layer; at 10 Mbit/s both are link-bound (the last device's downlink takes
  # 3 blocks a layer either way) and the stream also pays the pipeline's fill
  fast = [rows["gpt2-micro", 4, "1000", e]["latency_s"] for e in ("stream:groups=32",
                                                                 "vq:groups=32")]
  assert fast[0] < 0.8 * fast[1]
  assert not [k for k in rows if k[0] == "vit-mu7" and k[3].startswith("stream")]
  assert any("stream exchange is for causal models" in s["why"] for s in data["skipped"])
