"""python -m infer.lab.code_search: runs, reports both searches, refuses bad rows (no timing asserted)."""

import json

from cli_helpers import assert_one_line_error, last_json, run


def test_code_search_reports_both_searches(tmp_path):
  out = tmp_path / "rows.json"
  proc = run("infer.lab.code_search", "--rows", "64/32/4/64", "128/48/1/256", "--repeats", "1",
             "--out", str(out))
  result = last_json(proc)
  assert json.loads(out.read_text()) == result
  assert [(r["width"], r["tokens"], r["groups"], r["codebook_size"]) for r in result["rows"]] == [
      (64, 32, 4, 64), (128, 48, 1, 256)]
  for row in result["rows"]:
    assert row["same_codes"] and row["layer_s"] > 0 and row["encode_s"] > 0
    assert row["ratio"] == row["encode_s"] / row["layer_s"]
  assert "speed-up" in proc.stdout


def test_code_search_refuses_bad_rows():
  assert_one_line_error(run("infer.lab.code_search", "--rows", "768/256/7/1024"), 2,
                        "GROUPS dividing WIDTH")
  assert_one_line_error(run("infer.lab.code_search", "--rows", "768x256"), 2,
                        "WIDTH/TOKENS/GROUPS/ENTRIES")
