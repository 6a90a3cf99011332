"""End-to-end GPT-2 CLIs on a tiny generated text with the nano model."""

import json

import pytest

from cli_helpers import assert_clean_errors, last_json, run, write_corpus

TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=4",
        "--config.log_every=5", "--config.warmup_steps=2", "--config.eval_windows=4",
        "--config.eval_batch_size=4", "--config.checkpoint_every=10", "--config.kmeans_tokens=256"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"),
                      "To be, or not to be, line {}: that is the question.", lines=400, cycle=13)


@pytest.fixture(scope="module")
def exact_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gpt2_exact")
  result = last_json(run("train.gpt2", "--mesh=2", f"--workdir={workdir}",
                         f"--config.text={corpus}", "--config.steps=20", "--config.lr=1e-2",
                         *TINY))
  return workdir, result


def test_exact_perplexity_same_on_mesh_1_and_4(exact_run):
  workdir, trained = exact_run
  assert trained["perplexity"] < 256  # learnt something beyond uniform bytes
  one = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=1", "--eval"))
  four = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=4", "--eval"))
  assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
  assert one["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5)
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] > 0
  for key in ("perplexity", "loss", "exchange", "mesh", "groups", "bits_per_token",
              "bytes_per_device", "tokens"):
    assert key in four


def test_vq_finetune_eval_and_generation(exact_run, corpus, tmp_path):
  workdir, _ = exact_run
  vq_dir = tmp_path / "vq"
  proc = run("train.gpt2", "--mesh=4", f"--workdir={vq_dir}", f"--init-from={workdir}",
             f"--config.text={corpus}", "--config.exchange=vq", "--config.vq.groups=4",
             "--config.vq.codebook_size=16", "--config.steps=5", *TINY)
  result = last_json(proc)
  assert "k-means" in proc.stdout and result["exchange"] == "vq"
  assert result["bits_per_token"] == 16
  gen = run("infer.gpt2", f"--workdir={vq_dir}", "--mesh=4", "--prompt", "To be, or",
            "--max-new-tokens", "12")
  out = last_json(gen)
  assert out["new_tokens"] == 12 and gen.stdout.startswith("To be, or")
  assert out["completion"] in gen.stdout
  # the run's codebooks streamed forward over 2 processes (host transport, TCP)
  # give the one-process all-gather's perplexity exactly: identical codes
  vq = last_json(run("infer.gpt2", f"--workdir={vq_dir}", "--mesh=2", "--eval"))
  stream = last_json(run("infer.launch", "--procs=2", "--", "infer.gpt2", f"--workdir={vq_dir}",
                         "--mesh=2", "--eval", "--exchange=stream"))
  assert stream["exchange"] == "stream" and stream["bytes_per_device"] == 0  # none in XLA
  assert (stream["perplexity"], stream["loss"]) == (vq["perplexity"], vq["loss"])


def test_bpe_tokenizer_from_local_files(corpus, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train([str(corpus)], vocab_size=300, min_frequency=1, show_progress=False)
  folder = tmp_path / "bpe"
  folder.mkdir()
  tok.save_model(str(folder))  # vocab.json + merges.txt, the GPT-2 layout
  result = last_json(run("train.gpt2", "--mesh=2", f"--workdir={tmp_path / 'run'}",
                         f"--config.text={corpus}", f"--config.tokenizer={folder}",
                         "--config.steps=3", *TINY))
  cfg = json.loads((tmp_path / "run" / "config.json").read_text())
  assert cfg["vocab_size"] == tok.get_vocab_size() and result["tokens"] > 0


def test_bad_input_gives_clear_errors(exact_run, corpus, tmp_path):
  """More in tests/test_bad_input.py (a prompt longer than the context, vq on an
  exact run, config values out of range, ...)."""
  workdir, _ = exact_run
  (tmp_path / "empty").mkdir()
  cases = [
      (["train.gpt2", "--mesh=3", f"--workdir={tmp_path}/a", f"--config.text={corpus}", *TINY],
       "context length 32 is not divisible by the mesh size 3"),
      (["train.gpt2", "--mesh=2", f"--workdir={tmp_path}/b", f"--config.text={corpus}",
        f"--config.tokenizer={tmp_path}/empty", *TINY], "no tokenizer files"),
      (["train.gpt2", "--mesh=2", f"--workdir={tmp_path}/c", f"--config.text={tmp_path}/nope",
        *TINY], "does not exist"),
      (["infer.gpt2", f"--workdir={workdir}", "--mesh=2"], "nothing to do"),
  ]
  assert_clean_errors(cases)


def test_results_command_reuses_exact_run(exact_run, corpus, tmp_path):
  workdir, trained = exact_run
  md = tmp_path / "RESULTS.md"
  md.write_text("# Results\n\n<!-- gpt2-results:begin -->\nold\n<!-- gpt2-results:end -->\ntail\n")
  out = tmp_path / "r.json"
  command = ["infer.results", "gpt2", f"--root={tmp_path}/runs", "--mesh=2",
             f"--exact-workdir={workdir}", "--only", "vq_g1_kmeans", "tp", "spd",
             f"--results={out}", "--codebook-size=16",
             f"--markdown={md}", "--extra", f"--config.text={corpus}", "--config.steps=20",
             *TINY]
  # a previous results file: its rows of other variants (and of the default codebook
  # size) are kept, stale ones replaced
  kept = dict(name="vq_g32", label="ASTRA G=32", groups=32, bits_per_token=320,
              bytes_per_device=1234, perplexity=99.0)
  kept_k1024 = dict(kept, name="vq_g1_kmeans", groups=1, bits_per_token=16)
  stale = [dict(kept, name=n, perplexity=1e9) for n in
           ("single_device", "exact", "vq_g1_kmeans_k16", "spd", "spd_distilled")]
  out.write_text(json.dumps({"rows": [*stale, kept, kept_k1024]}))
  result = run(*command)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from step 20" in result.stdout  # the exact run is reused, not retrained
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["single_device", "exact", "vq_g32", "vq_g1_kmeans",
                                       "vq_g1_kmeans_k16", "tp", "spd", "spd_distilled"]
  assert rows[2] == kept and rows[3] == kept_k1024
  del rows[3]
  assert rows[4]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-5)  # tp exact
  assert rows[5]["drop"] == rows[6]["drop"] and rows[5]["bytes_per_device"] < \
      rows[4]["bytes_per_device"]
  assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-5)
  assert rows[1]["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5)
  assert rows[3]["exchange"] == "vq" and rows[3]["bits_per_token"] == 8  # 4 bits -> 1 byte
  assert (tmp_path / "runs" / "vq_g1_kmeans_k16").is_dir()  # apart from a K=1024 run
  text = md.read_text()
  assert "old" not in text and text.endswith("<!-- gpt2-results:end -->\ntail\n")
  assert "| ASTRA G=1, k-means only (no fine-tuning), K=16 | 1 | 8 |" in text
  # P=2: the all-reduces' 2 (P-1)/P = 1x their buffer reach a device, the all-gather 1x
  assert "| tensor parallel (Megatron) | - | - | 16,384 | 0.5x | 16,384 |" in text
  assert rows[1]["bytes_received_per_device"] == rows[1]["bytes_per_device"] == 8192


def test_tensor_parallel_baselines_and_spd_drop_set(exact_run):
  workdir, _ = exact_run
  one = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=1", "--eval"))
  tp = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=2", "--eval", "--tp=tp"))
  assert tp["parallelism"] == "tensor" and tp["strategy"] == "tp"
  assert tp["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
  # 2 blocks x 2 all-reduces of 32 tokens x 32 floats
  assert tp["bytes_per_device"] == tp["bytes_per_device_formula"] == 4 * 32 * 32 * 4
  flash = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=2", "--eval",
                        "--tp=flash:bits=8,group_size=32"))
  assert flash["bytes_per_device"] == flash["bytes_per_device_formula"] < tp["bytes_per_device"]
  assert flash["perplexity"] == pytest.approx(one["perplexity"], rel=0.05)
  picked = last_json(run("infer.spd", f"--workdir={workdir}", "--mesh=2", "--budget=1",
                         "--extreme=10", "--distill-steps=5", "--calib-batches=2"))
  assert [b["block"] for b in picked["blocks"]] == [0, 1] and len(picked["drop"]) == 1
  assert picked["tp"] == pytest.approx(one["perplexity"], rel=1e-5)
  assert picked["sync_points"] == 3 and picked["bytes_per_device"] == 3 * 32 * 32 * 4
  for fit in picked["distilled"].values():
    assert fit["mse_after"] < fit["mse_before"]
  assert_clean_errors([
      (("infer.gpt2", f"--workdir={workdir}", "--mesh=4", "--eval", "--tp=tp"),
       "2 heads do not split over 4"),
      (("infer.gpt2", f"--workdir={workdir}", "--mesh=2", "--eval", "--tp=megatron"),
       "unknown tensor-parallel sync"),
      (("infer.gpt2", f"--workdir={workdir}", "--mesh=2", "--prompt=To", "--tp=tp"),
       "drop one of the two"),
      (("infer.gpt2", f"--workdir={workdir}", "--mesh=2", "--eval", "--tp=tp",
        "--drop-rate=0.1"), "does not apply to --tp"),
      (("infer.spd", f"--workdir={workdir}", "--mesh=2", "--budget=5"), "between 0 and"),
  ])
