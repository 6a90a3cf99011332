"""infer.results' bookkeeping without running models: row order, codebook-size
suffixes, the continuations table and what a rewrite of the results file keeps."""

import json

import pytest

from infer import results


def test_rows_at_another_codebook_size_follow_their_base_row():
  rows = [{"name": n} for n in ("vq_g32_k256", "exact", "vq_g32", "vq_g1_k4096", "vq_g1",
                                "single_device", "vq_g32_k4096", "vq_g32_loss1", "tp")]
  assert [r["name"] for r in results.order(results.GPT2, rows)] == [
      "single_device", "exact", "vq_g32", "vq_g32_k256", "vq_g32_k4096", "vq_g1",
      "vq_g1_k4096", "vq_g32_loss1", "tp"]
  args = results.parse(["smollm2", "--codebook-size", "256"])
  assert results.suffix(args) == "_k256" and "continuations" not in args.only
  assert results.suffix(results.parse(["gpt2", "--codebook-size", "1024"])) == ""
  with pytest.raises(SystemExit):
    results.parse(["gpt2", "--codebook-size", "300"])


def test_continuations_table_and_results_file(tmp_path, monkeypatch):
  calls = []

  def fake_run(*command):
    calls.append(command)
    prompt = next(c for c in command if c.startswith("--prompt=")).split("=", 1)[1]
    return {"completion": f" after {prompt[:5]}|{'vq' if '--exchange=vq:groups=32' in command else 'x'}\n."}

  monkeypatch.setattr(results, "_run", fake_run)
  md = tmp_path / "R.md"
  md.write_text("top\n<!-- smollm2-continuations:begin -->\nold\n<!-- smollm2-continuations:end -->\n")
  out = tmp_path / "r.json"
  out.write_text(json.dumps({"rows": [{"name": "exact"}]}))
  args = results.parse(["smollm2", f"--results={out}", f"--markdown={md}"])
  results.continuations(args, results.SMOLLM2, [
      ("exact", ["infer.llama", "--model=smollm2"]),
      ("ASTRA G=32", ["infer.llama", "--model=smollm2", "--exchange=vq:groups=32"])],
      "--mesh=4")
  assert len(calls) == 2 * len(results.PROMPTS)
  assert all("--temperature=0" in c and "--mesh=4" in c for c in calls)
  data = json.loads(out.read_text())
  assert data["rows"] == [{"name": "exact"}]  # the rows are kept
  got = data["continuations"]
  assert got["systems"] == ["exact", "ASTRA G=32"] and got["mesh"] == 4
  assert got["rows"][0] == {"prompt": results.PROMPTS[0], "exact": " after The c|x\n.",
                            "ASTRA G=32": " after The c|vq\n."}
  text = md.read_text()
  assert "old" not in text and text.startswith("top\n")
  # cells stay on one line and a '|' in the text does not split a cell
  assert "| The capital of France is |  after The c\\|x ⏎ . |  after The c\\|vq ⏎ . |" in text
  # rewriting the rows keeps the continuations
  results.write(args, results.SMOLLM2, [{"name": "exact", "label": "e", "perplexity": 2.0,
                                         "bytes_per_device": 1}])
  assert json.loads(out.read_text())["continuations"] == got
