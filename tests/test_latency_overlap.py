"""The latency model's overlap option: a layer's transfers under its local attention."""

import json

import pytest

from astra_jax.core import exchange as ex
from astra_jax.netsim import flops, latency
from infer.lab import bench

SMALL = flops.LayerShape(tokens=8, width=4, heads=2, mlp=8)
LAYER = [latency.Transfer("all-gather", 2, 1000)]
FINAL = [latency.Transfer("all-reduce", 1, 400)]
KW = dict(layers=3, layer_compute_s=0.01, layer_transfers=LAYER, mesh_size=4,
          embed_s=0.002, head_s=0.003, final_transfers=FINAL)
MB_S = latency.Network(latency.Trace.constant(8), "switched", 1e-3)  # 1 MB/s, 1 ms a message


def test_overlap_hides_up_to_the_overlapped_compute_per_layer():
  plain = latency.prefill_latency(network=MB_S, **KW)
  layer_comm = 3000 / 1e6 + 2e-3  # (P-1) s at 1 MB/s + 2 messages: 5 ms
  for o in (0.0, 0.004, 0.005, 0.008):
    lat = latency.prefill_latency(network=MB_S, layer_overlap_s=o, **KW)
    assert lat.compute_s == plain.compute_s == pytest.approx(0.035)
    assert lat.total_s == pytest.approx(plain.total_s - 3 * min(layer_comm, o))
    assert lat.hidden_s == pytest.approx(3 * min(layer_comm, o))
    assert lat.comm_s + lat.hidden_s == pytest.approx(plain.comm_s)
  # the layers' transfers hide entirely; the final all-reduce (after the head) never does
  full = latency.prefill_latency(network=MB_S, layer_overlap_s=0.01, **KW)
  assert full.comm_s == pytest.approx(600 / 1e6 + 1e-3)
  assert full.total_s >= full.compute_s
  assert latency.prefill_latency(network=MB_S, layer_overlap_s=0.004, **{
      **KW, "mesh_size": 1}).total_s == pytest.approx(0.035)  # nothing to hide on one device
  with pytest.raises(ValueError, match="layer_overlap_s must be in"):
    latency.prefill_latency(network=MB_S, layer_overlap_s=0.02, **KW)


def test_overlap_on_a_bandwidth_trace_starts_each_transfer_earlier():
  """1 MB/s, then 0.1 MB/s from 20 ms; o = 4 ms of each 10 ms layer overlaps:
  the transfers start at 8, 19 and 48 ms (6 ms into each layer)."""
  drop = latency.Network(latency.Trace(((0, 8), (0.02, 0.8))), "switched", 1e-3)
  lat = latency.prefill_latency(network=drop, layer_overlap_s=0.004, **KW)
  layer1 = 3e-3 + 2e-3  # 8 -> 13 ms, all at 1 MB/s
  layer2 = (1e-3 + 2000 / 1e5) + 2e-3  # from 19 ms: 1 kB by 20 ms, 2 kB at 0.1 MB/s
  layer3 = 3000 / 1e5 + 2e-3  # from 48 ms, all at 0.1 MB/s
  final = 600 / 1e5 + 1e-3  # from 83 ms
  assert lat.total_s == pytest.approx(0.090)
  assert lat.comm_s == pytest.approx(layer1 + layer2 + layer3 - 3 * 0.004 + final)
  assert lat.hidden_s == pytest.approx(3 * 0.004)


def test_local_attention_cost_is_the_own_keys_part_of_the_layer():
  # P=2: n = Tl = 4 local queries and keys, Da = 4, H = 2: 4 n Tl Da + 5 n H Tl
  assert flops.local_attention_cost(SMALL, 2) == flops.Cost(
      4 * 4 * 4 * 4 + 5 * 4 * 2 * 4, 2 * 4 * (2 * 4 * 4 + 2 * 4 * 2 * 4))
  # Tl / Tk of layer_cost's scores, softmax and values (4 n Tk Da + 5 n H Tk, Tk = 8)
  assert flops.local_attention_cost(SMALL, 2).flops * 8 / 4 == 4 * 4 * 8 * 4 + 5 * 4 * 2 * 8
  # on one device the own keys are all of them
  assert flops.local_attention_cost(SMALL, 1).flops == 4 * 8 * 8 * 4 + 5 * 8 * 2 * 8
  # a class token is one more local query and key
  with_cls = flops.LayerShape(8, 4, 2, 8, private=1)
  assert flops.local_attention_cost(with_cls, 2).flops == 4 * 5 * 5 * 4 + 5 * 5 * 2 * 5
  # the overlapped exchange merges two partial softmaxes once: one ring step
  one_step = flops.exchange_cost(ex.make_exchange("ring"), SMALL, 2)
  for spec in ("exact", "vq:groups=2"):
    over = ex.from_spec(spec + (",overlap=true" if ":" in spec else ":overlap=true"))
    assert flops.exchange_cost(over, SMALL, 2) == (
        flops.exchange_cost(ex.from_spec(spec), SMALL, 2) + one_step)
  assert flops.layer_cost(SMALL, 1, ex.from_spec("exact:overlap=true")) == flops.layer_cost(
      SMALL, 1)  # one device: no exchange, nothing to merge


def _over(spec):
  return spec + (",overlap=true" if ":" in spec else ":overlap=true")


def test_bench_rows_with_and_without_overlap(tmp_path):
  plain_specs = ["exact", "vq:groups=32"]
  bands = ["10", "1000", "trace:0:10,0.005:1000"]
  bench.main(["--models", "gpt2-micro", "--mesh", "1", "4", "--bandwidths", "10", "1000",
              "--strategies", *plain_specs, *map(_over, plain_specs), "--profiles", "gtx1660ti",
              "--trace", "0:10,0.005:1000", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "bench.json").read_text())
  rows = {(r["mesh"], r["bandwidth"], r["exchange"]): r for r in data["rows"]}
  assert len(rows) == len(data["rows"]) == 2 * 3 * 4  # P x bandwidths x specs, all distinct
  micro = flops.LayerShape(256, 128, 4, 512)  # gpt2-micro: 4 layers
  for band in bands:
    for spec in plain_specs:
      plain, over = rows[4, band, spec], rows[4, band, _over(spec)]
      assert "comm_hidden_s" not in plain and over["comm_hidden_s"] > 0
      assert over["bytes_per_device"] == plain["bytes_per_device"] > 0
      assert over["exact_sp_s"] == plain["exact_sp_s"]  # the baseline never overlaps
      assert over["compute_s"] <= over["latency_s"] < plain["latency_s"]
      # hidden: at most the local attention's share of each layer's compute
      share = (flops.local_attention_cost(micro, 4).flops
               / flops.layer_cost(micro, 4, ex.from_spec(_over(spec))).flops)
      assert over["comm_hidden_s"] <= share * over["compute_s"]
      if not band.startswith("trace"):  # the same transfers at the same rate
        assert over["comm_s"] + over["comm_hidden_s"] == pytest.approx(plain["comm_s"], rel=1e-5)
  assert "| gpt2-micro | 4 | vq:groups=32,overlap=true |" in (tmp_path / "bench.md").read_text()
  assert "overlap=true pays max(0, collectives - local-block attention)" in data["formula"]


def test_measured_profile_runs_the_overlapped_program(tmp_path):
  bench.main(["--models", "vit-mu7", "--mesh", "2", "--bandwidths", "100", "--exchanges",
              "vq:groups=32,overlap=true", "--profiles", "measured", "--repeats", "1",
              "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  assert [r["exchange"] for r in rows] == ["vq:groups=32,overlap=true"]
  assert rows[0]["compute_s"] > 0 and rows[0]["comm_hidden_s"] > 0
