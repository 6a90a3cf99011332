"""infer.results' bookkeeping without running models: row order, codebook-size
suffixes, the continuations table and what a rewrite of the results file keeps."""

import json
import pathlib

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


def _baseline(name, mesh, tokens=2048):
  return {"name": name, "label": name, "mesh": mesh, "context": 1024, "tokens": tokens,
          "perplexity": 26.0, "bytes_per_device": 0}


def test_keep_baselines_reuses_the_files_rows_and_checks_them(tmp_path, monkeypatch):
  calls = []

  def fake_run(*command):
    calls.append(command)
    return {"perplexity": 27.0, "bytes_per_device": 5, "mesh": 4, "tokens": 2048}

  monkeypatch.setattr(results, "_run", fake_run)
  out, md = tmp_path / "r.json", tmp_path / "R.md"
  base = ["smollm2", f"--results={out}", f"--markdown={md}", "--eval-windows=2",
          "--only", "vq_g16_kmeans"]
  with pytest.raises(SystemExit):  # nothing to keep yet
    results.main([*base, "--keep-baselines"])
  out.write_text(json.dumps({"rows": [_baseline("single_device", 1),
                                      _baseline("exact", 4)]}))
  results.main([*base, "--keep-baselines"])
  assert len(calls) == 1 and "--exchange=vq:groups=16" in calls[0]  # only the new row ran
  rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"single_device", "exact", "vq_g16_kmeans"}
  assert rows["exact"]["perplexity"] == 26.0  # kept, not re-evaluated
  with pytest.raises(SystemExit):  # the kept rows scored 2 windows, not 3
    results.main([*base[:3], "--eval-windows=3", *base[4:], "--keep-baselines"])
  with pytest.raises(SystemExit):  # the kept exact row ran at mesh 4
    results.main([*base, "--keep-baselines", "--mesh=2"])
  with pytest.raises(SystemExit):  # nothing named to run
    results.parse(["smollm2", "--keep-baselines"])
  md.write_text("")  # --only with no names: nothing runs, the table is written again
  results.main([*base[:4], "--only", "--keep-baselines"])
  assert len(calls) == 1 and "| ASTRA G=16, k-means only (no fine-tuning) |" in md.read_text()
  assert md.read_text().count("| single_device | - |") == 1
  calls.clear()
  results.main(base)  # without the flag the baselines are evaluated again
  assert [c for c in calls if "--mesh=1" in c]


def test_a_killed_g32_run_is_not_taken_for_a_fine_tuned_one(tmp_path, monkeypatch):
  calls = []

  def fake_run(*command):
    calls.append(command)
    return {"completion": " x", "perplexity": 27.0, "bytes_per_device": 5}

  monkeypatch.setattr(results, "_run", fake_run)
  out, md, root = tmp_path / "r.json", tmp_path / "R.md", tmp_path / "runs"
  (root / "vq_g32" / "checkpoints" / "1").mkdir(parents=True)  # the first steps only
  out.write_text(json.dumps({"rows": [_baseline("single_device", 1), _baseline("exact", 4)]}))
  base = ["smollm2", f"--results={out}", f"--markdown={md}", f"--root={root}",
          "--eval-windows=2", "--keep-baselines"]
  results.main([*base, "--only", "continuations", "vq_g32_loss5"])
  g32 = [c for c in calls if any(a.startswith("--workdir=") for a in c)]
  assert not g32  # k-means only, not the killed run's checkpoint
  assert "ASTRA G=32 (k-means only)" in json.loads(out.read_text())["continuations"]["systems"]
  loss = json.loads(out.read_text())["rows"][-1]
  assert loss["name"] == "vq_g32_loss5" and "zero-shot" in loss["label"]


def test_fine_tuned_rows_are_also_compared_with_the_exact_model_fine_tuned_alike():
  row = lambda name, ppl, **kw: {"name": name, "label": name, "perplexity": ppl,
                                 "bytes_per_device": 10, **kw}
  rows = [row("exact", 26.0), row("vq_g32", 22.0, steps=100), row("exact_ft", 20.0, steps=100),
          row("vq_g32_kmeans", 27.0, steps=0), row("vq_g32_loss1", 23.0, finetuned=True),
          row("vq_g1_kmeans", 30.0)]
  lines = results.table(results.SMOLLM2, rows).splitlines()
  assert lines[0].endswith("| change | change vs exact fine-tuned |")
  cells = {c[0]: c[-2:] for c in ([x.strip() for x in line.strip("|").split("|")]
                                   for line in lines[2:8])}
  assert cells["exact"] == ["-", "-"]
  assert cells["vq_g32"] == ["-15.4%", "+10.0%"]
  assert cells["exact_ft"] == ["-23.1%", "-"]
  assert cells["vq_g32_kmeans"] == ["+3.8%", "-"]  # zero-shot: against the checkpoint only
  assert cells["vq_g32_loss1"] == ["-11.5%", "+15.0%"]
  assert cells["vq_g1_kmeans"] == ["+15.4%", "-"]
  # without an exact_ft row the table keeps its columns
  assert "fine-tuned" not in results.table(results.SMOLLM2, rows[:2]).splitlines()[0]


def test_the_no_noise_run_gets_its_own_link_loss_row_once_it_is_finished(tmp_path, monkeypatch,
                                                                         capsys):
  calls = []

  def fake_run(*command):
    calls.append(command)
    return {"perplexity": 21.0 if "--drop-rate=0.1" in command else 20.0, "bytes_per_device": 5}

  monkeypatch.setattr(results, "_run", fake_run)
  out, md, root = tmp_path / "r.json", tmp_path / "R.md", tmp_path / "runs"
  (root / "vq_g32_nonoise" / "checkpoints" / "3").mkdir(parents=True)
  rows = [_baseline("single_device", 1), _baseline("exact", 4)]
  out.write_text(json.dumps({"rows": rows}))
  base = ["smollm2", f"--results={out}", f"--markdown={md}", f"--root={root}",
          "--eval-windows=2", "--keep-baselines", "--only", "vq_g32_nonoise_loss10"]
  results.main(base)  # a folder without its row is a killed run: no zero-shot stand-in
  assert not calls and "skipping vq_g32_nonoise_loss10: no finished vq_g32_nonoise" in \
      capsys.readouterr().out
  rows.append({"name": "vq_g32_nonoise", "label": "ASTRA G=32, no noise", "perplexity": 20.0,
               "bytes_per_device": 5, "steps": 3})
  out.write_text(json.dumps({"rows": rows}))
  results.main(base)
  assert calls == [("infer.llama", "--eval", f"--workdir={root}/vq_g32_nonoise", "--mesh=4",
                    "--drop-rate=0.1", "--eval-windows=2")]
  saved = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in saved] == ["single_device", "exact", "vq_g32_nonoise",
                                        "vq_g32_nonoise_loss10"]
  assert saved[-1]["label"] == "ASTRA G=32, no noise, 10% of codes lost" and saved[-1]["finetuned"]
  assert "vq_g32_nonoise_loss5" not in results.loss_names(results.SMOLLM2)
  assert "vq_g32_nonoise_loss10" not in results.loss_names(results.GPT2)


def test_pretrained_vit_table_starts_from_the_bundled_backbone(tmp_path, monkeypatch):
  """vit-pretrained: the exact run fine-tunes DINOv2-S/14 at 56x56; every train run
  has the image size and the evaluation subset; ASTRA rows start from the exact
  run at a pretrained model's learning rate; no SPD or tensor-parallel rows."""
  calls = []

  def fake_run(*command):
    calls.append(command)
    for a in command:  # a train run leaves its folder
      if a.startswith("--workdir=") and command[0] == "train.vit":
        pathlib.Path(a.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
    return {"accuracy": 0.8, "bytes_per_device": 5, "examples": 2000, "class_token": "x"}

  monkeypatch.setattr(results, "_run", fake_run)
  root = tmp_path / "runs"
  results.main(["vit-pretrained", f"--root={root}", f"--results={tmp_path / 'r.json'}",
                f"--markdown={tmp_path / 'R.md'}"])
  trains = [c for c in calls if c[0] == "train.vit"]
  exact = trains[0]
  assert "--init-from=dinov2-s" in exact and f"--max-steps={results.EXACT_STEPS}" in exact
  assert all("--config.image_size=56" in c and "--config.eval_examples=2000" in c
             for c in trains)
  tuned = [c for c in trains[1:] if "--max-steps=100" in c]
  assert len(tuned) == 8 and all("--config.lr=5e-05" in c and
                                 f"--init-from={root / 'exact'}" in c for c in tuned)
  assert any("--config.class_token=single" in c and "--config.vq.groups=32" in c for c in tuned)
  assert not any(c[0] == "infer.spd" or any(a.startswith("--tp=") for a in c) for c in calls)
  names = [r["name"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]]
  assert "vq_g32_single" in names and "vq_g32_loss10" in names and "exact_ft" in names
