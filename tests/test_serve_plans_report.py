"""``infer.lab.serve_plans --report``: the testbed's results as the BENCHMARKS.md
table (every plan's measured and modelled time, the pick and its ratios), and
a file that is not such a result refused in one line."""

import json

import pytest

from infer.lab import serve_plans

RESULT = {"rate_mbit": 10, "plans": ["one-device", "G=32", "exact"], "link": {"mbit": 9.6, "latency_ms": 0.1}, "quality_loss_pct":
          {"G=32": 11.5, "exact": 0.0},
          "rows": [{"prompt_tokens": 1024, "pick": "G=32", "pick_s": 2.9, "best": "G=32",
                    "pick_vs_best": 1.0, "pick_vs_one_device": 0.56,
                    "plans": {"one-device": {"measured_s": 5.2, "predicted_s": 5.1},
                              "G=32": {"measured_s": 2.9, "predicted_s": 3.1},
                              "exact": {"measured_s": 20.1, "predicted_s": None}}}]}


def test_report_prints_and_publishes_the_table(tmp_path, capsys):
  path, md = tmp_path / "10mbit.json", tmp_path / "B.md"
  path.write_text(json.dumps(RESULT))
  md.write_text("before\n<!-- serve-plans:begin -->\nold\n<!-- serve-plans:end -->\nafter\n")
  serve_plans.main(["--report", str(path), "--publish", str(md)])
  out = capsys.readouterr().out
  assert ("| 10 Mbit/s (probe 9.6) | 1024 | 5.200 (5.100) | 2.900 (3.100) | 20.100 (nan) | "
          "G=32 | 2.900 | 1.00x | 0.56x |") in out
  assert "G=32 +11.5 %, exact +0.0 %" in out
  text = md.read_text()
  assert "old" not in text and "2.900 (3.100)" in text and text.endswith("after\n")


@pytest.mark.parametrize("content", ["not json", json.dumps({"rows": []})])
def test_report_refuses_other_files_in_one_line(tmp_path, capsys, content):
  path = tmp_path / "x.json"
  path.write_text(content)
  with pytest.raises(SystemExit) as e:
    serve_plans.main(["--report", str(path)])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and str(path) in err, err


def test_measuring_needs_ranks_and_prompt_lengths_that_split_over_them(capsys):
  with pytest.raises(SystemExit) as e:
    serve_plans.main(["--model", "smollm2"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "python -m infer.launch" in err, err
  for text in ("16,x", "15", ""):
    with pytest.raises(ValueError, match="--prompts"):
      serve_plans._lengths(text, 2)
  assert serve_plans._lengths("1024,32,32", 2) == [32, 1024]
